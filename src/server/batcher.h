// Continuous batching for `secureinfer serve`: the requests of the server share one context with N sequence slots
// (one copy of the weights in the enclave and on the accelerator). A request waits for a free slot (first come,
// first served, in a bounded queue), then a scheduler thread advances every running request together, one batched
// step (si_slots_step) per token: decode rows first, prompt chunks in the room left, so a long prompt is fed in
// chunks between the others' tokens instead of stalling them. Requests join and leave between steps. When a
// request ends its slot is reset (KV cache freed and zeroed, context and sampler state forgotten) before anyone
// else gets it. With a precompute target, the scheduler tops the context's precomputed unblinding factors up while
// no request runs, and, under load, whenever they cannot cover the next step's rows (before that step, on the same
// cores: the sustained rate of precomputed decoding).
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "secureinfer.h"
#include "server/metrics.h"

namespace si::server {

// Why a request could not get a slot.
struct BatcherRefusal : std::runtime_error {
    enum Kind { busy, closed, failed } kind;
    BatcherRefusal(Kind k, const std::string& what) : std::runtime_error(what), kind(k) {}
};

class Batcher {
public:
    // slots: 1 .. 1024. precompute: decode steps per slot to keep precomputed (0: none). metrics (may be null, must
    // outlive the batcher) counts a replaced context as a worker restart. Throws std::runtime_error with
    // si_last_error()'s message when the context cannot be created or filled.
    Batcher(si_model* model, const si_context_params& cp, int slots, int max_queue, int precompute,
            Metrics* metrics = nullptr);
    ~Batcher();
    Batcher(const Batcher&) = delete;
    Batcher& operator=(const Batcher&) = delete;

    struct Job;
    // Waits for a free slot (first come, first served). Throws BatcherRefusal: busy when max_queue requests already
    // wait, closed after close(), failed when the context could not be replaced after an integrity failure.
    std::shared_ptr<Job> acquire();
    // Generates on the job's slot: the prompt, then up to max_tokens tokens, ending early at EOS (not reported) or
    // at the context's end. on_token(token, log-probabilities) runs on the calling thread, in order; false stops.
    // Returns SI_OK or the error code of a failed step (*error: its message); after an error the job is over.
    using OnToken = std::function<bool(si_token, const std::vector<std::pair<si_token, float>>&)>;
    int run(const std::shared_ptr<Job>& job, const std::vector<si_token>& prompt, const si_sampler_params& sampler, int max_tokens,
            const OnToken& on_token, std::string* error);
    // Gives the slot back (reset first when it was used). Every acquired job is released once.
    void release(const std::shared_ptr<Job>& job);
    // Refuses new and waiting requests; running ones finish. Thread-safe.
    void close();

    int n_ctx() const { return n_ctx_; }
    std::string warnings() const { return warnings_; }
    // Decode steps per slot for which precomputed factors remain (as of the last step).
    int precomputed_steps() const;
    // For GET /metrics: slots (0 once the context failed and could not be replaced), slots held by a request,
    // requests waiting for one, and decode rows with precomputed factors left (all slots together). Thread-safe.
    PoolGauges gauges() const;
    // The job's share of the context's counters (si_context_stats) so far: each batched step's difference is split
    // evenly over the rows (tokens) of that step, and a job gets the share of its rows. Thread-safe.
    si_stats stats(const std::shared_ptr<Job>& job) const;
    // si_context_protection of the context as it was created ("" when it failed; protection_error() says why).
    const std::string& protection() const { return protection_; }
    const std::string& protection_error() const { return protection_error_; }

private:
    void loop();
    void fail_active(int rc, const std::string& msg);

    si_model* model_;
    si_context_params cp_;
    int slots_, max_queue_, precompute_;
    si_context* ctx_ = nullptr;  // used by the scheduler thread only (after construction)
    int n_ctx_ = 0, n_batch_ = 0;
    si_token eos_ = -1;
    std::string warnings_;
    std::string protection_, protection_error_;
    Metrics* metrics_ = nullptr;

    mutable std::mutex m_;
    std::condition_variable cv_;       // slots freed, jobs ready, close
    std::vector<int> free_;            // free slots
    std::vector<std::shared_ptr<Job>> active_;  // running (or about to run) on a slot
    uint64_t next_ = 0, head_ = 0;     // tickets handed out, and the one served next
    int leased_ = 0;                   // jobs acquired and not yet released
    int precomputed_ = 0;              // rows per stage, as of the last call
    bool closed_ = false, dead_ = false;
    bool precompute_refused_ = false;  // the context refused to precompute: decode online from then on
    std::thread thread_;
};

}  // namespace si::server
