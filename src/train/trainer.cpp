#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <numbers>
#include <sstream>

#include "common/error.h"
#include "formats/gguf.h"

namespace si::train {

namespace {

constexpr const char* kCheckpointType = "secureinfer.checkpoint";

// SplitMix64 finaliser: a fixed, portable mixing function (std:: distributions differ between libraries).
uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Uniform double in [0, 1) from 53 bits.
double unit(uint64_t x) { return double(x >> 11) * 0x1.0p-53; }

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}
constexpr uint64_t kFnvBasis = 0xcbf29ce484222325ull;

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(Status::io, path + ": cannot open file");
    std::ostringstream ss;
    ss << f.rdbuf();
    if (f.bad()) fail(Status::io, path + ": read error");
    return ss.str();
}

std::vector<float> to_vec(std::span<const float> s) { return {s.begin(), s.end()}; }

}  // namespace

void TrainOptions::validate(const ModelConfig& cfg) const {
    auto bad = [](const std::string& why) { fail(Status::invalid_argument, why); };
    if (!full) {
        if (lora_rank <= 0 || lora_rank > cfg.dim) bad("LoRA rank " + std::to_string(lora_rank) + " must be in [1, " + std::to_string(cfg.dim) + "]");
        if (lora_targets.empty()) bad("no LoRA target projections");
        if (!std::isfinite(lora_alpha) || lora_alpha < 0.0f) bad("LoRA alpha must be finite and non-negative");
    }
    if (steps <= 0) bad("steps must be positive");
    if (batch <= 0) bad("batch must be positive");
    if (ctx < 2 || ctx > cfg.seq_len)
        bad("context " + std::to_string(ctx) + " must be in [2, " + std::to_string(cfg.seq_len) + "] (the model's context)");
    if (!(lr > 0.0f) || !std::isfinite(lr)) bad("learning rate must be positive");
    if (!(min_lr_ratio >= 0.0f && min_lr_ratio <= 1.0f)) bad("min-lr-ratio must be in [0, 1]");
    if (warmup < 0) bad("warm-up must not be negative");
    if (!(weight_decay >= 0.0f) || !std::isfinite(weight_decay)) bad("weight decay must be non-negative");
    if (!(beta1 >= 0.0f && beta1 < 1.0f && beta2 >= 0.0f && beta2 < 1.0f)) bad("Adam betas must be in [0, 1)");
    if (!(adam_eps > 0.0f)) bad("Adam epsilon must be positive");
    if (!(grad_clip >= 0.0f) || !std::isfinite(grad_clip)) bad("gradient clip must be non-negative");
    if (threads < 0) bad("threads must not be negative");
}

size_t TextCorpus::train_tokens() const {
    size_t n = 0;
    for (const auto& s : train) n += s.size();
    return n;
}

size_t TextCorpus::eval_tokens() const {
    size_t n = 0;
    for (const auto& s : eval) n += s.size();
    return n;
}

TextCorpus load_corpus(const Tokenizer& tok, const std::vector<std::string>& train_files,
                       const std::vector<std::string>& eval_files, double eval_fraction) {
    if (train_files.empty()) fail(Status::invalid_argument, "no training files");
    if (!(eval_fraction >= 0.0 && eval_fraction < 1.0)) fail(Status::invalid_argument, "eval fraction must be in [0, 1)");
    TextCorpus c;
    c.bos = tok.bos();
    for (const auto& f : train_files) {
        std::vector<int32_t> ids = tok.encode(read_file(f), false);
        if (ids.size() < 2) fail(Status::invalid_argument, f + ": too little text to train on (" + std::to_string(ids.size()) + " tokens)");
        const size_t held = size_t(double(ids.size()) * eval_fraction);
        if (held > 0) c.eval.emplace_back(ids.end() - std::ptrdiff_t(held), ids.end());
        ids.resize(ids.size() - held);
        c.train.push_back(std::move(ids));
    }
    for (const auto& f : eval_files) {
        std::vector<int32_t> ids = tok.encode(read_file(f), false);
        if (ids.empty()) fail(Status::invalid_argument, f + ": no tokens to evaluate");
        c.eval.push_back(std::move(ids));
    }
    return c;
}

double learning_rate(const TrainOptions& o, int step) {
    if (step < o.warmup) return double(o.lr) * double(step + 1) / double(o.warmup);
    const double span = std::max(1, o.steps - o.warmup);
    const double progress = std::min(1.0, double(step - o.warmup) / span);
    const double lo = double(o.lr) * o.min_lr_ratio;
    return lo + (double(o.lr) - lo) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

Trainer::Trainer(const ModelWeights& base, const TrainOptions& options, TextCorpus corpus)
    : cfg_(base.cfg), opt_(options), corpus_(std::move(corpus)) {
    base.validate("base model");
    opt_.validate(cfg_);
    tied_ = base.tied();

    // Window starts: a window needs ctx tokens of its stream (BOS + ctx - 1 as input, ctx targets).
    uint64_t total = 0;
    for (const auto& s : corpus_.train) {
        total += s.size() >= size_t(opt_.ctx) ? s.size() - size_t(opt_.ctx) + 1 : 0;
        start_offsets_.push_back(total);
    }
    if (total == 0)
        fail(Status::invalid_argument, "the training text is shorter than one window of " + std::to_string(opt_.ctx) + " tokens");

    pool_ = std::make_unique<ThreadPool>(opt_.threads);
    for (int i = 0; i < pool_->size(); ++i) {
        inline_pools_.push_back(std::make_unique<ThreadPool>(1));
        nets_.push_back(std::make_unique<Transformer<float>>(cfg_, *inline_pools_.back()));
    }
    base_layout_ = model_layout(cfg_, tied_);
    if (opt_.full) {
        layout_ = base_layout_;
        params_ = pack_model<float>(base, layout_);
        base_hash_ = base_hash(params_);
    } else {
        base_ = pack_model<float>(base, base_layout_);
        base_hash_ = base_hash(base_);
        layout_ = lora_layout(cfg_, opt_.lora_rank, opt_.lora_targets);
        params_.assign(layout_.size(), 0.0f);
        // A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0: the adapter starts as the identity and A still receives gradient
        // once B moves (the usual LoRA initialisation).
        for (size_t si = 0; si < layout_.slots().size(); ++si) {
            const TensorSlot& s = layout_.slots()[si];
            if (s.name.size() < 7 || s.name.compare(s.name.size() - 7, 7, ".lora_a") != 0) continue;
            const double bound = 1.0 / std::sqrt(double(s.cols));
            for (size_t i = 0; i < s.size(); ++i) {
                const uint64_t h = mix64(mix64(opt_.seed ^ 0x4c6f5241ull) + (uint64_t(si) << 32) + i);
                params_[s.offset + i] = float((2.0 * unit(h) - 1.0) * bound);
            }
        }
    }
    grads_.assign(params_.size(), 0.0f);
    adam_m_.assign(params_.size(), 0.0f);
    adam_v_.assign(params_.size(), 0.0f);
}

Trainer::~Trainer() = default;

ModelRef<const float> Trainer::weight_view() const {
    if (opt_.full) return bind_model<const float>(cfg_, layout_, params_.data());
    ModelRef<const float> r = bind_model<const float>(cfg_, base_layout_, base_.data());
    bind_lora<const float>(r, cfg_, layout_, params_.data());
    return r;
}

Trainer::WindowOrigin Trainer::window_origin(int step, int index) const {
    const uint64_t total = start_offsets_.back();
    const uint64_t h = mix64(mix64(opt_.seed) + (uint64_t(uint32_t(step)) << 20) + uint64_t(index));
    const uint64_t r = uint64_t(unit(h) * double(total));
    const size_t f = size_t(std::upper_bound(start_offsets_.begin(), start_offsets_.end(), r) - start_offsets_.begin());
    const uint64_t first = f == 0 ? 0 : start_offsets_[f - 1];
    return {f, r - first};
}

void Trainer::sample_window(int step, int index, int32_t* tokens, int32_t* targets) const {
    const WindowOrigin o = window_origin(step, index);
    const int32_t* src = corpus_.train[o.stream].data() + o.offset;
    tokens[0] = corpus_.bos;
    std::copy_n(src, opt_.ctx - 1, tokens + 1);
    std::copy_n(src, opt_.ctx, targets);
}

ModelRef<float> Trainer::grad_view(std::vector<float>& g) const {
    if (opt_.full) return bind_model<float>(cfg_, layout_, g.data());
    ModelRef<float> r;
    bind_lora<float>(r, cfg_, layout_, g.data());
    return r;
}

float Trainer::lora_scale() const {
    if (opt_.full) return 0.0f;
    return opt_.lora_alpha != 0.0f ? opt_.lora_alpha / float(opt_.lora_rank) : 1.0f;
}

StepStats Trainer::train_step() {
    if (done()) fail(Status::invalid_argument, "training already finished (" + std::to_string(opt_.steps) + " steps)");
    const int S = opt_.ctx, W = int(nets_.size());
    const float s = lora_scale();
    const ModelRef<const float> w = weight_view();
    const float loss_scale = 1.0f / float(int64_t(opt_.batch) * S);
    window_grads_.resize(size_t(opt_.batch));
    std::vector<double> losses(size_t(opt_.batch));
    std::vector<int64_t> counts(size_t(opt_.batch));
    // Worker slot k handles windows k, k + W, ...; which thread runs a slot does not matter.
    pool_->parallel_for(W, 1, [&](int64_t b, int64_t e) {
        std::vector<int32_t> tokens(static_cast<size_t>(S)), targets(static_cast<size_t>(S));
        for (int64_t k = b; k < e; ++k) {
            Transformer<float>& net = *nets_[size_t(k)];
            for (int i = int(k); i < opt_.batch; i += W) {
                std::vector<float>& g = window_grads_[size_t(i)];
                g.assign(params_.size(), 0.0f);
                sample_window(step_, i, tokens.data(), targets.data());
                losses[size_t(i)] = net.forward(w, s, tokens.data(), targets.data(), 1, S);
                counts[size_t(i)] = net.n_scored();
                net.backward(w, grad_view(g), s, loss_scale);
            }
        }
    });
    double loss = 0.0;
    int64_t scored = 0;
    std::fill(grads_.begin(), grads_.end(), 0.0f);
    for (int i = 0; i < opt_.batch; ++i) {
        loss += losses[size_t(i)];
        scored += counts[size_t(i)];
        const std::vector<float>& g = window_grads_[size_t(i)];
        for (size_t j = 0; j < grads_.size(); ++j) grads_[j] += g[j];
    }

    double norm2 = 0.0;
    for (float x : grads_) norm2 += double(x) * double(x);
    const double norm = std::sqrt(norm2);
    if (!std::isfinite(norm)) fail(Status::internal, "training diverged: gradient norm is not finite at step " + std::to_string(step_ + 1));
    const float clip = opt_.grad_clip > 0.0f && norm > opt_.grad_clip ? float(opt_.grad_clip / norm) : 1.0f;

    // AdamW with bias correction; decoupled weight decay on matrices only.
    const double lr = learning_rate(opt_, step_);
    const int t = step_ + 1;
    const float b1 = opt_.beta1, b2 = opt_.beta2;
    const float bc1 = float(1.0 - std::pow(double(b1), t)), bc2 = float(1.0 - std::pow(double(b2), t));
    const float lrf = float(lr), wd = opt_.weight_decay;
    for (const TensorSlot& sl : layout_.slots()) {
        const float decay = sl.decay ? wd : 0.0f;
        for (size_t i = sl.offset; i < sl.offset + sl.size(); ++i) {
            const float gi = grads_[i] * clip;
            adam_m_[i] = b1 * adam_m_[i] + (1.0f - b1) * gi;
            adam_v_[i] = b2 * adam_v_[i] + (1.0f - b2) * gi * gi;
            const float mh = adam_m_[i] / bc1, vh = adam_v_[i] / bc2;
            params_[i] -= lrf * (mh / (std::sqrt(vh) + opt_.adam_eps) + decay * params_[i]);
        }
    }
    ++step_;
    StepStats st;
    st.step = step_;
    st.loss = loss / double(std::max<int64_t>(1, scored));
    st.lr = lr;
    st.grad_norm = norm;
    st.tokens = scored;
    return st;
}

size_t Trainer::eval_windows_available() const {
    size_t n = 0;
    for (const auto& s : corpus_.eval) n += s.size() / size_t(opt_.ctx);
    return n;
}

double Trainer::evaluate(int max_windows) {
    const int S = opt_.ctx;
    std::vector<const int32_t*> all;
    for (const auto& s : corpus_.eval)
        for (size_t o = 0; o + size_t(S) <= s.size(); o += size_t(S)) all.push_back(s.data() + o);
    if (all.empty()) fail(Status::invalid_argument, "no held-out text for evaluation (need at least " + std::to_string(S) + " tokens)");
    std::vector<const int32_t*> chosen;
    const size_t n = max_windows > 0 ? std::min(all.size(), size_t(max_windows)) : all.size();
    for (size_t i = 0; i < n; ++i) chosen.push_back(all[i * all.size() / n]);

    const float s = lora_scale();
    const ModelRef<const float> w = weight_view();
    const int W = int(nets_.size());
    std::vector<double> losses(chosen.size());
    std::vector<int64_t> counts(chosen.size());
    pool_->parallel_for(W, 1, [&](int64_t b, int64_t e) {
        std::vector<int32_t> tokens(static_cast<size_t>(S)), targets(static_cast<size_t>(S));
        for (int64_t k = b; k < e; ++k)
            for (size_t i = size_t(k); i < chosen.size(); i += size_t(W)) {
                tokens[0] = corpus_.bos;
                std::copy_n(chosen[i], S - 1, &tokens[1]);
                std::copy_n(chosen[i], S, targets.data());
                losses[i] = nets_[size_t(k)]->forward(w, s, tokens.data(), targets.data(), 1, S);
                counts[i] = nets_[size_t(k)]->n_scored();
            }
    });
    double loss = 0.0;
    int64_t scored = 0;
    for (size_t i = 0; i < chosen.size(); ++i) {
        loss += losses[i];
        scored += counts[i];
    }
    return loss / double(scored);
}

uint64_t Trainer::base_hash(const std::vector<float>& packed) const {
    const int32_t shape[] = {cfg_.dim, cfg_.hidden_dim, cfg_.n_layers, cfg_.n_heads, cfg_.n_kv_heads, cfg_.vocab_size, cfg_.seq_len};
    const uint64_t h = fnv1a(kFnvBasis, shape, sizeof shape);
    return fnv1a(h, packed.data(), packed.size() * sizeof(float));
}

uint64_t Trainer::data_hash() const {
    uint64_t h = kFnvBasis;
    for (const auto& s : corpus_.train) {
        const uint64_t n = s.size();
        h = fnv1a(h, &n, sizeof n);
        h = fnv1a(h, s.data(), s.size() * sizeof(int32_t));
    }
    return h;
}

namespace {

// The options that shape the trajectory, as checkpoint metadata.
std::vector<std::pair<std::string, std::string>> option_fingerprint(const TrainOptions& o) {
    auto f = [](double x) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.9g", x);
        return std::string(buf);
    };
    return {
        {"mode", o.full ? "full" : "lora"},
        {"lora_rank", o.full ? "-" : std::to_string(o.lora_rank)},
        {"lora_alpha", o.full ? "-" : f(o.lora_alpha)},
        {"lora_targets", o.full ? "-" : proj_list_string(o.lora_targets)},
        {"steps", std::to_string(o.steps)},
        {"batch", std::to_string(o.batch)},
        {"ctx", std::to_string(o.ctx)},
        {"lr", f(o.lr)},
        {"min_lr_ratio", f(o.min_lr_ratio)},
        {"warmup", std::to_string(o.warmup)},
        {"weight_decay", f(o.weight_decay)},
        {"beta1", f(o.beta1)},
        {"beta2", f(o.beta2)},
        {"adam_eps", f(o.adam_eps)},
        {"grad_clip", f(o.grad_clip)},
        {"seed", std::to_string(o.seed)},
    };
}

}  // namespace

void Trainer::save_checkpoint(const std::string& path) const {
    gguf::Writer w;
    w.set_str("general.architecture", "llama");
    w.set_str("general.type", kCheckpointType);
    w.set_u32("checkpoint.step", uint32_t(step_));
    w.set_u64("checkpoint.base_hash", base_hash_);
    w.set_u64("checkpoint.data_hash", data_hash());
    for (const auto& [k, v] : option_fingerprint(opt_)) w.set_str("checkpoint.option." + k, v);
    auto add = [&](const std::string& name, const TensorSlot& s, const std::vector<float>& v) {
        w.add_tensor(name, {uint64_t(s.cols), uint64_t(s.rows)}, gguf::TensorType::F32,
                     std::span<const float>(v.data() + s.offset, s.size()));
    };
    // Short suffixes keep the longest names ("blk.NN.attn_output.weight.lora_a.m") within GGUF's 63 characters.
    for (const TensorSlot& s : layout_.slots()) {
        add(s.name, s, params_);
        add(s.name + ".m", s, adam_m_);
        add(s.name + ".v", s, adam_v_);
    }
    w.write(path);
}

void Trainer::load_checkpoint(const std::string& path) {
    const gguf::Reader r = gguf::Reader::open(path);
    auto bad = [&](const std::string& why) { fail(Status::format, path + ": " + why); };
    if (r.opt_str("general.type").value_or("") != kCheckpointType) bad("not a secureinfer training checkpoint");
    for (const auto& [k, v] : option_fingerprint(opt_)) {
        const std::string got = r.opt_str("checkpoint.option." + k).value_or("(missing)");
        if (got != v)
            fail(Status::invalid_argument, path + ": checkpoint was made with " + k + " = " + got + ", this run has " + k + " = " + v);
    }
    if (r.get_u64("checkpoint.base_hash") != base_hash_)
        fail(Status::invalid_argument, path + ": checkpoint was made from a different base model");
    if (r.get_u64("checkpoint.data_hash") != data_hash())
        fail(Status::invalid_argument, path + ": checkpoint was made from different training data");
    const uint32_t step = r.get_u32("checkpoint.step");
    if (step > uint32_t(opt_.steps)) bad("checkpoint step " + std::to_string(step) + " is beyond the run's " + std::to_string(opt_.steps) + " steps");
    std::vector<float> p(params_.size()), m(params_.size()), v(params_.size());
    auto get = [&](const std::string& name, const TensorSlot& s, std::vector<float>& dst) {
        const gguf::TensorInfo& t = r.tensor(name);
        if (t.type != gguf::TensorType::F32 || t.n_elements != s.size() || t.ne[0] != uint64_t(s.cols))
            bad("tensor '" + name + "' has shape " + gguf::shape_string(t.shape()) + " (" + gguf::type_name(t.type) + "), expected [" +
                std::to_string(s.cols) + ", " + std::to_string(s.rows) + "] F32");
        const std::vector<float> data = r.to_f32(t);
        std::copy(data.begin(), data.end(), dst.begin() + std::ptrdiff_t(s.offset));
    };
    for (const TensorSlot& s : layout_.slots()) {
        get(s.name, s, p);
        get(s.name + ".m", s, m);
        get(s.name + ".v", s, v);
    }
    if (r.tensors().size() != 3 * layout_.slots().size()) bad("checkpoint holds unexpected tensors");
    params_ = std::move(p);
    adam_m_ = std::move(m);
    adam_v_ = std::move(v);
    step_ = int(step);
}

LoraAdapter Trainer::adapter(const std::string& name) const {
    if (opt_.full) fail(Status::invalid_argument, "a full fine-tune has no adapter");
    LoraAdapter ad;
    ad.alpha = opt_.lora_alpha;
    ad.name = name;
    for (int l = 0; l < cfg_.n_layers; ++l)
        for (Proj j : opt_.lora_targets) {
            const std::string base = proj_tensor_name(l, j);
            const TensorSlot& a = layout_.at(base + ".lora_a");
            const TensorSlot& b = layout_.at(base + ".lora_b");
            LoraTensor t;
            t.layer = l;
            t.proj = j;
            t.rank = opt_.lora_rank;
            t.a = to_vec(std::span<const float>(params_.data() + a.offset, a.size()));
            t.b = to_vec(std::span<const float>(params_.data() + b.offset, b.size()));
            ad.tensors.push_back(std::move(t));
        }
    return ad;
}

ModelWeights Trainer::weights() const {
    if (opt_.full) return unpack_model(cfg_, layout_, params_);
    ModelWeights w = unpack_model(cfg_, base_layout_, base_);
    merge_lora(w, adapter(""), 1.0f);
    return w;
}

}  // namespace si::train
