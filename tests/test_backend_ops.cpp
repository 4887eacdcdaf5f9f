// Every op of every accelerator backend against a scalar reference, on the shape table of backend_ops_cases.h.
// Bounds: integer ops are exact (masked: bit-exact mod 2^32; int8 and int: exact int32); f32 must satisfy the
// worst-case bound of any summation order, |y - ref| <= K * 2^-24 * sum_k |w_k x_k| (ref computed in double).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "backend_ops_cases.h"
#include "common/error.h"
#include "common/threadpool.h"

using namespace si;
using namespace si::test;

namespace {

// Compares one op's output with its scalar reference; returns the number of mismatching entries (and reports the
// first few).
int64_t compare(AccelOp op, const Shape& s, const OpInputs& in, const OpOutputs& out, const std::string& what) {
    int64_t bad = 0;
    for (int64_t t = 0; t < s.T; ++t)
        for (int64_t n = 0; n < s.N; ++n) {
            const size_t o = size_t(t * s.N + n);
            bool ok = true;
            std::string got, want;
            if (op == AccelOp::mul_mat_masked) {
                uint32_t ref = 0;
                for (int64_t k = 0; k < s.K; ++k)
                    ref += uint32_t(int32_t(in.w_i8[size_t(n * s.K + k)])) * in.x_u32[size_t(t * s.K + k)];
                ok = out.y_u32[o] == ref;
                got = std::to_string(out.y_u32[o]);
                want = std::to_string(ref);
            } else if (op == AccelOp::mul_mat_i8 || op == AccelOp::mul_mat_int) {
                int64_t ref = 0;
                for (int64_t k = 0; k < s.K; ++k)
                    ref += int64_t(in.w_i8[size_t(n * s.K + k)]) *
                           (op == AccelOp::mul_mat_i8 ? int64_t(in.x_i8[size_t(t * s.K + k)])
                                                      : int64_t(in.x_i32[size_t(t * s.K + k)]));
                ok = int64_t(out.y_i32[o]) == ref;
                got = std::to_string(out.y_i32[o]);
                want = std::to_string(ref);
            } else {
                double ref = 0, mag = 0;
                for (int64_t k = 0; k < s.K; ++k) {
                    const double p = double(in.w_f32[size_t(n * s.K + k)]) * in.x_f32[size_t(t * s.K + k)];
                    ref += p;
                    mag += std::fabs(p);
                }
                const double bound = double(s.K) * std::ldexp(1.0, -24) * mag;
                ok = std::fabs(double(out.y_f32[o]) - ref) <= bound;
                got = std::to_string(out.y_f32[o]);
                want = std::to_string(ref) + " +- " + std::to_string(bound);
            }
            if (!ok && ++bad <= 3)
                ADD_FAILURE() << what << ": Y[" << t << "][" << n << "] = " << got << ", want " << want;
        }
    return bad;
}

// Every backend must run every op it supports for inner dimensions up to this.
constexpr int64_t kAlwaysSupportedK = 8192;

class BackendOps : public ::testing::TestWithParam<int> {};

TEST_P(BackendOps, AllOpsMatchReference) {
    ThreadPool pool(GetParam());
    for (const auto& backend : backends_under_test()) {
        auto acc = backend.make(&pool);
        uint64_t seed = 1;
        for (const AccelOp op : kAllOps) {
            ASSERT_TRUE(acc->supports(op, weight_type(op))) << backend.name << " " << op_name(op);
            for (const Shape& s : test_shapes()) {
                const std::string what =
                    backend.name + "/" + op_name(op) + "/" + shape_name(s) + "/threads" + std::to_string(GetParam());
                const OpInputs in = make_inputs(op, s, seed++);
                WeightHandle w = upload(*acc, op, s, in);
                OpOutputs out;
                try {
                    run_op(*acc, op, w, s, in, out);
                } catch (const Error& e) {
                    // A backend may refuse very long rows of an op it supports (its int32 headroom), nothing else.
                    EXPECT_TRUE(e.status() == Status::unsupported && s.K > kAlwaysSupportedK)
                        << what << ": " << e.what();
                    acc->release(w);
                    continue;
                }
                EXPECT_EQ(compare(op, s, in, out, what), 0) << what;
                acc->release(w);
                EXPECT_FALSE(w);
            }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Threads, BackendOps, ::testing::Values(1, 2));

TEST(BackendOps, MaskedExtremeOperands) {
    // All weights -128 or 127 and all activations 0xFFFFFFFF: every byte plane is 255, the largest plane sums.
    ThreadPool pool(2);
    for (const auto& backend : backends_under_test()) {
        auto acc = backend.make(&pool);
        for (const int8_t wv : {int8_t(-128), int8_t(127)})
            for (const int64_t K : {1, 63, 64, 65, 2048, 70000}) {
                const Shape s{5, K, 2};
                OpInputs in;
                in.w_i8.assign(size_t(s.N * s.K), wv);
                in.x_u32.assign(size_t(s.T * s.K), 0xFFFFFFFFu);
                WeightHandle w = acc->upload_i8(in.w_i8.data(), s.N, s.K);
                OpOutputs out;
                run_op(*acc, AccelOp::mul_mat_masked, w, s, in, out);
                // W x = wv * K * (2^32 - 1) = -wv * K (mod 2^32)
                for (const uint32_t y : out.y_u32)
                    ASSERT_EQ(y, uint32_t(-int64_t(wv) * K)) << backend.name << " K=" << K;
                acc->release(w);
            }
    }
}

TEST(BackendOps, IntExtremeOperands) {
    // 16-bit activations at both ends against weights at both ends, K at the largest int32-safe length.
    ThreadPool pool(2);
    for (const auto& backend : backends_under_test()) {
        auto acc = backend.make(&pool);
        if (!acc->supports(AccelOp::mul_mat_int, DType::i8)) continue;
        const int64_t K = 511;  // 511 * 128 * 32768 < 2^31
        for (const int8_t wv : {int8_t(-128), int8_t(127)})
            for (const int32_t xv : {-32768, 32767}) {
                const Shape s{5, K, 3};
                OpInputs in;
                in.w_i8.assign(size_t(s.N * s.K), wv);
                in.x_i32.assign(size_t(s.T * s.K), xv);
                WeightHandle w = acc->upload_i8(in.w_i8.data(), s.N, s.K);
                OpOutputs out;
                run_op(*acc, AccelOp::mul_mat_int, w, s, in, out);
                for (const int32_t y : out.y_i32) ASSERT_EQ(int64_t(y), int64_t(wv) * xv * K) << backend.name;
                acc->release(w);
            }
    }
}

// The CUDA backend runs every case above when present; this says which way it went, and checks the paths a
// model-sized prefill and decode take (tensor-core byte planes for T > 8, the gemv kernel otherwise) on one shape.
TEST(BackendOps, CudaBackend) {
    if (!cuda_backend_built()) GTEST_SKIP() << "this build has no CUDA backend (no CUDA toolkit at configure time)";
    if (!cuda_device_present()) {
        try {
            make_cuda_accelerator(nullptr);
            ADD_FAILURE() << "make_cuda_accelerator succeeded without a device";
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Status::unsupported);
            EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
        }
        GTEST_SKIP() << "no CUDA device on this machine";
    }
    std::printf("cuda device: %s\n", cuda_device_name().c_str());
    auto acc = make_cuda_accelerator(nullptr);
    for (const Shape& s : {Shape{2048, 768, 1}, Shape{2048, 768, 8}, Shape{2048, 768, 9}, Shape{768, 2048, 128},
                           Shape{5632, 2048, 64}, Shape{250, 5632, 33}})
        for (const AccelOp op : kAllOps) {
            const OpInputs in = make_inputs(op, s, uint64_t(s.N * 31 + s.T));
            WeightHandle w = upload(*acc, op, s, in);
            OpOutputs out;
            run_op(*acc, op, w, s, in, out);
            EXPECT_EQ(compare(op, s, in, out, std::string("cuda/") + op_name(op) + "/" + shape_name(s)), 0);
            acc->release(w);
        }
}

TEST(BackendOps, UnknownBackendName) {
    try {
        make_accelerator("tpu", nullptr);
        FAIL() << "no error";
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument);
        EXPECT_STREQ(e.what(), "unknown accelerator backend 'tpu' (valid: cpu, cuda)");
    }
    EXPECT_STREQ(make_accelerator("cpu", nullptr)->name(), "cpu");
}

TEST(BackendOps, RejectsWhatItDoesNotSupport) {
    for (const auto& backend : backends_under_test()) {
        auto acc = backend.make(nullptr);
        const std::vector<int8_t> wi(12, 1);
        const std::vector<float> wf(12, 1.0f);
        WeightHandle hi = acc->upload_i8(wi.data(), 3, 4);
        WeightHandle hf = acc->upload_f32(wf.data(), 3, 4);
        std::vector<uint32_t> xu(4), yu(3);
        std::vector<float> xf(4), yf(3);
        std::vector<int8_t> xi(4);
        std::vector<int32_t> yi(3);
        auto status = [](auto&& fn) {
            try {
                fn();
            } catch (const Error& e) {
                return e.status();
            }
            return Status::ok;
        };
        EXPECT_EQ(status([&] { acc->mul_mat_f32(hi, xf.data(), 1, yf.data()); }), Status::unsupported);
        EXPECT_EQ(status([&] { acc->mul_mat_masked(hf, xu.data(), 1, yu.data()); }), Status::unsupported);
        EXPECT_EQ(status([&] { acc->mul_mat_i8(hf, xi.data(), 1, yi.data()); }), Status::unsupported);
        EXPECT_FALSE(acc->supports(AccelOp::mul_mat_f32, DType::i8));
        EXPECT_FALSE(acc->supports(AccelOp::mul_mat_masked, DType::f32));
        // A forged or released handle, and bad shapes.
        WeightHandle forged = hi;
        forged.id += 1000;
        EXPECT_EQ(status([&] { acc->mul_mat_masked(forged, xu.data(), 1, yu.data()); }), Status::invalid_argument);
        WeightHandle lying = hi;
        lying.cols = 400;
        EXPECT_EQ(status([&] { acc->mul_mat_masked(lying, xu.data(), 1, yu.data()); }), Status::invalid_argument);
        EXPECT_EQ(status([&] { acc->mul_mat_masked(hi, nullptr, 1, yu.data()); }), Status::invalid_argument);
        EXPECT_EQ(status([&] { acc->upload_i8(wi.data(), 0, 4); }), Status::invalid_argument);
        WeightHandle gone = hi;
        acc->release(hi);
        EXPECT_EQ(status([&] { acc->mul_mat_masked(gone, xu.data(), 1, yu.data()); }), Status::invalid_argument);
        // T = 0 is a no-op.
        EXPECT_EQ(status([&] { acc->mul_mat_f32(hf, nullptr, 0, nullptr); }), Status::ok);
        acc->release(hf);
    }
}

}  // namespace
