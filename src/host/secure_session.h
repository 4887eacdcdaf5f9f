// The untrusted runtime of the partition presets (DESIGN.md section 6): it loads the public model, uploads the
// public int8 base projections to the accelerator, drives the trusted core's stages between the enclave host and
// the accelerator, and keeps statistics and the boundary trace.
//
//   gpu-only      no enclave: the host runs the whole model in plaintext with the same fixed-point products on the
//                 accelerator (mul_mat_int) and the same f32 code for everything else. No secrets, masks or checks;
//                 a model with secret tensors is refused unless `insecure` is set (benchmarking only).
//   enclave-only  everything inside the trusted core; nothing is offloaded.
//   secureinfer   the trusted core offloads the public base projections q, k, v, o, w1, w2, w3 on masked inputs
//                 and checks every product (Freivalds); secret projections are computed inside.
// All three use the same integer arithmetic for the projections (int8 weights x b-bit activations, exact int32),
// so their logits, and with them greedy tokens and NLLs, are bit-identical.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/sampler.h"

namespace si {

class Accelerator;
class EnclaveHost;
class TensorSource;
class Package;
class ThreadPool;
class TraceWriter;
namespace train {
struct LoraAdapter;
}

enum class SecureMode { gpu_only, enclave_only, secureinfer };
const char* secure_mode_name(SecureMode m);  // "gpu-only", "enclave-only", "secureinfer"
std::optional<SecureMode> parse_secure_mode(const std::string& s);

enum class EnclaveHostKind { automatic, inprocess, worker };

// How the trusted core obtains the model key of a protected package (docs/PACKAGES.md). Tried in this order: the
// sealed key (when sealed_key_path names an existing file), the keyserver, the owner key file.
struct PackageKeySource {
    std::string keyserver_url;    // attestation-gated release: "http://127.0.0.1:8377"
    std::string owner_key_file;   // development only: the owner key is read by this (untrusted) process
    std::string sealed_key_path;  // unseal from here if the file exists; after a release, seal the key to here
    std::string device_dir;       // the software TEE's device files; empty: tee::default_device_dir()
};

struct SecureSessionParams {
    SecureMode mode = SecureMode::secureinfer;
    int n_ctx = 0;      // 0: the model's context length
    int n_batch = 512;  // tokens per forward pass (lowered when a crossing would not fit one message)
    int n_threads = 0;  // host and accelerator threads (0: all CPUs)
    // Sequence slots (1 .. 1024): one copy of the weights, each slot its own KV cache (growing with use), sampler
    // and context; step() advances several together. The single-sequence calls (eval_sample, eval, reset ...) use
    // slot 0.
    int slots = 1;
    bool insecure = false;  // gpu-only: run a model with secret tensors anyway
    // automatic: the worker process when its executable exists, else in-process with a warning.
    EnclaveHostKind host = EnclaveHostKind::automatic;
    std::string worker_path;  // empty: the default (next to the executable, or $SI_WORKER)
    // Worker host: start even without memfd_secret or mlock (secrets in ordinary, swappable memory); the worker's
    // measured configuration then says memory=unlocked, which a keyserver's allow-list can refuse.
    bool insecure_memory = false;
    std::string trace_dir;    // non-empty: write the boundary trace there
    // With trace_dir: also every message between the host and the trusted core, both ways, as the bytes that cross
    // (op "enclave.<type>", layer -1, uint8; host/trace.h). Off by default: without a package the host uploads the
    // adapter and secret tensors in the clear, and the accelerator-side trace stays comparable between presets.
    bool trace_messages = false;
    std::string accelerator_backend = "cpu";  // make_accelerator() name: "cpu" or "cuda"
    // Worker host: busy-wait this long on each doorbell before sleeping (a core for lower latency per crossing).
    int worker_spin_us = 0;
    // Worker host, >= 0: the thread that constructs the session and the worker's serving thread both run on this
    // CPU only, so that the doorbells switch threads on one CPU (WorkerOptions::serve_cpu). The constructing
    // thread keeps that affinity; it must be the thread that then calls the session. -1: no pinning.
    int pin_cpu = -1;
    // precompute(): unblinding factors the trusted core keeps in its own memory, up to this many bytes (it allows
    // at most 1 GiB); the rest it seals and the session stores in host memory. Kept factors save the opening and
    // the transfer of a sealed unit at every crossing, but occupy enclave memory (on SGX1 the EPC: use 0 there).
    int64_t precompute_inside_bytes = int64_t(256) << 20;
    // Tensors the model declares secret, by GGUF name ("blk.0.attn_q.weight", "token_embd.weight", ...); "*" marks
    // every tensor. LoRA adapter tensors are always secret.
    std::vector<std::string> secret_tensors;
    const train::LoraAdapter* lora = nullptr;  // applied as W0 x + scale * B (A x); must outlive the constructor
    // A protected package: the weights argument is its public model (zeros where secret tensors go); its secret
    // tensors go into the trusted core encrypted, after the core obtained the model key from `key`.
    std::shared_ptr<const Package> package;
    PackageKeySource key;
    float lora_scale = 1.0f;
    int logprobs = 0;            // top-K log-probabilities released with each sampled token
    float logprob_noise = 0.0f;  // standard deviation of the Gaussian noise added to them before release
    // Injected parts (tests): used instead of the CPU backend / the host chosen above when set.
    std::shared_ptr<Accelerator> accelerator;
    std::shared_ptr<EnclaveHost> enclave_host;
    // Loading: called with (layers uploaded, layers + 1) as the model goes into the enclave, the last call when the
    // plan is set up.
    std::function<void(int done, int total)> load_progress;
};

struct DomainStats {
    double seconds = 0.0;
    double flops = 0.0;  // nominal: 2 per multiply-add
};

struct SessionStats {
    uint64_t enclave_calls = 0;      // ECALLs
    uint64_t crossings = 0;          // offload round trips (enclave -> accelerator -> enclave); gpu-only: stages
    uint64_t accelerator_calls = 0;  // products run on the accelerator
    uint64_t bytes_to_enclave = 0, bytes_from_enclave = 0;
    uint64_t bytes_to_accelerator = 0, bytes_from_accelerator = 0;
    DomainStats enclave, accelerator, host;
    // Offline unblinding factors (secureinfer precompute): wall time and enclave work, kept apart from the online
    // counters above, and the token positions precomputed.
    DomainStats offline;
    uint64_t precomputed_tokens = 0;
};

struct TokenLogprob {
    int32_t token = 0;
    float logprob = 0.0f;
};

// A process's peak resident memory in KiB (VmHWM of /proc/PID/status; pid 0: this process), -1 if unreadable.
long peak_rss_kib(int pid = 0);

// An upper bound of the bytes the trusted core keeps in secret memory for this model: every weight at up to 5 bytes
// (f32 copies, int8 rows and their keys), the KV cache, a batch's activations, the adapters, the kept
// precomputed factors and 64 MiB for the rest (OpenSSL, the sampler); at least 64 MiB, at most
// kMaxSecretArenaBytes. The worker's secret arena is reserved at this size.
size_t secret_working_set(const ModelConfig& cfg, int n_ctx, int n_batch, int64_t precompute_inside_bytes,
                          size_t adapter_bytes, int slots = 1);

// One slot's part of a step: tokens appended to the slot's sequence (a decode token, or a prompt chunk), and
// whether to sample the token that follows them.
struct SlotStep {
    int slot = 0;
    std::span<const int32_t> tokens;
    bool sample = true;
};

class SecureSession {
public:
    // Throws si::Error: Status::security when the plan would put a secret tensor on the accelerator (gpu-only
    // without insecure), Status::invalid_argument for bad parameters, or the enclave's own errors.
    SecureSession(const ModelWeights& weights, SecureSessionParams params);
    // Bounded memory: the model's tensors are read one at a time from `source` (only during construction), each
    // projection quantised once and handed to the trusted core and the accelerator, its f32 rows and int8 copy
    // freed at once; no f32 copy of the model is made. Tokens are identical to the constructor above given the
    // same values.
    SecureSession(const TensorSource& source, SecureSessionParams params);
    // The same; gpu-only then keeps no embedding table either: it reads each token's row from the source (a
    // memory-mapped file's pages, generated weights), which the session holds.
    SecureSession(std::shared_ptr<const TensorSource> source, SecureSessionParams params);
    ~SecureSession();
    SecureSession(const SecureSession&) = delete;
    SecureSession& operator=(const SecureSession&) = delete;

    SecureMode mode() const { return params_.mode; }
    const ModelConfig& config() const { return cfg_; }
    int n_ctx() const { return n_ctx_; }
    int n_batch() const { return n_batch_; }
    int pos() const { return pos_; }
    // The isolation of the enclave host in use ("none" for gpu-only) and warnings about weakened protection.
    std::string isolation() const;
    std::vector<std::string> warnings() const;
    // Which projections run on the accelerator: [layer][7], true = offloaded.
    const std::vector<uint8_t>& plan() const { return plan_; }

    void set_sampler(const SamplerParams& p);
    // Feeds tokens at pos() .. and returns the token sampled after the last one; logprobs (may be null) receives
    // the top-K log-probabilities released with it (params.logprobs > 0).
    int32_t eval_sample(std::span<const int32_t> tokens, std::vector<TokenLogprob>* logprobs = nullptr);
    // Feeds tokens without output.
    void eval(std::span<const int32_t> tokens);
    // Feeds tokens and returns the summed NLL of targets[i] given tokens[0..i] (targets[i] < 0: not scored) and
    // the number scored. In the secure modes only this scalar leaves the enclave (an evaluation feature).
    std::pair<double, uint64_t> eval_nll(std::span<const int32_t> tokens, std::span<const int32_t> targets);
    // gpu-only only: logits of the last token or of every token ([n][vocab]); other modes throw Status::security.
    const float* eval_logits(std::span<const int32_t> tokens, bool all_logits);
    void reset();

    // ---- sequence slots (continuous batching) ----
    int slot_count() const { return params_.slots; }
    // The tokens in a slot's KV cache.
    int slot_pos(int slot) const;
    // Bytes the slots' KV caches occupy now (gpu-only: on the host; otherwise inside the trusted core).
    uint64_t kv_bytes() const;
    // One forward pass over the rows of several slots (distinct; at most n_batch() tokens in all): one batched
    // product per crossing, every row with fresh masks (or its own precomputed factors) and checked. Returns, per
    // entry, the sampled token (from that slot's sampler) or -1 where sample is false. Each slot's tokens are
    // exactly those it would get alone. logprobs (may be null) receives, per entry, the released log-probabilities.
    std::vector<int32_t> step(std::span<const SlotStep> batch,
                              std::vector<std::vector<TokenLogprob>>* logprobs = nullptr);
    void set_sampler(int slot, const SamplerParams& p);
    // Forgets a slot's sequence: its KV cache (freed and zeroed), context and sampler state.
    void reset_slot(int slot);

    // secureinfer only: precomputes the unblinding factors W r of the next `tokens` decode steps (single-token
    // passes) for every offloaded stage of every layer. The trusted core returns them sealed (AES-256-GCM); the
    // session keeps them in host memory and hands each back with the crossing that consumes it. Decode steps past
    // the precomputed ones fall back to online unblinding (said once on stderr). progress(done, total) is called
    // after every batch. Time and work go to stats().offline.
    void precompute(int tokens, const std::function<void(int done, int total)>& progress = nullptr);
    // Decode steps for which every offloaded stage still has precomputed factors.
    int precomputed_available() const;
    // Bytes of precomputed factors the trusted core keeps for this session now (the rest are sealed in host memory).
    uint64_t kept_factor_bytes() const { return kept_bytes_; }
    // Bytes of sealed factors (ciphertext and tags) the session holds in host memory, not yet consumed.
    uint64_t sealed_factor_bytes() const;

    // The enclave worker process's peak resident memory in KiB (VmHWM), -1 when the trusted core is not in a worker.
    long worker_peak_rss_kib() const;

    const SessionStats& stats() const { return stats_; }       // since load
    const SessionStats& load_stats() const { return load_; }   // loading the model (uploads)
    void reset_stats() { stats_ = SessionStats{}; }

private:
    struct Gpu;
    class Timer;
    std::vector<uint8_t> call(const std::vector<uint8_t>& request, SessionStats& s);
    // call in two halves (EnclaveHost::start_call); finish_call returns the response, accounted as call does.
    void start_call(const std::vector<uint8_t>& request, SessionStats& s);
    std::vector<uint8_t> finish_call(size_t request_bytes, SessionStats& s);
    void account(size_t request_bytes, const std::vector<uint8_t>& response, SessionStats& s);
    void trace_message(std::span<const uint8_t> bytes, const char* role);
    // Runs f (a host call), its time counted as the enclave's; an integrity failure stops the session.
    void timed_enclave(SessionStats& s, const std::function<void()>& f);
    // The sealed unit (batch seq, index idx) of a crossing slot, or an empty span when the host holds none.
    std::span<const uint8_t> take_unit(int layer, int stage, uint64_t seq, uint32_t idx);
    void init(const TensorSource& src, std::shared_ptr<const TensorSource> keep);
    void load_enclave(const TensorSource& src);
    void load_gpu(const TensorSource& src, std::shared_ptr<const TensorSource> keep);
    void obtain_package_key();
    bool package_secret(uint32_t kind, int layer, int proj) const;
    struct HostProj;
    // Quantises the projections of one layer (n_layers: the classifier) from the source, stage by stage: each goes
    // to the trusted core through to_enclave where enclave_needs says so, and the offloaded ones (plan_) of a stage
    // stacked into one accelerator weight of its crossing slot.
    void stream_projections(const TensorSource& src, int layer, SessionStats& s,
                            const std::function<void(Proj, const int8_t*, const HostProj&)>& to_enclave,
                            const std::function<bool(Proj)>& enclave_needs);
    // The accelerator's weight of a crossing slot, checked against the projections a crossing names.
    struct SlotWeights;
    const SlotWeights& slot_weights(int layer, int stage, std::span<const uint8_t> projs) const;
    std::vector<uint8_t> run_enclave_pass(std::span<const int32_t> tokens, int output, std::span<const int32_t> targets);
    // Answers the trusted core's crossings from `resp` on, until it returns something else (returned).
    std::vector<uint8_t> drive_crossings(std::vector<uint8_t> resp);
    void run_gpu_pass(std::span<const int32_t> tokens);
    void run_gpu_pass(std::span<const SlotStep> batch);
    void check_slot(int slot, const char* what) const;
    void gpu_logits(int t0, int n, float* out);
    void gpu_logits(std::span<const int> rows, float* out);  // the classifier over these rows of the pass, at once
    const char* op_name(int layer, int p) const;
    bool classifier_secret() const;
    void trace_tokens_in(std::span<const int32_t> tokens);
    bool is_secret(const std::string& name) const;

    SecureSessionParams params_;
    ModelConfig cfg_;
    int n_ctx_ = 0, n_batch_ = 0, pos_ = 0;
    std::unique_ptr<ThreadPool> pool_;
    std::shared_ptr<Accelerator> accel_;
    std::shared_ptr<EnclaveHost> host_;
    std::unique_ptr<TraceWriter> trace_;
    std::unique_ptr<Gpu> gpu_;
    std::vector<std::string> warnings_;
    // the public int8 projections' shapes and scales (their int8 rows live only while they load)
    std::vector<HostProj> projs_;  // [layer][7], then the classifier (layer n_layers, slot kClassifierSlot)
    std::vector<SlotWeights> slots_;  // [layer][kStages], then the classifier's slot (layer n_layers, stage qkv)
    bool cfg_tied_ = true;
    std::vector<uint8_t> plan_;
    SessionStats stats_, load_;
    bool failed_ = false;  // an integrity failure ended the session
    // sealed batches of unblinding factors, as the trusted core returned them: [layer][stage], oldest first
    struct SealedBatch {
        uint64_t seq = 0;
        uint32_t count = 0, next = 0;  // units, and the next one to hand back
        size_t unit = 0;               // bytes per unit (0: kept inside the core)
        std::vector<uint8_t> blob;
        uint64_t kept = 0;             // bytes the core keeps for this batch (0: sealed)
    };
    std::vector<std::deque<SealedBatch>> sealed_;
    std::vector<std::vector<uint8_t>> spent_;  // the last units' batches, kept until those units have been sent
    std::vector<int> slot_pos_;                // enclave modes: each slot's position, as the core last said
    bool precomputed_ = false, exhausted_said_ = false;
    uint64_t kept_bytes_ = 0;  // factors kept inside the core, not yet consumed
};

}  // namespace si
