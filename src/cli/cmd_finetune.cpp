// finetune: LoRA or full fine-tuning of a model on text files, writing a llama.cpp GGUF LoRA adapter (or, with
// --full, a GGUF model). Progress goes to stderr; the summary to stdout; the training curve optionally to a TSV log.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "cli/cli.h"
#include "cli/progress.h"
#include "common/error.h"
#include "common/tokenizer.h"
#include "formats/gguf_model.h"
#include "formats/model_file.h"
#include "train/lora.h"
#include "train/trainer.h"

namespace si::cli {

namespace {

struct FinetuneOptions {
    std::string model, tokenizer, out, log, checkpoint, resume, targets = "all", name;
    std::vector<std::string> data, eval_data;
    double eval_fraction = 0.02;
    int eval_every = 100, eval_windows = 32, checkpoint_every = 0;
    bool quiet = false;
    train::TrainOptions t;
};

std::string duration(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    const long v = long(s + 0.5);
    char buf[32];
    if (v >= 3600)
        std::snprintf(buf, sizeof buf, "%ldh%02ldm", v / 3600, v / 60 % 60);
    else
        std::snprintf(buf, sizeof buf, "%ldm%02lds", v / 60, v % 60);
    return buf;
}

}  // namespace

Runner add_finetune(CLI::App& app) {
    auto* sub = app.add_subcommand("finetune", "train a LoRA adapter (or, with --full, all weights) on text files");
    auto o = std::make_shared<FinetuneOptions>();
    train::TrainOptions& t = o->t;
    sub->add_option("-m,--model", o->model, "base model (GGUF or llama2.c checkpoint)")->required();
    sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin for llama2.c checkpoints (default: beside the model)");
    sub->add_option("--data", o->data, "training text files")->required()->expected(1, -1);
    sub->add_option("--eval-data", o->eval_data, "extra held-out text files for the evaluation loss")->expected(1, -1);
    sub->add_option("--eval-fraction", o->eval_fraction, "fraction of each training file's tokens (its end) held out for evaluation")
        ->check(CLI::Range(0.0, 0.5));
    sub->add_option("-o,--output", o->out, "output: GGUF LoRA adapter, or GGUF model with --full")->required();
    sub->add_flag("--full", t.full, "full fine-tuning of every weight instead of LoRA");
    auto* rank = sub->add_option("--lora-rank", t.lora_rank, "LoRA rank")->check(CLI::Range(1, 4096));
    auto* alpha = sub->add_option("--lora-alpha", t.lora_alpha, "LoRA alpha: the update is B A * alpha / rank (default 2 * rank)")
                      ->check(CLI::Range(0.0, 1e6));
    auto* targets = sub->add_option("--lora-targets", o->targets, "projections to adapt: subset of q,k,v,o,w1,w2,w3, or all");
    sub->add_option("--steps", t.steps, "optimiser steps")->check(CLI::Range(1, 10000000));
    sub->add_option("--lr", t.lr, "peak learning rate")->check(CLI::Range(1e-9, 10.0));
    sub->add_option("--batch", t.batch, "windows per step")->check(CLI::Range(1, 4096));
    sub->add_option("--ctx", t.ctx, "window length in tokens, BOS included")->check(CLI::Range(2, 1 << 20));
    sub->add_option("--warmup", t.warmup, "linear warm-up steps")->check(CLI::Range(0, 10000000));
    sub->add_option("--min-lr-ratio", t.min_lr_ratio, "cosine decay ends at lr * this")->check(CLI::Range(0.0, 1.0));
    sub->add_option("--weight-decay", t.weight_decay, "AdamW decoupled weight decay (matrices only)")->check(CLI::Range(0.0, 10.0));
    sub->add_option("--grad-clip", t.grad_clip, "clip the global gradient norm (0: off)")->check(CLI::Range(0.0, 1e6));
    sub->add_option("--seed", t.seed, "seed for window sampling and LoRA initialisation");
    sub->add_option("-t,--threads", t.threads, "worker threads (0: all CPUs)")->check(CLI::Range(0, 1024));
    sub->add_option("--eval-every", o->eval_every, "evaluate every N steps (0: only before and after training)")->check(CLI::Range(0, 10000000));
    sub->add_option("--eval-windows", o->eval_windows, "held-out windows per evaluation (0: all)")->check(CLI::Range(0, 1 << 30));
    sub->add_option("--checkpoint", o->checkpoint, "checkpoint file to write every --checkpoint-every steps");
    sub->add_option("--checkpoint-every", o->checkpoint_every, "steps between checkpoints")->check(CLI::Range(0, 10000000));
    sub->add_option("--resume", o->resume, "continue from this checkpoint (same options and data)");
    sub->add_option("--log", o->log, "write the training curve (TSV: step, lr, train loss, eval loss, ...) to this file");
    sub->add_option("--name", o->name, "general.name of the output (default: the output file's stem)");
    sub->add_flag("-q,--quiet", o->quiet, "no progress bar");

    return [=]() -> int {
        train::TrainOptions opt = o->t;
        if (opt.full && (rank->count() || alpha->count() || targets->count()))
            throw UsageError("--full trains every weight; --lora-rank, --lora-alpha and --lora-targets do not apply");
        if (!alpha->count()) opt.lora_alpha = 2.0f * float(opt.lora_rank);
        try {
            opt.lora_targets = train::parse_proj_list(o->targets);
        } catch (const si::Error& e) {
            throw UsageError(std::string("--lora-targets: ") + e.what());
        }
        if (o->checkpoint_every > 0 && o->checkpoint.empty()) throw UsageError("--checkpoint-every needs --checkpoint FILE");
        if (!o->checkpoint.empty() && o->checkpoint_every == 0) throw UsageError("--checkpoint needs --checkpoint-every N");
        if (o->eval_fraction == 0.0 && o->eval_data.empty())
            throw UsageError("no evaluation text: give --eval-data or a non-zero --eval-fraction");

        const ModelFile mf = load_model_file(o->model, o->tokenizer);
        if (opt.ctx > mf.weights.cfg.seq_len)
            throw UsageError("--ctx " + std::to_string(opt.ctx) + " exceeds the model's context of " + std::to_string(mf.weights.cfg.seq_len));
        if (!opt.full && opt.lora_rank > mf.weights.cfg.dim)
            throw UsageError("--lora-rank " + std::to_string(opt.lora_rank) + " exceeds the model width " + std::to_string(mf.weights.cfg.dim));
        const Tokenizer tok(mf.vocab, mf.vocab_path);
        train::TextCorpus corpus = train::load_corpus(tok, o->data, o->eval_data, o->eval_fraction);
        const size_t train_tokens = corpus.train_tokens(), eval_tokens = corpus.eval_tokens();
        train::Trainer tr(mf.weights, opt, std::move(corpus));
        if (tr.eval_windows_available() == 0)
            throw UsageError("the held-out text (" + std::to_string(eval_tokens) + " tokens) is shorter than one window of " +
                             std::to_string(opt.ctx) + " tokens");
        if (!o->resume.empty()) tr.load_checkpoint(o->resume);

        // A bar on a terminal; otherwise a line at every evaluation; nothing with --quiet or --no-progress.
        const ProgressStyle style = o->quiet ? ProgressStyle::quiet : progress_style();
        char mode[160];
        if (opt.full)
            std::snprintf(mode, sizeof mode, "full fine-tuning");
        else
            std::snprintf(mode, sizeof mode, "LoRA rank %d alpha %g on %s", opt.lora_rank, double(opt.lora_alpha),
                          train::proj_list_string(opt.lora_targets).c_str());
        const std::string resuming = tr.step() > 0 ? ", resuming at step " + std::to_string(tr.step()) : "";
        std::fprintf(stderr, "finetune: %s, %zu trainable parameters; %zu training tokens, %zu held out; %d steps x %d windows x %d tokens%s\n",
                     mode, tr.n_trainable(), train_tokens, eval_tokens, opt.steps, opt.batch, opt.ctx, resuming.c_str());

        std::FILE* log = nullptr;
        if (!o->log.empty()) {
            const bool append = !o->resume.empty() && std::filesystem::exists(o->log);
            log = std::fopen(o->log.c_str(), append ? "a" : "w");
            if (!log) throw si::Error(Status::io, o->log + ": cannot open for writing");
            if (!append) std::fprintf(log, "step\tlr\ttrain_loss\teval_loss\teval_ppl\tgrad_norm\ttokens_per_s\telapsed_s\n");
        }
        const auto start = std::chrono::steady_clock::now();
        auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
        double eval_loss = NAN, train_sum = 0.0, last_lr = 0.0, last_norm = 0.0, last_loss = NAN;
        int train_n = 0;
        int64_t tokens_done = 0;

        auto num = [](double v) {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.4f", v);
            return std::isfinite(v) ? std::string(buf) : std::string("-");
        };
        auto record = [&](int step) {
            eval_loss = tr.evaluate(o->eval_windows);
            const double tl = train_n > 0 ? train_sum / train_n : NAN;
            const double tps = elapsed() > 0 ? double(tokens_done) / elapsed() : 0.0;
            if (log) {
                std::fprintf(log, "%d\t%.6g\t%.4f\t%.4f\t%.3f\t%.4f\t%.0f\t%.1f\n", step, last_lr, tl, eval_loss,
                             std::exp(eval_loss), last_norm, tps, elapsed());
                std::fflush(log);
            }
            if (style == ProgressStyle::lines)
                std::fprintf(stderr, "step %d/%d  train loss %s  eval loss %.4f (ppl %.2f)  %.0f tok/s  %s elapsed\n", step,
                             opt.steps, num(tl).c_str(), eval_loss, std::exp(eval_loss), tps, duration(elapsed()).c_str());
            train_sum = 0.0;
            train_n = 0;
        };
        Progress bar("finetune", opt.steps, "steps", style == ProgressStyle::bar ? style : ProgressStyle::quiet);
        auto progress = [&] {
            const double secs = elapsed();
            char note[96];
            std::snprintf(note, sizeof note, "loss %s  eval %s  %.0f tok/s", num(last_loss).c_str(),
                          num(eval_loss).c_str(), secs > 0 ? double(tokens_done) / secs : 0.0);
            if (tr.done()) bar.finish(note);
            else bar.update(tr.step(), note);
        };

        if (tr.step() == 0) record(0);
        progress();
        while (!tr.done()) {
            const train::StepStats st = tr.train_step();
            tokens_done += st.tokens;
            last_loss = st.loss;
            last_lr = st.lr;
            last_norm = st.grad_norm;
            train_sum += st.loss;
            ++train_n;
            if (tr.done() || (o->eval_every > 0 && st.step % o->eval_every == 0)) record(st.step);
            if (o->checkpoint_every > 0 && st.step % o->checkpoint_every == 0 && !tr.done()) tr.save_checkpoint(o->checkpoint);
            progress();
        }
        if (log) std::fclose(log);

        const std::string name = o->name.empty() ? std::filesystem::path(o->out).stem().string() : o->name;
        if (opt.full) {
            for (const auto& note : write_gguf_model(o->out, tr.weights(), mf.vocab, GgufWeightType::f32, name))
                std::fprintf(stderr, "note: %s\n", note.c_str());
        } else {
            train::write_lora_adapter(o->out, tr.adapter(name), mf.weights.cfg);
        }
        std::printf("wrote %s: %s after %d steps; held-out loss %.4f (ppl %.2f); %.1f s, %.0f tokens/s\n", o->out.c_str(),
                    opt.full ? "full model" : "LoRA adapter", tr.step(), eval_loss, std::exp(eval_loss), elapsed(),
                    double(tokens_done) / std::max(elapsed(), 1e-9));
        return 0;
    };
}

}  // namespace si::cli
