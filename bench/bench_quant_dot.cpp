// The native engine's products in isolation: one 2048 x 768 matrix of each block format (random quants, finite
// scales) times one token's or four tokens' int8 activations, read as stored one row at a time (qdot::dot_row) and
// interleaved in groups of 16 rows (qdot::gemm_packed, AVX-512 VNNI builds). The matrix fits the L2 cache, so this
// is the kernels' arithmetic, not memory. Run from the build directory: bench/bench_quant_dot; the per-row time is
// the reported time divided by 2048 (also reported as the rows/s counter).
#include <cstring>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "common/fp16.h"
#include "common/quant_dot.h"

namespace {

using si::qdot::WType;
constexpr int64_t kRows = 2048, kCols = 768;

struct Case {
    WType t;
    size_t row_bytes = 0;
    std::vector<uint8_t> w;
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<int16_t> sums;
    std::vector<float> y;
};

Case make(WType t, int64_t tokens) {
    Case c;
    c.t = t;
    c.row_bytes = size_t(kCols / si::qdot::block_elems(t)) * si::qdot::block_bytes(t);
    std::mt19937 rng(1);
    c.w.resize(size_t(kRows) * c.row_bytes);
    for (auto& b : c.w) b = uint8_t(rng());
    const uint16_t h = si::fp32_to_fp16(0.01f);
    for (size_t b = 0; b < c.w.size(); b += si::qdot::block_bytes(t)) {
        std::memcpy(&c.w[b + (t == WType::q6_k ? 208 : 0)], &h, 2);
        if (t == WType::q4_k) std::memcpy(&c.w[b + 2], &h, 2);
    }
    std::vector<float> x(size_t(tokens * kCols));
    for (auto& v : x) v = float(rng() % 2001) / 1000.0f - 1.0f;
    c.q.resize(x.size());
    c.d.resize(x.size() / 32);
    c.sums.resize(x.size() / 16);
    for (int64_t k = 0; k < tokens; ++k) {
        if (si::qdot::uses_q8k(t))
            si::qdot::quantize_q8_k(&x[size_t(k * kCols)], kCols, &c.q[size_t(k * kCols)], &c.d[size_t(k * kCols / 256)],
                                    &c.sums[size_t(k * kCols / 16)]);
        else
            si::qdot::quantize_q8_0(&x[size_t(k * kCols)], kCols, &c.q[size_t(k * kCols)], &c.d[size_t(k * kCols / 32)],
                                    &c.sums[size_t(k * kCols / 32)]);
    }
    c.y.resize(size_t(tokens * kRows));
    return c;
}

void BM_PerRow(benchmark::State& state) {
    Case c = make(WType(state.range(0)), 1);
    for (auto _ : state) {
        for (int64_t r = 0; r < kRows; ++r)
            c.y[size_t(r)] = si::qdot::dot_row(c.t, &c.w[size_t(r) * c.row_bytes], kCols, c.q.data(), c.d.data(),
                                               c.sums.data());
        benchmark::DoNotOptimize(c.y.data());
    }
    state.counters["rows/s"] = benchmark::Counter(double(kRows), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Interleaved(benchmark::State& state) {
    const WType t = WType(state.range(0));
    if (!si::qdot::has_packed(t)) {
        state.SkipWithError("built without AVX-512 VNNI");
        return;
    }
    const int64_t tokens = state.range(1);
    Case c = make(t, tokens);
    const si::qdot::Packed P(t, c.w.data(), kRows, kCols, c.row_bytes);
    for (auto _ : state) {
        si::qdot::gemm_packed(P, 0, P.groups(), c.q.data(), c.d.data(), c.sums.data(), tokens, c.y.data(), kRows);
        benchmark::DoNotOptimize(c.y.data());
    }
    state.counters["rows/s"] = benchmark::Counter(double(kRows), benchmark::Counter::kIsIterationInvariantRate);
}

// ggml type numbers: q4_0 2, q8_0 8, q4_k 12, q6_k 14
BENCHMARK(BM_PerRow)->Arg(2)->Arg(8)->Arg(12)->Arg(14);
BENCHMARK(BM_Interleaved)->Args({2, 1})->Args({8, 1})->Args({12, 1})->Args({14, 1})->Args({2, 4})->Args({8, 4})->Args({12, 4})->Args({14, 4});

}  // namespace

BENCHMARK_MAIN();
