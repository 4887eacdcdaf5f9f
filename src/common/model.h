// LLaMA hyper-parameters and dense weights, independent of any file format.
//
// Layout conventions (the llama2.c / Meta layout, which is also what llama.cpp's GGUF files hold for LLaMA):
//   every matrix is row-major [out][in]; RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace si {

struct ModelConfig {
    int dim = 0;         // residual stream width
    int hidden_dim = 0;  // SwiGLU inner width
    int n_layers = 0;
    int n_heads = 0;
    int n_kv_heads = 0;  // grouped-query attention: n_heads % n_kv_heads == 0
    int vocab_size = 0;
    int seq_len = 0;     // maximum context
    float rope_theta = 10000.0f;
    float norm_eps = 1e-5f;
    // Llama 3.1 RoPE scaling: head_dim / 2 factors dividing each rotation frequency (GGUF rope_freqs.weight, or
    // computed from llama.rope.scaling.* of type llama3); empty: none.
    std::vector<float> rope_freq_factors;

    int head_dim() const { return dim / n_heads; }
    int kv_dim() const { return head_dim() * n_kv_heads; }

    // Throws si::Error(Status::format) naming `what` if a value is zero, negative, absurdly large or inconsistent.
    void validate(const std::string& what) const;
    // Number of parameters of the dense model (classifier counted once when tied).
    uint64_t n_params(bool tied_classifier) const;
    const float* rope_factors() const { return rope_freq_factors.empty() ? nullptr : rope_freq_factors.data(); }
};

// Llama 3's RoPE frequency factors (Meta's apply_scaling, as llama.cpp's converter writes rope_freqs.weight): for
// each pair i, with wavelength 2 pi / theta^(-2i/head_dim), 1 below original_context / high_freq_factor, `factor`
// above original_context / low_freq_factor, and a smooth blend between.
std::vector<float> llama3_rope_factors(int head_dim, float theta, float factor, float low_freq_factor,
                                       float high_freq_factor, float original_context);

struct LayerWeights {
    std::vector<float> attn_norm;  // [dim]
    std::vector<float> wq;         // [dim][dim]
    std::vector<float> wk;         // [kv_dim][dim]
    std::vector<float> wv;         // [kv_dim][dim]
    std::vector<float> wo;         // [dim][dim]
    std::vector<float> ffn_norm;   // [dim]
    std::vector<float> w1;         // [hidden][dim]  gate
    std::vector<float> w2;         // [dim][hidden]  down
    std::vector<float> w3;         // [hidden][dim]  up
};

struct ModelWeights {
    ModelConfig cfg;
    std::vector<float> tok_embeddings;  // [vocab][dim]
    std::vector<LayerWeights> layers;   // [n_layers]
    std::vector<float> final_norm;      // [dim]
    std::vector<float> classifier;      // [vocab][dim]; empty when tied to tok_embeddings

    bool tied() const { return classifier.empty(); }
    const std::vector<float>& output() const { return tied() ? tok_embeddings : classifier; }
    // Checks every tensor has the size the config implies; throws si::Error(Status::format) naming `what`.
    void validate(const std::string& what) const;
};

// Names of the seven projections of a block, in the order used throughout (and by LoRA target lists).
enum class Proj { q, k, v, o, w1, w2, w3 };
inline constexpr Proj kAllProj[] = {Proj::q, Proj::k, Proj::v, Proj::o, Proj::w1, Proj::w2, Proj::w3};
const char* proj_name(Proj p);  // "q", "k", ... "w3"
// The crossing of a block whose input the projection reads: 0 q/k/v, 1 o, 2 gate/up (w1/w3), 3 down (w2).
int proj_stage(Proj p);

// Rows (outputs) and columns (inputs) of a projection; binds as `auto [out, in] = proj_shape(cfg, p)`.
struct ProjShape {
    int64_t rows = 0, cols = 0;
};
ProjShape proj_shape(const ModelConfig& cfg, Proj p);
// GGUF stem of a projection: "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up".
const char* proj_gguf_stem(Proj p);
// The GGUF tensor name of a projection, e.g. "blk.3.attn_q.weight".
std::string proj_tensor_name(int layer, Proj p);
// A block's weight matrix of a projection (proj_shape rows x cols, row-major).
std::vector<float>& proj_weights(LayerWeights& L, Proj p);
const std::vector<float>& proj_weights(const LayerWeights& L, Proj p);

}  // namespace si
