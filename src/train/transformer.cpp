#include "train/transformer.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/error.h"
#include "common/ops.h"
#include "train/gemm.h"

namespace si::train {

namespace {

constexpr int64_t kTokenGrain = 16;  // tokens per work item in element-wise loops

template <class T>
T dotp(const T* a, const T* b, int n) {
    if constexpr (std::is_same_v<T, float>) {
        return dot_f32(a, b, n);  // the engine's kernel, so forward logits match it closely
    } else {
        T s = 0;
        for (int i = 0; i < n; ++i) s += a[i] * b[i];
        return s;
    }
}

}  // namespace

template <class T>
Transformer<T>::Transformer(const ModelConfig& cfg, ThreadPool& pool) : cfg_(cfg), pool_(pool) {
    cfg_.validate("model");
    if (!cfg_.rope_freq_factors.empty())
        fail(Status::unsupported, "fine-tuning a model with RoPE frequency factors (Llama 3.1 RoPE scaling) is not supported");
}

// Rotates each pair of v by its position's angle; `inverse` rotates by -angle, the transpose used on gradients.
template <class T>
void Transformer<T>::rope(T* v, int n_heads, bool inverse) {
    const int hd = cfg_.head_dim(), half = hd / 2;
    const T sign = inverse ? T(-1) : T(1);
    pool_.parallel_for(N_, kTokenGrain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
            const int pos = int(n % S_);
            const T* c = &rope_cos_[size_t(pos * half)];
            const T* s = &rope_sin_[size_t(pos * half)];
            T* row = v + n * n_heads * hd;
            for (int h = 0; h < n_heads; ++h)
                for (int i = 0; i < half; ++i) {
                    T* p = row + h * hd + 2 * i;
                    const T a = p[0], bb = p[1], si = sign * s[i];
                    p[0] = a * c[i] - bb * si;
                    p[1] = a * si + bb * c[i];
                }
        }
    });
}

// y[N][out] = x W^T (+ s * (x A^T) B^T); u receives x A^T for the backward pass.
template <class T>
void Transformer<T>::linear_fwd(const T* x, int64_t in, const T* W, int64_t out, const T* A, const T* Bm, T s,
                                std::vector<T>& u, T* y) {
    transpose(W, out, in, wT_);
    gemm(pool_, x, N_, in, wT_.data(), out, y, false);
    if (!A) return;
    const int64_t r = rank_;
    u.resize(size_t(N_ * r));
    transpose(A, r, in, aT_);
    gemm(pool_, x, N_, in, aT_.data(), r, u.data(), false);
    transpose(Bm, out, r, bT_);
    for (auto& b : bT_) b *= s;
    gemm(pool_, u.data(), N_, r, bT_.data(), out, y, true);
}

// dx += dy W (+ s (dy B) A); gW += dy^T x; gB += s dy^T u; gA += s (dy B)^T x. Null gradients are skipped.
template <class T>
void Transformer<T>::linear_bwd(const T* x, int64_t in, const T* W, int64_t out, const T* A, const T* Bm, T s,
                                const std::vector<T>& u, const T* dy, T* dx, T* gW, T* gA, T* gB) {
    gemm(pool_, dy, N_, out, W, in, dx, true);
    if (gW || (A && gB)) transpose(dy, N_, out, dyT_);
    if (gW) gemm(pool_, dyT_.data(), out, N_, x, in, gW, true);
    if (!A) return;
    const int64_t r = rank_;
    du_.resize(size_t(N_ * r));
    gemm(pool_, dy, N_, out, Bm, r, du_.data(), false);
    for (auto& d : du_) d *= s;
    if (gB) {
        tmp_.resize(size_t(out * r));
        gemm(pool_, dyT_.data(), out, N_, u.data(), r, tmp_.data(), false);
        for (int64_t i = 0; i < out * r; ++i) gB[i] += s * tmp_[size_t(i)];
    }
    if (gA) {
        transpose(du_.data(), N_, r, duT_);
        gemm(pool_, duT_.data(), r, N_, x, in, gA, true);
    }
    gemm(pool_, du_.data(), N_, r, A, in, dx, true);
}

// dx += d rmsnorm(x) / dx applied to dy; gw += sum over tokens of dy * x * r.
template <class T>
void Transformer<T>::rmsnorm_bwd(const T* x, const T* r, const T* w, const T* dy, T* dx, T* gw) {
    const int d = cfg_.dim;
    pool_.parallel_for(N_, kTokenGrain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
            const T* xr = x + n * d;
            const T* dr = dy + n * d;
            T c = 0;
            for (int i = 0; i < d; ++i) c += dr[i] * w[i] * xr[i];
            const T rn = r[n], k = rn * rn * rn * c / T(d);
            for (int i = 0; i < d; ++i) dx[n * d + i] += rn * w[i] * dr[i] - xr[i] * k;
        }
    });
    if (gw)
        for (int64_t n = 0; n < N_; ++n)
            for (int i = 0; i < d; ++i) gw[i] += dy[n * d + i] * x[n * d + i] * r[n];
}

// Keys and values of one (sequence, kv head) transposed to [head_dim][S], so that every loop over key positions is
// contiguous: scores and score gradients become row updates (vectorised), weighted sums become long dot products.
// With head_dim 8 this is several times faster than a dot product of length 8 per (query, key) pair.
template <class T>
static void gather_head_t(const T* src, int S, int stride, int hd, T* dst) {
    for (int p = 0; p < S; ++p)
        for (int i = 0; i < hd; ++i) dst[size_t(i) * S + p] = src[size_t(p) * stride + i];
}

template <class T>
void Transformer<T>::attention_fwd(LayerAct& a) {
    const int hd = cfg_.head_dim(), d = cfg_.dim, kv = cfg_.kv_dim(), H = cfg_.n_heads, G = cfg_.n_kv_heads;
    const int group = H / G, S = S_;
    const T inv_sqrt = T(1) / std::sqrt(T(hd));
    a.att.resize(size_t(B_) * H * tri());
    a.ao.resize(size_t(N_ * d));
    pool_.parallel_for(int64_t(B_) * G, 1, [&](int64_t b0, int64_t e0) {
        std::vector<T> kt(size_t(hd) * S), vt(size_t(hd) * S);
        for (int64_t item = b0; item < e0; ++item) {
            const int b = int(item / G), g = int(item % G);
            gather_head_t(a.k.data() + size_t(b) * S * kv + size_t(g) * hd, S, kv, hd, kt.data());
            gather_head_t(a.v.data() + size_t(b) * S * kv + size_t(g) * hd, S, kv, hd, vt.data());
            for (int h = g * group; h < (g + 1) * group; ++h)
                for (int t = 0; t < S; ++t) {
                    const T* q = a.q.data() + (size_t(b) * S + t) * d + size_t(h) * hd;
                    T* P = a.att.data() + (size_t(b) * H + h) * tri() + size_t(t) * (t + 1) / 2;
                    const int n = t + 1;
                    // softmax(q . k / sqrt(head_dim)) over keys 0..t, as in the engine
                    std::fill_n(P, n, T(0));
                    for (int i = 0; i < hd; ++i) {
                        const T qi = q[i] * inv_sqrt;
                        const T* kr = &kt[size_t(i) * S];
                        for (int p = 0; p < n; ++p) P[p] += qi * kr[p];
                    }
                    const T mx = *std::max_element(P, P + n);
                    T sum = 0;
                    for (int p = 0; p < n; ++p) {
                        P[p] = std::exp(P[p] - mx);
                        sum += P[p];
                    }
                    const T inv = T(1) / sum;
                    for (int p = 0; p < n; ++p) P[p] *= inv;
                    T* o = a.ao.data() + (size_t(b) * S + t) * d + size_t(h) * hd;
                    for (int i = 0; i < hd; ++i) o[i] = dotp(P, &vt[size_t(i) * S], n);
                }
        }
    });
}

// One work item per (sequence, kv head): it owns dk and dv of that head and dq of the query heads sharing it.
//   dP = dO . v,  dS = P * (dP - sum(P * dP)) / sqrt(head_dim),  dq = dS K,  dK += dS^T q,  dV += P^T dO
template <class T>
void Transformer<T>::attention_bwd(const LayerAct& a, const T* dao, T* dq, T* dk, T* dv) {
    const int hd = cfg_.head_dim(), d = cfg_.dim, kv = cfg_.kv_dim(), H = cfg_.n_heads, G = cfg_.n_kv_heads;
    const int group = H / G, S = S_;
    const T inv_sqrt = T(1) / std::sqrt(T(hd));
    pool_.parallel_for(int64_t(B_) * G, 1, [&](int64_t b0, int64_t e0) {
        const size_t n_t = size_t(hd) * S;
        std::vector<T> kt(n_t), vt(n_t), dkt(n_t), dvt(n_t), dS(static_cast<size_t>(S));
        for (int64_t item = b0; item < e0; ++item) {
            const int b = int(item / G), g = int(item % G);
            const size_t koff = size_t(b) * S * kv + size_t(g) * hd;
            gather_head_t(a.k.data() + koff, S, kv, hd, kt.data());
            gather_head_t(a.v.data() + koff, S, kv, hd, vt.data());
            std::fill(dkt.begin(), dkt.end(), T(0));
            std::fill(dvt.begin(), dvt.end(), T(0));
            for (int h = g * group; h < (g + 1) * group; ++h)
                for (int t = 0; t < S; ++t) {
                    const size_t qoff = (size_t(b) * S + t) * d + size_t(h) * hd;
                    const T* q = a.q.data() + qoff;
                    const T* dO = dao + qoff;
                    const T* P = a.att.data() + (size_t(b) * H + h) * tri() + size_t(t) * (t + 1) / 2;
                    const int n = t + 1;
                    T* ds = dS.data();
                    std::fill_n(ds, n, T(0));
                    for (int i = 0; i < hd; ++i) {
                        const T doi = dO[i];
                        const T* vr = &vt[size_t(i) * S];
                        T* dvr = &dvt[size_t(i) * S];
                        for (int p = 0; p < n; ++p) {
                            ds[p] += doi * vr[p];
                            dvr[p] += doi * P[p];
                        }
                    }
                    const T c = dotp(P, ds, n);
                    for (int p = 0; p < n; ++p) ds[p] = P[p] * (ds[p] - c) * inv_sqrt;
                    T* dqr = dq + qoff;
                    for (int i = 0; i < hd; ++i) {
                        dqr[i] = dotp(ds, &kt[size_t(i) * S], n);
                        const T qi = q[i];
                        T* dkr = &dkt[size_t(i) * S];
                        for (int p = 0; p < n; ++p) dkr[p] += qi * ds[p];
                    }
                }
            for (int p = 0; p < S; ++p)
                for (int i = 0; i < hd; ++i) {
                    dk[koff + size_t(p) * kv + i] = dkt[size_t(i) * S + p];
                    dv[koff + size_t(p) * kv + i] = dvt[size_t(i) * S + p];
                }
        }
    });
}

template <class T>
double Transformer<T>::forward(const ModelRef<const T>& p, T s, const int32_t* tokens, const int32_t* targets, int B,
                               int S) {
    if (B <= 0 || S <= 0) fail(Status::invalid_argument, "forward: empty batch");
    if (S > cfg_.seq_len)
        fail(Status::invalid_argument, "forward: sequence of " + std::to_string(S) + " tokens exceeds the model's context of " +
                                           std::to_string(cfg_.seq_len));
    if (int(p.layers.size()) != cfg_.n_layers) fail(Status::internal, "forward: layer views do not match the model");
    B_ = B;
    S_ = S;
    N_ = int64_t(B) * S;
    rank_ = p.lora_rank;
    const int64_t N = N_;
    const int d = cfg_.dim, kv = cfg_.kv_dim(), hidden = cfg_.hidden_dim, V = cfg_.vocab_size, hd = cfg_.head_dim();
    const T eps = T(cfg_.norm_eps);
    tokens_.assign(tokens, tokens + N);
    targets_.assign(size_t(N), -1);
    if (targets) targets_.assign(targets, targets + N);
    for (int64_t n = 0; n < N; ++n) {
        if (tokens_[size_t(n)] < 0 || tokens_[size_t(n)] >= V)
            fail(Status::invalid_argument, "forward: token id " + std::to_string(tokens_[size_t(n)]) + " out of range");
        if (targets_[size_t(n)] >= V)
            fail(Status::invalid_argument, "forward: target id " + std::to_string(targets_[size_t(n)]) + " out of range");
    }

    if (rope_len_ < S) {
        // the engine's formula: freq = 1 / theta^(i / head_dim), angle = pos * freq
        const int half = hd / 2;
        rope_cos_.resize(size_t(S) * half);
        rope_sin_.resize(size_t(S) * half);
        for (int pos = 0; pos < S; ++pos)
            for (int i = 0; i < hd; i += 2) {
                const T freq = T(1) / std::pow(T(cfg_.rope_theta), T(i) / T(hd));
                const T angle = T(pos) * freq;
                rope_cos_[size_t(pos * half + i / 2)] = std::cos(angle);
                rope_sin_[size_t(pos * half + i / 2)] = std::sin(angle);
            }
        rope_len_ = S;
    }

    auto rmsnorm_fwd = [&](const T* x, const T* w, T* out, T* r) {
        pool_.parallel_for(N, kTokenGrain, [&](int64_t b, int64_t e) {
            for (int64_t n = b; n < e; ++n) {
                const T* xr = x + n * d;
                T ss = 0;
                for (int i = 0; i < d; ++i) ss += xr[i] * xr[i];
                const T inv = T(1) / std::sqrt(ss / T(d) + eps);
                r[n] = inv;
                for (int i = 0; i < d; ++i) out[n * d + i] = xr[i] * inv * w[i];
            }
        });
    };

    layers_.resize(size_t(cfg_.n_layers));
    // embeddings -> input of layer 0
    {
        auto& x = layers_[0].x;
        x.resize(size_t(N * d));
        for (int64_t n = 0; n < N; ++n) std::copy_n(p.tok_embd + size_t(tokens_[size_t(n)]) * d, d, &x[size_t(n * d)]);
    }
    for (int l = 0; l < cfg_.n_layers; ++l) {
        LayerAct& a = layers_[size_t(l)];
        const LayerRef<const T>& L = p.layers[size_t(l)];
        auto lin = [&](Proj j, const T* x, T* y) {
            const int i = proj_index(j);
            const auto [out, in] = proj_shape(cfg_, j);
            linear_fwd(x, in, L.w[size_t(i)], out, L.lora_a[size_t(i)], L.lora_b[size_t(i)], s, a.u[i], y);
        };
        a.r1.resize(size_t(N));
        a.r2.resize(size_t(N));
        a.xn1.resize(size_t(N * d));
        a.xn2.resize(size_t(N * d));
        a.q.resize(size_t(N * d));
        a.k.resize(size_t(N * kv));
        a.v.resize(size_t(N * kv));
        a.x2.resize(size_t(N * d));
        a.h1.resize(size_t(N * hidden));
        a.h3.resize(size_t(N * hidden));
        a.hg.resize(size_t(N * hidden));

        rmsnorm_fwd(a.x.data(), L.attn_norm, a.xn1.data(), a.r1.data());
        lin(Proj::q, a.xn1.data(), a.q.data());
        lin(Proj::k, a.xn1.data(), a.k.data());
        lin(Proj::v, a.xn1.data(), a.v.data());
        rope(a.q.data(), cfg_.n_heads, false);
        rope(a.k.data(), cfg_.n_kv_heads, false);
        attention_fwd(a);
        lin(Proj::o, a.ao.data(), a.x2.data());
        for (int64_t i = 0; i < N * d; ++i) a.x2[size_t(i)] += a.x[size_t(i)];

        rmsnorm_fwd(a.x2.data(), L.ffn_norm, a.xn2.data(), a.r2.data());
        lin(Proj::w1, a.xn2.data(), a.h1.data());
        lin(Proj::w3, a.xn2.data(), a.h3.data());
        pool_.parallel_for(N, kTokenGrain, [&](int64_t b, int64_t e) {
            for (int64_t i = b * hidden; i < e * hidden; ++i) {
                const T g = a.h1[size_t(i)];
                a.hg[size_t(i)] = g / (T(1) + std::exp(-g)) * a.h3[size_t(i)];
            }
        });
        std::vector<T>& next = l + 1 < cfg_.n_layers ? layers_[size_t(l + 1)].x : xf_;
        next.resize(size_t(N * d));
        lin(Proj::w2, a.hg.data(), next.data());
        for (int64_t i = 0; i < N * d; ++i) next[size_t(i)] += a.x2[size_t(i)];
    }

    // final norm, classifier, cross-entropy
    rf_.resize(size_t(N));
    xnf_.resize(size_t(N * d));
    rmsnorm_fwd(xf_.data(), p.final_norm, xnf_.data(), rf_.data());
    logits_.resize(size_t(N * V));
    transpose(p.output, V, d, wT_);
    gemm(pool_, xnf_.data(), N, d, wT_.data(), V, logits_.data(), false);
    probs_.resize(size_t(N * V));
    tok_loss_.assign(size_t(N), 0.0);
    pool_.parallel_for(N, kTokenGrain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
            const T* l = &logits_[size_t(n * V)];
            T* pr = &probs_[size_t(n * V)];
            const T mx = *std::max_element(l, l + V);
            T sum = 0;
            for (int v = 0; v < V; ++v) {
                pr[v] = std::exp(l[v] - mx);
                sum += pr[v];
            }
            const T inv = T(1) / sum;
            for (int v = 0; v < V; ++v) pr[v] *= inv;
            const int32_t tgt = targets_[size_t(n)];
            if (tgt >= 0) tok_loss_[size_t(n)] = double(std::log(sum) + mx - l[tgt]);
        }
    });
    double loss = 0.0;
    n_scored_ = 0;
    for (int64_t n = 0; n < N; ++n)
        if (targets_[size_t(n)] >= 0) {
            loss += tok_loss_[size_t(n)];
            ++n_scored_;
        }
    return loss;
}

template <class T>
void Transformer<T>::backward(const ModelRef<const T>& p, const ModelRef<T>& g, T s, T loss_scale) {
    if (N_ == 0) fail(Status::internal, "backward without a forward pass");
    const int64_t N = N_;
    const int d = cfg_.dim, kv = cfg_.kv_dim(), hidden = cfg_.hidden_dim, V = cfg_.vocab_size;

    // cross-entropy: dlogits = loss_scale * (softmax - onehot(target))
    dlogits_.resize(size_t(N * V));
    pool_.parallel_for(N, kTokenGrain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
            T* dl = &dlogits_[size_t(n * V)];
            const int32_t tgt = targets_[size_t(n)];
            if (tgt < 0) {
                std::fill_n(dl, V, T(0));
                continue;
            }
            for (int v = 0; v < V; ++v) dl[v] = loss_scale * probs_[size_t(n * V + v)];
            dl[tgt] -= loss_scale;
        }
    });
    dxn_.assign(size_t(N * d), T(0));
    // The classifier's own gradient (into the embedding when tied) needs its input xnf.
    linear_bwd(xnf_.data(), d, p.output, V, nullptr, nullptr, s, tmp_, dlogits_.data(), dxn_.data(), g.output, nullptr,
               nullptr);
    dx_.assign(size_t(N * d), T(0));
    rmsnorm_bwd(xf_.data(), rf_.data(), p.final_norm, dxn_.data(), dx_.data(), g.final_norm);

    for (int l = cfg_.n_layers - 1; l >= 0; --l) {
        const LayerAct& a = layers_[size_t(l)];
        const LayerRef<const T>& L = p.layers[size_t(l)];
        const LayerRef<T>* G = g.layers.empty() ? nullptr : &g.layers[size_t(l)];
        auto lin = [&](Proj j, const T* x, const T* dy, T* dxo) {
            const size_t i = size_t(proj_index(j));
            const auto [out, in] = proj_shape(cfg_, j);
            linear_bwd(x, in, L.w[i], out, L.lora_a[i], L.lora_b[i], s, a.u[i], dy, dxo, G ? G->w[i] : nullptr,
                       G ? G->lora_a[i] : nullptr, G ? G->lora_b[i] : nullptr);
        };

        // FFN: out = x2 + W2 (silu(W1 xn2) * W3 xn2)
        dhg_.assign(size_t(N * hidden), T(0));
        lin(Proj::w2, a.hg.data(), dx_.data(), dhg_.data());
        dh1_.resize(size_t(N * hidden));
        dh3_.resize(size_t(N * hidden));
        pool_.parallel_for(N, kTokenGrain, [&](int64_t b, int64_t e) {
            for (int64_t i = b * hidden; i < e * hidden; ++i) {
                const T z = a.h1[size_t(i)];
                const T sig = T(1) / (T(1) + std::exp(-z));
                dh1_[size_t(i)] = dhg_[size_t(i)] * a.h3[size_t(i)] * sig * (T(1) + z * (T(1) - sig));
                dh3_[size_t(i)] = dhg_[size_t(i)] * z * sig;
            }
        });
        dxn_.assign(size_t(N * d), T(0));
        lin(Proj::w1, a.xn2.data(), dh1_.data(), dxn_.data());
        lin(Proj::w3, a.xn2.data(), dh3_.data(), dxn_.data());
        dx2_ = dx_;
        rmsnorm_bwd(a.x2.data(), a.r2.data(), L.ffn_norm, dxn_.data(), dx2_.data(), G ? G->ffn_norm : nullptr);

        // attention: x2 = x + Wo attention(rope(Wq xn1), rope(Wk xn1), Wv xn1)
        dao_.assign(size_t(N * d), T(0));
        lin(Proj::o, a.ao.data(), dx2_.data(), dao_.data());
        dq_.resize(size_t(N * d));
        dk_.resize(size_t(N * kv));
        dv_.resize(size_t(N * kv));
        attention_bwd(a, dao_.data(), dq_.data(), dk_.data(), dv_.data());
        rope(dq_.data(), cfg_.n_heads, true);
        rope(dk_.data(), cfg_.n_kv_heads, true);
        dxn_.assign(size_t(N * d), T(0));
        lin(Proj::q, a.xn1.data(), dq_.data(), dxn_.data());
        lin(Proj::k, a.xn1.data(), dk_.data(), dxn_.data());
        lin(Proj::v, a.xn1.data(), dv_.data(), dxn_.data());
        dx_ = dx2_;
        rmsnorm_bwd(a.x.data(), a.r1.data(), L.attn_norm, dxn_.data(), dx_.data(), G ? G->attn_norm : nullptr);
    }

    if (g.tok_embd)
        for (int64_t n = 0; n < N; ++n) {
            T* row = g.tok_embd + size_t(tokens_[size_t(n)]) * d;
            for (int i = 0; i < d; ++i) row[i] += dx_[size_t(n * d + i)];
        }
}

template class Transformer<float>;
template class Transformer<double>;

}  // namespace si::train
