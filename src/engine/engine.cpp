#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/error.h"
#include "common/matmul.h"
#include "common/ops.h"

namespace si {

const char* weight_format_name(WeightFormat f) { return f == WeightFormat::int8 ? "int8" : "f32"; }

Linear Linear::make(const std::vector<float>& w, int64_t rows, int64_t cols, WeightFormat format) {
    Linear L;
    L.rows = rows;
    L.cols = cols;
    L.format = format;
    if (format == WeightFormat::f32) {
        L.f32 = PackedF32::pack(w.data(), rows, cols);
    } else {
        std::vector<int8_t> q(size_t(rows * cols));
        L.scale.resize(size_t(rows));
        quantize_rows_i8(w.data(), rows, cols, q.data(), L.scale.data(), nullptr);
        L.q = PackedI8::pack(q.data(), rows, cols);
    }
    return L;
}

size_t Linear::bytes() const { return f32.bytes() + q.bytes() + scale.size() * 4; }

void linear_forward(ThreadPool* pool, const Linear& W, const float* X, int64_t T, float* Y, std::vector<int8_t>& q8,
                    std::vector<float>& xs, std::vector<int32_t>& acc) {
    if (W.format == WeightFormat::f32) {
        matmul_f32_packed(pool, W.f32, X, T, Y);
        return;
    }
    q8.resize(size_t(T * W.cols));
    xs.resize(size_t(T));
    acc.resize(size_t(T * W.rows));
    for (int64_t t = 0; t < T; ++t) xs[size_t(t)] = quantize_row_i8(X + t * W.cols, int(W.cols), q8.data() + t * W.cols);
    gemm_i8(pool, W.q, q8.data(), T, acc.data());
    for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < W.rows; ++n)
            Y[t * W.rows + n] = float(acc[size_t(t * W.rows + n)]) * W.scale[size_t(n)] * xs[size_t(t)];
}

namespace {
std::vector<float> concat(std::initializer_list<const std::vector<float>*> parts) {
    std::vector<float> out;
    for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
    return out;
}
}  // namespace

Engine::Engine(const ModelWeights& w, const EngineParams& params) : cfg_(w.cfg), params_(params) {
    w.validate("model");
    n_ctx_ = params.n_ctx > 0 ? std::min(params.n_ctx, cfg_.seq_len) : cfg_.seq_len;
    if (params_.n_batch <= 0) fail(Status::invalid_argument, "batch size must be positive");
    pool_ = std::make_unique<ThreadPool>(params.n_threads);

    const int64_t d = cfg_.dim, h = cfg_.hidden_dim, kv = cfg_.kv_dim();
    const WeightFormat f = params.weights;
    tok_embeddings_ = w.tok_embeddings;
    final_norm_ = w.final_norm;
    for (const auto& L : w.layers) {
        Layer E;
        E.attn_norm = L.attn_norm;
        E.ffn_norm = L.ffn_norm;
        E.wqkv = Linear::make(concat({&L.wq, &L.wk, &L.wv}), d + 2 * kv, d, f);
        E.wo = Linear::make(L.wo, d, d, f);
        E.w13 = Linear::make(concat({&L.w1, &L.w3}), 2 * h, d, f);
        E.w2 = Linear::make(L.w2, d, h, f);
        layers_.push_back(std::move(E));
    }
    classifier_ = Linear::make(w.output(), cfg_.vocab_size, d, f);
    key_cache_.assign(size_t(cfg_.n_layers) * n_ctx_ * kv, 0.0f);
    value_cache_.assign(size_t(cfg_.n_layers) * n_ctx_ * kv, 0.0f);
}

Engine::~Engine() = default;

size_t Engine::weight_bytes() const {
    size_t b = tok_embeddings_.size() * 4 + final_norm_.size() * 4 + classifier_.bytes();
    for (const auto& L : layers_)
        b += (L.attn_norm.size() + L.ffn_norm.size()) * 4 + L.wqkv.bytes() + L.wo.bytes() + L.w13.bytes() + L.w2.bytes();
    return b;
}

void Engine::ensure_scratch(int T) {
    if (T <= scratch_T_) return;
    const size_t d = cfg_.dim, h = cfg_.hidden_dim, kv = cfg_.kv_dim();
    x_.resize(T * d);
    xb_.resize(T * d);
    xb2_.resize(T * d);
    qkv_.resize(T * (d + 2 * kv));
    hb_.resize(T * h);
    hb13_.resize(T * 2 * h);
    scratch_T_ = T;
}

const float* Engine::eval(std::span<const int32_t> tokens, bool all_logits) {
    const int64_t n = int64_t(tokens.size());
    if (n == 0) fail(Status::invalid_argument, "no tokens to evaluate");
    if (pos_ + n > n_ctx_)
        fail(Status::invalid_argument, "context overflow: " + std::to_string(pos_) + " + " + std::to_string(n) +
                                           " tokens exceed the context of " + std::to_string(n_ctx_));
    for (int32_t t : tokens)
        if (t < 0 || t >= cfg_.vocab_size)
            fail(Status::invalid_argument, "token id " + std::to_string(t) + " out of range [0, " + std::to_string(cfg_.vocab_size) + ")");
    logits_.resize(size_t(all_logits ? n : 1) * cfg_.vocab_size);
    for (int64_t b = 0; b < n; b += params_.n_batch) {
        const int T = int(std::min<int64_t>(params_.n_batch, n - b));
        const bool last = b + T == n;
        // Logits are needed for every token (all_logits) or only for the very last one.
        float* out = all_logits ? logits_.data() + b * cfg_.vocab_size : (last ? logits_.data() : nullptr);
        eval_batch(tokens.data() + b, T, all_logits, out);
    }
    return logits_.data();
}

// One forward pass over T tokens at positions pos_ .. pos_ + T - 1.
//   x [T][dim] residual stream, xb/xb2 [T][dim] scratch, qkv [T][dim + 2 kv_dim] (q | k | v per token),
//   hb13 [T][2 hidden] (gate | up per token), hb [T][hidden]
void Engine::eval_batch(const int32_t* tokens, int T, bool all_logits, float* logits) {
    ensure_scratch(T);
    const int d = cfg_.dim, hd = cfg_.head_dim(), kv = cfg_.kv_dim(), hidden = cfg_.hidden_dim;
    const int n_heads = cfg_.n_heads, group = cfg_.n_heads / cfg_.n_kv_heads;
    const float eps = cfg_.norm_eps;
    ThreadPool* pool = pool_.get();
    float* x = x_.data();

    // token embeddings -> x [T][dim]
    for (int t = 0; t < T; ++t) std::copy_n(&tok_embeddings_[size_t(tokens[t]) * d], d, x + size_t(t) * d);

    for (int l = 0; l < cfg_.n_layers; ++l) {
        const Layer& L = layers_[size_t(l)];
        float* kc = key_cache_.data() + size_t(l) * n_ctx_ * kv;
        float* vc = value_cache_.data() + size_t(l) * n_ctx_ * kv;

        // attention: xb = rmsnorm(x); (q | k | v) = xb [Wq; Wk; Wv]^T -> qkv [T][dim + 2 kv_dim]
        for (int t = 0; t < T; ++t) rmsnorm(&xb_[size_t(t) * d], x + size_t(t) * d, L.attn_norm.data(), d, eps);
        linear_forward(pool, L.wqkv, xb_.data(), T, qkv_.data(), q8_, xs_, acc_);

        // RoPE on q and k, then append k, v to the cache at their positions
        const size_t qkv_stride = size_t(d + 2 * kv);
        for (int t = 0; t < T; ++t) {
            float* q = &qkv_[t * qkv_stride];
            float* k = q + d;
            const float* v = k + kv;
            rope(q, n_heads, hd, pos_ + t, cfg_.rope_theta, cfg_.rope_factors());
            rope(k, cfg_.n_kv_heads, hd, pos_ + t, cfg_.rope_theta, cfg_.rope_factors());
            std::copy_n(k, kv, kc + size_t(pos_ + t) * kv);
            std::copy_n(v, kv, vc + size_t(pos_ + t) * kv);
        }

        // causal grouped-query attention, one (token, head) pair per work item -> xb2 [T][dim]
        pool->parallel_for(int64_t(T) * n_heads, 1, [&](int64_t begin, int64_t end) {
            std::vector<float> att(attend_scratch(begin, end, n_heads, pos_, T));
            attend_items(begin, end, n_heads, pos_, xb2_.data(), size_t(d), qkv_.data(), qkv_stride, kc, vc, size_t(kv),
                         hd, group, att.data());
        });

        // output projection and residual: x += xb2 Wo^T
        linear_forward(pool, L.wo, xb2_.data(), T, xb_.data(), q8_, xs_, acc_);
        for (size_t i = 0; i < size_t(T) * d; ++i) x[i] += xb_[i];

        // feed-forward: x += W2 (silu(W1 xb) * W3 xb), xb = rmsnorm(x); (gate | up) -> hb13 [T][2 hidden]
        for (int t = 0; t < T; ++t) rmsnorm(&xb_[size_t(t) * d], x + size_t(t) * d, L.ffn_norm.data(), d, eps);
        linear_forward(pool, L.w13, xb_.data(), T, hb13_.data(), q8_, xs_, acc_);
        for (int t = 0; t < T; ++t) {
            const float* gate = &hb13_[size_t(t) * 2 * hidden];
            swiglu(&hb_[size_t(t) * hidden], gate, gate + hidden, hidden);
        }
        linear_forward(pool, L.w2, hb_.data(), T, xb_.data(), q8_, xs_, acc_);
        for (size_t i = 0; i < size_t(T) * d; ++i) x[i] += xb_[i];
    }
    pos_ += T;

    // final norm and classifier: logits [T or 1][vocab]
    if (!logits) return;
    const int first = all_logits ? 0 : T - 1;
    const int n_out = T - first;
    for (int t = first; t < T; ++t) rmsnorm(&xb_[size_t(t - first) * d], x + size_t(t) * d, final_norm_.data(), d, eps);
    linear_forward(pool, classifier_, xb_.data(), n_out, logits, q8_, xs_, acc_);
}

}  // namespace si
