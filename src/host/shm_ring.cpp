#include "host/shm_ring.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace si::ring {

Layout make_layout(size_t capacity) {
    Layout l;
    l.request_offset = kPage;
    l.request_capacity = capacity;
    l.response_offset = l.request_offset + round_page(capacity);
    l.response_capacity = capacity;
    l.total_bytes = l.response_offset + round_page(capacity);
    return l;
}

void init_header(Header& h, const Layout& l) {
    h.magic = kMagic;
    h.version = kVersion;
    h.header_bytes = uint32_t(kPage);
    h.request_offset = l.request_offset;
    h.request_capacity = l.request_capacity;
    h.response_offset = l.response_offset;
    h.response_capacity = l.response_capacity;
    h.total_bytes = l.total_bytes;
}

bool read_layout(Header& h, size_t region_bytes, size_t max_capacity, Layout& out) {
    // Each field is read once into a local; all checks and all later use go through the locals.
    const uint64_t magic = load64(h.magic);
    const uint32_t version = std::atomic_ref<uint32_t>(h.version).load(std::memory_order_relaxed);
    const uint32_t header_bytes = std::atomic_ref<uint32_t>(h.header_bytes).load(std::memory_order_relaxed);
    Layout l;
    l.request_offset = load64(h.request_offset);
    l.request_capacity = load64(h.request_capacity);
    l.response_offset = load64(h.response_offset);
    l.response_capacity = load64(h.response_capacity);
    l.total_bytes = load64(h.total_bytes);
    if (magic != kMagic || version != kVersion || header_bytes != kPage) return false;
    if (l.request_capacity > max_capacity || l.response_capacity > max_capacity) return false;
    // With capacities bounded the sums below cannot overflow.
    if (l.request_offset != kPage) return false;
    if (l.response_offset != l.request_offset + round_page(l.request_capacity)) return false;
    if (l.total_bytes != l.response_offset + round_page(l.response_capacity)) return false;
    if (l.total_bytes != region_bytes) return false;
    out = l;
    return true;
}

void wake(uint32_t& word) {
    syscall(SYS_futex, &word, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

void wake_sleepers(uint32_t& word, uint32_t& sleepers) {
    // The doorbell store and the sleepers load are ordered by this fence, and the waiter's count increment and its
    // doorbell load by its read-modify-write: at least one side sees the other, so no wake-up is lost.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (std::atomic_ref<uint32_t>(sleepers).load(std::memory_order_relaxed) != 0) wake(word);
}

uint32_t wait_change(uint32_t& word, uint32_t current, std::chrono::nanoseconds timeout,
                     std::chrono::nanoseconds spin, uint32_t* sleepers) {
    using clock = std::chrono::steady_clock;
    if (spin.count() > 0) {
        const auto until = clock::now() + spin;
        for (unsigned i = 0;; ++i) {
            const uint32_t v = load(word);
            if (v != current) return v;
#if defined(__x86_64__) || defined(__i386__)
            _mm_pause();
#endif
            if ((i & 63) == 63 && clock::now() >= until) break;
        }
    }
    if (sleepers) std::atomic_ref<uint32_t>(*sleepers).fetch_add(1, std::memory_order_seq_cst);
    uint32_t v = std::atomic_ref<uint32_t>(word).load(std::memory_order_seq_cst);
    if (v != current) {
        if (sleepers) std::atomic_ref<uint32_t>(*sleepers).fetch_sub(1, std::memory_order_relaxed);
        return v;
    }
    timespec ts{};
    ts.tv_sec = time_t(timeout.count() / 1000000000);
    ts.tv_nsec = long(timeout.count() % 1000000000);
    // FUTEX_WAIT (not _PRIVATE): the word is shared with another process. It returns at once when the word
    // already changed (EAGAIN), on a wake, on a signal (EINTR) or on timeout (ETIMEDOUT); the caller loops.
    syscall(SYS_futex, &word, FUTEX_WAIT, current, &ts, nullptr, 0);
    if (sleepers) std::atomic_ref<uint32_t>(*sleepers).fetch_sub(1, std::memory_order_relaxed);
    return load(word);
}

}  // namespace si::ring
