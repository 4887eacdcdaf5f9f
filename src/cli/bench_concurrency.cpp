// bench --concurrency: throughput of one session serving C streams at once (C sequence slots, one batched step per
// token over all of them), for gpu-only, enclave-only and secureinfer with online unblinding, with precomputed
// factors (precompute timed apart, before the decode) and sustained (the precompute interleaved with the decode on
// the same cores, its time counted). Per level: aggregate decode tokens/s, per-stream latency between tokens (p50,
// p99), ratios to gpu-only and to one stream, offloaded FLOP share (critical path, and counting the precompute);
// then time to first token for one long prompt. Runners alternate inside every repetition; medians.
//
// bench --slot-memory N: the memory of one session with N slots against one slot plus N - 1 more KV caches, each
// configuration in a fresh child process.
#include "cli/bench_concurrency.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/staged_forward.h"
#include "common/threadpool.h"
#include "host/secure_session.h"

namespace si::cli {

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const size_t i = size_t(std::min<double>(double(v.size() - 1), p / 100.0 * double(v.size() - 1) + 0.5));
    return v[i];
}

std::vector<int32_t> tokens(int n, int vocab, uint32_t salt) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) t[size_t(i)] = int32_t(((uint32_t(i) + salt * 7919u) * 2654435761u) % uint32_t(vocab));
    return t;
}

enum class Kind { online, precomputed, sustained };

struct Runner {
    std::string name;
    SecureMode mode;
    Kind kind = Kind::online;
    std::unique_ptr<SecureSession> session;
    // per level
    std::map<int, std::vector<double>> agg, lat_ms, pre_rows_per_s, share_critical, share_all;
    std::vector<double> ttft_ms;
};

struct Level {
    double agg = 0, pre_rate = 0, share_critical = 0, share_all = 0;
    std::vector<double> lat_ms;
};

// C streams: an 8-token prompt each (one step), then n_gen decode steps over all of them.
Level measure(Runner& r, int C, int n_gen, int vocab) {
    SecureSession& s = *r.session;
    for (int i = 0; i < C; ++i) s.reset_slot(i);
    std::vector<std::vector<int32_t>> prompts, last(static_cast<size_t>(C));
    std::vector<SlotStep> batch;
    for (int i = 0; i < C; ++i) prompts.push_back(tokens(8, vocab, uint32_t(i + 1)));
    for (int i = 0; i < C; ++i) batch.push_back(SlotStep{i, prompts[size_t(i)], true});
    Level out;
    double offline_flops = 0;  // of the decode steps' factors
    if (r.kind == Kind::precomputed) {
        // factors for the prompts (precomputed prefill) and every decode step, timed apart
        const double f0 = s.stats().offline.flops;
        const auto tp = Clock::now();
        s.precompute(C * (n_gen + 8));
        out.pre_rate = double(C * (n_gen + 8)) / since(tp);
        offline_flops = (s.stats().offline.flops - f0) * double(n_gen) / double(n_gen + 8);
    }
    // sustained: the prompts' factors too come from the store, filled on demand (the prompts are not timed)
    if (r.kind == Kind::sustained && s.precomputed_available() < 8 * C) s.precompute(8 * C);
    // the prompts in as few steps as the batch allows
    std::vector<int32_t> toks;
    const size_t per = size_t(std::max(1, s.n_batch() / 8));
    for (size_t at = 0; at < batch.size(); at += per) {
        const auto part = s.step(std::span<const SlotStep>(batch).subspan(at, std::min(per, batch.size() - at)));
        toks.insert(toks.end(), part.begin(), part.end());
    }
    s.reset_stats();
    const auto t0 = Clock::now();
    auto prev = t0;
    for (int g = 0; g < n_gen; ++g) {
        // sustained: the factors for the next steps are computed when the store runs dry, on the same cores
        // (16 steps ahead, at least 32 rows: precompute is a matrix product, efficient in batches)
        if (r.kind == Kind::sustained && s.precomputed_available() < C) s.precompute(std::max(C * 16, 32));
        batch.clear();
        for (int i = 0; i < C; ++i) {
            last[size_t(i)] = {toks[size_t(i)]};
            batch.push_back(SlotStep{i, last[size_t(i)], true});
        }
        toks = s.step(batch);
        const auto now = Clock::now();
        out.lat_ms.push_back(1e3 * std::chrono::duration<double>(now - prev).count());
        prev = now;
    }
    out.agg = double(C) * n_gen / since(t0);
    const SessionStats& st = s.stats();
    const double online = st.enclave.flops + st.accelerator.flops + st.host.flops;
    out.share_critical = online > 0 ? st.accelerator.flops / online : 0.0;
    out.share_all = online > 0 ? st.accelerator.flops / (online + st.offline.flops + offline_flops) : 0.0;
    return out;
}

double ttft_ms(Runner& r, int n, int vocab) {
    SecureSession& s = *r.session;
    s.reset_slot(0);
    const auto prompt = tokens(n, vocab, 99);
    if (r.kind == Kind::precomputed) s.precompute(n);
    const auto t0 = Clock::now();
    for (int at = 0; at < n; at += s.n_batch()) {  // in passes of at most n_batch tokens
        const int k = std::min(s.n_batch(), n - at);
        const SlotStep b{0, std::span<const int32_t>(prompt.data() + at, size_t(k)), at + k == n};
        s.step(std::span<const SlotStep>(&b, 1));
    }
    return 1e3 * since(t0);
}

long rss_kib() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
    return -1;
}

}  // namespace

int bench_concurrency(const ModelWeights& w, const std::string& model_name, const ConcurrencyBench& o) {
    const ModelConfig& c = w.cfg;
    if (o.levels.empty()) throw Error(Status::invalid_argument, "--concurrency: no levels");
    const int max_c = *std::max_element(o.levels.begin(), o.levels.end());
    if (*std::min_element(o.levels.begin(), o.levels.end()) < 1 || max_c > 1024)
        throw Error(Status::invalid_argument, "--concurrency: levels must lie in [1, 1024]");
    const int n_ctx = std::max(o.ttft_prompt + 2, 8 + o.n_gen + 2);
    if (n_ctx > c.seq_len)
        throw Error(Status::invalid_argument, "the test needs " + std::to_string(n_ctx) +
                                                  " positions; the model's context is " + std::to_string(c.seq_len));
    std::vector<Runner> runs;
    auto add = [&](const std::string& name, SecureMode mode, Kind kind) {
        SecureSessionParams sp;
        sp.mode = mode;
        sp.n_ctx = n_ctx;
        sp.n_threads = o.threads;
        sp.slots = max_c;
        sp.host = o.worker_host ? EnclaveHostKind::worker : EnclaveHostKind::inprocess;
        sp.accelerator_backend = o.backend;
        sp.precompute_inside_bytes = int64_t(o.inside_mib) << 20;
        Runner r;
        r.name = name;
        r.mode = mode;
        r.kind = kind;
        r.session = std::make_unique<SecureSession>(w, sp);
        runs.push_back(std::move(r));
    };
    add("gpu-only", SecureMode::gpu_only, Kind::online);
    add("enclave-only", SecureMode::enclave_only, Kind::online);
    add("secureinfer online", SecureMode::secureinfer, Kind::online);
    add("secureinfer precomputed", SecureMode::secureinfer, Kind::precomputed);
    add("secureinfer sustained", SecureMode::secureinfer, Kind::sustained);
    std::fprintf(stderr, "bench: %s, dim %d, %d layers, hidden %d, vocab %d, %d threads, %s host, %s backend\n",
                 model_name.c_str(), c.dim, c.n_layers, c.hidden_dim, c.vocab_size,
                 o.threads > 0 ? o.threads : ThreadPool::default_threads(), o.worker_host ? "worker" : "in-process",
                 o.backend.c_str());
    // ratios to gpu-only, per repetition (the same machine state), then medians
    std::map<std::pair<std::string, int>, std::vector<double>> vs_gpu, vs_one;
    std::map<std::string, std::vector<double>> ttft_vs_gpu;
    for (auto& r : runs) measure(r, 1, 2, c.vocab_size);  // warm-up
    for (int rep = 0; rep < o.reps; ++rep) {
        for (int C : o.levels) {
            std::map<std::string, double> agg;
            for (auto& r : runs) {
                const Level l = measure(r, C, o.n_gen, c.vocab_size);
                r.agg[C].push_back(l.agg);
                r.lat_ms[C].insert(r.lat_ms[C].end(), l.lat_ms.begin(), l.lat_ms.end());
                if (l.pre_rate > 0) r.pre_rows_per_s[C].push_back(l.pre_rate);
                r.share_critical[C].push_back(l.share_critical);
                r.share_all[C].push_back(l.share_all);
                agg[r.name] = l.agg;
                std::fprintf(stderr, "\rbench: repetition %d/%d, %d streams, %-24s", rep + 1, o.reps, C, r.name.c_str());
            }
            for (auto& r : runs) vs_gpu[{r.name, C}].push_back(agg["gpu-only"] / agg[r.name]);
        }
        if (o.ttft_prompt > 0) {
            std::map<std::string, double> t;
            for (auto& r : runs) {
                if (r.kind == Kind::sustained) continue;
                t[r.name] = ttft_ms(r, o.ttft_prompt, c.vocab_size);
                r.ttft_ms.push_back(t[r.name]);
            }
            for (const auto& [name, v] : t) ttft_vs_gpu[name].push_back(v / t["gpu-only"]);
        }
    }
    std::fprintf(stderr, "\n");
    for (auto& r : runs)
        for (int C : o.levels) {
            std::vector<double> scale;
            const auto& a = r.agg[C];
            const auto& one = r.agg[o.levels.front()];
            for (size_t i = 0; i < a.size() && i < one.size(); ++i) scale.push_back(a[i] / one[i]);
            vs_one[{r.name, C}] = scale;
        }

    nlohmann::json out = nlohmann::json::array();
    std::printf("| model | runner | streams | aggregate decode t/s (median) | per-stream ms/token p50 | p99 | latency vs "
                "gpu-only (aggregate) | aggregate vs %d stream%s | offloaded FLOPs: critical path / with precompute |\n"
                "|---|---|---|---|---|---|---|---|---|\n",
                o.levels.front(), o.levels.front() == 1 ? "" : "s");
    for (int C : o.levels)
        for (auto& r : runs) {
            const double agg = median(r.agg[C]), p50 = percentile(r.lat_ms[C], 50), p99 = percentile(r.lat_ms[C], 99);
            const double rg = median(vs_gpu[{r.name, C}]), r1 = median(vs_one[{r.name, C}]);
            char share[64] = "-";
            if (r.mode == SecureMode::secureinfer)
                std::snprintf(share, sizeof share, "%.1f%% / %.1f%%", 100 * median(r.share_critical[C]),
                              100 * median(r.share_all[C]));
            std::printf("| %s | %s | %d | %.2f | %.2f | %.2f | %.2fx | %.2fx | %s |\n", model_name.c_str(), r.name.c_str(),
                        C, agg, p50, p99, rg, r1, share);
            nlohmann::json rec = {{"model", model_name},         {"runner", r.name},        {"streams", C},
                                  {"aggregate_tps_median", agg}, {"aggregate_tps_all", r.agg[C]},
                                  {"latency_ms_p50", p50},       {"latency_ms_p99", p99},   {"vs_gpu_only", rg},
                                  {"vs_first_level", r1},        {"threads", o.threads > 0 ? o.threads : ThreadPool::default_threads()}};
            if (r.mode == SecureMode::secureinfer) {
                rec["offloaded_flops_share_critical"] = median(r.share_critical[C]);
                rec["offloaded_flops_share_with_precompute"] = median(r.share_all[C]);
            }
            if (!r.pre_rows_per_s[C].empty()) rec["precompute_rows_per_s"] = median(r.pre_rows_per_s[C]);
            out.push_back(rec);
        }
    for (auto& r : runs)
        for (int C : o.levels)
            if (!r.pre_rows_per_s[C].empty())
                std::printf("\nprecompute (%s, %d streams): %.1f rows/s (a row: one token position of every offloaded "
                            "crossing)", r.name.c_str(), C, median(r.pre_rows_per_s[C]));
    std::printf("\n");
    if (o.ttft_prompt > 0) {
        std::printf("\n| model | runner | time to first token, %d-token prompt (ms, median) | vs gpu-only |\n|---|---|---|---|\n",
                    o.ttft_prompt);
        for (auto& r : runs) {
            if (r.ttft_ms.empty()) continue;
            std::printf("| %s | %s | %.1f | %.2fx |\n", model_name.c_str(), r.name.c_str(), median(r.ttft_ms),
                        median(ttft_vs_gpu[r.name]));
            out.push_back({{"model", model_name}, {"runner", r.name}, {"test", "ttft"}, {"prompt", o.ttft_prompt},
                           {"ttft_ms_median", median(r.ttft_ms)}, {"vs_gpu_only", median(ttft_vs_gpu[r.name])}});
        }
    }
    if (!o.json.empty()) {
        std::ofstream f(o.json);
        f << out.dump(2) << "\n";
        if (!f) throw Error(Status::io, o.json + ": cannot write");
    }
    return 0;
}

int bench_slot_memory(const ModelWeights& w, const std::string& model_name, int slots, int positions, int threads) {
    const ModelConfig& c = w.cfg;
    if (slots < 2 || slots > 1024) throw Error(Status::invalid_argument, "--slot-memory: slots must lie in [2, 1024]");
    if (positions < 1 || positions + 1 > c.seq_len)
        throw Error(Status::invalid_argument, "--slot-memory-positions must lie in [1, " + std::to_string(c.seq_len - 1) + "]");
    // One configuration in a child: the resident set's growth from before the session to after every slot holds
    // `positions` tokens (the session, its trusted core in process, the accelerator's weights, the caches).
    auto child = [&](int n_slots) -> std::pair<double, double> {
        int fd[2];
        if (pipe(fd) != 0) throw Error(Status::internal, "pipe failed");
        std::fflush(nullptr);
        const pid_t pid = fork();
        if (pid < 0) throw Error(Status::internal, "fork failed");
        if (pid == 0) {
            close(fd[0]);
            double res[2] = {-1, -1};
            try {
                const long r0 = rss_kib();
                SecureSessionParams sp;
                sp.mode = SecureMode::secureinfer;
                sp.host = EnclaveHostKind::inprocess;
                sp.n_ctx = positions + 1;
                sp.n_threads = threads;
                sp.slots = n_slots;
                SecureSession s(w, sp);
                const long r1 = rss_kib();
                for (int i = 0; i < n_slots; ++i) {
                    const auto t = tokens(positions, c.vocab_size, uint32_t(i));
                    for (int at = 0; at < positions; at += s.n_batch()) {
                        const int n = std::min(s.n_batch(), positions - at);
                        const SlotStep b{i, std::span<const int32_t>(t.data() + at, size_t(n)), true};
                        s.step(std::span<const SlotStep>(&b, 1));
                    }
                }
                const long r2 = rss_kib();
                res[0] = double(r1 - r0) * 1024.0;
                res[1] = double(r2 - r0) * 1024.0;
            } catch (const std::exception& e) {
                std::fprintf(stderr, "bench: %s\n", e.what());
            }
            if (write(fd[1], res, sizeof res) != ssize_t(sizeof res)) _exit(1);
            _exit(0);
        }
        close(fd[1]);
        double res[2] = {-1, -1};
        const ssize_t got = read(fd[0], res, sizeof res);
        close(fd[0]);
        int status = 0;
        waitpid(pid, &status, 0);
        if (got != ssize_t(sizeof res) || res[1] < 0) throw Error(Status::internal, "the measuring child failed");
        return {res[0], res[1]};
    };
    const double kv = 2.0 * c.n_layers * c.kv_dim() * 4.0 *
                      double(std::min<int64_t>(positions + 1, (int64_t(positions) + KvCache::kChunk - 1) / KvCache::kChunk * KvCache::kChunk));
    std::fprintf(stderr, "bench: %s, slot memory: 1 and %d slots of %d tokens each, one child process each\n",
                 model_name.c_str(), slots, positions);
    const auto one = child(1);
    const auto many = child(slots);
    const double base = one.second + double(slots - 1) * kv;
    std::printf("| model | slots | tokens per slot | session memory after load | after filling every slot | KV cache per slot | "
                "extra per slot (measured) | %d slots / (1 slot + %d KV caches) | %d separate sessions / 1 session of %d slots |\n"
                "|---|---|---|---|---|---|---|---|---|\n",
                slots, slots - 1, slots, slots);
    auto mib = [](double b) { return b / double(1 << 20); };
    std::printf("| %s | 1 | %d | %.1f MiB | %.1f MiB | %.2f MiB | - | - | - |\n", model_name.c_str(), positions,
                mib(one.first), mib(one.second), mib(kv));
    std::printf("| %s | %d | %d | %.1f MiB | %.1f MiB | %.2f MiB | %.2f MiB | %.3fx | %.2fx |\n", model_name.c_str(), slots,
                positions, mib(many.first), mib(many.second), mib(kv), mib((many.second - one.second) / (slots - 1)),
                many.second / base, double(slots) * one.second / many.second);
    return 0;
}

}  // namespace si::cli
