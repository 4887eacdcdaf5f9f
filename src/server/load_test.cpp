// si-load-test: a bounded load test of a running `secureinfer serve`. C clients send R requests in all to
// /v1/completions (some streamed), each checked: HTTP 200, a well-formed body or event stream ending in [DONE], and
// the same text for the same prompt and seed every time (requests must not see each other's state). Prints
// throughput and latency percentiles and every kind of failure with its count; exits 1 when any request failed.
//
//   si-load-test --url http://127.0.0.1:8080 [--clients 8] [--requests 256] [--max-tokens 8] [--stream mixed]
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;

namespace {

const char* kPrompts[] = {"Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a bird",
                          "The sun was hot"};

struct Outcome {
    double seconds = 0.0;
    int tokens = 0;
    std::string text, error;
};

// Streamed text from a server-sent event body; sets error when the stream is not well formed.
std::string parse_events(const std::string& body, int& tokens, std::string& error) {
    std::string text;
    bool done = false, finished = false;
    size_t b = 0;
    while (b < body.size()) {
        size_t e = body.find('\n', b);
        if (e == std::string::npos) e = body.size();
        const std::string line = body.substr(b, e - b);
        b = e + 1;
        if (line.empty()) continue;
        if (line.rfind("data: ", 0) != 0) {
            error = "unexpected line in the event stream: " + line;
            return text;
        }
        const std::string data = line.substr(6);
        if (data == "[DONE]") {
            done = true;
            continue;
        }
        const json j = json::parse(data, nullptr, false);
        if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) {
            error = "bad event: " + data;
            return text;
        }
        const json& c = j["choices"][0];
        text += c.value("text", "");
        if (!c["finish_reason"].is_null()) finished = true;
        else ++tokens;  // a chunk per released piece: about a token each
    }
    if (!done || !finished) error = "the event stream ended without a finish reason and [DONE]";
    return text;
}

}  // namespace

int main(int argc, char** argv) {
    std::string url = "http://127.0.0.1:8080", stream = "mixed";
    int clients = 8, requests = 256, max_tokens = 8;
    double temperature = 0.8;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "si-load-test: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--url") url = next();
        else if (a == "--clients") clients = std::atoi(next().c_str());
        else if (a == "--requests") requests = std::atoi(next().c_str());
        else if (a == "--max-tokens") max_tokens = std::atoi(next().c_str());
        else if (a == "--temperature") temperature = std::atof(next().c_str());
        else if (a == "--stream") stream = next();
        else {
            std::fprintf(stderr, "usage: si-load-test --url URL [--clients C] [--requests R] [--max-tokens N] "
                                 "[--temperature T] [--stream none|all|mixed]\n");
            return 2;
        }
    }
    if (clients < 1 || requests < 1 || max_tokens < 0 || (stream != "none" && stream != "all" && stream != "mixed")) {
        std::fprintf(stderr, "si-load-test: bad arguments\n");
        return 2;
    }

    std::vector<Outcome> out(static_cast<size_t>(requests));
    std::atomic<int> next_request{0};
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c)
        threads.emplace_back([&] {
            httplib::Client cli(url);
            cli.set_read_timeout(120, 0);
            cli.set_keep_alive(true);
            for (int i; (i = next_request.fetch_add(1)) < requests;) {
                Outcome& o = out[size_t(i)];
                const size_t p = size_t(i) % (sizeof kPrompts / sizeof kPrompts[0]);
                const bool streamed = stream == "all" || (stream == "mixed" && i % 2 == 1);
                const json req = {{"prompt", kPrompts[p]}, {"max_tokens", max_tokens}, {"temperature", temperature},
                                  {"seed", int(p)}, {"stream", streamed}};
                const auto s = std::chrono::steady_clock::now();
                auto res = cli.Post("/v1/completions", req.dump(), "application/json");
                o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
                if (!res) {
                    o.error = res.error() == httplib::Error::Read
                                  ? "the connection closed in the middle of the response (the server stopped?)"
                                  : "no response: " + httplib::to_string(res.error());
                    continue;
                }
                if (res->status != 200) {
                    o.error = "HTTP " + std::to_string(res->status) + ": " + res->body;
                    continue;
                }
                if (streamed) {
                    o.text = parse_events(res->body, o.tokens, o.error);
                } else {
                    const json j = json::parse(res->body, nullptr, false);
                    if (j.is_discarded() || !j.contains("choices") || !j.contains("usage")) {
                        o.error = "bad body: " + res->body;
                        continue;
                    }
                    o.text = j["choices"][0].value("text", "");
                    o.tokens = j["usage"].value("completion_tokens", 0);
                }
            }
        });
    for (auto& t : threads) t.join();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // Same prompt and seed: the same text, whichever context and whatever ran before it.
    std::map<size_t, std::string> first;
    int errors = 0;
    long tokens = 0;
    std::vector<double> lat;
    std::map<std::string, int> by_error;
    for (int i = 0; i < requests; ++i) {
        Outcome& o = out[size_t(i)];
        const size_t p = size_t(i) % (sizeof kPrompts / sizeof kPrompts[0]);
        if (o.error.empty()) {
            const auto [it, fresh] = first.emplace(p, o.text);
            if (!fresh && it->second != o.text)
                o.error = "request " + std::to_string(i) + " gave \"" + o.text + "\", an earlier one with the same "
                          "prompt and seed \"" + it->second + "\"";
        }
        if (!o.error.empty()) {
            if (++errors <= 5) std::fprintf(stderr, "si-load-test: %s\n", o.error.c_str());
            ++by_error[o.error.substr(0, 300)];
            continue;
        }
        tokens += o.tokens;
        lat.push_back(o.seconds);
    }
    std::sort(lat.begin(), lat.end());
    auto pct = [&](double q) {
        return lat.empty() ? 0.0 : lat[std::min(lat.size() - 1, size_t(q * double(lat.size() - 1) + 0.5))] * 1e3;
    };
    std::printf("requests %d, clients %d, max_tokens %d, stream %s: %d ok, %d failed in %.2f s\n", requests, clients,
                max_tokens, stream.c_str(), requests - errors, errors, wall);
    std::printf("throughput %.1f requests/s, %.1f generated tokens/s\n", double(requests - errors) / wall,
                double(tokens) / wall);
    std::printf("latency ms: p50 %.1f, p90 %.1f, p99 %.1f, max %.1f\n", pct(0.50), pct(0.90), pct(0.99), pct(1.0));
    for (const auto& [error, n] : by_error) std::printf("failed %dx: %s\n", n, error.c_str());
    return errors == 0 ? 0 : 1;
}
