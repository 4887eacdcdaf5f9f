// bench: prefill and decode speed of the plaintext engine (f32 and int8 weights) and of the partition presets
// (gpu-only, enclave-only, secureinfer; int8 base), all alternating within every repetition, medians. Models are
// a file (-m) or a random-weight model of a named shape (--shape). The runner secureinfer-offline precomputes the
// unblinding factors of every decode step (n_gen plus a margin) before each decode repetition; that offline time
// is reported apart, as precompute tokens/s. The presets run on every --backends accelerator backend. For each preset
// the table also projects decode speed on SGX1/SGX2 machines (host/sgx_cost.h: measured time per domain plus the
// plan's enclave transitions and EPC paging), and --plot draws the decode latency per domain as SVG.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/bench_concurrency.h"
#include "cli/cli.h"
#include "common/error.h"
#include "engine/engine.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/model_file.h"
#include "backends/accelerator.h"
#include "host/plan.h"
#include "host/secure_session.h"
#include "host/sgx_cost.h"

namespace si::cli {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

constexpr int kOfflineMargin = 8;  // extra precomputed decode steps of secureinfer-offline

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<int32_t> bench_tokens(int n, int vocab) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) t[size_t(i)] = int32_t((uint32_t(i) * 2654435761u) % uint32_t(vocab));
    return t;
}

struct PlotBar {
    std::string label;
    double enclave_ms = 0, accel_ms = 0, host_ms = 0, other_ms = 0;
};

// Horizontal stacked bars, one per preset run: decode milliseconds per token by domain; "other" is the rest of the
// wall time (crossing the process boundary, copies, bookkeeping).
std::string latency_svg(const std::string& title, const std::vector<PlotBar>& bars) {
    const int left = 260, width = 560, row = 28, top = 50;
    double max_ms = 1e-9;
    for (const auto& b : bars) max_ms = std::max(max_ms, b.enclave_ms + b.accel_ms + b.host_ms + b.other_ms);
    const int height = top + row * int(bars.size()) + 70;
    std::string svg;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
                  "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                  "<text x=\"10\" y=\"22\" font-size=\"14\">%s</text>\n",
                  left + width + 40, height, title.c_str());
    svg += buf;
    const char* colors[] = {"#c0392b", "#2980b9", "#27ae60", "#95a5a6"};
    const char* names[] = {"enclave", "accelerator", "host", "other"};
    for (size_t i = 0; i < bars.size(); ++i) {
        const auto& b = bars[i];
        const double parts[] = {b.enclave_ms, b.accel_ms, b.host_ms, b.other_ms};
        const int y = top + row * int(i);
        std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%s</text>\n", left - 8, y + 16,
                      b.label.c_str());
        svg += buf;
        double x = left;
        for (int k = 0; k < 4; ++k) {
            const double w = parts[k] / max_ms * width;
            if (w <= 0) continue;
            std::snprintf(buf, sizeof buf,
                          "<rect x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"20\" fill=\"%s\"><title>%s %.3f ms</title></rect>\n",
                          x, y + 2, w, colors[k], names[k], parts[k]);
            svg += buf;
            x += w;
        }
        std::snprintf(buf, sizeof buf, "<text x=\"%.1f\" y=\"%d\">%.2f ms</text>\n", x + 4, y + 16,
                      b.enclave_ms + b.accel_ms + b.host_ms + b.other_ms);
        svg += buf;
    }
    const int ly = top + row * int(bars.size()) + 20;
    for (int k = 0; k < 4; ++k) {
        std::snprintf(buf, sizeof buf,
                      "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%d\" y=\"%d\">%s</text>\n",
                      left + 130 * k, ly, colors[k], left + 130 * k + 16, ly + 11, names[k]);
        svg += buf;
    }
    std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\">decode milliseconds per token (median run's stats)</text>\n",
                  left, ly + 34);
    svg += buf;
    svg += "</svg>\n";
    return svg;
}

}  // namespace

Runner add_bench(CLI::App& app) {
    auto* sub = app.add_subcommand("bench", "measure prefill and decode tokens/s (f32 and int8 weights, alternating, medians)");
    struct Opts {
        std::string model, shape = "stories110m", json, plot;
        std::vector<std::string> backends{"cpu"};
        std::vector<std::string> weights{"f32", "int8"};
        std::vector<std::string> modes{"plain"};
        std::string host = "worker";
        int n_prompt = 512, n_gen = 128, reps = 3, threads = 0, spin_us = 0, inside_mib = 256;
        std::string pin_cpu = "auto";
        std::vector<int> concurrency;  // continuous batching (bench_concurrency.cpp)
        int slot_memory = 0, slot_memory_positions = 256, ttft_prompt = 512;
        CLI::Option* n_gen_opt = nullptr;
    };
    auto o = std::make_shared<Opts>();
    sub->add_option("-m,--model", o->model, "model file (default: a random-weight model of --shape)");
    sub->add_option("--shape", o->shape, "random-weight model shape: stories260k, stories15m, stories110m, tinyllama, "
                                         "llama2-7b, llama3-8b (generated tensor by tensor)");
    sub->add_option("-p,--n-prompt", o->n_prompt, "prefill length in tokens (0: skip)")->check(CLI::Range(0, 1 << 16));
    o->n_gen_opt = sub->add_option("-n,--n-gen", o->n_gen, "decoded tokens (0: skip; with --concurrency: decode steps, "
                                                           "default 32)")->check(CLI::Range(0, 1 << 16));
    sub->add_option("-r,--repetitions", o->reps, "repetitions of each test")->check(CLI::Range(1, 1000));
    sub->add_option("-t,--threads", o->threads, "worker threads (0: all CPUs)")->check(CLI::Range(0, 1024));
    sub->add_option("--weights", o->weights, "weight formats to compare (native: a quantised GGUF's blocks as stored)")
        ->delimiter(',')
        ->check(CLI::IsMember({"f32", "int8", "native"}));
    sub->add_option("--modes", o->modes, "plain (the engine, each --weights) and/or the presets gpu-only, enclave-only, "
                                         "secureinfer, secureinfer-offline (decode with precomputed unblinding factors)")
        ->delimiter(',')->check(CLI::IsMember({"plain", "gpu-only", "enclave-only", "secureinfer", "secureinfer-offline"}));
    sub->add_option("--host", o->host, "enclave host of the presets")->check(CLI::IsMember({"worker", "inprocess"}));
    sub->add_option("--backends", o->backends, "accelerator backends the presets run on (cpu, cuda)")
        ->delimiter(',')->check(CLI::IsMember({"cpu", "cuda"}));
    sub->add_option("--spin-us", o->spin_us, "worker host: busy-wait this many microseconds on each doorbell before "
                                             "sleeping (see 'run'; default 0: never spin)")
        ->check(CLI::Range(0, 1000000));
    sub->add_option("--pin-cpu", o->pin_cpu, "worker host: run this thread and the worker's serving thread on one CPU: "
                                              "auto (default: for the cuda backend's presets without --spin-us, the CPU "
                                              "it starts on), "
                                              "off, or a CPU number")
        ->check(pin_cpu_validator());
    sub->add_option("--precompute-inside", o->inside_mib, "secureinfer-offline: MiB of precomputed factors kept inside "
                                                          "the enclave, the rest sealed to host memory (see 'run'; "
                                                          "default 256)")
        ->check(CLI::Range(0, 1024));
    sub->add_option("--concurrency", o->concurrency, "streams served at once by one session (sequence slots), e.g. "
                                                     "1,4,16,64: aggregate decode t/s, per-stream p50/p99 latency, TTFT "
                                                     "and offloaded FLOP share of gpu-only, enclave-only and secureinfer "
                                                     "(online, precomputed, sustained)")
        ->delimiter(',')->check(CLI::Range(1, 1024));
    sub->add_option("--ttft-prompt", o->ttft_prompt, "--concurrency: prompt length of the time-to-first-token test (0: skip)")
        ->check(CLI::Range(0, 1 << 16));
    sub->add_option("--slot-memory", o->slot_memory, "memory of one session with this many slots against one slot plus "
                                                     "the other slots' KV caches (each in a child process)")
        ->check(CLI::Range(2, 1024));
    sub->add_option("--slot-memory-positions", o->slot_memory_positions, "--slot-memory: tokens each slot holds")
        ->check(CLI::Range(1, 1 << 16));
    sub->add_option("--json", o->json, "also write the results as JSON to this file");
    sub->add_option("--plot", o->plot, "write an SVG of the presets' decode latency per domain to this file");
    return [o]() -> int {
        // The model's tensors one at a time (bounded memory): a memory-mapped file or generated random weights.
        std::string model_name;
        std::shared_ptr<const gguf::Reader> file;  // native weights read the GGUF in place
        ModelFile mf;
        std::shared_ptr<const TensorSource> src;
        if (!o->model.empty()) {
            mf = load_model_file(o->model, "", LoadWeights::lazy);
            src = source_for(mf);
            file = mf.gguf;
            model_name = o->model;
        } else {
            src = std::make_shared<RandomSource>(shape_preset(o->shape), 1234);
            model_name = o->shape + " (random weights)";
        }
        if (o->slot_memory > 0)
            return bench_slot_memory(materialize(*src), model_name, o->slot_memory, o->slot_memory_positions, o->threads);
        if (!o->concurrency.empty()) {
            ConcurrencyBench cb;
            cb.levels = o->concurrency;
            cb.n_gen = o->n_gen_opt->count() ? o->n_gen : 32;
            if (cb.n_gen < 1) throw UsageError("--concurrency needs -n of at least 1");
            cb.ttft_prompt = o->ttft_prompt;
            cb.reps = o->reps;
            cb.threads = o->threads;
            cb.worker_host = o->host == "worker";
            cb.inside_mib = o->inside_mib;
            cb.backend = o->backends.front();
            cb.json = o->json;
            return bench_concurrency(materialize(*src), model_name, cb);
        }
        const ModelConfig c = src->config();
        const int n_ctx = std::max(o->n_prompt, o->n_gen + 1);
        if (n_ctx > c.seq_len) throw UsageError("the test needs " + std::to_string(n_ctx) + " positions; the model's context is " + std::to_string(c.seq_len));

        // One runner per configuration: the plaintext engine per weight format, a secure session per preset.
        struct Run {
            std::string name;
            std::string backend;  // presets only
            SecureMode mode = SecureMode::secureinfer;
            std::unique_ptr<Engine> engine;
            std::unique_ptr<SecureSession> session;
            std::vector<double> pp, tg;
            SessionStats tg_stats;  // of the last decode run
            bool offline = false;   // precompute the unblinding factors before each decode run
            std::vector<double> pre;  // precompute tokens/s
            uint64_t kept_bytes = 0;  // factors kept inside after the last precompute
            double load_s = 0.0;      // construction: reading, converting and uploading the model
            void reset() { engine ? engine->reset() : session->reset(); }
            // a step computes the logits it needs, as the engine does: the sessions sample the last token (greedy)
            void eval(std::span<const int32_t> t) { engine ? (void)engine->eval(t) : (void)session->eval_sample(t); }
            size_t weight_bytes() const { return engine ? engine->weight_bytes() : 0; }
        };
        std::vector<Run> runs;
        for (const auto& m : o->modes) {
            if (m == "plain") {
                for (const auto& f : o->weights) {
                    EngineParams p;
                    p.n_threads = o->threads;
                    p.n_ctx = n_ctx;
                    p.weights = f == "int8" ? WeightFormat::int8 : f == "native" ? WeightFormat::native : WeightFormat::f32;
                    const auto t0 = std::chrono::steady_clock::now();
                    runs.push_back({"plain " + f, "", SecureMode::secureinfer, std::make_unique<Engine>(src, p, file.get()), nullptr,
                                    {}, {}, {}, false, {}});
                    runs.back().load_s = seconds_since(t0);
                }
                continue;
            }
            for (const auto& b : o->backends) {
                SecureSessionParams sp;
                const bool offline = m == "secureinfer-offline";
                sp.mode = offline ? SecureMode::secureinfer : *parse_secure_mode(m);
                sp.n_ctx = n_ctx;
                sp.n_threads = o->threads;
                sp.host = o->host == "inprocess" ? EnclaveHostKind::inprocess : EnclaveHostKind::worker;
                sp.accelerator_backend = b;
                sp.worker_spin_us = o->spin_us;
                sp.pin_cpu = resolve_pin_cpu(o->pin_cpu, b, o->spin_us);
                sp.precompute_inside_bytes = int64_t(o->inside_mib) << 20;
                const auto t0 = std::chrono::steady_clock::now();
                runs.push_back({m + " int8", b, sp.mode, nullptr, std::make_unique<SecureSession>(src, sp), {}, {}, {},
                                offline, {}});
                runs.back().load_s = seconds_since(t0);
            }
        }
        // Loading and memory: this process's peak resident memory so far (every runner's loading included) and
        // each enclave worker's, as /proc reports them.
        std::fprintf(stderr, "bench: f32 elements read from the model: %.3g (%.3g per parameter)\n",
                     double(src->f32_elements_read()), double(src->f32_elements_read()) / double(c.n_params(src->tied())));
        for (const auto& r : runs)
            std::fprintf(stderr, "bench: load %s [%s]: %.2f s\n", r.name.c_str(), r.engine ? "-" : r.backend.c_str(), r.load_s);
        auto report_memory = [&](const char* when) {
            std::fprintf(stderr, "bench: peak resident memory %s: host %.1f MiB", when, double(peak_rss_kib()) / 1024.0);
            for (const auto& r : runs)
                if (r.session && r.session->worker_peak_rss_kib() >= 0)
                    std::fprintf(stderr, ", %s worker %.1f MiB", r.name.c_str(), double(r.session->worker_peak_rss_kib()) / 1024.0);
            std::fprintf(stderr, "\n");
        };
        report_memory("after loading");
        const auto prompt = bench_tokens(o->n_prompt, c.vocab_size);
        const auto gen = bench_tokens(o->n_gen, c.vocab_size);
        std::fprintf(stderr, "bench: %s, dim %d, %d layers, hidden %d, vocab %d, %d threads\n", model_name.c_str(), c.dim,
                     c.n_layers, c.hidden_dim, c.vocab_size, o->threads > 0 ? o->threads : ThreadPool::default_threads());
        if (std::find(o->backends.begin(), o->backends.end(), "cuda") != o->backends.end())
            std::fprintf(stderr, "bench: cuda device: %s\n", cuda_device_name().c_str());
        // warm-up, then alternate formats inside every repetition so that drifts in machine load hit all alike
        for (auto& r : runs) {
            r.reset();
            r.eval(bench_tokens(std::min(16, n_ctx), c.vocab_size));
        }
        for (int rep = 0; rep < o->reps; ++rep) {
            for (auto& r : runs) {
                if (o->n_prompt > 0) {
                    r.reset();
                    const auto t0 = std::chrono::steady_clock::now();
                    r.eval(prompt);
                    r.pp.push_back(o->n_prompt / seconds_since(t0));
                }
                if (o->n_gen > 0) {
                    r.reset();
                    if (r.session) r.session->reset_stats();
                    if (r.offline) {
                        // offline phase, timed apart: factors for every decode step plus a margin
                        const int n_pre = o->n_gen + kOfflineMargin;
                        const auto tp = std::chrono::steady_clock::now();
                        r.session->precompute(n_pre);
                        r.pre.push_back(n_pre / seconds_since(tp));
                        r.kept_bytes = r.session->kept_factor_bytes();
                    }
                    const auto t0 = std::chrono::steady_clock::now();
                    for (int i = 0; i < o->n_gen; ++i) r.eval(std::span<const int32_t>(&gen[size_t(i)], 1));
                    r.tg.push_back(o->n_gen / seconds_since(t0));
                    if (r.session) r.tg_stats = r.session->stats();
                }
                std::fprintf(stderr, "\rbench: repetition %d/%d", rep + 1, o->reps);
            }
        }
        std::fprintf(stderr, "\n");
        report_memory("at the end");
        nlohmann::json out = nlohmann::json::array();
        std::printf("| model | runner | backend | test | t/s (median) | min | max | decode ms/token: enclave / accel / host | crossings/token | KiB crossing/token | SGX1 / SGX2 projected t/s |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|\n");
        std::vector<PlotBar> bars;
        for (const auto& r : runs) {
            const double per_tok = 1.0 / std::max(1, o->n_gen);
            const SessionStats& st = r.tg_stats;
            char dom[96] = "-", cross[32] = "-", kib[32] = "-", sgx[64] = "-";
            nlohmann::json sgx_json;
            if (r.session) {
                std::snprintf(dom, sizeof dom, "%.3f / %.3f / %.3f", st.enclave.seconds * 1e3 * per_tok,
                              st.accelerator.seconds * 1e3 * per_tok, st.host.seconds * 1e3 * per_tok);
                std::snprintf(cross, sizeof cross, "%.1f", double(st.crossings) * per_tok);
                std::snprintf(kib, sizeof kib, "%.1f", double(st.bytes_to_accelerator + st.bytes_from_accelerator) / 1024.0 * per_tok);
                if (!r.tg.empty()) {
                    // The decode step at the middle of the generated span, projected with the measured domain times.
                    PlanParams pp;
                    pp.mode = r.mode == SecureMode::gpu_only       ? Mode::gpu_only
                              : r.mode == SecureMode::enclave_only ? Mode::enclave_only
                                                                   : Mode::secureinfer;
                    pp.n_tokens = 1;
                    pp.n_ctx = std::max(1, o->n_gen / 2);
                    pp.offline_unblinding = r.offline;
                    Plan plan = make_plan(c, pp);
                    if (r.offline && r.kept_bytes > 0) {
                        plan.kept_factor_bytes = double(r.kept_bytes);
                        plan.kept_step_bytes = double(r.kept_bytes) / double(o->n_gen + kOfflineMargin);
                    }
                    const StepTimes times{st.enclave.seconds * per_tok, st.accelerator.seconds * per_tok,
                                          st.host.seconds * per_tok};
                    const double t1 = project_sgx(plan, times, sgx_params("sgx1")).total_s();
                    const double t2 = project_sgx(plan, times, sgx_params("sgx2")).total_s();
                    std::snprintf(sgx, sizeof sgx, "%.1f / %.1f", 1.0 / t1, 1.0 / t2);
                    sgx_json = {{"sgx1_decode_tps", 1.0 / t1}, {"sgx2_decode_tps", 1.0 / t2}};
                    const double wall_ms = 1e3 / median(r.tg);
                    PlotBar bar{r.name + (r.offline ? " (offline)" : "") + " [" + r.backend + "]",
                                st.enclave.seconds * 1e3 * per_tok, st.accelerator.seconds * 1e3 * per_tok,
                                st.host.seconds * 1e3 * per_tok, 0.0};
                    bar.other_ms = std::max(0.0, wall_ms - bar.enclave_ms - bar.accel_ms - bar.host_ms);
                    bars.push_back(bar);
                }
            }
            for (auto [name, v] : {std::pair{std::string("pp") + std::to_string(o->n_prompt), &r.pp},
                                   std::pair{std::string("tg") + std::to_string(o->n_gen), &r.tg},
                                   std::pair{std::string("precompute") + std::to_string(o->n_gen + kOfflineMargin), &r.pre}}) {
                if (v->empty()) continue;
                const bool tg = name[0] == 't';
                if (name[0] == 'p' && name[1] == 'r') {
                    // the offline phase: tokens of unblinding factors per second
                    std::printf("| %s | %s | %s | %s | %.2f | %.2f | %.2f | offline, before decode | | | |\n", model_name.c_str(),
                                r.name.c_str(), r.backend.c_str(), name.c_str(), median(*v),
                                *std::min_element(v->begin(), v->end()), *std::max_element(v->begin(), v->end()));
                    out.push_back({{"model", model_name}, {"runner", r.name}, {"backend", r.backend}, {"test", name}, {"tps_median", median(*v)},
                                   {"tps_all", *v}, {"offline", true}, {"precompute_tps_median", median(*v)},
                                   {"offline_seconds", st.offline.seconds}, {"offline_flops", st.offline.flops},
                                   {"threads", o->threads > 0 ? o->threads : ThreadPool::default_threads()}});
                    continue;
                }
                std::printf("| %s | %s | %s | %s | %.2f | %.2f | %.2f | %s | %s | %s | %s |\n", model_name.c_str(), r.name.c_str(),
                            r.engine ? "-" : r.backend.c_str(), name.c_str(), median(*v),
                            *std::min_element(v->begin(), v->end()), *std::max_element(v->begin(), v->end()),
                            tg ? dom : "", tg ? cross : "", tg ? kib : "", tg ? sgx : "");
                nlohmann::json rec = {{"model", model_name}, {"runner", r.name}, {"test", name}, {"tps_median", median(*v)},
                                      {"tps_all", *v}, {"threads", o->threads > 0 ? o->threads : ThreadPool::default_threads()}};
                if (r.engine) rec["weight_bytes"] = r.weight_bytes();
                if (r.session) rec["backend"] = r.backend;
                if (r.session && !name.empty() && name[0] == 'p') rec["prefill_tps"] = median(*v);
                if (r.session && tg) {
                    const double flops = st.enclave.flops + st.accelerator.flops + st.host.flops;
                    rec["decode_seconds_per_token"] = {{"enclave", st.enclave.seconds * per_tok},
                                                       {"accelerator", st.accelerator.seconds * per_tok},
                                                       {"host", st.host.seconds * per_tok}};
                    rec["crossings_per_token"] = double(st.crossings) * per_tok;
                    rec["bytes_crossing_per_token"] = double(st.bytes_to_accelerator + st.bytes_from_accelerator) * per_tok;
                    rec["offloaded_flops_share"] = flops > 0 ? st.accelerator.flops / flops : 0.0;
                    rec["isolation"] = r.session->isolation();
                    rec["decode_tps"] = median(*v);
                    if (!sgx_json.is_null()) rec["sgx_projection"] = sgx_json;
                    if (r.offline) {
                        rec["precompute_tps_median"] = median(r.pre);
                        rec["offline_seconds_per_token"] = st.offline.seconds / double(std::max<uint64_t>(1, st.precomputed_tokens));
                        rec["factors_kept_inside_bytes"] = r.kept_bytes;  // after precompute; the rest were sealed
                    }
                }
                out.push_back(rec);
            }
        }
        if (!o->json.empty()) {
            std::ofstream f(o->json);
            f << out.dump(2) << "\n";
            if (!f) throw Error(Status::io, o->json + ": cannot write");
        }
        if (!o->plot.empty()) {
            if (bars.empty()) throw UsageError("--plot needs a preset in --modes and -n > 0");
            std::ofstream f(o->plot);
            f << latency_svg("secureinfer bench: " + model_name, bars);
            if (!f) throw Error(Status::io, o->plot + ": cannot write");
        }
        return 0;
    };
}

}  // namespace si::cli
