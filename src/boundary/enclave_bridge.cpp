#include "boundary/enclave_bridge.h"

#include <algorithm>

namespace si::bridge {

uint64_t Handles::add(si_enclave* e) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t h = next_++;
    live_[h] = e;
    return h;
}

si_enclave* Handles::find(uint64_t handle) const {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = live_.find(handle);
    return it == live_.end() ? nullptr : it->second;
}

si_enclave* Handles::remove(uint64_t handle) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = live_.find(handle);
    if (it == live_.end()) return nullptr;
    si_enclave* e = it->second;
    live_.erase(it);
    return e;
}

const char* check_process_buffers(const uint8_t* request, size_t request_len, const uint8_t* response,
                                  size_t response_cap, const OutsideFn& outside) {
    if (request_len > SI_ENCLAVE_MAX_MESSAGE) return "request larger than SI_ENCLAVE_MAX_MESSAGE";
    if (response_cap > SI_ENCLAVE_MAX_MESSAGE) return "response buffer larger than SI_ENCLAVE_MAX_MESSAGE";
    if ((!request && request_len) || (!response && response_cap)) return "null buffer with a non-zero size";
    // A buffer inside the enclave would make the core read its own secrets as a request, or write a response over
    // them at an address the host chose.
    if (request_len && !outside(request, request_len)) return "request buffer is not outside the enclave";
    if (response_cap && !outside(response, response_cap)) return "response buffer is not outside the enclave";
    return nullptr;
}

void ParallelJobs::run_chunks(Job& j) {
    for (;;) {
        const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
        if (c >= j.chunks) return;
        const int64_t b = c * j.grain;
        j.fn(j.arg, b, std::min(j.n, b + j.grain));
        if (j.done.fetch_add(1, std::memory_order_acq_rel) + 1 == j.chunks) {
            std::lock_guard<std::mutex> lock(j.mu);
            j.all_done.notify_all();
        }
    }
}

void ParallelJobs::parallel_for(int64_t n, int64_t grain, void (*fn)(void*, int64_t, int64_t), void* arg) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    auto job = std::make_shared<Job>();
    job->n = n;
    job->grain = grain;
    job->chunks = (n + grain - 1) / grain;
    job->fn = fn;
    job->arg = arg;
    bool shared = false;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (!current_ && job->chunks > 1 && max_workers_ > 0) {
            job->id = ++last_id_;
            current_ = job;
            shared = true;
        }
    }
    if (shared) lend_(job->id, int(std::min<int64_t>(max_workers_, job->chunks - 1)));
    run_chunks(*job);
    if (shared) {
        // Chunks a lent thread took may still run; the host cannot make this wait forget one.
        std::unique_lock<std::mutex> lock(job->mu);
        job->all_done.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == job->chunks; });
        std::lock_guard<std::mutex> l2(mu_);
        current_.reset();
    }
}

void ParallelJobs::work(uint64_t id) {
    std::shared_ptr<Job> job;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (current_ && current_->id == id) job = current_;
    }
    if (job) run_chunks(*job);
}

}  // namespace si::bridge
