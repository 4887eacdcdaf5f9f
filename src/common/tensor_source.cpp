#include "common/tensor_source.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace si {

namespace {

// A tensor of the llama layout: which, and its layer (-1 outside blocks).
struct TensorId {
    enum Kind { embd, attn_norm, ffn_norm, proj, final_norm, output } kind = embd;
    int layer = -1;
    Proj p = Proj::q;
};

[[noreturn]] void no_tensor(const std::string& name) {
    fail(Status::invalid_argument, "tensor '" + name + "' is not part of this model");
}

TensorId parse(const ModelConfig& cfg, bool tied, const std::string& name) {
    if (name == "token_embd.weight") return {TensorId::embd};
    if (name == "output_norm.weight") return {TensorId::final_norm};
    if (name == "output.weight") {
        if (tied) no_tensor(name);
        return {TensorId::output};
    }
    if (name.rfind("blk.", 0) != 0) no_tensor(name);
    const size_t dot = name.find('.', 4);
    if (dot == std::string::npos || dot == 4 || dot - 4 > 6) no_tensor(name);
    int layer = 0;
    for (size_t i = 4; i < dot; ++i) {
        if (name[i] < '0' || name[i] > '9') no_tensor(name);
        layer = layer * 10 + (name[i] - '0');
    }
    if (layer >= cfg.n_layers) no_tensor(name);
    const std::string rest = name.substr(dot + 1);
    if (rest == "attn_norm.weight") return {TensorId::attn_norm, layer};
    if (rest == "ffn_norm.weight") return {TensorId::ffn_norm, layer};
    for (Proj p : kAllProj)
        if (rest == std::string(proj_gguf_stem(p)) + ".weight") return {TensorId::proj, layer, p};
    no_tensor(name);
}

ProjShape shape_of(const ModelConfig& cfg, const TensorId& id) {
    switch (id.kind) {
        case TensorId::embd:
        case TensorId::output: return {cfg.vocab_size, cfg.dim};
        case TensorId::proj: return proj_shape(cfg, id.p);
        default: return {1, cfg.dim};
    }
}

}  // namespace

int64_t TensorSource::tensor_rows(const std::string& name) const {
    return shape_of(config(), parse(config(), tied(), name)).rows;
}

int64_t TensorSource::tensor_cols(const std::string& name) const {
    return shape_of(config(), parse(config(), tied(), name)).cols;
}

void TensorSource::read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const {
    const ProjShape s = shape_of(config(), parse(config(), tied(), name));
    if (row0 < 0 || n < 0 || row0 + n > s.rows)
        fail(Status::invalid_argument, "tensor '" + name + "': rows [" + std::to_string(row0) + ", " +
                                           std::to_string(row0 + n) + ") out of range (" + std::to_string(s.rows) +
                                           " rows)");
    if (n == 0) return;
    do_read_rows(name, row0, n, out);
    read_.fetch_add(uint64_t(n * s.cols), std::memory_order_relaxed);
}

std::vector<float> TensorSource::read(const std::string& name) const {
    const ProjShape s = shape_of(config(), parse(config(), tied(), name));
    std::vector<float> out(size_t(s.rows * s.cols));
    read(name, out.data());
    return out;
}

void TensorSource::read(const std::string& name, float* out) const {
    read_rows(name, 0, tensor_rows(name), out);
    release(name);  // the caller has its copy
}

std::vector<std::string> model_tensor_names(const ModelConfig& cfg, bool tied) {
    std::vector<std::string> names = {"token_embd.weight"};
    for (int l = 0; l < cfg.n_layers; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        names.push_back(b + "attn_norm.weight");
        for (Proj p : {Proj::q, Proj::k, Proj::v, Proj::o}) names.push_back(proj_tensor_name(l, p));
        names.push_back(b + "ffn_norm.weight");
        for (Proj p : {Proj::w1, Proj::w2, Proj::w3}) names.push_back(proj_tensor_name(l, p));
    }
    names.push_back("output_norm.weight");
    if (!tied) names.push_back("output.weight");
    return names;
}

DenseSource::DenseSource(const ModelWeights& w) : w_(w) { w.validate("model"); }

const std::vector<float>& DenseSource::tensor(const std::string& name) const {
    const TensorId id = parse(w_.cfg, w_.tied(), name);
    switch (id.kind) {
        case TensorId::embd: return w_.tok_embeddings;
        case TensorId::output: return w_.classifier;
        case TensorId::final_norm: return w_.final_norm;
        case TensorId::attn_norm: return w_.layers[size_t(id.layer)].attn_norm;
        case TensorId::ffn_norm: return w_.layers[size_t(id.layer)].ffn_norm;
        case TensorId::proj: return proj_weights(w_.layers[size_t(id.layer)], id.p);
    }
    no_tensor(name);
}

void DenseSource::do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const {
    const std::vector<float>& t = tensor(name);
    const int64_t cols = tensor_cols(name);
    std::memcpy(out, t.data() + row0 * cols, size_t(n * cols) * sizeof(float));
}

ModelWeights materialize(const TensorSource& src) {
    ModelWeights w;
    w.cfg = src.config();
    const ModelConfig& c = w.cfg;
    w.tok_embeddings = src.read("token_embd.weight");
    w.layers.resize(size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l) {
        LayerWeights& L = w.layers[size_t(l)];
        const std::string b = "blk." + std::to_string(l) + ".";
        L.attn_norm = src.read(b + "attn_norm.weight");
        L.ffn_norm = src.read(b + "ffn_norm.weight");
        for (Proj p : kAllProj) proj_weights(L, p) = src.read(proj_tensor_name(l, p));
    }
    w.final_norm = src.read("output_norm.weight");
    if (!src.tied()) w.classifier = src.read("output.weight");
    w.validate("model");
    return w;
}

}  // namespace si
