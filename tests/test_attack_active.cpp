// Active attacks A9-A13 (attack/active.h): each one recovers the secret from its positive control (a core, keyserver,
// credential layout or unit store with the weakness the defence removes) and nothing from S5 on the package path
// (package, keyserver with the registered device, the owner's default policy).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "attack/active.h"
#include "attack/api_attacks.h"
#include "attack/attacks.h"
#include "attack/experiment.h"
#include "attack/package_path.h"
#include "formats/model_file.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "testutil.h"
#include "train/lora.h"

using namespace si;
using namespace si::attack;

namespace {

const std::string kModel = test::shared("models/stories260K.bin");
const std::string kTok = test::shared("models/tok512.bin");

const train::LoraAdapter& victim() {
    static const train::LoraAdapter a = train::read_lora_adapter(test::adapter_path(), test::stories().cfg);
    return a;
}

// A second adapter (another package): the victim's factors scaled, enough to be another model.
const train::LoraAdapter& other() {
    static const train::LoraAdapter a = [] {
        train::LoraAdapter o = victim();
        for (auto& t : o.tensors)
            for (float& x : t.b) x *= -0.5f;
        return o;
    }();
    return a;
}

PackagePath& path() {
    static PackagePath p(kModel, kTok, test::scratch_dir() + "/package-path", EnclaveHostKind::inprocess, 2);
    return p;
}

}  // namespace

// A9: with a core that takes the host's public weights (no manifest), the read-out construction reads the LoRA
// update of blk.0.attn_v through greedy tokens; the package's core refuses every piece of the construction.
TEST(ActiveAttacks, A9ChosenWeightsReadTheUpdateOnlyWithoutAManifest) {
    const ActiveResult c = a9_chosen_weights(test::stories(), victim(), nullptr, EnclaveHostKind::inprocess, 2);
    std::printf("A9 control: cosine %.4f over %lld queries\n", c.update_cosine, static_cast<long long>(c.queries));
    EXPECT_GE(c.update_cosine, 0.95);
    EXPECT_TRUE(c.broken);
    EXPECT_GT(c.queries, 2000);
    const ActiveResult s = a9_chosen_weights(test::stories(), victim(), &path(), EnclaveHostKind::inprocess, 2);
    EXPECT_EQ(s.attempts, 13);
    EXPECT_EQ(s.accepted, 0) << s.details.dump();
    EXPECT_EQ(s.update_cosine, 0.0);
    EXPECT_FALSE(s.broken);
    for (const auto& r : s.details["refused"]) {
        const std::string why = r["refusal"];
        EXPECT_TRUE(why.find("differs from the one the package's owner bound") != std::string::npos ||
                    why.find("the model configuration the host sent differs from the package's") != std::string::npos)
            << why;
    }
}

// A10: host-chosen seeds and temperatures read the top-two logit gap by bisection when the draws follow the
// host's seed; the package's draws do not, and the model of the draws fails.
TEST(ActiveAttacks, A10SamplerOracleOnlyWithHostChosenRandomness) {
    const ActiveResult c = a10_sampler_oracle(test::stories(), victim(), nullptr, EnclaveHostKind::inprocess, 2);
    std::printf("A10 control: %s\n", c.details.dump().c_str());
    EXPECT_LT(c.gap_error, 0.01);
    EXPECT_EQ(c.accepted, 40);
    EXPECT_TRUE(c.broken);
    const ActiveResult s = a10_sampler_oracle(test::stories(), victim(), &path(), EnclaveHostKind::inprocess, 2);
    std::printf("A10 S5: %s\n", s.details.dump().c_str());
    EXPECT_LT(s.accepted, 40);
    EXPECT_FALSE(s.broken);
}

// A11: a forged quote gets the model key from a keyserver that believes the quote's own key, and nothing from the
// package path's keyserver; a genuine quote captured from the trace is refused when replayed.
TEST(ActiveAttacks, A11ForgedQuotesGetTheKeyOnlyFromAKeyserverTrustingTheQuotesKey) {
    const ActiveResult c = a11_forged_quote(path(), victim(), true);
    EXPECT_TRUE(c.key_recovered) << c.details.dump();
    EXPECT_EQ(c.accepted, 1) << "the claimed device key does not verify the attacker's signature, even here";
    const ActiveResult s = a11_forged_quote(path(), victim(), false);
    EXPECT_EQ(s.attempts, 3);
    EXPECT_EQ(s.accepted, 0) << s.details.dump();
    EXPECT_FALSE(s.key_recovered);
    const std::string all = s.details.dump();
    EXPECT_NE(all.find("which is no registered device's"), std::string::npos) << all;
    EXPECT_NE(all.find("signature does not verify"), std::string::npos) << all;
    EXPECT_NE(all.find("nonce was already used"), std::string::npos) << all;
}

// A12: the host's user opens the sealed model key when the device files are its own; when they belong to another
// user it reads none of them.
TEST(ActiveAttacks, A12HostUserOpensTheSealedKeyOnlyWithItsOwnCredentials) {
    const ActiveResult c = a12_read_credentials(path(), victim(), true);
    EXPECT_TRUE(c.key_recovered) << c.details.dump();
    const ActiveResult s = a12_read_credentials(path(), victim(), false);
    if (geteuid() != 0 && tee::system_device_dir().empty()) {
        EXPECT_EQ(s.attempts, 0) << "no other user to own the files: the attack cannot be set up here";
        return;
    }
    EXPECT_EQ(s.attempts, 3);
    EXPECT_FALSE(s.details["read_device_secret"].get<bool>()) << s.details.dump();
    EXPECT_FALSE(s.details["read_quoting_key"].get<bool>());
    EXPECT_TRUE(s.details["read_sealed_key"].get<bool>()) << "the host keeps the sealed key";
    EXPECT_FALSE(s.key_recovered);
}

// A13: a unit store without positions in its associated data takes replayed, reordered and foreign units; the core
// refuses all of them, and whole sealed keys of another package, altered or sealed on another device.
TEST(ActiveAttacks, A13ReplayedSealedUnitsAndKeysAreRefused) {
    const ActiveResult c = a13_replay_sealed(path(), victim(), other(), true);
    EXPECT_EQ(c.attempts, 4);
    EXPECT_EQ(c.accepted, 3) << c.details.dump();
    const ActiveResult s = a13_replay_sealed(path(), victim(), other(), false);
    std::printf("A13 S5: %s\n", s.details.dump().c_str());
    EXPECT_TRUE(s.details["unaltered_session_ran"].get<bool>());
    EXPECT_EQ(s.attempts, 7);
    EXPECT_EQ(s.accepted, 0);
    for (const auto& t : s.details["attempts"]) EXPECT_NE(t["refusal"].get<std::string>(), "(no unit was substituted)");
    EXPECT_FALSE(s.broken);
}

// A13 with precomputed factors kept inside the core, and online: the host holds no sealed unit of its own, so it hands
// the core another session's (with the products of a crossing, or as a unit message ahead of them); the core refuses
// both, and every whole sealed model key that is not its own.
TEST(ActiveAttacks, A13KeptInsideAndOnlineRefuseSealedUnitsHandedIn) {
    for (const Unblinding u : {Unblinding::precomputed_inside, Unblinding::online}) {
        const ActiveResult s = a13_replay_sealed(path(), victim(), other(), false, u);
        std::printf("A13 S5 (%s): %s\n", unblinding_name(u), s.details.dump().c_str());
        EXPECT_EQ(s.attempts, 5);
        EXPECT_EQ(s.accepted, 0) << s.details.dump();
        EXPECT_FALSE(s.broken);
        const auto& tries = s.details["attempts"];
        ASSERT_EQ(tries.size(), 5u);
        const std::string want = u == Unblinding::online ? "sealed unblinding factors for a crossing that uses none"
                                                         : "the crossing's factors are kept inside the core; no sealed "
                                                           "unit belongs to it";
        for (int i = 0; i < 2; ++i)
            EXPECT_NE(tries[size_t(i)]["refusal"].get<std::string>().find(want), std::string::npos) << tries[size_t(i)];
        EXPECT_NE(tries[2]["refusal"].get<std::string>().find("is not the one the model key was released for"),
                  std::string::npos);
    }
}

// A9-A12 with precomputed unblinding (factors sealed outside): the package's core still refuses the read-out
// construction, its draws still ignore the host's seed, forged and replayed quotes still get no key, and the host's
// user still reads no device credential.
TEST(ActiveAttacks, A9ToA12HoldWithPrecomputedUnblinding) {
    const Unblinding u = Unblinding::precomputed_sealed;
    const ActiveResult a9 = a9_chosen_weights(test::stories(), victim(), &path(), EnclaveHostKind::inprocess, 2, u);
    EXPECT_EQ(a9.attempts, 13);
    EXPECT_EQ(a9.accepted, 0) << a9.details.dump();
    const ActiveResult a10 = a10_sampler_oracle(test::stories(), victim(), &path(), EnclaveHostKind::inprocess, 2, u);
    std::printf("A10 S5 (sealed factors): %s\n", a10.details.dump().c_str());
    EXPECT_LT(a10.accepted, 40);
    EXPECT_FALSE(a10.broken);
    EXPECT_EQ(a10.queries, 65);
    const ActiveResult a11 = a11_forged_quote(path(), victim(), false, u);
    EXPECT_EQ(a11.attempts, 3);
    EXPECT_EQ(a11.accepted, 0) << a11.details.dump();
    const ActiveResult a12 = a12_read_credentials(path(), victim(), false, u);
    if (geteuid() == 0 || !tee::system_device_dir().empty()) {
        EXPECT_EQ(a12.attempts, 3);
        EXPECT_FALSE(a12.details["read_device_secret"].get<bool>()) << a12.details.dump();
        EXPECT_FALSE(a12.key_recovered);
    }
}

// The owner's policy is set when packing: a package of the default policy refuses a session that asks for
// log-probabilities; one packed with the permissive policy releases them, and A6 then reads the classifier's span
// (its positive control) also with precomputed unblinding, while tokens alone give it nothing.
TEST(ActiveAttacks, A6OnThePackagePathUnderEachReleasePolicy) {
    auto pk = std::shared_ptr<PackagePath>(&path(), [](PackagePath*) {});
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 40; ++i) prompts.push_back({1, int32_t(30 + 7 * i), int32_t(200 + 3 * i), int32_t(400 - i)});
    SchemeOptions o;
    o.package = pk;
    o.unblinding = Unblinding::precomputed_sealed;
    const int V = test::stories().cfg.vocab_size;
    try {
        a6_logprob_queries(test::stories(), &victim(), prompts, 3, V, 0.0f, o, nullptr);
        ADD_FAILURE() << "the owner's default policy released log-probabilities";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("log-probabilities"), std::string::npos) << e.what();
    }
    const LastLayerExtraction none = a6_logprob_queries(test::stories(), &victim(), prompts, 3, 0, 0.0f, o, nullptr);
    EXPECT_EQ(none.queries, 160);
    EXPECT_EQ(none.rows, 0);
    EXPECT_EQ(none.subspace_cos, 0.0);
    o.policy = ReleasePolicy::permissive;
    const LastLayerExtraction all = a6_logprob_queries(test::stories(), &victim(), prompts, 3, V, 0.0f, o, nullptr);
    std::printf("A6 on a permissive package (sealed factors): %lld rows, subspace cosine %.4f\n",
                static_cast<long long>(all.rows), all.subspace_cos);
    EXPECT_EQ(all.rows, 160);
    EXPECT_EQ(all.columns, V);
    EXPECT_GE(all.subspace_cos, 0.9);
}

// The suite's entries for S5 with precomputed unblinding: one active entry through run_experiment reports what it
// observed, its release policy and its variant; the same entry with nothing observed is "did not run".
TEST(ActiveAttacks, PrecomputedEntriesCountTheirObservations) {
    EvalConfig cfg;
    cfg.model = kModel;
    cfg.tokenizer = kTok;
    cfg.victim_adapter = test::adapter_path();
    cfg.work_dir = test::scratch_dir() + "/eval-precomputed";
    cfg.host = EnclaveHostKind::inprocess;
    cfg.threads = 2;
    cfg.seeds = 1;
    cfg.quick = true;
    cfg.verbose = false;
    EvalContext ctx(cfg);
    AttackVariant v;
    v.unblinding = Unblinding::precomputed_inside;
    ExperimentResult r = run_experiment(ctx, Scheme::s5, Attack::a11, v);
    EXPECT_EQ(r.variant, "precomputed (kept inside)");
    EXPECT_EQ(r.policy, "owner's default (tokens only)");
    EXPECT_EQ(r.obs.rows, 3);
    EXPECT_TRUE(r.ran);
    EXPECT_EQ(r.verdict(), "not broken");
    r.obs.rows = r.obs.queries = 0;
    r.ran = r.obs.ran();
    EXPECT_EQ(r.verdict(), "did not run");
}

// The units of A1's and A2's paired test: one delta cosine per crossing slot (q k v; o; gate and up; down) of every
// layer. The exact fine-tuned weights give 1 in every slot, the base alone 0, the negated update -1; a slot without
// estimates is left out.
TEST(ActiveAttacks, SlotDeltaCosinesArePerCrossingSlot) {
    const ModelWeights& base = test::stories();
    std::map<ProjKey, Mat> exact, none, negated;
    for (int l = 0; l < base.cfg.n_layers; ++l)
        for (Proj p : {Proj::q, Proj::k, Proj::v, Proj::o, Proj::w1, Proj::w2, Proj::w3}) {
            const Mat w0 = base_projection(base, l, p), d = lora_delta(victim(), base.cfg, l, p);
            Mat e = w0, n = w0;
            for (size_t i = 0; i < e.a.size(); ++i) {
                e.a[i] += d.a[i];
                n.a[i] -= d.a[i];
            }
            exact[{l, p}] = e;
            none[{l, p}] = w0;
            negated[{l, p}] = n;
        }
    const std::vector<double> a = slot_delta_cosines(exact, base, victim());
    ASSERT_EQ(a.size(), size_t(4 * base.cfg.n_layers));
    for (double c : a) EXPECT_NEAR(c, 1.0, 1e-9);
    for (double c : slot_delta_cosines(none, base, victim())) EXPECT_EQ(c, 0.0);
    for (double c : slot_delta_cosines(negated, base, victim())) EXPECT_NEAR(c, -1.0, 1e-9);
    exact.erase({0, Proj::o});
    EXPECT_EQ(slot_delta_cosines(exact, base, victim()).size(), size_t(4 * base.cfg.n_layers - 1));
}
