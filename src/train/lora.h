// LoRA adapters in llama.cpp's GGUF adapter format, and merging them into a base model's f32 weights.
//
// File format (what llama.cpp's llama_adapter_lora_init accepts):
//   general.architecture = "llama", general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32);
//   for each adapted projection W [out][in] named <base> (e.g. "blk.0.attn_q.weight"):
//     <base>.lora_a with GGUF ne = {in, rank}   (row-major A [rank][in])
//     <base>.lora_b with GGUF ne = {rank, out}  (row-major B [out][rank])
//   The merged weight is W + scale * (alpha / rank) * B A, with rank = lora_b's ne[0]; alpha = 0 (or absent) means
//   W + scale * B A, llama.cpp's rule.
#pragma once
#include <string>
#include <vector>

#include "common/model.h"
#include "formats/gguf.h"

namespace si::train {

struct LoraTensor {
    int layer = 0;
    Proj proj = Proj::q;
    int rank = 0;
    std::vector<float> a;  // [rank][in]
    std::vector<float> b;  // [out][rank]
};

struct LoraAdapter {
    float alpha = 0.0f;
    std::string name;  // general.name (informational)
    std::vector<LoraTensor> tensors;

    // Multiplier of B A for one tensor at the given user scale (llama.cpp's get_scale).
    float tensor_scale(const LoraTensor& t, float user_scale) const {
        return alpha != 0.0f ? user_scale * alpha / float(t.rank) : user_scale;
    }
};

// Parses and validates an adapter against the base model's config. Errors (si::Error) name the file and, where it
// applies, the tensor: general.type not "adapter" (format), an architecture other than llama (unsupported),
// adapter.type not "lora" (unsupported), a tensor that is not <projection>.lora_a / .lora_b (format; adapters for
// norms, embeddings or the classifier are unsupported), a tensor for a layer or projection the base model lacks, a
// lora_a without its lora_b or the reverse, shapes that do not fit the base tensor, a rank mismatch between A and B,
// non-finite values.
LoraAdapter read_lora_adapter(const gguf::Reader& r, const ModelConfig& base);
LoraAdapter read_lora_adapter(const std::string& path, const ModelConfig& base);

// The file image (F32 tensors) and an atomic write to `path`.
gguf::Writer lora_adapter_writer(const LoraAdapter& adapter, const ModelConfig& base);
void write_lora_adapter(const std::string& path, const LoraAdapter& adapter, const ModelConfig& base);

// W += adapter.tensor_scale(t, scale) * B A for every tensor, in the f32 weights (before any quantisation).
// Throws si::Error(invalid_argument) when a tensor does not fit the weights.
void merge_lora(ModelWeights& w, const LoraAdapter& adapter, float scale);

}  // namespace si::train
