// The plaintext engine: golden greedy tokens of stories260K, batched prefill == token-by-token decode, int8 path
// quality, matmul kernels against scalar references, and llama2.c checkpoint validation.
#include <gtest/gtest.h>

#include <thread>

#include <mutex>

#include <map>

#include <cmath>
#include <cstring>
#include <random>

#include "common/error.h"
#include "common/matmul.h"
#include "common/ops.h"
#include "common/sampler.h"
#include "common/threadpool.h"
#include "engine/engine.h"
#include "formats/llama2c.h"
#include "testutil.h"

using namespace si;

namespace {

const std::vector<int32_t> kGolden = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338};

std::vector<int32_t> greedy(Engine& e, std::vector<int32_t> prompt, int n) {
    std::vector<int32_t> out;
    const float* logits = e.eval(prompt);
    for (int i = 0; i < n; ++i) {
        const int32_t t = Sampler::argmax(logits, e.config().vocab_size);
        out.push_back(t);
        logits = e.eval(std::span<const int32_t>(&t, 1));
    }
    return out;
}

using test::stories;

}  // namespace

TEST(ThreadPool, RunOnEachThreadVisitsEveryThreadOnce) {
    for (int n : {1, 2, 5}) {
        ThreadPool pool(n);
        std::mutex mu;
        std::map<std::thread::id, int> calls;
        for (int round = 0; round < 3; ++round)
            pool.run_on_each_thread([&] {
                std::lock_guard<std::mutex> lock(mu);
                ++calls[std::this_thread::get_id()];
            });
        EXPECT_EQ(int(calls.size()), n);
        for (const auto& [id, c] : calls) EXPECT_EQ(c, 3);
        EXPECT_EQ(calls.count(std::this_thread::get_id()), 1u);  // the caller takes part
    }
}

TEST(Engine, Stories260KHyperParameters) {
    const auto& c = stories().cfg;
    EXPECT_EQ(c.dim, 64);
    EXPECT_EQ(c.hidden_dim, 172);
    EXPECT_EQ(c.n_layers, 5);
    EXPECT_EQ(c.n_heads, 8);
    EXPECT_EQ(c.n_kv_heads, 4);
    EXPECT_EQ(c.vocab_size, 512);
    EXPECT_EQ(c.seq_len, 512);
    EXPECT_TRUE(stories().tied());
}

TEST(Engine, GoldenGreedyF32) {
    for (int threads : {1, 2}) {
        EngineParams p;
        p.n_threads = threads;
        Engine e(stories(), p);
        EXPECT_EQ(greedy(e, {1}, int(kGolden.size())), kGolden) << threads << " threads";
    }
}

TEST(Engine, GoldenGreedyInt8) {
    EngineParams p;
    p.weights = WeightFormat::int8;
    Engine e(stories(), p);
    // int8 weights and per-token int8 activations stay on the reference text for its first sentence.
    const auto got = greedy(e, {1}, int(kGolden.size()));
    EXPECT_EQ(got, kGolden);
}

TEST(Engine, BatchedPrefillMatchesSequentialDecode) {
    for (WeightFormat f : {WeightFormat::f32, WeightFormat::int8}) {
        EngineParams p;
        p.weights = f;
        p.n_batch = 7;  // several batches, the last one partial
        Engine batched(stories(), p);
        Engine single(stories(), p);
        std::vector<int32_t> toks = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338};
        const int V = stories().cfg.vocab_size;
        const float* all = batched.eval(toks, true);
        std::vector<float> all_copy(all, all + toks.size() * V);
        for (size_t i = 0; i < toks.size(); ++i) {
            const float* one = single.eval(std::span<const int32_t>(&toks[i], 1));
            float max_diff = 0.0f;
            for (int v = 0; v < V; ++v) max_diff = std::max(max_diff, std::fabs(one[v] - all_copy[i * V + v]));
            EXPECT_LT(max_diff, 1e-4f) << weight_format_name(f) << " token " << i;
        }
    }
}

TEST(Engine, ContextOverflowAndBadTokensAreErrors) {
    EngineParams p;
    p.n_ctx = 4;
    Engine e(stories(), p);
    std::vector<int32_t> five(5, 1);
    try {
        e.eval(five);
        FAIL();
    } catch (const Error& err) {
        EXPECT_EQ(err.status(), Status::invalid_argument);
        EXPECT_NE(std::string(err.what()).find("context overflow"), std::string::npos);
    }
    std::vector<int32_t> bad = {1, 512};
    EXPECT_THROW(e.eval(bad), Error);
}

TEST(Matmul, F32MatchesReference) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    ThreadPool pool(2);
    for (auto [N, K, T] : {std::tuple{1, 1, 1}, {5, 17, 3}, {64, 172, 9}, {172, 64, 1}, {33, 100, 70}}) {
        std::vector<float> W(size_t(N * K)), X(size_t(T * K)), Y(size_t(T * N));
        for (auto& v : W) v = nd(rng);
        for (auto& v : X) v = nd(rng);
        matmul_f32(&pool, W.data(), N, K, X.data(), T, Y.data());
        for (int t = 0; t < T; ++t)
            for (int n = 0; n < N; ++n) {
                double ref = 0, mag = 0;
                for (int k = 0; k < K; ++k) {
                    ref += double(W[n * K + k]) * X[t * K + k];
                    mag += std::fabs(double(W[n * K + k]) * X[t * K + k]);
                }
                // fp32 accumulation error bound: K * eps * sum|w x|
                EXPECT_NEAR(Y[t * N + n], ref, 1e-6 + K * 1.2e-7 * mag) << N << "x" << K << " T=" << T;
            }
    }
}

TEST(Llama2c, CorruptFilesGiveClearErrors) {
    const std::string good = test::read_file(test::shared("models/stories260K.bin"));
    const std::string dir = test::scratch_dir();
    auto expect_error = [&](const std::string& bytes, const std::string& needle) {
        const std::string path = dir + "/bad.bin";
        test::write_file(path, bytes);
        try {
            load_llama2c(path);
            ADD_FAILURE() << "no error for " << needle;
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Status::format);
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
        }
    };
    expect_error(good.substr(0, 10), "truncated llama2.c header");
    expect_error(good.substr(0, good.size() - 4), "file truncated");
    expect_error(good + "xxxx", "does not match");
    std::string absurd = good;
    const int32_t huge = 1 << 30;
    std::memcpy(absurd.data(), &huge, 4);
    expect_error(absurd, "dimension 1073741824 out of range");
    std::string zero_heads = good;
    const int32_t zero = 0;
    std::memcpy(zero_heads.data() + 12, &zero, 4);
    expect_error(zero_heads, "head count 0 out of range");
    std::string bad_kv = good;
    const int32_t three = 3;
    std::memcpy(bad_kv.data() + 16, &three, 4);
    expect_error(bad_kv, "not a multiple of kv head count");
    try {
        load_llama2c(dir + "/missing.bin");
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::io);
    }
}

#include "common/qgemm.h"

// The packed integer kernels against a scalar int64 reference, on shapes with row and column tails, decode and
// batched token counts, extreme values; exact (mod 2^32 for the masked product).
TEST(Qgemm, AllVariantsExact) {
    std::mt19937 rng(3);
    ThreadPool pool(2);
    for (auto [N, K, T] : {std::tuple{1, 1, 1}, {17, 5, 3}, {64, 172, 9}, {172, 64, 1}, {33, 129, 70}, {300, 768, 2}}) {
        std::vector<int8_t> W(size_t(N) * K);
        std::uniform_int_distribution<int> w8(-128, 127);
        for (auto& v : W) v = int8_t(w8(rng));
        W[0] = -128;
        W.back() = 127;
        const PackedI8 P = PackedI8::pack(W.data(), N, K);
        for (int n = 0; n < N; ++n)
            for (int k = 0; k < K; ++k) ASSERT_EQ(P.at(n, k), W[size_t(n) * K + k]);

        std::vector<int8_t> X8(size_t(T) * K);
        std::vector<int32_t> X16(size_t(T) * K);
        std::vector<uint32_t> X32(size_t(T) * K);
        std::uniform_int_distribution<int> x16(-32768, 32767);
        for (size_t i = 0; i < X8.size(); ++i) {
            X8[i] = int8_t(w8(rng));
            X16[i] = x16(rng);
            X32[i] = uint32_t(rng());
        }
        X8[0] = -128, X16[0] = -32768, X32[0] = 0xffffffffu;
        if (X16.size() > 1) X16[1] = 32767, X32[1] = 0;
        std::vector<int32_t> Y8(size_t(T) * N), Y16(size_t(T) * N);
        std::vector<uint32_t> Y32(size_t(T) * N);
        gemm_i8(&pool, P, X8.data(), T, Y8.data());
        gemm_i16(&pool, P, X16.data(), T, Y16.data());
        gemm_masked(&pool, P, X32.data(), T, Y32.data());
        for (int t = 0; t < T; ++t)
            for (int n = 0; n < N; ++n) {
                int64_t r8 = 0, r16 = 0;
                uint32_t r32 = 0;
                for (int k = 0; k < K; ++k) {
                    const int64_t w = W[size_t(n) * K + k];
                    r8 += w * X8[size_t(t) * K + k];
                    r16 += w * X16[size_t(t) * K + k];
                    r32 += uint32_t(w) * X32[size_t(t) * K + k];
                }
                ASSERT_EQ(Y8[size_t(t) * N + n], r8) << N << "x" << K << " T=" << T;
                ASSERT_EQ(Y16[size_t(t) * N + n], r16) << N << "x" << K << " T=" << T;
                ASSERT_EQ(Y32[size_t(t) * N + n], r32) << N << "x" << K << " T=" << T;
            }
    }
}

TEST(Matmul, PackedF32MatchesReference) {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    ThreadPool pool(2);
    for (auto [N, K, T] : {std::tuple{1, 1, 1}, {17, 5, 3}, {64, 172, 9}, {172, 64, 1}, {33, 100, 70}, {40, 7, 130}}) {
        std::vector<float> W(size_t(N) * K), X(size_t(T) * K), Y(size_t(T) * N), Y1(size_t(T) * N);
        for (auto& v : W) v = nd(rng);
        for (auto& v : X) v = nd(rng);
        const PackedF32 P = PackedF32::pack(W.data(), N, K);
        matmul_f32_packed(&pool, P, X.data(), T, Y.data());
        matmul_f32_packed(nullptr, P, X.data(), T, Y1.data());
        EXPECT_EQ(Y, Y1) << "results must not depend on threads";
        for (int t = 0; t < T; ++t)
            for (int n = 0; n < N; ++n) {
                double ref = 0, mag = 0;
                for (int k = 0; k < K; ++k) {
                    ref += double(W[size_t(n) * K + k]) * X[size_t(t) * K + k];
                    mag += std::fabs(double(W[size_t(n) * K + k]) * X[size_t(t) * K + k]);
                }
                EXPECT_NEAR(Y[size_t(t) * N + n], ref, 1e-6 + K * 1.2e-7 * mag) << N << "x" << K << " T=" << T;
            }
    }
}

// One query head of causal attention the plain way, head after head: the reference for the row-order kernel.
void reference_attend_head(float* out, const float* q, const float* keys, const float* values, int n_keys,
                           size_t stride, int head_dim) {
    const float inv_sqrt = 1.0f / std::sqrt(float(head_dim));
    std::vector<float> att(static_cast<size_t>(n_keys));
    for (int p = 0; p < n_keys; ++p) att[size_t(p)] = dot_f32(q, keys + size_t(p) * stride, head_dim) * inv_sqrt;
    softmax(att.data(), n_keys);
    std::fill_n(out, head_dim, 0.0f);
    for (int p = 0; p < n_keys; ++p) axpy_f32(out, att[size_t(p)], values + size_t(p) * stride, head_dim);
}

// The row-order attention kernel (a token's run of heads in one sweep of the cache), over any range of a pass's
// (token, head) work items, must give the head-by-head results bit for bit and write nothing else: the plain
// engine's golden tokens and the presets' token equality rest on it.
TEST(Ops, AttendItemsMatchesHeadByHeadBitForBit) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    const int head_dim = 24, n_heads = 6, T = 3;
    const int64_t n_items = int64_t(T) * n_heads;
    for (int group : {1, 2, 3}) {
        const int n_kv_heads = n_heads / group;
        const size_t stride = size_t(n_kv_heads) * head_dim, dim = size_t(n_heads) * head_dim;
        for (int pos : {0, 1, 16, 67}) {
            const size_t rows = size_t(pos + T);
            std::vector<float> q(T * dim), keys(rows * stride), values(rows * stride);
            for (auto* v : {&q, &keys, &values})
                for (float& x : *v) x = u(rng);
            std::vector<float> want(q.size());
            for (int t = 0; t < T; ++t)
                for (int h = 0; h < n_heads; ++h)
                    reference_attend_head(&want[t * dim + size_t(h) * head_dim], &q[t * dim + size_t(h) * head_dim],
                                          keys.data() + size_t(h / group) * head_dim,
                                          values.data() + size_t(h / group) * head_dim, pos + t + 1, stride, head_dim);
            for (auto [b, e] : {std::pair<int64_t, int64_t>{0, n_items}, {0, 1}, {1, 4}, {5, 6}, {4, 15}, {11, 18}}) {
                std::vector<float> got(q.size(), -1.0f), scratch(attend_scratch(b, e, n_heads, pos, T));
                attend_items(b, e, n_heads, pos, got.data(), dim, q.data(), dim, keys.data(), values.data(), stride,
                             head_dim, group, scratch.data());
                for (int64_t item = 0; item < n_items; ++item)
                    for (int i = 0; i < head_dim; ++i) {
                        const size_t j = size_t(item) * head_dim + size_t(i);  // token-major, then head
                        if (item >= b && item < e)
                            ASSERT_EQ(std::memcmp(&got[j], &want[j], 4), 0)
                                << "group " << group << " pos " << pos << " item " << item << " element " << i;
                        else
                            ASSERT_EQ(got[j], -1.0f) << "item " << item << " outside [" << b << ", " << e << ") was written";
                    }
            }
        }
    }
}
