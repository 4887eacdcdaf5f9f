// The LLaMA forward pass cut at its seven base projections (DESIGN.md section 4), as a resumable state machine.
//
// Everything of a block except the base products W x lives here: embeddings, RMSNorm, RoPE, the KV cache,
// attention, SwiGLU, residuals, LoRA updates, the final norm and the f32 classifier. The owner supplies every base
// product itself, so the same code (and therefore the same f32 arithmetic, bit for bit) serves the trusted core
// (enclave-only and secureinfer modes, products computed locally or unmasked from the accelerator) and the host
// (gpu-only mode, products from the accelerator in plaintext). The math and op order follow engine.cpp.
//
// One pass over T tokens at positions pos() .. pos() + T - 1:
//   begin(tokens) -> for each layer, for each stage (qkv, attn_out, ffn_in, ffn_out):
//       read stage_input() [T][K]; write the base product of each projection of the stage into proj_output(p)
//       [T][N]; finish_stage()  (adds LoRA, runs the non-linear part up to the next stage's input)
//   -> done(); then logits() for any token of the pass.
// Every buffer (weights, KV cache, activations) is secret memory: zeroed when freed.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/secret_memory.h"

namespace si {

class ThreadPool;

// The four crossings of a block, in order, and the projections each one multiplies by.
enum class Stage : uint8_t { qkv = 0, attn_out = 1, ffn_in = 2, ffn_out = 3 };
constexpr int kStages = 4;
std::span<const Proj> stage_projs(Stage s);  // qkv: q, k, v; attn_out: o; ffn_in: w1, w3; ffn_out: w2
const char* stage_name(Stage s);             // "qkv", "attn_out", "ffn_in", "ffn_out"

// The classifier [vocab][dim] as a base projection of the partition presets: it crosses as layer n_layers,
// stage qkv, projection slot 0 (one more crossing per pass, after the last block).
constexpr Proj kClassifierSlot = Proj::q;

// -log softmax(logits)[target], in double precision.
double token_nll(const float* logits, int n, int target);

// A LoRA update of one projection: y += scale * B (A x), A [rank][cols], B [rows][rank].
struct LoraUpdate {
    int rank = 0;
    float scale = 0.0f;
    SecretVector<float> a, b;
};

// One sequence's KV cache: for every layer, the keys and values of positions 0 .. pos() - 1. Allocated in chunks of
// kChunk positions as the sequence grows, so its memory follows use; secret memory, zeroed when freed. A
// StagedForward holds one of its own (the single-sequence passes); batched passes take any number of them.
class KvCache {
public:
    static constexpr int kChunk = 64;
    int pos() const { return pos_; }
    int capacity() const { return cap_; }
    size_t bytes() const;
    // Forgets every position and frees (zeroes) the memory.
    void clear();

private:
    friend class StagedForward;
    std::vector<SecretVector<float>> k_, v_;  // [layer] -> [capacity][kv_dim]
    int pos_ = 0, cap_ = 0;
};

// One sequence's part of a batched pass: n tokens appended to `cache` at its position.
struct PassSegment {
    KvCache* cache = nullptr;
    const int32_t* tokens = nullptr;
    int n = 0;
};

class StagedForward {
public:
    // n_ctx: KV cache length (1 .. cfg.seq_len). pool: threads for attention and the classifier (nullptr: inline;
    // results do not depend on it).
    // embedding_rows: writes a token's embedding row ([dim]) for the passes instead of a table held here (then
    // tok_embeddings() stays empty, and a tied classifier cannot be computed here: logits() refuses).
    using EmbeddingRows = std::function<void(int32_t token, float* out)>;
    StagedForward(const ModelConfig& cfg, int n_ctx, bool tied_classifier, ThreadPool* pool = nullptr,
                  EmbeddingRows embedding_rows = nullptr);
    ~StagedForward();
    StagedForward(const StagedForward&) = delete;
    StagedForward& operator=(const StagedForward&) = delete;

    const ModelConfig& config() const { return cfg_; }
    int n_ctx() const { return n_ctx_; }
    int pos() const { return own_.pos_; }
    bool tied() const { return tied_; }

    // The tensors, filled in place by the owner before the first pass.
    SecretVector<float>& tok_embeddings() { return tok_embeddings_; }  // [vocab][dim]
    SecretVector<float>& classifier() { return classifier_; }          // [vocab][dim]; empty when tied
    SecretVector<float>& final_norm() { return final_norm_; }          // [dim]
    SecretVector<float>& attn_norm(int layer);                         // [dim]
    SecretVector<float>& ffn_norm(int layer);                          // [dim]
    // Creates (or replaces) the LoRA update of one projection, with A and B zero-filled for the owner to fill.
    LoraUpdate& set_lora(int layer, Proj p, int rank, float scale);
    const LoraUpdate* lora(int layer, Proj p) const;

    // Forgets the KV cache and abandons a pass in progress.
    void reset();
    // Abandons a pass in progress; positions it may have written to the cache are overwritten by the next pass.
    void abort_pass() { in_pass_ = false; input_ = nullptr; }

    // Starts a pass. Throws si::Error(invalid_argument) for T < 1, a context overflow, a token out of range, or a
    // pass already in progress.
    void begin(const int32_t* tokens, int T);
    // Starts a batched pass over several sequences, each with its own cache (distinct), their tokens stacked in
    // segment order as the pass's rows. Every row is computed exactly as in a pass of its sequence alone (row-wise
    // arithmetic; attention over its own cache only), so the results do not depend on what else is in the batch.
    void begin(std::span<const PassSegment> segments);
    // Bytes a cache holding `positions` positions occupies (its chunks).
    size_t kv_bytes(int positions) const;
    bool in_pass() const { return in_pass_; }
    bool done() const { return in_pass_ && layer_ == cfg_.n_layers; }
    int layer() const { return layer_; }
    Stage stage() const { return stage_; }
    int T() const { return T_; }
    int pass_pos() const { return pass_pos_; }  // position of the pass's first token

    // The current stage's input [T][stage_cols()] and the buffer for each of its projections' products [T][N].
    const float* stage_input() const { return input_; }
    int64_t stage_cols() const;
    float* proj_output(Proj p);
    // Adds the LoRA updates to the stage's products and computes up to the next stage's input (or the end).
    void finish_stage();

    // After done(): logits [n][vocab] of tokens t0 .. t0 + n - 1 of the pass (final norm + f32 classifier).
    void logits(int t0, int n, float* out);
    // After done(): the classifier's input for token t of the pass, i.e. its final-normed hidden state [dim]. The
    // partition presets multiply it by the public int8 classifier themselves (a base projection like q .. w2).
    void final_hidden(int t, float* out);
    // Ends the pass (pos() already counts its tokens); another begin() may follow.
    void end_pass() { in_pass_ = false; }

    // Floating-point operations done by this object so far (nominal: 2 per multiply-add).
    uint64_t flops() const { return flops_; }

private:
    void ensure_scratch(int T);
    void add_lora(Proj p, const float* x, float* y);
    void attention();
    void grow(KvCache& c, int positions);

    ModelConfig cfg_;
    int n_ctx_ = 0;
    bool tied_ = true;
    ThreadPool* pool_ = nullptr;
    SecretVector<float> tok_embeddings_, classifier_, final_norm_;
    EmbeddingRows embedding_rows_;
    std::vector<SecretVector<float>> attn_norm_, ffn_norm_;
    std::vector<LoraUpdate> lora_;  // [layer][7]; rank 0: none
    KvCache own_;  // the single-sequence passes' cache
    struct Seg {
        KvCache* cache;
        int row0, n, pos0;
    };
    std::vector<Seg> segs_;  // of the pass in progress
    std::vector<int> row_pos_;  // [T]: each row's position in its sequence

    int pass_pos_ = 0, T_ = 0, layer_ = 0;
    Stage stage_ = Stage::qkv;
    bool in_pass_ = false;
    const float* input_ = nullptr;
    uint64_t flops_ = 0;

    int scratch_T_ = 0;
    // x residual [T][dim]; xb, xb2, ob [T][dim]; q [T][dim]; k, v [T][kv]; h1, h3, hb [T][hidden]; lora_tmp [T][rank]
    SecretVector<float> x_, xb_, xb2_, ob_, q_, k_, v_, h1_, h3_, hb_, lora_tmp_, lora_out_;
};

}  // namespace si
