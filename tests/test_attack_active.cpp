// Active attacks A9-A13 (attack/active.h): each one recovers the secret from its positive control (a core, keyserver,
// credential layout or unit store with the weakness the defence removes) and nothing from S5 on the package path
// (package, keyserver with the registered device, the owner's default policy).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "attack/active.h"
#include "attack/package_path.h"
#include "formats/model_file.h"
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
