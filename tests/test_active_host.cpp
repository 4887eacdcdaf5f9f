// The host is the attacker. A host with the device owner's powers chooses the public weights and configuration it
// uploads, the sampler settings and seeds, and the prompts. Each test mounts one such attack on a protected package
// and shows that the trusted core refuses it (and, where a control exists, that the same attack works on a path
// without the defence, so the test can fail).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/sampler.h"
#include "common/model.h"
#include "formats/gguf_model.h"
#include "formats/model_file.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "testutil.h"
#include "train/lora.h"

using namespace si;
using si::test::expect_error_with;

namespace {

const std::string kModel = test::shared("models/stories260K.bin");
const std::string kTok = test::shared("models/tok512.bin");
const std::string kAdapter = test::adapter_path();

struct Packed {
    std::string dir, path, key_file;
    std::shared_ptr<const Package> package;
};

// stories260K + the Austen adapter, packed under a fresh owner key with these options.
Packed pack(const std::function<void(PackOptions&)>& adjust = nullptr) {
    Packed p;
    p.dir = test::scratch_dir();
    p.path = p.dir + "/model.sipkg";
    p.key_file = p.dir + "/owner.key";
    const pkg::Key owner = generate_owner_key();
    write_owner_key(p.key_file, owner);
    PackOptions o;
    o.base = kModel;
    o.tokenizer = kTok;
    o.loras = {kAdapter};
    if (adjust) adjust(o);
    write_package(p.path, o, owner);
    p.package = Package::open(p.path);
    return p;
}

// In-process trusted core on the software platform of `device` (a directory), the model key from the owner's file.
SecureSessionParams params(const Packed& pk, const std::string& device) {
    SecureSessionParams p;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 2;
    p.package = pk.package;
    p.key.device_dir = device;
    p.key.owner_key_file = pk.key_file;
    return p;
}


std::vector<int32_t> sample(SecureSession& s, const std::vector<int32_t>& prompt, int n, const SamplerParams& sp) {
    s.reset();
    s.set_sampler(sp);
    std::vector<int32_t> out;
    int32_t t = s.eval_sample(prompt);
    for (int i = 0; i < n; ++i) {
        out.push_back(t);
        if (i + 1 < n) t = s.eval_sample(std::span<const int32_t>(&t, 1));
    }
    return out;
}

}  // namespace

// The read-out attack of a host that uploads weights of its choosing (identity blocks, Wv = 0, Wo = a*I, one-hot
// embeddings, an untied classifier of tangent lines) needs the core to accept weights other than the owner's: every
// public tensor it uploads in the clear must now be byte for byte the one the owner packed.
TEST(ActiveHost, EveryAlteredPublicTensorIsRefused) {
    const Packed pk = pack();
    const std::string device = pk.dir + "/device";
    struct Alteration {
        std::string tensor;
        std::function<void(ModelWeights&)> apply;
    };
    const int d = pk.package->model().weights.cfg.dim;
    const std::vector<Alteration> alterations = {
        {"token_embd.weight", [](ModelWeights& w) { w.tok_embeddings[5] += 0.25f; }},
        {"output_norm.weight", [](ModelWeights& w) { std::fill(w.final_norm.begin(), w.final_norm.end(), 0.0f); }},
        {"blk.1.attn_norm.weight", [](ModelWeights& w) { w.layers[1].attn_norm.assign(w.layers[1].attn_norm.size(), 0.0f); }},
        {"blk.4.ffn_norm.weight", [](ModelWeights& w) { w.layers[4].ffn_norm[3] *= -1.0f; }},
        {"blk.0.attn_v.weight", [](ModelWeights& w) { std::fill(w.layers[0].wv.begin(), w.layers[0].wv.end(), 0.0f); }},
        {"blk.0.attn_output.weight",
         [d](ModelWeights& w) {
             std::fill(w.layers[0].wo.begin(), w.layers[0].wo.end(), 0.0f);
             for (int i = 0; i < d; ++i) w.layers[0].wo[size_t(i) * size_t(d) + size_t(i)] = 8.0f;
         }},
        // the int8 rows stay the same; only the row's scale changes
        {"blk.2.attn_q.weight scales",
         [d](ModelWeights& w) {
             for (int c = 0; c < d; ++c) w.layers[2].wq[size_t(c)] *= 2.0f;
         }},
    };
    for (const auto& a : alterations) {
        SCOPED_TRACE(a.tensor);
        ModelWeights w = materialize(*pk.package->model().source);
        a.apply(w);
        expect_error_with([&] { SecureSession s(w, params(pk, device)); }, Status::integrity,
                     {"upload " + a.tensor + ":", "differs from the one the package's owner bound",
                      "the session is stopped"});
    }
    // the control: the owner's own weights load and run
    SecureSession s(pk.package->model().source, params(pk, device));
    EXPECT_EQ(sample(s, {1}, 4, SamplerParams{0.0f, 0, 1.0f, 0}).size(), 4u);
}

// The configuration is bound too: another layer count, an untied classifier of the host's own (which, for a fully
// secret model, would read the secret final hidden states), another rope theta or norm epsilon are refused before
// any tensor is uploaded.
TEST(ActiveHost, EveryAlteredConfigurationIsRefused) {
    const Packed pk = pack();
    const std::string device = pk.dir + "/device";
    struct Alteration {
        std::string field;
        std::function<void(ModelWeights&)> apply;
    };
    const std::vector<Alteration> alterations = {
        {"n_layers",
         [](ModelWeights& w) {
             w.layers.push_back(w.layers.back());
             w.cfg.n_layers += 1;
         }},
        {"tied classifier", [](ModelWeights& w) { w.classifier = w.tok_embeddings; }},
        {"rope_theta", [](ModelWeights& w) { w.cfg.rope_theta = 500000.0f; }},
        {"norm_eps", [](ModelWeights& w) { w.cfg.norm_eps = 1e-3f; }},
        {"seq_len", [](ModelWeights& w) { w.cfg.seq_len /= 2; }},
        // Llama 3.1 RoPE frequency factors on a model packed without any
        {"rope frequency factors: count 4, the owner bound 0",
         [](ModelWeights& w) { w.cfg.rope_freq_factors.assign(size_t(w.cfg.head_dim() / 2), 2.0f); }},
    };
    for (const auto& a : alterations) {
        SCOPED_TRACE(a.field);
        ModelWeights w = materialize(*pk.package->model().source);
        a.apply(w);
        expect_error_with([&] { SecureSession s(w, params(pk, device)); }, Status::integrity,
                     {"the model configuration the host sent differs from the package's: " + a.field});
    }
}

// A model with Llama 3.1 RoPE frequency factors: the package binds them (format version 3), so a host that drops
// them, changes one, or sends them for a model that has none, runs the secret tensors in another network and is
// refused at the manifest, before any upload; the owner's own factors load and run.
TEST(ActiveHost, AlteredRopeFactorsAreRefused) {
    // outside the test's scratch directory, which pack() starts afresh
    const std::string gguf = std::string(SI_TEST_TMP) + "/llama3-rope." + std::to_string(getpid()) + ".gguf";
    ModelWeights base = test::stories();
    base.cfg.rope_freq_factors = llama3_rope_factors(base.cfg.head_dim(), base.cfg.rope_theta, 8.0f, 1.0f, 4.0f, 64.0f);
    write_gguf_model(gguf, base, load_vocab_file(kTok), GgufWeightType::f32, "llama3-rope");
    const Packed pk = pack([&](PackOptions& o) {
        o.base = gguf;
        o.tokenizer = "";
    });
    std::filesystem::remove(gguf);
    ASSERT_EQ(pk.package->model().weights.cfg.rope_freq_factors, base.cfg.rope_freq_factors);
    const std::string device = pk.dir + "/device";
    struct Alteration {
        std::string what;
        std::function<void(ModelWeights&)> apply;
    };
    const std::vector<Alteration> alterations = {
        {"rope frequency factors: count 0, the owner bound 4", [](ModelWeights& w) { w.cfg.rope_freq_factors.clear(); }},
        {"rope frequency factor 2: 4, the owner bound 8", [](ModelWeights& w) { w.cfg.rope_freq_factors[2] = 4.0f; }},
        {"rope frequency factor 0: 1.00000012, the owner bound 1",
         [](ModelWeights& w) { w.cfg.rope_freq_factors[0] = std::nextafter(1.0f, 2.0f); }},
    };
    for (const auto& a : alterations) {
        SCOPED_TRACE(a.what);
        ModelWeights w = materialize(*pk.package->model().source);
        a.apply(w);
        expect_error_with([&] { SecureSession s(w, params(pk, device)); }, Status::integrity,
                          {"the model configuration the host sent differs from the package's: " + a.what,
                           "the session is stopped"});
    }
    SecureSession s(pk.package->model().source, params(pk, device));
    EXPECT_EQ(sample(s, {1}, 4, SamplerParams{0.0f, 0, 1.0f, 0}).size(), 4u);
}

// The sampler oracle: when the draw is a public function of a host-chosen seed, the host knows each draw's uniform
// u and reads the probability of the top token off the tokens, seed by seed (bisection recovers a logit gap to five
// digits in 18 runs). The attack's premise is that a model of the draw predicts every sampled token. It holds on a
// path where the host owns the model (the control), and fails on a package, whose draws come from a key inside the
// enclave.
TEST(ActiveHost, ChosenSeedsNoLongerPredictDraws) {
    const Packed pk = pack();
    static const train::LoraAdapter adapter = train::read_lora_adapter(kAdapter, pk.package->model().weights.cfg);
    // The control: the unpacked model and adapter, which the host holds; its draws follow the host's seed. It also
    // tells the test (not the attacker) where the top two tokens are closest, for a strong test.
    SecureSessionParams cp;
    cp.host = EnclaveHostKind::inprocess;
    cp.n_threads = 2;
    cp.lora = &adapter;
    cp.logprobs = 2;
    SecureSession control(pk.package->model().source, cp);
    std::vector<int32_t> prompt = {1}, best_prompt;
    float best_second = 0.0f, gap = 0.0f;
    int32_t top = 0, second = 0;
    control.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    for (int i = 0; i < 24; ++i) {
        std::vector<TokenLogprob> lp;
        control.reset();
        const int32_t t = control.eval_sample(prompt, &lp);
        ASSERT_EQ(lp.size(), 2u);
        const float p2 = std::exp(lp[1].logprob) / (std::exp(lp[0].logprob) + std::exp(lp[1].logprob));
        if (p2 > best_second) {
            best_second = p2;
            best_prompt = prompt;
            gap = lp[0].logprob - lp[1].logprob;
            top = lp[0].token;
            second = lp[1].token;
        }
        prompt.push_back(t);
    }
    ASSERT_GT(best_second, 0.15f) << "no position with two likely tokens";

    // The attacker's model of a draw: the public sampler on the two top logits, with the host's seed.
    auto predicted = [&](uint64_t seed) {
        const float logits[2] = {gap, 0.0f};
        return Sampler(SamplerParams{1.0f, 2, 1.0f, seed}).sample(logits, 2) == 0 ? top : second;
    };
    constexpr int kSeeds = 40;
    auto agreement = [&](SecureSession& s) {
        int agree = 0;
        for (uint64_t seed = 1; seed <= kSeeds; ++seed) {
            const int32_t t = sample(s, best_prompt, 1, SamplerParams{1.0f, 2, 1.0f, seed})[0];
            agree += t == predicted(seed);
        }
        return agree;
    };
    EXPECT_EQ(agreement(control), kSeeds) << "the control: host-chosen seeds predict every draw";
    SecureSession packed(pk.package->model().source, params(pk, pk.dir + "/device"));
    // Independent draws agree with the prediction with probability p1^2 + p2^2 each: all 40 by chance < 1e-5.
    const int agree = agreement(packed);
    EXPECT_LT(agree, kSeeds) << "the package's draws still follow the host's seeds";
    std::printf("second token's probability %.3f; the host's seeds predicted %d of %d draws of the package (control: "
                "all)\n",
                best_second, agree, kSeeds);
}

// A client's seed still makes output reproducible, on the device that produced it: it goes through a PRF keyed from
// the device's sealing key. Another device (another device secret) draws differently from the same seed.
TEST(ActiveHost, ClientSeedReproducesOnTheSameDeviceOnly) {
    const Packed pk = pack();
    const SamplerParams sp{1.0f, 0, 1.0f, 1234};
    const std::vector<int32_t> prompt = {1};
    std::vector<int32_t> first, again, other;
    {
        SecureSession s(pk.package->model().source, params(pk, pk.dir + "/device-a"));
        first = sample(s, prompt, 32, sp);
        again = sample(s, prompt, 32, sp);
    }
    {
        SecureSession s(pk.package->model().source, params(pk, pk.dir + "/device-a"));
        EXPECT_EQ(sample(s, prompt, 32, sp), first) << "a new session on the same device";
    }
    {
        SecureSession s(pk.package->model().source, params(pk, pk.dir + "/device-b"));
        other = sample(s, prompt, 32, sp);
    }
    EXPECT_EQ(first, again);
    EXPECT_NE(first, other);
}

// The owner bounds the sampler settings a host or client may ask for; anything outside is refused inside the core,
// whoever asks (the library, the CLI).
TEST(ActiveHost, SamplerSettingsOutsideTheOwnersPolicyAreRefused) {
    const Packed pk = pack([](PackOptions& o) {
        o.sampling.max_temperature = 1.5f;
        o.sampling.min_top_k = 10;
        o.sampling.min_top_p = 0.5f;
        o.sampling.min_logprob_noise = 0.1f;
        o.release_logprobs = 2;
    });
    const std::string device = pk.dir + "/device";
    SecureSession s(pk.package->model().source, params(pk, device));
    const std::vector<int32_t> prompt = {1};
    auto refused = [&](const SamplerParams& sp, const std::string& why) {
        expect_error_with([&] { s.set_sampler(sp); }, Status::invalid_argument, {"the package's owner does not allow " + why});
    };
    refused({2.0f, 0, 1.0f, 1}, "a temperature above 1.5");
    refused({1.0f, 3, 1.0f, 1}, "top_k below 10");
    refused({1.0f, 0, 0.2f, 1}, "top_p below 0.5");
    // within the policy: sampling, greedy with any settings, no top-k cut at all
    EXPECT_EQ(sample(s, prompt, 4, SamplerParams{1.5f, 10, 0.5f, 1}).size(), 4u);
    EXPECT_EQ(sample(s, prompt, 4, SamplerParams{0.0f, 2, 0.1f, 1}).size(), 4u);
    EXPECT_EQ(sample(s, prompt, 4, SamplerParams{1.0f, 0, 1.0f, 1}).size(), 4u);

    // log-probabilities with less noise than the owner asks for
    auto lp = params(pk, device);
    lp.logprobs = 2;
    lp.logprob_noise = 0.01f;
    expect_error_with([&] { SecureSession t(pk.package->model().source, lp); }, Status::invalid_argument,
                 {"log-probabilities with noise below 0.1"});
    lp.logprob_noise = 0.1f;
    SecureSession t(pk.package->model().source, lp);
    std::vector<TokenLogprob> out;
    t.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    t.eval_sample(prompt, &out);
    EXPECT_EQ(out.size(), 2u);

    // the CLI reports it and exits non-zero, printing no text
    setenv("SI_DEVICE_DIR", device.c_str(), 1);
    const auto r = test::run_cli({"run", "--package", pk.path, "--key-file", pk.key_file, "-p", "Once", "-n", "4",
                                  "--temp", "1.9", "--host", "inprocess"});
    unsetenv("SI_DEVICE_DIR");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("the package's owner does not allow a temperature above 1.5"), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "");
    // and `inspect` shows the policy
    const auto i = test::run_cli({"inspect", pk.path});
    EXPECT_NE(i.out.find("sampling: temperature <= 1.5, top-k off or >= 10, top-p >= 0.5, log-probability noise >= 0.1"),
              std::string::npos)
        << i.out;
}

// A data-dependent failure inside the core (here a non-finite activation from weights that overflow) stops the
// session like an integrity failure: nothing more is computed or released.
TEST(ActiveHost, NonFiniteActivationStopsTheSession) {
    ModelWeights w = test::stories();
    // the SwiGLU product grows to about 1e8, and w2 multiplies it past the largest float
    for (auto* m : {&w.layers[0].w1, &w.layers[0].w3}) for (float& x : *m) x *= 1e4f;
    for (float& x : w.layers[0].w2) x *= 1e36f;
    SecureSessionParams p;
    p.mode = SecureMode::enclave_only;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 1;
    SecureSession s(w, p);
    s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    const std::vector<int32_t> prompt = {1, 403, 407};
    expect_error_with([&] { s.eval_sample(prompt); }, Status::integrity, {"non-finite activation", "the session is stopped"});
    expect_error_with([&] { s.reset(); }, Status::integrity, {"stopped"});
    expect_error_with([&] { s.eval_sample(prompt); }, Status::integrity, {"stopped"});
}
