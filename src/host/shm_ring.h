// The shared-memory channel between the host and the hardened worker process: one sealed memfd holding a fixed
// header and a request area and a response area. One message is in flight at a time; 32-bit sequence words in the
// header are the doorbells (futex wait / wake, no spinning unless asked for). Beside each doorbell the waiting side
// counts itself while it sleeps in the kernel, so a side that rings a doorbell makes the wake-up system call only
// when someone sleeps: with spinning on both sides a message crosses without any system call (as SGX's switchless
// calls do).
//
// Neither side trusts the other: the host is the adversary of the trusted core, and the host must survive a broken
// worker. So each side keeps its own copy of the layout (never re-read from shared memory), reads every shared
// scalar exactly once per message, and bounds-checks every length before using it.
#pragma once
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace si::ring {

inline constexpr uint64_t kMagic = 0x314752494e495345ull;  // "ESINIRG1" little-endian
inline constexpr uint32_t kVersion = 2;
inline constexpr size_t kPage = 4096;
// The worker finds the ring at this descriptor number.
inline constexpr int kWorkerFd = 3;

enum Op : uint32_t { op_process = 1, op_exit = 2 };
enum WorkerState : uint32_t { state_starting = 0, state_ready = 1, state_failed = 2 };
// The secret memory the worker got, weakest last.
enum SecretKind : uint32_t { secret_memfd_secret = 1, secret_mlock = 2, secret_unlocked = 3 };

struct alignas(64) Header {
    // Layout, written by the host before the worker starts. The worker checks it once against the file size.
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;
    uint64_t request_offset, request_capacity;
    uint64_t response_offset, response_capacity;
    uint64_t total_bytes;

    // Host -> worker. request_seq is the doorbell: the host bumps it after writing op, length and bytes.
    alignas(64) uint32_t request_seq;
    uint32_t request_op;
    uint64_t request_len;
    uint32_t request_sleepers;  // worker -> host: the worker sleeps on request_seq (a hint; see wake_sleepers)

    // Worker -> host. response_seq is the doorbell: the worker sets it to the request's sequence number when done.
    alignas(64) uint32_t response_seq;
    int32_t response_status;  // 0, or a negative si::Status
    uint64_t response_len;    // response bytes, or the length of the error message in the response area
    uint32_t response_sleepers;  // host -> worker: the host sleeps on response_seq

    // Worker start-up report. worker_state is the doorbell during start-up.
    alignas(64) uint32_t worker_state;
    uint32_t secret_kind;  // SecretKind
    int32_t start_status;  // when state_failed: a negative si::Status
    uint32_t reserved;
    char note[512];        // NUL-terminated: the failure, or why the secret memory is a fallback
};
static_assert(sizeof(Header) <= kPage);

constexpr size_t round_page(size_t n) { return (n + kPage - 1) / kPage * kPage; }

struct Layout {
    size_t request_offset = 0, request_capacity = 0;
    size_t response_offset = 0, response_capacity = 0;
    size_t total_bytes = 0;
};

// The layout for request and response areas of `capacity` bytes each.
Layout make_layout(size_t capacity);
// Fills a fresh header (the region must be zeroed).
void init_header(Header& h, const Layout& l);
// Checks a header written by the other side against the region's actual size; returns false when inconsistent.
bool read_layout(Header& h, size_t region_bytes, size_t max_capacity, Layout& out);

// A return code of the trusted core as a ring status: itself when it is a failure code, else internal.
int32_t checked_status(int rc);

// The worker's answer to one request (its doorbell read as `seq`): reads the host's op and length once, checks them
// against the worker's own layout `l`, has `process` answer a request in place (si_ecall_process's contract: on
// failure a NUL-terminated message in the response area), then writes the status, the length and, last, the response
// doorbell. Returns false for op_exit (nothing written). `base` maps l.total_bytes.
using ProcessFn = int (*)(void* ctx, const uint8_t* request, size_t request_len, uint8_t* response,
                          size_t response_cap, size_t* response_len);
bool answer(Header& h, uint8_t* base, const Layout& l, uint32_t seq, ProcessFn process, void* ctx);

// Shared scalars are accessed atomically: the other process may write them at any moment.
inline uint32_t load(uint32_t& w, std::memory_order o = std::memory_order_acquire) {
    return std::atomic_ref<uint32_t>(w).load(o);
}
inline void store(uint32_t& w, uint32_t v, std::memory_order o = std::memory_order_release) {
    std::atomic_ref<uint32_t>(w).store(v, o);
}
inline uint64_t load64(uint64_t& w) { return std::atomic_ref<uint64_t>(w).load(std::memory_order_relaxed); }
inline void store64(uint64_t& w, uint64_t v) { std::atomic_ref<uint64_t>(w).store(v, std::memory_order_relaxed); }
inline int32_t load_i32(int32_t& w) { return std::atomic_ref<int32_t>(w).load(std::memory_order_relaxed); }
inline void store_i32(int32_t& w, int32_t v) { std::atomic_ref<int32_t>(w).store(v, std::memory_order_relaxed); }

// Wakes every waiter on a doorbell word (shared futex: the word lives in a MAP_SHARED mapping).
void wake(uint32_t& word);
// The same, after the doorbell was rung, only when `sleepers` (the waiters' count beside the word) says someone
// sleeps. The other side can lie about its count; it then only delays itself (every wait has a timeout).
void wake_sleepers(uint32_t& word, uint32_t& sleepers);
// Waits until `word` is no longer `current`, for at most `timeout`. First spins for `spin` (0: not at all). With
// `sleepers`, counts itself there while it sleeps. Returns the new value, or `current` on timeout. Spurious returns
// are possible; callers loop.
uint32_t wait_change(uint32_t& word, uint32_t current, std::chrono::nanoseconds timeout,
                     std::chrono::nanoseconds spin = std::chrono::nanoseconds(0), uint32_t* sleepers = nullptr);

}  // namespace si::ring
