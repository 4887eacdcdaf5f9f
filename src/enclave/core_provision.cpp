// Protected packages inside the trusted core (docs/PACKAGES.md): attestation, key release and sealing, the
// authenticated manifest, and the encrypted uploads of secret tensors.
#include "enclave/core_state.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace si {

using core::bad;
using core::wipe;

// Answers a verifier's nonce with a quote over (measurement, nonce, a fresh ephemeral X25519 public key).
std::vector<uint8_t> TrustedCore::Impl::attest(const Message& m) {
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
std::vector<uint8_t> TrustedCore::Impl::seal_model_key() {
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

std::vector<uint8_t> TrustedCore::Impl::release(const Message& m) {
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

void TrustedCore::Impl::unseal(const Message& m) {
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

// Whether a plaintext upload would replace (part of) a tensor the package keeps secret.
bool TrustedCore::Impl::package_secret(TensorKind kind, const Message& m) const {
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
void TrustedCore::Impl::manifest(const Message& m) {
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
    pkg::Table tb = pkg::decode_table(b.subspan(size_t(pkg::kHeaderBytes + h.manifest_len), size_t(h.table_len)));
    // The owner bound the model configuration: a host that configured another model (other sizes, another rope
    // theta, an untied classifier of its own) would run the secret tensors inside a network of its choosing.
    check_bound_config(tb.config);
    std::vector<pkg::SecretEntry>& t = tb.secrets;
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
    bound.clear();
    for (const pkg::PublicDigest& pd : tb.publics) {
        if (pd.kind > wire::kMaxTensorKind || !bound.try_emplace(tensor_key(TensorKind(pd.kind), pd.layer, pd.proj), pd.bytes,
                                                                 pd.sha256).second)
            fail(Status::format, "manifest: public tensor digest of kind " + std::to_string(pd.kind) + " (layer " +
                                     std::to_string(pd.layer) + ") is invalid or listed twice");
    }
    table = std::move(t);
    table_next.assign(table.size(), 0);
    package = true;
    release_policy = h.release;
    sampling_policy = tb.sampling;
    // Draws of a package's sampler come from a key only this enclave on this device holds (see sample_seed).
    draw_key.assign(pkg::kKeyBytes, 0);
    pkg::hkdf(sealing_key, model_id, "secureinfer sampler draws v1", draw_key);
}

void TrustedCore::Impl::check_bound_config(const pkg::BoundConfig& want) const {
    const pkg::BoundConfig have{cfg.dim,      cfg.hidden_dim, cfg.n_layers,   cfg.n_heads,    cfg.n_kv_heads,
                                cfg.vocab_size, cfg.seq_len,  cfg.rope_theta, cfg.norm_eps,   tied ? 1u : 0u,
                                cfg.rope_freq_factors};
    auto field = [&](const char* name, double h, double w) {
        if (h == w) return;
        char msg[256];
        std::snprintf(msg, sizeof msg, "manifest: the model configuration the host sent differs from the package's: "
                      "%s %.9g, the owner bound %.9g; the session is stopped", name, h, w);
        fail(Status::integrity, msg);
    };
    field("dim", have.dim, want.dim);
    field("hidden_dim", have.hidden_dim, want.hidden_dim);
    field("n_layers", have.n_layers, want.n_layers);
    field("n_heads", have.n_heads, want.n_heads);
    field("n_kv_heads", have.n_kv_heads, want.n_kv_heads);
    field("vocab_size", have.vocab_size, want.vocab_size);
    field("seq_len", have.seq_len, want.seq_len);
    field("rope_theta", have.rope_theta, want.rope_theta);
    field("norm_eps", have.norm_eps, want.norm_eps);
    field("tied classifier", have.tied, want.tied);
    // RoPE frequency factors (Llama 3.1 scaling) change every rotation after position 0: a host that drops or
    // alters them runs the secret tensors in another network.
    field("rope frequency factors: count", double(have.rope_freq_factors.size()), double(want.rope_freq_factors.size()));
    for (size_t i = 0; i < have.rope_freq_factors.size(); ++i) {
        const std::string name = "rope frequency factor " + std::to_string(i) + ":";
        field(name.c_str(), have.rope_freq_factors[i], want.rope_freq_factors[i]);
    }
    if (!(have == want)) fail(Status::integrity, "manifest: the model configuration differs from the package's");
}

// A chunk of a public tensor uploaded in the clear, [bytes] at `data`; `last` when it completes the tensor. Under a
// package every such tensor must be one the manifest binds, byte for byte: its whole leaves are hashed in parallel,
// a leaf split across chunks as its parts arrive.
void TrustedCore::Impl::bind_chunk(uint64_t key, const std::string& what, const void* data, size_t bytes, bool last) {
    if (!package) return;
    const auto it = bound.find(key);
    if (it == bound.end())
        fail(Status::integrity, "upload " + what + ": the package's manifest binds no such public tensor; the "
                                "session is stopped");
    BoundTensor& b = it->second;
    auto mismatch = [&] {
        fail(Status::integrity, "upload " + what + ": the public tensor differs from the one the package's owner "
                                "bound (SHA-256 mismatch); the session is stopped");
    };
    if (bytes > b.bytes - b.seen) mismatch();
    b.seen += bytes;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    size_t n = bytes;
    constexpr size_t L = pkg::kLeafBytes;
    if (b.partial_fill > 0) {
        const size_t take = std::min(n, L - b.partial_fill);
        b.partial.update(p, take);
        b.partial_fill += take;
        p += take;
        n -= take;
        if (b.partial_fill == L) {
            b.leaves.push_back(b.partial.finish());
            b.partial_fill = 0;
        }
    }
    if (const size_t whole = n / L; whole > 0) {
        const size_t base = b.leaves.size();
        b.leaves.resize(base + whole);
        std::atomic<bool> failed{false};
        auto leaves = [&](int64_t begin, int64_t end) {
            try {
                for (int64_t i = begin; i < end; ++i)
                    b.leaves[base + size_t(i)] = pkg::sha256(std::span<const uint8_t>(p + size_t(i) * L, L));
            } catch (...) {
                failed = true;
            }
        };
        if (pool)
            pool->parallel_for(int64_t(whole), 1, leaves);
        else
            leaves(0, int64_t(whole));
        if (failed) fail(Status::internal, "upload " + what + ": hashing failed");
        p += whole * L;
        n -= whole * L;
    }
    if (n > 0) {
        b.partial.update(p, n);
        b.partial_fill = n;
    }
    if (!last) return;
    if (b.partial_fill > 0) b.leaves.push_back(b.partial.finish());
    b.partial_fill = 0;
    if (b.seen != b.bytes || !pkg::equal(pkg::combine_leaves(b.bytes, b.leaves), b.digest)) mismatch();
    b.leaves = {};
}

bool TrustedCore::Impl::secret_entry_in(const std::vector<pkg::SecretEntry>& t, size_t before, uint32_t kind, int layer, int p) {
    for (size_t i = 0; i < before && i < t.size(); ++i)
        if (t[i].kind == kind && t[i].layer == layer && t[i].proj == p) return true;
    return false;
}

// Opens one chunk of a secret tensor straight into its place (quantising matrices to int8 rows).
void TrustedCore::Impl::upload_secret(const Message& m) {
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

}  // namespace si
