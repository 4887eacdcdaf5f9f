#include "server/batcher.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <type_traits>

namespace si::server {

namespace {

// Counters of si_stats as fractions: a job's share of the context's counters, or the difference of two readings.
struct StatsShare {
    double enclave_calls = 0, crossings = 0, accelerator_calls = 0;
    double bytes_to_enclave = 0, bytes_from_enclave = 0, bytes_to_accelerator = 0, bytes_from_accelerator = 0;
    double seconds_enclave = 0, seconds_accelerator = 0, seconds_host = 0;
    double flops_enclave = 0, flops_accelerator = 0, flops_host = 0;

    // f(member here, the same counter in si_stats) for every counter a step changes: the one list of them.
    template <class F>
    static void each(F&& f) {
        f(&StatsShare::enclave_calls, &si_stats::enclave_calls);
        f(&StatsShare::crossings, &si_stats::crossings);
        f(&StatsShare::accelerator_calls, &si_stats::accelerator_calls);
        f(&StatsShare::bytes_to_enclave, &si_stats::bytes_to_enclave);
        f(&StatsShare::bytes_from_enclave, &si_stats::bytes_from_enclave);
        f(&StatsShare::bytes_to_accelerator, &si_stats::bytes_to_accelerator);
        f(&StatsShare::bytes_from_accelerator, &si_stats::bytes_from_accelerator);
        f(&StatsShare::seconds_enclave, &si_stats::seconds_enclave);
        f(&StatsShare::seconds_accelerator, &si_stats::seconds_accelerator);
        f(&StatsShare::seconds_host, &si_stats::seconds_host);
        f(&StatsShare::flops_enclave, &si_stats::flops_enclave);
        f(&StatsShare::flops_accelerator, &si_stats::flops_accelerator);
        f(&StatsShare::flops_host, &si_stats::flops_host);
    }

    static StatsShare between(const si_stats& a, const si_stats& b) {
        StatsShare d;
        each([&](auto mine, auto theirs) { d.*mine = double(b.*theirs) - double(a.*theirs); });
        return d;
    }

    void add(const StatsShare& d, double f) {
        each([&](auto mine, auto) { this->*mine += d.*mine * f; });
    }

    // Counts rounded to the nearest whole number (a request alone in its steps gets the exact difference).
    si_stats get() const {
        si_stats s{};
        each([&](auto mine, auto theirs) {
            using T = std::remove_reference_t<decltype(s.*theirs)>;
            if constexpr (std::is_integral_v<T>)
                s.*theirs = T(std::llround(std::max(0.0, this->*mine)));
            else
                s.*theirs = this->*mine;
        });
        return s;
    }
};

}  // namespace

struct Batcher::Job {
    int slot = -1;
    bool ready = false;          // run() gave it a prompt; the scheduler may step it
    bool started = false;        // the scheduler set its sampler (scheduler thread only)
    bool cancel = false;         // the requester stopped, or the request is over
    bool done = false;           // no more tokens will come
    bool slot_returned = false;  // its slot is free again (reset when it was used)
    std::vector<si_token> prompt;
    si_sampler_params sampler{};
    int max_tokens = 0;
    size_t fed = 0;
    int generated = 0, pos = 0;
    si_token last = -1;
    std::deque<std::pair<si_token, std::vector<std::pair<si_token, float>>>> out;
    StatsShare stats;  // its share of the context's counters (see Batcher::stats)
    int rc = SI_OK;
    std::string error;
    std::condition_variable cv;
};

namespace {
std::runtime_error last_error(const char* what) { return std::runtime_error(std::string(what) + si_last_error()); }
}  // namespace

Batcher::Batcher(si_model* model, const si_context_params& cp, int slots, int max_queue, int precompute,
                 Metrics* metrics)
    : model_(model), cp_(cp), slots_(std::max(1, slots)), max_queue_(std::max(0, max_queue)),
      precompute_(std::max(0, precompute)), metrics_(metrics) {
    if (si_slots_context_init(model, &cp_, slots_, &ctx_) != SI_OK) throw last_error("");
    n_ctx_ = si_context_n_ctx(ctx_);
    n_batch_ = si_slots_n_batch(ctx_);
    eos_ = si_model_eos(model);
    warnings_ = si_context_warnings(ctx_);
    if (const char* p = si_context_protection(ctx_))
        protection_ = p;
    else
        protection_error_ = si_last_error();
    if (precompute_ > 0) {
        if (si_context_precompute(ctx_, precompute_ * slots_, nullptr, nullptr, nullptr) != SI_OK) {
            const std::runtime_error e = last_error("");
            si_context_free(ctx_);
            throw e;
        }
        precomputed_ = si_context_precomputed(ctx_);
    }
    for (int s = slots_ - 1; s >= 0; --s) free_.push_back(s);
    thread_ = std::thread([this] { loop(); });
}

Batcher::~Batcher() {
    close();
    if (thread_.joinable()) thread_.join();
    si_context_free(ctx_);
}

int Batcher::precomputed_steps() const {
    std::lock_guard<std::mutex> lk(m_);
    return precomputed_ / slots_;
}

PoolGauges Batcher::gauges() const {
    std::lock_guard<std::mutex> lk(m_);
    PoolGauges g;
    g.slots = dead_ ? 0 : slots_;
    g.active = leased_;
    g.queued = int(next_ - head_);
    g.precomputed = precomputed_;
    return g;
}

si_stats Batcher::stats(const std::shared_ptr<Job>& job) const {
    std::lock_guard<std::mutex> lk(m_);
    return job->stats.get();
}

std::shared_ptr<Batcher::Job> Batcher::acquire() {
    std::unique_lock<std::mutex> lk(m_);
    if (closed_) throw BatcherRefusal(BatcherRefusal::closed, "the server is shutting down");
    if (dead_) throw BatcherRefusal(BatcherRefusal::failed, "no context is available (the context failed)");
    if (next_ - head_ >= uint64_t(max_queue_) + free_.size())
        throw BatcherRefusal(BatcherRefusal::busy,
                             "the server is busy: " + std::to_string(max_queue_) + " requests are already queued");
    const uint64_t ticket = next_++;
    cv_.wait(lk, [&] { return closed_ || dead_ || (ticket == head_ && !free_.empty()); });
    if (closed_ || dead_) {
        cv_.notify_all();  // the waiters behind this one see it too
        throw closed_ ? BatcherRefusal(BatcherRefusal::closed, "the server is shutting down")
                      : BatcherRefusal(BatcherRefusal::failed, "no context is available (the context failed)");
    }
    ++head_;
    ++leased_;
    auto job = std::make_shared<Job>();
    job->slot = free_.back();
    free_.pop_back();
    cv_.notify_all();
    return job;
}

int Batcher::run(const std::shared_ptr<Job>& jp, const std::vector<si_token>& prompt, const si_sampler_params& sampler, int max_tokens,
                 const OnToken& on_token, std::string* error) {
    Job& job = *jp;
    std::unique_lock<std::mutex> lk(m_);
    if (job.ready || job.slot_returned) {
        if (error) *error = "a request runs once";
        return SI_ERR_INVALID_ARGUMENT;
    }
    if (prompt.empty() || int64_t(prompt.size()) > n_ctx_) {
        if (error)
            *error = "prompt of " + std::to_string(prompt.size()) + " tokens does not fit the context of " +
                     std::to_string(n_ctx_) + " free positions";
        return SI_ERR_INVALID_ARGUMENT;
    }
    if (max_tokens <= 0) return SI_OK;  // nothing to sample: the slot stays untouched
    job.prompt = prompt;
    job.sampler = sampler;
    job.max_tokens = max_tokens;
    job.ready = true;
    active_.push_back(jp);
    cv_.notify_all();
    for (;;) {
        job.cv.wait(lk, [&] { return !job.out.empty() || job.done; });
        if (job.out.empty()) break;
        auto t = std::move(job.out.front());
        job.out.pop_front();
        lk.unlock();
        const bool more = on_token(t.first, t.second);
        lk.lock();
        if (!more) {
            job.cancel = true;
            cv_.notify_all();
            return SI_OK;
        }
    }
    if (error) *error = job.error;
    return job.rc;
}

void Batcher::release(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lk(m_);
    --leased_;
    cv_.notify_all();
    if (job->slot_returned) return;
    if (job->ready) {
        job->cancel = true;  // the scheduler resets the slot and returns it
    } else {
        job->slot_returned = true;  // never used: still clean
        free_.push_back(job->slot);
    }
    cv_.notify_all();
}

void Batcher::close() {
    std::lock_guard<std::mutex> lk(m_);
    closed_ = true;
    cv_.notify_all();
}

// Ends every active job with an error (a failed step), and replaces the context: after an integrity failure the
// session is stopped for good, and a new one (new keys, empty caches) serves the requests that follow.
void Batcher::fail_active(int rc, const std::string& msg) {
    std::fprintf(stderr, "serve: a batched step failed: %s; the context is replaced\n", msg.c_str());
    if (metrics_) metrics_->worker_restart();
    si_context_free(ctx_);
    ctx_ = nullptr;
    const bool ok = si_slots_context_init(model_, &cp_, slots_, &ctx_) == SI_OK;
    if (!ok) std::fprintf(stderr, "serve: the context cannot be replaced: %s\n", si_last_error());
    std::lock_guard<std::mutex> lk(m_);
    for (const auto& j : active_) {
        j->rc = rc;
        j->error = msg;
        j->done = true;
        j->slot_returned = true;
        free_.push_back(j->slot);
        j->cv.notify_all();
    }
    active_.clear();
    precomputed_ = 0;
    precompute_refused_ = false;  // the new context may precompute again
    if (!ok) dead_ = true;
    cv_.notify_all();
}

void Batcher::loop() {
    std::vector<si_slot_step> steps;
    std::vector<std::shared_ptr<Job>> stepped;
    std::vector<si_token> tokens_out;
    size_t rotate = 0;
    for (;;) {
        std::vector<std::shared_ptr<Job>> finishing, starting;
        steps.clear();
        stepped.clear();
        int want_precompute = 0, refill = 0;
        {
            std::unique_lock<std::mutex> lk(m_);
            auto wants = [&] {
                return !closed_ && !dead_ && precompute_ > 0 && !precompute_refused_ && active_.empty() &&
                       precomputed_ < precompute_ * slots_;
            };
            cv_.wait(lk, [&] { return (closed_ && leased_ == 0) || !active_.empty() || wants(); });
            if (closed_ && active_.empty() && leased_ == 0) return;
            if (active_.empty() && !wants()) continue;
            // the jobs that ended (requester gone, EOS, length), and the rest: decode rows first, then prompts
            std::vector<std::shared_ptr<Job>> decoding, prompting;
            for (const auto& j : active_) {
                if (j->cancel || j->done)
                    finishing.push_back(j);
                else if (j->fed == j->prompt.size())
                    decoding.push_back(j);
                else
                    prompting.push_back(j);
            }
            if (!decoding.empty()) std::rotate(decoding.begin(), decoding.begin() + long(rotate++ % decoding.size()), decoding.end());
            int room = n_batch_;
            for (const auto& j : decoding) {
                if (room == 0) break;
                steps.push_back(si_slot_step{j->slot, &j->last, 1, 1});
                stepped.push_back(j);
                --room;
            }
            // a long prompt goes in chunks between the decode steps of the others
            const int cap = decoding.empty() ? room : std::max(32, n_batch_ / 4);
            for (const auto& j : prompting) {
                const int n = int(std::min<size_t>(j->prompt.size() - j->fed, size_t(std::min(room, cap))));
                if (n <= 0) break;
                steps.push_back(si_slot_step{j->slot, j->prompt.data() + j->fed, size_t(n),
                                             j->fed + size_t(n) == j->prompt.size() ? 1 : 0});
                stepped.push_back(j);
                room -= n;
            }
            for (const auto& j : stepped)
                if (!j->started) starting.push_back(j);
            if (steps.empty() && finishing.empty() && wants()) {
                want_precompute = std::min(16, precompute_ * slots_ - precomputed_);
            } else if (!steps.empty() && precompute_ > 0 && !precompute_refused_) {
                // Under load the store is never idle-filled: when it cannot cover this step's rows, it is topped
                // up to the target (or the step's rows, if more) first, in one batched call on the same cores (the
                // step waits for it), so the rows keep precomputed factors: the sustained rate, not the online one.
                size_t rows = 0;
                for (const auto& st : steps) rows += st.n_tokens;
                if (size_t(precomputed_) < rows) refill = std::max(precompute_ * slots_, int(rows)) - precomputed_;
            }
        }
        // outside the lock: only this thread uses the context
        for (const auto& j : finishing) {
            si_slots_reset(ctx_, j->slot);  // a failed session stays failed: the next step says so
            std::lock_guard<std::mutex> lk(m_);
            active_.erase(std::find(active_.begin(), active_.end(), j));
            j->done = true;
            j->slot_returned = true;
            free_.push_back(j->slot);
            j->cv.notify_all();
            cv_.notify_all();
        }
        if (want_precompute > 0 || refill > 0) {
            const int rc = si_context_precompute(ctx_, want_precompute + refill, nullptr, nullptr, nullptr);
            std::lock_guard<std::mutex> lk(m_);
            if (rc == SI_OK) {
                precomputed_ = si_context_precomputed(ctx_);
            } else {  // refused: stop trying, decode online
                std::fprintf(stderr, "serve: precomputing unblinding factors failed: %s\n", si_last_error());
                precompute_refused_ = true;
                precomputed_ = precompute_ * slots_;
            }
            if (want_precompute > 0) continue;
        }
        if (steps.empty()) continue;
        si_stats before{}, after{};
        const bool have_before = si_context_stats(ctx_, &before) == SI_OK;
        int rc = SI_OK;
        for (const auto& j : starting) {
            rc = si_slots_set_sampler(ctx_, j->slot, &j->sampler);
            if (rc != SI_OK) break;
            j->started = true;
        }
        tokens_out.assign(steps.size(), -1);
        if (rc == SI_OK) rc = si_slots_step(ctx_, steps.data(), steps.size(), tokens_out.data());
        const std::string step_error = rc == SI_OK ? std::string() : si_last_error();  // before the next call
        // What the step cost (time per domain, crossings, bytes) is not separable by row inside one batched
        // product: the difference of the context's counters around the step is split evenly over its rows (a
        // decode row is one token, a prompt chunk as many rows as tokens) and each job accumulates the share of
        // its rows. A job alone in its steps gets exactly its own cost.
        if (have_before && si_context_stats(ctx_, &after) == SI_OK) {
            const StatsShare cost = StatsShare::between(before, after);
            size_t rows = 0;
            for (const auto& s : steps) rows += s.n_tokens;
            std::lock_guard<std::mutex> lk(m_);
            for (size_t i = 0; i < steps.size() && rows > 0; ++i)
                stepped[i]->stats.add(cost, double(steps[i].n_tokens) / double(rows));
        }
        if (rc != SI_OK) {
            fail_active(rc, step_error);
            continue;
        }
        // the released log-probabilities of each sampled token, read before anything else uses the context
        std::vector<std::vector<std::pair<si_token, float>>> lps(steps.size());
        if (cp_.logprobs > 0)
            for (size_t i = 0; i < steps.size(); ++i) {
                if (!steps[i].sample) continue;
                std::vector<si_token> ids(static_cast<size_t>(cp_.logprobs));
                std::vector<float> v(ids.size());
                size_t got = 0;
                if (si_slots_last_logprobs(ctx_, steps[i].slot, ids.data(), v.data(), ids.size(), &got) == SI_OK)
                    for (size_t k = 0; k < got; ++k) lps[i].emplace_back(ids[k], v[k]);
            }
        std::lock_guard<std::mutex> lk(m_);
        precomputed_ = si_context_precomputed(ctx_);
        for (size_t i = 0; i < steps.size(); ++i) {
            Job& j = *stepped[i];
            if (j.fed < j.prompt.size()) j.fed += steps[i].n_tokens;
            j.pos += int(steps[i].n_tokens);
            if (!steps[i].sample || j.cancel) continue;
            const si_token t = tokens_out[i];
            if (t == eos_) {
                j.done = true;
            } else {
                j.last = t;
                ++j.generated;
                j.out.emplace_back(t, std::move(lps[i]));
                if (j.generated >= j.max_tokens || j.pos >= n_ctx_) j.done = true;
            }
            j.cv.notify_all();
        }
    }
}

}  // namespace si::server
