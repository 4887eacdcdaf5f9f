#include "common/secret_memory.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace si {

void secure_zero(void* p, size_t n) noexcept {
    if (!p || n == 0) return;
    std::memset(p, 0, n);
    // Keeps the memset: the compiler must assume the zeroed bytes are read.
    asm volatile("" : : "r"(p) : "memory");
}

namespace {

constexpr size_t kAlign = 64;

void* heap_alloc(void*, size_t n) {
    void* p = std::aligned_alloc(kAlign, n == 0 ? kAlign : (n + kAlign - 1) / kAlign * kAlign);
    if (p) std::memset(p, 0, n);
    return p;
}

void heap_free(void*, void* p, size_t n) {
    secure_zero(p, n);
    std::free(p);
}

const SecretAllocatorHooks kHeapHooks{heap_alloc, heap_free, nullptr};
std::atomic<const SecretAllocatorHooks*> g_hooks{&kHeapHooks};
SecretAllocatorHooks g_installed{};

}  // namespace

void set_secret_allocator(const SecretAllocatorHooks* hooks) noexcept {
    if (!hooks) {
        g_hooks.store(&kHeapHooks, std::memory_order_release);
        return;
    }
    g_installed = *hooks;
    g_hooks.store(&g_installed, std::memory_order_release);
}

}  // namespace si

extern "C" void* si_secret_alloc(size_t n) {
    const auto* h = si::g_hooks.load(std::memory_order_acquire);
    return h->alloc(h->ctx, n);
}

extern "C" void si_secret_free(void* p, size_t n) {
    if (!p) return;
    const auto* h = si::g_hooks.load(std::memory_order_acquire);
    h->free(h->ctx, p, n);
}
