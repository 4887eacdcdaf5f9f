#include "common/model.h"

#include <cmath>

#include "common/error.h"

namespace si {

void ModelConfig::validate(const std::string& what) const {
    auto bad = [&](const std::string& why) { fail(Status::format, what + ": " + why); };
    constexpr int kMaxDim = 1 << 16, kMaxLayers = 1024, kMaxHeads = 1024, kMaxVocab = 1 << 20, kMaxSeq = 1 << 20;
    if (dim <= 0 || dim > kMaxDim) bad("dimension " + std::to_string(dim) + " out of range");
    if (hidden_dim <= 0 || hidden_dim > 4 * kMaxDim) bad("hidden dimension " + std::to_string(hidden_dim) + " out of range");
    if (n_layers <= 0 || n_layers > kMaxLayers) bad("layer count " + std::to_string(n_layers) + " out of range");
    if (n_heads <= 0 || n_heads > kMaxHeads) bad("head count " + std::to_string(n_heads) + " out of range");
    if (n_kv_heads <= 0 || n_kv_heads > n_heads) bad("kv head count " + std::to_string(n_kv_heads) + " out of range");
    if (n_heads % n_kv_heads != 0) bad("head count " + std::to_string(n_heads) + " is not a multiple of kv head count " + std::to_string(n_kv_heads));
    if (dim % n_heads != 0) bad("dimension " + std::to_string(dim) + " is not a multiple of head count " + std::to_string(n_heads));
    if (head_dim() % 2 != 0) bad("head dimension " + std::to_string(head_dim()) + " is odd (RoPE needs pairs)");
    if (vocab_size <= 0 || vocab_size > kMaxVocab) bad("vocabulary size " + std::to_string(vocab_size) + " out of range");
    if (seq_len <= 0 || seq_len > kMaxSeq) bad("context length " + std::to_string(seq_len) + " out of range");
    if (!(rope_theta > 0.0f) || !(norm_eps > 0.0f) || norm_eps > 1.0f) bad("invalid rope theta or norm epsilon");
    if (!rope_freq_factors.empty()) {
        if (rope_freq_factors.size() != size_t(head_dim() / 2))
            bad(std::to_string(rope_freq_factors.size()) + " RoPE frequency factors, expected " + std::to_string(head_dim() / 2) +
                " (head dimension / 2)");
        for (const float f : rope_freq_factors)
            if (!(f > 0.0f) || !std::isfinite(f)) bad("a RoPE frequency factor is not a finite positive number");
    }
}

std::vector<float> llama3_rope_factors(int head_dim, float theta, float factor, float low_freq_factor,
                                       float high_freq_factor, float original_context) {
    const double pi = 3.14159265358979323846;
    const double low_wavelen = double(original_context) / low_freq_factor;
    const double high_wavelen = double(original_context) / high_freq_factor;
    std::vector<float> out;
    for (int i = 0; i < head_dim; i += 2) {
        // As the converter computes it: the frequency in f32, the rest in double.
        const float freq = 1.0f / std::pow(theta, float(i) / float(head_dim));
        const double wavelen = 2 * pi / double(freq);
        if (wavelen < high_wavelen) {
            out.push_back(1.0f);
        } else if (wavelen > low_wavelen) {
            out.push_back(factor);
        } else {
            const double smooth = (double(original_context) / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            out.push_back(float(1.0 / ((1.0 - smooth) / factor + smooth)));
        }
    }
    return out;
}

uint64_t ModelConfig::n_params(bool tied_classifier) const {
    const uint64_t d = dim, h = hidden_dim, kv = kv_dim(), v = vocab_size;
    const uint64_t per_layer = 2 * d + d * d * 2 + 2 * kv * d + 3 * d * h;
    return v * d + n_layers * per_layer + d + (tied_classifier ? 0 : v * d);
}

void ModelWeights::validate(const std::string& what) const {
    cfg.validate(what);
    const size_t d = cfg.dim, h = cfg.hidden_dim, kv = cfg.kv_dim(), v = cfg.vocab_size;
    auto check = [&](const std::vector<float>& t, size_t n, const std::string& name) {
        if (t.size() != n)
            fail(Status::format, what + ": tensor " + name + " has " + std::to_string(t.size()) + " elements, expected " + std::to_string(n));
    };
    check(tok_embeddings, v * d, "token_embd");
    if (layers.size() != size_t(cfg.n_layers)) fail(Status::format, what + ": layer count mismatch");
    for (size_t l = 0; l < layers.size(); ++l) {
        const auto& L = layers[l];
        const std::string p = "blk." + std::to_string(l) + ".";
        check(L.attn_norm, d, p + "attn_norm");
        check(L.wq, d * d, p + "attn_q");
        check(L.wk, kv * d, p + "attn_k");
        check(L.wv, kv * d, p + "attn_v");
        check(L.wo, d * d, p + "attn_output");
        check(L.ffn_norm, d, p + "ffn_norm");
        check(L.w1, h * d, p + "ffn_gate");
        check(L.w2, d * h, p + "ffn_down");
        check(L.w3, h * d, p + "ffn_up");
    }
    check(final_norm, d, "output_norm");
    if (!tied()) check(classifier, v * d, "output");
}

int proj_stage(Proj p) {
    switch (p) {
        case Proj::q:
        case Proj::k:
        case Proj::v: return 0;
        case Proj::o: return 1;
        case Proj::w1:
        case Proj::w3: return 2;
        case Proj::w2: return 3;
    }
    return 0;
}

const char* proj_name(Proj p) {
    switch (p) {
        case Proj::q: return "q";
        case Proj::k: return "k";
        case Proj::v: return "v";
        case Proj::o: return "o";
        case Proj::w1: return "w1";
        case Proj::w2: return "w2";
        case Proj::w3: return "w3";
    }
    return "?";
}

ProjShape proj_shape(const ModelConfig& cfg, Proj p) {
    const int64_t d = cfg.dim, h = cfg.hidden_dim, kv = cfg.kv_dim();
    switch (p) {
        case Proj::q: return {d, d};
        case Proj::k: return {kv, d};
        case Proj::v: return {kv, d};
        case Proj::o: return {d, d};
        case Proj::w1: return {h, d};
        case Proj::w2: return {d, h};
        case Proj::w3: return {h, d};
    }
    return {};
}

const char* proj_gguf_stem(Proj p) {
    switch (p) {
        case Proj::q: return "attn_q";
        case Proj::k: return "attn_k";
        case Proj::v: return "attn_v";
        case Proj::o: return "attn_output";
        case Proj::w1: return "ffn_gate";
        case Proj::w2: return "ffn_down";
        case Proj::w3: return "ffn_up";
    }
    return "?";
}

std::string proj_tensor_name(int layer, Proj p) {
    return "blk." + std::to_string(layer) + "." + proj_gguf_stem(p) + ".weight";
}

std::vector<float>& proj_weights(LayerWeights& L, Proj p) {
    std::vector<float>* const w[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3};
    return *w[int(p)];
}

const std::vector<float>& proj_weights(const LayerWeights& L, Proj p) {
    return proj_weights(const_cast<LayerWeights&>(L), p);
}

}  // namespace si
