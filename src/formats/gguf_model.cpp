#include "formats/gguf_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <unordered_set>

#include "common/error.h"

namespace si {

namespace {

using gguf::TensorType;

constexpr const char* kArch = "llama";

std::string layer_tensor(int l, const char* what) { return "blk." + std::to_string(l) + "." + what + ".weight"; }

constexpr const char* kLayerTensors[] = {"attn_norm", "attn_q",   "attn_k",   "attn_v", "attn_output",
                                         "ffn_norm",  "ffn_gate", "ffn_down", "ffn_up"};

[[noreturn]] void bad(const gguf::Reader& r, const std::string& why) { fail(Status::format, r.name() + ": " + why); }

int get_int(const gguf::Reader& r, const std::string& key) {
    const uint32_t v = r.get_u32(key);
    if (v > uint32_t(std::numeric_limits<int>::max())) bad(r, key + " = " + std::to_string(v) + " is out of range");
    return int(v);
}

// Llama 3.1 RoPE scaling: the rope_freqs.weight tensor (what llama.cpp's converter writes), else factors computed
// from llama.rope.scaling.* when its type is llama3.
void read_rope_factors(const gguf::Reader& r, ModelConfig& c, const std::string& scaling) {
    const uint64_t half = uint64_t(c.head_dim() / 2);
    if (const gguf::TensorInfo* t = r.find_tensor("rope_freqs.weight")) {
        if (t->n_dims != 1 || t->ne[0] != half)
            bad(r, "tensor 'rope_freqs.weight' has shape " + gguf::shape_string(t->shape()) + ", expected [" +
                       std::to_string(half) + "] (head dimension / 2)");
        c.rope_freq_factors = r.to_f32(*t);
    } else if (scaling == "llama3") {
        const float orig = float(r.opt_u32("llama.rope.scaling.original_context_length").value_or(8192));
        c.rope_freq_factors = llama3_rope_factors(c.head_dim(), c.rope_theta,
                                                  r.opt_f32("llama.rope.scaling.factor").value_or(8.0f),
                                                  r.opt_f32("llama.rope.scaling.low_freq_factor").value_or(1.0f),
                                                  r.opt_f32("llama.rope.scaling.high_freq_factor").value_or(4.0f), orig);
    }
    c.validate(r.name());
}

}  // namespace

ModelConfig read_gguf_config(const gguf::Reader& r) {
    const std::string arch = r.get_str("general.architecture");
    if (arch != kArch) fail(Status::unsupported, r.name() + ": architecture '" + arch + "' is not supported (only llama)");
    if (const auto experts = r.opt_u32("llama.expert_count"); experts && *experts > 0)
        fail(Status::unsupported, r.name() + ": mixture-of-experts llama models (llama.expert_count = " +
                                      std::to_string(*experts) + ") are not supported");
    const auto scaling = r.opt_str("llama.rope.scaling.type");
    if (scaling && *scaling != "none" && *scaling != "llama3")
        fail(Status::unsupported, r.name() + ": RoPE scaling '" + *scaling + "' is not supported (only llama3)");

    ModelConfig c;
    c.dim = get_int(r, "llama.embedding_length");
    c.hidden_dim = get_int(r, "llama.feed_forward_length");
    c.n_layers = get_int(r, "llama.block_count");
    c.n_heads = get_int(r, "llama.attention.head_count");
    c.n_kv_heads = r.has("llama.attention.head_count_kv") ? get_int(r, "llama.attention.head_count_kv") : c.n_heads;
    c.seq_len = get_int(r, "llama.context_length");
    c.rope_theta = r.opt_f32("llama.rope.freq_base").value_or(10000.0f);
    c.norm_eps = r.get_f32("llama.attention.layer_norm_rms_epsilon");

    // The vocabulary size: llama.vocab_size, else token_embd's outer dimension, else the tokenizer's token count.
    std::optional<uint64_t> from_key, from_tensor;
    if (r.has("llama.vocab_size")) from_key = r.get_u32("llama.vocab_size");
    if (const gguf::TensorInfo* t = r.find_tensor("token_embd.weight"); t && t->n_dims >= 2) from_tensor = t->ne[1];
    if (from_key && from_tensor && *from_key != *from_tensor)
        bad(r, "llama.vocab_size " + std::to_string(*from_key) + " disagrees with token_embd.weight shape " +
                   gguf::shape_string(r.find_tensor("token_embd.weight")->shape()));
    uint64_t vocab = 0;
    if (from_key) vocab = *from_key;
    else if (from_tensor) vocab = *from_tensor;
    else if (const gguf::Value* tok = r.find("tokenizer.ggml.tokens"); tok && tok->type() == gguf::ValueType::array)
        vocab = tok->array_size();
    else bad(r, "vocabulary size unknown: no llama.vocab_size, token_embd.weight or tokenizer.ggml.tokens");
    if (vocab > uint64_t(std::numeric_limits<int>::max())) bad(r, "vocabulary size " + std::to_string(vocab) + " is out of range");
    c.vocab_size = int(vocab);

    c.validate(r.name());
    read_rope_factors(r, c, scaling.value_or("none"));
    if (const auto rot = r.opt_u32("llama.rope.dimension_count"); rot && *rot != uint32_t(c.head_dim()))
        fail(Status::unsupported, r.name() + ": llama.rope.dimension_count " + std::to_string(*rot) +
                                      " differs from the head dimension " + std::to_string(c.head_dim()) +
                                      " (partial RoPE is not supported)");
    return c;
}

GgufSource::GgufSource(std::shared_ptr<const gguf::Reader> r) : GgufSource(*r) { keep_ = std::move(r); }

GgufSource::GgufSource(std::shared_ptr<const gguf::Reader> r, Absent absent)
    : keep_(std::move(r)), r_(keep_.get()), absent_(std::move(absent)) {
    init();
}

GgufSource::GgufSource(const gguf::Reader& r) : r_(&r) { init(); }

void GgufSource::init() {
    const gguf::Reader& r = *r_;
    cfg_ = read_gguf_config(r);
    const ModelConfig& c = cfg_;
    const uint64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), v = c.vocab_size;

    // Anything beyond the plain llama layout (biases, rope_freqs, ...) would change the computation: refuse it
    // rather than silently ignore it, as llama.cpp does.
    std::unordered_set<std::string> expected = {"token_embd.weight", "output_norm.weight", "output.weight",
                                                "rope_freqs.weight"};  // read by read_gguf_config
    for (int l = 0; l < c.n_layers; ++l)
        for (const char* t : kLayerTensors) expected.insert(layer_tensor(l, t));
    for (const gguf::TensorInfo& t : r.tensors())
        if (!expected.count(t.name))
            fail(Status::unsupported, r.name() + ": tensor '" + t.name + "' is not part of the supported llama layout");
    for (const auto& [name, ne] : absent_) {
        if (!expected.count(name) || name == "rope_freqs.weight")
            fail(Status::unsupported, r.name() + ": tensor '" + name + "' is not part of the supported llama layout");
        if (r.find_tensor(name)) bad(r, "tensor '" + name + "' is both in the file and left out of it");
    }

    // Every tensor's shape and type, in file order of the model, before anything is dequantised.
    auto check = [&](const std::string& name, std::initializer_list<uint64_t> shape) {
        std::array<uint64_t, gguf::kMaxDims> want{1, 1, 1, 1};
        std::copy(shape.begin(), shape.end(), want.begin());
        if (const auto a = absent_.find(name); a != absent_.end()) {
            std::array<uint64_t, gguf::kMaxDims> ne{1, 1, 1, 1};
            if (a->second.size() > ne.size()) bad(r, "tensor '" + name + "' has too many dimensions");
            std::copy(a->second.begin(), a->second.end(), ne.begin());
            if (ne != want)
                bad(r, "tensor '" + name + "' has shape " + gguf::shape_string(a->second) + ", expected " +
                           gguf::shape_string(std::vector<uint64_t>(shape)));
            return;
        }
        const gguf::TensorInfo& t = r.tensor(name);
        // Trailing dimensions of 1 are equivalent (as in llama.cpp's shape check).
        if (t.ne != want)
            bad(r, "tensor '" + name + "' has shape " + gguf::shape_string(t.shape()) + ", expected " +
                       gguf::shape_string(std::vector<uint64_t>(shape)));
        if (!gguf::can_dequantize(t.type))
            fail(Status::unsupported, r.name() + ": tensor '" + t.name + "' has type " + gguf::type_name(t.type) +
                                          ", which cannot be dequantised (supported: F32, F16, BF16, Q4_0, Q4_1, "
                                          "Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
    };
    check("token_embd.weight", {d, v});
    for (int l = 0; l < c.n_layers; ++l) {
        check(layer_tensor(l, "attn_norm"), {d});
        check(layer_tensor(l, "attn_q"), {d, d});
        check(layer_tensor(l, "attn_k"), {d, kv});
        check(layer_tensor(l, "attn_v"), {d, kv});
        check(layer_tensor(l, "attn_output"), {d, d});
        check(layer_tensor(l, "ffn_norm"), {d});
        check(layer_tensor(l, "ffn_gate"), {d, h});
        check(layer_tensor(l, "ffn_down"), {h, d});
        check(layer_tensor(l, "ffn_up"), {d, h});
    }
    check("output_norm.weight", {d});
    tied_ = r.find_tensor("output.weight") == nullptr && !absent_.count("output.weight");
    if (!tied_) check("output.weight", {d, v});
}

void GgufSource::do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const {
    if (absent_.count(name)) {
        std::fill(out, out + n * tensor_cols(name), 0.0f);
        return;
    }
    const gguf::TensorInfo& t = r_->tensor(name);
    // Rows are whole blocks (the reader checked ne[0] against the block size), so a row range is a byte range.
    const uint64_t rows = t.n_elements / t.ne[0];
    const uint64_t row_bytes = t.n_bytes / rows;
    const std::span<const uint8_t> bytes = r_->tensor_data(t);
    gguf::decode(t.type, bytes.data() + uint64_t(row0) * row_bytes, size_t(uint64_t(n) * t.ne[0]), out);
}

void GgufSource::release(const std::string& name) const {
    if (absent_.count(name)) return;
    if (const gguf::TensorInfo* t = r_->find_tensor(name)) r_->release(*t);
}

ModelWeights load_gguf_model(const gguf::Reader& r) {
    ModelWeights w = materialize(GgufSource(r));
    w.validate(r.name());
    return w;
}

Vocab load_gguf_vocab(const gguf::Reader& r) {
    const std::string model = r.get_str("tokenizer.ggml.model");
    if (model != "llama" && model != "gpt2")
        fail(Status::unsupported, r.name() + ": tokenizer model '" + model +
                                      "' is not supported (llama: SentencePiece, gpt2: byte-level BPE)");
    Vocab vocab;
    vocab.model = model;
    vocab.pieces = r.get_str_array("tokenizer.ggml.tokens");
    const size_t n = vocab.pieces.size();
    if (n == 0) bad(r, "tokenizer.ggml.tokens is empty");
    if (n > size_t(std::numeric_limits<int32_t>::max())) bad(r, "tokenizer.ggml.tokens has too many entries");

    if (r.has("tokenizer.ggml.scores")) {
        vocab.scores = r.get_f32_array("tokenizer.ggml.scores");
        if (vocab.scores.size() != n)
            bad(r, "tokenizer.ggml.scores has " + std::to_string(vocab.scores.size()) + " entries, expected " +
                       std::to_string(n) + " (one per token)");
    } else {
        vocab.scores.assign(n, 0.0f);
    }

    if (r.has("tokenizer.ggml.token_type")) {
        const std::vector<int64_t> types = r.get_int_array("tokenizer.ggml.token_type");
        if (types.size() != n)
            bad(r, "tokenizer.ggml.token_type has " + std::to_string(types.size()) + " entries, expected " +
                       std::to_string(n) + " (one per token)");
        vocab.types.resize(n);
        for (size_t i = 0; i < n; ++i) {
            if (types[i] < int64_t(TokenType::undefined) || types[i] > int64_t(TokenType::byte))
                bad(r, "tokenizer.ggml.token_type[" + std::to_string(i) + "] = " + std::to_string(types[i]) +
                           " is not a valid token type (0..6)");
            vocab.types[i] = TokenType(types[i]);
        }
    } else {
        vocab.types.assign(n, TokenType::normal);
    }

    auto id = [&](const char* key, int32_t fallback) {
        const bool present = r.has(key);
        const uint32_t v = present ? r.get_u32(key) : uint32_t(fallback);
        if (v >= n)
            bad(r, std::string(key) + " " + std::to_string(v) + (present ? "" : " (default)") +
                       " is out of range (vocabulary has " + std::to_string(n) + " tokens)");
        return int32_t(v);
    };
    vocab.bos_id = id("tokenizer.ggml.bos_token_id", vocab.bos_id);
    vocab.eos_id = id("tokenizer.ggml.eos_token_id", vocab.eos_id);
    // Llama 3 and chat templates: byte-level BPE merges, end-of-turn token, the template (see docs/CHAT.md).
    const bool bpe = vocab.is_bpe();
    vocab.unk_id = bpe && !r.has("tokenizer.ggml.unknown_token_id") ? -1 : id("tokenizer.ggml.unknown_token_id", vocab.unk_id);
    if (r.has("tokenizer.ggml.eot_token_id")) vocab.eot_id = id("tokenizer.ggml.eot_token_id", -1);
    vocab.add_space_prefix = r.opt_bool("tokenizer.ggml.add_space_prefix").value_or(!bpe);
    if (bpe) {
        vocab.pre = r.opt_str("tokenizer.ggml.pre").value_or("default");
        if (!r.has("tokenizer.ggml.merges"))
            bad(r, "tokenizer.ggml.merges is missing: a gpt2 (byte-level BPE) vocabulary needs its merges");
        vocab.merges = r.get_str_array("tokenizer.ggml.merges");
        if (vocab.merges.empty()) bad(r, "tokenizer.ggml.merges is empty: a gpt2 (byte-level BPE) vocabulary needs its merges");
    }
    vocab.chat_template = r.opt_str("tokenizer.chat_template").value_or("");
    return vocab;
}

const char* gguf_weight_type_name(GgufWeightType t) {
    switch (t) {
        case GgufWeightType::f32: return "f32";
        case GgufWeightType::f16: return "f16";
        case GgufWeightType::q8_0: return "q8_0";
    }
    return "?";
}

std::vector<std::string> write_gguf_model(const std::string& path, const ModelWeights& w, const Vocab& vocab,
                                          GgufWeightType type, const std::string& name) {
    try {
        w.validate(path);
    } catch (const Error& e) {
        fail(Status::invalid_argument, std::string("cannot write model: ") + e.what());
    }
    return write_gguf_model(path, DenseSource(w), vocab, type, name);
}

std::vector<std::string> write_gguf_model(const std::string& path, const TensorSource& src, const Vocab& vocab,
                                          GgufWeightType type, const std::string& name) {
    const ModelConfig& c = src.config();
    try {
        c.validate(path);
    } catch (const Error& e) {
        fail(Status::invalid_argument, std::string("cannot write model: ") + e.what());
    }
    const size_t n = vocab.size();
    auto bad_vocab = [&](const std::string& why) { fail(Status::invalid_argument, path + ": cannot write vocabulary: " + why); };
    if (n != size_t(c.vocab_size))
        bad_vocab(std::to_string(n) + " tokens, but the model's vocabulary size is " + std::to_string(c.vocab_size));
    if (!vocab.scores.empty() && vocab.scores.size() != n) bad_vocab("scores do not match the token count");
    if (!vocab.types.empty() && vocab.types.size() != n) bad_vocab("token types do not match the token count");
    for (const int32_t id : {vocab.bos_id, vocab.eos_id, vocab.unk_id == -1 ? vocab.bos_id : vocab.unk_id})
        if (id < 0 || size_t(id) >= n) bad_vocab("special token id " + std::to_string(id) + " is out of range");

    gguf::Writer g;
    // llama.cpp's file types: ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7.
    const uint32_t file_type = type == GgufWeightType::f32 ? 0 : type == GgufWeightType::f16 ? 1 : 7;
    g.set_str("general.architecture", kArch);
    g.set_str("general.name", name);
    g.set_u32("general.file_type", file_type);
    if (type == GgufWeightType::q8_0) g.set_u32("general.quantization_version", 2);
    g.set_u32("llama.context_length", uint32_t(c.seq_len));
    g.set_u32("llama.embedding_length", uint32_t(c.dim));
    g.set_u32("llama.feed_forward_length", uint32_t(c.hidden_dim));
    g.set_u32("llama.block_count", uint32_t(c.n_layers));
    g.set_u32("llama.attention.head_count", uint32_t(c.n_heads));
    g.set_u32("llama.attention.head_count_kv", uint32_t(c.n_kv_heads));
    g.set_u32("llama.rope.dimension_count", uint32_t(c.head_dim()));
    g.set_f32("llama.rope.freq_base", c.rope_theta);
    g.set_f32("llama.attention.layer_norm_rms_epsilon", c.norm_eps);
    g.set_u32("llama.vocab_size", uint32_t(c.vocab_size));

    g.set_str("tokenizer.ggml.model", vocab.model);
    if (vocab.is_bpe()) {
        g.set_str("tokenizer.ggml.pre", vocab.pre);
        g.set_strs("tokenizer.ggml.merges", vocab.merges);
    }
    if (vocab.eot_id >= 0) g.set_u32("tokenizer.ggml.eot_token_id", uint32_t(vocab.eot_id));
    if (!vocab.chat_template.empty()) g.set_str("tokenizer.chat_template", vocab.chat_template);
    g.set_strs("tokenizer.ggml.tokens", vocab.pieces);
    g.set_array("tokenizer.ggml.scores", vocab.scores.empty() ? std::vector<float>(n, 0.0f) : vocab.scores);
    std::vector<int32_t> types(n, int32_t(TokenType::normal));
    for (size_t i = 0; i < vocab.types.size(); ++i) types[i] = int32_t(vocab.types[i]);
    g.set_array("tokenizer.ggml.token_type", types);
    g.set_u32("tokenizer.ggml.bos_token_id", uint32_t(vocab.bos_id));
    g.set_u32("tokenizer.ggml.eos_token_id", uint32_t(vocab.eos_id));
    if (vocab.unk_id >= 0) g.set_u32("tokenizer.ggml.unknown_token_id", uint32_t(vocab.unk_id));
    g.set_bool("tokenizer.ggml.add_bos_token", true);
    g.set_bool("tokenizer.ggml.add_eos_token", false);
    g.set_bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix);

    std::vector<std::string> notes;
    const TensorType matrix_type = type == GgufWeightType::f32 ? TensorType::F32
                                   : type == GgufWeightType::f16 ? TensorType::F16
                                                                 : TensorType::Q8_0;
    // Tensors are produced only as the file is written (one in memory at a time).
    auto matrix = [&](const std::string& tname, uint64_t rows, uint64_t cols) {
        TensorType t = matrix_type;
        if (t == TensorType::Q8_0 && cols % gguf::kQ8_0Block != 0) {
            t = TensorType::F16;
            notes.push_back(tname + ": ne[0] = " + std::to_string(cols) + " is not a multiple of 32; stored as F16");
        }
        const uint64_t ne[2] = {cols, rows};
        g.add_tensor_deferred(tname, ne, t, [&src, tname](uint64_t r0, uint64_t k, float* out) {
            src.read_rows(tname, int64_t(r0), int64_t(k), out);
            if (int64_t(r0 + k) == src.tensor_rows(tname)) src.release(tname);
        });
    };
    auto vec = [&](const std::string& tname) {
        const uint64_t ne[1] = {uint64_t(c.dim)};
        g.add_tensor_deferred(tname, ne, TensorType::F32, [&src, tname](uint64_t r0, uint64_t k, float* out) {
            src.read_rows(tname, int64_t(r0), int64_t(k), out);
            if (int64_t(r0 + k) == src.tensor_rows(tname)) src.release(tname);
        });
    };
    const uint64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), v = c.vocab_size;
    matrix("token_embd.weight", v, d);
    for (int l = 0; l < c.n_layers; ++l) {
        vec(layer_tensor(l, "attn_norm"));
        matrix(layer_tensor(l, "attn_q"), d, d);
        matrix(layer_tensor(l, "attn_k"), kv, d);
        matrix(layer_tensor(l, "attn_v"), kv, d);
        matrix(layer_tensor(l, "attn_output"), d, d);
        vec(layer_tensor(l, "ffn_norm"));
        matrix(layer_tensor(l, "ffn_gate"), h, d);
        matrix(layer_tensor(l, "ffn_down"), d, h);
        matrix(layer_tensor(l, "ffn_up"), h, d);
    }
    vec("output_norm.weight");
    if (!c.rope_freq_factors.empty())
        g.add_tensor("rope_freqs.weight", {uint64_t(c.rope_freq_factors.size())}, TensorType::F32, c.rope_freq_factors);
    if (!src.tied()) matrix("output.weight", v, d);
    g.write(path);
    return notes;
}

GgufInfo describe_gguf(const gguf::Reader& r) {
    GgufInfo info;
    info.file = r.name();
    info.version = r.version();
    info.alignment = r.alignment();
    info.file_size = r.file_size();
    info.data_offset = r.data_offset();
    if (const gguf::Value* a = r.find("general.architecture"); a && a->as_string()) info.architecture = *a->as_string();
    if (const gguf::Value* nm = r.find("general.name"); nm && nm->as_string()) info.model_name = *nm->as_string();
    try {
        info.config = read_gguf_config(r);
    } catch (const Error& e) {
        info.config_error = e.what();
    }
    info.tied_classifier = r.find_tensor("output.weight") == nullptr;
    for (const gguf::KeyValue& kv : r.metadata()) info.metadata.emplace_back(kv.key, gguf::render(kv.value));
    for (const gguf::TensorInfo& t : r.tensors()) {
        info.tensors.push_back({t.name, gguf::type_name(t.type), t.shape(), t.n_elements, t.n_bytes, t.offset});
        info.n_params += t.n_elements;
        info.tensor_bytes += t.n_bytes;
    }
    return info;
}

}  // namespace si
