// The schemes under test (DESIGN.md section 8), selectable like the partition presets:
//
//   S0  plaintext offload: the fine-tuned projections (base + LoRA, merged) run on the accelerator on plaintext
//       activations. What a fine-tune gets with no protection at all.
//   S1  permutation + scaling obfuscation of the fine-tuned weights (ShadowNet / TransLinkGuard style): each
//       offloaded matrix is P_out diag(s) W P_in^T with secret row and column permutations, secret per-row scales
//       and extra fake rows; the input crosses permuted with P_in; the enclave undoes the output permutation and the
//       scales and drops the fake rows.
//   S2  float additive masks: the public base projections run on x + n with fresh Gaussian n (standard deviation
//       sigma times the token's activation RMS); the enclave subtracts W n and adds the LoRA update.
//   S3  static masks: the fixed-point, mod 2^32 scheme of S5, but with masks drawn from a small precomputed pool
//       (the same pool in every session, from a fixed seed) and reused cyclically.
//   S5  secureinfer itself: the production SecureSession in the `secureinfer` preset (one-time AES-CTR pads,
//       Freivalds checks), through the enclave host of the build (the hardened worker process when available).
//
// S0 to S3 are simulated here, on the same staged forward pass the trusted core uses (common/staged_forward.h),
// and write their boundary trace in the format of DESIGN.md section 7 (index.jsonl + one .npy per tensor, roles
// weight / input / output). S5 writes the trace through SecureSession's own TraceWriter (`run --trace`), so the
// attacks see exactly what the production host sees.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "attack/linalg.h"
#include "attack/package_path.h"
#include "common/model.h"
#include "host/secure_session.h"
#include "train/lora.h"

namespace si {
class StagedForward;
class TraceWriter;
}  // namespace si

namespace si::attack {

enum class Scheme { s0, s1, s2, s3, s5 };
inline constexpr Scheme kAllSchemes[] = {Scheme::s0, Scheme::s1, Scheme::s2, Scheme::s3, Scheme::s5};
const char* scheme_name(Scheme s);         // "S0" .. "S5"
const char* scheme_description(Scheme s);  // one line
std::optional<Scheme> parse_scheme(const std::string& s);  // "S0" / "s0" / "S5" / "secureinfer"

struct SchemeOptions {
    uint64_t seed = 1;            // the scheme's secrets: S1's permutations, scales and fake rows; S2's noise
    double s1_fake_rows = 0.25;   // S1: fake rows added, as a fraction of the real ones
    double s2_sigma = 1.0;        // S2: mask standard deviation relative to each token's activation RMS
    int s3_pool = 4;              // S3: precomputed masks per crossing slot, reused cyclically
    uint64_t s3_seed = 0x5eedULL; // S3: the fixed seed of the precomputed pool (the same in every session)
    int threads = 1;              // S5: host and accelerator threads
    EnclaveHostKind host = EnclaveHostKind::automatic;  // S5: the enclave host
    std::shared_ptr<Accelerator> accelerator;           // S5: injected accelerator (A8)
    int logprobs = 0;             // S5: released top-K log-probabilities
    float logprob_noise = 0.0f;
    // S5 on the production package path (attack/package_path.h): the adapter served from its package, the model key
    // from the keyserver (or the sealed key), decode steps unblinded as `unblinding` says, and the trace holding every
    // message to and from the trusted core. Null: the adapter is loaded from the host's file (SecureSessionParams::lora).
    std::shared_ptr<PackagePath> package;
    Unblinding unblinding = Unblinding::online;
    // The package's release policy: the owner's default, or the permissive one the A6 / A7 variants that release
    // log-probabilities or NLLs are served under.
    ReleasePolicy policy = ReleasePolicy::owner_default;
    // S5: tokens sampled (temperature 1, seeded per prompt from `seed`) after each prompt, so that the trace holds
    // real output; 0: each prompt is one pass without output.
    int generate = 0;
};

// A hook on every product an accelerator returns in the simulated schemes (A8): index of the product since the
// session started, and its result as 32-bit words (float bits for S0-S2, mod 2^32 words for S3), changeable.
using ProductHook = std::function<void(int64_t index, uint32_t* words, size_t n)>;

// A simulated weak scheme (S0-S3): the host side and the "enclave" side of the offload of one session.
class WeakSession {
public:
    WeakSession(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter, float lora_scale,
                const SchemeOptions& options, const std::string& trace_dir);
    ~WeakSession();
    WeakSession(const WeakSession&) = delete;
    WeakSession& operator=(const WeakSession&) = delete;

    void reset();
    // Feeds tokens at pos(); returns the logits of the last one.
    std::vector<float> eval(std::span<const int32_t> tokens);
    void set_product_hook(ProductHook h) { hook_ = std::move(h); }
    int64_t products() const { return products_; }

private:
    struct Slot;  // the offloaded form of one projection
    void run_stage();
    Scheme scheme_;
    ModelConfig cfg_;
    SchemeOptions opt_;
    std::unique_ptr<StagedForward> fw_;
    std::unique_ptr<TraceWriter> trace_;
    std::vector<Slot> slots_;  // [layer][7]
    std::vector<std::vector<int>> perm_in_;              // S1: [layer * 4 + stage] column permutation
    std::vector<std::vector<uint32_t>> pool_;            // S3: [layer * 4 + stage] pool_ masks of K words
    std::vector<uint64_t> pool_next_;                    // S3: next mask per slot
    SplitMix noise_;
    ProductHook hook_;
    int64_t products_ = 0;
};

// S5 on the package path with precomputed unblinding: precomputes the unblinding factors of the next `positions`
// positions of a session of these options (a prompt pass takes one unit per position when enough are left, a decode
// step one); nothing otherwise. The callers precompute every position they then feed (prompt and decode steps),
// so that every crossing of the session is unblinded from precomputed factors.
void precompute_steps(SecureSession& s, const SchemeOptions& options, int tokens);

// Runs each prompt from position 0 as one pass (eval, no output) under `scheme` and writes the boundary trace to
// dir. S5 goes through the production SecureSession (trace_dir); returns the enclave host's isolation for S5 and
// "simulated (no enclave host)" for S0-S3.
std::string run_scheme(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter,
                       const std::vector<std::vector<int32_t>>& prompts, const std::string& dir,
                       const SchemeOptions& options);

// The secret the attacks try to recover, for scoring only (never given to an attack): the LoRA delta
// scale * (alpha / rank) * B A of one projection, [rows][cols] (zeros when the adapter does not touch it).
Mat lora_delta(const train::LoraAdapter& adapter, const ModelConfig& cfg, int layer, Proj p, float scale = 1.0f);
// A projection of the public base, [rows][cols].
Mat base_projection(const ModelWeights& w, int layer, Proj p);

}  // namespace si::attack
