// Dequantisation of llama.cpp's block formats against ggml itself: tests/data/quants/<type>.qf hold blocks that
// ggml quantised (and blocks of random bytes) together with ggml's own dequantised floats
// (scripts/gen-quant-fixtures.sh). Every value must match bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fp16.h"
#include "common/quant_dot.h"
#include "formats/gguf.h"
#include "engine/engine.h"
#include "formats/gguf_model.h"
#include "formats/model_file.h"
#include "formats/quants.h"
#include "testutil.h"

namespace si {
namespace {

using gguf::TensorType;

struct Section {
    std::vector<uint8_t> bytes;
    std::vector<float> ref;
};
struct Fixture {
    uint32_t type = 0;
    std::vector<Section> sections;
};

uint32_t u32_at(const std::string& s, size_t& pos) {
    if (pos + 4 > s.size()) throw std::runtime_error("fixture truncated");
    uint32_t v;
    std::memcpy(&v, s.data() + pos, 4);
    pos += 4;
    return v;
}

Fixture load_fixture(const std::string& name) {
    const std::string path = std::string(SI_SOURCE_DIR) + "/tests/data/quants/" + name + ".qf";
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    const std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (s.compare(0, 4, "SIQF") != 0) throw std::runtime_error(path + ": bad magic");
    size_t pos = 4;
    Fixture f;
    f.type = u32_at(s, pos);
    const uint32_t n_sections = u32_at(s, pos);
    for (uint32_t i = 0; i < n_sections; ++i) {
        Section sec;
        const uint32_t n = u32_at(s, pos), nb = u32_at(s, pos);
        if (pos + nb + size_t(n) * 4 > s.size()) throw std::runtime_error(path + ": truncated section");
        sec.bytes.assign(s.begin() + long(pos), s.begin() + long(pos + nb));
        pos += nb;
        sec.ref.resize(n);
        std::memcpy(sec.ref.data(), s.data() + pos, size_t(n) * 4);
        pos += size_t(n) * 4;
        f.sections.push_back(std::move(sec));
    }
    return f;
}

uint32_t bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

class QuantFixture : public ::testing::TestWithParam<std::pair<const char*, TensorType>> {};

TEST_P(QuantFixture, BitIdenticalToGgml) {
    const auto [name, type] = GetParam();
    const Fixture f = load_fixture(name);
    ASSERT_EQ(f.type, uint32_t(type)) << name;
    ASSERT_EQ(f.sections.size(), 2u);
    const gguf::TypeTraits* tr = gguf::type_traits(f.type);
    ASSERT_NE(tr, nullptr);
    ASSERT_TRUE(gguf::can_dequantize(type));
    for (size_t s = 0; s < f.sections.size(); ++s) {
        const Section& sec = f.sections[s];
        const size_t n = sec.ref.size();
        ASSERT_EQ(sec.bytes.size(), n / tr->block_size * tr->type_size) << name;
        std::vector<float> out(n, std::nanf(""));
        quants::dequantize(type, sec.bytes.data(), n, out.data());
        size_t mismatches = 0, first = n, nonzero = 0;
        for (size_t i = 0; i < n; ++i) {
            if (bits(out[i]) != bits(sec.ref[i]) && mismatches++ == 0) first = i;
            nonzero += sec.ref[i] != 0.0f;
        }
        EXPECT_EQ(mismatches, 0u) << name << " section " << s << ": first mismatch at element " << first << ": "
                                  << (first < n ? out[first] : 0.0f) << " vs ggml " << (first < n ? sec.ref[first] : 0.0f);
        // The fixture exercises the format: most values are non-zero.
        EXPECT_GT(nonzero, n / 2) << name << " section " << s;
        // The GGUF path (Reader::to_f32 -> gguf::decode) gives the same bits.
        std::vector<float> via_decode(n);
        gguf::decode(type, sec.bytes.data(), n, via_decode.data());
        EXPECT_EQ(std::memcmp(via_decode.data(), out.data(), n * 4), 0) << name;
    }
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, QuantFixture,
    ::testing::Values(std::pair{"q4_0", TensorType::Q4_0}, std::pair{"q4_1", TensorType::Q4_1},
                      std::pair{"q5_0", TensorType::Q5_0}, std::pair{"q5_1", TensorType::Q5_1},
                      std::pair{"q8_0", TensorType::Q8_0}, std::pair{"q2_K", TensorType::Q2_K},
                      std::pair{"q3_K", TensorType::Q3_K}, std::pair{"q4_K", TensorType::Q4_K},
                      std::pair{"q5_K", TensorType::Q5_K}, std::pair{"q6_K", TensorType::Q6_K},
                      std::pair{"iq4_nl", TensorType::IQ4_NL}, std::pair{"iq4_xs", TensorType::IQ4_XS},
                      std::pair{"f16", TensorType::F16}, std::pair{"bf16", TensorType::BF16}),
    [](const auto& info) { return std::string(info.param.first); });

TEST(Quants, SupportedTypes) {
    for (TensorType t : {TensorType::F32, TensorType::F16, TensorType::BF16, TensorType::Q4_0, TensorType::Q4_1,
                         TensorType::Q5_0, TensorType::Q5_1, TensorType::Q8_0, TensorType::Q2_K, TensorType::Q3_K,
                         TensorType::Q4_K, TensorType::Q5_K, TensorType::Q6_K, TensorType::IQ4_NL, TensorType::IQ4_XS})
        EXPECT_TRUE(quants::supported(t)) << gguf::type_name(t);
    for (TensorType t : {TensorType::Q8_1, TensorType::Q8_K, TensorType::IQ2_XXS, TensorType::IQ3_S, TensorType::IQ1_M,
                         TensorType::TQ1_0, TensorType::MXFP4, TensorType::I8})
        EXPECT_FALSE(quants::supported(t)) << gguf::type_name(t);
}

TEST(Quants, RejectsUnsupportedTypeAndPartialBlock) {
    std::vector<uint8_t> bytes(512);
    std::vector<float> out(256);
    try {
        quants::dequantize(TensorType::IQ2_XS, bytes.data(), 256, out.data());
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::unsupported);
        EXPECT_NE(std::string(e.what()).find("cannot dequantise IQ2_XS"), std::string::npos) << e.what();
    }
    try {
        quants::dequantize(TensorType::Q4_K, bytes.data(), 128, out.data());
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("128 elements are not a whole number of Q4_K blocks of 256"),
                  std::string::npos)
            << e.what();
    }
}

// Hand-built blocks with known values, independent of the fixtures: the layouts as documented in quants.h.
TEST(Quants, HandBuiltBlocks) {
    // Q4_0 with d = 0.5 (fp16 0x3800): nibble q gives (q - 8) * 0.5; byte j holds elements j (low) and j + 16 (high).
    std::vector<uint8_t> q4(18, 0);
    q4[0] = 0x00, q4[1] = 0x38;
    q4[2] = 0xF0;  // element 0: 0 -> -4, element 16: 15 -> 3.5
    std::vector<float> y(32);
    quants::dequantize(TensorType::Q4_0, q4.data(), 32, y.data());
    EXPECT_EQ(y[0], -4.0f);
    EXPECT_EQ(y[16], 3.5f);
    EXPECT_EQ(y[1], -4.0f);
    // Q6_K with d = 1 (0x3C00), scale of sub-block 0 = 3: element 0 has ql low nibble 5, qh bits 0-1 = 2 ->
    // q = 5 | 2 << 4 = 37, value 3 * (37 - 32) = 15.
    std::vector<uint8_t> q6(210, 0);
    q6[0] = 0x05;
    q6[128] = 0x02;
    q6[192] = 3;
    q6[208] = 0x00, q6[209] = 0x3C;
    std::vector<float> y6(256);
    quants::dequantize(TensorType::Q6_K, q6.data(), 256, y6.data());
    EXPECT_EQ(y6[0], 15.0f);
    EXPECT_EQ(y6[1], -96.0f);  // q = 0 -> 3 * -32
    // Q4_K with d = 1, dmin = 1, sub-block 0 scale 2 and min 1: nibble 7 -> 2 * 7 - 1 = 13.
    std::vector<uint8_t> k4(144, 0);
    k4[1] = 0x3C, k4[3] = 0x3C;
    k4[4] = 2;      // scale of sub-block 0
    k4[4 + 4] = 1;  // min of sub-block 0
    k4[16] = 0x07;
    std::vector<float> yk(256);
    quants::dequantize(TensorType::Q4_K, k4.data(), 256, yk.data());
    EXPECT_EQ(yk[0], 13.0f);
    EXPECT_EQ(yk[1], -1.0f);
    EXPECT_EQ(yk[32], 0.0f);  // sub-block 1: scale 0, min 0
}

}  // namespace
}  // namespace si

// ---- a model file written by llama-quantize ------------------------------------------------------------------------
namespace si {
namespace {

std::string trim(std::string s) {
    const auto b = s.find_first_not_of(" \t\r\n");
    const auto e = s.find_last_not_of(" \t\r\n");
    return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

const std::string kQ4KM = std::string(SI_SOURCE_DIR) + "/tests/data/quants/stories260K-h256-Q4_K_M.gguf";

TEST(QuantModel, LlamaQuantizeQ4KMHoldsKQuants) {
    const gguf::Reader r = gguf::Reader::open(kQ4KM);
    std::map<std::string, int> types;
    for (const auto& t : r.tensors()) types[gguf::type_name(t.type)]++;
    // ffn_down (ne[0] = 256) in Q4_K or Q6_K; the 64-wide matrices fall back to Q5_0 and Q8_0.
    EXPECT_GT(types["Q4_K"], 0);
    EXPECT_GT(types["Q6_K"], 0);
    EXPECT_GT(types["Q5_0"], 0);
    EXPECT_GT(types["Q8_0"], 0);
    const ModelWeights w = load_gguf_model(r);
    EXPECT_EQ(w.cfg.hidden_dim, 256);
    // The padded feed-forward units are zero after dequantisation too (a zero block stays zero in every format).
    for (const auto& L : w.layers)
        for (int64_t n = 172; n < 256; ++n)
            for (int64_t k = 0; k < w.cfg.dim; ++k) ASSERT_EQ(L.w1[size_t(n * w.cfg.dim + k)], 0.0f);
}

// Every preset reproduces llama.cpp's own greedy continuation on the file (recorded by scripts/gen-quant-fixtures.sh
// from llama-completion); the plaintext int8 engine re-quantises per row and is only close.
TEST(QuantModel, EveryPresetRunsTheLlamaQuantizeFile) {
    const std::string want = trim(test::read_file(kQ4KM.substr(0, kQ4KM.size() - 5) + ".llamacpp.txt"));
    ASSERT_GT(want.size(), 40u);
    for (const char* mode : {"plain", "secureinfer", "gpu-only", "enclave-only"}) {
        const auto r = test::run_cli({"run", "-m", kQ4KM, "-n", "32", "--temp", "0", "-t", "1", "--mode", mode});
        ASSERT_EQ(r.exit_code, 0) << mode << ": " << r.err;
        EXPECT_EQ(trim(r.out), want) << mode;
    }
    const auto r = test::run_cli({"run", "-m", kQ4KM, "-n", "32", "--temp", "0", "-t", "1", "--mode", "plain", "--weights", "int8"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(trim(r.out).substr(0, 52), want.substr(0, 52));
}

}  // namespace
}  // namespace si

// ---- native dot products (weights read in their block format, int8 activations) -----------------------------------

namespace si {
namespace {

// For each native format, over ggml-written rows and random-byte rows of the fixtures: the scalar reference equals
// the float dot product of the dequantised weights with the dequantised activations (up to float summation), and
// the vector kernel equals the reference (up to float summation).
TEST(QuantDot, KernelsMatchReferenceAndDequantisedProduct) {
    const std::pair<const char*, qdot::WType> types[] = {
        {"q4_0", qdot::WType::q4_0}, {"q8_0", qdot::WType::q8_0}, {"q4_K", qdot::WType::q4_k}, {"q6_K", qdot::WType::q6_k}};
    std::mt19937 rng(7);
    std::normal_distribution<float> N(0.0f, 1.0f);
    for (const auto& [name, type] : types) {
        const Fixture f = load_fixture(name);
        for (const Section& sec : f.sections) {
            const int64_t n = int64_t(sec.ref.size());  // one row of 2048 elements
            std::vector<float> x(static_cast<size_t>(n));
            for (auto& v : x) v = N(rng) * (1.0f + float(rng() % 4));
            std::vector<int8_t> q(static_cast<size_t>(n));
            std::vector<float> d(static_cast<size_t>(n / 32));
            std::vector<int16_t> bsums(static_cast<size_t>(n / 16));
            std::vector<float> xq(static_cast<size_t>(n));  // the activations as the kernel sees them
            if (qdot::uses_q8k(type)) {
                qdot::quantize_q8_k(x.data(), n, q.data(), d.data(), bsums.data());
                for (int64_t i = 0; i < n; ++i) xq[size_t(i)] = float(q[size_t(i)]) * d[size_t(i / 256)];
                for (int64_t g = 0; g < n / 16; ++g) {
                    int s = 0;
                    for (int j = 0; j < 16; ++j) s += q[size_t(g * 16 + j)];
                    ASSERT_EQ(bsums[size_t(g)], s);
                }
            } else {
                qdot::quantize_q8_0(x.data(), n, q.data(), d.data(), bsums.data());
                for (int64_t b = 0; b < n / 32; ++b) {
                    int s = 0;
                    for (int j = 0; j < 32; ++j) s += q[size_t(b * 32 + j)];
                    ASSERT_EQ(bsums[size_t(b)], s);
                }
                for (int64_t i = 0; i < n; ++i) xq[size_t(i)] = float(q[size_t(i)]) * d[size_t(i / 32)];
            }
            // activation quantisation: half a step per element
            for (int64_t i = 0; i < n; ++i) {
                const float step = qdot::uses_q8k(type) ? d[size_t(i / 256)] : d[size_t(i / 32)];
                ASSERT_LE(std::fabs(xq[size_t(i)] - x[size_t(i)]), 0.5f * step * 1.0001f + 1e-12f);
            }
            // the whole row, and one block less (an odd block count reaches the kernels' tail loops)
            for (const int64_t len : {n, n - qdot::block_elems(type)}) {
                double want = 0.0, mag = 0.0;
                for (int64_t i = 0; i < len; ++i) {
                    want += double(sec.ref[size_t(i)]) * double(xq[size_t(i)]);
                    mag += std::fabs(double(sec.ref[size_t(i)]) * double(xq[size_t(i)]));
                }
                const float r = qdot::ref::dot_row(type, sec.bytes.data(), len, q.data(), d.data(), bsums.data());
                const float v = qdot::dot_row(type, sec.bytes.data(), len, q.data(), d.data(), bsums.data());
                EXPECT_NEAR(r, want, 1e-5 * mag + 1e-30) << name << " " << len;
                EXPECT_NEAR(v, r, 1e-5 * mag + 1e-30) << name << " " << len;
                EXPECT_GT(mag, 0.0) << name;
            }
        }
    }
}

TEST(QuantDot, Q8_0WeightsAreGgmlsReference) {
    // The re-quantisation of matrices without a native kernel writes what ggml's quantize_row_q8_0_ref writes.
    const Fixture f = load_fixture("q8_0");
    std::vector<float> x(f.sections[0].ref);  // values on the Q8_0 grid: re-quantising must give the same bytes
    std::vector<uint8_t> out(f.sections[0].bytes.size());
    qdot::quantize_row_q8_0_weights(x.data(), int64_t(x.size()), out.data());
    std::vector<float> back(x.size());
    quants::dequantize(TensorType::Q8_0, out.data(), x.size(), back.data());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(back[i], x[i]) << i;
}

// The vectorised activation quantisers write the scalar references' bytes (scales, quants, sums), for blocks of
// every magnitude, an all-zero block and values exactly halfway between two steps.
TEST(QuantDot, ActivationQuantisersEqualScalarReference) {
    std::mt19937 rng(5);
    std::normal_distribution<float> N(0.0f, 1.0f);
    const int64_t n = 2048;
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = N(rng) * std::ldexp(1.0f, int(i / 256) * 3 - 10);
    std::fill(x.begin() + 256, x.begin() + 288, 0.0f);                 // a zero block of 32
    for (int j = 0; j < 32; ++j) x[size_t(512 + j)] = float(j - 16) + 0.5f;  // ties: .5 steps when amax = 127
    x[512 + 31] = 127.0f;
    for (const bool k : {false, true}) {
        std::vector<int8_t> q(static_cast<size_t>(n)), qr(static_cast<size_t>(n));
        std::vector<float> d(static_cast<size_t>(n / 32)), dr(static_cast<size_t>(n / 32));
        std::vector<int16_t> s(static_cast<size_t>(n / 16)), sr(static_cast<size_t>(n / 16));
        if (k) {
            qdot::quantize_q8_k(x.data(), n, q.data(), d.data(), s.data());
            qdot::ref::quantize_q8_k(x.data(), n, qr.data(), dr.data(), sr.data());
        } else {
            qdot::quantize_q8_0(x.data(), n, q.data(), d.data(), s.data());
            qdot::ref::quantize_q8_0(x.data(), n, qr.data(), dr.data(), sr.data());
        }
        EXPECT_EQ(q, qr) << k;
        EXPECT_EQ(0, std::memcmp(d.data(), dr.data(), d.size() * 4)) << k;
        EXPECT_EQ(s, sr) << k;
    }
}

// The interleaved kernels (16 rows per group, several tokens per weight block read) give each row exactly what the
// scalar reference gives for that row as stored: ggml-written rows of the fixtures and random rows, a row count that
// leaves a partial last group, and 1 to 6 tokens (every tile width and a tail).
TEST(QuantDot, InterleavedKernelsEqualReferenceBitForBit) {
    const std::pair<const char*, qdot::WType> types[] = {
        {"q4_0", qdot::WType::q4_0}, {"q8_0", qdot::WType::q8_0}, {"q4_K", qdot::WType::q4_k}, {"q6_K", qdot::WType::q6_k}};
    std::mt19937 rng(11);
    std::normal_distribution<float> N(0.0f, 1.0f);
    for (const auto& [name, type] : types) {
        if (!qdot::has_packed(type)) GTEST_SKIP() << "built without AVX-512 VNNI: no interleaved kernels";
        const Fixture f = load_fixture(name);
        const int64_t n = int64_t(f.sections[0].ref.size());
        const size_t rb = size_t(n / qdot::block_elems(type)) * qdot::block_bytes(type);
        const int64_t rows = 37;  // two full groups and 5 rows
        std::vector<uint8_t> w(size_t(rows) * rb);
        for (int64_t r = 0; r < rows; ++r) {
            uint8_t* row = w.data() + size_t(r) * rb;
            if (size_t(r) < f.sections.size() && f.sections[size_t(r)].bytes.size() == rb) {
                std::memcpy(row, f.sections[size_t(r)].bytes.data(), rb);
                continue;
            }
            for (size_t i = 0; i < rb; ++i) row[i] = uint8_t(rng());
            // finite fp16 scales (random bytes may be inf or NaN): the block scale (Q4_K: and the mins' scale)
            for (size_t b = 0; b < rb; b += qdot::block_bytes(type))
                for (int k = 0; k < (type == qdot::WType::q4_k ? 2 : 1); ++k) {
                    const uint16_t h = fp32_to_fp16(std::ldexp(float(1 + rng() % 1000), -12 - int(rng() % 6)));
                    std::memcpy(row + b + (type == qdot::WType::q6_k ? 208 : 2 * k), &h, 2);
                }
        }
        const qdot::Packed P(type, w.data(), rows, n, rb);
        ASSERT_EQ(P.groups(), 3);
        ASSERT_EQ(P.bytes(), size_t(3 * 16) * rb) << name << ": as many bytes as the rows as stored";
        for (const int64_t T : {1, 2, 3, 4, 5, 6}) {
            const bool k = qdot::uses_q8k(type);
            std::vector<int8_t> q(size_t(T * n));
            std::vector<float> d(size_t(T * n / 32));
            std::vector<int16_t> sums(size_t(T * n / 16));
            for (int64_t t = 0; t < T; ++t) {
                std::vector<float> x(static_cast<size_t>(n));
                for (auto& v : x) v = N(rng) * (1.0f + float(rng() % 4));
                if (k)
                    qdot::quantize_q8_k(x.data(), n, &q[size_t(t * n)], &d[size_t(t * n / 256)], &sums[size_t(t * n / 16)]);
                else
                    qdot::quantize_q8_0(x.data(), n, &q[size_t(t * n)], &d[size_t(t * n / 32)], &sums[size_t(t * n / 32)]);
            }
            const int64_t ds = k ? n / 256 : n / 32, ss = k ? n / 16 : n / 32;
            const int64_t ldy = rows + 3;
            std::vector<float> Y(size_t(T * ldy), -7.0f);
            qdot::gemm_packed(P, 0, P.groups(), q.data(), d.data(), sums.data(), T, Y.data(), ldy);
            for (int64_t t = 0; t < T; ++t) {
                for (int64_t r = 0; r < rows; ++r) {
                    const float want = qdot::ref::dot_row(type, w.data() + size_t(r) * rb, n, &q[size_t(t * n)],
                                                          &d[size_t(t * ds)], &sums[size_t(t * ss)]);
                    const float got = Y[size_t(t * ldy + r)];
                    uint32_t a, b;
                    std::memcpy(&a, &want, 4);
                    std::memcpy(&b, &got, 4);
                    ASSERT_EQ(a, b) << name << " row " << r << " token " << t << " of " << T << ": " << got << " vs " << want;
                }
                for (int64_t r = rows; r < ldy; ++r) ASSERT_EQ(Y[size_t(t * ldy + r)], -7.0f) << "write past the rows";
            }
        }
    }
}

// The native engine computes with the file's blocks and int8 activations: its logits stay close to those of the f32
// engine on the dequantised weights, and it holds a fraction of the bytes.
TEST(QuantModel, NativeLogitsCloseToDequantisedF32) {
    const ModelFile mf = load_model_file(kQ4KM);
    EngineParams p;
    p.n_threads = 2;
    p.weights = WeightFormat::f32;
    Engine ef(mf.weights, p);
    p.weights = WeightFormat::native;
    Engine en(mf.weights, p, mf.gguf.get());
    EXPECT_LT(en.weight_bytes(), ef.weight_bytes() / 3);
    const std::vector<int32_t> tokens = {1, 403, 261, 285, 300, 94, 7, 500};
    const int V = mf.weights.cfg.vocab_size;
    const float* pf = ef.eval(tokens, true);
    const std::vector<float> want(pf, pf + tokens.size() * size_t(V));
    const float* pn = en.eval(tokens, true);
    for (size_t t = 0; t < tokens.size(); ++t) {
        float range = 0.0f, diff = 0.0f;
        for (int v = 0; v < V; ++v) {
            const float a = want[t * size_t(V) + size_t(v)], b = pn[t * size_t(V) + size_t(v)];
            range = std::max(range, std::fabs(a));
            diff = std::max(diff, std::fabs(a - b));
        }
        EXPECT_LT(diff, 0.08f * range) << "token " << t;  // measured: at most 5.6% over these tokens
        EXPECT_GT(diff, 0.0f) << "token " << t;  // int8 activations: not the f32 computation
    }
}

// The native engine hands the file's pages of the matrices it interleaved back to the kernel after packing them, and
// only for a read-only mapping of the file: a second engine on the same mapped file, and one on an in-memory copy of
// the file, compute exactly the first engine's logits.
TEST(QuantModel, NativeEnginesOnTheSameFileAgree) {
    const ModelFile mf = load_model_file(kQ4KM);
    EngineParams p;
    p.n_threads = 2;
    p.weights = WeightFormat::native;
    const std::vector<int32_t> tokens = {1, 403, 261, 285, 300, 94, 7, 500};
    const size_t n = tokens.size() * size_t(mf.weights.cfg.vocab_size);
    auto logits = [&](const gguf::Reader* r) {
        Engine e(mf.weights, p, r);
        const float* l = e.eval(tokens, true);
        return std::vector<float>(l, l + n);
    };
    const std::vector<float> first = logits(mf.gguf.get());
    EXPECT_EQ(logits(mf.gguf.get()), first);
    const std::string bytes = test::read_file(kQ4KM);
    const gguf::Reader copy = gguf::Reader::from_memory(bytes, "copy");
    EXPECT_EQ(logits(&copy), first);
    EXPECT_EQ(logits(&copy), first);
}

TEST(QuantModel, NativeEngineReproducesLlamaCpp) {
    const std::string want = trim(test::read_file(kQ4KM.substr(0, kQ4KM.size() - 5) + ".llamacpp.txt"));
    const auto r = test::run_cli({"run", "-m", kQ4KM, "-n", "32", "--temp", "0", "-t", "2", "--mode", "plain", "--weights", "native"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(trim(r.out), want);
    // A llama2.c checkpoint has no block format: native re-quantises to Q8_0 (hidden 172 falls back to int8).
    const auto c = test::run_cli({"run", "-m", test::shared("models/stories260K.bin"), "--tokenizer",
                                  test::shared("models/tok512.bin"), "-n", "8", "--temp", "0", "--mode", "plain",
                                  "--weights", "native"});
    ASSERT_EQ(c.exit_code, 0) << c.err;
    EXPECT_EQ(trim(c.out).substr(0, 16), "Once upon a time");
    // An adapter cannot be merged into weights read as stored.
    const auto l = test::run_cli({"run", "-m", test::shared("models/stories260K.bin"), "--tokenizer",
                                  test::shared("models/tok512.bin"), "--lora",
                                  std::string(SI_SOURCE_DIR) + "/adapters/austen-r8.gguf", "-n", "4", "--mode", "plain",
                                  "--weights", "native"});
    EXPECT_EQ(l.exit_code, 1);
    EXPECT_NE(l.err.find("cannot have a LoRA adapter merged in"), std::string::npos) << l.err;
}

}  // namespace
}  // namespace si
