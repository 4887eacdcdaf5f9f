#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/error.h"
#include "common/matmul.h"
#include "common/ops.h"
#include "common/quant_dot.h"
#include "common/tensor_source.h"
#include "formats/gguf.h"
#include "formats/quants.h"

namespace si {

const char* weight_format_name(WeightFormat f) {
    return f == WeightFormat::int8 ? "int8" : f == WeightFormat::native ? "native" : "f32";
}

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

size_t Linear::bytes() const {
    size_t b = f32.bytes() + q.bytes() + scale.size() * 4;
    for (const Part& p : parts) b += p.packed.rows() > 0 ? p.packed.bytes() : size_t(p.rows) * p.row_bytes;
    return b;
}

namespace {

// Activations of T tokens in both block forms, per calling thread (scratch reused across calls).
struct NativeActivations {
    std::vector<int8_t> q0, qk;
    std::vector<float> d0, dk;
    std::vector<int16_t> s0, bsums;
};
thread_local NativeActivations t_act;

void native_forward(ThreadPool* pool, const Linear& W, const float* X, int64_t T, float* Y) {
    const int64_t n = W.cols;
    NativeActivations& a = t_act;
    if (W.q80) {
        a.q0.resize(size_t(T * n));
        a.d0.resize(size_t(T * n / 32));
        a.s0.resize(size_t(T * n / 32));
        for (int64_t t = 0; t < T; ++t)
            qdot::quantize_q8_0(X + t * n, n, &a.q0[size_t(t * n)], &a.d0[size_t(t * n / 32)], &a.s0[size_t(t * n / 32)]);
    }
    if (W.q8k) {
        a.qk.resize(size_t(T * n));
        a.dk.resize(size_t(T * n / 256));
        a.bsums.resize(size_t(T * n / 16));
        for (int64_t t = 0; t < T; ++t)
            qdot::quantize_q8_k(X + t * n, n, &a.qk[size_t(t * n)], &a.dk[size_t(t * n / 256)], &a.bsums[size_t(t * n / 16)]);
    }
    // One pass over all rows of all parts (one thread-pool round per product, as for the other formats), in units
    // of 16 rows: a group of an interleaved part, or 16 rows of a part read as stored.
    const int64_t rows = W.rows;
    const int64_t G = qdot::kGroupRows;
    int64_t units = 0;
    for (const Linear::Part& p : W.parts) units += (p.rows + G - 1) / G;
    pool->parallel_for(units, 1, [&](int64_t begin, int64_t end) {
        int64_t row0 = 0, unit0 = 0;
        for (const Linear::Part& p : W.parts) {
            const int64_t pu = (p.rows + G - 1) / G;
            const int64_t u0 = std::max(begin, unit0) - unit0, u1 = std::min(end, unit0 + pu) - unit0;
            if (u0 < u1) {
                const auto type = qdot::WType(p.type);
                const bool k = qdot::uses_q8k(type);
                const int8_t* q = k ? a.qk.data() : a.q0.data();
                const float* d = k ? a.dk.data() : a.d0.data();
                const int16_t* sums = k ? a.bsums.data() : a.s0.data();
                const int64_t dstride = k ? n / 256 : n / 32, sstride = k ? n / 16 : n / 32;
                if (p.packed.rows() > 0) {
                    qdot::gemm_packed(p.packed, u0, u1, q, d, sums, T, Y + row0, rows);
                } else {
                    for (int64_t r = u0 * G; r < std::min(p.rows, u1 * G); ++r) {
                        const uint8_t* row = p.data + size_t(r) * p.row_bytes;
                        for (int64_t t = 0; t < T; ++t)
                            Y[t * rows + row0 + r] =
                                qdot::dot_row(type, row, n, q + t * n, d + t * dstride, sums + t * sstride);
                    }
                }
            }
            row0 += p.rows;
            unit0 += pu;
            if (unit0 >= end) break;
        }
    });
}

// A native matrix from stacked tensors of the file (or, without the file or for a format without a native kernel,
// from the f32 weights re-quantised to Q8_0). Falls back to int8 when a part cannot be stored natively (a row
// length that is not a multiple of 32).
Linear make_native(const gguf::Reader* file, const TensorSource& src, std::initializer_list<std::string> names,
                   int64_t cols) {
    Linear L;
    L.cols = cols;
    L.format = WeightFormat::native;
    std::vector<float> rows_f32;
    for (const std::string& name : names) {
        Linear::Part p;
        p.rows = src.tensor_rows(name);
        const gguf::TensorInfo* t = file ? file->find_tensor(name) : nullptr;
        if (t && qdot::is_native(uint32_t(t->type)) && int64_t(t->ne[0]) == cols && int64_t(t->ne[1]) == p.rows) {
            p.type = uint32_t(t->type);
            p.data = file->tensor_data(*t).data();
            p.row_bytes = size_t(t->n_bytes / uint64_t(p.rows));
        } else if (cols % 32 == 0) {
            p.type = uint32_t(qdot::WType::q8_0);
            p.row_bytes = size_t(cols / 32 * 34);
            p.owned.resize(size_t(p.rows) * p.row_bytes);
            const int64_t block = std::max<int64_t>(1, (int64_t(1) << 20) / cols);
            for (int64_t r0 = 0; r0 < p.rows; r0 += block) {
                const int64_t n = std::min(block, p.rows - r0);
                rows_f32.resize(size_t(n * cols));
                src.read_rows(name, r0, n, rows_f32.data());
                for (int64_t r = 0; r < n; ++r)
                    qdot::quantize_row_q8_0_weights(rows_f32.data() + r * cols, cols,
                                                    p.owned.data() + size_t(r0 + r) * p.row_bytes);
            }
            src.release(name);
            p.data = p.owned.data();
        } else {
            std::vector<float> all;
            for (const std::string& part : names) {
                const std::vector<float> w = src.read(part);
                all.insert(all.end(), w.begin(), w.end());
            }
            return Linear::make(all, int64_t(all.size()) / cols, cols, WeightFormat::int8);
        }
        if (qdot::has_packed(qdot::WType(p.type))) {
            p.packed = qdot::Packed(qdot::WType(p.type), p.data, p.rows, cols, p.row_bytes);
            // the file's pages of the matrix, now copied, leave the resident set (Reader::release: only for a
            // mapped file, whose page cache keeps them)
            if (p.owned.empty()) file->release(*t);
            p.data = nullptr;
            p.owned = {};
            src.release(name);  // the blocks are copied: the file's pages can go
        }
        (qdot::uses_q8k(qdot::WType(p.type)) ? L.q8k : L.q80) = true;
        L.rows += p.rows;
        L.parts.push_back(std::move(p));
    }
    return L;
}

}  // namespace

void linear_forward(ThreadPool* pool, const Linear& W, const float* X, int64_t T, float* Y, std::vector<int8_t>& q8,
                    std::vector<float>& xs, std::vector<int32_t>& acc) {
    if (W.format == WeightFormat::f32) {
        matmul_f32_packed(pool, W.f32, X, T, Y);
        return;
    }
    if (W.format == WeightFormat::native) {
        native_forward(pool, W, X, T, Y);
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
// Tensors stacked row-wise, read from the source.
std::vector<float> concat(const TensorSource& src, std::initializer_list<std::string> names) {
    int64_t n = 0;
    for (const auto& name : names) n += src.tensor_rows(name) * src.tensor_cols(name);
    std::vector<float> out(static_cast<size_t>(n));
    float* at = out.data();
    for (const auto& name : names) {
        src.read(name, at);
        at += src.tensor_rows(name) * src.tensor_cols(name);
    }
    return out;
}
}  // namespace

Engine::Engine(const ModelWeights& w, const EngineParams& params, const gguf::Reader* file)
    : Engine(DenseSource(w), params, file) {}

Engine::Engine(const TensorSource& src, const EngineParams& params, const gguf::Reader* file)
    : cfg_(src.config()), params_(params) {
    init(src, file, true);
}

Engine::Engine(std::shared_ptr<const TensorSource> src, const EngineParams& params, const gguf::Reader* file)
    : cfg_(src ? src->config() : ModelConfig{}), params_(params) {
    if (!src) fail(Status::invalid_argument, "no model source");
    embedding_rows_ = src;
    init(*src, file, false);
}

void Engine::init(const TensorSource& src, const gguf::Reader* file, bool embedding_table) {
    const EngineParams& params = params_;
    cfg_.validate("model");
    n_ctx_ = params.n_ctx > 0 ? std::min(params.n_ctx, cfg_.seq_len) : cfg_.seq_len;
    if (params_.n_batch <= 0) fail(Status::invalid_argument, "batch size must be positive");
    pool_ = std::make_unique<ThreadPool>(params.n_threads);

    const int64_t d = cfg_.dim, h = cfg_.hidden_dim, kv = cfg_.kv_dim();
    const WeightFormat f = params.weights;
    if (embedding_table) tok_embeddings_ = src.read("token_embd.weight");
    final_norm_ = src.read("output_norm.weight");
    for (int l = 0; l < cfg_.n_layers; ++l) {
        auto name = [&](Proj p) { return proj_tensor_name(l, p); };
        Layer E;
        E.attn_norm = src.read("blk." + std::to_string(l) + ".attn_norm.weight");
        E.ffn_norm = src.read("blk." + std::to_string(l) + ".ffn_norm.weight");
        if (f == WeightFormat::native) {
            E.wqkv = make_native(file, src, {name(Proj::q), name(Proj::k), name(Proj::v)}, d);
            E.wo = make_native(file, src, {name(Proj::o)}, d);
            E.w13 = make_native(file, src, {name(Proj::w1), name(Proj::w3)}, d);
            E.w2 = make_native(file, src, {name(Proj::w2)}, h);
        } else {
            E.wqkv = Linear::make(concat(src, {name(Proj::q), name(Proj::k), name(Proj::v)}), d + 2 * kv, d, f);
            E.wo = Linear::make(src.read(name(Proj::o)), d, d, f);
            E.w13 = Linear::make(concat(src, {name(Proj::w1), name(Proj::w3)}), 2 * h, d, f);
            E.w2 = Linear::make(src.read(name(Proj::w2)), d, h, f);
        }
        layers_.push_back(std::move(E));
    }
    if (f == WeightFormat::native)
        classifier_ = make_native(file, src, {src.classifier_name()}, d);
    else
        classifier_ = Linear::make(src.tied() && embedding_table ? tok_embeddings_ : src.read(src.classifier_name()),
                                   cfg_.vocab_size, d, f);
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
    for (int t = 0; t < T; ++t) {
        if (embedding_rows_)
            embedding_rows_->read_rows("token_embd.weight", tokens[t], 1, x + size_t(t) * d);
        else
            std::copy_n(&tok_embeddings_[size_t(tokens[t]) * d], d, x + size_t(t) * d);
    }

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
