// Timing of every accelerator op on the model shapes of tests/backend_ops_cases.h, for 1 and 2 threads.
// Names read backend/op/NxK_T<T>/threads:<n>; bytes/s counts the weight bytes streamed per product, the figure
// that bounds decoding (T = 1).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>
#include <string>

#include "backend_ops_cases.h"
#include "common/threadpool.h"

using namespace si;
using namespace si::test;

namespace {

// One prepared case at a time (model-sized weights are large): rebuilt when the benchmark changes.
struct Prepared {
    std::string key;
    std::unique_ptr<ThreadPool> pool;
    std::unique_ptr<Accelerator> acc;
    WeightHandle w;
    OpInputs in;
    OpOutputs out;

    void reset() {
        if (acc && w) acc->release(w);
        acc.reset();
        pool.reset();
        in = OpInputs{};
        out = OpOutputs{};
        key.clear();
    }
};

Prepared& prepare(const BackendEntry& backend, AccelOp op, const Shape& s, int threads) {
    static Prepared p;
    const std::string key = backend.name + "/" + op_name(op) + "/" + shape_name(s) + "/" + std::to_string(threads);
    if (p.key != key) {
        p.reset();
        p.pool = std::make_unique<ThreadPool>(threads);
        p.acc = backend.make(p.pool.get());
        p.in = make_inputs(op, s, 42);
        p.w = upload(*p.acc, op, s, p.in);
        p.key = key;
    }
    return p;
}

void run(benchmark::State& state, BackendEntry backend, AccelOp op, Shape s, int threads) {
    Prepared& p = prepare(backend, op, s, threads);
    if (!p.acc->supports(op, weight_type(op))) {
        state.SkipWithError("op not supported by this backend");
        return;
    }
    run_op(*p.acc, op, p.w, s, p.in, p.out);  // warm caches and scratch buffers
    for (auto _ : state) {
        run_op(*p.acc, op, p.w, s, p.in, p.out);
        benchmark::ClobberMemory();
    }
    const int64_t wbytes = s.N * s.K * (weight_type(op) == DType::f32 ? 4 : 1);
    state.SetBytesProcessed(int64_t(state.iterations()) * wbytes);
    state.counters["MAC/s"] =
        benchmark::Counter(double(s.N * s.K * s.T), benchmark::Counter::kIsIterationInvariantRate);
}

// Masked over plaintext int8 on the same weights, alternating the two every iteration (the machines are shared
// and noisy, so only ratios measured side by side mean much). Counters: medians of each op's time and of the
// per-iteration ratio. With `cold`, the calls cycle through enough copies of the weights to overflow the last-level
// cache, so every call streams its weights from memory as decoding a whole model does.
void run_ratio(benchmark::State& state, BackendEntry backend, Shape s, int threads, bool cold) {
    ThreadPool pool(threads);
    auto acc = backend.make(&pool);
    const OpInputs masked_in = make_inputs(AccelOp::mul_mat_masked, s, 7);
    OpInputs i8_in = make_inputs(AccelOp::mul_mat_i8, s, 8);
    i8_in.w_i8 = masked_in.w_i8;  // same weights for both ops
    const int64_t wbytes = s.N * s.K;
    const int copies = cold ? int(std::max<int64_t>(1, (int64_t(256) << 20) / wbytes)) : 1;
    std::vector<WeightHandle> w;
    for (int c = 0; c < copies; ++c) w.push_back(acc->upload_i8(masked_in.w_i8.data(), s.N, s.K));
    OpOutputs out;
    std::vector<double> tm, ti, ratio;
    size_t next = 0;
    auto time_us = [](auto&& fn) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    };
    for (auto _ : state) {
        const WeightHandle& a = w[next++ % w.size()];
        const WeightHandle& b = w[next++ % w.size()];
        const double m = time_us([&] { run_op(*acc, AccelOp::mul_mat_masked, a, s, masked_in, out); });
        const double i = time_us([&] { run_op(*acc, AccelOp::mul_mat_i8, b, s, i8_in, out); });
        tm.push_back(m);
        ti.push_back(i);
        ratio.push_back(m / i);
    }
    auto median = [](std::vector<double> v) {
        if (v.empty()) return 0.0;
        std::nth_element(v.begin(), v.begin() + long(v.size() / 2), v.end());
        return v[v.size() / 2];
    };
    state.counters["masked_us"] = median(tm);
    state.counters["i8_us"] = median(ti);
    state.counters["ratio"] = median(ratio);
    // Noise on a shared machine only ever adds time: the minima estimate the undisturbed times.
    if (!tm.empty()) state.counters["ratio_min"] = *std::min_element(tm.begin(), tm.end()) /
                                                   *std::min_element(ti.begin(), ti.end());
    for (auto& h : w) acc->release(h);
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    for (const auto& backend : backends_under_test())
        for (const Shape& s : bench_shapes())
            for (const int threads : {1, 2})
                for (const AccelOp op : kAllOps) {
                    const std::string name = backend.name + "/" + op_name(op) + "/" + shape_name(s) +
                                             "/threads:" + std::to_string(threads);
                    benchmark::RegisterBenchmark(name.c_str(), run, backend, op, s, threads)
                        ->UseRealTime()
                        ->Unit(benchmark::kMicrosecond);
                }
    for (const auto& backend : backends_under_test())
        for (const bool cold : {false, true})
            for (const Shape& s : bench_shapes())
                for (const int threads : {1, 2}) {
                    const std::string name = backend.name + "/masked_over_i8" + (cold ? "_cold/" : "/") +
                                             shape_name(s) + "/threads:" + std::to_string(threads);
                    benchmark::RegisterBenchmark(name.c_str(), run_ratio, backend, s, threads, cold)
                        ->UseRealTime()
                        ->Unit(benchmark::kMicrosecond);
                }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
