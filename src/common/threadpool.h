// A fixed pool of worker threads for data-parallel loops. The calling thread takes part in every loop, so a pool of
// size 1 runs everything inline. Workers wait on a condition variable between loops after a short spin, so an idle
// pool costs no CPU.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace si {

class ThreadPool {
public:
    // n_threads <= 0 picks the number of online CPUs. spin: pause instructions a worker spins between loops before
    // it sleeps (-1: the default, tuned for decoding).
    explicit ThreadPool(int n_threads = 0, int spin = -1);

    // Loops that run on threads someone else owns: the trusted core's pool is built on its platform's
    // parallel_for OCALL (enclave_abi.h), since the core itself never creates threads.
    using ExternalRunner = void (*)(void* ctx, int64_t n, int64_t grain, void (*fn)(void* arg, int64_t begin, int64_t end),
                                    void* arg);
    ThreadPool(ExternalRunner runner, void* ctx);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }

    // Calls fn(begin, end) on disjoint chunks covering [0, n), each chunk a multiple of `grain` long except the
    // last. Returns when all chunks are done. Not reentrant: fn must not call parallel_for on the same pool.
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

    // Calls fn once on every thread of the pool, the caller's included, each call on its own thread; returns when
    // all are done. For per-thread set-up, e.g. before a process restricts the system calls its threads may make.
    void run_on_each_thread(const std::function<void()>& fn);

    static int default_threads();

private:
    void worker_loop();
    void run_chunks();

    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_start_, cv_done_;
    uint64_t generation_ = 0;
    bool stop_ = false;
    const std::function<void(int64_t, int64_t)>* job_ = nullptr;
    int64_t job_n_ = 0, job_grain_ = 1;
    std::atomic<int64_t> next_{0};
    std::atomic<int> busy_{0};
    std::atomic<uint64_t> published_{0};
    std::atomic<int> started_{0};
    int spin_ = 0;
    ExternalRunner external_ = nullptr;
    void* external_ctx_ = nullptr;
};

}  // namespace si
