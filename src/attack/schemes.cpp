#include "attack/schemes.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "common/matmul.h"
#include "common/staged_forward.h"
#include "enclave/fixed_point.h"
#include "host/package.h"
#include "host/trace.h"

namespace si::attack {

const char* scheme_name(Scheme s) {
    switch (s) {
        case Scheme::s0: return "S0";
        case Scheme::s1: return "S1";
        case Scheme::s2: return "S2";
        case Scheme::s3: return "S3";
        case Scheme::s5: return "S5";
    }
    return "?";
}

const char* scheme_description(Scheme s) {
    switch (s) {
        case Scheme::s0: return "plaintext offload of the fine-tuned projections";
        case Scheme::s1: return "permutation + per-row scaling + fake-row obfuscation of the fine-tuned projections";
        case Scheme::s2: return "float additive Gaussian masks on the public base projections";
        case Scheme::s3: return "mod 2^32 masks from a small static precomputed pool, reused";
        case Scheme::s5: return "secureinfer: one-time mod 2^32 pads (AES-256-CTR), Freivalds-checked products";
    }
    return "?";
}

std::optional<Scheme> parse_scheme(const std::string& s) {
    for (Scheme x : kAllSchemes) {
        const std::string n = scheme_name(x);
        if (s == n || (s.size() == 2 && std::tolower(s[0]) == 's' && s[1] == n[1])) return x;
    }
    if (s == "secureinfer") return Scheme::s5;
    return std::nullopt;
}

Mat base_projection(const ModelWeights& w, int layer, Proj p) {
    const LayerWeights& L = w.layers[size_t(layer)];
    const ProjShape s = proj_shape(w.cfg, p);
    Mat m(s.rows, s.cols);
    for (size_t i = 0; i < m.a.size(); ++i) m.a[i] = double(proj_weights(L, p)[i]);
    return m;
}

Mat lora_delta(const train::LoraAdapter& adapter, const ModelConfig& cfg, int layer, Proj p, float scale) {
    const ProjShape s = proj_shape(cfg, p);
    Mat d(s.rows, s.cols);
    for (const auto& t : adapter.tensors) {
        if (t.layer != layer || t.proj != p) continue;
        const double k = double(adapter.tensor_scale(t, scale));
        for (int64_t i = 0; i < s.rows; ++i)
            for (int r = 0; r < t.rank; ++r) {
                const double b = k * double(t.b[size_t(i * t.rank + r)]);
                const float* a = t.a.data() + size_t(r) * size_t(s.cols);
                for (int64_t j = 0; j < s.cols; ++j) d(i, j) += b * double(a[j]);
            }
    }
    return d;
}

struct WeakSession::Slot {
    int64_t rows = 0, cols = 0;  // real rows, columns
    std::vector<float> w;        // S0: W_ft; S1: obfuscated [rows + fake][cols]; S2: W0
    int64_t sent_rows = 0;
    std::vector<int> pos;        // S1: position of real row i
    std::vector<double> scale;   // S1: scale of real row i
    std::vector<int8_t> q;       // S3: int8 W0
    std::vector<float> qscale;   // S3: per-row scales
};

WeakSession::WeakSession(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter, float lora_scale,
                         const SchemeOptions& options, const std::string& trace_dir)
    : scheme_(scheme), cfg_(base.cfg), opt_(options), noise_(options.seed * 0x9e3779b97f4a7c15ULL + 17) {
    if (scheme == Scheme::s5) fail(Status::invalid_argument, "S5 runs through SecureSession, not the simulation");
    base.validate("model");
    fw_ = std::make_unique<StagedForward>(cfg_, cfg_.seq_len, base.tied(), nullptr);
    std::copy(base.tok_embeddings.begin(), base.tok_embeddings.end(), fw_->tok_embeddings().begin());
    std::copy(base.final_norm.begin(), base.final_norm.end(), fw_->final_norm().begin());
    if (!base.tied()) std::copy(base.classifier.begin(), base.classifier.end(), fw_->classifier().begin());
    for (int l = 0; l < cfg_.n_layers; ++l) {
        const LayerWeights& L = base.layers[size_t(l)];
        std::copy(L.attn_norm.begin(), L.attn_norm.end(), fw_->attn_norm(l).begin());
        std::copy(L.ffn_norm.begin(), L.ffn_norm.end(), fw_->ffn_norm(l).begin());
    }
    // S0 and S1 offload the fine-tuned weights (the adapter merged); S2 and S3 keep the adapter inside.
    ModelWeights merged;
    const ModelWeights* src = &base;
    const bool offload_finetune = scheme == Scheme::s0 || scheme == Scheme::s1;
    if (adapter && offload_finetune) {
        merged = base;
        train::merge_lora(merged, *adapter, lora_scale);
        src = &merged;
    }
    if (adapter && !offload_finetune)
        for (const auto& t : adapter->tensors) {
            LoraUpdate& u = fw_->set_lora(t.layer, t.proj, t.rank, adapter->tensor_scale(t, lora_scale));
            std::copy(t.a.begin(), t.a.end(), u.a.begin());
            std::copy(t.b.begin(), t.b.end(), u.b.begin());
        }
    if (!trace_dir.empty()) trace_ = std::make_unique<TraceWriter>(trace_dir);

    SplitMix rng(opt_.seed * 0x2545f4914f6cdd1dULL + 3);
    perm_in_.resize(size_t(cfg_.n_layers) * 4);
    if (scheme == Scheme::s1)
        for (int l = 0; l < cfg_.n_layers; ++l)
            for (int st = 0; st < 4; ++st) {
                const int64_t K = st == 3 ? cfg_.hidden_dim : cfg_.dim;
                perm_in_[size_t(l) * 4 + size_t(st)] = random_permutation(int(K), rng);
            }
    slots_.resize(size_t(cfg_.n_layers) * 7);
    for (int l = 0; l < cfg_.n_layers; ++l) {
        const LayerWeights& L = src->layers[size_t(l)];
        for (Proj p : kAllProj) {
            Slot& s = slots_[size_t(l) * 7 + size_t(p)];
            const ProjShape sh = proj_shape(cfg_, p);
            s.rows = sh.rows;
            s.cols = sh.cols;
            const std::vector<float>& W = proj_weights(L, p);
            switch (scheme) {
                case Scheme::s0:
                case Scheme::s2:
                    s.w = W;
                    s.sent_rows = s.rows;
                    break;
                case Scheme::s1: {
                    const int64_t fake = int64_t(std::llround(opt_.s1_fake_rows * double(s.rows)));
                    s.sent_rows = s.rows + fake;
                    const std::vector<int> order = random_permutation(int(s.sent_rows), rng);
                    s.pos.assign(order.begin(), order.begin() + s.rows);
                    s.scale.resize(size_t(s.rows));
                    s.w.assign(size_t(s.sent_rows * s.cols), 0.0f);
                    const std::vector<int>& pin = perm_in_[size_t(l) * 4 + size_t(proj_stage(p))];
                    double ss = 0.0;
                    for (float v : W) ss += double(v) * double(v);
                    const double rms = std::sqrt(ss / double(W.size()));
                    for (int64_t i = 0; i < s.rows; ++i) {
                        s.scale[size_t(i)] = std::exp((2.0 * rng.uniform() - 1.0) * std::log(2.0));
                        float* dst = s.w.data() + size_t(s.pos[size_t(i)]) * size_t(s.cols);
                        for (int64_t j = 0; j < s.cols; ++j)
                            dst[j] = float(s.scale[size_t(i)] * double(W[size_t(i * s.cols + pin[size_t(j)])]));
                    }
                    for (int64_t f = 0; f < fake; ++f) {
                        float* dst = s.w.data() + size_t(order[size_t(s.rows + f)]) * size_t(s.cols);
                        for (int64_t j = 0; j < s.cols; ++j) dst[j] = float(rms * rng.normal());
                    }
                    break;
                }
                case Scheme::s3:
                    s.sent_rows = s.rows;
                    s.q.resize(size_t(s.rows * s.cols));
                    s.qscale.resize(size_t(s.rows));
                    quantize_rows_i8(W.data(), s.rows, s.cols, s.q.data(), s.qscale.data(), nullptr);
                    break;
                case Scheme::s5: break;
            }
            if (trace_) {
                if (scheme == Scheme::s3)
                    trace_->write(l, trace_op(p), "weight", TraceDType::i8, {s.sent_rows, s.cols}, s.q.data());
                else
                    trace_->write(l, trace_op(p), "weight", TraceDType::f32, {s.sent_rows, s.cols}, s.w.data());
            }
        }
    }
    if (scheme == Scheme::s3) {
        // The precomputed pool: the same in every session (a fixed seed), a few masks per crossing slot.
        SplitMix prng(opt_.s3_seed);
        pool_.resize(size_t(cfg_.n_layers) * 4);
        pool_next_.assign(pool_.size(), 0);
        for (int l = 0; l < cfg_.n_layers; ++l)
            for (int st = 0; st < 4; ++st) {
                const int64_t K = st == 3 ? cfg_.hidden_dim : cfg_.dim;
                auto& pool = pool_[size_t(l) * 4 + size_t(st)];
                pool.resize(size_t(std::max(1, opt_.s3_pool)) * size_t(K));
                for (auto& v : pool) v = uint32_t(prng.next());
            }
    }
}

WeakSession::~WeakSession() = default;

void WeakSession::reset() {
    fw_->reset();
    std::fill(pool_next_.begin(), pool_next_.end(), 0);
}

void WeakSession::run_stage() {
    StagedForward& fw = *fw_;
    const int l = fw.layer(), st = int(fw.stage());
    const int64_t T = fw.T(), K = fw.stage_cols();
    const float* X = fw.stage_input();
    std::string in_file;
    bool first = true;
    auto trace_input = [&](Proj p, TraceDType dt, const void* data) {
        if (!trace_) return;
        if (first)
            in_file = trace_->write(l, trace_op(p), "input", dt, {T, K}, data);
        else
            trace_->index(l, trace_op(p), "input", dt, {T, K}, in_file);
    };
    // the masked / permuted input as it crosses
    std::vector<float> xf;
    std::vector<float> noise;
    std::vector<int32_t> xq;
    std::vector<float> xs;
    std::vector<uint32_t> xm, rmask;
    switch (scheme_) {
        case Scheme::s0: xf.assign(X, X + T * K); break;
        case Scheme::s1: {
            const std::vector<int>& pin = perm_in_[size_t(l) * 4 + size_t(st)];
            xf.resize(size_t(T * K));
            for (int64_t t = 0; t < T; ++t)
                for (int64_t j = 0; j < K; ++j) xf[size_t(t * K + j)] = X[t * K + pin[size_t(j)]];
            break;
        }
        case Scheme::s2: {
            xf.resize(size_t(T * K));
            noise.resize(size_t(T * K));
            for (int64_t t = 0; t < T; ++t) {
                double ss = 0.0;
                for (int64_t j = 0; j < K; ++j) ss += double(X[t * K + j]) * double(X[t * K + j]);
                const double sd = opt_.s2_sigma * std::sqrt(ss / double(K));
                for (int64_t j = 0; j < K; ++j) {
                    noise[size_t(t * K + j)] = float(sd * noise_.normal());
                    xf[size_t(t * K + j)] = X[t * K + j] + noise[size_t(t * K + j)];
                }
            }
            break;
        }
        case Scheme::s3: {
            xq.resize(size_t(T * K));
            xs.resize(size_t(T));
            quantize_activations(X, T, K, activation_bits(K), xq.data(), xs.data());
            xm.resize(size_t(T * K));
            rmask.resize(size_t(T * K));
            auto& pool = pool_[size_t(l) * 4 + size_t(st)];
            const uint64_t M = pool.size() / size_t(K);
            for (int64_t t = 0; t < T; ++t) {
                const uint32_t* r = pool.data() + size_t(pool_next_[size_t(l) * 4 + size_t(st)]++ % M) * size_t(K);
                for (int64_t j = 0; j < K; ++j) {
                    rmask[size_t(t * K + j)] = r[j];
                    xm[size_t(t * K + j)] = uint32_t(xq[size_t(t * K + j)]) + r[j];
                }
            }
            break;
        }
        case Scheme::s5: break;
    }
    for (Proj p : stage_projs(fw.stage())) {
        const Slot& s = slots_[size_t(l) * 7 + size_t(p)];
        float* out = fw.proj_output(p);
        const int64_t N = s.sent_rows;
        if (scheme_ == Scheme::s3) {
            trace_input(p, TraceDType::u32, xm.data());
            std::vector<uint32_t> y(size_t(T * N)), wr(size_t(T * N));
            for (int64_t t = 0; t < T; ++t)
                for (int64_t n = 0; n < N; ++n) {
                    uint32_t acc = 0, accr = 0;
                    const int8_t* w = s.q.data() + n * K;
                    for (int64_t k = 0; k < K; ++k) {
                        acc += uint32_t(int32_t(w[k])) * xm[size_t(t * K + k)];
                        accr += uint32_t(int32_t(w[k])) * rmask[size_t(t * K + k)];
                    }
                    y[size_t(t * N + n)] = acc;
                    wr[size_t(t * N + n)] = accr;
                }
            if (trace_) trace_->write(l, trace_op(p), "output", TraceDType::u32, {T, N}, y.data());
            if (hook_) hook_(products_, y.data(), y.size());
            ++products_;
            std::vector<int32_t> prod(size_t(T * N));
            for (size_t i = 0; i < prod.size(); ++i) prod[i] = int32_t(y[i] - wr[i]);
            dequantize_product(prod.data(), T, N, s.qscale.data(), xs.data(), out);
        } else {
            trace_input(p, TraceDType::f32, xf.data());
            std::vector<float> y(size_t(T * N));
            for (int64_t t = 0; t < T; ++t)
                for (int64_t n = 0; n < N; ++n) {
                    double acc = 0.0;
                    const float* w = s.w.data() + n * K;
                    for (int64_t k = 0; k < K; ++k) acc += double(w[k]) * double(xf[size_t(t * K + k)]);
                    y[size_t(t * N + n)] = float(acc);
                }
            if (trace_) trace_->write(l, trace_op(p), "output", TraceDType::f32, {T, N}, y.data());
            if (hook_) hook_(products_, reinterpret_cast<uint32_t*>(y.data()), y.size());
            ++products_;
            const int64_t R = s.rows;
            for (int64_t t = 0; t < T; ++t)
                for (int64_t i = 0; i < R; ++i) {
                    double v;
                    if (scheme_ == Scheme::s1) {
                        v = double(y[size_t(t * N + s.pos[size_t(i)])]) / s.scale[size_t(i)];
                    } else if (scheme_ == Scheme::s2) {
                        double wn = 0.0;  // unmask: subtract W n, computed inside
                        const float* w = s.w.data() + i * K;
                        for (int64_t k = 0; k < K; ++k) wn += double(w[k]) * double(noise[size_t(t * K + k)]);
                        v = double(y[size_t(t * N + i)]) - wn;
                    } else {
                        v = double(y[size_t(t * N + i)]);
                    }
                    out[t * R + i] = float(v);
                }
        }
        first = false;
    }
    fw.finish_stage();
}

std::vector<float> WeakSession::eval(std::span<const int32_t> tokens) {
    if (trace_) trace_->write(-1, "tokens", "input", TraceDType::i32, {int64_t(tokens.size())}, tokens.data());
    fw_->begin(tokens.data(), int(tokens.size()));
    while (!fw_->done()) run_stage();
    std::vector<float> logits(static_cast<size_t>(cfg_.vocab_size));
    fw_->logits(fw_->T() - 1, 1, logits.data());
    fw_->end_pass();
    return logits;
}

void precompute_steps(SecureSession& s, const SchemeOptions& options, int positions) {
    if (options.package && options.unblinding != Unblinding::online && positions > 0) s.precompute(positions);
}

std::string run_scheme(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter,
                       const std::vector<std::vector<int32_t>>& prompts, const std::string& dir,
                       const SchemeOptions& options) {
    if (scheme == Scheme::s5) {
        SecureSessionParams p;
        const ModelWeights* weights = &base;
        if (options.package) {
            if (!adapter) fail(Status::invalid_argument, "S5 on the package path needs an adapter to pack");
            weights = &options.package->public_weights(*adapter);  // packs it on first use
            p = options.package->params(*adapter, options.unblinding);
            p.trace_messages = true;
        } else {
            p.mode = SecureMode::secureinfer;
            p.lora = adapter;
            p.n_threads = options.threads;
            p.host = options.host;
        }
        p.trace_dir = dir;
        p.accelerator = options.accelerator;
        SecureSession s(*weights, p);
        if (options.generate <= 0) {
            // passes without output: every position of every pass from precomputed factors, all precomputed ahead
            // at once (units outlive reset)
            size_t positions = 0;
            for (const auto& pr : prompts) positions += pr.size();
            precompute_steps(s, options, int(positions));
        }
        for (size_t i = 0; i < prompts.size(); ++i) {
            s.reset();
            if (options.generate <= 0) {
                s.eval(prompts[i]);
                continue;
            }
            // the prompt pass and the decode steps after it, every position from precomputed factors
            precompute_steps(s, options, int(prompts[i].size()) + options.generate - 1);
            s.set_sampler(SamplerParams{1.0f, 0, 1.0f, options.seed * 1000003ULL + i});
            int32_t t = s.eval_sample(prompts[i]);
            for (int g = 1; g < options.generate; ++g) t = s.eval_sample(std::span<const int32_t>(&t, 1));
        }
        return s.isolation();
    }
    WeakSession s(scheme, base, adapter, 1.0f, options, dir);
    for (const auto& pr : prompts) {
        s.reset();
        s.eval(pr);
    }
    return "simulated (no enclave host)";
}

}  // namespace si::attack
