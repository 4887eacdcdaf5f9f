// The numerical core of the security evaluation (DESIGN.md section 8), written here so that every attack is
// self-contained: dense double matrices, the Hungarian algorithm, one-sided Jacobi SVD, orthogonal Procrustes,
// ridge least squares, L2-regularised logistic regression, ROC AUC and TPR at a fixed FPR, and the confidence
// intervals the report uses (Student t for means over seeds, Clopper-Pearson for proportions).
//
// Sizes here are small (a projection of stories260K is at most 172 x 64; a classifier 512 x 64): plain loops.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace si::attack {

// Row-major dense matrix of doubles.
struct Mat {
    int64_t rows = 0, cols = 0;
    std::vector<double> a;
    Mat() = default;
    Mat(int64_t r, int64_t c) : rows(r), cols(c), a(static_cast<size_t>(r * c), 0.0) {}
    double& operator()(int64_t i, int64_t j) { return a[static_cast<size_t>(i * cols + j)]; }
    double operator()(int64_t i, int64_t j) const { return a[static_cast<size_t>(i * cols + j)]; }
    double* row(int64_t i) { return a.data() + i * cols; }
    const double* row(int64_t i) const { return a.data() + i * cols; }
};

Mat transpose(const Mat& m);
Mat matmul(const Mat& x, const Mat& y);    // x y
Mat matmul_tn(const Mat& x, const Mat& y);  // x^T y
double dot(const double* x, const double* y, int64_t n);
double norm(const double* x, int64_t n);
// cos(x, y); 0 when either is zero.
double cosine(const std::vector<double>& x, const std::vector<double>& y);

// Minimum-cost assignment of every row of cost [n][m] (n <= m) to a distinct column (Hungarian algorithm with
// potentials, O(n^2 m)). Returns col[i] for each row i.
std::vector<int> hungarian(const Mat& cost);

// Thin SVD A = U diag(S) V^T of A [m][n] by one-sided Jacobi rotations: U [m][k], S [k] (descending), V [n][k] with
// k = min(m, n).
struct Svd {
    Mat U, V;
    std::vector<double> S;
};
Svd svd(const Mat& A);

// Orthogonal Procrustes: the orthogonal R [n][n] minimising ||A R - B||_F for A, B [m][n] (R = U V^T from the SVD of
// A^T B).
Mat procrustes(const Mat& A, const Mat& B);

// Cosines of the principal angles between the column spans of A [m][p] and B [m][q] (orthonormalised here),
// descending.
std::vector<double> principal_cosines(const Mat& A, const Mat& B);

// Solves (M + ridge I) x = b for symmetric positive (semi)definite M [n][n], in place on a copy (Cholesky). Columns
// of B [n][r] are solved together. Throws si::Error(internal) when M + ridge I is not positive definite.
Mat solve_spd(const Mat& M, const Mat& B, double ridge);

// Least squares W [N][K] minimising ||Y - X W^T||^2 + ridge ||W||^2 for X [n][K], Y [n][N]; r2 receives the
// coefficient of determination of the fit (pooled over outputs).
Mat least_squares(const Mat& X, const Mat& Y, double ridge, double* r2);

// Binary logistic regression with an L2 penalty, trained by full-batch Adam on standardised features (means and
// deviations from the training set). predict() returns the logit.
class LogisticRegression {
public:
    void fit(const Mat& X, const std::vector<int>& y, double l2 = 1e-2, int iterations = 200, double lr = 0.05);
    std::vector<double> predict(const Mat& X) const;

private:
    std::vector<double> mean_, inv_sd_, w_;
    double b_ = 0.0;
};

// Area under the ROC curve of scores for labels (1 positive, 0 negative); ties count one half. 0.5 when a class is
// empty.
double roc_auc(const std::vector<double>& scores, const std::vector<int>& labels);
// The largest true-positive rate over thresholds whose false-positive rate is at most fpr.
double tpr_at_fpr(const std::vector<double>& scores, const std::vector<int>& labels, double fpr);

// Summary of one metric over seeds: mean, sample standard deviation, and the two-sided 95% Student t interval of the
// mean; predict_lo/hi is the 95% prediction interval of one further observation (used for null distributions).
struct Interval {
    int n = 0;
    double mean = 0, sd = 0, lo = 0, hi = 0, predict_lo = 0, predict_hi = 0;
};
Interval t_interval(const std::vector<double>& x);
// Two-sided 95% Clopper-Pearson interval of a proportion k / n.
Interval proportion_interval(int64_t k, int64_t n);
// Two-sided 97.5% quantile of Student's t with df degrees of freedom.
double t_quantile_975(int df);
// P(T > t) for Student's t with df degrees of freedom (the one-sided p-value of a t statistic).
double t_upper_tail(double t, int df);
// A paired one-sided test that x leaks more than y (x[i] and y[i] from the same seed): the mean difference, its t
// statistic and p-value (df = n - 1). All differences equal: p = 0 when they are positive (beyond 1e-9), else 1.
struct PairedTest {
    int n = 0;
    double mean_diff = 0.0, t = 0.0, p = 1.0;
};
PairedTest paired_test(const std::vector<double>& x, const std::vector<double>& y);

// SplitMix64: the seeded generator the evaluation uses wherever a reproducible choice is made.
struct SplitMix {
    uint64_t s;
    explicit SplitMix(uint64_t seed) : s(seed) {}
    uint64_t next();
    double uniform();  // [0, 1)
    double normal();   // standard normal (Box-Muller)
    uint64_t below(uint64_t n) { return next() % n; }
};
// A uniformly random permutation of 0 .. n-1.
std::vector<int> random_permutation(int n, SplitMix& rng);

}  // namespace si::attack
