// The CPU accelerator backend. It accepts exactly these ops and types; everything else throws
// si::Error(Status::unsupported):
//
//   op               weights        activations     result          limits
//   mul_mat_masked   i8  [N][K]     u32 [T][K]      u32 [T][N]      any K >= 1; exact mod 2^32        (si::gemm_masked)
//   mul_mat_int      i8  [N][K]     i32 [T][K]      i32 [T][N]      x in [-32768, 32767], |W x| < 2^31; exact (si::gemm_i16)
//   mul_mat_i8       i8  [N][K]     i8  [T][K]      i32 [T][N]      K * 128 * 128 < 2^31; exact        (si::gemm_i8)
//   mul_mat_f32      f32 [N][K]     f32 [T][K]      f32 [T][N]      float accumulation                 (si::matmul_f32)
//
// int8 weights are packed once at upload for the VNNI kernels of src/common/qgemm.h, which the trusted core shares
// for its own products (enclave-only mode, online unblinding), so every domain computes identical integers.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "backends/accelerator.h"
#include "common/error.h"
#include "backends/weight_table.h"
#include "common/matmul.h"
#include "common/qgemm.h"
#include "common/threadpool.h"

namespace si {

namespace {

constexpr SupportedOp kSupported[] = {
    {AccelOp::mul_mat_masked, DType::i8},
    {AccelOp::mul_mat_int, DType::i8},
    {AccelOp::mul_mat_i8, DType::i8},
    {AccelOp::mul_mat_f32, DType::f32},
};

constexpr int64_t kMaxDim = int64_t(1) << 31;

struct CpuWeight {
    DType type = DType::i8;
    int64_t N = 0, K = 0;
    PackedI8 i8;
    std::vector<float> f32;
};

class CpuAccelerator final : public Accelerator {
public:
    explicit CpuAccelerator(ThreadPool* pool) : pool_(pool) {}

    const char* name() const override { return "cpu"; }

    bool supports(AccelOp op, DType weight_type) const override { return table_supports(kSupported, op, weight_type); }

    WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override {
        weights_.check_shape(W, N, K);
        auto w = std::make_unique<CpuWeight>();
        w->type = DType::i8;
        w->N = N;
        w->K = K;
        w->i8 = PackedI8::pack(W, N, K);
        return weights_.add(std::move(w));
    }

    WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override {
        weights_.check_shape(W, N, K);
        auto w = std::make_unique<CpuWeight>();
        w->type = DType::f32;
        w->N = N;
        w->K = K;
        w->f32.assign(W, W + N * K);
        return weights_.add(std::move(w));
    }

    void release(WeightHandle& h) override { weights_.release(h); }

    void mul_mat_masked(const WeightHandle& h, const uint32_t* X, int64_t T, uint32_t* Y) override {
        const CpuWeight& w = lookup(h, AccelOp::mul_mat_masked, T, X, Y);
        if (T > 0) gemm_masked(pool_, w.i8, X, T, Y);
    }

    void mul_mat_int(const WeightHandle& h, const int32_t* X, int64_t T, int32_t* Y) override {
        const CpuWeight& w = lookup(h, AccelOp::mul_mat_int, T, X, Y);
        for (int64_t i = 0; i < T * w.K; ++i)
            if (X[i] < -32768 || X[i] > 32767)
                fail(Status::invalid_argument, "cpu backend: mul_mat_int activation " + std::to_string(X[i]) +
                                                   " outside [-32768, 32767]");
        if (T > 0) gemm_i16(pool_, w.i8, X, T, Y);
    }

    void mul_mat_i8(const WeightHandle& h, const int8_t* X, int64_t T, int32_t* Y) override {
        const CpuWeight& w = lookup(h, AccelOp::mul_mat_i8, T, X, Y);
        if (w.K * 128 * 128 >= (int64_t(1) << 31))
            fail(Status::unsupported, "cpu backend: mul_mat_i8 with K = " + std::to_string(w.K) +
                                          " could overflow int32 (K * 128 * 128 must be < 2^31)");
        if (T > 0) gemm_i8(pool_, w.i8, X, T, Y);
    }

    void mul_mat_f32(const WeightHandle& h, const float* X, int64_t T, float* Y) override {
        const CpuWeight& w = lookup(h, AccelOp::mul_mat_f32, T, X, Y);
        if (T > 0) matmul_f32(pool_, w.f32.data(), w.N, w.K, X, T, Y);
    }

private:
    const CpuWeight& lookup(const WeightHandle& h, AccelOp op, int64_t T, const void* X, const void* Y) const {
        return weights_.lookup(*this, h, op, T, X, Y);
    }

    ThreadPool* pool_;
    WeightTable<CpuWeight> weights_{"cpu", kMaxDim};
};

}  // namespace

std::unique_ptr<Accelerator> make_cpu_accelerator(ThreadPool* pool) { return std::make_unique<CpuAccelerator>(pool); }

}  // namespace si
