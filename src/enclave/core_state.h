// The trusted core's state, shared by the files that implement it (one responsibility each):
//   core_load.cpp        configure, plaintext uploads, finalize, sampler settings
//   core_provision.cpp   protected packages: attestation, key release, sealing, manifest, encrypted uploads
//   core_crossings.cpp   masked crossings: offload, products, Freivalds checks, precomputed unblinding factors
//   core_slots.cpp       sequence slots: batched steps over several sequences, per-slot reset and sampler
//   trusted_core.cpp     the forward driver (eval, stages, classifier, sampling) and the request dispatch
// Internal to src/enclave: nothing outside the trusted core includes it.
#pragma once
#include <openssl/crypto.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/matmul.h"
#include "common/model.h"
#include "common/qgemm.h"
#include "common/sampler.h"
#include "common/secret_memory.h"
#include "common/staged_forward.h"
#include "common/threadpool.h"
#include "enclave/fixed_point.h"
#include "enclave/freivalds.h"
#include "enclave/mask_stream.h"
#include "enclave/package_crypto.h"
#include "enclave/trusted_core.h"

namespace si {

namespace core {

[[noreturn]] inline void bad(const std::string& why) { fail(Status::invalid_argument, why); }

// One base projection as the core holds it: int8 weights with per-row scales.
struct ProjState {
    int64_t rows = 0, cols = 0;
    bool secret = false;
    bool offload = false;  // decided at finalize: offloading on and not secret
    // During upload, freed at finalize: in secret memory only when the projection is secret (memfd_secret pages
    // cost a TLB shootdown each when first touched, which for a model's public weights would dominate loading).
    MaybeSecretVector<int8_t> raw;
    void allocate_raw() {
        if (raw.empty()) raw = MaybeSecretVector<int8_t>(size_t(rows * cols), MaybeSecretAllocator<int8_t>(secret));
    }
    SecretVector<float> scale;   // [rows]
    // After finalize: for local products and for W r. Packed into secret memory (zeroed when freed) when the
    // projection is secret; a public one is not wiped.
    PackedI8 packed;
    std::optional<FreivaldsKey> key;  // offloaded projections only
};

// Where one row of a crossing takes its precomputed unblinding factors from.
struct PreRow {
    uint64_t seq = 0, offset = 0;  // its batch, and the first mask position of the row
    uint32_t idx = 0, count = 0;   // its position within the batch, and the batch's size
    uint32_t* kept_wr = nullptr;   // kept inside the core: its unit, read in place and erased; null: sealed
};

// The crossing in flight between an offload response and the products request that answers it.
struct Pending {
    bool active = false;
    int layer = 0;
    Stage stage = Stage::qkv;
    uint64_t crossing = 0;
    std::vector<Proj> projs;
    int T = 0;
    int64_t K = 0;
    // offline unblinding: every row's pads come from a precomputed batch (one unit per row); the sealed units of
    // the rows not kept inside must come back, in row order
    bool pre = false;
    std::vector<PreRow> rows;
    uint32_t sealed_rows = 0;
    bool unit_open = false;   // the sealed rows' factors are in pre_plain (or no row is sealed)
    bool classifier = false;  // the classifier crossing after the last block (layer n_layers)
};

// One sequence slot: its KV cache (memory follows use), its sampler and the chained hash of its context.
struct SeqSlot {
    KvCache kv;
    SamplerParams params{0.0f, 0, 1.0f, 0};
    std::unique_ptr<Sampler> sampler;
    pkg::Hash context_hash{};
};

// One sequence's rows in the pass in progress.
struct PassSeg {
    int slot = 0;
    int row0 = 0, n = 0;
    bool sample = false;
    pkg::Hash context_hash{};  // the slot's context after this pass
};

constexpr int kMaxSlots = 1024;

// A batch of precomputed unblinding factors: handed out sealed (the core keeps only this bookkeeping), or kept
// inside the core, unit after unit ([count][rows]: W_p r_t for every projection p of the slot, in order).
struct PreBatch {
    uint64_t seq = 0;     // batch sequence number
    uint64_t offset = 0;  // first mask position of the batch's reserved range
    uint32_t count = 0;   // crossings (token positions) covered
    SecretVector<uint32_t> kept;  // empty when sealed
};
// Per (layer, stage): batches not yet consumed, in order, and the next position within the first.
struct PreSlot {
    std::deque<PreBatch> batches;
    uint32_t next = 0;
};

constexpr size_t kSealKeyBytes = 32, kSealIvBytes = 12, kSealTagBytes = 16;
constexpr uint32_t kMaxPrecomputeCount = 1u << 16;
// Factors kept inside the core, all slots together: enough for a few thousand stories110M or a few hundred TinyLlama
// decode steps; the host seals the rest.
constexpr uint64_t kMaxKeptFactorBytes = uint64_t(1) << 30;

template <class V>
void wipe(V& v) {
    if (!v.empty()) OPENSSL_cleanse(v.data(), v.size() * sizeof(typename V::value_type));
}

}  // namespace core

struct TrustedCore::Impl {
    using Encoder = wire::Encoder;
    using Message = wire::Message;
    using MsgType = wire::MsgType;
    using Tag = wire::Tag;
    using TensorKind = wire::TensorKind;
    using WireType = wire::WireType;
    using ProjState = core::ProjState;
    using Pending = core::Pending;
    using PreBatch = core::PreBatch;
    using PreSlot = core::PreSlot;
    using SeqSlot = core::SeqSlot;
    using PassSeg = core::PassSeg;

    enum class Phase { fresh, loading, ready };
    Phase phase = Phase::fresh;
    std::unique_ptr<ThreadPool> pool;  // on the platform's parallel_for OCALL; null: the calling thread only
    ModelConfig cfg;
    int n_ctx = 0;
    bool offload_mode = false;
    bool tied = true;
    // The accelerator runs on this core's CPUs (the host says so): single-token products stay on the calling
    // thread, since the pool's threads would compete with the accelerator's between the steps of a decode.
    bool serial_decode = false;
    std::unique_ptr<StagedForward> fw;
    std::vector<ProjState> projs;  // [layer][7], then the classifier (layer n_layers, slot kClassifierSlot)
    std::map<uint64_t, uint64_t> received;  // tensor key -> elements received so far (uploads arrive in order)

    std::unique_ptr<MaskStream> masks;  // one-time pads of the crossings
    std::unique_ptr<MaskStream> noise;  // randomness for the log-probability noise
    std::vector<SeqSlot> seqs;          // sequence slots; eval, reset and sampler without a slot use slot 0
    uint64_t kv_limit = 0;              // bytes all slots' KV caches may occupy together
    std::vector<PassSeg> pass;          // the sequences of the pass in progress
    bool stepping = false;              // the pass is a step (answered per slot), not an eval
    int logprobs_k = 0;
    float logprob_noise = 0.0f;
    uint32_t release_policy = 0;  // a package's owner policy (pkg::kRelease*); only read when `package`

    Pending pending;
    uint64_t crossings = 0;
    wire::OutputKind output = wire::OutputKind::none;
    std::vector<int32_t> targets;

    // secret scratch of the current stage
    SecretVector<int32_t> xq, acc;
    SecretVector<float> xs, logits, cls_in;
    std::vector<int> cls_rows;  // tokens of the pass whose logits are computed, in order
    SecretVector<uint32_t> r, wr;

    // offline unblinding factors (DESIGN.md section 5)
    SecretVector<uint8_t> seal_key;  // AES-256-GCM key: random per core, never leaves it
    std::vector<PreSlot> pre;        // [layer][kStages], then the classifier's slot (layer n_layers, stage qkv)
    uint64_t batch_seq = 0;          // last batch sequence number handed out
    uint64_t kept_bytes = 0;         // factors kept inside (PreBatch::kept), all slots
    std::vector<SecretVector<uint32_t>> kept_last;  // kept batches whose last units the pending crossing still uses
    SecretVector<uint32_t> pre_r, pre_wr;
    SecretVector<uint8_t> pre_plain;
    pkg::GcmOpener unit_opener;      // one context for every crossing's sealed unit (its key schedule is cleansed)

    uint64_t flops = 0;  // integer and float work outside StagedForward
    uint64_t flops_reported = 0;

    // protected packages (docs/PACKAGES.md): the platform's identity, the released model key, the verified
    // package's secret tensors and how many chunks of each have been opened
    bool has_platform = false;
    std::string quote_type;
    pkg::Hash measurement{};
    SecretVector<uint8_t> sealing_key;
    int (*quote_fn)(void*, const uint8_t*, size_t, uint8_t*, size_t, size_t*) = nullptr;
    void* quote_ctx = nullptr;
    std::optional<pkg::X25519Pair> eph;  // the ephemeral key of the attestation in progress
    pkg::Nonce attest_nonce{};
    SecretVector<uint8_t> model_key;     // empty until released or unsealed
    pkg::ModelId model_id{};
    bool package = false;                // a verified manifest is in force
    std::vector<pkg::SecretEntry> table;
    std::vector<uint32_t> table_next;
    // the public model the manifest binds: per tensor key, its upload's length and SHA-256, hashed as it arrives
    struct BoundTensor {
        BoundTensor(uint64_t b, const pkg::Hash& h) : bytes(b), digest(h) {}
        uint64_t bytes = 0, seen = 0;
        pkg::Hash digest{};              // pkg::public_tensor_digest, from the manifest
        std::vector<pkg::Hash> leaves;   // of the leaves complete so far
        pkg::Sha256Stream partial;       // the leaf in progress, partial_fill bytes into it
        size_t partial_fill = 0;
    };
    std::map<uint64_t, BoundTensor> bound;
    pkg::SamplingPolicy sampling_policy;
    // Package draws: the sampler is reseeded for each token from a PRF of the request's seed and settings and of
    // the context, under a key derived from the sealing key (the host can neither predict nor steer the draws).
    SecretVector<uint8_t> draw_key;

    ProjState& proj(int layer, Proj p) { return projs[size_t(layer) * 7 + size_t(p)]; }
    // The threads of a product over T tokens.
    ThreadPool* loop_pool(int64_t T) const { return T == 1 && serial_decode ? nullptr : pool.get(); }

    static uint64_t tensor_key(TensorKind k, int layer, int p) {
        return (uint64_t(k) << 40) | (uint64_t(uint32_t(layer)) << 8) | uint64_t(uint32_t(p) & 0xff);
    }

    bool complete(TensorKind k, int l, int p, uint64_t n) const {
        const auto it = received.find(tensor_key(k, l, p));
        return it != received.end() && it->second == n;
    }

    void require_platform(const char* what) const {
        if (!has_platform)
            fail(Status::unsupported, std::string(what) + ": this enclave host provides no platform (measurement, "
                                                          "sealing key, quoting); use the worker host");
    }

    int secret_entry(uint32_t kind, int layer, int p) const {
        for (size_t i = 0; i < table.size(); ++i)
            if (table[i].kind == kind && table[i].layer == layer && table[i].proj == p) return int(i);
        return -1;
    }

    uint64_t take_flops() {
        const uint64_t total = flops + (fw ? fw->flops() : 0);
        const uint64_t delta = total - flops_reported;
        flops_reported = total;
        return delta;
    }

    std::vector<uint8_t> ok() {
        Encoder e(MsgType::ok);
        e.scalar<int32_t>(Tag::pos, seqs.empty() ? 0 : seqs[0].kv.pos());
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    // configuration and plaintext uploads (core_load.cpp)
    void configure(const Message& m);
    void upload(const Message& m);
    std::vector<uint8_t> finalize();
    void set_sampler(const Message& m);
    uint64_t accept_chunk(uint64_t key, uint64_t offset, uint64_t n, uint64_t total, uint64_t expected_total,
                          const std::string& what);

    // protected packages (core_provision.cpp)
    std::vector<uint8_t> attest(const Message& m);
    std::vector<uint8_t> seal_model_key();
    std::vector<uint8_t> release(const Message& m);
    void unseal(const Message& m);
    bool package_secret(TensorKind kind, const Message& m) const;
    void manifest(const Message& m);
    static bool secret_entry_in(const std::vector<pkg::SecretEntry>& t, size_t before, uint32_t kind, int layer, int p);
    void upload_secret(const Message& m);
    void check_bound_config(const pkg::BoundConfig& want) const;
    void bind_chunk(uint64_t key, const std::string& what, const void* data, size_t bytes, bool last);
    void check_sampling_policy(const SamplerParams& p, int k, float noise) const;
    uint64_t draw_seed(const SamplerParams& p, const pkg::Hash& context) const;

    // masked crossings and unblinding factors (core_crossings.cpp)
    void erase_kept_units(uint64_t total);
    std::vector<uint8_t> send_offload(int l, Stage st, std::vector<Proj> off, int T, int64_t K, bool classifier);
    uint64_t check_answers_pending(const Message& m, const char* what);
    std::vector<uint8_t> unit(const Message& m);
    std::vector<uint8_t> products(const Message& m);
    void open_unit(const Message& m, uint64_t words);
    std::vector<uint8_t> precompute(const Message& m);

    // sequence slots (core_slots.cpp)
    int slot_of(const Message& m, const char* what) const;
    std::vector<uint8_t> step(const Message& m);
    std::vector<uint8_t> reset_slot(const Message& m);
    void begin_pass(std::span<const int32_t> tokens);
    std::vector<uint8_t> finish_step();

    // forward passes (trusted_core.cpp)
    void abandon();
    std::vector<uint8_t> eval(const Message& m);
    std::vector<uint8_t> run();
    std::vector<uint8_t> classify();
    std::vector<uint8_t> finish_pass();
    void release_logprobs(const float* lg, std::vector<int32_t>& ids, std::vector<float>& values);
    double gaussian();
    std::vector<uint8_t> reset();
    void wipe_all();
};

}  // namespace si
