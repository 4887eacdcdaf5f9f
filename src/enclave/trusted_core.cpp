#include "enclave/trusted_core.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <string>

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

namespace si {

namespace {

using wire::Encoder;
using wire::Message;
using wire::MsgType;
using wire::Tag;
using wire::TensorKind;
using wire::WireType;

[[noreturn]] void bad(const std::string& why) { fail(Status::invalid_argument, why); }

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

// The crossing in flight between an offload response and the products request that answers it.
struct Pending {
    bool active = false;
    int layer = 0;
    Stage stage = Stage::qkv;
    uint64_t crossing = 0;
    std::vector<Proj> projs;
    int T = 0;
    int64_t K = 0;
    // offline unblinding: the crossing's pads come from a precomputed batch, whose sealed unit must come back
    bool pre = false;
    uint64_t pre_seq = 0, pre_offset = 0;
    uint32_t pre_idx = 0, pre_count = 0;
    bool unit_open = false;   // its factors are in pre_plain: kept inside, or a sealed unit sent ahead (MsgType::unit)
    bool kept = false;        // its factors were kept inside the core (no sealed unit belongs to it), at kept_wr
    uint32_t* kept_wr = nullptr;
    bool classifier = false;  // the classifier crossing after the last block (layer n_layers)
};

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

// Associated data of one sealed unit: binds it to its crossing slot, mask range and place in its batch.
std::vector<uint8_t> seal_aad(int layer, Stage st, uint64_t offset, uint32_t count, uint64_t seq, uint32_t idx,
                              int64_t K) {
    std::vector<uint8_t> a;
    auto put = [&](uint64_t v, int bytes) {
        for (int i = 0; i < bytes; ++i) a.push_back(uint8_t(v >> (8 * i)));
    };
    put(0x5349554eu, 4);  // "NUIS": domain separation
    put(uint32_t(layer), 4);
    put(uint8_t(st), 1);
    put(offset, 8);
    put(count, 4);
    put(seq, 8);
    put(idx, 4);
    put(uint64_t(K), 8);
    return a;
}

// The GCM nonce of a unit: (seq, idx) never repeats under one key, as seq only grows.
void seal_iv(uint64_t seq, uint32_t idx, uint8_t (&iv)[kSealIvBytes]) {
    for (int i = 0; i < 8; ++i) iv[i] = uint8_t(seq >> (8 * i));
    for (int i = 0; i < 4; ++i) iv[8 + i] = uint8_t(idx >> (8 * i));
}

// The sealed factors use the packages' AES-256-GCM (same IV and tag sizes): ciphertext | tag.
static_assert(kSealIvBytes == pkg::kIvBytes && kSealTagBytes == pkg::kTagBytes);

template <class V>
void wipe(V& v) {
    if (!v.empty()) OPENSSL_cleanse(v.data(), v.size() * sizeof(typename V::value_type));
}

}  // namespace

struct TrustedCore::Impl {
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
    std::unique_ptr<Sampler> sampler;
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
    SecretVector<uint32_t> kept_last;  // a kept batch whose last unit the pending crossing still uses
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

    ProjState& proj(int layer, Proj p) { return projs[size_t(layer) * 7 + size_t(p)]; }
    // The threads of a product over T tokens.
    ThreadPool* loop_pool(int64_t T) const { return T == 1 && serial_decode ? nullptr : pool.get(); }

    // ---- configuration and uploads -------------------------------------------------------------------------

    void configure(const Message& m) {
        if (phase != Phase::fresh) bad("configure: the core is already configured");
        const auto ints = m.array<int32_t>(Tag::cfg_ints, 8);
        const auto floats = m.array<float>(Tag::cfg_floats, 2);
        ModelConfig c;
        c.dim = ints[0];
        c.hidden_dim = ints[1];
        c.n_layers = ints[2];
        c.n_heads = ints[3];
        c.n_kv_heads = ints[4];
        c.vocab_size = ints[5];
        c.seq_len = ints[6];
        c.rope_theta = floats[0];
        c.norm_eps = floats[1];
        c.validate("configure");
        if (!std::isfinite(c.rope_theta) || !std::isfinite(c.norm_eps)) bad("configure: non-finite rope theta or norm epsilon");
        const int ctx = ints[7];
        if (ctx < 1 || ctx > c.seq_len)
            bad("configure: context length " + std::to_string(ctx) + " out of range [1, " + std::to_string(c.seq_len) + "]");
        const uint8_t off = m.scalar<uint8_t>(Tag::offload), t = m.scalar<uint8_t>(Tag::tied);
        const uint8_t serial = m.has(Tag::serial_decode) ? m.scalar<uint8_t>(Tag::serial_decode) : 0;
        if (off > 1 || t > 1 || serial > 1) bad("configure: offload, tied and serial_decode must be 0 or 1");
        activation_bits(std::max(c.dim, c.hidden_dim));  // refuses inner dimensions without exact int32 products

        // Everything this model will need, counted before anything is allocated.
        const uint64_t d = uint64_t(c.dim), h = uint64_t(c.hidden_dim), kv = uint64_t(c.kv_dim()),
                       v = uint64_t(c.vocab_size), L = uint64_t(c.n_layers), T = uint64_t(ctx);
        const uint64_t proj_elems = L * (2 * d * d + 2 * kv * d + 3 * d * h);
        const uint64_t proj_rows = L * (2 * d + 2 * kv + 3 * h);
        uint64_t bytes = v * d * 4 + (2 * L + 1) * d * 4;  // embeddings, norms
        bytes += 2 * v * d + v * 8 + 12 * (v + d);            // int8 classifier: raw + packed, scales, Freivalds key
        bytes += T * v * 4 + T * d * 4;                       // logits and classifier inputs of a pass
        bytes += 2 * proj_elems + proj_rows * 8;                           // raw + packed weights, scales, row sums
        bytes += 12 * (proj_rows + L * (6 * d + h));                        // Freivalds keys: s and u, 3 limbs each
        bytes += 2 * L * T * kv * 4;                                       // KV cache
        bytes += T * (6 * d + 2 * kv + 3 * h) * 4 + T * std::max(d, h) * 16;  // pass and crossing scratch
        if (bytes > SI_TRUSTED_CORE_MAX_BYTES)
            fail(Status::out_of_memory, "configure: the model needs about " + std::to_string(bytes >> 20) +
                                            " MiB inside the trusted core, more than its limit of " +
                                            std::to_string(uint64_t(SI_TRUSTED_CORE_MAX_BYTES) >> 20) + " MiB");

        cfg = c;
        n_ctx = ctx;
        offload_mode = off == 1;
        tied = t == 1;
        serial_decode = serial == 1;
        // the core never holds an f32 classifier: it is the int8 base projection at layer n_layers
        fw = std::make_unique<StagedForward>(cfg, n_ctx, true, nullptr);
        projs = std::vector<ProjState>(size_t(cfg.n_layers) * 7 + 1);
        proj(cfg.n_layers, kClassifierSlot).rows = cfg.vocab_size;
        proj(cfg.n_layers, kClassifierSlot).cols = cfg.dim;
        for (int l = 0; l < cfg.n_layers; ++l)
            for (Proj p : kAllProj) {
                const ProjShape s = proj_shape(cfg, p);
                proj(l, p).rows = s.rows;
                proj(l, p).cols = s.cols;
            }
        masks = std::make_unique<MaskStream>();
        noise = std::make_unique<MaskStream>();
        seal_key.assign(kSealKeyBytes, 0);
        if (RAND_priv_bytes(seal_key.data(), int(kSealKeyBytes)) != 1)
            fail(Status::internal, "configure: no randomness for the sealing key");
        pre.assign(size_t(cfg.n_layers + 1) * kStages, PreSlot{});
        batch_seq = 0;
        sampler = std::make_unique<Sampler>(SamplerParams{0.0f, 0, 1.0f, 0});
        phase = Phase::loading;
    }

    static uint64_t tensor_key(TensorKind k, int layer, int p) {
        return (uint64_t(k) << 40) | (uint64_t(uint32_t(layer)) << 8) | uint64_t(uint32_t(p) & 0xff);
    }

    // Accepts a chunk [offset, offset + n) of a tensor of `total` elements: chunks must come in order.
    uint64_t accept_chunk(uint64_t key, uint64_t offset, uint64_t n, uint64_t total, uint64_t expected_total,
                          const std::string& what) {
        if (total != expected_total)
            bad("upload " + what + ": total of " + std::to_string(total) + " elements, expected " +
                std::to_string(expected_total));
        const uint64_t have = received.count(key) ? received[key] : 0;
        if (offset != have)
            bad("upload " + what + ": chunk at element " + std::to_string(offset) + ", expected " + std::to_string(have));
        if (n > total - offset) bad("upload " + what + ": chunk runs past the end of the tensor");
        received[key] = have + n;
        return offset;
    }

    void upload(const Message& m) {
        if (phase != Phase::loading) bad("upload: only allowed between configure and finalize");
        const uint32_t kind_raw = m.scalar<uint32_t>(Tag::kind);
        if (kind_raw > wire::kMaxTensorKind) bad("upload: unknown tensor kind " + std::to_string(kind_raw));
        const TensorKind kind = TensorKind(kind_raw);
        const uint64_t offset = m.scalar<uint64_t>(Tag::offset), total = m.scalar<uint64_t>(Tag::total);
        const uint64_t d = uint64_t(cfg.dim), v = uint64_t(cfg.vocab_size);
        if (package && package_secret(kind, m))
            bad("upload: this tensor is secret in the package and must come encrypted (upload_secret)");

        auto layer_of = [&]() {
            const int32_t l = m.scalar<int32_t>(Tag::layer);
            if (l < 0 || l >= cfg.n_layers) bad("upload: layer " + std::to_string(l) + " out of range");
            return l;
        };
        auto proj_of = [&]() {
            const int32_t p = m.scalar<int32_t>(Tag::proj);
            if (p < 0 || p > 6) bad("upload: projection " + std::to_string(p) + " out of range");
            return Proj(p);
        };
        // f32 chunk into dst (dst.size() elements in all)
        auto f32_into = [&](float* dst, uint64_t expected, uint64_t key, const std::string& what) {
            const wire::Field& f = m.field(Tag::data_f32, WireType::f32);
            const uint64_t at = accept_chunk(key, offset, f.count, total, expected, what);
            m.copy(Tag::data_f32, dst + at, f.count);
            for (uint64_t i = 0; i < f.count; ++i)
                if (!std::isfinite(dst[at + i])) bad("upload " + what + ": non-finite value");
        };

        switch (kind) {
            case TensorKind::tok_embeddings:
                f32_into(fw->tok_embeddings().data(), v * d, tensor_key(kind, 0, 0), "token embeddings");
                break;
            case TensorKind::final_norm:
                f32_into(fw->final_norm().data(), d, tensor_key(kind, 0, 0), "final norm");
                break;
            case TensorKind::classifier:
                bad("upload: the classifier is uploaded as int8 rows with scales (classifier_i8, classifier_scale)");
            case TensorKind::classifier_i8: {
                ProjState& s = proj(cfg.n_layers, kClassifierSlot);
                const wire::Field& f = m.field(Tag::data_i8, WireType::i8);
                if (offset == 0) {
                    const uint8_t secret = m.scalar<uint8_t>(Tag::secret);
                    if (secret > 1) bad("upload classifier: secret must be 0 or 1");
                    s.secret = secret == 1;
                }
                const uint64_t at = accept_chunk(tensor_key(kind, 0, 0), offset, f.count, total, v * d, "classifier");
                s.allocate_raw();
                m.copy(Tag::data_i8, s.raw.data() + at, f.count);
                break;
            }
            case TensorKind::classifier_scale: {
                ProjState& s = proj(cfg.n_layers, kClassifierSlot);
                if (s.scale.empty()) s.scale.resize(v);
                f32_into(s.scale.data(), v, tensor_key(kind, 0, 0), "classifier scales");
                break;
            }
            case TensorKind::attn_norm: {
                const int l = layer_of();
                f32_into(fw->attn_norm(l).data(), d, tensor_key(kind, l, 0), "attention norm");
                break;
            }
            case TensorKind::ffn_norm: {
                const int l = layer_of();
                f32_into(fw->ffn_norm(l).data(), d, tensor_key(kind, l, 0), "ffn norm");
                break;
            }
            case TensorKind::proj_weight: {
                const int l = layer_of();
                const Proj p = proj_of();
                ProjState& s = proj(l, p);
                const std::string what = proj_tensor_name(l, p);
                const wire::Field& f = m.field(Tag::data_i8, WireType::i8);
                const uint64_t n = uint64_t(s.rows * s.cols);
                if (offset == 0) {
                    const uint8_t secret = m.scalar<uint8_t>(Tag::secret);
                    if (secret > 1) bad("upload " + what + ": secret must be 0 or 1");
                    s.secret = secret == 1;
                }
                const uint64_t at = accept_chunk(tensor_key(kind, l, int(p)), offset, f.count, total, n, what);
                s.allocate_raw();
                m.copy(Tag::data_i8, s.raw.data() + at, f.count);
                break;
            }
            case TensorKind::proj_scale: {
                const int l = layer_of();
                const Proj p = proj_of();
                ProjState& s = proj(l, p);
                if (s.scale.empty()) s.scale.resize(size_t(s.rows));
                f32_into(s.scale.data(), uint64_t(s.rows), tensor_key(kind, l, int(p)), proj_tensor_name(l, p) + " scales");
                break;
            }
            case TensorKind::lora_a: {
                const int l = layer_of();
                const Proj p = proj_of();
                const std::string what = proj_tensor_name(l, p) + " LoRA A";
                if (offset == 0) {
                    if (received.count(tensor_key(kind, l, int(p)))) bad("upload " + what + ": sent twice");
                    fw->set_lora(l, p, m.scalar<int32_t>(Tag::rank), m.scalar<float>(Tag::scale));
                }
                const LoraUpdate* u = fw->lora(l, p);
                if (!u) bad("upload " + what + ": the first chunk must come first");
                f32_into(const_cast<float*>(u->a.data()), u->a.size(), tensor_key(kind, l, int(p)), what);
                break;
            }
            case TensorKind::lora_b: {
                const int l = layer_of();
                const Proj p = proj_of();
                const std::string what = proj_tensor_name(l, p) + " LoRA B";
                const LoraUpdate* u = fw->lora(l, p);
                if (!u) bad("upload " + what + ": its A matrix must be uploaded first");
                f32_into(const_cast<float*>(u->b.data()), u->b.size(), tensor_key(kind, l, int(p)), what);
                break;
            }
        }
    }

    bool complete(TensorKind k, int l, int p, uint64_t n) const {
        const auto it = received.find(tensor_key(k, l, p));
        return it != received.end() && it->second == n;
    }

    std::vector<uint8_t> finalize() {
        if (phase != Phase::loading) bad("finalize: the core is not loading a model");
        const uint64_t d = uint64_t(cfg.dim), v = uint64_t(cfg.vocab_size);
        auto need = [&](bool ok, const std::string& what) {
            if (!ok) bad("finalize: " + what + " is missing or incomplete");
        };
        if (package) {
            for (size_t i = 0; i < table.size(); ++i)
                need(table_next[i] == table[i].n_chunks,
                     "secret tensor " + pkg::secret_tensor_name(table[i].kind, table[i].layer, table[i].proj) +
                         " of the package");
            // A secret tied embedding is also the classifier: quantised here, as the host has no copy.
            if (tied && secret_entry(uint32_t(TensorKind::tok_embeddings), 0, 0) >= 0 &&
                !received.count(tensor_key(TensorKind::classifier_i8, 0, 0))) {
                ProjState& s = proj(cfg.n_layers, kClassifierSlot);
                s.secret = true;
                s.allocate_raw();
                s.scale.resize(v);
                quantize_rows_i8(fw->tok_embeddings().data(), int64_t(v), int64_t(d), s.raw.data(), s.scale.data(),
                                 nullptr);
                received[tensor_key(TensorKind::classifier_i8, 0, 0)] = v * d;
                received[tensor_key(TensorKind::classifier_scale, 0, 0)] = v;
            }
        }
        need(complete(TensorKind::tok_embeddings, 0, 0, v * d), "token_embd");
        need(complete(TensorKind::final_norm, 0, 0, d), "output_norm");
        need(complete(TensorKind::classifier_i8, 0, 0, v * d), tied ? "classifier (token_embd)" : "output");
        need(complete(TensorKind::classifier_scale, 0, 0, v), "classifier scales");
        for (int l = 0; l < cfg.n_layers; ++l) {
            const std::string b = "blk." + std::to_string(l) + ".";
            need(complete(TensorKind::attn_norm, l, 0, d), b + "attn_norm");
            need(complete(TensorKind::ffn_norm, l, 0, d), b + "ffn_norm");
            for (Proj p : kAllProj) {
                const ProjState& s = proj(l, p);
                need(complete(TensorKind::proj_weight, l, int(p), uint64_t(s.rows * s.cols)), proj_tensor_name(l, p));
                need(complete(TensorKind::proj_scale, l, int(p), uint64_t(s.rows)), proj_tensor_name(l, p) + " scales");
                if (const LoraUpdate* u = fw->lora(l, p)) {
                    need(complete(TensorKind::lora_a, l, int(p), u->a.size()), proj_tensor_name(l, p) + " LoRA A");
                    need(complete(TensorKind::lora_b, l, int(p), u->b.size()), proj_tensor_name(l, p) + " LoRA B");
                }
            }
        }
        // [layer][7], then the classifier
        std::vector<uint8_t> plan(projs.size(), 0);
        for (size_t i = 0; i < projs.size(); ++i) {
            ProjState& s = projs[i];
            s.offload = offload_mode && !s.secret;
            if (s.offload) s.key.emplace(s.raw.data(), s.rows, s.cols, nullptr);
            s.packed = PackedI8::pack(s.raw.data(), s.rows, s.cols, /*secret=*/s.secret);
            s.raw = MaybeSecretVector<int8_t>();  // released (zeroed first when secret)
            plan[i] = s.offload ? 1 : 0;
        }
        received.clear();
        phase = Phase::ready;
        Encoder e(MsgType::plan);
        e.add(Tag::plan, plan);
        return e.finish();
    }

    void set_sampler(const Message& m) {
        if (phase == Phase::fresh) bad("sampler: configure first");
        const float temp = m.scalar<float>(Tag::temperature), top_p = m.scalar<float>(Tag::top_p);
        const int32_t top_k = m.scalar<int32_t>(Tag::top_k), k = m.scalar<int32_t>(Tag::logprobs);
        const float noise_std = m.scalar<float>(Tag::logprob_noise);
        if (!std::isfinite(temp) || temp < 0.0f || temp > 1000.0f) bad("sampler: temperature out of range");
        if (!std::isfinite(top_p) || top_p < 0.0f || top_p > 1.0f) bad("sampler: top_p out of range [0, 1]");
        if (top_k < 0) bad("sampler: negative top_k");
        if (k < 0 || k > cfg.vocab_size) bad("sampler: log-probability count out of range [0, vocabulary size]");
        if (!std::isfinite(noise_std) || noise_std < 0.0f || noise_std > 1e6f) bad("sampler: noise out of range");
        sampler = std::make_unique<Sampler>(SamplerParams{temp, top_k, top_p, m.scalar<uint64_t>(Tag::seed)});
        logprobs_k = k;
        logprob_noise = noise_std;
    }

    // ---- protected packages: attestation, key release, sealing, encrypted uploads -----------------------------

    void require_platform(const char* what) const {
        if (!has_platform)
            fail(Status::unsupported, std::string(what) + ": this enclave host provides no platform (measurement, "
                                                          "sealing key, quoting); use the worker host");
    }

    // Answers a verifier's nonce with a quote over (measurement, nonce, a fresh ephemeral X25519 public key).
    std::vector<uint8_t> attest(const Message& m) {
        require_platform("attest");
        if (!model_key.empty()) bad("attest: the core already holds a model key");
        m.copy(Tag::nonce, attest_nonce.data(), attest_nonce.size());
        eph = pkg::x25519_generate();
        const auto report = pkg::encode_report(pkg::Report{measurement, attest_nonce, eph->pub});
        std::vector<uint8_t> q(4096);
        size_t qn = 0;
        if (!quote_fn || quote_fn(quote_ctx, report.data(), report.size(), q.data(), q.size(), &qn) != 0 ||
            qn > q.size())
            fail(Status::security, "attest: the quoting component did not sign the report");
        q.resize(qn);
        Encoder e(MsgType::quote);
        e.add(Tag::quote, q);
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    // The sealed form of the model key: only a core with the same measurement on the same device opens it.
    std::vector<uint8_t> seal_model_key() {
        std::vector<uint8_t> blob = {'S', 'I', 'S', 'K', 1, 0, 0, 0};
        blob.insert(blob.end(), model_id.begin(), model_id.end());
        std::array<uint8_t, pkg::kIvBytes> iv{};
        pkg::random_bytes(iv);
        std::vector<uint8_t> aad(blob);
        aad.insert(aad.end(), measurement.begin(), measurement.end());
        blob.insert(blob.end(), iv.begin(), iv.end());
        blob.resize(pkg::kSealedBytes);
        pkg::gcm_seal(sealing_key.data(), iv.data(), aad, model_key.data(), pkg::kKeyBytes,
                      blob.data() + 8 + pkg::kIdBytes + pkg::kIvBytes);
        return blob;
    }

    std::vector<uint8_t> release(const Message& m) {
        require_platform("release");
        if (!model_key.empty()) bad("release: the core already holds a model key");
        if (!eph) bad("release: no attestation in progress (attest first)");
        const wire::Field& w = m.field(Tag::wrapped_key, WireType::u8, int64_t(pkg::kWrappedBytes));
        pkg::ModelId id{};
        m.copy(Tag::model_id, id.data(), id.size());
        pkg::PubKey server{};
        std::memcpy(server.data(), w.data, server.size());
        const pkg::Report r{measurement, attest_nonce, eph->pub};
        SecretVector<uint8_t> shared(32), wrap(32), key(32);
        const pkg::X25519Pair mine = std::move(*eph);
        eph.reset();  // one release per attestation
        pkg::x25519_derive(mine.priv.data(), server, shared.data());
        pkg::derive_wrap_key(shared, r, server, id, wrap.data());
        const uint8_t iv[pkg::kIvBytes] = {};
        if (!pkg::gcm_open(wrap.data(), iv, id, w.data + pkg::kPubBytes, pkg::kKeyBytes, key.data()))
            fail(Status::security, "release: the wrapped model key does not open under this enclave's ephemeral "
                                   "key (wrapped for another attestation or enclave, or altered)");
        model_key = std::move(key);
        model_id = id;
        Encoder e(MsgType::ok);
        e.add(Tag::sealed_key, seal_model_key());
        e.scalar<int32_t>(Tag::pos, 0);
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    void unseal(const Message& m) {
        require_platform("unseal");
        if (!model_key.empty()) bad("unseal: the core already holds a model key");
        const wire::Field& f = m.field(Tag::sealed_key, WireType::u8);
        static const uint8_t kHead[8] = {'S', 'I', 'S', 'K', 1, 0, 0, 0};
        if (f.count != pkg::kSealedBytes || std::memcmp(f.data, kHead, 8) != 0)
            fail(Status::security, "unseal: not a sealed model key (bad size or header)");
        std::vector<uint8_t> aad(f.data, f.data + 8 + pkg::kIdBytes);
        aad.insert(aad.end(), measurement.begin(), measurement.end());
        SecretVector<uint8_t> key(32);
        const uint8_t* iv = f.data + 8 + pkg::kIdBytes;
        if (!pkg::gcm_open(sealing_key.data(), iv, aad, iv + pkg::kIvBytes, pkg::kKeyBytes, key.data()))
            fail(Status::security, "unseal: the sealed model key does not open under this enclave's sealing key: it "
                                   "was sealed by an enclave with another measurement or on another device, or it "
                                   "was altered");
        model_key = std::move(key);
        std::memcpy(model_id.data(), f.data + 8, model_id.size());
    }

    int secret_entry(uint32_t kind, int layer, int p) const {
        for (size_t i = 0; i < table.size(); ++i)
            if (table[i].kind == kind && table[i].layer == layer && table[i].proj == p) return int(i);
        return -1;
    }

    // Whether a plaintext upload would replace (part of) a tensor the package keeps secret.
    bool package_secret(TensorKind kind, const Message& m) const {
        const uint32_t k = uint32_t(kind);
        switch (kind) {
            case TensorKind::tok_embeddings:
            case TensorKind::final_norm: return secret_entry(k, 0, 0) >= 0;
            case TensorKind::classifier:
            case TensorKind::classifier_i8:
            case TensorKind::classifier_scale:
                return secret_entry(uint32_t(TensorKind::classifier), 0, 0) >= 0 ||
                       (tied && secret_entry(uint32_t(TensorKind::tok_embeddings), 0, 0) >= 0);
            case TensorKind::attn_norm:
            case TensorKind::ffn_norm: return secret_entry(k, m.scalar<int32_t>(Tag::layer), 0) >= 0;
            case TensorKind::proj_weight:
            case TensorKind::proj_scale:
                return secret_entry(uint32_t(TensorKind::proj_weight), m.scalar<int32_t>(Tag::layer),
                                    m.scalar<int32_t>(Tag::proj)) >= 0;
            case TensorKind::lora_a:
            case TensorKind::lora_b: return true;  // a package's model takes no adapter but its own
        }
        return true;
    }

    // Verifies the package header, manifest and secret table under the manifest key, and takes the table.
    void manifest(const Message& m) {
        if (phase != Phase::loading) bad("manifest: only allowed between configure and the first upload");
        if (package) bad("manifest: a package manifest was already accepted");
        if (!received.empty()) bad("manifest: must come before any upload");
        if (model_key.empty()) bad("manifest: no model key (release or unseal first)");
        const wire::Field& f = m.field(Tag::manifest, WireType::u8);
        const std::span<const uint8_t> b(f.data, f.count);
        const pkg::Header h = pkg::decode_header(b);
        const uint64_t body = pkg::kHeaderBytes + h.manifest_len + h.table_len;
        if (b.size() != body + pkg::kHashBytes) fail(Status::format, "manifest: truncated or with trailing bytes");
        if (!pkg::equal(h.model_id, model_id))
            fail(Status::security, "manifest: the package's model identity " + pkg::to_hex(h.model_id) +
                                       " is not the one the model key was released for (" + pkg::to_hex(model_id) +
                                       ")");
        SecretVector<uint8_t> mk(32);
        pkg::derive_manifest_key(model_key.data(), model_id, mk.data());
        const pkg::Hash mac = pkg::hmac_sha256(mk, b.first(size_t(body)));
        if (!pkg::equal(mac, b.subspan(size_t(body))))
            fail(Status::integrity, "package manifest failed authentication: the model key is wrong or the header, "
                                    "manifest or secret table was altered; nothing was decrypted");
        std::vector<pkg::SecretEntry> t = pkg::decode_table(b.subspan(size_t(pkg::kHeaderBytes + h.manifest_len),
                                                                      size_t(h.table_len)));
        const uint64_t d = uint64_t(cfg.dim), v = uint64_t(cfg.vocab_size);
        for (size_t i = 0; i < t.size(); ++i) {
            const pkg::SecretEntry& e = t[i];
            const std::string name = pkg::secret_tensor_name(e.kind, e.layer, e.proj);
            const bool per_layer = e.kind == 3 || e.kind == 4 || e.kind == 5 || e.kind == 7 || e.kind == 8;
            if (name.empty() || (per_layer && (e.layer < 0 || e.layer >= cfg.n_layers)) ||
                (!per_layer && (e.layer != 0 || e.proj != 0)) || (e.kind == 2 && tied) ||
                secret_entry_in(t, i, e.kind, e.layer, e.proj))
                fail(Status::format, "manifest: secret table entry " + std::to_string(i) + " (" + name +
                                         ") does not fit this model");
            uint64_t expect = 0, row = 1;
            const ProjShape ps = per_layer && e.proj >= 0 && e.proj < 7 ? proj_shape(cfg, Proj(e.proj)) : ProjShape{};
            switch (e.kind) {
                case 0: expect = v * d; break;
                case 2: expect = v * d, row = d; break;
                case 1: case 3: case 4: expect = d; break;
                case 5: expect = uint64_t(ps.rows * ps.cols), row = uint64_t(ps.cols); break;
                case 7: expect = e.elements % uint64_t(ps.cols) == 0 ? e.elements : 0; break;
                case 8:
                    // B [rows][rank] with the rank of its A [rank][cols]
                    for (const pkg::SecretEntry& a : t)
                        if (a.kind == 7 && a.layer == e.layer && a.proj == e.proj)
                            expect = uint64_t(ps.rows) * (a.elements / uint64_t(ps.cols));
                    break;
            }
            if (expect == 0 || e.elements != expect || e.chunk_elements % row != 0)
                fail(Status::format, "manifest: secret tensor " + name + " has " + std::to_string(e.elements) +
                                         " elements in chunks of " + std::to_string(e.chunk_elements) +
                                         ", which does not fit this model");
        }
        table = std::move(t);
        table_next.assign(table.size(), 0);
        package = true;
        release_policy = h.release;
    }

    static bool secret_entry_in(const std::vector<pkg::SecretEntry>& t, size_t before, uint32_t kind, int layer, int p) {
        for (size_t i = 0; i < before && i < t.size(); ++i)
            if (t[i].kind == kind && t[i].layer == layer && t[i].proj == p) return true;
        return false;
    }

    // Opens one chunk of a secret tensor straight into its place (quantising matrices to int8 rows).
    void upload_secret(const Message& m) {
        if (phase != Phase::loading) bad("upload_secret: only allowed between configure and finalize");
        if (!package) bad("upload_secret: no verified package manifest (send manifest first)");
        const uint32_t kind = m.scalar<uint32_t>(Tag::kind);
        const int32_t layer = m.scalar<int32_t>(Tag::layer), p = m.scalar<int32_t>(Tag::proj);
        const uint64_t chunk = m.scalar<uint64_t>(Tag::offset);
        const int idx = secret_entry(kind, layer, p);
        if (idx < 0) bad("upload_secret: the package lists no such secret tensor");
        const pkg::SecretEntry& e = table[size_t(idx)];
        const std::string name = pkg::secret_tensor_name(kind, layer, p);
        if (chunk != table_next[size_t(idx)])
            bad("upload_secret " + name + ": chunk " + std::to_string(chunk) + ", expected " +
                std::to_string(table_next[size_t(idx)]));
        const uint64_t first = chunk * e.chunk_elements, n = std::min(e.chunk_elements, e.elements - first);
        const wire::Field& f = m.field(Tag::ciphertext, WireType::u8, int64_t(n * 4 + pkg::kTagBytes));
        SecretVector<uint8_t> key(32);
        pkg::derive_tensor_key(model_key.data(), model_id, name, key.data());
        const auto aad = pkg::chunk_aad(model_id, name, uint32_t(chunk), e.n_chunks, e.elements);
        const auto iv = pkg::chunk_iv(uint32_t(chunk));
        SecretVector<float> plain(static_cast<size_t>(n));
        if (!pkg::gcm_open(key.data(), iv.data(), aad, f.data, size_t(n) * 4, reinterpret_cast<uint8_t*>(plain.data())))
            fail(Status::integrity, "package: secret tensor " + name + " chunk " + std::to_string(chunk) +
                                        " failed authentication (wrong key, or its ciphertext or tag was altered); "
                                        "nothing from it is used");
        for (float x : plain)
            if (!std::isfinite(x)) fail(Status::integrity, "package: secret tensor " + name + " holds a non-finite value");
        flops += n * 4;  // nominal: decryption
        const uint64_t d = uint64_t(cfg.dim), v = uint64_t(cfg.vocab_size);
        auto into = [&](float* dst, uint64_t total, TensorKind k, int l, int pj) {
            accept_chunk(tensor_key(k, l, pj), first, n, total, total, name);
            std::copy(plain.begin(), plain.end(), dst + first);
        };
        auto rows_into = [&](ProjState& s, TensorKind wk, TensorKind sk, int l, int pj) {
            const int64_t cols = s.cols, rows = int64_t(n) / cols, r0 = int64_t(first) / cols;
            accept_chunk(tensor_key(wk, l, pj), first, n, uint64_t(s.rows * s.cols), uint64_t(s.rows * s.cols), name);
            accept_chunk(tensor_key(sk, l, pj), uint64_t(r0), uint64_t(rows), uint64_t(s.rows), uint64_t(s.rows),
                         name + " scales");
            s.secret = true;
            s.allocate_raw();
            if (s.scale.empty()) s.scale.resize(size_t(s.rows));
            quantize_rows_i8(plain.data(), rows, cols, s.raw.data() + first, s.scale.data() + r0, nullptr);
        };
        switch (TensorKind(kind)) {
            case TensorKind::tok_embeddings: into(fw->tok_embeddings().data(), v * d, TensorKind(kind), 0, 0); break;
            case TensorKind::final_norm: into(fw->final_norm().data(), d, TensorKind(kind), 0, 0); break;
            case TensorKind::attn_norm: into(fw->attn_norm(layer).data(), d, TensorKind(kind), layer, 0); break;
            case TensorKind::ffn_norm: into(fw->ffn_norm(layer).data(), d, TensorKind(kind), layer, 0); break;
            case TensorKind::classifier:
                rows_into(proj(cfg.n_layers, kClassifierSlot), TensorKind::classifier_i8, TensorKind::classifier_scale,
                          0, 0);
                break;
            case TensorKind::proj_weight:
                rows_into(proj(layer, Proj(p)), TensorKind::proj_weight, TensorKind::proj_scale, layer, p);
                break;
            case TensorKind::lora_a: {
                const int64_t cols = proj_shape(cfg, Proj(p)).cols;
                if (chunk == 0) fw->set_lora(layer, Proj(p), int(e.elements / uint64_t(cols)), e.scale);
                const LoraUpdate* u = fw->lora(layer, Proj(p));
                into(const_cast<float*>(u->a.data()), u->a.size(), TensorKind(kind), layer, p);
                break;
            }
            case TensorKind::lora_b: {
                const LoraUpdate* u = fw->lora(layer, Proj(p));
                if (!u || u->b.size() != e.elements)
                    bad("upload_secret " + name + ": its lora_a must come first, with a matching rank");
                into(const_cast<float*>(u->b.data()), u->b.size(), TensorKind(kind), layer, p);
                break;
            }
            default: bad("upload_secret: tensor kind " + std::to_string(kind) + " is never stored encrypted");
        }
        ++table_next[size_t(idx)];
    }

    // ---- forward passes --------------------------------------------------------------------------------------

    // Erases the pending crossing's kept unit (total words) from the store: each is used once.
    void erase_kept_unit(uint64_t total) {
        if (pending.kept && pending.kept_wr) OPENSSL_cleanse(pending.kept_wr, size_t(total) * 4);
        pending.kept_wr = nullptr;
        kept_last = SecretVector<uint32_t>{};  // freed, so zeroed
    }

    void abandon() {
        if (pending.active) {
            uint64_t total = 0;
            for (Proj p : pending.projs) total += uint64_t(pending.T) * uint64_t(proj(pending.layer, p).rows);
            erase_kept_unit(total);
        }
        pending = Pending{};
        if (fw) fw->abort_pass();
        wipe(r);
        wipe(xq);
        wipe(pre_plain);
    }

    std::vector<uint8_t> eval(const Message& m) {
        if (phase != Phase::ready) bad("eval: the model is not loaded (finalize first)");
        if (pending.active || fw->in_pass()) bad("eval: a forward pass is already in progress");
        const wire::Field& tf = m.field(Tag::tokens, WireType::i32);
        if (tf.count < 1 || int64_t(tf.count) > n_ctx)
            bad("eval: token count " + std::to_string(tf.count) + " out of range [1, " + std::to_string(n_ctx) + "]");
        const auto tokens = m.array<int32_t>(Tag::tokens);
        const uint8_t out = m.scalar<uint8_t>(Tag::output);
        if (out > 2) bad("eval: unknown output kind " + std::to_string(out));
        output = wire::OutputKind(out);
        // A package's owner decides what may leave besides sampled tokens: both are oracles on the outputs.
        if (package && output == wire::OutputKind::nll && !(release_policy & pkg::kReleaseNll))
            fail(Status::security, "the package's owner does not allow log-likelihood evaluation (perplexity); it "
                                   "must be packed with --release-nll");
        if (package && output == wire::OutputKind::sample && logprobs_k > int(release_policy & pkg::kReleaseLogprobsMask))
            fail(Status::security, "the package's owner allows at most " +
                                       std::to_string(release_policy & pkg::kReleaseLogprobsMask) +
                                       " log-probabilities per token; " + std::to_string(logprobs_k) + " were asked");
        targets.clear();
        if (output == wire::OutputKind::nll) {
            targets = m.array<int32_t>(Tag::targets, tf.count);
            for (int32_t t : targets)
                if (t < -1 || t >= cfg.vocab_size) bad("eval: NLL target " + std::to_string(t) + " out of range");
        }
        fw->begin(tokens.data(), int(tokens.size()));
        return run();
    }

    // Runs stages until a crossing must leave the core or the pass is complete.
    std::vector<uint8_t> run() {
        while (!fw->done()) {
            const int l = fw->layer(), T = fw->T();
            const Stage st = fw->stage();
            const int64_t K = fw->stage_cols();
            const int bits = activation_bits(K);
            xq.resize(size_t(T * K));
            xs.resize(size_t(T));
            quantize_activations(fw->stage_input(), T, K, bits, xq.data(), xs.data());
            std::vector<Proj> off;
            for (Proj p : stage_projs(st)) {
                ProjState& s = proj(l, p);
                if (s.offload) {
                    off.push_back(p);
                    continue;
                }
                acc.resize(size_t(T * s.rows));
                gemm_i16(loop_pool(T), s.packed, xq.data(), T, acc.data());
                dequantize_product(acc.data(), T, s.rows, s.scale.data(), xs.data(), fw->proj_output(p));
                flops += 2 * uint64_t(T) * uint64_t(s.rows * s.cols);
            }
            if (!off.empty()) return send_offload(l, st, std::move(off), T, K, false);
            fw->finish_stage();
        }
        return classify();
    }

    // After the last block: the classifier on the final-normed states of the tokens whose logits are needed, as
    // one more base projection (offloaded on masked inputs unless secret), dequantised into `logits` [n][vocab].
    std::vector<uint8_t> classify() {
        const int T = fw->T(), d = cfg.dim, V = cfg.vocab_size;
        cls_rows.clear();
        if (output == wire::OutputKind::sample) {
            cls_rows.push_back(T - 1);
        } else if (output == wire::OutputKind::nll) {
            for (int t = 0; t < T; ++t)
                if (targets[size_t(t)] >= 0) cls_rows.push_back(t);
        }
        if (cls_rows.empty()) return finish_pass();
        const int n = int(cls_rows.size());
        cls_in.resize(size_t(n) * size_t(d));
        for (int i = 0; i < n; ++i) fw->final_hidden(cls_rows[size_t(i)], cls_in.data() + size_t(i) * d);
        xq.resize(size_t(n) * size_t(d));
        xs.resize(size_t(n));
        quantize_activations(cls_in.data(), n, d, activation_bits(d), xq.data(), xs.data());
        wipe(cls_in);
        logits.resize(size_t(n) * size_t(V));
        ProjState& s = proj(cfg.n_layers, kClassifierSlot);
        if (s.offload) return send_offload(cfg.n_layers, Stage::qkv, {kClassifierSlot}, n, d, true);
        acc.resize(size_t(n) * size_t(V));
        gemm_i16(loop_pool(n), s.packed, xq.data(), n, acc.data());
        dequantize_product(acc.data(), n, s.rows, s.scale.data(), xs.data(), logits.data());
        flops += 2 * uint64_t(n) * uint64_t(s.rows * s.cols);
        return finish_pass();
    }

    // Masks the quantised input xq [T][K] of a crossing and sends it out for the offloaded projections.
    std::vector<uint8_t> send_offload(int l, Stage st, std::vector<Proj> off, int T, int64_t K, bool classifier) {
        // One fresh pad per element of this crossing: x' = x + r (mod 2^32) is uniform, independent of x.
        const size_t n = size_t(T * K);
        r.resize(n);
        pending = Pending{true, l, st, ++crossings, off, T, K};
        pending.classifier = classifier;
        PreSlot& ps = pre[size_t(l) * kStages + size_t(st)];
        if (T == 1 && !ps.batches.empty()) {
            // Offline mode: the next reserved position of the pending batch, used exactly once.
            PreBatch& b = ps.batches.front();
            pending.pre = true;
            pending.pre_seq = b.seq;
            pending.pre_idx = ps.next;
            pending.pre_count = b.count;
            pending.pre_offset = b.offset + uint64_t(ps.next) * uint64_t(K);
            if (!b.kept.empty()) {
                // Kept inside: products() reads this position's unit in place and erases it.
                pending.kept_wr = b.kept.data() + size_t(ps.next) * (b.kept.size() / b.count);
                pending.kept = pending.unit_open = true;
            }
            if (++ps.next == b.count) {
                kept_bytes -= 4 * b.kept.size();
                kept_last = std::move(b.kept);  // the pending crossing reads its last unit
                ps.batches.pop_front();
                ps.next = 0;
            }
            masks->fill_at(pending.pre_offset, r.data(), n);
        } else {
            masks->fill(r.data(), n);
        }
        Encoder e(MsgType::offload);
        e.scalar<int32_t>(Tag::layer, l);
        e.scalar<uint8_t>(Tag::stage, uint8_t(st));
        e.scalar<uint64_t>(Tag::crossing, pending.crossing);
        std::vector<uint8_t> pl;
        for (Proj p : off) pl.push_back(uint8_t(p));
        e.add(Tag::projs, pl);
        e.scalar<int32_t>(Tag::count_t, T);
        e.scalar<int32_t>(Tag::count_k, int32_t(K));
        if (pending.pre) {
            e.scalar<uint64_t>(Tag::batch, pending.pre_seq);
            e.scalar<uint32_t>(Tag::batch_index, pending.pre_idx);
            if (pending.kept) e.scalar<uint8_t>(Tag::keep, 1);  // the host holds nothing for this crossing
        }
        auto* dst = e.reserve(Tag::activations, WireType::u32, n);
        for (size_t i = 0; i < n; ++i) {
            const uint32_t v = uint32_t(xq[i]) + r[i];
            std::memcpy(dst + 4 * i, &v, 4);
        }
        flops += n;
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    // Checks that a message (products or unit) answers the pending crossing; returns its product count.
    uint64_t check_answers_pending(const Message& m, const char* what) {
        if (!pending.active) bad(std::string(what) + ": no crossing is pending");
        const int32_t layer = m.scalar<int32_t>(Tag::layer);
        const uint8_t stage = m.scalar<uint8_t>(Tag::stage);
        const uint64_t crossing = m.scalar<uint64_t>(Tag::crossing);
        if (layer != pending.layer || stage != uint8_t(pending.stage) || crossing != pending.crossing)
            bad(std::string(what) + ": they answer crossing " + std::to_string(crossing) + " (layer " +
                std::to_string(layer) + ", stage " + std::to_string(stage) + "), but crossing " +
                std::to_string(pending.crossing) + " (layer " + std::to_string(pending.layer) + ", stage " +
                stage_name(pending.stage) + ") is pending");
        uint64_t total = 0;
        for (Proj p : pending.projs) total += uint64_t(pending.T) * uint64_t(proj(pending.layer, p).rows);
        return total;
    }

    // The pending crossing's sealed unit ahead of its products: opened now, while the accelerator computes.
    std::vector<uint8_t> unit(const Message& m) {
        const uint64_t total = check_answers_pending(m, "unit");
        if (!pending.pre) bad("unit: sealed unblinding factors for a crossing that uses none");
        if (pending.kept) bad("unit: the crossing's factors are kept inside the core; no sealed unit belongs to it");
        if (pending.unit_open) bad("unit: the crossing's sealed unit was already sent");
        open_unit(m, total);
        pending.unit_open = true;
        return ok();
    }

    std::vector<uint8_t> products(const Message& m) {
        const uint64_t total = check_answers_pending(m, "products");
        const int T = pending.T;
        const wire::Field& f = m.field(Tag::products, WireType::u32, int64_t(total));
        const uint8_t* src = f.data;
        if (pending.pre && !pending.unit_open) {
            open_unit(m, total);
        } else if (m.has(Tag::sealed)) {
            bad(!pending.pre  ? "products: sealed unblinding factors for a crossing that uses none"
                : pending.kept ? "products: the crossing's factors are kept inside the core; no sealed unit belongs to it"
                               : "products: the crossing's sealed unit was already sent");
        }
        const uint8_t* pre_src = pending.kept ? reinterpret_cast<const uint8_t*>(pending.kept_wr) : pre_plain.data();
        size_t pre_at = 0;
        for (Proj p : pending.projs) {
            ProjState& s = proj(pending.layer, p);
            const size_t n = size_t(T * s.rows);
            wr.resize(n);
            if (pending.pre) {
                // W r offline: kept inside, or opened from the sealed unit of this crossing.
                std::memcpy(wr.data(), pre_src + pre_at, 4 * n);
                pre_at += 4 * n;
            } else {
                // W r online: the same exact mod-2^32 product the accelerator computes on x'.
                gemm_masked(loop_pool(T), s.packed, r.data(), T, wr.data());
                flops += 2 * uint64_t(T) * uint64_t(s.rows * s.cols);
            }
            acc.resize(n);
            for (size_t i = 0; i < n; ++i) {
                uint32_t y;
                std::memcpy(&y, src + 4 * i, 4);
                acc[i] = int32_t(y - wr[i]);
            }
            src += 4 * n;
            flops += 2 * uint64_t(T) * uint64_t(s.rows + s.cols);
            if (!s.key->check_batch(acc.data(), xq.data(), T)) {
                const std::string msg = "integrity check failed: the accelerator's product for " +
                                        (pending.classifier ? std::string("the classifier")
                                                            : proj_tensor_name(pending.layer, p)) +
                                        " (crossing " +
                                        std::to_string(pending.crossing) + ") is wrong; the session is stopped";
                fail(Status::integrity, msg);
            }
            dequantize_product(acc.data(), T, s.rows, s.scale.data(), xs.data(),
                               pending.classifier ? logits.data() : fw->proj_output(p));
        }
        const bool classifier = pending.classifier;
        erase_kept_unit(total);
        pending = Pending{};
        wipe(r);
        wipe(wr);
        wipe(pre_plain);
        if (classifier) return finish_pass();
        fw->finish_stage();
        return run();
    }

    // Authenticates and decrypts the sealed unit the pending crossing needs into pre_plain. Anything but exactly
    // that unit (missing, replayed, reordered, altered, another slot's or another core's) is an integrity failure.
    void open_unit(const Message& m, uint64_t words) {
        const std::string where = "sealed unblinding factors for crossing " + std::to_string(pending.crossing) +
                                  " (layer " + std::to_string(pending.layer) + ", stage " + stage_name(pending.stage) +
                                  ", batch " + std::to_string(pending.pre_seq) + ", position " +
                                  std::to_string(pending.pre_idx) + ")";
        const size_t n = size_t(words) * 4;
        if (!m.has(Tag::sealed)) fail(Status::integrity, where + " are missing; the session is stopped");
        const wire::Field& sf = m.field(Tag::sealed, WireType::u8);
        if (size_t(sf.count) != n + kSealTagBytes)
            fail(Status::integrity, where + " have the wrong size; the session is stopped");
        uint8_t iv[kSealIvBytes];
        seal_iv(pending.pre_seq, pending.pre_idx, iv);
        const auto aad = seal_aad(pending.layer, pending.stage, pending.pre_offset, pending.pre_count, pending.pre_seq,
                                  pending.pre_idx, pending.K);
        pre_plain.resize(n);
        if (!unit_opener.open(seal_key.data(), iv, aad, sf.data, n, pre_plain.data()))
            fail(Status::integrity, where + " failed authentication (replayed, altered or foreign); the session is stopped");
        flops += n;  // nominal: decryption
    }

    // Precomputes the unblinding factors of the next `count` single-token crossings of (layer, stage): reserves
    // their pads, computes W R for the whole batch with one matrix-matrix product per projection, and returns
    // them sealed, one unit per crossing.
    std::vector<uint8_t> precompute(const Message& m) {
        if (phase != Phase::ready) bad("precompute: the model is not loaded (finalize first)");
        if (pending.active || fw->in_pass()) bad("precompute: a forward pass is in progress");
        const int32_t l = m.scalar<int32_t>(Tag::layer);
        const uint8_t st_raw = m.scalar<uint8_t>(Tag::stage);
        const int32_t count = m.scalar<int32_t>(Tag::count_t);
        const uint8_t keep = m.has(Tag::keep) ? m.scalar<uint8_t>(Tag::keep) : 0;
        if (keep > 1) bad("precompute: keep must be 0 or 1");
        if (l < 0 || l > cfg.n_layers) bad("precompute: layer " + std::to_string(l) + " out of range");
        if (st_raw >= kStages || (l == cfg.n_layers && st_raw != uint8_t(Stage::qkv)))
            bad("precompute: stage " + std::to_string(st_raw) + " out of range");
        if (count < 1 || uint32_t(count) > kMaxPrecomputeCount)
            bad("precompute: count " + std::to_string(count) + " out of range [1, " + std::to_string(kMaxPrecomputeCount) + "]");
        const Stage st = Stage(st_raw);
        std::vector<Proj> off;
        uint64_t rows = 0;
        int64_t K = 0;
        const std::span<const Proj> sp = l == cfg.n_layers ? std::span<const Proj>(&kClassifierSlot, 1) : stage_projs(st);
        for (Proj p : sp)
            if (proj(l, p).offload) {
                off.push_back(p);
                rows += uint64_t(proj(l, p).rows);
                K = proj(l, p).cols;
            }
        if (off.empty()) bad("precompute: layer " + std::to_string(l) + " stage " + stage_name(st) + " offloads nothing");
        const uint64_t unit = rows * 4, sealed_bytes = uint64_t(count) * (unit + kSealTagBytes);
        if (keep) {
            if (kept_bytes + uint64_t(count) * unit > kMaxKeptFactorBytes)
                fail(Status::out_of_memory, "precompute: keeping " + std::to_string((uint64_t(count) * unit) >> 10) +
                                                " KiB more unblinding factors would exceed the core's " +
                                                std::to_string(kMaxKeptFactorBytes >> 20) + " MiB for them (" +
                                                std::to_string(kept_bytes >> 10) + " KiB kept); seal them instead");
        } else if (sealed_bytes + (64u << 10) > SI_ENCLAVE_MAX_MESSAGE) {
            bad("precompute: the batch would not fit one message");
        }

        const MaskRange range = masks->reserve(uint64_t(count) * uint64_t(K));
        pre_r.resize(size_t(count) * size_t(K));
        masks->fill_at(range.offset, pre_r.data(), pre_r.size());
        pre_wr.resize(size_t(count) * size_t(rows));
        size_t at = 0;
        for (Proj p : off) {
            ProjState& s = proj(l, p);
            gemm_masked(pool.get(), s.packed, pre_r.data(), count, pre_wr.data() + at);
            at += size_t(count) * size_t(s.rows);
            flops += 2 * uint64_t(count) * uint64_t(s.rows * s.cols);
        }
        wipe(pre_r);
        const uint64_t seq = ++batch_seq;
        Encoder e(MsgType::sealed);
        e.scalar<int32_t>(Tag::layer, l);
        e.scalar<uint8_t>(Tag::stage, st_raw);
        e.scalar<uint64_t>(Tag::batch, seq);
        e.scalar<uint64_t>(Tag::offset, range.offset);
        e.scalar<int32_t>(Tag::count_t, count);
        e.scalar<int32_t>(Tag::count_k, int32_t(K));
        if (keep) {
            // Kept inside: unit after unit, as the crossings will take them.
            PreBatch b{seq, range.offset, uint32_t(count), SecretVector<uint32_t>(size_t(count) * size_t(rows))};
            size_t o = 0, base = 0;
            for (Proj p : off) {
                const size_t pr = size_t(proj(l, p).rows);
                for (int32_t t = 0; t < count; ++t)
                    std::memcpy(b.kept.data() + size_t(t) * size_t(rows) + o, pre_wr.data() + base + size_t(t) * pr,
                                4 * pr);
                o += pr;
                base += size_t(count) * pr;
            }
            wipe(pre_wr);
            kept_bytes += 4 * b.kept.size();
            pre[size_t(l) * kStages + size_t(st)].batches.push_back(std::move(b));
            e.scalar<uint8_t>(Tag::keep, 1);
            e.scalar<uint64_t>(Tag::flops, take_flops());
            return e.finish();
        }
        uint8_t* dst = e.reserve(Tag::sealed, WireType::u8, size_t(sealed_bytes));
        // Units are sealed independently (own IV and AAD), so they are sealed in parallel, in a few contiguous parts
        // with one cipher context each; a failure inside a loop is reported after it, on this thread.
        std::atomic<bool> seal_failed{false};
        const int64_t parts = std::min<int64_t>(count, 64);
        auto seal_parts = [&](int64_t part_begin, int64_t part_end) {
            try {
                pkg::GcmSealer sealer;
                SecretVector<uint8_t> plain(static_cast<size_t>(unit), 0);
                for (int64_t t = part_begin * count / parts; t < part_end * count / parts; ++t) {
                    // unit t: W_p r_t for every projection p of the stage, in order
                    size_t o = 0, base = 0;
                    for (Proj p : off) {
                        const size_t pr = size_t(proj(l, p).rows);
                        std::memcpy(plain.data() + o, pre_wr.data() + base + size_t(t) * pr, 4 * pr);
                        o += 4 * pr;
                        base += size_t(count) * pr;
                    }
                    uint8_t iv[kSealIvBytes];
                    seal_iv(seq, uint32_t(t), iv);
                    sealer.seal(seal_key.data(), iv,
                                seal_aad(l, st, range.offset + uint64_t(t) * uint64_t(K), uint32_t(count), seq, uint32_t(t), K),
                                plain.data(), size_t(unit), dst + size_t(t) * (unit + kSealTagBytes));
                }
                wipe(plain);
            } catch (...) {
                seal_failed = true;
            }
        };
        if (pool)
            pool->parallel_for(parts, 1, seal_parts);
        else
            seal_parts(0, parts);
        if (seal_failed) fail(Status::internal, "precompute: sealing the unblinding factors failed");
        flops += sealed_bytes;  // nominal: encryption
        wipe(pre_wr);
        pre[size_t(l) * kStages + size_t(st)].batches.push_back(PreBatch{seq, range.offset, uint32_t(count), {}});
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    std::vector<uint8_t> finish_pass() {
        const int V = cfg.vocab_size;
        Encoder e(output == wire::OutputKind::none ? MsgType::ok : MsgType::result);
        // logits [cls_rows.size()][V], computed by classify() (and products() when offloaded)
        if (output == wire::OutputKind::sample) {
            const int32_t tok = sampler->sample(logits.data(), V);
            e.scalar<int32_t>(Tag::token, tok);
            if (logprobs_k > 0) release_logprobs(e);
        } else if (output == wire::OutputKind::nll) {
            double sum = 0.0;
            uint64_t count = 0;
            for (size_t i = 0; i < cls_rows.size(); ++i) {
                sum += token_nll(&logits[i * size_t(V)], V, targets[size_t(cls_rows[i])]);
                ++count;
            }
            e.scalar<double>(Tag::nll_sum, sum);
            e.scalar<uint64_t>(Tag::nll_count, count);
        }
        fw->end_pass();
        wipe(logits);
        wipe(xq);
        e.scalar<int32_t>(Tag::pos, fw->pos());
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    // Top-K log-probabilities (temperature 1) with Gaussian noise of the configured deviation added before release.
    void release_logprobs(Encoder& e) {
        const int V = cfg.vocab_size, K = std::min(logprobs_k, V);
        double mx = logits[0];
        for (int i = 1; i < V; ++i) mx = std::max(mx, double(logits[size_t(i)]));
        double sum = 0.0;
        for (int i = 0; i < V; ++i) sum += std::exp(double(logits[size_t(i)]) - mx);
        const double lse = mx + std::log(sum);
        // the ranking of the whole vocabulary is secret; only its first K entries are released
        SecretVector<int32_t> order(static_cast<size_t>(V));
        for (int i = 0; i < V; ++i) order[size_t(i)] = i;
        std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
            return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
        });
        const std::vector<int32_t> ids(order.begin(), order.begin() + K);
        std::vector<float> values(static_cast<size_t>(K));
        for (int i = 0; i < K; ++i) {
            double lp = double(logits[size_t(ids[size_t(i)])]) - lse;
            if (logprob_noise > 0.0f) lp += double(logprob_noise) * gaussian();
            values[size_t(i)] = float(lp);
        }
        e.add(Tag::logprob_ids, ids);
        e.add(Tag::logprob_values, values);
    }

    // A standard normal variate (Box-Muller) from the core's own AES-CTR stream, keyed from the OS CSPRNG.
    double gaussian() {
        uint32_t u[4];
        noise->fill(u, 4);
        const double a = (double((uint64_t(u[0]) << 21) ^ u[1]) + 1.0) / 9007199254740993.0;  // (0, 1]
        const double b = double((uint64_t(u[2]) << 21) ^ u[3]) / 9007199254740992.0;
        OPENSSL_cleanse(u, sizeof u);
        return std::sqrt(-2.0 * std::log(a)) * std::cos(6.283185307179586 * b);
    }

    uint64_t take_flops() {
        const uint64_t total = flops + (fw ? fw->flops() : 0);
        const uint64_t delta = total - flops_reported;
        flops_reported = total;
        return delta;
    }

    std::vector<uint8_t> reset() {
        if (phase != Phase::ready) bad("reset: the model is not loaded");
        abandon();
        fw->reset();
        Encoder e(MsgType::ok);
        e.scalar<int32_t>(Tag::pos, 0);
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    std::vector<uint8_t> ok() {
        Encoder e(MsgType::ok);
        e.scalar<int32_t>(Tag::pos, fw ? fw->pos() : 0);
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }

    void wipe_all() {
        abandon();
        wipe(acc);
        wipe(xs);
        wipe(wr);
        wipe(pre_r);
        wipe(pre_wr);
        wipe(pre_plain);
        wipe(seal_key);
        seal_key.clear();
        SecretVector<uint8_t>().swap(model_key);
        eph.reset();
        table.clear();
        table_next.clear();
        package = false;
        pre.clear();
        kept_bytes = 0;
        projs.clear();
        fw.reset();
        sampler.reset();
        masks.reset();
        noise.reset();
        phase = Phase::fresh;
    }
};

TrustedCore::TrustedCore(const si_ocall_table* ocalls, const si_platform* platform) : impl_(std::make_unique<Impl>()) {
    if (ocalls) ocalls_ = *ocalls;
    if (ocalls && ocalls->parallel_for) impl_->pool = std::make_unique<ThreadPool>(ocalls->parallel_for, ocalls->ctx);
    if (platform) {
        Impl& c = *impl_;
        c.has_platform = true;
        c.quote_type = platform->quote_type ? platform->quote_type : "";
        std::memcpy(c.measurement.data(), platform->measurement, c.measurement.size());
        c.sealing_key.assign(platform->sealing_key, platform->sealing_key + sizeof platform->sealing_key);
        c.quote_fn = platform->quote;
        c.quote_ctx = platform->ctx;
    }
}

TrustedCore::~TrustedCore() { impl_->wipe_all(); }

std::vector<uint8_t> TrustedCore::process(std::span<const uint8_t> request) {
    if (failed_)
        fail(Status::integrity, "the session was stopped after an integrity failure; no further output is released");
    Impl& c = *impl_;
    try {
        const Message m = wire::decode(request);
        switch (m.type()) {
            case MsgType::configure: c.configure(m); return c.ok();
            case MsgType::upload: c.upload(m); return c.ok();
            case MsgType::finalize: return c.finalize();
            case MsgType::sampler: c.set_sampler(m); return c.ok();
            case MsgType::eval: return c.eval(m);
            case MsgType::products: return c.products(m);
            case MsgType::unit: return c.unit(m);
            case MsgType::precompute: return c.precompute(m);
            case MsgType::reset: return c.reset();
            case MsgType::attest: return c.attest(m);
            case MsgType::release: return c.release(m);
            case MsgType::unseal: c.unseal(m); return c.ok();
            case MsgType::manifest: c.manifest(m); return c.ok();
            case MsgType::upload_secret: c.upload_secret(m); return c.ok();
            default: bad(std::string("unexpected message type ") + wire::msg_type_name(m.type()) + " in a request");
        }
    } catch (const Error& e) {
        if (e.status() == Status::integrity) {
            // Latch: wipe every secret and refuse everything from now on.
            failed_ = true;
            c.wipe_all();
            if (ocalls_.log) ocalls_.log(ocalls_.ctx, 2, e.what());
        } else if (c.pending.active || (c.fw && c.fw->in_pass())) {
            // A malformed request in the middle of a pass abandons the pass (its pads are never reused).
            c.abandon();
        }
        throw;
    } catch (...) {
        c.abandon();
        throw;
    }
}

}  // namespace si
