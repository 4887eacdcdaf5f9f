// The enclave side of secureinfer_enclave.edl's bridges, in portable C++ so that it is tested without SGX: what
// the trusted bridge does between the edger8r-generated ECALL/OCALL stubs and the C ABI of enclave_abi.h.
//   - Handles: the host names a trusted core by a number, never by an enclave pointer.
//   - check_process_buffers: ecall_process's request and response are [user_check]; the bridge bounds their sizes
//     and checks that both lie outside the enclave before the core copies the request in (nothing of a size the
//     host chose is allocated inside without the SI_ENCLAVE_MAX_MESSAGE bound).
//   - ParallelJobs: si_ocall_table::parallel_for without function pointers crossing the boundary: the host only
//     lends threads (ocall_parallel_for), which enter through ecall_parallel_worker and take chunks from a counter
//     inside the enclave.
// Under SGX, `outside` is sgx_is_outside_enclave, `lend` the ocall_parallel_for stub and the waiting an SGX
// condition variable; those and the stubs are the untested part (no SGX hardware here).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#include "boundary/enclave_abi.h"

namespace si::bridge {

class Handles {
public:
    // Returns the handle (never 0) for a core the bridge created.
    uint64_t add(si_enclave* e);
    // nullptr for a handle that names no live core.
    si_enclave* find(uint64_t handle) const;
    // Forgets the handle and returns its core (nullptr when unknown), for ecall_destroy.
    si_enclave* remove(uint64_t handle);

private:
    mutable std::mutex mu_;
    uint64_t next_ = 1;
    std::map<uint64_t, si_enclave*> live_;
};

// Whether [p, p + n) lies wholly outside the enclave (sgx_is_outside_enclave under SGX).
using OutsideFn = std::function<bool(const void* p, size_t n)>;
// nullptr when ecall_process may go ahead, else the refusal (a static string).
const char* check_process_buffers(const uint8_t* request, size_t request_len, const uint8_t* response,
                                  size_t response_cap, const OutsideFn& outside);

class ParallelJobs {
public:
    // lend(job, workers): ask the host for up to `workers` threads, each to call work(job) once (ocall_parallel_for;
    // it may return before they run, or the host may lend none).
    using Lend = std::function<void(uint64_t job, int workers)>;
    ParallelJobs(int max_workers, Lend lend) : max_workers_(max_workers), lend_(std::move(lend)) {}
    ParallelJobs(const ParallelJobs&) = delete;
    ParallelJobs& operator=(const ParallelJobs&) = delete;

    // si_ocall_table::parallel_for: fn(arg, begin, end) over [0, n) in chunks of `grain`, each chunk exactly once,
    // on the calling thread and any lent thread; returns when every chunk has run. A call while another job runs
    // runs on the calling thread alone.
    void parallel_for(int64_t n, int64_t grain, void (*fn)(void*, int64_t, int64_t), void* arg);
    // ecall_parallel_worker: a lent thread takes chunks of job `job` until none is left. A job that is not the
    // running one (unknown, finished, or a guess) returns at once without calling anything.
    void work(uint64_t job);
    // The C ABI's parallel_for entry, with this object as ctx.
    static void parallel_for_ocall(void* ctx, int64_t n, int64_t grain, void (*fn)(void*, int64_t, int64_t),
                                   void* arg) {
        static_cast<ParallelJobs*>(ctx)->parallel_for(n, grain, fn, arg);
    }

private:
    struct Job {
        uint64_t id = 0;
        int64_t n = 0, grain = 1, chunks = 0;
        void (*fn)(void*, int64_t, int64_t) = nullptr;
        void* arg = nullptr;
        std::atomic<int64_t> next{0}, done{0};
        std::mutex mu;
        std::condition_variable all_done;
    };
    // Runs chunks of j until none is left to take.
    static void run_chunks(Job& j);

    const int max_workers_;
    Lend lend_;
    std::mutex mu_;
    uint64_t last_id_ = 0;
    std::shared_ptr<Job> current_;  // late lent threads keep a finished job alive without touching the caller
};

}  // namespace si::bridge
