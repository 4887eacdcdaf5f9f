// A model's tensors one at a time: the bounded-memory way to load a model. Consumers (the plaintext engine, the
// secure session, the GGUF writer) ask for one tensor, or a range of its rows, in f32, turn it into the form they
// keep (per-row int8 with scales, packed weights, block formats) and free it, so that no f32 copy of the whole model
// ever exists unless a consumer keeps f32 by nature (the f32 engine, a LoRA merge).
//
// Tensors are named as in GGUF ("token_embd.weight", "blk.3.attn_q.weight", "output_norm.weight", "output.weight")
// and shaped by the config (tensor_rows / tensor_cols): matrices are row-major [out][in], norms one row.
// Implementations: DenseSource (below, over ModelWeights already in memory), GgufSource (formats/gguf_model.h: a
// memory-mapped GGUF, dequantised per request) and RandomSource (engine/random_model.h: generated per tensor).
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "common/model.h"

namespace si {

class TensorSource {
public:
    virtual ~TensorSource() = default;
    virtual const ModelConfig& config() const = 0;
    // No output.weight: the classifier is token_embd.weight.
    virtual bool tied() const = 0;
    // Rows [row0, row0 + n) of tensor `name` in f32 into out[n * cols]. Throws si::Error(invalid_argument) for a
    // name outside the model or rows out of range.
    void read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const;
    // The whole tensor (then release()d: the caller has its copy).
    std::vector<float> read(const std::string& name) const;
    void read(const std::string& name, float* out) const;
    int64_t tensor_rows(const std::string& name) const;
    int64_t tensor_cols(const std::string& name) const;
    // A hint that a consumer is done with a tensor for now: a memory-mapped file gives its pages back. Reading it
    // again still works.
    virtual void release(const std::string& name) const { (void)name; }
    // The classifier's name: "output.weight", or "token_embd.weight" when tied.
    std::string classifier_name() const { return tied() ? "token_embd.weight" : "output.weight"; }
    // f32 elements handed out so far (what a consumer materialised, summed over its temporaries).
    uint64_t f32_elements_read() const { return read_.load(std::memory_order_relaxed); }

protected:
    virtual void do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const = 0;

private:
    mutable std::atomic<uint64_t> read_{0};
};

// The GGUF names of a model's tensors in file order: token_embd, then per block attn_norm, the projections, ffn_norm,
// then output_norm and (untied) output.
std::vector<std::string> model_tensor_names(const ModelConfig& cfg, bool tied);

// Over weights already in memory (borrowed: they must outlive the source).
class DenseSource final : public TensorSource {
public:
    explicit DenseSource(const ModelWeights& w);
    const ModelConfig& config() const override { return w_.cfg; }
    bool tied() const override { return w_.tied(); }
    // The tensor itself (no copy).
    const std::vector<float>& tensor(const std::string& name) const;

protected:
    void do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const override;

private:
    const ModelWeights& w_;
};

// Every tensor of the source in f32 (the dense model; checked with ModelWeights::validate).
ModelWeights materialize(const TensorSource& src);

}  // namespace si
