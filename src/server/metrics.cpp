// Prometheus text format for the server's metrics (see metrics.h).
#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace si::server {

namespace {

// Numbers as the text format writes them: integers without a fraction, others with enough digits to round-trip.
std::string num(double v) {
    if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    char buf[64];
    if (v == std::floor(v) && std::fabs(v) < 1e15) std::snprintf(buf, sizeof buf, "%.0f", v);
    else
        for (int prec = 1; prec <= 17; ++prec) {  // the shortest form that reads back as v
            std::snprintf(buf, sizeof buf, "%.*g", prec, v);
            if (std::strtod(buf, nullptr) == v) break;
        }
    return buf;
}

void header(std::string& out, const std::string& name, const char* type, const std::string& help) {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, double v, const std::string& labels = "") {
    out += name + (labels.empty() ? "" : "{" + labels + "}") + " " + num(v) + "\n";
}

// Seconds from 5 ms to 2 min: the latency of a request and of its first token on small and large models.
std::vector<double> seconds_buckets() {
    return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

}  // namespace

std::string escape_label(const std::string& v) {
    std::string o;
    for (char c : v) {
        if (c == '\\') o += "\\\\";
        else if (c == '"') o += "\\\"";
        else if (c == '\n') o += "\\n";
        else o += c;
    }
    return o;
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}

void Histogram::observe(double v) {
    size_t i = 0;
    while (i < bounds_.size() && v > bounds_[i]) ++i;
    ++counts_[i];
    sum_ += v;
    ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
    header(out, name, "histogram", help);
    uint64_t cum = 0;
    for (size_t i = 0; i <= bounds_.size(); ++i) {
        cum += counts_[i];
        const double le = i < bounds_.size() ? bounds_[i] : INFINITY;
        sample(out, name + "_bucket", double(cum), "le=\"" + num(le) + "\"");
    }
    sample(out, name + "_sum", sum_);
    sample(out, name + "_count", double(count_));
}

Metrics::Metrics(std::string model_id, std::string mode)
    : model_id_(std::move(model_id)), mode_(std::move(mode)), latency_(seconds_buckets()), ttft_(seconds_buckets()) {}

void Metrics::request(const std::string& endpoint, int status) {
    std::lock_guard<std::mutex> lk(m_);
    ++requests_[{endpoint, status}];
}

void Metrics::generation(int prompt_tokens, int generated_tokens, double seconds, double ttft, const DomainSeconds& d) {
    std::lock_guard<std::mutex> lk(m_);
    tokens_in_ += uint64_t(std::max(0, prompt_tokens));
    tokens_out_ += uint64_t(std::max(0, generated_tokens));
    latency_.observe(seconds);
    if (ttft >= 0) ttft_.observe(ttft);
    seconds_.enclave += d.enclave;
    seconds_.accelerator += d.accelerator;
    seconds_.host += d.host;
}

void Metrics::integrity_failure() {
    std::lock_guard<std::mutex> lk(m_);
    ++integrity_failures_;
}

void Metrics::worker_restart() {
    std::lock_guard<std::mutex> lk(m_);
    ++worker_restarts_;
}

std::string Metrics::render(const PoolGauges& pool) const {
    std::lock_guard<std::mutex> lk(m_);
    std::string o;
    header(o, "secureinfer_info", "gauge", "The model served and the partition preset (always 1).");
    sample(o, "secureinfer_info", 1, "model=\"" + escape_label(model_id_) + "\",mode=\"" + escape_label(mode_) + "\"");

    header(o, "secureinfer_requests_total", "counter",
           "Generation requests (completions, chat) answered, by endpoint and HTTP status.");
    for (const auto& [key, n] : requests_)
        sample(o, "secureinfer_requests_total", double(n),
               "endpoint=\"" + escape_label(key.first) + "\",status=\"" + std::to_string(key.second) + "\"");

    header(o, "secureinfer_prompt_tokens_total", "counter", "Prompt tokens evaluated.");
    sample(o, "secureinfer_prompt_tokens_total", double(tokens_in_));
    header(o, "secureinfer_generated_tokens_total", "counter", "Tokens generated (sampled inside the enclave).");
    sample(o, "secureinfer_generated_tokens_total", double(tokens_out_));

    latency_.render(o, "secureinfer_request_duration_seconds",
                    "Time from a generation request's arrival (queueing included) to its last token.");
    ttft_.render(o, "secureinfer_time_to_first_token_seconds",
                 "Time from a generation request's arrival (queueing included) to its first token.");

    header(o, "secureinfer_enclave_seconds_total", "counter", "Time generation spent in the trusted core.");
    sample(o, "secureinfer_enclave_seconds_total", seconds_.enclave);
    header(o, "secureinfer_accelerator_seconds_total", "counter",
           "Time generation spent on the untrusted accelerator (masked products).");
    sample(o, "secureinfer_accelerator_seconds_total", seconds_.accelerator);
    header(o, "secureinfer_host_seconds_total", "counter", "Time generation spent on the untrusted host otherwise.");
    sample(o, "secureinfer_host_seconds_total", seconds_.host);

    header(o, "secureinfer_integrity_failures_total", "counter",
           "Generations the trusted core stopped because a check failed (Freivalds, sealed factors).");
    sample(o, "secureinfer_integrity_failures_total", double(integrity_failures_));
    header(o, "secureinfer_worker_restarts_total", "counter",
           "Contexts (with their trusted core's worker) replaced after a failed step.");
    sample(o, "secureinfer_worker_restarts_total", double(worker_restarts_));

    header(o, "secureinfer_slots", "gauge", "Sequence slots of the served context (requests generated at the same time).");
    sample(o, "secureinfer_slots", pool.slots);
    header(o, "secureinfer_slots_active", "gauge", "Slots serving a request now.");
    sample(o, "secureinfer_slots_active", pool.active);
    header(o, "secureinfer_queue_depth", "gauge", "Requests waiting for a slot.");
    sample(o, "secureinfer_queue_depth", pool.queued);
    header(o, "secureinfer_precomputed_decode_steps", "gauge",
           "Decode rows (one token of one slot) with precomputed unblinding factors left.");
    sample(o, "secureinfer_precomputed_decode_steps", double(pool.precomputed));
    return o;
}

}  // namespace si::server
