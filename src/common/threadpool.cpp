#include "common/threadpool.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#define SI_PAUSE() _mm_pause()
#else
#define SI_PAUSE() ((void)0)
#endif

namespace si {

// Spin this many pause instructions (a few tens of microseconds) before sleeping: long enough to bridge the gaps
// between the loops of one decoding step, short enough not to steal a core from another process (the enclave
// worker) that the caller is waiting for.
constexpr int kSpin = 50000;

int ThreadPool::default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : int(n);
}

ThreadPool::ThreadPool(int n_threads, int spin) : spin_(spin < 0 ? kSpin : spin) {
    if (n_threads <= 0) n_threads = default_threads();
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    // Return only once every worker runs: their start-up (libc's and a sanitizer's per-thread set-up) is then
    // over, which a process that restricts its system calls next (the enclave worker) relies on.
    while (started_.load(std::memory_order_acquire) < int(workers_.size())) std::this_thread::yield();
}

ThreadPool::ThreadPool(ExternalRunner runner, void* ctx) : external_(runner), external_ctx_(ctx) {}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
        ++generation_;
        published_.store(generation_, std::memory_order_release);
    }
    cv_start_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks() {
    const int64_t n = job_n_, grain = job_grain_;
    // Chunks of about n / (4 * threads), rounded up to the grain, to balance uneven cores.
    int64_t chunk = std::max<int64_t>(grain, (n / (4 * size()) + grain - 1) / grain * grain);
    for (;;) {
        const int64_t begin = next_.fetch_add(chunk, std::memory_order_relaxed);
        if (begin >= n) break;
        (*job_)(begin, std::min(n, begin + chunk));
    }
}

void ThreadPool::worker_loop() {
    started_.fetch_add(1, std::memory_order_release);
    uint64_t seen = 0;
    for (;;) {
        // Spin briefly: in decoding, loops follow each other within microseconds.
        for (int i = 0; i < spin_ && published_.load(std::memory_order_acquire) == seen; ++i) SI_PAUSE();
        {
            std::unique_lock<std::mutex> lock(mu_);
            cv_start_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (stop_) return;
        }
        run_chunks();
        if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mu_);
            cv_done_.notify_one();
        }
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    if (external_ && n > grain) {
        external_(
            external_ctx_, n, grain,
            [](void* arg, int64_t b, int64_t e) { (*static_cast<const std::function<void(int64_t, int64_t)>*>(arg))(b, e); },
            const_cast<void*>(static_cast<const void*>(&fn)));
        return;
    }
    if (workers_.empty() || n <= grain) {
        fn(0, n);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        job_ = &fn;
        job_n_ = n;
        job_grain_ = grain;
        next_.store(0, std::memory_order_relaxed);
        busy_.store(int(workers_.size()), std::memory_order_relaxed);
        ++generation_;
        published_.store(generation_, std::memory_order_release);
    }
    cv_start_.notify_all();
    run_chunks();
    // Spin briefly for the workers, then sleep.
    for (int i = 0; i < spin_ && busy_.load(std::memory_order_acquire) != 0; ++i) SI_PAUSE();
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return busy_.load(std::memory_order_acquire) == 0; });
    job_ = nullptr;
}

void ThreadPool::run_on_each_thread(const std::function<void()>& fn) {
    if (external_) {
        fn();  // the runner's threads are not ours to visit
        return;
    }
    // One index per thread: whoever takes an index waits until every index is taken, so no thread takes two.
    const int n = size();
    std::atomic<int> arrived{0};
    parallel_for(n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            arrived.fetch_add(1, std::memory_order_acq_rel);
            while (arrived.load(std::memory_order_acquire) < n) std::this_thread::yield();
            fn();
        }
    });
}

}  // namespace si
