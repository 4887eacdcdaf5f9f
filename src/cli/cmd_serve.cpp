// secureinfer serve: the OpenAI-compatible HTTP server (src/server) for one model.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <thread>

#include "cli/cli.h"
#include "cli/progress.h"
#include "secureinfer.hpp"
#include "server/server.h"

namespace si::cli {

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

struct ServeOptions {
    std::string model, tokenizer, lora;
    std::string package, keyserver, key_file, sealed_key;  // protected packages (docs/PACKAGES.md)
    std::string backend = "cpu";
    float lora_scale = 1.0f;
    int threads = 0, ctx = 0, batch = 512, spin_us = 0;
    std::string mode = "secureinfer", enclave_host = "auto", secret;
    bool insecure = false, insecure_memory = false;
    int logprobs = 0;
    float logprobs_noise = 0.0f;
    si::server::Options http;
};

}  // namespace

Runner add_serve(CLI::App& app) {
    auto* sub = app.add_subcommand("serve", "serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                                            "/v1/chat/completions, /v1/models, /health)");
    auto o = std::make_shared<ServeOptions>();
    auto* m = sub->add_option("-m,--model", o->model, "model file (GGUF or llama2.c checkpoint)");
    sub->add_option("--package", o->package, "protected model package (secureinfer pack): public tensors loaded "
                                             "here, secret ones opened only inside the enclave")
        ->excludes(m);
    sub->add_option("--keyserver", o->keyserver, "package: obtain the model key from this keyserver after "
                                                 "attestation, e.g. http://127.0.0.1:8377");
    sub->add_option("--key-file", o->key_file, "package: the owner key itself (development only)");
    sub->add_option("--sealed-key", o->sealed_key, "package: unseal the model key from this file if it exists; "
                                                   "after a key release, seal it here");
    sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin for llama2.c checkpoints (default: tok<vocab>.bin or "
                                                  "tokenizer.bin beside the model)");
    auto* l = sub->add_option("--lora", o->lora, "LoRA adapter (llama.cpp GGUF adapter), kept inside the enclave");
    sub->add_option("--lora-scale", o->lora_scale, "adapter scale")->check(CLI::Range(-1e6, 1e6))->needs(l);
    sub->add_option("-t,--threads", o->threads, "worker threads per context (0: all CPUs)")->check(CLI::Range(0, 1024));
    sub->add_option("-c,--ctx-size", o->ctx, "context length of every request (0: the model's)")
        ->check(CLI::Range(0, 1 << 20));
    sub->add_option("-b,--batch-size", o->batch, "prompt tokens per forward pass")->check(CLI::Range(1, 1 << 16));
    sub->add_option("--mode", o->mode, "partition preset: secureinfer, gpu-only, enclave-only, plain (see 'run')")
        ->check(CLI::IsMember({"secureinfer", "gpu-only", "enclave-only", "plain"}));
    sub->add_option("--enclave-host", o->enclave_host, "where the trusted core runs: worker, inprocess (tests only), "
                                                       "auto (the option 'run' calls --host)")
        ->check(CLI::IsMember({"auto", "worker", "inprocess"}));
    sub->add_option("--backend", o->backend, "accelerator backend of the presets: cpu, cuda")
        ->check(CLI::IsMember({"cpu", "cuda"}));
    sub->add_option("--spin-us", o->spin_us, "worker host: busy-wait this many microseconds on each doorbell before "
                                             "sleeping (see 'run')")
        ->check(CLI::Range(0, 1000000));
    sub->add_flag("--insecure", o->insecure, "gpu-only: serve a model with secret tensors anyway (benchmarking only)");
    sub->add_flag("--insecure-memory", o->insecure_memory,
                  "worker host: start even when neither memfd_secret nor mlock is available (secrets in ordinary, "
                  "swappable memory; the measured configuration says memory=unlocked)");
    sub->add_option("--secret", o->secret, "comma-separated tensor names to treat as secret ('*': every tensor)");
    sub->add_option("--logprobs", o->logprobs, "let the enclave release the top-K log-probabilities of every sampled "
                                               "token, so requests may ask for up to K (default 0: refused)")
        ->check(CLI::Range(0, 20));
    sub->add_option("--logprobs-noise", o->logprobs_noise, "standard deviation of the Gaussian noise added to "
                                                           "released log-probabilities")
        ->check(CLI::Range(0.0, 1e6));
    sub->add_option("--host", o->http.host, "address to listen on (default 127.0.0.1)");
    sub->add_option("--port", o->http.port, "port to listen on (0: any free port; the chosen one is printed)")
        ->check(CLI::Range(0, 65535));
    sub->add_option("--alias", o->http.model_id, "model name in the API (default: the model file's name without "
                                                 "extension)");
    sub->add_option("--parallel", o->http.parallel, "requests generated at the same time: sequence slots of one session "
                                                    "(one copy of the weights), advanced together in one batched step "
                                                    "per token (default 1)")
        ->check(CLI::Range(1, 1024));
    sub->add_option("--max-queue", o->http.max_queue, "requests allowed to wait for a slot; more get 503 "
                                                      "(default 64)")
        ->check(CLI::Range(0, 4096));
    sub->add_option("--max-body", o->http.max_body, "largest request body in bytes; larger get 413 (default 1 MiB)")
        ->check(CLI::Range(size_t(64), size_t(1) << 30));
    sub->add_option("--max-tokens", o->http.max_tokens, "largest max_tokens a request may ask for (default 2048)")
        ->check(CLI::Range(1, 1 << 20));
    sub->add_option("--http-threads", o->http.http_threads, "connection threads (0: parallel + max-queue, at least 8)")
        ->check(CLI::Range(0, 4096));
    sub->add_option("--precompute", o->http.precompute, "secureinfer: keep unblinding factors precomputed for this many "
                                                        "decode steps of every slot, topped up while no request runs "
                                                        "and, under load, before a step they cannot cover (default 0: "
                                                        "every row unblinds online)")
        ->check(CLI::Range(0, 1 << 16));
    sub->add_flag("-v,--verbose", o->http.verbose, "log every request on stderr");
    return [=]() -> int {
        if (o->model.empty() == o->package.empty()) throw UsageError("give one of --model and --package");
        if (o->package.empty() && (!o->keyserver.empty() || !o->key_file.empty() || !o->sealed_key.empty()))
            throw UsageError("--keyserver, --key-file and --sealed-key apply to --package only");
        if (!o->package.empty() && !o->lora.empty())
            throw UsageError("--lora cannot be added to a --package (the package carries its own adapters)");
        if (o->mode == "plain" && o->backend != "cpu") throw UsageError("--backend needs one of the modes secureinfer, "
                                                                        "gpu-only, enclave-only");
        const std::string& path = o->package.empty() ? o->model : o->package;
        if (o->http.precompute > 0 && o->mode != "secureinfer")
            throw UsageError("--precompute needs --mode secureinfer");
        if (o->logprobs > 0 && o->mode == "plain")
            throw UsageError("--logprobs needs one of the modes secureinfer, gpu-only, enclave-only");
        if (o->insecure && o->mode != "gpu-only") throw UsageError("--insecure applies to --mode gpu-only only");
        si_model_params mp = si_model_default_params();
        mp.tokenizer_path = o->tokenizer.empty() ? nullptr : o->tokenizer.c_str();
        mp.lora_path = o->lora.empty() ? nullptr : o->lora.c_str();
        mp.lora_scale = o->lora_scale;
        secureinfer::Model model(path, mp);

        si_context_params cp = si_context_default_params();
        cp.n_threads = o->threads;
        cp.n_ctx = o->ctx;
        cp.n_batch = o->batch;
        cp.mode = o->mode == "plain"          ? SI_MODE_PLAIN
                  : o->mode == "gpu-only"     ? SI_MODE_GPU_ONLY
                  : o->mode == "enclave-only" ? SI_MODE_ENCLAVE_ONLY
                                              : SI_MODE_SECUREINFER;
        cp.enclave_host = o->enclave_host == "worker"      ? SI_HOST_WORKER
                          : o->enclave_host == "inprocess" ? SI_HOST_INPROCESS
                                                           : SI_HOST_AUTO;
        cp.insecure = o->insecure ? 1 : 0;
        cp.insecure_memory = o->insecure_memory ? 1 : 0;
        cp.secret_tensors = o->secret.empty() ? nullptr : o->secret.c_str();
        cp.logprob_noise = o->logprobs_noise;
        cp.accelerator = o->backend.c_str();
        cp.worker_spin_us = o->spin_us;
        cp.keyserver_url = o->keyserver.empty() ? nullptr : o->keyserver.c_str();
        cp.owner_key_file = o->key_file.empty() ? nullptr : o->key_file.c_str();
        cp.sealed_key_path = o->sealed_key.empty() ? nullptr : o->sealed_key.c_str();

        si::server::Options http = o->http;
        http.logprobs = o->logprobs;
        http.mode_name = o->mode;
        if (http.model_id.empty()) http.model_id = std::filesystem::path(path).stem().string();

        std::optional<LoadProgress> loading(std::in_place);
        si::server::Server server(model.get(), cp, http);
        loading.reset();
        const std::string w = server.warnings();
        for (size_t b = 0; b < w.size();) {
            const size_t e = std::min(w.find('\n', b), w.size());
            std::fprintf(stderr, "secureinfer: WARNING: %s\n", w.substr(b, e - b).c_str());
            b = e + 1;
        }
        const int port = server.bind();

        // SIGTERM / SIGINT: stop accepting, refuse the queued requests, let the running ones finish, exit 0. The
        // handler only sets a flag; a thread turns it into Server::stop(). A client that goes away mid-response
        // must not kill the server with SIGPIPE.
        struct sigaction sa {};
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, nullptr);
        sigaction(SIGINT, &sa, nullptr);
        std::signal(SIGPIPE, SIG_IGN);
        std::atomic<bool> done{false};
        std::thread watcher([&] {
            while (!done && !g_stop_signal) std::this_thread::sleep_for(std::chrono::milliseconds(50));
            if (g_stop_signal) {
                std::fprintf(stderr, "serve: signal %d: finishing the running requests, then exiting\n",
                             int(g_stop_signal));
                // The HTTP layer ignores a stop that comes before it has started listening.
                while (!done && !server.running()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
                server.stop();
            }
        });

        const std::string pre =
            http.precompute > 0 ? ", " + std::to_string(http.precompute) + " decode steps precomputed per slot" : "";
        std::fprintf(stderr, "serve: model '%s', mode %s, context %d, %d parallel%s; listening on http://%s:%d\n",
                     http.model_id.c_str(), http.mode_name.c_str(), server.n_ctx(), http.parallel, pre.c_str(),
                     http.host.c_str(), port);
        std::fflush(stderr);
        server.run();
        done = true;
        watcher.join();
        std::fprintf(stderr, "serve: stopped\n");
        return 0;
    };
}

}  // namespace si::cli
