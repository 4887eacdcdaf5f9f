#include "attack/attacks.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <set>

#include <fcntl.h>
#include <unistd.h>

#include "backends/accelerator.h"
#include "common/error.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "host/trace.h"

namespace si::attack {

namespace {

Mat normalise_rows(const Mat& W) {
    Mat U = W;
    for (int64_t i = 0; i < U.rows; ++i) {
        const double n = norm(U.row(i), U.cols);
        if (n > 0)
            for (int64_t j = 0; j < U.cols; ++j) U(i, j) /= n;
    }
    return U;
}

std::vector<double> sorted_row(const Mat& U, int64_t i, double sign) {
    std::vector<double> v(U.row(i), U.row(i) + U.cols);
    for (double& x : v) x *= sign;
    std::sort(v.begin(), v.end());
    return v;
}

}  // namespace

Mat align_to_base(const Mat& Wp, const Mat& W0, double* objective) {
    const int64_t M = Wp.rows, N = W0.rows, K = W0.cols;
    if (Wp.cols != K || M < N) fail(Status::invalid_argument, "align_to_base: the offloaded matrix does not fit the base");
    const Mat U = normalise_rows(Wp), V = normalise_rows(W0);
    // Initial row matching from column-permutation- and scale-invariant profiles: the sorted entries of each
    // normalised row (either sign).
    Mat cost(N, M);
    {
        std::vector<std::vector<double>> pv(static_cast<size_t>(N)), pu(static_cast<size_t>(M)), pn(static_cast<size_t>(M));
        for (int64_t i = 0; i < N; ++i) pv[size_t(i)] = sorted_row(V, i, 1.0);
        for (int64_t r = 0; r < M; ++r) {
            pu[size_t(r)] = sorted_row(U, r, 1.0);
            pn[size_t(r)] = sorted_row(U, r, -1.0);
        }
        for (int64_t i = 0; i < N; ++i)
            for (int64_t r = 0; r < M; ++r) {
                double a = 0, b = 0;
                for (int64_t k = 0; k < K; ++k) {
                    a += (pv[size_t(i)][size_t(k)] - pu[size_t(r)][size_t(k)]) * (pv[size_t(i)][size_t(k)] - pu[size_t(r)][size_t(k)]);
                    b += (pv[size_t(i)][size_t(k)] - pn[size_t(r)][size_t(k)]) * (pv[size_t(i)][size_t(k)] - pn[size_t(r)][size_t(k)]);
                }
                cost(i, r) = std::min(a, b);
            }
    }
    // Alternating Hungarian matching of columns (given rows) and rows (given columns) from a start; returns the
    // mean |cos| of matched rows.
    auto alternate = [&](std::vector<int>& rows, std::vector<int>& cols, std::vector<double>& sign) {
        double obj = 0.0;
        for (int it = 0; it < 30; ++it) {
            Mat cc(K, K);  // -(correlation of base column j with offloaded column j' over the matched rows)
            for (int64_t i = 0; i < N; ++i) {
                const double* v = V.row(i);
                const double* u = U.row(rows[size_t(i)]);
                const double sg = sign[size_t(i)];
                for (int64_t j = 0; j < K; ++j)
                    for (int64_t jp = 0; jp < K; ++jp) cc(j, jp) -= sg * v[j] * u[jp];
            }
            const std::vector<int> new_cols = hungarian(cc);
            Mat Up(M, K);  // offloaded rows with the columns put back
            for (int64_t r = 0; r < M; ++r)
                for (int64_t j = 0; j < K; ++j) Up(r, j) = U(r, new_cols[size_t(j)]);
            Mat rc(N, M);
            for (int64_t i = 0; i < N; ++i)
                for (int64_t r = 0; r < M; ++r) rc(i, r) = -std::abs(dot(V.row(i), Up.row(r), K));
            const std::vector<int> new_rows = hungarian(rc);
            obj = 0.0;
            for (int64_t i = 0; i < N; ++i) {
                const double c = dot(V.row(i), Up.row(new_rows[size_t(i)]), K);
                sign[size_t(i)] = c < 0 ? -1.0 : 1.0;
                obj += std::abs(c);
            }
            obj /= double(N);
            const bool same = new_cols == cols && new_rows == rows;
            cols = new_cols;
            rows = new_rows;
            if (same) break;
        }
        return obj;
    };
    // Three starts: the profile matching above, "no obfuscation" (identity), and columns matched by their profiles;
    // the best objective wins.
    std::vector<int> rows = hungarian(cost), cols(static_cast<size_t>(K));
    std::iota(cols.begin(), cols.end(), 0);
    std::vector<double> sign(static_cast<size_t>(N), 1.0);
    double obj = alternate(rows, cols, sign);
    {
        std::vector<int> rows2(static_cast<size_t>(N)), cols2(static_cast<size_t>(K));
        std::iota(rows2.begin(), rows2.end(), 0);
        std::iota(cols2.begin(), cols2.end(), 0);
        std::vector<double> sign2(static_cast<size_t>(N), 1.0);
        const double obj2 = alternate(rows2, cols2, sign2);
        if (obj2 > obj) {
            obj = obj2;
            rows = rows2;
            cols = cols2;
        }
    }
    {
        // Third start: columns matched by their own profiles (the sorted entries of each column of the normalised
        // rows, read at N quantiles: invariant to the row permutation and scales, disturbed only by the fake rows),
        // rows matched given those columns.
        Mat ccost(K, K);
        std::vector<std::vector<double>> qv(static_cast<size_t>(K)), qu(static_cast<size_t>(K));
        for (int64_t j = 0; j < K; ++j) {
            std::vector<double> a(static_cast<size_t>(N)), b(static_cast<size_t>(M));
            for (int64_t i = 0; i < N; ++i) a[size_t(i)] = V(i, j);
            for (int64_t r = 0; r < M; ++r) b[size_t(r)] = U(r, j);
            std::sort(a.begin(), a.end());
            std::sort(b.begin(), b.end());
            qv[size_t(j)] = a;
            qu[size_t(j)].resize(size_t(N));
            for (int64_t i = 0; i < N; ++i)
                qu[size_t(j)][size_t(i)] = b[size_t(N > 1 ? (i * (M - 1) + (N - 1) / 2) / (N - 1) : 0)];
        }
        for (int64_t j = 0; j < K; ++j)
            for (int64_t jp = 0; jp < K; ++jp) {
                double c = 0;
                for (int64_t i = 0; i < N; ++i) {
                    const double d = qv[size_t(j)][size_t(i)] - qu[size_t(jp)][size_t(i)];
                    c += d * d;
                }
                ccost(j, jp) = c;
            }
        std::vector<int> cols3 = hungarian(ccost);
        Mat rc(N, M);
        for (int64_t i = 0; i < N; ++i)
            for (int64_t r = 0; r < M; ++r) {
                double c = 0;
                for (int64_t j = 0; j < K; ++j) c += V(i, j) * U(r, cols3[size_t(j)]);
                rc(i, r) = -std::abs(c);
            }
        std::vector<int> rows3 = hungarian(rc);
        std::vector<double> sign3(static_cast<size_t>(N), 1.0);
        for (int64_t i = 0; i < N; ++i) {
            double c = 0;
            for (int64_t j = 0; j < K; ++j) c += V(i, j) * U(rows3[size_t(i)], cols3[size_t(j)]);
            sign3[size_t(i)] = c < 0 ? -1.0 : 1.0;
        }
        const double obj3 = alternate(rows3, cols3, sign3);
        if (obj3 > obj) {
            obj = obj3;
            rows = rows3;
            cols = cols3;
        }
    }
    if (objective) *objective = obj;
    // Per-row scale fit against the base: w_hat = w' / s with s = <w', w0> / <w0, w0>.
    Mat out(N, K);
    for (int64_t i = 0; i < N; ++i) {
        const double* w0 = W0.row(i);
        std::vector<double> wp(static_cast<size_t>(K));
        for (int64_t j = 0; j < K; ++j) wp[size_t(j)] = Wp(rows[size_t(i)], cols[size_t(j)]);
        const double s = dot(wp.data(), w0, K) / std::max(dot(w0, w0, K), 1e-300);
        for (int64_t j = 0; j < K; ++j) out(i, j) = s != 0.0 ? wp[size_t(j)] / s : 0.0;
    }
    return out;
}

std::map<ProjKey, Mat> a1_align_weights(const TraceReader& trace, const ModelWeights& base) {
    std::map<ProjKey, Mat> out;
    for (const TraceEntry& e : trace.entries()) {
        if (e.role != "weight" || e.layer < 0 || e.layer >= base.cfg.n_layers) continue;
        const auto p = trace_op_proj(e.op);
        if (!p) continue;
        Mat Wp(e.rows(), e.cols());
        Wp.a = trace.load(e);
        out[{e.layer, *p}] = align_to_base(Wp, base_projection(base, e.layer, *p));
    }
    return out;
}

std::map<ProjKey, Mat> a2_regress(const TraceReader& trace, const ModelWeights& base, double* r2) {
    // inputs and outputs of each (layer, projection), in trace order (the k-th input pairs with the k-th output)
    std::map<ProjKey, std::vector<const TraceEntry*>> ins, outs;
    for (const TraceEntry& e : trace.entries()) {
        if (e.layer < 0 || e.layer >= base.cfg.n_layers) continue;
        const auto p = trace_op_proj(e.op);
        if (!p) continue;
        if (e.role == "input") ins[{e.layer, *p}].push_back(&e);
        if (e.role == "output") outs[{e.layer, *p}].push_back(&e);
    }
    std::map<ProjKey, Mat> est;
    double res_r2 = 0.0;
    int n_r2 = 0;
    for (const auto& [key, in] : ins) {
        const auto& out = outs[key];
        const size_t n = std::min(in.size(), out.size());
        if (n == 0) continue;
        int64_t rows = 0;
        for (size_t i = 0; i < n; ++i) rows += in[i]->rows();
        const int64_t K = in[0]->cols(), N = out[0]->cols();
        Mat X(rows, K), Y(rows, N);
        int64_t r = 0;
        for (size_t i = 0; i < n; ++i) {
            const std::vector<double> x = trace.load(*in[i]), y = trace.load(*out[i]);
            std::copy(x.begin(), x.end(), X.row(r));
            std::copy(y.begin(), y.end(), Y.row(r));
            r += in[i]->rows();
        }
        const Mat W = least_squares(X, Y, 1e-9, nullptr);
        // Out-of-sample R^2: fit on the first three quarters of the rows, score the last quarter (an in-sample R^2
        // of a map from K inputs fitted to n rows of noise is about K / n).
        const int64_t ntr = rows * 3 / 4;
        if (ntr >= K && rows - ntr > 0) {
            Mat Xa(ntr, K), Ya(ntr, N);
            std::copy(X.a.begin(), X.a.begin() + ntr * K, Xa.a.begin());
            std::copy(Y.a.begin(), Y.a.begin() + ntr * N, Ya.a.begin());
            const Mat Wa = least_squares(Xa, Ya, 1e-9, nullptr);
            double res = 0.0, tot = 0.0;
            for (int64_t j = 0; j < N; ++j) {
                double mean = 0.0;
                for (int64_t i = ntr; i < rows; ++i) mean += Y(i, j);
                mean /= double(rows - ntr);
                for (int64_t i = ntr; i < rows; ++i) {
                    const double pr = dot(X.row(i), Wa.row(j), K);
                    res += (Y(i, j) - pr) * (Y(i, j) - pr);
                    tot += (Y(i, j) - mean) * (Y(i, j) - mean);
                }
            }
            res_r2 += tot > 0 ? 1.0 - res / tot : 0.0;
            ++n_r2;
        }
        est[key] = align_to_base(W, base_projection(base, key.first, key.second));
    }
    if (r2) *r2 = n_r2 ? res_r2 / n_r2 : 0.0;
    return est;
}

DeltaScore score_delta(const std::map<ProjKey, Mat>& estimates, const ModelWeights& base,
                       const train::LoraAdapter& secret) {
    std::vector<double> est, truth;
    DeltaScore s;
    for (const auto& [key, W] : estimates) {
        const Mat W0 = base_projection(base, key.first, key.second);
        const Mat D = lora_delta(secret, base.cfg, key.first, key.second);
        for (size_t i = 0; i < W.a.size(); ++i) {
            est.push_back(W.a[i] - W0.a[i]);
            truth.push_back(D.a[i]);
        }
        ++s.matrices;
    }
    s.rho = cosine(est, truth);
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < est.size(); ++i) {
        num += (est[i] - truth[i]) * (est[i] - truth[i]);
        den += truth[i] * truth[i];
    }
    s.rel_err = den > 0 ? std::sqrt(num / den) : 1.0;
    return s;
}

std::vector<double> slot_delta_cosines(const std::map<ProjKey, Mat>& estimates, const ModelWeights& base,
                                       const train::LoraAdapter& secret) {
    std::map<std::pair<int, int>, std::pair<std::vector<double>, std::vector<double>>> slots;
    for (const auto& [key, W] : estimates) {
        const Mat W0 = base_projection(base, key.first, key.second);
        const Mat D = lora_delta(secret, base.cfg, key.first, key.second);
        auto& [est, truth] = slots[{key.first, proj_stage(key.second)}];
        for (size_t i = 0; i < W.a.size(); ++i) {
            est.push_back(W.a[i] - W0.a[i]);
            truth.push_back(D.a[i]);
        }
    }
    std::vector<double> out;
    for (const auto& [k, v] : slots) out.push_back(cosine(v.first, v.second));
    return out;
}

// ---- A3 -------------------------------------------------------------------------------------------------------------

namespace {

struct UnionFind {
    std::vector<int64_t> p;
    explicit UnionFind(int64_t n) : p(static_cast<size_t>(n)) { std::iota(p.begin(), p.end(), 0); }
    int64_t find(int64_t x) {
        while (p[size_t(x)] != x) x = p[size_t(x)] = p[size_t(p[size_t(x)])];
        return x;
    }
    void unite(int64_t a, int64_t b) { p[size_t(find(a))] = find(b); }
};

}  // namespace

MaskHygiene a3_mask_hygiene(const std::vector<const TraceReader*>& sessions) {
    // group the distinct masked input rows by slot (layer, op of the input's first use)
    struct Group {
        int64_t K = 0;
        std::vector<uint32_t> data;
        std::vector<int> session;
    };
    std::map<std::pair<int, std::string>, Group> groups;
    for (size_t s = 0; s < sessions.size(); ++s) {
        std::set<std::string> seen;
        for (const TraceEntry& e : sessions[s]->entries()) {
            if (e.role != "input" || e.layer < 0 || (e.dtype != "uint32" && e.dtype != "int32")) continue;
            if (!seen.insert(e.file).second) continue;
            Group& g = groups[{e.layer, e.op}];
            if (g.K == 0) g.K = e.cols();
            if (g.K != e.cols()) continue;
            const std::vector<uint32_t> w = sessions[s]->load_u32(e);
            g.data.insert(g.data.end(), w.begin(), w.end());
            g.session.insert(g.session.end(), size_t(e.rows()), int(s));
        }
    }
    MaskHygiene h;
    double masks = 0.0, rowsum = 0.0;
    constexpr int64_t kRange = int64_t(1) << 17;  // |x - x'| < 2^17 for activations of at most 16 bits
    for (auto& [key, g] : groups) {
        const int64_t n = int64_t(g.session.size()), K = g.K;
        if (n == 0) continue;
        std::vector<int64_t> idx(static_cast<size_t>(n));
        std::iota(idx.begin(), idx.end(), 0);
        std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return g.data[size_t(a * K)] < g.data[size_t(b * K)]; });
        UnionFind uf(n);
        std::vector<char> cross(static_cast<size_t>(n), 0);
        for (int64_t a = 0; a < n; ++a) {
            const uint32_t* va = g.data.data() + idx[size_t(a)] * K;
            for (int64_t b = a + 1; b < n; ++b) {
                const uint32_t* vb = g.data.data() + idx[size_t(b)] * K;
                if (int64_t(vb[0]) - int64_t(va[0]) >= kRange) break;
                bool same = true;
                for (int64_t k = 0; k < K && same; ++k) {
                    const int64_t d = int64_t(int32_t(vb[k] - va[k]));
                    same = d > -kRange && d < kRange;
                }
                if (!same) continue;
                uf.unite(idx[size_t(a)], idx[size_t(b)]);
                const int sa = g.session[size_t(idx[size_t(a)])], sb = g.session[size_t(idx[size_t(b)])];
                if (sa != sb) cross[size_t(sa > sb ? idx[size_t(a)] : idx[size_t(b)])] = 1;
            }
        }
        std::map<int64_t, int64_t> size;
        for (int64_t i = 0; i < n; ++i) ++size[uf.find(i)];
        for (int64_t i = 0; i < n; ++i) {
            if (size[uf.find(i)] > 1) ++h.repeated;
            if (g.session[size_t(i)] > 0) {
                ++h.later_vectors;
                if (cross[size_t(i)]) ++h.cross_session;
            }
        }
        h.vectors += n;
        masks += double(size.size());
        rowsum += double(n);
    }
    if (!groups.empty()) {
        h.masks_per_slot = masks / double(groups.size());
        h.rows_per_slot = rowsum / double(groups.size());
    }
    return h;
}

// ---- A4 -------------------------------------------------------------------------------------------------------------

std::vector<Mat> trace_pass_features(const TraceReader& trace) {
    std::vector<Mat> passes;
    std::vector<std::vector<double>> cols;  // per crossing: [T][K] values
    std::vector<int64_t> widths;
    int64_t T = 0;
    std::set<std::string> seen;
    auto flush = [&] {
        if (T == 0 || cols.empty()) return;
        int64_t F = 0;
        for (int64_t w : widths) F += w;
        Mat m(T, F);
        int64_t off = 0;
        for (size_t c = 0; c < cols.size(); ++c) {
            for (int64_t t = 0; t < T; ++t)
                for (int64_t k = 0; k < widths[c]; ++k) m(t, off + k) = cols[c][size_t(t * widths[c] + k)];
            off += widths[c];
        }
        passes.push_back(std::move(m));
    };
    for (const TraceEntry& e : trace.entries()) {
        if (e.layer == -1 && e.op == "tokens" && e.role == "input") {
            flush();
            cols.clear();
            widths.clear();
            T = e.rows();
            continue;
        }
        if (e.role != "input" || e.layer < 0 || e.op == "classifier" || e.rows() != T) continue;
        if (!seen.insert(e.file).second) continue;
        std::vector<double> v = trace.load(e);
        if (e.dtype == "uint32" || e.dtype == "int32")
            for (double& x : v) x *= 1.0 / 2147483648.0;
        cols.push_back(std::move(v));
        widths.push_back(e.cols());
    }
    flush();
    return passes;
}

double a4_distinguish(const std::vector<Mat>& passes, const std::vector<int>& labels, int pool, uint64_t seed, double l2) {
    if (passes.size() != labels.size()) fail(Status::invalid_argument, "A4: one label per pass");
    pool = std::max(pool, 1);
    SplitMix rng(seed * 0x9e3779b97f4a7c15ULL + 4);
    std::vector<int> train_of(passes.size(), 0);
    for (int c = 0; c < 2; ++c) {
        std::vector<size_t> ids;
        for (size_t i = 0; i < passes.size(); ++i)
            if (labels[i] == c) ids.push_back(i);
        for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[size_t(rng.below(i))]);
        for (size_t i = 0; i < ids.size() / 2; ++i) train_of[ids[i]] = 1;
    }
    const int64_t F = passes.empty() ? 0 : passes[0].cols;
    auto units = [&](int want_train, std::vector<int>& y) {
        int64_t n = 0;
        for (size_t i = 0; i < passes.size(); ++i)
            if (train_of[i] == want_train) n += passes[i].rows / pool;
        Mat X(n, F);
        int64_t r = 0;
        for (size_t i = 0; i < passes.size(); ++i) {
            if (train_of[i] != want_train) continue;
            if (passes[i].cols != F) fail(Status::invalid_argument, "A4: passes with different crossings");
            for (int64_t u = 0; u < passes[i].rows / pool; ++u, ++r) {
                for (int64_t t = u * pool; t < (u + 1) * pool; ++t)
                    for (int64_t k = 0; k < F; ++k) X(r, k) += passes[i](t, k) / pool;
                y.push_back(labels[i]);
            }
        }
        return X;
    };
    std::vector<int> ytr, yte;
    const Mat Xtr = units(1, ytr), Xte = units(0, yte);
    if (l2 < 0) {
        // diagonal linear discriminant: w = (mu1 - mu0) / var
        std::vector<double> m0(size_t(F), 0.0), m1(size_t(F), 0.0), var(size_t(F), 0.0);
        int64_t n0 = 0, n1 = 0;
        for (int64_t i = 0; i < Xtr.rows; ++i) {
            auto& m = ytr[size_t(i)] ? m1 : m0;
            (ytr[size_t(i)] ? n1 : n0)++;
            for (int64_t k = 0; k < F; ++k) m[size_t(k)] += Xtr(i, k);
        }
        for (int64_t k = 0; k < F; ++k) {
            m0[size_t(k)] /= double(std::max<int64_t>(n0, 1));
            m1[size_t(k)] /= double(std::max<int64_t>(n1, 1));
        }
        for (int64_t i = 0; i < Xtr.rows; ++i)
            for (int64_t k = 0; k < F; ++k) {
                const double d = Xtr(i, k) - (ytr[size_t(i)] ? m1 : m0)[size_t(k)];
                var[size_t(k)] += d * d;
            }
        std::vector<double> sc(size_t(Xte.rows), 0.0);
        for (int64_t k = 0; k < F; ++k) {
            const double v = var[size_t(k)] / double(std::max<int64_t>(Xtr.rows - 2, 1));
            if (!(v > 0)) continue;
            const double w = (m1[size_t(k)] - m0[size_t(k)]) / v, c = 0.5 * (m1[size_t(k)] + m0[size_t(k)]);
            for (int64_t i = 0; i < Xte.rows; ++i) sc[size_t(i)] += w * (Xte(i, k) - c);
        }
        return roc_auc(sc, yte);
    }
    LogisticRegression lr;
    lr.fit(Xtr, ytr, l2, 150, 0.05);
    return roc_auc(lr.predict(Xte), yte);
}

// ---- A8 -------------------------------------------------------------------------------------------------------------

namespace {

// One alteration of a product word, by kind: an added offset, a flipped bit, a +-1 change (delta != 0).
void alter_word(uint32_t& w, uint64_t kind, uint32_t delta) {
    switch (kind % 3) {
        case 0: w += delta; break;
        case 1: w ^= uint32_t(1) << (delta % 32); break;
        default: w += (delta & 1) ? 1u : ~0u; break;
    }
}

// Alters one chosen product of the masked offload (the production path's only accelerator op).
class TamperingAccelerator final : public Accelerator {
public:
    TamperingAccelerator(int64_t target, uint64_t seed) : inner_(make_cpu_accelerator(nullptr)), target_(target), rng_(seed) {}
    const char* name() const override { return "tampering"; }
    bool supports(AccelOp op, DType t) const override { return inner_->supports(op, t); }
    WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override { return inner_->upload_i8(W, N, K); }
    WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override { return inner_->upload_f32(W, N, K); }
    void release(WeightHandle& w) override { inner_->release(w); }
    void mul_mat_masked(const WeightHandle& W, const uint32_t* X, int64_t T, uint32_t* Y) override {
        inner_->mul_mat_masked(W, X, T, Y);
        const size_t n = size_t(T * W.rows);
        if (calls_++ == target_) {
            alter(Y, n, last_[W.id]);
            tampered_ = true;
        }
        last_[W.id].assign(Y, Y + n);
    }
    void mul_mat_i8(const WeightHandle& W, const int8_t* X, int64_t T, int32_t* Y) override { inner_->mul_mat_i8(W, X, T, Y); }
    void mul_mat_f32(const WeightHandle& W, const float* X, int64_t T, float* Y) override { inner_->mul_mat_f32(W, X, T, Y); }
    bool tampered() const { return tampered_; }
    int64_t calls() const { return calls_; }

    // One alteration of Y: an added offset, a flipped bit, a +-1 change, or a replay of the previous product of the
    // same weight (a correct product for another mask) when there is one of the same size.
    void alter(uint32_t* Y, size_t n, const std::vector<uint32_t>& previous) {
        const uint64_t kind = rng_.below(4);
        const size_t i = size_t(rng_.below(n));
        uint32_t delta = 0;
        while (delta == 0) delta = uint32_t(rng_.next());
        if (kind == 3 && previous.size() == n && !std::equal(previous.begin(), previous.end(), Y)) {
            std::copy(previous.begin(), previous.end(), Y);
            return;
        }
        alter_word(Y[i], kind, delta);
    }

private:
    std::unique_ptr<Accelerator> inner_;
    int64_t target_;
    SplitMix rng_;
    int64_t calls_ = 0;
    bool tampered_ = false;
    std::map<uint64_t, std::vector<uint32_t>> last_;
};

}  // namespace

TamperResult a8_tamper(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter, int trials,
                       int steps, uint64_t seed, const SchemeOptions& options) {
    TamperResult res;
    const std::vector<int32_t> prompt = {1, 403, 407, 261};  // "Once upon a" after BOS
    SplitMix rng(seed * 0x9e3779b97f4a7c15ULL + 8);
    auto greedy_s5 = [&](SecureSession& s, std::vector<int32_t>& out, int& tampered_at_fail) -> Status {
        int32_t t = -1;
        // precomputed unblinding: the prompt pass and the decode steps after it
        precompute_steps(s, options, int(prompt.size()) + steps - 1);
        for (int step = 0; step < steps; ++step) {
            try {
                t = step == 0 ? s.eval_sample(prompt) : s.eval_sample(std::span<const int32_t>(&t, 1));
            } catch (const Error& e) {
                tampered_at_fail = step;
                return e.status();
            }
            out.push_back(t);
        }
        return Status::ok;
    };
    auto argmax = [](const std::vector<float>& v) {
        return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
    };
    auto greedy_weak = [&](WeakSession& s, std::vector<int32_t>& out) {
        std::vector<float> logits = s.eval(prompt);
        for (int step = 0; step < steps; ++step) {
            const int32_t t = argmax(logits);
            out.push_back(t);
            if (step + 1 < steps) logits = s.eval(std::span<const int32_t>(&t, 1));
        }
    };
    std::vector<int32_t> reference;
    int64_t products = 0;
    // S5: the production session, its accelerator replaced by one that tampers
    auto s5_params = [&](std::shared_ptr<Accelerator> acc) {
        SecureSessionParams p;
        if (options.package && adapter) {
            options.package->package(*adapter);  // S5 as deployed: the adapter from its package
            p = options.package->params(*adapter, options.unblinding);
        } else {
            p.mode = SecureMode::secureinfer;
            p.lora = adapter;
            p.host = options.host;
        }
        p.n_threads = 1;
        p.accelerator = std::move(acc);
        return p;
    };
    const ModelWeights& s5_weights =
        options.package && adapter ? options.package->public_weights(*adapter) : base;
    if (scheme == Scheme::s5) {
        auto acc = std::make_shared<TamperingAccelerator>(-1, 0);
        SecureSession s(s5_weights, s5_params(acc));
        res.isolation = s.isolation();
        int f = -1;
        if (greedy_s5(s, reference, f) != Status::ok) fail(Status::internal, "A8: the untampered reference run failed");
        products = acc->calls();
    } else {
        WeakSession s(scheme, base, adapter, 1.0f, options, "");
        greedy_weak(s, reference);
        products = s.products();
        res.isolation = "simulated (no enclave host)";
    }
    if (products <= 0) fail(Status::internal, "A8: no offloaded products to tamper with");
    // Every detected trial makes the trusted core print its integrity error on stderr; a thousand of them are
    // counted here instead.
    struct QuietStderr {
        int saved = -1;
        QuietStderr() {
            std::fflush(stderr);
            saved = dup(2);
            const int nul = open("/dev/null", O_WRONLY);
            if (nul >= 0) {
                dup2(nul, 2);
                close(nul);
            }
        }
        ~QuietStderr() {
            std::fflush(stderr);
            if (saved >= 0) {
                dup2(saved, 2);
                close(saved);
            }
        }
    } quiet;
    for (int trial = 0; trial < trials; ++trial) {
        const int64_t target = int64_t(rng.below(uint64_t(products)));
        const uint64_t tseed = rng.next();
        ++res.trials;
        std::vector<int32_t> released;
        if (scheme == Scheme::s5) {
            auto acc = std::make_shared<TamperingAccelerator>(target, tseed);
            SecureSession s(s5_weights, s5_params(acc));
            int fail_step = -1;
            const Status st = greedy_s5(s, released, fail_step);
            if (acc->tampered()) ++res.tampered;
            if (st == Status::integrity) {
                ++res.detected;
                // every token released must come from steps before the failure, and equal the untampered ones
                if (!std::equal(released.begin(), released.end(), reference.begin())) ++res.prefix_mismatch;
                // the session refuses everything afterwards
                try {
                    s.eval_sample(std::vector<int32_t>{1});
                    ++res.released_after;
                } catch (const Error&) {
                }
            } else if (released != reference) {
                ++res.undetected_changed;
            }
        } else {
            WeakSession s(scheme, base, adapter, 1.0f, options, "");
            SplitMix trng(tseed);
            bool done = false;
            s.set_product_hook([&](int64_t index, uint32_t* words, size_t n) {
                if (index != target || done) return;
                done = true;
                const size_t i = size_t(trng.below(n));
                uint32_t delta = 0;
                while (delta == 0) delta = uint32_t(trng.next());
                alter_word(words[i], trng.below(3), delta);
            });
            try {
                greedy_weak(s, released);
            } catch (const Error& e) {
                if (e.status() == Status::integrity) ++res.detected;
            }
            if (done) ++res.tampered;
            if (released != reference) ++res.undetected_changed;
        }
    }
    return res;
}

}  // namespace si::attack
