// Active attacks (DESIGN.md section 1): the host chooses what the trusted core consumes. Each attack is mounted on
// S5 as deployed (the package path: attack/package_path.h) and on a positive control with the weakness the defence
// removes, so that it can be seen to work. The controls are built here, for the evaluation only; no CLI flag of the
// product reaches them.
//
//   A9   chosen public weights and configuration: the read-out construction (one-hot embeddings with a reference
//        coordinate, a zero attention-norm weight on it, Wv = 0 and Wo = a I in layer 0, every other block muted by
//        tiny norm weights and zero projections, an untied classifier of tangent lines) reads the LoRA update of
//        layer 0's value projection column by column through greedy tokens. Control: the same core without a
//        manifest binding the public model (the adapter loaded as a file, the host's weights taken as they come).
//   A10  sampler oracle: chosen seeds and temperatures with top-k 2 turn each draw into a comparison of the top two
//        tokens' logit gap with a threshold the host computes from the public sampler; bisection reads the gap.
//        Control: draws that follow the host's seed (the adapter loaded as a file).
//   A11  forged attestation: quotes signed by a key of the attacker's own (claiming it, or claiming the registered
//        device's), and a genuine quote replayed, sent to the keyserver for the model key. Control: a keyserver
//        that verifies a quote under the key the quote carries.
//   A12  the host's user reads the device credentials (device secret, quoting key), derives the sealing key and
//        opens the sealed model key. Control: credentials owned by the host's user (development credentials).
//   A13  replay, reorder and cross-session reuse of sealed precomputed units, a flipped bit in one, and whole sealed
//        model keys of another package, another device, or altered. Control: a unit store that authenticates each
//        unit but not its place (no session, batch or index in the associated data).
//
// Each result says what was recovered: the cosine of the recovered update (A9), the logit-gap error (A10), whether
// the model key was recovered (A11-A13), and how many of the attempts the target accepted.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attack/package_path.h"
#include "common/model.h"
#include "common/secret_memory.h"
#include "enclave/package_crypto.h"
#include "train/lora.h"

namespace si::attack {

struct ActiveResult {
    int64_t attempts = 0;           // forgeries, alterations, substitutions or queries tried
    int64_t accepted = 0;           // those the target took (no refusal)
    int64_t queries = 0;            // model queries made
    double update_cosine = 0.0;     // A9: cosine of the recovered update with the secret one (0: nothing recovered)
    double gap_error = 0.0;         // A10: |recovered - true| top-two logit gap (nats)
    bool key_recovered = false;     // A11-A13: the attacker holds the model key
    bool broken = false;            // the attack got the secret (see each attack for its criterion)
    nlohmann::json details;
};

// A9. `package`: the S5 target; null: the control (adapter as a file, no manifest). The secret (for scoring) is
// the victim's LoRA update of layer 0's value projection.
// u: how the package's sessions unblind (S5 only; the control is online).
ActiveResult a9_chosen_weights(const ModelWeights& base, const train::LoraAdapter& victim, PackagePath* package,
                               EnclaveHostKind host, int threads, Unblinding u = Unblinding::online);
// A10. Broken when the attacker's model of the draws predicts every one of the check draws (by chance below 1e-5)
// and the gap is read to within 0.01 nats.
ActiveResult a10_sampler_oracle(const ModelWeights& base, const train::LoraAdapter& victim, PackagePath* package,
                                EnclaveHostKind host, int threads, Unblinding u = Unblinding::online);
// The A11 attacker (also used by tests/test_attestation.cpp): no device, only the published measurement and a nonce.
// An Ed25519 quoting key and an X25519 key of its own; signs a software-tee quote of a report naming them.
struct QuoteForger {
    SecretVector<uint8_t> seed = SecretVector<uint8_t>(32);
    pkg::X25519Pair x = pkg::x25519_generate();
    pkg::Report report;

    QuoteForger();
    pkg::PubKey quoting_pub() const;
    // Signed with this forger's key; the quote claims `claimed` as its quoting key (default: this forger's).
    std::vector<uint8_t> quote(const pkg::Hash& measurement, const pkg::Nonce& nonce,
                               const pkg::PubKey* claimed = nullptr);
    // What the attacker does with a released key: opens it with its X25519 private key (empty when it does not open).
    std::vector<uint8_t> open(const std::array<uint8_t, pkg::kWrappedBytes>& w, const pkg::ModelId& id) const;
};

// A11. control = true: the weak keyserver; else the package path's keyserver (through HTTP), the genuine quote
// captured from a session unblinding as u.
ActiveResult a11_forged_quote(PackagePath& package, const train::LoraAdapter& victim, bool control,
                              Unblinding u = Unblinding::online);
// A12. control = true: the device files belong to the host's user; else to another user (a provisioned
// software-tee user when there is one, else, as root, a copy owned by root read by an unprivileged host user).
// Did not run (attempts = 0) when neither is possible. The sealed key is written by a session unblinding as u.
ActiveResult a12_read_credentials(PackagePath& package, const train::LoraAdapter& victim, bool control,
                                  Unblinding u = Unblinding::online);
// A13. control = true: the weak unit store. Else the core on the package path, its sessions unblinding as u:
// sealed outside, the host's sealed units replayed, reordered, another session's or with a flipped bit; kept inside
// (or online), another session's sealed unit handed in with the products of a crossing whose factors the core keeps
// (or that uses none), and as a unit message ahead of them; in every mode whole sealed model keys (another
// package's, altered, sealed on another device).
ActiveResult a13_replay_sealed(PackagePath& package, const train::LoraAdapter& victim, const train::LoraAdapter& other,
                               bool control, Unblinding u = Unblinding::precomputed_sealed);

}  // namespace si::attack
