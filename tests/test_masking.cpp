// Building blocks of the masked offload (DESIGN.md section 5): the AES-CTR mask stream, the fixed-point bound,
// Freivalds' check, and the end-to-end masked product x -> x + r -> W x' -> W x' - W r == W x.
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "backends/accelerator.h"
#include "common/error.h"
#include "common/threadpool.h"
#include "enclave/fixed_point.h"
#include "enclave/freivalds.h"
#include "enclave/mask_stream.h"

using namespace si;

namespace {

constexpr uint8_t kKeyA[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                               17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
constexpr uint8_t kKeyB[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                               17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 33};

template <typename Fn>
Status status_of(Fn&& fn) {
    try {
        fn();
    } catch (const Error& e) {
        return e.status();
    }
    return Status::ok;
}

// ----------------------------------------------------------------------------------------------- mask stream

// AES-256-ECB of the 128-bit big-endian counter blocks first, first + 1, ... (the reference keystream).
std::vector<uint32_t> aes_counter_blocks(const uint8_t (&key)[32], uint64_t first, int n_blocks) {
    std::vector<unsigned char> blocks(size_t(16 * n_blocks), 0), enc(blocks.size());
    for (int b = 0; b < n_blocks; ++b)
        for (int i = 0; i < 8; ++i) blocks[size_t(16 * b + 15 - i)] = uint8_t((first + uint64_t(b)) >> (8 * i));
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    int len = 0;
    EXPECT_EQ(EVP_EncryptInit_ex(ctx, EVP_aes_256_ecb(), nullptr, key, nullptr), 1);
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    EXPECT_EQ(EVP_EncryptUpdate(ctx, enc.data(), &len, blocks.data(), int(blocks.size())), 1);
    EVP_CIPHER_CTX_free(ctx);
    std::vector<uint32_t> words(size_t(4 * n_blocks));
    std::memcpy(words.data(), enc.data(), enc.size());
    return words;
}

TEST(MaskStream, KnownAnswerAgainstAesBlocks) {
    // Mask i is word (i mod 4) of AES-256_k(block i / 4), the block being the 128-bit big-endian counter.
    MaskStream ms(kKeyA, MaskStream::TestOnlyKey{});
    std::vector<uint32_t> got(64);
    ms.fill(got.data(), got.size());
    EXPECT_EQ(got, aes_counter_blocks(kKeyA, 0, 16));
    // Across the 2^32-block boundary (the carry out of the low 32 counter bits) and at a partial-block start.
    const uint64_t first = (uint64_t(1) << 32) - 3;
    ms.reserve(4 * first - ms.position() + 2);
    std::vector<uint32_t> far(4 * 6 - 2);
    ms.fill(far.data(), far.size());
    const std::vector<uint32_t> want = aes_counter_blocks(kKeyA, first, 6);
    EXPECT_TRUE(std::equal(far.begin(), far.end(), want.begin() + 2));
}

TEST(MaskStream, NoRepeatedBlocksAndUniformBytes) {
    MaskStream ms;
    constexpr size_t kMasks = size_t(1) << 24;
    std::vector<uint32_t> m(kMasks);
    // Uneven pieces exercise the partial-block paths.
    size_t done = 0;
    for (size_t piece = 1; done < kMasks; piece = piece * 3 + 1) {
        const size_t n = std::min(piece, kMasks - done);
        ms.fill(m.data() + done, n);
        done += n;
    }
    EXPECT_EQ(ms.position(), kMasks);

    // Chi-square of the 2^26 byte values over 256 bins (255 degrees of freedom: mean 255, sd 22.6).
    std::array<uint64_t, 256> count{};
    const auto* bytes = reinterpret_cast<const uint8_t*>(m.data());
    for (size_t i = 0; i < kMasks * 4; ++i) ++count[bytes[i]];
    const double expect = double(kMasks * 4) / 256.0;
    double chi2 = 0;
    for (const uint64_t c : count) chi2 += (double(c) - expect) * (double(c) - expect) / expect;
    EXPECT_LT(chi2, 255 + 7 * 22.6);
    EXPECT_GT(chi2, 255 - 7 * 22.6);

    // No 128-bit block appears twice.
    struct Block {
        uint64_t hi, lo;
        bool operator<(const Block& o) const { return hi != o.hi ? hi < o.hi : lo < o.lo; }
        bool operator==(const Block& o) const { return hi == o.hi && lo == o.lo; }
    };
    std::vector<Block> blocks(kMasks / 4);
    std::memcpy(blocks.data(), m.data(), kMasks * sizeof(uint32_t));
    m.clear();
    m.shrink_to_fit();
    std::sort(blocks.begin(), blocks.end());
    EXPECT_EQ(std::adjacent_find(blocks.begin(), blocks.end()), blocks.end());
}

TEST(MaskStream, DistinctKeysGiveDistinctStreams) {
    std::vector<uint32_t> a(1024), b(1024), c(1024), d(1024);
    MaskStream(kKeyA, MaskStream::TestOnlyKey{}).fill(a.data(), a.size());
    MaskStream(kKeyB, MaskStream::TestOnlyKey{}).fill(b.data(), b.size());
    MaskStream().fill(c.data(), c.size());
    MaskStream().fill(d.data(), d.size());
    EXPECT_NE(a, b);
    EXPECT_NE(c, d);
    EXPECT_NE(a, c);
    // Element-wise too: two independent streams agree on about 1024 / 2^32 positions.
    int same = 0;
    for (size_t i = 0; i < a.size(); ++i) same += (a[i] == b[i]) + (c[i] == d[i]);
    EXPECT_LE(same, 1);
    // The same (test) key reproduces the same stream.
    std::vector<uint32_t> a2(1024);
    MaskStream(kKeyA, MaskStream::TestOnlyKey{}).fill(a2.data(), a2.size());
    EXPECT_EQ(a, a2);
}

TEST(MaskStream, FillAtRegeneratesHandedOutMasks) {
    MaskStream ms(kKeyA, MaskStream::TestOnlyKey{});
    std::vector<uint32_t> seq;
    for (size_t n : {1, 3, 5, 7, 2, 64, 0, 9, 1000, 4, 1}) {
        std::vector<uint32_t> piece(n);
        ms.fill(piece.data(), n);
        seq.insert(seq.end(), piece.begin(), piece.end());
    }
    ASSERT_EQ(ms.position(), seq.size());
    std::vector<uint32_t> all(seq.size());
    ms.fill_at(0, all.data(), all.size());
    EXPECT_EQ(all, seq);
    for (uint64_t off : {1, 2, 3, 4, 5, 17, 100, 1090}) {
        const size_t n = std::min<size_t>(37, seq.size() - off);
        std::vector<uint32_t> part(n);
        ms.fill_at(off, part.data(), n);
        EXPECT_TRUE(std::equal(part.begin(), part.end(), seq.begin() + long(off))) << off;
    }
    // Positions not handed out yet cannot be peeked at.
    uint32_t two[2] = {};
    EXPECT_EQ(status_of([&] { ms.fill_at(ms.position(), two, 1); }), Status::invalid_argument);
    EXPECT_EQ(status_of([&] { ms.fill_at(ms.position() - 1, two, 2); }), Status::invalid_argument);
    EXPECT_EQ(ms.position(), seq.size());
}

TEST(MaskStream, ReservedRangesAreNeverHandedOutAgain) {
    MaskStream ms(kKeyA, MaskStream::TestOnlyKey{});
    std::vector<uint32_t> first(10);
    ms.fill(first.data(), first.size());
    const MaskRange r = ms.reserve(1001);
    EXPECT_EQ(r.offset, 10u);
    EXPECT_EQ(r.count, 1001u);
    EXPECT_EQ(ms.position(), 1011u);
    std::vector<uint32_t> reserved(1001), next(1001);
    ms.fill_at(r.offset, reserved.data(), reserved.size());
    ms.fill(next.data(), next.size());
    EXPECT_NE(reserved, next);
    std::vector<uint32_t> regen(1001);
    ms.fill_at(r.offset, regen.data(), regen.size());
    EXPECT_EQ(reserved, regen);
}

TEST(MaskStream, RefusesToWrap) {
    MaskStream ms(kKeyA, MaskStream::TestOnlyKey{});
    ms.reserve(MaskStream::kMaxPosition - 10);
    std::vector<uint32_t> m(11);
    EXPECT_EQ(status_of([&] { ms.fill(m.data(), 11); }), Status::security);
    ms.fill(m.data(), 10);  // the last masks are fine (counter block near 2^62)
    EXPECT_EQ(ms.position(), MaskStream::kMaxPosition);
    EXPECT_EQ(status_of([&] { ms.fill(m.data(), 1); }), Status::security);
    EXPECT_EQ(status_of([&] { ms.reserve(1); }), Status::security);
    // Far positions regenerate consistently.
    std::vector<uint32_t> again(10);
    ms.fill_at(MaskStream::kMaxPosition - 10, again.data(), 10);
    EXPECT_TRUE(std::equal(again.begin(), again.end(), m.begin()));
}

// ----------------------------------------------------------------------------------------------- fixed point

TEST(FixedPoint, ActivationBitsBound) {
    constexpr int64_t kLimit = (int64_t(1) << 31) - 1;
    EXPECT_EQ(activation_bits(768), 15);
    EXPECT_EQ(activation_bits(2048), 14);
    EXPECT_EQ(activation_bits(5632), 12);
    EXPECT_EQ(activation_bits(1), 16);
    EXPECT_EQ(activation_bits(16777215), 2);
    for (int64_t K = 1; K <= 16777215; K = K * 3 / 2 + 1) {
        const int b = activation_bits(K);
        ASSERT_GE(b, kMinActivationBits);
        ASSERT_LE(b, kMaxActivationBits);
        // The worst case, all weights -128 against all activations -qmax (or +qmax), fits int32 ...
        EXPECT_LE(K * 128 * int64_t(activation_qmax(b)), kLimit) << K;
        // ... and one more bit would not (unless capped).
        if (b < kMaxActivationBits) {
            EXPECT_GT(K * 128 * int64_t(activation_qmax(b + 1)), kLimit) << K;
        }
    }
    EXPECT_EQ(status_of([] { activation_bits(0); }), Status::unsupported);
    EXPECT_EQ(status_of([] { activation_bits(16777216); }), Status::unsupported);
}

TEST(FixedPoint, QuantiseAndDequantise) {
    std::mt19937 rng(7);
    std::normal_distribution<float> d(0.0f, 3.0f);
    const int64_t T = 3, K = 300;
    std::vector<float> x(size_t(T * K));
    for (auto& v : x) v = d(rng);
    for (int64_t k = 0; k < K; ++k) x[size_t(2 * K + k)] = 0.0f;  // token 2: all zeros
    for (const int bits : {2, 8, 12, 16}) {
        const int32_t qmax = activation_qmax(bits);
        std::vector<int32_t> q(x.size());
        std::vector<float> scale(static_cast<size_t>(T));
        quantize_activations(x.data(), T, K, bits, q.data(), scale.data());
        EXPECT_EQ(scale[2], 0.0f);
        for (int64_t t = 0; t < T; ++t) {
            int32_t qabs = 0;
            for (int64_t k = 0; k < K; ++k) {
                const int32_t v = q[size_t(t * K + k)];
                ASSERT_LE(std::abs(v), qmax);
                qabs = std::max(qabs, std::abs(v));
                // Round to nearest: reconstruction error at most half a step.
                EXPECT_LE(std::fabs(float(v) * scale[size_t(t)] - x[size_t(t * K + k)]),
                          0.5f * scale[size_t(t)] * 1.001f + 1e-6f);
            }
            EXPECT_EQ(qabs, t == 2 ? 0 : qmax);  // the largest magnitude maps to qmax
        }
    }
    // Dequantisation: y_float = y_int * w_scale[n] * x_scale[t].
    const std::vector<int32_t> y = {3, -4, 5, 100, 0, -1};
    const std::vector<float> ws = {0.5f, 2.0f, 0.25f}, xs = {1.0f, 0.125f};
    std::vector<float> out(6);
    dequantize_product(y.data(), 2, 3, ws.data(), xs.data(), out.data());
    EXPECT_EQ(out, (std::vector<float>{1.5f, -8.0f, 1.25f, 6.25f, 0.0f, -0.03125f}));
    std::vector<float> bad = {1.0f, NAN};
    std::vector<int32_t> qb(2);
    float sb = 0;
    // a non-finite activation is data-dependent: it stops the session like an integrity failure
    EXPECT_EQ(status_of([&] { quantize_activations(bad.data(), 1, 2, 8, qb.data(), &sb); }), Status::integrity);
    for (float inf : {INFINITY, -INFINITY}) {
        bad[1] = inf;
        EXPECT_EQ(status_of([&] { quantize_activations(bad.data(), 1, 2, 8, qb.data(), &sb); }), Status::integrity);
    }
}

// Exact rounding (to nearest, ties to even, as nearbyint) and tokens so small that 1 / max|x| overflows a float.
TEST(FixedPoint, QuantiseRoundsTiesToEvenAndHandlesTinyTokens) {
    // qmax = 127 for 8 bits; max |x| = 127 makes the step 1, so x itself is rounded
    const std::vector<float> x = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -126.5f, 3.49f, -3.51f, 0.0f};
    std::vector<int32_t> q(x.size());
    float scale = 0;
    quantize_activations(x.data(), 1, int64_t(x.size()), 8, q.data(), &scale);
    EXPECT_EQ(scale, 1.0f);
    EXPECT_EQ(q, (std::vector<int32_t>{127, 0, 2, 2, 0, -2, -126, 3, -4, 0}));
    // max |x| = 2^-124: 127 * 2^124 overflows, the values still map onto [-127, 127]
    const float a = std::ldexp(1.0f, -124);
    const std::vector<float> tiny = {a, -a / 2, 0.0f, a / 4, -a};
    std::vector<int32_t> qt(tiny.size());
    quantize_activations(tiny.data(), 1, int64_t(tiny.size()), 8, qt.data(), &scale);
    EXPECT_EQ(qt, (std::vector<int32_t>{127, -64, 0, 32, -127}));  // -63.5 -> -64 (even), 31.75 -> 32
    EXPECT_GT(scale, 0.0f);
}

// ----------------------------------------------------------------------------------------------- Freivalds

constexpr uint64_t P61 = FreivaldsKey::kPrime;

TEST(Freivalds, FieldArithmetic) {
    std::mt19937_64 rng(3);
    for (int i = 0; i < 10000; ++i) {
        const uint64_t a = rng() % P61, b = rng() % P61;
        const auto want = uint64_t((static_cast<unsigned __int128>(a) * b) % P61);
        ASSERT_EQ(mulmod_p61(a, b), want);
        const __int128 v = (__int128(int64_t(rng())) << 62) + int64_t(rng());
        const __int128 r = v % __int128(P61);
        ASSERT_EQ(reduce_p61(v), uint64_t(r < 0 ? r + __int128(P61) : r));
    }
    EXPECT_EQ(reduce_p61(__int128(P61)), 0u);
    EXPECT_EQ(reduce_p61(-__int128(P61)), 0u);
    EXPECT_EQ(reduce_p61(-1), P61 - 1);
    EXPECT_EQ(mulmod_p61(P61 - 1, P61 - 1), 1u);
}

TEST(Freivalds, LimbDotProductIsExact) {
    // The check's dot product against a plain 128-bit reference, with the largest field elements and int32
    // extremes over several accumulation blocks.
    std::mt19937_64 rng(4);
    for (const int64_t n : {1, 7, 2047, 2048, 2049, 10000}) {
        for (int mode = 0; mode < 4; ++mode) {
            std::vector<uint64_t> a(static_cast<size_t>(n));
            std::vector<int32_t> b(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) {
                a[size_t(i)] = mode == 0 ? rng() % P61 : P61 - 1 - (rng() & 1);
                b[size_t(i)] = mode == 1 ? std::numeric_limits<int32_t>::min()
                               : mode == 2 ? std::numeric_limits<int32_t>::max()
                                           : int32_t(uint32_t(rng()));
            }
            __int128 ref = 0;
            for (int64_t i = 0; i < n; ++i) ref += __int128(int64_t(a[size_t(i)])) * b[size_t(i)];
            ASSERT_EQ(dot_mod_p61(a.data(), b.data(), n), reduce_p61(ref)) << "n=" << n << " mode=" << mode;
        }
    }
}

struct Product {
    int64_t N, K, T;
    std::vector<int8_t> W;
    std::vector<int32_t> X, Y;
};

Product random_product(int64_t N, int64_t K, int64_t T, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Product p{N, K, T, std::vector<int8_t>(size_t(N * K)), std::vector<int32_t>(size_t(T * K)),
              std::vector<int32_t>(size_t(T * N))};
    const int32_t qmax = activation_qmax(activation_bits(K));
    std::uniform_int_distribution<int> w(-128, 127), x(-qmax, qmax);
    for (auto& v : p.W) v = int8_t(w(rng));
    for (auto& v : p.X) v = x(rng);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
            int64_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += int64_t(p.W[size_t(n * K + k)]) * p.X[size_t(t * K + k)];
            p.Y[size_t(t * N + n)] = int32_t(s);
        }
    return p;
}

TEST(Freivalds, AcceptsCorrectProducts) {
    ThreadPool pool(2);
    const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {37, 173}, {300, 64}, {5, 2048}};
    for (const auto& [N, K] : shapes) {
        const Product p = random_product(N, K, 6, uint64_t(N * 1000 + K));
        const FreivaldsKey key(p.W.data(), N, K, &pool);
        const FreivaldsKey key_inline(p.W.data(), N, K);
        for (int64_t t = 0; t < p.T; ++t) {
            EXPECT_TRUE(key.check(p.Y.data() + t * N, p.X.data() + t * K));
            EXPECT_TRUE(key_inline.check(p.Y.data() + t * N, p.X.data() + t * K));
        }
        EXPECT_TRUE(key.check_batch(p.Y.data(), p.X.data(), p.T));
    }
}

TEST(Freivalds, CatchesEveryAlteredValue) {
    const int64_t N = 64, K = 96;
    const Product p = random_product(N, K, 1, 11);
    const FreivaldsKey key(p.W.data(), N, K);
    std::mt19937_64 rng(12);
    const uint32_t fixed[] = {1u, 0xFFFFFFFFu /* -1 */, 0x80000000u /* 2^31 */, 2u, 0xFFFFFFFEu};
    for (int trial = 0; trial < 2000; ++trial) {
        std::vector<int32_t> y = p.Y;
        const size_t n = size_t(rng() % N);
        uint32_t delta = trial < 5 * 100 ? fixed[trial % 5] : uint32_t(rng());
        if (delta == 0) delta = 1;
        y[n] = int32_t(uint32_t(y[n]) + delta);  // what a tampering accelerator does to the ring element
        ASSERT_FALSE(key.check(y.data(), p.X.data())) << "trial " << trial << " n " << n << " delta " << delta;
    }
}

TEST(Freivalds, CatchesAlteredValuesInBatches) {
    const int64_t N = 40, K = 70, T = 9;
    const Product p = random_product(N, K, T, 21);
    const FreivaldsKey key(p.W.data(), N, K);
    ASSERT_TRUE(key.check_batch(p.Y.data(), p.X.data(), T));
    std::mt19937_64 rng(22);
    for (int trial = 0; trial < 1000; ++trial) {
        std::vector<int32_t> y = p.Y;
        const size_t i = size_t(rng() % (N * T));
        const uint32_t delta = trial % 3 == 0 ? 1u : trial % 3 == 1 ? 0x80000000u : (uint32_t(rng()) | 1u);
        y[i] = int32_t(uint32_t(y[i]) + delta);
        ASSERT_FALSE(key.check_batch(y.data(), p.X.data(), T)) << "trial " << trial;
    }
    // Two rows swapped is caught too.
    std::vector<int32_t> y = p.Y;
    std::swap_ranges(y.begin(), y.begin() + N, y.begin() + N);
    EXPECT_FALSE(key.check_batch(y.data(), p.X.data(), T));
}

TEST(Freivalds, KeysAreRandomAndMovedFromKeysRefuse) {
    const Product p = random_product(8, 8, 1, 5);
    FreivaldsKey a(p.W.data(), 8, 8);
    FreivaldsKey b(std::move(a));
    EXPECT_TRUE(b.check(p.Y.data(), p.X.data()));
    EXPECT_EQ(status_of([&] { (void)a.check(p.Y.data(), p.X.data()); }), Status::internal);
    EXPECT_EQ(status_of([&] { FreivaldsKey bad(p.W.data(), 0, 8); }), Status::invalid_argument);
}

// ----------------------------------------------------------------------------------------------- end to end

// Enclave-side unblinding factor W r (mod 2^32), computed here as the enclave would, independently of the backend.
std::vector<uint32_t> unblinding(const std::vector<int8_t>& W, int64_t N, int64_t K, const std::vector<uint32_t>& r,
                                 int64_t T) {
    std::vector<uint32_t> wr(size_t(T * N));
    for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
            uint32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += uint32_t(int32_t(W[size_t(n * K + k)])) * r[size_t(t * K + k)];
            wr[size_t(t * N + n)] = s;
        }
    return wr;
}

enum class Fill { random, max_pos, max_neg };

void masked_roundtrip(Accelerator& acc, MaskStream& ms, int64_t N, int64_t K, int64_t T, Fill fill, int r_mode,
                      uint64_t seed) {
    SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " T=" + std::to_string(T) +
                 " fill=" + std::to_string(int(fill)) + " r_mode=" + std::to_string(r_mode));
    std::mt19937_64 rng(seed);
    const int32_t qmax = activation_qmax(activation_bits(K));
    std::vector<int8_t> W(size_t(N * K));
    std::vector<int32_t> x(size_t(T * K));
    std::uniform_int_distribution<int> wd(-128, 127), xd(-qmax, qmax);
    for (auto& v : W) v = fill == Fill::random ? int8_t(wd(rng)) : int8_t(-128);
    for (auto& v : x) v = fill == Fill::random ? xd(rng) : fill == Fill::max_pos ? qmax : -qmax;
    if (fill != Fill::random && N > 1)  // one row of +127 for the opposite sign
        for (int64_t k = 0; k < K; ++k) W[size_t(K + k)] = 127;

    std::vector<uint32_t> r(x.size());
    if (r_mode == 0)
        ms.fill(r.data(), r.size());
    else
        std::fill(r.begin(), r.end(), r_mode == 1 ? 0u : 0xFFFFFFFFu);
    std::vector<uint32_t> xm(x.size());
    mask_add(x.data(), r.data(), xm.data(), x.size());

    WeightHandle h = acc.upload_i8(W.data(), N, K);
    std::vector<uint32_t> ym(size_t(T * N));
    acc.mul_mat_masked(h, xm.data(), T, ym.data());
    acc.release(h);

    const std::vector<uint32_t> wr = unblinding(W, N, K, r, T);
    std::vector<int32_t> y(ym.size());
    mask_remove(ym.data(), wr.data(), y.data(), y.size());

    for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
            int64_t ref = 0;
            for (int64_t k = 0; k < K; ++k) ref += int64_t(W[size_t(n * K + k)]) * x[size_t(t * K + k)];
            ASSERT_LE(std::abs(ref), int64_t(std::numeric_limits<int32_t>::max()));
            ASSERT_EQ(int64_t(y[size_t(t * N + n)]), ref) << "t=" << t << " n=" << n;
        }
    const FreivaldsKey key(W.data(), N, K);
    EXPECT_TRUE(key.check_batch(y.data(), x.data(), T));
}

TEST(MaskedProduct, EndToEndBitExact) {
    ThreadPool pool(2);
    auto acc = make_cpu_accelerator(&pool);
    MaskStream ms;
    uint64_t seed = 100;
    for (const int64_t K : {1, 3, 63, 64, 65, 172, 768, 2048})
        for (const int64_t N : {1, 5, 33})
            for (const int64_t T : {1, 3}) masked_roundtrip(*acc, ms, N, K, T, Fill::random, 0, seed++);
}

TEST(MaskedProduct, EndToEndExtremes) {
    ThreadPool pool(2);
    auto acc = make_cpu_accelerator(&pool);
    MaskStream ms;
    uint64_t seed = 200;
    for (const int64_t K : {1, 63, 65, 768, 2048, 5632})
        for (const Fill f : {Fill::max_pos, Fill::max_neg})
            for (const int r_mode : {0, 1, 2}) masked_roundtrip(*acc, ms, 4, K, 2, f, r_mode, seed++);
}

}  // namespace
