#include "engine/random_model.h"

#include "common/error.h"

namespace si {

namespace {

struct Preset {
    const char* name;
    ModelConfig cfg;
};

ModelConfig make(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq) {
    ModelConfig c;
    c.dim = dim;
    c.hidden_dim = hidden;
    c.n_layers = layers;
    c.n_heads = heads;
    c.n_kv_heads = kv_heads;
    c.vocab_size = vocab;
    c.seq_len = seq;
    return c;
}

const Preset kPresets[] = {
    {"stories260k", make(64, 172, 5, 8, 4, 512, 512)},
    {"stories15m", make(288, 768, 6, 6, 6, 32000, 256)},
    {"stories110m", make(768, 2048, 12, 12, 12, 32000, 1024)},
    {"tinyllama", make(2048, 5632, 22, 32, 4, 32000, 2048)},
};

}  // namespace

std::vector<std::string> shape_names() {
    std::vector<std::string> names;
    for (const auto& p : kPresets) names.emplace_back(p.name);
    return names;
}

ModelConfig shape_preset(const std::string& name) {
    std::string known;
    for (const auto& p : kPresets) {
        if (name == p.name) return p.cfg;
        known += known.empty() ? p.name : std::string(", ") + p.name;
    }
    fail(Status::invalid_argument, "unknown model shape '" + name + "' (known: " + known + ")");
}

ModelWeights random_model(const ModelConfig& cfg, uint64_t seed, bool untied) {
    cfg.validate("random model shape");
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
    auto fill = [&](std::vector<float>& v, size_t n) {
        v.resize(n);
        for (auto& x : v) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            x = (float(s >> 40) / 16777216.0f - 0.5f) * 0.1f;
        }
    };
    const size_t d = cfg.dim, h = cfg.hidden_dim, kv = cfg.kv_dim(), v = cfg.vocab_size;
    ModelWeights w;
    w.cfg = cfg;
    fill(w.tok_embeddings, v * d);
    w.layers.resize(size_t(cfg.n_layers));
    for (auto& L : w.layers) {
        L.attn_norm.assign(d, 1.0f);
        L.ffn_norm.assign(d, 1.0f);
        fill(L.wq, d * d);
        fill(L.wk, kv * d);
        fill(L.wv, kv * d);
        fill(L.wo, d * d);
        fill(L.w1, h * d);
        fill(L.w2, d * h);
        fill(L.w3, h * d);
    }
    w.final_norm.assign(d, 1.0f);
    if (untied) fill(w.classifier, v * d);
    return w;
}

}  // namespace si
