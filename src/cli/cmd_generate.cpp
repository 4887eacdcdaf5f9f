// Commands that run the model: run (generation), perplexity, tokenize.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "cli/progress.h"
#include "common/tokenizer.h"
#include "formats/model_file.h"
#include "secureinfer.hpp"

namespace si::cli {

namespace {

struct ModelOptions {
    std::string model, tokenizer, weights = "f32", lora;
    int threads = 0, ctx = 0, batch = 512;
    float lora_scale = 1.0f;
    // partition preset and its options
    std::string mode = "secureinfer", host = "auto", secret, trace, backend = "cpu";
    int spin_us = 0;
    std::string pin_cpu = "auto";
    bool insecure = false, insecure_memory = false, stats = false;
    CLI::Option* weights_opt = nullptr;
    // protected packages (docs/PACKAGES.md)
    std::string package, keyserver, key_file, sealed_key;
    bool require_model = true;

    void add(CLI::App* sub, bool require_model_file = true) {
        require_model = require_model_file;
        auto* m = sub->add_option("-m,--model", model, "model file (GGUF or llama2.c checkpoint)");
        sub->add_option("--package", package, "protected model package (secureinfer pack): public tensors loaded "
                                              "here, secret ones opened only inside the enclave")
            ->excludes(m);
        sub->add_option("--keyserver", keyserver, "package: obtain the model key from this keyserver after "
                                                  "attestation, e.g. http://127.0.0.1:8377");
        sub->add_option("--key-file", key_file, "package: the owner key itself (development only: the key passes "
                                                "through this untrusted process)");
        sub->add_option("--sealed-key", sealed_key, "package: unseal the model key from this file if it exists "
                                                    "(no keyserver needed); after a key release, seal it here");
        sub->add_option("--tokenizer", tokenizer, "tokenizer.bin for llama2.c checkpoints (default: tok<vocab>.bin or tokenizer.bin beside the model)");
        sub->add_option("-t,--threads", threads, "worker threads (0: all CPUs)")->check(CLI::Range(0, 1024));
        sub->add_option("-c,--ctx-size", ctx, "context length (0: the model's)")->check(CLI::Range(0, 1 << 20));
        sub->add_option("-b,--batch-size", batch, "prompt tokens per forward pass")->check(CLI::Range(1, 1 << 16));
        weights_opt = sub->add_option("--weights", weights, "weight format of the plaintext engine (--mode plain): f32, "
                                                            "int8 (per-row), native (a quantised GGUF's blocks as stored)")
                          ->check(CLI::IsMember({"f32", "int8", "native"}));
        auto* l = sub->add_option("--lora", lora, "LoRA adapter (llama.cpp GGUF adapter): kept inside the enclave and "
                                                  "treated as secret; merged into the weights with --mode plain");
        sub->add_option("--lora-scale", lora_scale, "adapter scale: the update is scale * alpha / rank * B A")
            ->check(CLI::Range(-1e6, 1e6))
            ->needs(l);
        sub->add_option("--mode", mode,
                        "partition preset: secureinfer (masked, checked offload of the public base projections), "
                        "gpu-only (plaintext, no security), enclave-only (everything in the enclave), plain "
                        "(the plaintext f32/int8 engine)")
            ->check(CLI::IsMember({"secureinfer", "gpu-only", "enclave-only", "plain"}));
        sub->add_option("--host", host, "where the trusted core runs: worker (hardened process), inprocess (no "
                                        "isolation, tests only), auto (worker if its executable exists)")
            ->check(CLI::IsMember({"auto", "worker", "inprocess"}));
        sub->add_option("--backend", backend, "accelerator backend of the presets: cpu, cuda (needs a CUDA build and "
                                              "an NVIDIA GPU)")
            ->check(CLI::IsMember({"cpu", "cuda"}));
        sub->add_option("--spin-us", spin_us, "worker host: busy-wait this many microseconds on each doorbell before "
                                              "sleeping, on both sides (lower latency per crossing for a core each; "
                                              "with --pin-cpu off the worker also opens each crossing's precomputed "
                                              "factors while the accelerator computes; default 0)")
            ->check(CLI::Range(0, 1000000));
        sub->add_option("--pin-cpu", pin_cpu, "worker host: run this process's thread and the worker's serving thread "
                                              "on one CPU, so that doorbells switch threads instead of waking a "
                                              "sleeping CPU: auto (default: with --backend cuda and no --spin-us, "
                                              "the CPU it starts on), off, or a CPU number")
            ->check(pin_cpu_validator());
        sub->add_flag("--insecure", insecure, "gpu-only: run a model with secret tensors anyway (benchmarking only)");
        sub->add_flag("--insecure-memory", insecure_memory,
                      "worker host: start even when neither memfd_secret nor mlock is available (secrets in "
                      "ordinary, swappable memory; the measured configuration says memory=unlocked)");
        sub->add_option("--secret", secret, "comma-separated tensor names to treat as secret, e.g. "
                                            "blk.0.attn_q.weight ('*': every tensor), in addition to those the "
                                            "model file declares (GGUF key secureinfer.secret_tensors)");
        sub->add_option("--trace", trace, "write the boundary trace (.npy files + index.jsonl) to this directory");
        sub->add_flag("--stats", stats, "print crossings, bytes, FLOPs and time per domain to stderr");
    }
    // Usage checks that need several options.
    void check() const {
        if (weights_opt && weights_opt->count() && mode != "plain")
            throw UsageError("--weights applies to --mode plain only (the other modes use int8 weights with "
                             "fixed-point activations)");
        if (mode == "plain" && (stats || !trace.empty() || insecure || !secret.empty()))
            throw UsageError("--stats, --trace, --insecure and --secret need one of the modes secureinfer, "
                             "gpu-only, enclave-only");
        if (insecure && mode != "gpu-only") throw UsageError("--insecure applies to --mode gpu-only only");
        if (require_model && model.empty() && package.empty()) throw UsageError("--model is required (or --package)");
        if (package.empty() && (!keyserver.empty() || !key_file.empty() || !sealed_key.empty()))
            throw UsageError("--keyserver, --key-file and --sealed-key apply to --package only");
        if (!package.empty() && !lora.empty())
            throw UsageError("--lora cannot be added to a --package (the package carries its own adapters)");
        if (mode == "plain" && backend != "cpu")
            throw UsageError("--backend applies to the modes secureinfer, gpu-only, enclave-only (--mode plain runs "
                             "the CPU engine)");
    }
    si_model_params model_params() const {
        si_model_params p = si_model_default_params();
        p.tokenizer_path = tokenizer.empty() ? nullptr : tokenizer.c_str();
        p.lora_path = lora.empty() ? nullptr : lora.c_str();
        p.lora_scale = lora_scale;
        return p;
    }
    si_context_params context_params() const {
        si_context_params p = si_context_default_params();
        p.n_threads = threads;
        p.n_ctx = ctx;
        p.n_batch = batch;
        p.weight_format = weights == "int8" ? SI_WEIGHTS_INT8 : weights == "native" ? SI_WEIGHTS_NATIVE : SI_WEIGHTS_F32;
        p.mode = mode == "plain"          ? SI_MODE_PLAIN
                 : mode == "gpu-only"     ? SI_MODE_GPU_ONLY
                 : mode == "enclave-only" ? SI_MODE_ENCLAVE_ONLY
                                          : SI_MODE_SECUREINFER;
        p.enclave_host = host == "worker" ? SI_HOST_WORKER : host == "inprocess" ? SI_HOST_INPROCESS : SI_HOST_AUTO;
        p.insecure = insecure ? 1 : 0;
        p.insecure_memory = insecure_memory ? 1 : 0;
        p.secret_tensors = secret.empty() ? nullptr : secret.c_str();
        p.trace_dir = trace.empty() ? nullptr : trace.c_str();
        p.keyserver_url = keyserver.empty() ? nullptr : keyserver.c_str();
        p.owner_key_file = key_file.empty() ? nullptr : key_file.c_str();
        p.sealed_key_path = sealed_key.empty() ? nullptr : sealed_key.c_str();
        p.accelerator = backend.c_str();
        p.worker_spin_us = spin_us;
        p.pin_cpu = resolve_pin_cpu(pin_cpu, backend, spin_us);
        return p;
    }
    const std::string& path() const { return package.empty() ? model : package; }
};

// Loud warnings about weakened protection (e.g. no isolation), once, before any output.
void print_warnings(const secureinfer::Context& ctx) {
    const std::string w = si_context_warnings(ctx.get());
    size_t b = 0;
    while (b < w.size()) {
        const size_t e = std::min(w.find('\n', b), w.size());
        std::fprintf(stderr, "secureinfer: WARNING: %s\n", w.substr(b, e - b).c_str());
        b = e + 1;
    }
}

std::string human_bytes(double b) {
    char buf[32];
    if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
    else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.2f MB", b / 1e6);
    else if (b >= 1e3) std::snprintf(buf, sizeof buf, "%.2f kB", b / 1e3);
    else std::snprintf(buf, sizeof buf, "%.0f B", b);
    return buf;
}

void print_stats(const secureinfer::Context& ctx, const std::string& mode) {
    si_stats s{};
    secureinfer::check(si_context_stats(ctx.get(), &s));
    std::fprintf(stderr, "stats: mode %s; enclave host: %s\n", mode.c_str(), si_context_isolation(ctx.get()));
    std::fprintf(stderr, "stats: crossings %llu (enclave calls %llu, accelerator products %llu)\n",
                 (unsigned long long)s.crossings, (unsigned long long)s.enclave_calls,
                 (unsigned long long)s.accelerator_calls);
    std::fprintf(stderr, "stats: bytes host->enclave %s, enclave->host %s, host->accelerator %s, accelerator->host %s\n",
                 human_bytes(double(s.bytes_to_enclave)).c_str(), human_bytes(double(s.bytes_from_enclave)).c_str(),
                 human_bytes(double(s.bytes_to_accelerator)).c_str(),
                 human_bytes(double(s.bytes_from_accelerator)).c_str());
    std::fprintf(stderr, "stats: %-12s %10s %12s %10s\n", "domain", "time (s)", "GFLOP", "GFLOP/s");
    const struct {
        const char* name;
        double t, f;
    } rows[] = {{"enclave", s.seconds_enclave, s.flops_enclave},
                {"accelerator", s.seconds_accelerator, s.flops_accelerator},
                {"host", s.seconds_host, s.flops_host}};
    for (const auto& r : rows)
        std::fprintf(stderr, "stats: %-12s %10.4f %12.4f %10.2f\n", r.name, r.t, r.f / 1e9,
                     r.t > 0 ? r.f / 1e9 / r.t : 0.0);
    std::fprintf(stderr, "stats: load (not included above): %s into the enclave, %s to the accelerator, %.3f s\n",
                 human_bytes(double(s.load_bytes_to_enclave)).c_str(),
                 human_bytes(double(s.load_bytes_to_accelerator)).c_str(), s.load_seconds);
}

std::string read_text_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw secureinfer::Error(SI_ERR_IO, path + ": cannot open file");
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// ---- chat mode (run --chat; docs/CHAT.md) ----

std::string render_chat(const secureinfer::Model& model, const nlohmann::json& messages) {
    const std::string m = messages.dump();
    std::string text(4096, '\0');
    size_t n = 0;
    int rc = si_chat_apply_template(model.get(), m.c_str(), nullptr, 1, text.data(), text.size(), &n);
    if (rc == SI_ERR_BUFFER_TOO_SMALL) {
        text.resize(n);
        rc = si_chat_apply_template(model.get(), m.c_str(), nullptr, 1, text.data(), text.size(), &n);
    }
    secureinfer::check(rc);
    text.resize(n);
    return text;
}

std::vector<si_token> chat_tokens(const secureinfer::Model& model, const std::string& text) {
    std::vector<si_token> ids(text.size() + 2);
    size_t n = 0;
    int rc = si_chat_tokenize(model.get(), text.data(), text.size(), ids.data(), ids.size(), &n);
    if (rc == SI_ERR_BUFFER_TOO_SMALL) {
        ids.resize(n);
        rc = si_chat_tokenize(model.get(), text.data(), text.size(), ids.data(), ids.size(), &n);
    }
    secureinfer::check(rc);
    ids.resize(n);
    return ids;
}

// One conversation on one context: each turn renders the whole conversation with the model's chat template and
// evaluates only the tokens the context does not hold yet (all of them again when the rendering no longer starts
// with what it holds). Replies stream to stdout and end at the template's end-of-turn tokens (si_generate stops
// there) or at the plain format's stop text.
class ChatSession {
public:
    ChatSession(secureinfer::Model& model, secureinfer::Context& ctx, const si_sampler_params& sp, int n_predict)
        : model_(model), ctx_(ctx), sp_(sp), n_predict_(n_predict), stop_(si_chat_stop_text(model.get())) {
        messages_ = nlohmann::json::array();
    }
    void system(const std::string& text) { messages_.push_back({{"role", "system"}, {"content", text}}); }

    void user_turn(const std::string& text) {
        messages_.push_back({{"role", "user"}, {"content", text}});
        const std::vector<si_token> all = chat_tokens(model_, render_chat(model_, messages_));
        const bool prefix = held_.size() < all.size() && std::equal(held_.begin(), held_.end(), all.begin());
        if (!prefix) {
            ctx_.reset();
            held_.clear();
        }
        const std::vector<si_token> fresh(all.begin() + long(held_.size()), all.end());
        if (int(all.size()) >= ctx_.n_ctx())
            throw secureinfer::Error(SI_ERR_INVALID_ARGUMENT, "the conversation has " + std::to_string(all.size()) +
                                                                  " tokens; the context holds " + std::to_string(ctx_.n_ctx()));
        std::string reply;
        size_t printed = 0;
        bool stopped = false;
        std::vector<si_token> generated;
        const int room = ctx_.n_ctx() - int(all.size());
        ctx_.generate(fresh, std::min(n_predict_, room), sp_, [&](si_token token, std::string_view piece) {
            generated.push_back(token);
            reply.append(piece);
            size_t end = reply.size();
            if (!stop_.empty()) {
                if (const size_t at = reply.find(stop_); at != std::string::npos) {
                    end = at;
                    stopped = true;
                } else {  // hold back what may still become the stop text
                    for (size_t k = std::min(stop_.size() - 1, reply.size()); k > 0; --k)
                        if (reply.compare(reply.size() - k, k, stop_, 0, k) == 0) {
                            end = reply.size() - k;
                            break;
                        }
                }
            }
            if (end > printed) {
                std::fwrite(reply.data() + printed, 1, end - printed, stdout);
                std::fflush(stdout);
                printed = end;
            }
            if (stopped) reply.resize(end);
            return !stopped;
        });
        if (!stopped && printed < reply.size()) std::fwrite(reply.data() + printed, 1, reply.size() - printed, stdout);
        std::fputc('\n', stdout);
        std::fflush(stdout);
        // The context now holds the prompt and every reply token but the last (the end-of-turn token is never
        // evaluated; a reply cut by the token limit or the stop text leaves its last token unevaluated).
        held_ = all;
        if (!generated.empty()) held_.insert(held_.end(), generated.begin(), generated.end() - 1);
        messages_.push_back({{"role", "assistant"}, {"content", reply}});
    }

private:
    secureinfer::Model& model_;
    secureinfer::Context& ctx_;
    si_sampler_params sp_;
    int n_predict_;
    std::string stop_;
    nlohmann::json messages_;
    std::vector<si_token> held_;
};

}  // namespace

Runner add_run(CLI::App& app) {
    auto* sub = app.add_subcommand("run", "generate a continuation of a prompt (streamed to stdout; the prompt is not echoed)");
    auto o = std::make_shared<ModelOptions>();
    auto prompt = std::make_shared<std::string>();
    auto n_predict = std::make_shared<int>(128);
    auto sp = std::make_shared<si_sampler_params>(si_sampler_default_params());
    auto seed = std::make_shared<int64_t>(-1);
    auto logprobs = std::make_shared<int>(0);
    auto logprobs_noise = std::make_shared<float>(0.0f);
    auto precompute = std::make_shared<int>(0);
    auto inside_mib = std::make_shared<int>(256);
    o->add(sub);
    sub->add_option("--precompute", *precompute, "secureinfer: precompute the unblinding factors of this many decode "
                                                 "steps before generating (offline)")
        ->check(CLI::Range(0, 1 << 16));
    sub->add_option("--precompute-inside", *inside_mib, "secureinfer: keep up to this many MiB of precomputed factors "
                                                        "inside the enclave, seal the rest to host memory (default "
                                                        "256; 0 seals all, as an SGX1 EPC would want)")
        ->check(CLI::Range(0, 1024));
    sub->add_option("--logprobs", *logprobs, "print the top-K log-probabilities of every generated token to stderr "
                                             "(released by the enclave; off by default)")
        ->check(CLI::Range(0, 1 << 20));
    sub->add_option("--logprobs-noise", *logprobs_noise, "standard deviation of the Gaussian noise the enclave adds "
                                                         "to released log-probabilities (default 0)")
        ->check(CLI::Range(0.0, 1e6));
    sub->add_option("-p,--prompt", *prompt, "prompt text (default: empty, generation starts from BOS)");
    sub->add_option("-n,--n-predict", *n_predict, "number of tokens to generate")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--temp", sp->temperature, "temperature; 0 is greedy")->check(CLI::Range(0.0, 100.0));
    sub->add_option("--top-k", sp->top_k, "top-k sampling (0: off)")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--top-p", sp->top_p, "top-p sampling (1: off)")->check(CLI::Range(0.0, 1.0));
    sub->add_option("-s,--seed", *seed, "sampler seed (default: random)")->check(CLI::Range(int64_t(0), INT64_MAX));
    auto chat = std::make_shared<bool>(false);
    auto system_prompt = std::make_shared<std::string>();
    sub->add_flag("--chat", *chat, "chat with the model's chat template (docs/CHAT.md): --prompt is one user turn, "
                                   "without it each line of stdin is one; replies end at the end-of-turn token");
    sub->add_option("--system", *system_prompt, "--chat: a system message before the first turn");
    return [=]() -> int {
        o->check();
        if (!system_prompt->empty() && !*chat) throw UsageError("--system needs --chat");
        if (*logprobs > 0 && o->mode == "plain")
            throw UsageError("--logprobs needs one of the modes secureinfer, gpu-only, enclave-only");
        if (*precompute > 0 && o->mode != "secureinfer") throw UsageError("--precompute needs --mode secureinfer");
        secureinfer::Model model(o->path(), o->model_params());
        si_context_params cp = o->context_params();
        cp.logprobs = *logprobs;
        cp.logprob_noise = *logprobs_noise;
        cp.precompute_inside_mib = *inside_mib;
        std::optional<LoadProgress> loading(std::in_place);
        secureinfer::Context ctx(model, cp);
        loading.reset();
        print_warnings(ctx);
        if (*precompute > 0) {
            double secs = 0.0;
            Progress bar("precompute", *precompute, "tokens");
            secureinfer::check(si_context_precompute(
                ctx.get(), *precompute,
                [](int done, int total, void* p) { static_cast<Progress*>(p)->update(done); }, &bar, &secs));
            bar.finish();
            std::fprintf(stderr, "precompute: %d tokens of unblinding factors in %.3f s (%.1f tokens/s)\n", *precompute,
                         secs, secs > 0 ? *precompute / secs : 0.0);
        }
        si_sampler_params s = *sp;
        s.seed = *seed >= 0 ? uint64_t(*seed) : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
        if (*chat) {
            if (const std::string w = si_chat_template_warning(model.get()); !w.empty())
                std::fprintf(stderr, "secureinfer: WARNING: chat: %s\n", w.c_str());
            ChatSession session(model, ctx, s, *n_predict);
            if (!system_prompt->empty()) session.system(*system_prompt);
            if (!prompt->empty()) {
                session.user_turn(*prompt);
            } else {
                for (std::string line;;) {
                    std::fputs("> ", stderr);
                    std::fflush(stderr);
                    if (!std::getline(std::cin, line)) break;
                    if (line.empty()) continue;
                    session.user_turn(line);
                }
            }
            if (o->stats) print_stats(ctx, o->mode);
            return 0;
        }
        const auto ids = model.tokenize(*prompt, true);
        if (int(ids.size()) >= ctx.n_ctx())
            throw UsageError("prompt has " + std::to_string(ids.size()) + " tokens; the context holds " + std::to_string(ctx.n_ctx()));
        const int k = *logprobs;
        si_context* raw = ctx.get();
        ctx.generate(ids, *n_predict, s, [k, raw](si_token token, std::string_view piece) {
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            std::fflush(stdout);
            if (k > 0) {
                std::vector<si_token> top(size_t(k), 0);
                std::vector<float> lp(size_t(k), 0.0f);
                size_t n = 0;
                secureinfer::check(si_last_logprobs(raw, top.data(), lp.data(), top.size(), &n));
                std::string line = "logprobs: token " + std::to_string(token) + ":";
                char buf[48];
                for (size_t i = 0; i < n; ++i) {
                    std::snprintf(buf, sizeof buf, " %d=%.4f", top[i], double(lp[i]));
                    line += buf;
                }
                std::fprintf(stderr, "%s\n", line.c_str());
            }
            return true;
        });
        std::fputc('\n', stdout);
        std::fflush(stdout);
        if (o->stats) print_stats(ctx, o->mode);
        return 0;
    };
}

Runner add_perplexity(CLI::App& app) {
    auto* sub = app.add_subcommand("perplexity", "perplexity of a text file over consecutive windows (each starts with BOS); "
                                                  "in the secure modes the enclave returns only each window's summed "
                                                  "NLL (an evaluation feature: logits never leave it)");
    auto o = std::make_shared<ModelOptions>();
    auto file = std::make_shared<std::string>();
    auto window = std::make_shared<int>(256);
    auto max_windows = std::make_shared<int>(0);
    o->add(sub);
    sub->add_option("-f,--file", *file, "text file")->required();
    sub->add_option("--ctx", *window, "window length in tokens, BOS included")->check(CLI::Range(2, 1 << 20));
    sub->add_option("--chunks", *max_windows, "score at most this many windows (0: all)")->check(CLI::Range(0, 1 << 30));
    return [=]() -> int {
        o->check();
        secureinfer::Model model(o->path(), o->model_params());
        si_context_params cp = o->context_params();
        if (*window > si_model_n_ctx_train(model.get()))
            throw UsageError("--ctx " + std::to_string(*window) + " exceeds the model's context of " + std::to_string(si_model_n_ctx_train(model.get())));
        cp.n_ctx = *window;
        std::optional<LoadProgress> loading(std::in_place);
        secureinfer::Context ctx(model, cp);
        loading.reset();
        print_warnings(ctx);
        const bool plain = o->mode == "plain";
        std::vector<si_token> targets;
        const auto tokens = model.tokenize(read_text_file(*file), false);
        if (tokens.empty()) throw secureinfer::Error(SI_ERR_INVALID_ARGUMENT, *file + ": no tokens to score");
        const size_t per = size_t(*window - 1);
        size_t n_windows = (tokens.size() + per - 1) / per;
        if (*max_windows > 0) n_windows = std::min(n_windows, size_t(*max_windows));
        const int n_vocab = model.n_vocab();
        std::vector<float> logits;
        std::vector<si_token> batch;
        double nll = 0.0;
        size_t count = 0;
        const auto start = std::chrono::steady_clock::now();
        Progress bar("perplexity", int64_t(n_windows), "windows");
        for (size_t w = 0; w < n_windows; ++w) {
            const size_t b = w * per, e = std::min(tokens.size(), b + per);
            batch.assign(1, model.bos());
            batch.insert(batch.end(), tokens.begin() + std::ptrdiff_t(b), tokens.begin() + std::ptrdiff_t(e));
            ctx.reset();
            if (!plain) {
                // Logits never leave the enclave: it scores the window and returns only the summed NLL.
                targets.assign(batch.begin() + 1, batch.end());
                targets.push_back(-1);
                double part = 0.0;
                size_t scored = 0;
                secureinfer::check(si_eval_nll(ctx.get(), batch.data(), batch.size(), targets.data(), &part, &scored));
                nll += part;
                count += scored;
            }
            logits.resize(plain ? batch.size() * size_t(n_vocab) : 0);
            if (plain) secureinfer::check(si_eval(ctx.get(), batch.data(), batch.size(), 1, logits.data()));
            for (size_t i = 0; plain && i + 1 < batch.size(); ++i) {
                const float* l = &logits[i * size_t(n_vocab)];
                double mx = l[0];
                for (int v = 1; v < n_vocab; ++v) mx = std::max(mx, double(l[v]));
                double sum = 0.0;
                for (int v = 0; v < n_vocab; ++v) sum += std::exp(double(l[v]) - mx);
                nll += std::log(sum) + mx - double(l[batch[i + 1]]);
                ++count;
            }
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            char note[96];
            std::snprintf(note, sizeof note, "ppl %.4f  %.0f tokens/s", std::exp(nll / double(count)),
                          double(count) / std::max(secs, 1e-9));
            if (w + 1 < n_windows) bar.update(int64_t(w + 1), note);
            else bar.finish(note);
        }
        std::printf("tokens=%zu nll=%.6f ppl=%.4f\n", count, nll / double(count), std::exp(nll / double(count)));
        std::fflush(stdout);
        if (o->stats) print_stats(ctx, o->mode);
        return 0;
    };
}

Runner add_tokenize(CLI::App& app) {
    auto* sub = app.add_subcommand("tokenize", "print the token ids of a text (no BOS), space separated");
    auto model = std::make_shared<std::string>();
    auto tokenizer = std::make_shared<std::string>();
    auto prompt = std::make_shared<std::string>();
    sub->add_option("-m,--model", *model, "model file whose vocabulary to use");
    sub->add_option("--tokenizer", *tokenizer, "tokenizer file (tokenizer.bin or GGUF) instead of a model");
    sub->add_option("-p,--prompt", *prompt, "text to tokenize")->required();
    return [=]() -> int {
        if (model->empty() == tokenizer->empty()) throw UsageError("give exactly one of --model and --tokenizer");
        const si::Vocab vocab = tokenizer->empty() ? si::load_model_file(*model).vocab : si::load_vocab_file(*tokenizer);
        const si::Tokenizer tok(vocab, tokenizer->empty() ? *model : *tokenizer);
        const auto ids = tok.encode(*prompt, false);
        std::string line;
        for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
        std::printf("%s\n", line.c_str());
        return 0;
    };
}

}  // namespace si::cli
