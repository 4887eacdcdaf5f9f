#include "attack/linalg.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/error.h"

namespace si::attack {

Mat transpose(const Mat& m) {
    Mat t(m.cols, m.rows);
    for (int64_t i = 0; i < m.rows; ++i)
        for (int64_t j = 0; j < m.cols; ++j) t(j, i) = m(i, j);
    return t;
}

Mat matmul(const Mat& x, const Mat& y) {
    if (x.cols != y.rows) fail(Status::internal, "matmul: shapes do not fit");
    Mat z(x.rows, y.cols);
    for (int64_t i = 0; i < x.rows; ++i) {
        double* zr = z.row(i);
        for (int64_t k = 0; k < x.cols; ++k) {
            const double v = x(i, k);
            if (v == 0.0) continue;
            const double* yr = y.row(k);
            for (int64_t j = 0; j < y.cols; ++j) zr[j] += v * yr[j];
        }
    }
    return z;
}

Mat matmul_tn(const Mat& x, const Mat& y) {
    if (x.rows != y.rows) fail(Status::internal, "matmul_tn: shapes do not fit");
    Mat z(x.cols, y.cols);
    for (int64_t k = 0; k < x.rows; ++k) {
        const double* xr = x.row(k);
        const double* yr = y.row(k);
        for (int64_t i = 0; i < x.cols; ++i) {
            const double v = xr[i];
            if (v == 0.0) continue;
            double* zr = z.row(i);
            for (int64_t j = 0; j < y.cols; ++j) zr[j] += v * yr[j];
        }
    }
    return z;
}

double dot(const double* x, const double* y, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
}

double norm(const double* x, int64_t n) { return std::sqrt(dot(x, x, n)); }

double cosine(const std::vector<double>& x, const std::vector<double>& y) {
    const size_t n = std::min(x.size(), y.size());
    double xy = 0, xx = 0, yy = 0;
    for (size_t i = 0; i < n; ++i) {
        xy += x[i] * y[i];
        xx += x[i] * x[i];
        yy += y[i] * y[i];
    }
    return xx > 0 && yy > 0 ? xy / std::sqrt(xx * yy) : 0.0;
}

std::vector<int> hungarian(const Mat& cost) {
    const int64_t n = cost.rows, m = cost.cols;
    if (n > m) fail(Status::internal, "hungarian: more rows than columns");
    const double inf = std::numeric_limits<double>::infinity();
    // e-maxx formulation, 1-based: u (rows), v (columns), p[j] = row matched to column j, way = augmenting path.
    std::vector<double> u(static_cast<size_t>(n + 1), 0.0), v(static_cast<size_t>(m + 1), 0.0);
    std::vector<int64_t> p(static_cast<size_t>(m + 1), 0), way(static_cast<size_t>(m + 1), 0);
    for (int64_t i = 1; i <= n; ++i) {
        p[0] = i;
        int64_t j0 = 0;
        std::vector<double> minv(static_cast<size_t>(m + 1), inf);
        std::vector<char> used(static_cast<size_t>(m + 1), 0);
        do {
            used[size_t(j0)] = 1;
            const int64_t i0 = p[size_t(j0)];
            double delta = inf;
            int64_t j1 = 0;
            for (int64_t j = 1; j <= m; ++j) {
                if (used[size_t(j)]) continue;
                const double cur = cost(i0 - 1, j - 1) - u[size_t(i0)] - v[size_t(j)];
                if (cur < minv[size_t(j)]) {
                    minv[size_t(j)] = cur;
                    way[size_t(j)] = j0;
                }
                if (minv[size_t(j)] < delta) {
                    delta = minv[size_t(j)];
                    j1 = j;
                }
            }
            for (int64_t j = 0; j <= m; ++j) {
                if (used[size_t(j)]) {
                    u[size_t(p[size_t(j)])] += delta;
                    v[size_t(j)] -= delta;
                } else {
                    minv[size_t(j)] -= delta;
                }
            }
            j0 = j1;
        } while (p[size_t(j0)] != 0);
        do {
            const int64_t j1 = way[size_t(j0)];
            p[size_t(j0)] = p[size_t(j1)];
            j0 = j1;
        } while (j0 != 0);
    }
    std::vector<int> col(static_cast<size_t>(n), -1);
    for (int64_t j = 1; j <= m; ++j)
        if (p[size_t(j)] > 0) col[size_t(p[size_t(j)] - 1)] = int(j - 1);
    return col;
}

namespace {

// One-sided Jacobi for m >= n.
Svd svd_tall(const Mat& A) {
    const int64_t m = A.rows, n = A.cols;
    // Work on columns: store U^T (n rows of length m) for contiguous access.
    Mat Ut = transpose(A);
    Mat Vt(n, n);
    for (int64_t i = 0; i < n; ++i) Vt(i, i) = 1.0;
    const double eps = 1e-15;
    for (int sweep = 0; sweep < 60; ++sweep) {
        double off = 0.0;
        for (int64_t i = 0; i < n - 1; ++i)
            for (int64_t j = i + 1; j < n; ++j) {
                double* ui = Ut.row(i);
                double* uj = Ut.row(j);
                const double alpha = dot(ui, ui, m), beta = dot(uj, uj, m), gamma = dot(ui, uj, m);
                if (gamma == 0.0 || std::abs(gamma) <= eps * std::sqrt(alpha * beta)) continue;
                off = std::max(off, std::abs(gamma) / std::sqrt(alpha * beta));
                const double zeta = (beta - alpha) / (2.0 * gamma);
                const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
                const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
                for (int64_t k = 0; k < m; ++k) {
                    const double a = ui[k], b = uj[k];
                    ui[k] = c * a - s * b;
                    uj[k] = s * a + c * b;
                }
                double* vi = Vt.row(i);
                double* vj = Vt.row(j);
                for (int64_t k = 0; k < n; ++k) {
                    const double a = vi[k], b = vj[k];
                    vi[k] = c * a - s * b;
                    vj[k] = s * a + c * b;
                }
            }
        if (off < 1e-13) break;
    }
    std::vector<double> S(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) S[size_t(i)] = norm(Ut.row(i), m);
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return S[size_t(a)] > S[size_t(b)]; });
    Svd r;
    r.U = Mat(m, n);
    r.V = Mat(n, n);
    r.S.resize(static_cast<size_t>(n));
    for (int64_t c = 0; c < n; ++c) {
        const int64_t i = order[size_t(c)];
        const double s = S[size_t(i)];
        r.S[size_t(c)] = s;
        for (int64_t k = 0; k < m; ++k) r.U(k, c) = s > 0 ? Ut(i, k) / s : 0.0;
        for (int64_t k = 0; k < n; ++k) r.V(k, c) = Vt(i, k);
    }
    return r;
}

}  // namespace

Svd svd(const Mat& A) {
    if (A.rows >= A.cols) return svd_tall(A);
    Svd t = svd_tall(transpose(A));
    std::swap(t.U, t.V);
    return t;
}

Mat procrustes(const Mat& A, const Mat& B) {
    const Svd s = svd(matmul_tn(A, B));
    return matmul(s.U, transpose(s.V));
}

namespace {

// Orthonormal basis of the column span (modified Gram-Schmidt, dropping dependent columns).
Mat orthonormal_columns(const Mat& A) {
    Mat Q = transpose(A);  // rows = columns of A
    int64_t kept = 0;
    for (int64_t i = 0; i < Q.rows; ++i) {
        double* qi = Q.row(i);
        const double n0 = norm(qi, Q.cols);
        for (int64_t j = 0; j < kept; ++j) {
            const double* qj = Q.row(j);
            const double d = dot(qi, qj, Q.cols);
            for (int64_t k = 0; k < Q.cols; ++k) qi[k] -= d * qj[k];
        }
        const double n1 = norm(qi, Q.cols);
        if (n1 <= 1e-10 * std::max(n0, 1e-300)) continue;
        double* dst = Q.row(kept++);
        for (int64_t k = 0; k < Q.cols; ++k) dst[k] = qi[k] / n1;
    }
    Q.rows = kept;
    Q.a.resize(static_cast<size_t>(kept * Q.cols));
    return transpose(Q);
}

}  // namespace

std::vector<double> principal_cosines(const Mat& A, const Mat& B) {
    const Mat qa = orthonormal_columns(A), qb = orthonormal_columns(B);
    if (qa.cols == 0 || qb.cols == 0) return {};
    Svd s = svd(matmul_tn(qa, qb));
    for (double& v : s.S) v = std::min(1.0, v);
    return s.S;
}

Mat solve_spd(const Mat& M, const Mat& B, double ridge) {
    const int64_t n = M.rows;
    Mat L = M;
    for (int64_t i = 0; i < n; ++i) L(i, i) += ridge;
    for (int64_t j = 0; j < n; ++j) {
        double d = L(j, j);
        for (int64_t k = 0; k < j; ++k) d -= L(j, k) * L(j, k);
        if (!(d > 0)) fail(Status::internal, "solve_spd: matrix is not positive definite");
        const double ljj = std::sqrt(d);
        L(j, j) = ljj;
        for (int64_t i = j + 1; i < n; ++i) {
            double s = L(i, j);
            for (int64_t k = 0; k < j; ++k) s -= L(i, k) * L(j, k);
            L(i, j) = s / ljj;
        }
    }
    Mat X = B;
    for (int64_t c = 0; c < X.cols; ++c) {
        for (int64_t i = 0; i < n; ++i) {  // L y = b
            double s = X(i, c);
            for (int64_t k = 0; k < i; ++k) s -= L(i, k) * X(k, c);
            X(i, c) = s / L(i, i);
        }
        for (int64_t i = n - 1; i >= 0; --i) {  // L^T x = y
            double s = X(i, c);
            for (int64_t k = i + 1; k < n; ++k) s -= L(k, i) * X(k, c);
            X(i, c) = s / L(i, i);
        }
    }
    return X;
}

Mat least_squares(const Mat& X, const Mat& Y, double ridge, double* r2) {
    const Mat M = matmul_tn(X, X);
    double tr = 0.0;
    for (int64_t i = 0; i < M.rows; ++i) tr += M(i, i);
    const double lam = ridge * std::max(tr / double(std::max<int64_t>(M.rows, 1)), 1e-300);
    const Mat Wt = solve_spd(M, matmul_tn(X, Y), lam);  // [K][N]
    if (r2) {
        double res = 0.0, tot = 0.0;
        const Mat P = matmul(X, Wt);
        for (int64_t j = 0; j < Y.cols; ++j) {
            double mean = 0.0;
            for (int64_t i = 0; i < Y.rows; ++i) mean += Y(i, j);
            mean /= double(std::max<int64_t>(Y.rows, 1));
            for (int64_t i = 0; i < Y.rows; ++i) {
                res += (Y(i, j) - P(i, j)) * (Y(i, j) - P(i, j));
                tot += (Y(i, j) - mean) * (Y(i, j) - mean);
            }
        }
        *r2 = tot > 0 ? 1.0 - res / tot : 0.0;
    }
    return transpose(Wt);
}

void LogisticRegression::fit(const Mat& X, const std::vector<int>& y, double l2, int iterations, double lr) {
    const int64_t n = X.rows, d = X.cols;
    mean_.assign(static_cast<size_t>(d), 0.0);
    inv_sd_.assign(static_cast<size_t>(d), 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) mean_[size_t(j)] += X(i, j);
    for (auto& m : mean_) m /= double(std::max<int64_t>(n, 1));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) {
            const double c = X(i, j) - mean_[size_t(j)];
            inv_sd_[size_t(j)] += c * c;
        }
    for (auto& s : inv_sd_) {
        const double sd = std::sqrt(s / double(std::max<int64_t>(n, 1)));
        s = sd > 1e-12 ? 1.0 / sd : 0.0;
    }
    Mat Z(n, d);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) Z(i, j) = (X(i, j) - mean_[size_t(j)]) * inv_sd_[size_t(j)];
    w_.assign(static_cast<size_t>(d), 0.0);
    b_ = 0.0;
    std::vector<double> g(static_cast<size_t>(d + 1)), m1(static_cast<size_t>(d + 1), 0.0), m2(static_cast<size_t>(d + 1), 0.0);
    const double b1 = 0.9, b2 = 0.999;
    for (int it = 1; it <= iterations; ++it) {
        std::fill(g.begin(), g.end(), 0.0);
        for (int64_t i = 0; i < n; ++i) {
            const double z = dot(Z.row(i), w_.data(), d) + b_;
            const double p = 1.0 / (1.0 + std::exp(-z));
            const double e = p - double(y[size_t(i)]);
            const double* zr = Z.row(i);
            for (int64_t j = 0; j < d; ++j) g[size_t(j)] += e * zr[j];
            g[size_t(d)] += e;
        }
        for (int64_t j = 0; j <= d; ++j) {
            g[size_t(j)] /= double(std::max<int64_t>(n, 1));
            if (j < d) g[size_t(j)] += l2 * w_[size_t(j)];
            m1[size_t(j)] = b1 * m1[size_t(j)] + (1 - b1) * g[size_t(j)];
            m2[size_t(j)] = b2 * m2[size_t(j)] + (1 - b2) * g[size_t(j)] * g[size_t(j)];
            const double step = lr * (m1[size_t(j)] / (1 - std::pow(b1, it))) /
                                (std::sqrt(m2[size_t(j)] / (1 - std::pow(b2, it))) + 1e-8);
            if (j < d)
                w_[size_t(j)] -= step;
            else
                b_ -= step;
        }
    }
}

std::vector<double> LogisticRegression::predict(const Mat& X) const {
    std::vector<double> out(static_cast<size_t>(X.rows));
    for (int64_t i = 0; i < X.rows; ++i) {
        double z = b_;
        for (int64_t j = 0; j < X.cols; ++j) z += (X(i, j) - mean_[size_t(j)]) * inv_sd_[size_t(j)] * w_[size_t(j)];
        out[size_t(i)] = z;
    }
    return out;
}

double roc_auc(const std::vector<double>& scores, const std::vector<int>& labels) {
    const size_t n = scores.size();
    std::vector<size_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return scores[a] < scores[b]; });
    double rank_sum = 0.0;
    int64_t pos = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && scores[idx[j]] == scores[idx[i]]) ++j;
        const double avg = 0.5 * double(i + 1 + j);  // mean of ranks i+1 .. j
        for (size_t k = i; k < j; ++k)
            if (labels[idx[k]] == 1) {
                rank_sum += avg;
                ++pos;
            }
        i = j;
    }
    const int64_t neg = int64_t(n) - pos;
    if (pos == 0 || neg == 0) return 0.5;
    return (rank_sum - double(pos) * double(pos + 1) / 2.0) / (double(pos) * double(neg));
}

double tpr_at_fpr(const std::vector<double>& scores, const std::vector<int>& labels, double fpr) {
    std::vector<double> neg, posv;
    for (size_t i = 0; i < scores.size(); ++i) (labels[i] == 1 ? posv : neg).push_back(scores[i]);
    if (neg.empty() || posv.empty()) return 0.0;
    std::sort(neg.begin(), neg.end(), std::greater<>());
    // threshold: strictly above the k-th largest negative, k = floor(fpr * |neg|)
    const size_t k = size_t(std::floor(fpr * double(neg.size())));
    const double thr = k < neg.size() ? neg[k] : -std::numeric_limits<double>::infinity();
    size_t tp = 0;
    for (double s : posv)
        if (s > thr) ++tp;
    return double(tp) / double(posv.size());
}

double t_quantile_975(int df) {
    static const double kT[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                                2.201,  2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                                2.080,  2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
    if (df < 1) return std::numeric_limits<double>::infinity();
    if (df <= 30) return kT[df - 1];
    const double z = 1.959964;
    return z + (z * z * z + z) / (4.0 * df);
}

namespace {

// The continued fraction of the regularised incomplete beta function (modified Lentz).
double beta_cf(double a, double b, double x) {
    const double tiny = 1e-300;
    double c = 1.0, d = 1.0 - (a + b) * x / (a + 1.0);
    if (std::abs(d) < tiny) d = tiny;
    d = 1.0 / d;
    double h = d;
    for (int m = 1; m <= 300; ++m) {
        const double m2 = 2.0 * m;
        double aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + aa * d;
        if (std::abs(d) < tiny) d = tiny;
        c = 1.0 + aa / c;
        if (std::abs(c) < tiny) c = tiny;
        d = 1.0 / d;
        h *= d * c;
        aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + aa * d;
        if (std::abs(d) < tiny) d = tiny;
        c = 1.0 + aa / c;
        if (std::abs(c) < tiny) c = tiny;
        d = 1.0 / d;
        const double del = d * c;
        h *= del;
        if (std::abs(del - 1.0) < 1e-14) break;
    }
    return h;
}

// I_x(a, b)
double incomplete_beta(double a, double b, double x) {
    if (x <= 0.0) return 0.0;
    if (x >= 1.0) return 1.0;
    const double lbt = std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x);
    if (x < (a + 1.0) / (a + b + 2.0)) return std::exp(lbt) * beta_cf(a, b, x) / a;
    return 1.0 - std::exp(lbt) * beta_cf(b, a, 1.0 - x) / b;
}

}  // namespace

double t_upper_tail(double t, int df) {
    if (df < 1) return 1.0;
    if (std::isinf(t)) return t > 0 ? 0.0 : 1.0;
    const double v = double(df);
    const double tail = 0.5 * incomplete_beta(v / 2.0, 0.5, v / (v + t * t));  // P(|T| > |t|) / 2
    return t >= 0.0 ? tail : 1.0 - tail;
}

PairedTest paired_test(const std::vector<double>& x, const std::vector<double>& y) {
    PairedTest r;
    r.n = int(std::min(x.size(), y.size()));
    if (r.n == 0) return r;
    std::vector<double> d(size_t(r.n));
    for (size_t i = 0; i < d.size(); ++i) d[i] = x[i] - y[i];
    const Interval iv = t_interval(d);
    r.mean_diff = iv.mean;
    if (r.n < 2 || iv.sd <= 1e-12 * std::max(1.0, std::abs(iv.mean))) {
        r.t = iv.mean > 1e-9 ? std::numeric_limits<double>::infinity() : 0.0;
        r.p = iv.mean > 1e-9 && r.n >= 2 ? 0.0 : 1.0;
        return r;
    }
    r.t = iv.mean / (iv.sd / std::sqrt(double(r.n)));
    r.p = t_upper_tail(r.t, r.n - 1);
    return r;
}

Interval t_interval(const std::vector<double>& x) {
    Interval r;
    r.n = int(x.size());
    if (x.empty()) return r;
    for (double v : x) r.mean += v;
    r.mean /= double(x.size());
    double ss = 0.0;
    for (double v : x) ss += (v - r.mean) * (v - r.mean);
    r.sd = x.size() > 1 ? std::sqrt(ss / double(x.size() - 1)) : 0.0;
    const double t = x.size() > 1 ? t_quantile_975(int(x.size()) - 1) : 0.0;
    const double se = r.sd / std::sqrt(double(x.size()));
    r.lo = r.mean - t * se;
    r.hi = r.mean + t * se;
    const double pe = r.sd * std::sqrt(1.0 + 1.0 / double(x.size()));
    r.predict_lo = r.mean - t * pe;
    r.predict_hi = r.mean + t * pe;
    return r;
}

namespace {

// P(X >= k) for X ~ Binomial(n, p).
double binom_sf(int64_t k, int64_t n, double p) {
    if (k <= 0) return 1.0;
    if (p <= 0) return 0.0;
    if (p >= 1) return 1.0;
    double s = 0.0;
    for (int64_t i = k; i <= n; ++i)
        s += std::exp(std::lgamma(double(n + 1)) - std::lgamma(double(i + 1)) - std::lgamma(double(n - i + 1)) +
                      double(i) * std::log(p) + double(n - i) * std::log1p(-p));
    return std::min(1.0, s);
}

}  // namespace

Interval proportion_interval(int64_t k, int64_t n) {
    Interval r;
    r.n = int(n);
    if (n <= 0) return r;
    r.mean = double(k) / double(n);
    // lower: P(X >= k | p) = 0.025; upper: P(X <= k | p) = 0.025, i.e. P(X >= k + 1 | p) = 0.975
    auto solve = [&](int64_t kk, double target) {
        double lo = 0.0, hi = 1.0;
        for (int it = 0; it < 100; ++it) {
            const double mid = 0.5 * (lo + hi);
            (binom_sf(kk, n, mid) < target ? lo : hi) = mid;
        }
        return 0.5 * (lo + hi);
    };
    r.lo = k == 0 ? 0.0 : solve(k, 0.025);
    r.hi = k == n ? 1.0 : solve(k + 1, 0.975);
    r.predict_lo = r.lo;
    r.predict_hi = r.hi;
    r.sd = std::sqrt(r.mean * (1 - r.mean) / double(n));
    return r;
}

uint64_t SplitMix::next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double SplitMix::uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }

double SplitMix::normal() {
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

std::vector<int> random_permutation(int n, SplitMix& rng) {
    std::vector<int> p(static_cast<size_t>(n));
    std::iota(p.begin(), p.end(), 0);
    for (int i = n - 1; i > 0; --i) std::swap(p[size_t(i)], p[size_t(rng.below(uint64_t(i + 1)))]);
    return p;
}

}  // namespace si::attack
