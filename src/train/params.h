// Trainable parameters as flat vectors of named tensors, and typed views into them for the forward/backward pass.
//
// Every tensor carries its GGUF name ("blk.0.attn_q.weight", "blk.0.attn_q.weight.lora_a", ...) and a row-major
// [rows][cols] shape, so the optimiser, gradient clipping and checkpoints treat all parameters alike, and adapter and
// model files are written tensor by tensor without a translation table.
//
// LoRA factors follow llama.cpp's adapter convention for a projection W [out][in]:
//   A = lora_a [rank][in]   (GGUF ne = {in, rank}),   B = lora_b [out][rank]   (GGUF ne = {rank, out}),
//   W_eff = W + s * B A  with  s = scale * alpha / rank  (alpha = 0 means s = scale, as llama.cpp does).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/model.h"

namespace si::train {

inline constexpr int kNumProj = 7;
inline int proj_index(Proj p) { return int(p); }

// proj_gguf_stem, proj_tensor_name and proj_shape are in common/model.h.
// Parses "q,k,v,o,w1,w2,w3" (any subset, any order, "all" for every projection); throws si::Error(invalid_argument)
// naming the unknown entry. The result is in canonical order without duplicates.
std::vector<Proj> parse_proj_list(const std::string& list);
std::string proj_list_string(std::span<const Proj> projs);

struct TensorSlot {
    std::string name;
    int64_t rows = 0, cols = 0;  // vectors are [1][n]
    size_t offset = 0;           // into the flat vector
    bool decay = false;          // AdamW weight decay applies (matrices, not norm gains)
    size_t size() const { return size_t(rows * cols); }
};

class ParamLayout {
public:
    size_t add(std::string name, int64_t rows, int64_t cols, bool decay);
    const std::vector<TensorSlot>& slots() const { return slots_; }
    const TensorSlot* find(const std::string& name) const;
    const TensorSlot& at(const std::string& name) const;  // throws si::Error(internal) when absent
    size_t size() const { return size_; }
    bool operator==(const ParamLayout& o) const;

private:
    std::vector<TensorSlot> slots_;
    size_t size_ = 0;
};

// All tensors of a dense model, in GGUF names; output.weight only when the classifier is untied.
ParamLayout model_layout(const ModelConfig& cfg, bool tied);
// lora_a / lora_b for every layer and target projection.
ParamLayout lora_layout(const ModelConfig& cfg, int rank, std::span<const Proj> targets);

template <class T>
std::vector<T> pack_model(const ModelWeights& w, const ParamLayout& layout);
ModelWeights unpack_model(const ModelConfig& cfg, const ParamLayout& layout, std::span<const float> data);

// Pointers to one block's tensors. A null pointer means "absent" in a weight view (no LoRA on that projection) and
// "not wanted" in a gradient view (that tensor is frozen).
template <class T>
struct LayerRef {
    T* attn_norm = nullptr;
    T* ffn_norm = nullptr;
    std::array<T*, kNumProj> w{};       // [out][in], indexed by Proj
    std::array<T*, kNumProj> lora_a{};  // [rank][in]
    std::array<T*, kNumProj> lora_b{};  // [out][rank]
};

template <class T>
struct ModelRef {
    T* tok_embd = nullptr;    // [vocab][dim]
    T* final_norm = nullptr;  // [dim]
    T* output = nullptr;      // [vocab][dim]; equal to tok_embd when the classifier is tied
    std::vector<LayerRef<T>> layers;
    int lora_rank = 0;
};

// Views of the model tensors of `layout` (built by model_layout) inside `data`.
template <class T>
ModelRef<T> bind_model(const ModelConfig& cfg, const ParamLayout& layout, T* data);
// Adds the LoRA tensors of `layout` (built by lora_layout) inside `data` to `ref` (resizing its layer list).
template <class T>
void bind_lora(ModelRef<T>& ref, const ModelConfig& cfg, const ParamLayout& layout, T* data);

template <class T>
ModelRef<const T> as_const(const ModelRef<T>& r) {
    ModelRef<const T> c;
    c.tok_embd = r.tok_embd;
    c.final_norm = r.final_norm;
    c.output = r.output;
    c.lora_rank = r.lora_rank;
    c.layers.resize(r.layers.size());
    for (size_t l = 0; l < r.layers.size(); ++l) {
        c.layers[l].attn_norm = r.layers[l].attn_norm;
        c.layers[l].ffn_norm = r.layers[l].ffn_norm;
        for (int j = 0; j < kNumProj; ++j) {
            c.layers[l].w[j] = r.layers[l].w[j];
            c.layers[l].lora_a[j] = r.layers[l].lora_a[j];
            c.layers[l].lora_b[j] = r.layers[l].lora_b[j];
        }
    }
    return c;
}

}  // namespace si::train
