#include "train/lora.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "common/error.h"
#include "train/params.h"

namespace si::train {

namespace {

constexpr const char* kSuffixA = ".lora_a";
constexpr const char* kSuffixB = ".lora_b";

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "blk.<layer>.<stem>.weight" -> layer and projection; false when the name is not of that form.
bool parse_projection(const std::string& base, int& layer, Proj& proj) {
    if (base.rfind("blk.", 0) != 0 || !ends_with(base, ".weight")) return false;
    const size_t dot = base.find('.', 4);
    if (dot == std::string::npos || dot == 4 || dot - 4 > 6) return false;
    const std::string num = base.substr(4, dot - 4);
    if (!std::all_of(num.begin(), num.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
    const std::string stem = base.substr(dot + 1, base.size() - dot - 1 - 7);
    for (Proj p : kAllProj)
        if (stem == proj_gguf_stem(p)) {
            layer = std::stoi(num);
            proj = p;
            return true;
        }
    return false;
}

void check_finite(const std::string& file, const std::string& tensor, const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) fail(Status::format, file + ": tensor '" + tensor + "' holds a non-finite value");
}

}  // namespace

LoraAdapter read_lora_adapter(const gguf::Reader& r, const ModelConfig& base) {
    const std::string& file = r.name();
    auto bad = [&](const std::string& why) { fail(Status::format, file + ": " + why); };

    const auto type = r.opt_str("general.type");
    if (!type) bad("not a LoRA adapter: general.type is missing (expected 'adapter')");
    if (*type != "adapter") bad("not a LoRA adapter: general.type is '" + *type + "' (expected 'adapter')");
    const auto arch = r.opt_str("general.architecture");
    if (!arch) bad("adapter has no general.architecture");
    if (*arch != "llama")
        fail(Status::unsupported, file + ": adapter is for architecture '" + *arch + "', the base model is llama");
    const auto atype = r.opt_str("adapter.type");
    if (!atype) bad("adapter.type is missing (expected 'lora')");
    if (*atype != "lora") fail(Status::unsupported, file + ": adapter.type '" + *atype + "' is not supported (only lora)");

    LoraAdapter ad;
    ad.alpha = r.opt_f32("adapter.lora.alpha").value_or(0.0f);
    if (!std::isfinite(ad.alpha)) bad("adapter.lora.alpha is not finite");
    ad.name = r.opt_str("general.name").value_or("");

    struct Pair {
        const gguf::TensorInfo* a = nullptr;
        const gguf::TensorInfo* b = nullptr;
        int layer = 0;
        Proj proj = Proj::q;
    };
    std::map<std::pair<int, int>, Pair> pairs;  // ordered by (layer, projection)
    for (const gguf::TensorInfo& t : r.tensors()) {
        const bool is_a = ends_with(t.name, kSuffixA), is_b = ends_with(t.name, kSuffixB);
        if (!is_a && !is_b) bad("tensor '" + t.name + "' is not a LoRA factor (name must end in .lora_a or .lora_b)");
        const std::string target = t.name.substr(0, t.name.size() - 7);
        int layer = 0;
        Proj proj = Proj::q;
        if (!parse_projection(target, layer, proj)) {
            if (target == "token_embd.weight" || target == "output.weight" || ends_with(target, "_norm.weight"))
                fail(Status::unsupported, file + ": tensor '" + t.name + "' adapts '" + target +
                                              "'; only the attention and FFN projections (q, k, v, o, w1, w2, w3) can be adapted");
            bad("tensor '" + t.name + "' targets '" + target + "', which does not exist in a llama model");
        }
        if (layer >= base.n_layers)
            bad("tensor '" + t.name + "' targets layer " + std::to_string(layer) + " but the base model has " +
                std::to_string(base.n_layers) + " layers (wrong base model?)");
        Pair& p = pairs[{layer, proj_index(proj)}];
        p.layer = layer;
        p.proj = proj;
        (is_a ? p.a : p.b) = &t;
    }

    for (auto& [key, p] : pairs) {
        const std::string target = proj_tensor_name(p.layer, p.proj);
        if (!p.a) bad("tensor '" + target + kSuffixB + "' has no matching '" + target + kSuffixA + "'");
        if (!p.b) bad("tensor '" + target + kSuffixA + "' has no matching '" + target + kSuffixB + "'");
        const auto [out, in] = proj_shape(base, p.proj);
        const std::string base_shape = gguf::shape_string(std::vector<uint64_t>{uint64_t(in), uint64_t(out)});
        if (p.a->n_dims != 2 || p.a->ne[0] != uint64_t(in))
            bad("tensor '" + p.a->name + "' has shape " + gguf::shape_string(p.a->shape()) + "; base tensor '" + target +
                "' is " + base_shape + " so lora_a must be [" + std::to_string(in) + ", rank] (wrong base model?)");
        if (p.b->n_dims != 2 || p.b->ne[1] != uint64_t(out))
            bad("tensor '" + p.b->name + "' has shape " + gguf::shape_string(p.b->shape()) + "; base tensor '" + target +
                "' is " + base_shape + " so lora_b must be [rank, " + std::to_string(out) + "] (wrong base model?)");
        if (p.a->ne[1] != p.b->ne[0] || p.a->ne[1] == 0)
            bad("tensors '" + p.a->name + "' " + gguf::shape_string(p.a->shape()) + " and '" + p.b->name + "' " +
                gguf::shape_string(p.b->shape()) + " disagree on the rank");
        if (p.a->ne[1] > uint64_t(std::max(in, out)))
            bad("tensor '" + p.a->name + "' has rank " + std::to_string(p.a->ne[1]) + ", larger than the matrix it adapts");
        LoraTensor lt;
        lt.layer = p.layer;
        lt.proj = p.proj;
        lt.rank = int(p.a->ne[1]);
        lt.a = r.to_f32(*p.a);
        lt.b = r.to_f32(*p.b);
        check_finite(file, p.a->name, lt.a);
        check_finite(file, p.b->name, lt.b);
        ad.tensors.push_back(std::move(lt));
    }
    if (ad.tensors.empty()) bad("adapter holds no LoRA tensors");
    return ad;
}

LoraAdapter read_lora_adapter(const std::string& path, const ModelConfig& base) {
    const gguf::Reader r = gguf::Reader::open(path);
    return read_lora_adapter(r, base);
}

gguf::Writer lora_adapter_writer(const LoraAdapter& ad, const ModelConfig& base) {
    gguf::Writer w;
    w.set_str("general.architecture", "llama");
    w.set_str("general.type", "adapter");
    if (!ad.name.empty()) w.set_str("general.name", ad.name);
    w.set_str("adapter.type", "lora");
    w.set_f32("adapter.lora.alpha", ad.alpha);
    for (const LoraTensor& t : ad.tensors) {
        const auto [out, in] = proj_shape(base, t.proj);
        const std::string target = proj_tensor_name(t.layer, t.proj);
        if (t.layer < 0 || t.layer >= base.n_layers || t.rank <= 0 || t.a.size() != size_t(t.rank) * in ||
            t.b.size() != size_t(out) * t.rank)
            fail(Status::invalid_argument, "LoRA tensor for '" + target + "' does not fit the base model");
        w.add_tensor(target + kSuffixA, {uint64_t(in), uint64_t(t.rank)}, gguf::TensorType::F32, t.a);
        w.add_tensor(target + kSuffixB, {uint64_t(t.rank), uint64_t(out)}, gguf::TensorType::F32, t.b);
    }
    return w;
}

void write_lora_adapter(const std::string& path, const LoraAdapter& ad, const ModelConfig& base) {
    lora_adapter_writer(ad, base).write(path);
}

void merge_lora(ModelWeights& w, const LoraAdapter& ad, float scale) {
    if (!std::isfinite(scale)) fail(Status::invalid_argument, "LoRA scale must be finite");
    for (const LoraTensor& t : ad.tensors) {
        const auto [out, in] = proj_shape(w.cfg, t.proj);
        const std::string target = proj_tensor_name(t.layer, t.proj);
        if (t.layer < 0 || t.layer >= w.cfg.n_layers || t.a.size() != size_t(t.rank) * in || t.b.size() != size_t(out) * t.rank)
            fail(Status::invalid_argument, "LoRA tensor for '" + target + "' does not fit the base model");
        LayerWeights& L = w.layers[size_t(t.layer)];
        std::vector<float>* W = nullptr;
        switch (t.proj) {
            case Proj::q: W = &L.wq; break;
            case Proj::k: W = &L.wk; break;
            case Proj::v: W = &L.wv; break;
            case Proj::o: W = &L.wo; break;
            case Proj::w1: W = &L.w1; break;
            case Proj::w2: W = &L.w2; break;
            case Proj::w3: W = &L.w3; break;
        }
        const double s = ad.tensor_scale(t, scale);
        for (int o = 0; o < out; ++o)
            for (int i = 0; i < in; ++i) {
                double acc = 0.0;
                for (int k = 0; k < t.rank; ++k) acc += double(t.b[size_t(o) * t.rank + k]) * double(t.a[size_t(k) * in + i]);
                (*W)[size_t(o) * in + i] += float(s * acc);
            }
    }
}

}  // namespace si::train
