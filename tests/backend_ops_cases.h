// The accelerator op cases, shared by tests/test_backend_ops.cpp (correctness against scalar references) and
// bench/bench_backend_ops.cpp (timing): which backends exist, which shapes each op runs on, and the inputs.
// A new backend joins by adding one entry to backends_under_test(); the CUDA one joins when this build has it and
// the machine has a CUDA device.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/accelerator.h"

namespace si::test {

struct BackendEntry {
    std::string name;
    std::function<std::unique_ptr<Accelerator>(ThreadPool*)> make;
};

inline bool cuda_device_present() { return cuda_backend_built() && !cuda_device_name().empty(); }

inline std::vector<BackendEntry> backends_under_test() {
    std::vector<BackendEntry> b = {
        {"cpu", [](ThreadPool* pool) { return make_cpu_accelerator(pool); }},
    };
    if (cuda_device_present()) b.push_back({"cuda", [](ThreadPool* pool) { return make_cuda_accelerator(pool); }});
    return b;
}

constexpr AccelOp kAllOps[] = {AccelOp::mul_mat_masked, AccelOp::mul_mat_i8, AccelOp::mul_mat_f32,
                               AccelOp::mul_mat_int};

// The weight type each op runs on.
inline DType weight_type(AccelOp op) { return op == AccelOp::mul_mat_f32 ? DType::f32 : DType::i8; }

struct Shape {
    int64_t N, K, T;
};

inline std::string shape_name(const Shape& s) {
    return std::to_string(s.N) + "x" + std::to_string(s.K) + "_T" + std::to_string(s.T);
}

// Correctness table: K around the 16/32/64-byte vector widths and their tails, row counts around the 4-row tiles,
// token counts around the token tiles (and several tiles of the largest), one K large enough that a single byte plane's int32 sum can wrap.
inline std::vector<Shape> test_shapes() {
    return {
        {1, 1, 1},     {3, 1, 2},      {4, 3, 1},      {5, 63, 3},     {17, 64, 1},   {16, 65, 4},
        {33, 172, 5},  {64, 2048, 1},  {7, 2048, 9},   {288, 768, 1},  {100, 100, 64}, {13, 5000, 2},
        {130, 129, 7}, {3, 70000, 2},  {21, 31, 17},   {6, 127, 65},  {200, 96, 150},
    };
}

// Model shapes (stories110M, TinyLlama-1.1B), each at decode (T = 1) and prefill (T = 64).
inline std::vector<Shape> bench_shapes() {
    const int64_t nk[][2] = {
        {768, 768},   {2048, 768},  {768, 2048},  {32000, 768},   // stories110M
        {2048, 2048}, {256, 2048},  {5632, 2048}, {2048, 5632},   // TinyLlama-1.1B
    };
    std::vector<Shape> out;
    for (const int64_t T : {int64_t(1), int64_t(64)})
        for (const auto& s : nk) out.push_back({s[0], s[1], T});
    return out;
}

// Largest |x| for mul_mat_int on inner dimension K: 16-bit values, and |W x| <= 128 K max|x| < 2^31.
inline int32_t int_activation_bound(int64_t K) {
    const int64_t headroom = ((int64_t(1) << 31) - 1) / (128 * K);
    return int32_t(headroom < 32767 ? headroom : 32767);
}

// Random operands for one op and shape. Integer weights cover the full int8 range; masked activations the full
// uint32 range; int8 activations the full int8 range; int activations +-int_activation_bound(K).
struct OpInputs {
    std::vector<int8_t> w_i8;
    std::vector<float> w_f32;
    std::vector<uint32_t> x_u32;
    std::vector<int8_t> x_i8;
    std::vector<float> x_f32;
    std::vector<int32_t> x_i32;
};

inline OpInputs make_inputs(AccelOp op, const Shape& s, uint64_t seed) {
    std::mt19937_64 rng(seed);
    OpInputs in;
    const size_t nw = size_t(s.N * s.K), nx = size_t(s.T * s.K);
    if (weight_type(op) == DType::i8) {
        std::uniform_int_distribution<int> w(-128, 127);
        in.w_i8.resize(nw);
        for (auto& v : in.w_i8) v = int8_t(w(rng));
    } else {
        std::normal_distribution<float> w(0.0f, 0.05f);
        in.w_f32.resize(nw);
        for (auto& v : in.w_f32) v = w(rng);
    }
    switch (op) {
        case AccelOp::mul_mat_masked:
            in.x_u32.resize(nx);
            for (auto& v : in.x_u32) v = uint32_t(rng());
            break;
        case AccelOp::mul_mat_i8: {
            std::uniform_int_distribution<int> x(-128, 127);
            in.x_i8.resize(nx);
            for (auto& v : in.x_i8) v = int8_t(x(rng));
            break;
        }
        case AccelOp::mul_mat_f32: {
            std::normal_distribution<float> x(0.0f, 1.0f);
            in.x_f32.resize(nx);
            for (auto& v : in.x_f32) v = x(rng);
            break;
        }
        case AccelOp::mul_mat_int: {
            const int32_t b = int_activation_bound(s.K);
            std::uniform_int_distribution<int32_t> x(-b, b);
            in.x_i32.resize(nx);
            for (auto& v : in.x_i32) v = x(rng);
            break;
        }
    }
    return in;
}

inline WeightHandle upload(Accelerator& acc, AccelOp op, const Shape& s, const OpInputs& in) {
    return weight_type(op) == DType::i8 ? acc.upload_i8(in.w_i8.data(), s.N, s.K)
                                        : acc.upload_f32(in.w_f32.data(), s.N, s.K);
}

// Runs `op` into the matching output vector (the others stay empty).
struct OpOutputs {
    std::vector<uint32_t> y_u32;
    std::vector<int32_t> y_i32;
    std::vector<float> y_f32;
};

inline void run_op(Accelerator& acc, AccelOp op, const WeightHandle& w, const Shape& s, const OpInputs& in,
                   OpOutputs& out) {
    const size_t ny = size_t(s.T * s.N);
    switch (op) {
        case AccelOp::mul_mat_masked:
            out.y_u32.resize(ny);
            acc.mul_mat_masked(w, in.x_u32.data(), s.T, out.y_u32.data());
            break;
        case AccelOp::mul_mat_i8:
            out.y_i32.resize(ny);
            acc.mul_mat_i8(w, in.x_i8.data(), s.T, out.y_i32.data());
            break;
        case AccelOp::mul_mat_f32:
            out.y_f32.resize(ny);
            acc.mul_mat_f32(w, in.x_f32.data(), s.T, out.y_f32.data());
            break;
        case AccelOp::mul_mat_int:
            out.y_i32.resize(ny);
            acc.mul_mat_int(w, in.x_i32.data(), s.T, out.y_i32.data());
            break;
    }
}

}  // namespace si::test
