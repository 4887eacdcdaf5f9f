#include "train/params.h"

#include <algorithm>
#include <sstream>

#include "common/error.h"

namespace si::train {

std::vector<Proj> parse_proj_list(const std::string& list) {
    std::array<bool, kNumProj> on{};
    std::stringstream ss(list);
    std::string item;
    bool any = false;
    while (std::getline(ss, item, ',')) {
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        if (item.empty()) continue;
        if (item == "all") {
            on.fill(true);
            any = true;
            continue;
        }
        bool found = false;
        for (Proj p : kAllProj)
            if (item == proj_name(p)) {
                on[size_t(proj_index(p))] = true;
                found = any = true;
            }
        if (!found)
            fail(Status::invalid_argument,
                 "unknown projection '" + item + "' in '" + list + "' (expected a subset of q,k,v,o,w1,w2,w3 or all)");
    }
    if (!any) fail(Status::invalid_argument, "empty projection list '" + list + "'");
    std::vector<Proj> out;
    for (Proj p : kAllProj)
        if (on[size_t(proj_index(p))]) out.push_back(p);
    return out;
}

std::string proj_list_string(std::span<const Proj> projs) {
    std::string s;
    for (Proj p : projs) {
        if (!s.empty()) s += ',';
        s += proj_name(p);
    }
    return s;
}

size_t ParamLayout::add(std::string name, int64_t rows, int64_t cols, bool decay) {
    TensorSlot s{std::move(name), rows, cols, size_, decay};
    size_ += s.size();
    slots_.push_back(std::move(s));
    return slots_.size() - 1;
}

const TensorSlot* ParamLayout::find(const std::string& name) const {
    for (const auto& s : slots_)
        if (s.name == name) return &s;
    return nullptr;
}

const TensorSlot& ParamLayout::at(const std::string& name) const {
    const TensorSlot* s = find(name);
    if (!s) fail(Status::internal, "parameter layout has no tensor '" + name + "'");
    return *s;
}

bool ParamLayout::operator==(const ParamLayout& o) const {
    if (slots_.size() != o.slots_.size() || size_ != o.size_) return false;
    for (size_t i = 0; i < slots_.size(); ++i) {
        const auto &a = slots_[i], &b = o.slots_[i];
        if (a.name != b.name || a.rows != b.rows || a.cols != b.cols || a.offset != b.offset) return false;
    }
    return true;
}

ParamLayout model_layout(const ModelConfig& cfg, bool tied) {
    ParamLayout L;
    const int64_t d = cfg.dim, v = cfg.vocab_size;
    L.add("token_embd.weight", v, d, true);
    for (int l = 0; l < cfg.n_layers; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        L.add(p + "attn_norm.weight", 1, d, false);
        for (Proj j : kAllProj) {
            const auto [out, in] = proj_shape(cfg, j);
            L.add(proj_tensor_name(l, j), out, in, true);
            if (j == Proj::o) L.add(p + "ffn_norm.weight", 1, d, false);
        }
    }
    L.add("output_norm.weight", 1, d, false);
    if (!tied) L.add("output.weight", v, d, true);
    return L;
}

ParamLayout lora_layout(const ModelConfig& cfg, int rank, std::span<const Proj> targets) {
    if (rank <= 0) fail(Status::invalid_argument, "LoRA rank must be positive, got " + std::to_string(rank));
    ParamLayout L;
    for (int l = 0; l < cfg.n_layers; ++l)
        for (Proj j : targets) {
            const auto [out, in] = proj_shape(cfg, j);
            const std::string base = proj_tensor_name(l, j);
            L.add(base + ".lora_a", rank, in, true);
            L.add(base + ".lora_b", out, rank, true);
        }
    return L;
}

namespace {

const std::vector<float>& layer_tensor(const LayerWeights& L, Proj p) {
    switch (p) {
        case Proj::q: return L.wq;
        case Proj::k: return L.wk;
        case Proj::v: return L.wv;
        case Proj::o: return L.wo;
        case Proj::w1: return L.w1;
        case Proj::w2: return L.w2;
        case Proj::w3: return L.w3;
    }
    return L.wq;
}

std::vector<float>& layer_tensor(LayerWeights& L, Proj p) {
    return const_cast<std::vector<float>&>(layer_tensor(static_cast<const LayerWeights&>(L), p));
}

}  // namespace

template <class T>
std::vector<T> pack_model(const ModelWeights& w, const ParamLayout& layout) {
    w.validate("model");
    std::vector<T> out(layout.size());
    auto put = [&](const std::string& name, const std::vector<float>& src) {
        const TensorSlot& s = layout.at(name);
        if (src.size() != s.size()) fail(Status::internal, "tensor " + name + " size mismatch while packing");
        std::copy(src.begin(), src.end(), out.begin() + std::ptrdiff_t(s.offset));
    };
    put("token_embd.weight", w.tok_embeddings);
    for (int l = 0; l < w.cfg.n_layers; ++l) {
        const LayerWeights& L = w.layers[size_t(l)];
        const std::string p = "blk." + std::to_string(l) + ".";
        put(p + "attn_norm.weight", L.attn_norm);
        put(p + "ffn_norm.weight", L.ffn_norm);
        for (Proj j : kAllProj) put(proj_tensor_name(l, j), layer_tensor(L, j));
    }
    put("output_norm.weight", w.final_norm);
    if (layout.find("output.weight")) put("output.weight", w.output());
    return out;
}

template std::vector<float> pack_model<float>(const ModelWeights&, const ParamLayout&);
template std::vector<double> pack_model<double>(const ModelWeights&, const ParamLayout&);

ModelWeights unpack_model(const ModelConfig& cfg, const ParamLayout& layout, std::span<const float> data) {
    if (data.size() != layout.size()) fail(Status::internal, "parameter vector does not match its layout");
    ModelWeights w;
    w.cfg = cfg;
    auto get = [&](const std::string& name) {
        const TensorSlot& s = layout.at(name);
        return std::vector<float>(data.begin() + std::ptrdiff_t(s.offset), data.begin() + std::ptrdiff_t(s.offset + s.size()));
    };
    w.tok_embeddings = get("token_embd.weight");
    w.layers.resize(size_t(cfg.n_layers));
    for (int l = 0; l < cfg.n_layers; ++l) {
        LayerWeights& L = w.layers[size_t(l)];
        const std::string p = "blk." + std::to_string(l) + ".";
        L.attn_norm = get(p + "attn_norm.weight");
        L.ffn_norm = get(p + "ffn_norm.weight");
        for (Proj j : kAllProj) layer_tensor(L, j) = get(proj_tensor_name(l, j));
    }
    w.final_norm = get("output_norm.weight");
    if (layout.find("output.weight")) w.classifier = get("output.weight");
    w.validate("trained model");
    return w;
}

template <class T>
ModelRef<T> bind_model(const ModelConfig& cfg, const ParamLayout& layout, T* data) {
    ModelRef<T> r;
    auto at = [&](const std::string& name) { return data + layout.at(name).offset; };
    r.tok_embd = at("token_embd.weight");
    r.final_norm = at("output_norm.weight");
    r.output = layout.find("output.weight") ? at("output.weight") : r.tok_embd;
    r.layers.resize(size_t(cfg.n_layers));
    for (int l = 0; l < cfg.n_layers; ++l) {
        LayerRef<T>& L = r.layers[size_t(l)];
        const std::string p = "blk." + std::to_string(l) + ".";
        L.attn_norm = at(p + "attn_norm.weight");
        L.ffn_norm = at(p + "ffn_norm.weight");
        for (Proj j : kAllProj) L.w[size_t(proj_index(j))] = at(proj_tensor_name(l, j));
    }
    return r;
}

template <class T>
void bind_lora(ModelRef<T>& r, const ModelConfig& cfg, const ParamLayout& layout, T* data) {
    r.layers.resize(size_t(cfg.n_layers));
    for (int l = 0; l < cfg.n_layers; ++l)
        for (Proj j : kAllProj) {
            const std::string base = proj_tensor_name(l, j);
            const TensorSlot* a = layout.find(base + ".lora_a");
            const TensorSlot* b = layout.find(base + ".lora_b");
            if (!a || !b) continue;
            r.lora_rank = int(a->rows);
            r.layers[size_t(l)].lora_a[size_t(proj_index(j))] = data + a->offset;
            r.layers[size_t(l)].lora_b[size_t(proj_index(j))] = data + b->offset;
        }
}

template ModelRef<float> bind_model<float>(const ModelConfig&, const ParamLayout&, float*);
template ModelRef<double> bind_model<double>(const ModelConfig&, const ParamLayout&, double*);
template ModelRef<const float> bind_model<const float>(const ModelConfig&, const ParamLayout&, const float*);
template ModelRef<const double> bind_model<const double>(const ModelConfig&, const ParamLayout&, const double*);
template void bind_lora<float>(ModelRef<float>&, const ModelConfig&, const ParamLayout&, float*);
template void bind_lora<double>(ModelRef<double>&, const ModelConfig&, const ParamLayout&, double*);
template void bind_lora<const float>(ModelRef<const float>&, const ModelConfig&, const ParamLayout&, const float*);
template void bind_lora<const double>(ModelRef<const double>&, const ModelConfig&, const ParamLayout&, const double*);

}  // namespace si::train
