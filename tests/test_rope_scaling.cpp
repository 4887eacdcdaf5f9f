// Llama 3.1 RoPE scaling: frequency factors from GGUF (rope_freqs.weight, or computed from llama.rope.scaling.* of
// type llama3) divide each rotation frequency, in the plaintext engine and inside the trusted core. Checked against
// the reference formulas (Meta's apply_scaling for the factors; a rotation by pos * theta^(-i/d) / factor), and by an
// identity: factors k^(i/d) are the same model as rope theta * k without factors.
#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>

#include "common/model.h"
#include "common/ops.h"
#include "engine/engine.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/model_file.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "testutil.h"

using namespace si;

namespace {

// Meta's apply_scaling (llama/model.py of Llama 3.1), in double precision.
std::vector<double> reference_factors(int head_dim, double theta, double factor, double low, double high, double orig) {
    std::vector<double> out;
    const double pi = 3.14159265358979323846;
    for (int i = 0; i < head_dim; i += 2) {
        const double freq = 1.0 / std::pow(theta, double(i) / head_dim);
        const double wavelen = 2 * pi / freq;
        if (wavelen < orig / high) out.push_back(1.0);
        else if (wavelen > orig / low) out.push_back(factor);
        else {
            const double smooth = (orig / wavelen - low) / (high - low);
            out.push_back(1.0 / ((1 - smooth) / factor + smooth));
        }
    }
    return out;
}

// stories260K's weights with other RoPE settings.
ModelWeights stories_with(float theta, std::vector<float> factors) {
    ModelWeights w = test::stories();
    w.cfg.rope_theta = theta;
    w.cfg.rope_freq_factors = std::move(factors);
    return w;
}

// factors k^(i/d) for the pairs i = 0, 2, ...: the same rotation frequencies as theta * k.
std::vector<float> power_factors(int head_dim, double k) {
    std::vector<float> f;
    for (int i = 0; i < head_dim; i += 2) f.push_back(float(std::pow(k, double(i) / head_dim)));
    return f;
}

std::vector<float> all_logits(const ModelWeights& w, const std::vector<int32_t>& tokens) {
    EngineParams p;
    p.n_threads = 1;
    Engine e(w, p);
    const float* l = e.eval(tokens, true);
    return std::vector<float>(l, l + tokens.size() * size_t(w.cfg.vocab_size));
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

const std::vector<int32_t> kPrompt = {1, 403, 407, 261, 378, 430, 273, 280, 365, 290, 259, 300, 401, 310, 268, 333, 270, 281, 450, 311};

}  // namespace

TEST(RopeScaling, Llama3FactorsFollowMetasFormula) {
    // Llama 3.1 8B: theta 500000, factor 8, low 1, high 4, original context 8192, head dimension 128.
    const std::vector<float> f = llama3_rope_factors(128, 500000.0f, 8.0f, 1.0f, 4.0f, 8192.0f);
    const std::vector<double> ref = reference_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192.0);
    ASSERT_EQ(f.size(), 64u);
    for (size_t i = 0; i < f.size(); ++i) EXPECT_NEAR(f[i], ref[i], 1e-5 * ref[i]) << i;
    EXPECT_EQ(f.front(), 1.0f);  // high frequencies unchanged
    EXPECT_EQ(f.back(), 8.0f);   // low frequencies slowed by the factor
    for (size_t i = 1; i < f.size(); ++i) EXPECT_GE(f[i], f[i - 1]);
}

TEST(RopeScaling, RotationDividesEachFrequencyByItsFactor) {
    const int heads = 2, hd = 8, pos = 37;
    const float theta = 10000.0f;
    const std::vector<float> factors = {1.0f, 1.5f, 4.0f, 8.0f};
    std::vector<float> v(size_t(heads * hd));
    for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(float(i) + 0.5f);
    std::vector<float> got = v;
    rope(got.data(), heads, hd, pos, theta, factors.data());
    for (int h = 0; h < heads; ++h)
        for (int i = 0; i < hd; i += 2) {
            const double angle = pos * std::pow(double(theta), -double(i) / hd) / factors[size_t(i / 2)];
            const double a = v[size_t(h * hd + i)], b = v[size_t(h * hd + i + 1)];
            EXPECT_NEAR(got[size_t(h * hd + i)], a * std::cos(angle) - b * std::sin(angle), 1e-5);
            EXPECT_NEAR(got[size_t(h * hd + i + 1)], a * std::sin(angle) + b * std::cos(angle), 1e-5);
        }
}

TEST(RopeScaling, GgufTensorAndMetadataPaths) {
    const std::string dir = test::scratch_dir();
    const Vocab vocab = load_vocab_file(test::shared("models/tok512.bin"));
    // The tensor path: written as rope_freqs.weight, read back as the config's factors.
    const std::vector<float> f = {1.0f, 2.0f, 3.5f, 8.0f};
    write_gguf_model(dir + "/f.gguf", stories_with(10000.0f, f), vocab, GgufWeightType::f32, "f");
    {
        const auto r = gguf::Reader::open(dir + "/f.gguf");
        ASSERT_NE(r.find_tensor("rope_freqs.weight"), nullptr);
        EXPECT_EQ(read_gguf_config(r).rope_freq_factors, f);
        EXPECT_EQ(load_gguf_model(r).cfg.rope_freq_factors, f);
    }
    // The metadata path: llama.rope.scaling.type llama3 and its parameters, no tensor.
    gguf::Writer w;
    const auto base = gguf::Reader::open(dir + "/f.gguf");
    for (const gguf::KeyValue& kv : base.metadata())
        if (kv.key != "general.alignment") w.set(kv.key, kv.value);
    w.set_str("llama.rope.scaling.type", "llama3");
    w.set_f32("llama.rope.scaling.factor", 4.0f);
    w.set_u32("llama.rope.scaling.original_context_length", 64);
    const ModelConfig c = read_gguf_config(gguf::Reader::from_memory(w.serialize(), "meta.gguf"));
    const std::vector<double> ref = reference_factors(8, 10000.0, 4.0, 1.0, 4.0, 64.0);
    ASSERT_EQ(c.rope_freq_factors.size(), 4u);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(c.rope_freq_factors[i], ref[i], 1e-5 * ref[i]);
    EXPECT_EQ(c.rope_freq_factors[0], 1.0f);
    EXPECT_GT(c.rope_freq_factors[1], 3.5f);
    // Errors name the tensor or key.
    w.set_str("llama.rope.scaling.type", "yarn");
    test::expect_error([&] { read_gguf_config(gguf::Reader::from_memory(w.serialize(), "yarn.gguf")); }, Status::unsupported,
                       "RoPE scaling 'yarn' is not supported");
    gguf::Writer bad = w;
    bad.set_str("llama.rope.scaling.type", "none");
    bad.add_tensor("rope_freqs.weight", {3}, gguf::TensorType::F32, std::vector<float>{1, 2, 3});
    test::expect_error([&] { read_gguf_config(gguf::Reader::from_memory(bad.serialize(), "shape.gguf")); }, Status::format,
                       "tensor 'rope_freqs.weight' has shape [3], expected [4]");
    gguf::Writer zero = w;
    zero.set_str("llama.rope.scaling.type", "none");
    zero.add_tensor("rope_freqs.weight", {4}, gguf::TensorType::F32, std::vector<float>{1, 0, 3, 4});
    test::expect_error([&] { read_gguf_config(gguf::Reader::from_memory(zero.serialize(), "zero.gguf")); }, Status::format,
                       "RoPE frequency factor is not a finite positive number");
}

TEST(RopeScaling, FactorsChangeTheEngineOutputAsTheFormulaSays) {
    const int hd = test::stories().cfg.head_dim();
    const auto none = all_logits(stories_with(10000.0f, {}), kPrompt);
    // Factors of 1 change nothing, bit for bit.
    EXPECT_EQ(all_logits(stories_with(10000.0f, std::vector<float>(size_t(hd / 2), 1.0f)), kPrompt), none);
    // Factors k^(i/d) rotate as theta * k does.
    const auto scaled = all_logits(stories_with(10000.0f, power_factors(hd, 16.0)), kPrompt);
    const auto theta16 = all_logits(stories_with(160000.0f, {}), kPrompt);
    EXPECT_LT(max_abs_diff(scaled, theta16), 2e-3f);
    EXPECT_GT(max_abs_diff(scaled, none), 0.5f);
    // The first position (angle 0) is unaffected.
    const size_t v = size_t(test::stories().cfg.vocab_size);
    EXPECT_EQ(std::vector<float>(scaled.begin(), scaled.begin() + long(v)), std::vector<float>(none.begin(), none.begin() + long(v)));
}

TEST(RopeScaling, TrustedCoreUsesTheFactors) {
    SecureSessionParams p;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 1;
    const auto greedy = [&](const ModelWeights& w, SecureMode mode) {
        p.mode = mode;
        SecureSession s(w, p);
        s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
        std::vector<int32_t> out{s.eval_sample(kPrompt)};
        while (out.size() < 24) out.push_back(s.eval_sample(std::span<const int32_t>(&out.back(), 1)));
        return out;
    };
    const int hd = test::stories().cfg.head_dim();
    const ModelWeights with = stories_with(10000.0f, power_factors(hd, 16.0));
    const auto ref = greedy(stories_with(160000.0f, {}), SecureMode::enclave_only);
    for (SecureMode m : {SecureMode::enclave_only, SecureMode::secureinfer, SecureMode::gpu_only})
        EXPECT_EQ(greedy(with, m), ref) << int(m);
    EXPECT_NE(greedy(stories_with(10000.0f, {}), SecureMode::enclave_only), ref);
}

// Packages bind the factors (format version 3): a model with Llama 3.1 factors packs, its package loads and gives
// the plaintext engine's greedy tokens; the same model without its factors gives other tokens, so the comparison
// can fail. (tests/test_active_host.cpp: a host that alters or drops the factors is refused.)
TEST(RopeScaling, PackagesBindLlama3Factors) {
    const std::string dir = test::scratch_dir();
    const int hd = test::stories().cfg.head_dim();
    // wavelengths 6.3, 63, 628, 6283 against 64 / 4 and 64 / 1: one factor of each kind (1, smoothed, 8)
    const std::vector<float> f = llama3_rope_factors(hd, 10000.0f, 8.0f, 1.0f, 4.0f, 64.0f);
    ASSERT_EQ(f.size(), size_t(hd / 2));
    EXPECT_EQ(f[0], 1.0f);
    EXPECT_GT(f[1], 1.0f);
    EXPECT_LT(f[1], 8.0f);
    EXPECT_EQ(f.back(), 8.0f);
    const ModelWeights with = stories_with(10000.0f, f);
    write_gguf_model(dir + "/f.gguf", with, load_vocab_file(test::shared("models/tok512.bin")), GgufWeightType::f32, "f");
    const pkg::Key key = generate_owner_key();
    write_owner_key(dir + "/owner.key", key);
    PackOptions o;
    o.base = dir + "/f.gguf";
    o.secret = "all";
    write_package(dir + "/f.sipkg", o, key);
    const auto package = Package::open(dir + "/f.sipkg");
    EXPECT_EQ(package->model().weights.cfg.rope_freq_factors, f);
    EXPECT_NE(describe_package(dir + "/f.sipkg").find("rope frequency factors: 4 (sha256 "), std::string::npos);

    // The plaintext engine's greedy continuation with the factors, and its logits along it.
    EngineParams ep;
    ep.n_threads = 1;
    const int V = with.cfg.vocab_size;
    const auto logits_along = [&](const ModelWeights& w, const std::vector<int32_t>& seq) {
        Engine e(w, ep);
        const float* l = e.eval(seq, true);
        return std::vector<float>(l, l + seq.size() * size_t(V));
    };
    const auto argmax = [&](const float* l) { return int32_t(std::max_element(l, l + V) - l); };
    std::vector<int32_t> seq(kPrompt);
    {
        Engine e(with, ep);
        seq.push_back(argmax(e.eval(kPrompt)));
        while (seq.size() < kPrompt.size() + 24) seq.push_back(argmax(e.eval(std::span<const int32_t>(&seq.back(), 1))));
    }
    const std::vector<int32_t> want(seq.begin() + long(kPrompt.size()), seq.end());
    const std::vector<float> lw = logits_along(with, seq), ln = logits_along(stories_with(10000.0f, {}), seq);

    SecureSessionParams p;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 1;
    p.key.device_dir = dir + "/device";
    p.key.owner_key_file = dir + "/owner.key";
    const auto free_running = [&](const ModelWeights& w) {
        SecureSession s(w, p);
        s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
        std::vector<int32_t> out{s.eval_sample(kPrompt)};
        while (out.size() < 24) out.push_back(s.eval_sample(std::span<const int32_t>(&out.back(), 1)));
        return out;
    };
    // The unpacked model in the same preset: the package must run exactly this network.
    p.mode = SecureMode::secureinfer;
    const std::vector<int32_t> unpacked = free_running(with);
    p.package = package;
    for (SecureMode m : {SecureMode::secureinfer, SecureMode::enclave_only}) {
        p.mode = m;
        EXPECT_EQ(free_running(materialize(*package->model().source)), unpacked) << int(m);
        // Teacher-forced along the engine's continuation: the package's greedy token is the engine's at every step
        // whose top two logits are at least 1 apart (the int8 products move logits by up to about 0.6 here), and at
        // all but one step in all; the engine without the factors agrees far less often.
        SecureSession s(package->model().source, p);
        s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
        int agree = 0, agree_without = 0;
        for (size_t i = 0; i < want.size(); ++i) {
            const int32_t got = i == 0 ? s.eval_sample(kPrompt) : s.eval_sample(std::span<const int32_t>(&want[i - 1], 1));
            const size_t at = (kPrompt.size() - 1 + i) * size_t(V);
            std::vector<float> top(lw.begin() + long(at), lw.begin() + long(at) + V);
            std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<float>());
            if (top[0] - top[1] >= 1.0f) {
                EXPECT_EQ(got, want[i]) << "step " << i << ", mode " << int(m);
            }
            agree += got == want[i];
            agree_without += argmax(&ln[at]) == want[i];
        }
        EXPECT_GE(agree, int(want.size()) - 1) << int(m);
        EXPECT_LE(agree_without, int(want.size()) - 4) << "the factors must matter for this check";
    }
}
