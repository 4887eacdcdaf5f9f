#include "host/shm_ring.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <string>

#include "common/error.h"

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

int32_t checked_status(int rc) {
    return rc <= int(si::Status::invalid_argument) && rc >= int(si::Status::internal) ? rc
                                                                                       : int32_t(si::Status::internal);
}

bool answer(Header& h, uint8_t* base, const Layout& l, uint32_t seq, ProcessFn process, void* ctx) {
    uint8_t* const shm_req = base + l.request_offset;
    uint8_t* const shm_resp = base + l.response_offset;
    const uint32_t op = load(h.request_op, std::memory_order_relaxed);
    const uint64_t len = load64(h.request_len);
    if (op == op_exit) return false;

    int32_t status = 0;
    uint64_t out_len = 0;
    std::string error;
    if (op != op_process) {
        status = int32_t(si::Status::invalid_argument);
        error = "unknown ring operation " + std::to_string(op);
    } else if (len > l.request_capacity) {
        status = int32_t(si::Status::invalid_argument);
        error = "request length " + std::to_string(len) + " exceeds the ring's request area of " +
                std::to_string(l.request_capacity) + " bytes";
    } else {
        if (l.response_capacity) shm_resp[0] = 0;
        size_t rlen = 0;
        const int rc = process(ctx, shm_req, size_t(len), shm_resp, l.response_capacity, &rlen);
        if (rc == 0 && rlen <= l.response_capacity) {
            out_len = rlen;
        } else if (rc == 0) {
            status = int32_t(si::Status::internal);
            error = "trusted core reported a response larger than its buffer";
        } else {
            status = checked_status(rc);
            out_len = strnlen(reinterpret_cast<const char*>(shm_resp), l.response_capacity);
        }
    }
    if (!error.empty()) {
        out_len = std::min<uint64_t>(error.size(), l.response_capacity);
        std::memcpy(shm_resp, error.data(), out_len);
    }
    store_i32(h.response_status, status);
    store64(h.response_len, out_len);
    store(h.response_seq, seq);  // release: the host sees the bytes before the doorbell
    wake_sleepers(h.response_seq, h.response_sleepers);
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
