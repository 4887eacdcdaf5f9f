// Secret memory: where the trusted core keeps key material, secret tensors and unmasked activations.
//
// The trusted core allocates every secret buffer through si_secret_alloc / si_secret_free. By default these use the
// ordinary heap (and zero on free); the hardened worker process routes them to its secret arena (memfd_secret, or
// locked, non-dumpable memory where the kernel lacks it) by calling set_secret_allocator() once at start-up,
// before the trusted core allocates anything. Every secret buffer is zeroed when it is freed.
#pragma once
#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

extern "C" {
// Returns n bytes (64-byte aligned, zero-filled) of secret memory, or NULL when none is left. n == 0 is allowed.
void* si_secret_alloc(size_t n);
// Zeroes and releases a buffer from si_secret_alloc; n must be the size it was allocated with. NULL is ignored.
void si_secret_free(void* p, size_t n);
}

namespace si {

// Zeroes memory in a way the compiler may not optimise away.
void secure_zero(void* p, size_t n) noexcept;

// Routes si_secret_alloc / si_secret_free. alloc must return zero-filled, 64-byte aligned memory or nullptr;
// free must zero. Pass nullptr to restore the default (heap) allocator. Install before the first secret allocation:
// a buffer must be freed by the allocator that made it.
struct SecretAllocatorHooks {
    void* (*alloc)(void* ctx, size_t n);
    void (*free)(void* ctx, void* p, size_t n);
    void* ctx;
};
void set_secret_allocator(const SecretAllocatorHooks* hooks) noexcept;

// A standard allocator over secret memory, e.g. SecretVector<float> for a secret tensor. Throws std::bad_alloc
// when the secret arena is exhausted.
template <class T>
struct SecretAllocator {
    using value_type = T;
    SecretAllocator() noexcept = default;
    template <class U>
    SecretAllocator(const SecretAllocator<U>&) noexcept {}
    T* allocate(size_t n) {
        if (n > size_t(-1) / sizeof(T)) throw std::bad_alloc();
        void* p = si_secret_alloc(n * sizeof(T));
        if (!p) throw std::bad_alloc();
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t n) noexcept { si_secret_free(p, n * sizeof(T)); }
    template <class U>
    bool operator==(const SecretAllocator<U>&) const noexcept { return true; }
};

template <class T>
using SecretVector = std::vector<T, SecretAllocator<T>>;

// Secret or ordinary memory, chosen per container when it is made: for a type (such as packed weights) that holds
// public data in one place and secret data in another. The choice travels with moves and swaps.
template <class T>
struct MaybeSecretAllocator {
    using value_type = T;
    using propagate_on_container_copy_assignment = std::true_type;
    using propagate_on_container_move_assignment = std::true_type;
    using propagate_on_container_swap = std::true_type;
    bool secret = false;
    MaybeSecretAllocator() noexcept = default;
    explicit MaybeSecretAllocator(bool secret_memory) noexcept : secret(secret_memory) {}
    template <class U>
    MaybeSecretAllocator(const MaybeSecretAllocator<U>& o) noexcept : secret(o.secret) {}
    T* allocate(size_t n) {
        if (secret) return SecretAllocator<T>().allocate(n);
        return std::allocator<T>().allocate(n);
    }
    void deallocate(T* p, size_t n) noexcept {
        if (secret)
            SecretAllocator<T>().deallocate(p, n);
        else
            std::allocator<T>().deallocate(p, n);
    }
    template <class U>
    bool operator==(const MaybeSecretAllocator<U>& o) const noexcept { return secret == o.secret; }
};

template <class T>
using MaybeSecretVector = std::vector<T, MaybeSecretAllocator<T>>;

}  // namespace si
