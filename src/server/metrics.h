// The server's counters, gauges and histograms, rendered in the Prometheus text exposition format (version 0.0.4)
// for GET /metrics. Names follow Prometheus conventions: a `secureinfer_` prefix, units in the name (`_seconds`,
// `_tokens`), `_total` for counters. Thread-safe.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace si::server {

// A cumulative histogram with fixed upper bounds (the +Inf bucket is implicit).
class Histogram {
public:
    explicit Histogram(std::vector<double> bounds);
    void observe(double v);
    // "# HELP/# TYPE" lines, then name_bucket{le=...}, name_sum and name_count.
    void render(std::string& out, const std::string& name, const std::string& help) const;

private:
    std::vector<double> bounds_;
    std::vector<uint64_t> counts_;  // per bucket, not cumulative; one more than bounds_ (+Inf)
    double sum_ = 0;
    uint64_t count_ = 0;
};

// Time a request spent in each domain: its share of the context's si_context_stats (Batcher::stats).
struct DomainSeconds {
    double enclave = 0, accelerator = 0, host = 0;
};

// What the batcher (server/batcher.h) reports at scrape time.
struct PoolGauges {
    int slots = 0;            // sequence slots of the served context
    int active = 0;           // slots serving a request
    int queued = 0;           // requests waiting for a slot
    int64_t precomputed = 0;  // decode rows with precomputed unblinding factors left (all slots together)
};

class Metrics {
public:
    Metrics(std::string model_id, std::string mode);

    // A generation request answered with this HTTP status; endpoint is "completions" or "chat".
    void request(const std::string& endpoint, int status);
    // A generation that ran (fully or not): its prompt and generated tokens, the seconds from the request's arrival
    // to its end and to its first token (ttft < 0: no token), and the time it spent in each domain.
    void generation(int prompt_tokens, int generated_tokens, double seconds, double ttft, const DomainSeconds& d);
    // The trusted core reported an integrity failure (a product or a sealed factor did not check).
    void integrity_failure();
    // A context (and its trusted core's worker) was replaced after it failed.
    void worker_restart();

    std::string render(const PoolGauges& pool) const;

private:
    mutable std::mutex m_;
    std::string model_id_, mode_;
    std::map<std::pair<std::string, int>, uint64_t> requests_;
    uint64_t tokens_in_ = 0, tokens_out_ = 0;
    Histogram latency_, ttft_;
    DomainSeconds seconds_;
    uint64_t integrity_failures_ = 0, worker_restarts_ = 0;
};

// A label value escaped for the text format (backslash, double quote, newline).
std::string escape_label(const std::string& v);

}  // namespace si::server
