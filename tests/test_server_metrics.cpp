// GET /metrics of the HTTP server: the exposition parses with the reference Prometheus parser (Debian's
// python3-prometheus-client, tests/scripts/parse_metrics.py), and its counters move by exactly what known requests
// did; an accelerator that alters a product shows as an integrity failure and a worker restart. The server runs in
// this process (src/server) on the C API, its trusted core in the worker.
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "backends/accelerator.h"
#include "secureinfer.h"
#include "server/server.h"
#include "server_testutil.h"
#include "testutil.h"

using json = nlohmann::json;
using si::test::LocalServer;
using si::test::shared;

namespace {

// The CPU backend that alters one value of its next masked product once armed (then disarms).
std::atomic<bool> g_tamper{false};
class ArmedTamperingAccelerator final : public si::Accelerator {
public:
    explicit ArmedTamperingAccelerator(si::ThreadPool* pool) : inner_(si::make_cpu_accelerator(pool)) {}
    const char* name() const override { return "test-tampering"; }
    bool supports(si::AccelOp op, si::DType t) const override { return inner_->supports(op, t); }
    si::WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override { return inner_->upload_i8(W, N, K); }
    si::WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override { return inner_->upload_f32(W, N, K); }
    void release(si::WeightHandle& w) override { inner_->release(w); }
    void mul_mat_masked(const si::WeightHandle& W, const uint32_t* X, int64_t T, uint32_t* Y) override {
        inner_->mul_mat_masked(W, X, T, Y);
        if (g_tamper.exchange(false)) Y[0] += 12345u;
    }
    void mul_mat_i8(const si::WeightHandle& W, const int8_t* X, int64_t T, int32_t* Y) override {
        inner_->mul_mat_i8(W, X, T, Y);
    }
    void mul_mat_f32(const si::WeightHandle& W, const float* X, int64_t T, float* Y) override {
        inner_->mul_mat_f32(W, X, T, Y);
    }

private:
    std::unique_ptr<si::Accelerator> inner_;
};

// The samples of an exposition, parsed by the reference parser: "name{k=v,...}" -> value (labels sorted by key).
std::map<std::string, double> parse_metrics(const std::string& text) {
    const auto r = si::test::run_program({"/usr/bin/python3", std::string(SI_SOURCE_DIR) + "/tests/scripts/parse_metrics.py"},
                                         text);
    EXPECT_EQ(r.exit_code, 0) << "the Prometheus parser refused the exposition: " << r.err << "\n" << text;
    std::map<std::string, double> out;
    const json samples = json::parse(r.out.empty() ? "[]" : r.out);
    for (const json& s : samples) {
        std::string key = s["name"].get<std::string>();
        if (!s["labels"].empty()) {
            key += "{";
            bool first = true;
            for (const auto& [k, v] : s["labels"].items()) {  // nlohmann orders object keys
                key += (first ? "" : ",") + k + "=" + v.get<std::string>();
                first = false;
            }
            key += "}";
        }
        out[key] = s["value"].is_null() ? INFINITY : s["value"].get<double>();
    }
    return out;
}

std::map<std::string, double> scrape(const LocalServer& s, std::string* text = nullptr) {
    auto res = s.client().Get("/metrics");
    EXPECT_TRUE(res);
    if (!res) return {};
    EXPECT_EQ(res->status, 200);
    EXPECT_EQ(res->get_header_value("Content-Type").rfind("text/plain; version=0.0.4", 0), 0u);
    if (text) *text = res->body;
    return parse_metrics(res->body);
}

double at(const std::map<std::string, double>& m, const std::string& key) {
    const auto it = m.find(key);
    return it == m.end() ? 0.0 : it->second;
}

json post(const LocalServer& s, const std::string& path, const json& body, int* status) {
    auto res = s.client().Post(path.c_str(), body.dump(), "application/json");
    EXPECT_TRUE(res);
    if (!res) return {};
    *status = res->status;
    return res->body.rfind("data: ", 0) == 0 ? json{{"sse", res->body}} : json::parse(res->body);
}

}  // namespace

// Known requests move the counters by exactly their tokens and statuses; the histograms count each generation
// once; the domain times grow; the gauges are back to idle.
TEST(ServerMetrics, CountersMoveByTheRequestsMade) {
    LocalServer s;
    std::string text;
    const auto m0 = scrape(s, &text);
    EXPECT_EQ(at(m0, "secureinfer_info{mode=secureinfer,model=stories260K}"), 1.0) << text;
    EXPECT_EQ(at(m0, "secureinfer_slots"), 1.0);
    EXPECT_EQ(at(m0, "secureinfer_generated_tokens_total"), 0.0);
    EXPECT_EQ(m0.count("secureinfer_request_duration_seconds_bucket{le=+Inf}"), 1u) << text;

    int status = 0;
    const json a = post(s, "/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 7}, {"temperature", 0}},
                        &status);
    ASSERT_EQ(status, 200) << a.dump();
    const json b = post(s, "/v1/chat/completions",
                        {{"messages", {{{"role", "user"}, {"content", "Tell me a story"}}}},
                         {"max_tokens", 5},
                         {"temperature", 0},
                         {"stream", true},
                         {"stream_options", {{"include_usage", true}}}},
                        &status);
    ASSERT_EQ(status, 200);
    // the usage chunk of the stream
    const std::string sse = b["sse"];
    const size_t u = sse.find("\"usage\":");
    ASSERT_NE(u, std::string::npos) << sse;
    const size_t ub = sse.rfind("data: ", u) + 6;
    const json usage_b = json::parse(sse.substr(ub, sse.find("\n\n", ub) - ub))["usage"];
    // refused before generation: a 400 that counts no tokens
    post(s, "/v1/completions", {{"prompt", "x"}, {"max_tokens", -1}}, &status);
    EXPECT_EQ(status, 400);
    post(s, "/v1/completions", {{"prompt", "x"}, {"temperature", 5}}, &status);
    EXPECT_EQ(status, 400);

    const auto m1 = scrape(s, &text);
    EXPECT_EQ(at(m1, "secureinfer_requests_total{endpoint=completions,status=200}"), 1.0) << text;
    EXPECT_EQ(at(m1, "secureinfer_requests_total{endpoint=chat,status=200}"), 1.0) << text;
    EXPECT_EQ(at(m1, "secureinfer_requests_total{endpoint=completions,status=400}"), 2.0) << text;
    const int prompt = a["usage"]["prompt_tokens"].get<int>() + usage_b["prompt_tokens"].get<int>();
    const int generated = a["usage"]["completion_tokens"].get<int>() + usage_b["completion_tokens"].get<int>();
    EXPECT_EQ(a["usage"]["completion_tokens"], 7);
    EXPECT_EQ(at(m1, "secureinfer_prompt_tokens_total"), double(prompt)) << text;
    EXPECT_EQ(at(m1, "secureinfer_generated_tokens_total"), double(generated)) << text;
    EXPECT_EQ(at(m1, "secureinfer_request_duration_seconds_count"), 2.0);
    EXPECT_EQ(at(m1, "secureinfer_request_duration_seconds_bucket{le=+Inf}"), 2.0);
    EXPECT_EQ(at(m1, "secureinfer_time_to_first_token_seconds_count"), 2.0);
    EXPECT_GT(at(m1, "secureinfer_request_duration_seconds_sum"), 0.0);
    EXPECT_LE(at(m1, "secureinfer_time_to_first_token_seconds_sum"), at(m1, "secureinfer_request_duration_seconds_sum"));
    // buckets are cumulative
    double prev = 0;
    for (const char* le : {"0.005", "0.01", "0.1", "1", "10", "120", "+Inf"}) {
        const double v = at(m1, std::string("secureinfer_request_duration_seconds_bucket{le=") + le + "}");
        EXPECT_GE(v, prev) << le;
        prev = v;
    }
    EXPECT_GT(at(m1, "secureinfer_enclave_seconds_total"), 0.0);
    EXPECT_GT(at(m1, "secureinfer_accelerator_seconds_total"), 0.0);
    EXPECT_GT(at(m1, "secureinfer_host_seconds_total"), 0.0);
    EXPECT_EQ(at(m1, "secureinfer_integrity_failures_total"), 0.0);
    EXPECT_EQ(at(m1, "secureinfer_worker_restarts_total"), 0.0);
    EXPECT_EQ(at(m1, "secureinfer_slots_active"), 0.0);
    EXPECT_EQ(at(m1, "secureinfer_queue_depth"), 0.0);

    // The non-streamed response carries its cost per domain; the counters are sums of those.
    const json& cost = a["secureinfer"];
    EXPECT_EQ(cost["generated_tokens"], 7);
    EXPECT_GT(cost["enclave_seconds"].get<double>(), 0.0);
    EXPECT_GT(cost["accelerator_seconds"].get<double>(), 0.0);
    EXPECT_GT(cost["crossings"].get<uint64_t>(), 0u);
    EXPECT_GT(cost["bytes_to_enclave"].get<uint64_t>(), 0u);
    EXPECT_LE(cost["enclave_seconds"].get<double>(), at(m1, "secureinfer_enclave_seconds_total"));
}

// An accelerator that alters a product: the trusted core's check stops the request (500), the failed context is
// replaced by a fresh one (a new worker), the next request is served, and the counters say so exactly once.
TEST(ServerMetrics, IntegrityFailureAndWorkerRestartAreCounted) {
    si::register_accelerator("test-tampering", [](si::ThreadPool* pool) {
        return std::make_unique<ArmedTamperingAccelerator>(pool);
    });
    LocalServer s("test-tampering");
    int status = 0;
    g_tamper = true;
    const json bad = post(s, "/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 4}}, &status);
    EXPECT_FALSE(g_tamper.load()) << "no masked product ran";
    EXPECT_EQ(status, 500) << bad.dump();
    EXPECT_NE(bad["error"]["message"].get<std::string>().find("SI_ERR_INTEGRITY"), std::string::npos) << bad.dump();
    const json good = post(s, "/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 4}}, &status);
    EXPECT_EQ(status, 200) << good.dump();
    const auto m = scrape(s);
    EXPECT_EQ(at(m, "secureinfer_integrity_failures_total"), 1.0);
    EXPECT_EQ(at(m, "secureinfer_worker_restarts_total"), 1.0);
    EXPECT_EQ(at(m, "secureinfer_requests_total{endpoint=completions,status=500}"), 1.0);
    EXPECT_EQ(at(m, "secureinfer_requests_total{endpoint=completions,status=200}"), 1.0);
    EXPECT_EQ(at(m, "secureinfer_slots"), 1.0);
}
