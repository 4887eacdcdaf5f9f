#include "engine/random_model.h"

#include <algorithm>
#include <thread>

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
    {"llama2-7b", make(4096, 11008, 32, 32, 32, 32000, 4096)},
    {"llama3-8b", [] {
         ModelConfig c = make(4096, 14336, 32, 32, 8, 128256, 8192);
         c.rope_theta = 500000.0f;
         c.rope_freq_factors = llama3_rope_factors(c.head_dim(), c.rope_theta, 8.0f, 1.0f, 4.0f, 8192.0f);
         return c;
     }()},
};

uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

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

RandomSource::RandomSource(const ModelConfig& cfg, uint64_t seed, bool untied) : cfg_(cfg), seed_(seed), untied_(untied) {
    cfg_.validate("random model shape");
}

void RandomSource::do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const {
    const int64_t cols = tensor_cols(name);
    const size_t count = size_t(n * cols);
    if (name.find("norm") != std::string::npos) {
        std::fill(out, out + count, 1.0f);
        return;
    }
    // One stream per tensor: its key from the seed and the name (FNV-1a), element i from splitmix64(key + i).
    uint64_t key = 0xcbf29ce484222325ull ^ splitmix64(seed_);
    for (const char ch : name) key = (key ^ uint8_t(ch)) * 0x100000001b3ull;
    key = splitmix64(key);
    const uint64_t first = uint64_t(row0 * cols);
    auto fill = [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i)
            out[i] = (float(splitmix64(key + first + i) >> 40) / 16777216.0f - 0.5f) * 0.1f;
    };
    // Large requests (a 7B model's matrices) on every CPU.
    const size_t threads = count < (size_t(1) << 20) ? 1 : std::max(1u, std::thread::hardware_concurrency());
    if (threads == 1) {
        fill(0, count);
        return;
    }
    std::vector<std::thread> pool;
    const size_t per = (count + threads - 1) / threads;
    for (size_t t = 0; t < threads; ++t)
        pool.emplace_back(fill, std::min(count, t * per), std::min(count, (t + 1) * per));
    for (auto& th : pool) th.join();
}

}  // namespace si
