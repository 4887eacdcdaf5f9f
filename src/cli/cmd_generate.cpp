// Commands that run the model: run (generation), perplexity, tokenize.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "cli/cli.h"
#include "common/tokenizer.h"
#include "formats/model_file.h"
#include "secureinfer.hpp"

namespace si::cli {

namespace {

struct ModelOptions {
    std::string model, tokenizer, weights = "f32";
    int threads = 0, ctx = 0, batch = 512;

    void add(CLI::App* sub, bool require_model = true) {
        auto* m = sub->add_option("-m,--model", model, "model file (GGUF or llama2.c checkpoint)");
        if (require_model) m->required();
        sub->add_option("--tokenizer", tokenizer, "tokenizer.bin for llama2.c checkpoints (default: tok<vocab>.bin or tokenizer.bin beside the model)");
        sub->add_option("-t,--threads", threads, "worker threads (0: all CPUs)")->check(CLI::Range(0, 1024));
        sub->add_option("-c,--ctx-size", ctx, "context length (0: the model's)")->check(CLI::Range(0, 1 << 20));
        sub->add_option("-b,--batch-size", batch, "prompt tokens per forward pass")->check(CLI::Range(1, 1 << 16));
        sub->add_option("--weights", weights, "weight format of the plaintext engine")->check(CLI::IsMember({"f32", "int8"}));
    }
    si_model_params model_params() const {
        si_model_params p = si_model_default_params();
        p.tokenizer_path = tokenizer.empty() ? nullptr : tokenizer.c_str();
        return p;
    }
    si_context_params context_params() const {
        si_context_params p = si_context_default_params();
        p.n_threads = threads;
        p.n_ctx = ctx;
        p.n_batch = batch;
        p.weight_format = weights == "int8" ? SI_WEIGHTS_INT8 : SI_WEIGHTS_F32;
        return p;
    }
};

std::string read_text_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw secureinfer::Error(SI_ERR_IO, path + ": cannot open file");
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

}  // namespace

Runner add_run(CLI::App& app) {
    auto* sub = app.add_subcommand("run", "generate a continuation of a prompt (streamed to stdout; the prompt is not echoed)");
    auto o = std::make_shared<ModelOptions>();
    auto prompt = std::make_shared<std::string>();
    auto n_predict = std::make_shared<int>(128);
    auto sp = std::make_shared<si_sampler_params>(si_sampler_default_params());
    auto seed = std::make_shared<int64_t>(-1);
    o->add(sub);
    sub->add_option("-p,--prompt", *prompt, "prompt text (default: empty, generation starts from BOS)");
    sub->add_option("-n,--n-predict", *n_predict, "number of tokens to generate")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--temp", sp->temperature, "temperature; 0 is greedy")->check(CLI::Range(0.0, 100.0));
    sub->add_option("--top-k", sp->top_k, "top-k sampling (0: off)")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--top-p", sp->top_p, "top-p sampling (1: off)")->check(CLI::Range(0.0, 1.0));
    sub->add_option("-s,--seed", *seed, "sampler seed (default: random)")->check(CLI::Range(int64_t(0), INT64_MAX));
    return [=]() -> int {
        secureinfer::Model model(o->model, o->model_params());
        secureinfer::Context ctx(model, o->context_params());
        si_sampler_params s = *sp;
        s.seed = *seed >= 0 ? uint64_t(*seed) : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
        const auto ids = model.tokenize(*prompt, true);
        if (int(ids.size()) >= ctx.n_ctx())
            throw UsageError("prompt has " + std::to_string(ids.size()) + " tokens; the context holds " + std::to_string(ctx.n_ctx()));
        ctx.generate(ids, *n_predict, s, [](si_token, std::string_view piece) {
            std::fwrite(piece.data(), 1, piece.size(), stdout);
            std::fflush(stdout);
            return true;
        });
        std::fputc('\n', stdout);
        return 0;
    };
}

Runner add_perplexity(CLI::App& app) {
    auto* sub = app.add_subcommand("perplexity", "perplexity of a text file over consecutive windows (each starts with BOS)");
    auto o = std::make_shared<ModelOptions>();
    auto file = std::make_shared<std::string>();
    auto window = std::make_shared<int>(256);
    auto max_windows = std::make_shared<int>(0);
    o->add(sub);
    sub->add_option("-f,--file", *file, "text file")->required();
    sub->add_option("--ctx", *window, "window length in tokens, BOS included")->check(CLI::Range(2, 1 << 20));
    sub->add_option("--chunks", *max_windows, "score at most this many windows (0: all)")->check(CLI::Range(0, 1 << 30));
    return [=]() -> int {
        secureinfer::Model model(o->model, o->model_params());
        si_context_params cp = o->context_params();
        if (*window > si_model_n_ctx_train(model.get()))
            throw UsageError("--ctx " + std::to_string(*window) + " exceeds the model's context of " + std::to_string(si_model_n_ctx_train(model.get())));
        cp.n_ctx = *window;
        secureinfer::Context ctx(model, cp);
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
        for (size_t w = 0; w < n_windows; ++w) {
            const size_t b = w * per, e = std::min(tokens.size(), b + per);
            batch.assign(1, model.bos());
            batch.insert(batch.end(), tokens.begin() + std::ptrdiff_t(b), tokens.begin() + std::ptrdiff_t(e));
            logits.resize(batch.size() * size_t(n_vocab));
            ctx.reset();
            secureinfer::check(si_eval(ctx.get(), batch.data(), batch.size(), 1, logits.data()));
            for (size_t i = 0; i + 1 < batch.size(); ++i) {
                const float* l = &logits[i * size_t(n_vocab)];
                double mx = l[0];
                for (int v = 1; v < n_vocab; ++v) mx = std::max(mx, double(l[v]));
                double sum = 0.0;
                for (int v = 0; v < n_vocab; ++v) sum += std::exp(double(l[v]) - mx);
                nll += std::log(sum) + mx - double(l[batch[i + 1]]);
                ++count;
            }
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            std::fprintf(stderr, "\rperplexity: window %zu/%zu  ppl %.4f  %.0f tokens/s ", w + 1, n_windows,
                         std::exp(nll / double(count)), double(count) / std::max(secs, 1e-9));
        }
        std::fprintf(stderr, "\n");
        std::printf("tokens=%zu nll=%.6f ppl=%.4f\n", count, nll / double(count), std::exp(nll / double(count)));
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
