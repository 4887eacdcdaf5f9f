// Loading a model into the trusted core: configure (sizes everything before allocating), plaintext uploads of the
// public tensors (and, outside packages, of adapters), finalize (packing, Freivalds keys, the offload plan) and the
// sampler settings.
#include "enclave/core_state.h"

#include <openssl/rand.h>

#include <algorithm>
#include <cmath>

namespace si {

using core::bad;
using core::wipe;
using core::kSealKeyBytes;

namespace {
// A projection's int8 rows are complete: its Freivalds key (offloaded ones) and packed form, the rows released at
// once (zeroed first when secret), so the core never holds a model's raw and packed weights together.
void pack_projection(core::ProjState& s, bool offload_mode) {
    s.offload = offload_mode && !s.secret;
    if (s.offload) s.key.emplace(s.raw.data(), s.rows, s.cols, nullptr);
    s.packed = PackedI8::pack(s.raw.data(), s.rows, s.cols, /*secret=*/s.secret);
    s.raw = MaybeSecretVector<int8_t>();
}
}  // namespace

void TrustedCore::Impl::configure(const Message& m) {
    if (phase != Phase::fresh) bad("configure: the core is already configured");
    const auto ints = m.array<int32_t>(Tag::cfg_ints, 8);
    const auto floats = m.array<float>(Tag::cfg_floats);
    if (floats.size() < 2) bad("configure: cfg_floats needs rope theta and norm epsilon");
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
    c.rope_freq_factors.assign(floats.begin() + 2, floats.end());  // validate() checks the count and values
    c.validate("configure");
    if (!std::isfinite(c.rope_theta) || !std::isfinite(c.norm_eps)) bad("configure: non-finite rope theta or norm epsilon");
    const int ctx = ints[7];
    if (ctx < 1 || ctx > c.seq_len)
        bad("configure: context length " + std::to_string(ctx) + " out of range [1, " + std::to_string(c.seq_len) + "]");
    const uint8_t off = m.scalar<uint8_t>(Tag::offload), t = m.scalar<uint8_t>(Tag::tied);
    const uint8_t serial = m.has(Tag::serial_decode) ? m.scalar<uint8_t>(Tag::serial_decode) : 0;
    if (off > 1 || t > 1 || serial > 1) bad("configure: offload, tied and serial_decode must be 0 or 1");
    const int32_t n_slots = m.has(Tag::slot_count) ? m.scalar<int32_t>(Tag::slot_count) : 1;
    if (n_slots < 1 || n_slots > core::kMaxSlots)
        bad("configure: slot count " + std::to_string(n_slots) + " out of range [1, " +
            std::to_string(core::kMaxSlots) + "]");
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
    const uint64_t one_kv = 2 * L * T * kv * 4;                        // one slot's KV cache at full context
    bytes += one_kv;
    bytes += T * (6 * d + 2 * kv + 3 * h) * 4 + T * std::max(d, h) * 16;  // pass and crossing scratch
    if (bytes > SI_TRUSTED_CORE_MAX_BYTES)
        fail(Status::out_of_memory, "configure: the model needs about " + std::to_string(bytes >> 20) +
                                        " MiB inside the trusted core, more than its limit of " +
                                        std::to_string(uint64_t(SI_TRUSTED_CORE_MAX_BYTES) >> 20) + " MiB");

    cfg = c;
    n_ctx = ctx;
    // The slots' caches grow with use; together they may take what the rest leaves of the core's limit.
    kv_limit = SI_TRUSTED_CORE_MAX_BYTES - (bytes - one_kv);
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
    seqs = std::vector<SeqSlot>(size_t(n_slots));
    for (SeqSlot& q : seqs) q.sampler = std::make_unique<Sampler>(q.params);
    phase = Phase::loading;
}

void TrustedCore::Impl::upload(const Message& m) {
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
        bind_chunk(key, what, dst + at, size_t(f.count) * 4, at + f.count == total);
    };

    switch (kind) {
        case TensorKind::tok_embeddings:
            f32_into(fw->tok_embeddings().data(), v * d, tensor_key(kind, 0, 0), "token_embd.weight");
            break;
        case TensorKind::final_norm:
            f32_into(fw->final_norm().data(), d, tensor_key(kind, 0, 0), "output_norm.weight");
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
            if (complete(kind, 0, 0, v * d)) bad("upload classifier: sent twice");  // it is packed already
            const uint64_t at = accept_chunk(tensor_key(kind, 0, 0), offset, f.count, total, v * d, "classifier");
            s.allocate_raw();
            m.copy(Tag::data_i8, s.raw.data() + at, f.count);
            bind_chunk(tensor_key(kind, 0, 0), "classifier", s.raw.data() + at, size_t(f.count), at + f.count == total);
            if (at + f.count == total) pack_projection(s, offload_mode);
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
            f32_into(fw->attn_norm(l).data(), d, tensor_key(kind, l, 0),
                     "blk." + std::to_string(l) + ".attn_norm.weight");
            break;
        }
        case TensorKind::ffn_norm: {
            const int l = layer_of();
            f32_into(fw->ffn_norm(l).data(), d, tensor_key(kind, l, 0),
                     "blk." + std::to_string(l) + ".ffn_norm.weight");
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
            if (complete(kind, l, int(p), n)) bad("upload " + what + ": sent twice");  // it is packed already
            const uint64_t at = accept_chunk(tensor_key(kind, l, int(p)), offset, f.count, total, n, what);
            s.allocate_raw();
            m.copy(Tag::data_i8, s.raw.data() + at, f.count);
            bind_chunk(tensor_key(kind, l, int(p)), what, s.raw.data() + at, size_t(f.count), at + f.count == total);
            if (at + f.count == total) pack_projection(s, offload_mode);
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

std::vector<uint8_t> TrustedCore::Impl::finalize() {
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
        // uploads were packed as they completed; the package's secret tensors and a secret tied classifier here
        if (!s.raw.empty()) pack_projection(s, offload_mode);
        plan[i] = s.offload ? 1 : 0;
    }
    received.clear();
    phase = Phase::ready;
    Encoder e(MsgType::plan);
    e.add(Tag::plan, plan);
    return e.finish();
}

void TrustedCore::Impl::set_sampler(const Message& m) {
    if (phase == Phase::fresh) bad("sampler: configure first");
    const float temp = m.scalar<float>(Tag::temperature), top_p = m.scalar<float>(Tag::top_p);
    const int32_t top_k = m.scalar<int32_t>(Tag::top_k), k = m.scalar<int32_t>(Tag::logprobs);
    const float noise_std = m.scalar<float>(Tag::logprob_noise);
    if (!std::isfinite(temp) || temp < 0.0f || temp > 1000.0f) bad("sampler: temperature out of range");
    if (!std::isfinite(top_p) || top_p < 0.0f || top_p > 1.0f) bad("sampler: top_p out of range [0, 1]");
    if (top_k < 0) bad("sampler: negative top_k");
    if (k < 0 || k > cfg.vocab_size) bad("sampler: log-probability count out of range [0, vocabulary size]");
    if (!std::isfinite(noise_std) || noise_std < 0.0f || noise_std > 1e6f) bad("sampler: noise out of range");
    const SamplerParams params{temp, top_k, top_p, m.scalar<uint64_t>(Tag::seed)};
    const int slot = slot_of(m, "sampler");
    check_sampling_policy(params, k, noise_std);
    SeqSlot& q = seqs[size_t(slot)];
    q.params = params;
    logprobs_k = k;
    logprob_noise = noise_std;
    q.sampler = std::make_unique<Sampler>(q.params);
}

// A package's owner bounds what a request may ask of the sampler (pkg::SamplingPolicy); checked when the settings
// arrive and again when a pass starts, since the host may send them before the manifest.
void TrustedCore::Impl::check_sampling_policy(const SamplerParams& p, int k, float noise) const {
    if (!package) return;
    const pkg::SamplingPolicy& pol = sampling_policy;
    auto refuse = [](const std::string& why) { fail(Status::invalid_argument, "the package's owner does not allow " + why); };
    if (p.temperature > pol.max_temperature)
        refuse("a temperature above " + std::to_string(pol.max_temperature) + " (asked: " +
               std::to_string(p.temperature) + ")");
    if (p.temperature > 0.0f && p.top_k > 0 && p.top_k < pol.min_top_k)
        refuse("top_k below " + std::to_string(pol.min_top_k) + " (asked: " + std::to_string(p.top_k) + "; 0 disables it)");
    if (p.temperature > 0.0f && p.top_p < pol.min_top_p)
        refuse("top_p below " + std::to_string(pol.min_top_p) + " (asked: " + std::to_string(p.top_p) + ")");
    if (k > 0 && noise < pol.min_logprob_noise)
        refuse("log-probabilities with noise below " + std::to_string(pol.min_logprob_noise) + " (asked: " +
               std::to_string(noise) + ")");
}

// Accepts a chunk [offset, offset + n) of a tensor of `total` elements: chunks must come in order.
uint64_t TrustedCore::Impl::accept_chunk(uint64_t key, uint64_t offset, uint64_t n, uint64_t total, uint64_t expected_total,
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

}  // namespace si
