// The server's pool of contexts (see Pool), one per request generated at the same time.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "secureinfer.h"
#include "server/api_error.h"
#include "server/metrics.h"

namespace si::server {

// A fixed set of contexts handed out one request at a time, first come first served. A context is reset when it
// comes back, so the next request starts from an empty KV cache; one that failed (an integrity error ends a
// session) is replaced by a fresh one. With `precompute` > 0 every context holds precomputed unblinding factors
// for that many decode steps: filled here, and topped up by a background thread when a context comes back (in
// small batches, handing the context over early when a request is waiting for one).
class Pool {
public:
    Pool(si_model* model, const si_context_params& cp, int n, int max_queue, int precompute, Metrics& metrics)
        : model_(model), cp_(cp), max_queue_(max_queue), precompute_(precompute), metrics_(metrics) {
        for (int i = 0; i < n; ++i) {
            si_context* c = nullptr;
            if (si_context_init(model, &cp_, &c) != SI_OK || (precompute_ > 0 && !top_up(c, false))) {
                const std::string msg = si_last_error();
                if (c) si_context_free(c);
                for (si_context* f : free_) si_context_free(f);
                throw std::runtime_error(msg);
            }
            free_.push_back(c);
        }
        all_ = n;
        if (precompute_ > 0) refiller_ = std::thread([this] { refill_loop(); });
    }
    ~Pool() {
        close();
        if (refiller_.joinable()) refiller_.join();
        for (si_context* c : free_) si_context_free(c);
        for (si_context* c : stale_) si_context_free(c);
    }

    si_context* any() const { return free_.empty() ? nullptr : free_.front(); }

    // The fewest precomputed decode steps any idle context holds (for /health).
    int min_precomputed() {
        std::lock_guard<std::mutex> lk(m_);
        int best = -1;
        for (si_context* c : free_) best = best < 0 ? si_context_precomputed(c) : std::min(best, si_context_precomputed(c));
        return std::max(0, best);
    }

    // For /metrics.
    PoolGauges gauges() {
        std::lock_guard<std::mutex> lk(m_);
        PoolGauges g;
        g.slots = all_;
        g.active = leased_;
        g.queued = int(next_ - head_);
        for (si_context* c : free_) g.precomputed += si_context_precomputed(c);
        return g;
    }

    si_context* acquire() {
        std::unique_lock<std::mutex> lk(m_);
        if (closed_) throw ApiError(503, "the server is shutting down", "", "server_shutting_down");
        if (all_ == 0) throw ApiError(503, "no context is available (every context failed)", "", "server_error");
        if (next_ - head_ >= uint64_t(max_queue_) + free_.size() + stale_.size() + size_t(refilling_))
            throw ApiError(503, "the server is busy: " + std::to_string(max_queue_) + " requests are already queued",
                           "", "server_busy");
        const uint64_t ticket = next_++;
        cv_.wait(lk, [&] { return closed_ || (ticket == head_ && !free_.empty()); });
        if (closed_) {
            // Let the waiters behind this one see the close too.
            cv_.notify_all();
            throw ApiError(503, "the server is shutting down", "", "server_shutting_down");
        }
        ++head_;
        ++leased_;
        si_context* c = free_.back();
        free_.pop_back();
        cv_.notify_all();
        return c;
    }

    void release(si_context* c, bool broken) {
        if (broken) {
            metrics_.worker_restart();
            si_context_free(c);
            c = nullptr;
            if (si_context_init(model_, &cp_, &c) != SI_OK) {
                std::fprintf(stderr, "serve: a context failed and cannot be replaced: %s\n", si_last_error());
                c = nullptr;
            }
        } else {
            si_context_reset(c);
        }
        std::lock_guard<std::mutex> lk(m_);
        --leased_;
        if (!c) {
            --all_;
        } else if (precompute_ > 0 && !closed_) {
            stale_.push_back(c);  // the refill thread hands it out again
        } else {
            free_.push_back(c);
        }
        cv_.notify_all();
    }

    void close() {
        std::lock_guard<std::mutex> lk(m_);
        closed_ = true;
        cv_.notify_all();
    }

private:
    // Tops c up to precompute_ decode steps, 16 at a time; with `yield`, stops early when a request waits and no
    // context is free. False when the trusted core refused (si_last_error() says why).
    bool top_up(si_context* c, bool yield) {
        for (int need = precompute_ - si_context_precomputed(c); need > 0; need -= 16) {
            if (si_context_precompute(c, std::min(need, 16), nullptr, nullptr, nullptr) != SI_OK) return false;
            if (yield) {
                std::lock_guard<std::mutex> lk(m_);
                if (closed_ || (next_ > head_ && free_.empty())) break;
            }
        }
        return true;
    }

    void refill_loop() {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [&] { return closed_ || !stale_.empty(); });
            if (stale_.empty()) return;  // closed, nothing left to refill
            si_context* c = stale_.front();
            stale_.pop_front();
            ++refilling_;
            lk.unlock();
            // A context the core will not refill still serves: its decoding unblinds online.
            if (!closed_flag() && !top_up(c, true))
                std::fprintf(stderr, "serve: precomputing unblinding factors failed: %s\n", si_last_error());
            lk.lock();
            --refilling_;
            free_.push_back(c);
            cv_.notify_all();
        }
    }

    bool closed_flag() {
        std::lock_guard<std::mutex> lk(m_);
        return closed_;
    }

    si_model* model_;
    si_context_params cp_;
    int max_queue_;
    int precompute_ = 0;
    std::mutex m_;
    std::condition_variable cv_;
    std::vector<si_context*> free_;
    std::deque<si_context*> stale_;  // back from a request, waiting to be topped up
    int refilling_ = 0;
    int all_ = 0;
    int leased_ = 0;
    Metrics& metrics_;
    uint64_t next_ = 0, head_ = 0;  // tickets handed out, and the one served next
    bool closed_ = false;
    std::thread refiller_;
};

// A context held for one request; given back (reset) when the last owner lets go.
struct Lease {
    Pool& pool;
    si_context* ctx;
    bool broken = false;
    explicit Lease(Pool& p) : pool(p), ctx(p.acquire()) {}
    ~Lease() { pool.release(ctx, broken); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
};

}  // namespace si::server
