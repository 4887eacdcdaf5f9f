// S5 as it is deployed: a protected package served through the production path (docs/PACKAGES.md). The owner packs
// the public base and the secret adapter under an owner key with the default policy (no log-probabilities, no
// perplexity, the default sampler bounds), or, for the attacks that query those outputs, a permissive one; a keyserver holding that key releases the model key only to a registered device
// (the software TEE's device files, registered by their quoting key) running an allowed measurement (the worker's);
// the trusted core gets it by attestation, seals it to the device and later sessions unseal it. The host side of the
// harness records the complete boundary trace: every message to and from the trusted core, the accelerator's
// weights, inputs and outputs (SecureSessionParams::trace_messages).
#pragma once
#include <map>
#include <memory>
#include <string>

#include "enclave/package_crypto.h"
#include "host/secure_session.h"

namespace si {
class EnclaveHost;
class KeyServer;
class KeyService;
}  // namespace si

namespace si::train {
struct LoraAdapter;
}

namespace si::attack {

// How the trusted core unblinds decode steps: online (W r computed in the enclave at each crossing), or from
// precomputed factors kept inside the core, or sealed (AES-256-GCM) and stored by the host.
enum class Unblinding { online, precomputed_inside, precomputed_sealed };
const char* unblinding_name(Unblinding u);  // "online", "precomputed (kept inside)", "precomputed (sealed outside)"

// The owner's release policy a package is packed with (PackOptions::release_logprobs, release_nll): the default
// (sampled tokens only: no log-probabilities, no perplexity), or a permissive one releasing the top-K
// log-probabilities of the whole vocabulary and log-likelihood evaluation (`pack --release-logprobs V
// --release-nll`), which the A6 and A7 variants that query those outputs need. The sampler bounds are the default.
enum class ReleasePolicy { owner_default, permissive };
const char* release_policy_name(ReleasePolicy p);  // "owner's default (tokens only)", "permissive (...)"

class PackagePath {
public:
    // model / tokenizer: the public base files; dir: where the owner key, packages, device files and sealed keys go.
    // host: the enclave host (the worker by default; a missing worker is an error then).
    PackagePath(std::string model, std::string tokenizer, std::string dir, EnclaveHostKind host, int threads);
    ~PackagePath();
    PackagePath(const PackagePath&) = delete;
    PackagePath& operator=(const PackagePath&) = delete;

    // The package of this adapter under this release policy (packed on first use; adapters are told apart by their
    // address; each policy is its own package, with its own model identity and key).
    std::shared_ptr<const Package> package(const train::LoraAdapter& adapter,
                                           ReleasePolicy policy = ReleasePolicy::owner_default);
    // That package's public model in f32 (zeros for its secret base tensors), materialised from its source on first
    // use: the harness reads and perturbs dense weights.
    const ModelWeights& public_weights(const train::LoraAdapter& adapter,
                                       ReleasePolicy policy = ReleasePolicy::owner_default);
    // Session parameters serving that package: the keyserver's URL, the device, the sealed key file, the mode.
    SecureSessionParams params(const train::LoraAdapter& adapter, Unblinding u,
                               ReleasePolicy policy = ReleasePolicy::owner_default) const;
    const std::string& keyserver_url() const { return url_; }
    const std::string& device_dir() const { return device_; }
    const std::string& dir() const { return dir_; }
    EnclaveHostKind host() const { return host_; }
    // Keys released by the keyserver so far (a sealed key spares later sessions the release).
    int releases() const { return releases_; }
    // Where the sealed model key of this adapter's package lies (written by the first session).
    std::string sealed_key_path(const train::LoraAdapter& adapter,
                                ReleasePolicy policy = ReleasePolicy::owner_default) const;
    // The measurement the keyserver allows (the core that serves here) and a fresh enclave host of that kind on
    // this device (for attacks that stand between the session and the core).
    const pkg::Hash& measurement() const { return measurement_; }
    std::shared_ptr<EnclaveHost> make_host() const;
    // Scoring and the attacks' controls only: the owner key, the model key of a package and the registered
    // device's quoting public key.
    pkg::Key owner_key() const;
    std::vector<uint8_t> model_key(const train::LoraAdapter& adapter) const;
    const pkg::PubKey& device_quoting_key() const { return quoting_; }

private:
    std::string model_, tokenizer_, dir_, device_, owner_file_, url_;
    EnclaveHostKind host_;
    int threads_;
    std::unique_ptr<KeyService> service_;
    std::unique_ptr<KeyServer> server_;
    using Key = std::pair<const train::LoraAdapter*, ReleasePolicy>;
    std::map<Key, std::shared_ptr<const Package>> packages_;
    std::map<Key, std::string> sealed_;
    std::map<Key, ModelWeights> public_;
    int releases_ = 0;
    pkg::Hash measurement_{};
    pkg::PubKey quoting_{};
};

}  // namespace si::attack
