// Protected model packages (docs/PACKAGES.md): one file holding a model's public tensors in the clear (a GGUF,
// the accelerator's input) and its secret tensors (LoRA adapters, and any base tensor the owner marks secret)
// encrypted with AES-256-GCM under per-tensor keys derived from the model key, behind an authenticated manifest.
// The layout and the key derivations are in enclave/package_crypto.h.
//
// The host opens a package without any key: it checks the structure, the format version and the sha256 of every
// part, and loads the public model (with zero placeholders where secret tensors go). Only the trusted core
// authenticates the manifest (it needs the model key) and decrypts the secret tensors.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "enclave/package_crypto.h"
#include "formats/model_file.h"

namespace si {

// ---- owner keys --------------------------------------------------------------------------------------------------

// A fresh owner key from the OS CSPRNG.
pkg::Key generate_owner_key();
// Text file "secureinfer-owner-key v1 <64 hex digits>\n", created with mode 0600; refuses to overwrite.
void write_owner_key(const std::string& path, const pkg::Key& key);
pkg::Key read_owner_key(const std::string& path);  // Status::io / Status::format

// ---- packing -----------------------------------------------------------------------------------------------------

struct PackOptions {
    std::string base;       // model file (GGUF or llama2.c checkpoint)
    std::string tokenizer;  // tokenizer.bin for llama2.c checkpoints ("" to look beside the model)
    std::vector<std::string> loras;  // LoRA adapters (llama.cpp GGUF); several are stacked along the rank
    float lora_scale = 1.0f;
    // "lora": only the adapters are secret; "all": every tensor; otherwise comma-separated GGUF tensor names
    // (the adapters are always secret).
    std::string secret = "lora";
    std::string name;  // model name in the manifest (default: the base file's name)
    // What the trusted core may release besides sampled tokens (enforced inside it): the largest top-K of
    // log-probabilities per token (0: none), and log-likelihood evaluation (perplexity). Both are oracles on the
    // model's outputs (docs/SECURITY-EVAL.md, A6), so neither is allowed by default.
    int release_logprobs = 0;
    bool release_nll = false;
    // Bounds on the sampler settings a host or API client may ask for (enforced inside the trusted core).
    pkg::SamplingPolicy sampling;
    // Called with (secret tensors encrypted, their number) as they are encrypted; may be empty.
    std::function<void(int done, int total)> progress;
};

struct PackResult {
    pkg::ModelId model_id{};
    uint64_t file_bytes = 0, public_bytes = 0, secret_bytes = 0;
    size_t n_public = 0, n_secret = 0;
};

// Writes the package atomically. Throws si::Error naming the input at fault.
PackResult write_package(const std::string& out_path, const PackOptions& options, const pkg::Key& owner_key);

// ---- opening -----------------------------------------------------------------------------------------------------

// Whether the file starts with the package magic.
bool is_package_file(const std::string& path);

class Package {
public:
    struct SecretTensor {
        std::string name;
        pkg::SecretEntry entry;
        std::vector<std::span<const uint8_t>> chunks;  // ciphertext | tag, one per chunk
    };

    // Reads and checks a package: header and format version, manifest structure, that every part and every
    // secret tensor lies inside the file, and (check_hashes) the sha256 of every part and secret tensor. Errors
    // (si::Error) say what is wrong: Status::format for damage, Status::unsupported for another format version,
    // Status::integrity for a hash mismatch. check_hashes = false is for tests of the trusted core's own checks.
    static std::shared_ptr<const Package> open(const std::string& path, bool check_hashes = true);

    const std::string& path() const { return path_; }
    const pkg::ModelId& model_id() const { return header_.model_id; }
    uint32_t release() const { return header_.release; }  // pkg::kRelease* bits
    const pkg::SamplingPolicy& sampling() const { return sampling_; }
    // Public tensors whose upload bytes the secret table binds (the core refuses any other).
    size_t bound_public_tensors() const { return n_bound_; }
    // Header | manifest | secret table | MAC: what the trusted core authenticates.
    std::span<const uint8_t> authenticated_prefix() const;
    const std::string& manifest_json() const { return manifest_; }
    // The public model and its vocabulary, lazy (bounded memory): weights.cfg only, the tensors read one at a time
    // from the public part in place through model().source, with zeros in place of the secret base tensors (which
    // are never stored). The source keeps the package's bytes alive.
    const ModelFile& model() const { return model_; }
    // GGUF names of the secret base tensors ({"*"} when every tensor is secret); adapters are not listed.
    const std::vector<std::string>& secret_base_tensors() const { return secret_names_; }
    const std::vector<SecretTensor>& secrets() const { return secrets_; }
    bool has_adapter() const;

private:
    std::string path_;
    // Shared with the public model's reader, which reads the public part in place.
    std::shared_ptr<const std::vector<uint8_t>> bytes_;
    pkg::Header header_;
    pkg::SamplingPolicy sampling_;
    size_t n_bound_ = 0;
    std::string manifest_;
    ModelFile model_;
    std::vector<std::string> secret_names_;
    std::vector<SecretTensor> secrets_;
};

// A readable summary of a package (the `inspect` command): nothing is decrypted.
std::string describe_package(const std::string& path);

}  // namespace si
