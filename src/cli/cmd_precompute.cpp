// precompute: offline unblinding factors of the secureinfer preset (DESIGN.md section 5). Loads a model (a file,
// or random weights of a named shape), has the trusted core precompute W r for the next N decode steps of every
// offloaded stage (kept inside up to --precompute-inside MiB, sealed beyond), and reports the throughput in tokens
// of unblinding factors per second.
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "cli/cli.h"
#include "cli/progress.h"

#include "common/error.h"
#include "common/threadpool.h"
#include "engine/random_model.h"
#include "formats/model_file.h"
#include "host/secure_session.h"

namespace si::cli {

Runner add_precompute(CLI::App& app) {
    auto* sub = app.add_subcommand("precompute", "precompute unblinding factors (secureinfer, offline) and measure "
                                                 "their throughput in tokens/s");
    struct Opts {
        std::string model, tokenizer, shape = "stories110m", host = "worker";
        int n_tokens = 128, threads = 0, ctx = 0, inside_mib = 256;
    };
    auto o = std::make_shared<Opts>();
    sub->add_option("-m,--model", o->model, "model file (default: a random-weight model of --shape)");
    sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin for llama2.c checkpoints");
    sub->add_option("--shape", o->shape, "random-weight model shape: stories260k, stories15m, stories110m, tinyllama, llama2-7b, "
                                         "llama3-8b");
    sub->add_option("-n,--n-tokens", o->n_tokens, "decode steps to precompute")->check(CLI::Range(1, 1 << 16));
    sub->add_option("-t,--threads", o->threads, "host threads (0: all CPUs)")->check(CLI::Range(0, 1024));
    sub->add_option("-c,--ctx-size", o->ctx, "context length (0: the model's)")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--host", o->host, "where the trusted core runs")->check(CLI::IsMember({"worker", "inprocess"}));
    sub->add_option("--precompute-inside", o->inside_mib, "MiB of factors kept inside the enclave, the rest sealed to "
                                                          "host memory (default 256; 0 seals all)")
        ->check(CLI::Range(0, 1024));
    return [o]() -> int {
        ModelFile mf;
        std::shared_ptr<const TensorSource> src;  // the model tensor by tensor (bounded memory)
        std::string name;
        if (!o->model.empty()) {
            mf = load_model_file(o->model, o->tokenizer, LoadWeights::lazy);
            src = source_for(mf);
            name = o->model;
        } else {
            src = std::make_shared<RandomSource>(shape_preset(o->shape), 1234);
            name = o->shape + " (random weights)";
        }
        SecureSessionParams sp;
        sp.mode = SecureMode::secureinfer;
        sp.n_ctx = o->ctx;
        sp.n_threads = o->threads;
        sp.host = o->host == "inprocess" ? EnclaveHostKind::inprocess : EnclaveHostKind::worker;
        sp.precompute_inside_bytes = int64_t(o->inside_mib) << 20;
        Progress loading("loading", 0, "layers");
        loading.set_delay(0.5);
        sp.load_progress = [&](int done, int total) {
            loading.set_total(total);
            loading.update(done);
        };
        SecureSession s(*src, sp);
        loading.finish();
        for (const auto& warn : s.warnings()) std::fprintf(stderr, "secureinfer: WARNING: %s\n", warn.c_str());
        const ModelConfig c = src->config();
        std::fprintf(stderr, "precompute: %s, dim %d, %d layers, hidden %d; enclave host: %s\n", name.c_str(), c.dim,
                     c.n_layers, c.hidden_dim, s.isolation().c_str());
        Progress bar("precompute", o->n_tokens, "tokens");
        s.precompute(o->n_tokens, [&](int done, int) { bar.update(done); });
        bar.finish();
        const SessionStats& st = s.stats();
        const double secs = st.offline.seconds;
        std::printf("precompute: %d tokens of unblinding factors in %.3f s: %.2f tokens/s (%.3f ms/token, %.2f GFLOP "
                    "in the enclave)\n",
                    o->n_tokens, secs, secs > 0 ? o->n_tokens / secs : 0.0, secs * 1e3 / o->n_tokens,
                    st.offline.flops / 1e9);
        std::printf("precompute: %.1f MiB kept inside the enclave, %.1f MiB sealed to host memory\n",
                    double(s.kept_factor_bytes()) / (1 << 20), double(s.sealed_factor_bytes()) / (1 << 20));
        return 0;
    };
}

}  // namespace si::cli
