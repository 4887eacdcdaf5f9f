#include "worker/secret_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "common/secret_memory.h"

#ifndef SYS_memfd_secret
#if defined(__x86_64__)
#define SYS_memfd_secret 447
#elif defined(__aarch64__)
#define SYS_memfd_secret 447
#endif
#endif

namespace si {

namespace {

constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

std::string errno_text(int err) { return std::strerror(err); }

std::string memlock_text() {
    rlimit rl{};
    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return "";
    return " (RLIMIT_MEMLOCK is " + std::to_string(rl.rlim_cur) + " bytes)";
}

}  // namespace

const char* secret_memory_kind_name(SecretMemoryKind kind) {
    switch (kind) {
        case SecretMemoryKind::memfd_secret: return "memfd_secret";
        case SecretMemoryKind::mlock: return "mlock + MADV_DONTDUMP";
        case SecretMemoryKind::unlocked: return "MADV_DONTDUMP only (not locked)";
    }
    return "unknown";
}

const char* secret_memory_kind_config(SecretMemoryKind kind) {
    switch (kind) {
        case SecretMemoryKind::memfd_secret: return "memfd_secret";
        case SecretMemoryKind::mlock: return "mlock";
        case SecretMemoryKind::unlocked: return "unlocked";
    }
    return "unknown";
}

std::unique_ptr<SecretArena> SecretArena::create(size_t bytes, bool try_memfd_secret) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    if (bytes == 0) fail(Status::invalid_argument, "secret arena size must be positive");
    bytes = round_up(bytes, page);
    std::unique_ptr<SecretArena> a(new SecretArena());
    a->size_ = bytes;

#ifdef SYS_memfd_secret
    if (try_memfd_secret) {
        const int fd = int(syscall(SYS_memfd_secret, unsigned(O_CLOEXEC)));
        const int err = errno;
        if (fd < 0) {
            a->note_ = "memfd_secret unavailable: " + errno_text(err) +
                       (err == ENOSYS ? " (kernel built without CONFIG_SECRETMEM or booted without secretmem)" : "");
        } else if (ftruncate(fd, off_t(bytes)) != 0) {
            a->note_ = "memfd_secret: cannot size the arena to " + std::to_string(bytes) + " bytes: " +
                       errno_text(errno);
            close(fd);
        } else {
            void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            const int err = errno;
            close(fd);  // the mapping keeps the memory alive
            if (p == MAP_FAILED) {
                a->note_ = "memfd_secret: cannot map " + std::to_string(bytes) + " bytes: " + errno_text(err) +
                           (err == EAGAIN ? memlock_text() : "");
            } else {
                a->base_ = static_cast<uint8_t*>(p);
                a->kind_ = SecretMemoryKind::memfd_secret;
            }
        }
    } else {
        a->note_ = "memfd_secret not tried";
    }
#else
    a->note_ = "memfd_secret unavailable on this architecture";
#endif

    if (!a->base_) {
        // MAP_NORESERVE + MLOCK_ONFAULT: a large reservation costs nothing until the core fills it.
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            fail(Status::out_of_memory,
                 "cannot reserve a secret arena of " + std::to_string(bytes) + " bytes: " + errno_text(errno));
        a->base_ = static_cast<uint8_t*>(p);
        madvise(p, bytes, MADV_DONTDUMP);
        madvise(p, bytes, MADV_WIPEONFORK);
        if (mlock2(p, bytes, MLOCK_ONFAULT) == 0) {
            a->kind_ = SecretMemoryKind::mlock;
        } else {
            const int err = errno;
            a->kind_ = SecretMemoryKind::unlocked;
            a->note_ += "; mlock refused: " + errno_text(err) + memlock_text();
        }
    }
    a->free_.emplace(0, bytes);
    return a;
}

SecretArena::~SecretArena() {
    // Every live block is zeroed; freed blocks already are. Untouched pages are never faulted in.
    for (const auto& [off, len] : used_) secure_zero(base_ + off, len);
    if (base_) munmap(base_, size_);
}

void SecretArena::wipe_all_except(const void* keep) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [off, len] : used_)
        if (base_ + off != keep) secure_zero(base_ + off, len);
}

void* SecretArena::allocate(size_t n) {
    if (n > size_) return nullptr;
    const size_t len = round_up(n == 0 ? 1 : n, kAlign);
    std::lock_guard<std::mutex> lock(mu_);
    // First fit over the coalesced free ranges: the core makes few, mostly long-lived secret allocations (tensors,
    // keys, the KV cache); OpenSSL's small objects come and go in the holes.
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second < len) continue;
        const size_t off = it->first, rest = it->second - len;
        free_.erase(it);
        if (rest) free_.emplace(off + len, rest);
        used_.emplace(off, len);
        return base_ + off;
    }
    return nullptr;
}

void SecretArena::free(void* p, size_t n) {
    if (!p) return;
    auto* b = static_cast<uint8_t*>(p);
    if (b < base_ || b >= base_ + size_) std::abort();
    const size_t off = size_t(b - base_);
    size_t len = 0;
    {
        std::lock_guard<std::mutex> lock(mu_);
        auto u = used_.find(off);
        if (u == used_.end() || round_up(n == 0 ? 1 : n, kAlign) != u->second) std::abort();
        len = u->second;
        used_.erase(u);
    }
    // Zeroed outside the lock (the core frees large buffers from several threads): the block is in neither map
    // meanwhile, so it can be neither handed out nor freed twice.
    secure_zero(b, len);
    std::lock_guard<std::mutex> lock(mu_);
    size_t start = off;
    // Coalesce with both neighbours so large buffers can be allocated again after churn.
    auto next = free_.lower_bound(off);
    if (next != free_.end() && next->first == off + len) {
        len += next->second;
        next = free_.erase(next);
    }
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == start) {
            start = prev->first;
            len += prev->second;
            free_.erase(prev);
        }
    }
    free_.emplace(start, len);
}

size_t SecretArena::in_use() const {
    std::lock_guard<std::mutex> lock(mu_);
    size_t total = 0;
    for (const auto& [off, len] : used_) total += len;
    return total;
}

namespace {
void* arena_alloc(void* ctx, size_t n) { return static_cast<SecretArena*>(ctx)->allocate(n); }
void arena_free(void* ctx, void* p, size_t n) { static_cast<SecretArena*>(ctx)->free(p, n); }
}  // namespace

void SecretArena::install() {
    const SecretAllocatorHooks hooks{arena_alloc, arena_free, this};
    set_secret_allocator(&hooks);
}

}  // namespace si
