// Fine-tuning of a LLaMA model on plain text: LoRA (base frozen, A/B factors on chosen projections) or full
// fine-tuning (every tensor), AdamW with warm-up and cosine decay, global gradient-norm clipping, a held-out
// evaluation loss, and checkpoints from which a resumed run continues bit-identically.
//
// Parallelism is one window per work item: each worker thread runs its own single-threaded forward/backward pass
// over whole windows, writing each window's gradient to its own buffer, and the buffers are summed in window order.
// One synchronisation per step keeps a shared, loaded machine from stalling the pool at every matrix product.
//
// Determinism: the training windows of step s are a pure function of (seed, s), the LoRA initialisation a pure
// function of the seed, each window's gradient is computed by one thread alone, and the sum over windows has a fixed
// order. A run is therefore reproducible bit for bit for a given seed, data and options, with any number of threads
// on the same build.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/threadpool.h"
#include "common/tokenizer.h"
#include "train/lora.h"
#include "train/params.h"
#include "train/transformer.h"

namespace si::train {

struct TrainOptions {
    bool full = false;                  // full fine-tuning instead of LoRA
    int lora_rank = 8;
    float lora_alpha = 16.0f;           // training uses B A * alpha / rank
    std::vector<Proj> lora_targets{std::begin(kAllProj), std::end(kAllProj)};
    int steps = 1000;
    int batch = 8;                      // windows per optimiser step
    int ctx = 256;                      // window length in tokens, BOS included
    float lr = 2e-3f;                   // peak learning rate
    float min_lr_ratio = 0.1f;          // cosine decay ends at lr * min_lr_ratio
    int warmup = 20;                    // linear warm-up steps
    float weight_decay = 0.0f;          // decoupled (AdamW); matrices and LoRA factors only, never norm gains
    float beta1 = 0.9f, beta2 = 0.999f, adam_eps = 1e-8f;
    float grad_clip = 1.0f;             // clip the global gradient norm to this (0: off)
    uint64_t seed = 1;
    int threads = 0;                    // 0: all CPUs

    // Throws si::Error(invalid_argument) naming the first bad option.
    void validate(const ModelConfig& cfg) const;
};

// Token streams for training and evaluation.
struct TextCorpus {
    std::vector<std::vector<int32_t>> train;  // one stream per training file, held-out tail removed
    std::vector<std::vector<int32_t>> eval;   // held-out tails, then any separate evaluation files
    int32_t bos = 1;
    size_t train_tokens() const;
    size_t eval_tokens() const;
};

// Tokenizes every file (no BOS). The last eval_fraction of each training file's tokens is held out for evaluation
// (never trained on); eval_files are added to the evaluation set whole. Throws si::Error naming the file when it
// cannot be read or yields too few tokens.
TextCorpus load_corpus(const Tokenizer& tok, const std::vector<std::string>& train_files,
                       const std::vector<std::string>& eval_files, double eval_fraction);

// The learning rate at step `step` (0-based): linear warm-up to lr, then cosine decay to lr * min_lr_ratio.
double learning_rate(const TrainOptions& o, int step);

struct StepStats {
    int step = 0;          // steps completed after this one
    double loss = 0.0;     // mean training loss of the step's batch (nats/token)
    double lr = 0.0;
    double grad_norm = 0.0;  // before clipping
    int64_t tokens = 0;      // tokens scored in the step
};

class Trainer {
public:
    Trainer(const ModelWeights& base, const TrainOptions& options, TextCorpus corpus);
    ~Trainer();

    const TrainOptions& options() const { return opt_; }
    const ModelConfig& config() const { return cfg_; }
    int step() const { return step_; }
    bool done() const { return step_ >= opt_.steps; }
    size_t n_trainable() const { return params_.size(); }
    int64_t tokens_per_step() const { return int64_t(opt_.batch) * opt_.ctx; }

    // One optimiser step on the windows of step(), then step() advances.
    StepStats train_step();
    // Mean loss (nats/token) over up to max_windows evenly spaced held-out windows of ctx tokens (0: all).
    double evaluate(int max_windows);
    size_t eval_windows_available() const;

    // Everything a resumed run needs (parameters, AdamW moments, step) plus the options, base model and data
    // fingerprints it must match. A GGUF file (general.type = "secureinfer.checkpoint"), written atomically.
    void save_checkpoint(const std::string& path) const;
    // Restores a checkpoint; throws si::Error naming the file and the first mismatch when it belongs to another
    // configuration, base model or data set.
    void load_checkpoint(const std::string& path);

    // LoRA mode: the trained adapter (alpha as configured).
    LoraAdapter adapter(const std::string& name) const;
    // Full mode: the trained model; LoRA mode: the base with the adapter merged at scale 1.
    ModelWeights weights() const;

    // Raw trainable parameters and their layout (LoRA factors or all model tensors).
    const std::vector<float>& parameters() const { return params_; }
    const ParamLayout& layout() const { return layout_; }

    // Where training window `index` of step `step` starts: the training stream and the token offset in it (the
    // window is ctx tokens from there). A pure function of (seed, step, index) and the data; the security
    // evaluation uses it to tell the windows an adapter was trained on (membership inference, A7).
    struct WindowOrigin {
        size_t stream = 0;
        uint64_t offset = 0;
    };
    WindowOrigin window_origin(int step, int index) const;

private:
    void sample_window(int step, int index, int32_t* tokens, int32_t* targets) const;
    ModelRef<const float> weight_view() const;
    ModelRef<float> grad_view(std::vector<float>& g) const;
    float lora_scale() const;  // alpha / rank (1 when alpha is 0), as llama.cpp applies the adapter at scale 1
    uint64_t base_hash(const std::vector<float>& packed) const;
    uint64_t data_hash() const;

    ModelConfig cfg_;
    TrainOptions opt_;
    TextCorpus corpus_;
    std::unique_ptr<ThreadPool> pool_;
    std::vector<std::unique_ptr<ThreadPool>> inline_pools_;  // size-1 pools: each network runs on its caller
    std::vector<std::unique_ptr<Transformer<float>>> nets_;  // one per worker thread
    std::vector<std::vector<float>> window_grads_;           // [batch][parameters]
    ParamLayout base_layout_, layout_;
    std::vector<float> base_;     // frozen base tensors (LoRA mode)
    std::vector<float> params_, grads_, adam_m_, adam_v_;
    std::vector<uint64_t> start_offsets_;  // cumulative number of window starts per training stream
    uint64_t base_hash_ = 0;  // of the base weights the run started from
    int step_ = 0;
    bool tied_ = true;
};

}  // namespace si::train
