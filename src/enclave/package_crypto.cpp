#include "enclave/package_crypto.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace si::pkg {

namespace {

[[noreturn]] void crypto_fail(const char* what) { fail(Status::internal, std::string(what) + " failed (libcrypto)"); }

void put(std::vector<uint8_t>& a, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) a.push_back(uint8_t(v >> (8 * i)));
}
uint64_t get(const uint8_t* p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
    return v;
}

struct PKey {
    EVP_PKEY* k = nullptr;
    ~PKey() { EVP_PKEY_free(k); }
};
struct PKeyCtx {
    EVP_PKEY_CTX* c = nullptr;
    ~PKeyCtx() { EVP_PKEY_CTX_free(c); }
};
struct MdCtx {
    EVP_MD_CTX* c = EVP_MD_CTX_new();
    ~MdCtx() { EVP_MD_CTX_free(c); }
};

}  // namespace

Hash sha256(std::span<const uint8_t> data) {
    Hash h{};
    unsigned int n = 0;
    if (EVP_Digest(data.data(), data.size(), h.data(), &n, EVP_sha256(), nullptr) != 1 || n != h.size())
        crypto_fail("SHA-256");
    return h;
}

Sha256Stream::Sha256Stream() : c_(EVP_MD_CTX_new()) {
    if (!c_ || EVP_DigestInit_ex(c_, EVP_sha256(), nullptr) != 1) {
        EVP_MD_CTX_free(c_);
        crypto_fail("SHA-256");
    }
}
Sha256Stream::~Sha256Stream() { EVP_MD_CTX_free(c_); }
void Sha256Stream::update(const void* data, size_t n) {
    if (!c_ || EVP_DigestUpdate(c_, data, n) != 1) crypto_fail("SHA-256");
}
Hash Sha256Stream::finish() {
    Hash h{};
    unsigned int n = 0;
    if (!c_ || EVP_DigestFinal_ex(c_, h.data(), &n) != 1 || n != h.size() ||
        EVP_DigestInit_ex(c_, EVP_sha256(), nullptr) != 1)
        crypto_fail("SHA-256");
    return h;
}

Hash combine_leaves(uint64_t total_bytes, std::span<const Hash> leaves) {
    Sha256Stream s;
    s.update("SIPUB v1", 8);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(total_bytes >> (8 * i));
    s.update(len, 8);
    for (const Hash& h : leaves) s.update(h.data(), h.size());
    return s.finish();
}

Hash public_tensor_digest(std::span<const uint8_t> bytes) {
    std::vector<Hash> leaves;
    for (size_t at = 0; at < bytes.size(); at += kLeafBytes)
        leaves.push_back(sha256(bytes.subspan(at, std::min(kLeafBytes, bytes.size() - at))));
    return combine_leaves(bytes.size(), leaves);
}

Hash hmac_sha256(std::span<const uint8_t> key, std::span<const uint8_t> data) {
    Hash h{};
    unsigned int n = 0;
    if (!HMAC(EVP_sha256(), key.data(), int(key.size()), data.data(), data.size(), h.data(), &n) || n != h.size())
        crypto_fail("HMAC-SHA256");
    return h;
}

void hkdf(std::span<const uint8_t> ikm, std::span<const uint8_t> salt, std::string_view info, std::span<uint8_t> out) {
    PKeyCtx x;
    x.c = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
    static const uint8_t kNoSalt = 0;
    if (!x.c || EVP_PKEY_derive_init(x.c) <= 0 || EVP_PKEY_CTX_set_hkdf_md(x.c, EVP_sha256()) <= 0 ||
        EVP_PKEY_CTX_set1_hkdf_salt(x.c, salt.empty() ? &kNoSalt : salt.data(), int(salt.size())) <= 0 ||
        EVP_PKEY_CTX_set1_hkdf_key(x.c, ikm.data(), int(ikm.size())) <= 0 ||
        EVP_PKEY_CTX_add1_hkdf_info(x.c, reinterpret_cast<const unsigned char*>(info.data()), int(info.size())) <= 0)
        crypto_fail("HKDF setup");
    size_t n = out.size();
    if (EVP_PKEY_derive(x.c, out.data(), &n) <= 0 || n != out.size()) crypto_fail("HKDF");
}

bool equal(std::span<const uint8_t> a, std::span<const uint8_t> b) {
    return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

void random_bytes(std::span<uint8_t> out) {
    if (!out.empty() && RAND_priv_bytes(out.data(), int(out.size())) != 1)
        fail(Status::internal, "no randomness available from the operating system");
}

namespace {
// An AES-256-GCM context for one direction (1: encrypt, 0: decrypt) with our IV length; keys and IVs come per message.
EVP_CIPHER_CTX* new_gcm_context(int encrypt) {
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    if (!c || EVP_CipherInit_ex(c, EVP_aes_256_gcm(), nullptr, nullptr, nullptr, encrypt) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, int(kIvBytes), nullptr) != 1) {
        EVP_CIPHER_CTX_free(c);
        crypto_fail("AES-256-GCM set-up");
    }
    return c;
}
}  // namespace

GcmSealer::GcmSealer() : c_(new_gcm_context(1)) {}

GcmSealer::~GcmSealer() { EVP_CIPHER_CTX_free(c_); }

void GcmSealer::seal(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
                     uint8_t* out) {
    int len = 0;
    if (n > size_t(INT32_MAX)) fail(Status::invalid_argument, "AES-GCM: message too large");
    if (EVP_EncryptInit_ex(c_, nullptr, nullptr, key, iv) != 1 ||
        (!aad.empty() && EVP_EncryptUpdate(c_, nullptr, &len, aad.data(), int(aad.size())) != 1) ||
        (n && EVP_EncryptUpdate(c_, out, &len, in, int(n)) != 1) || EVP_EncryptFinal_ex(c_, out + n, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c_, EVP_CTRL_GCM_GET_TAG, int(kTagBytes), out + n) != 1)
        crypto_fail("AES-256-GCM encryption");
}

void gcm_seal(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out) {
    GcmSealer().seal(key, iv, aad, in, n, out);
}

GcmOpener::GcmOpener() : c_(new_gcm_context(0)) {}

GcmOpener::~GcmOpener() { EVP_CIPHER_CTX_free(c_); }

bool GcmOpener::open(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
                     uint8_t* out) {
    if (n > size_t(INT32_MAX)) return false;
    int len = 0;
    uint8_t tag[kTagBytes];
    std::memcpy(tag, in + n, kTagBytes);
    const bool ok = EVP_DecryptInit_ex(c_, nullptr, nullptr, key, iv) == 1 &&
                    (aad.empty() || EVP_DecryptUpdate(c_, nullptr, &len, aad.data(), int(aad.size())) == 1) &&
                    (n == 0 || EVP_DecryptUpdate(c_, out, &len, in, int(n)) == 1) &&
                    EVP_CIPHER_CTX_ctrl(c_, EVP_CTRL_GCM_SET_TAG, int(kTagBytes), tag) == 1 &&
                    EVP_DecryptFinal_ex(c_, out + n, &len) == 1;
    if (!ok && n) OPENSSL_cleanse(out, n);
    return ok;
}

bool gcm_open(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out) {
    return GcmOpener().open(key, iv, aad, in, n, out);
}

std::string to_hex(std::span<const uint8_t> bytes) {
    static const char* const kDigits = "0123456789abcdef";
    std::string s;
    s.reserve(bytes.size() * 2);
    for (uint8_t b : bytes) {
        s.push_back(kDigits[b >> 4]);
        s.push_back(kDigits[b & 15]);
    }
    return s;
}

bool from_hex(std::string_view hex, std::span<uint8_t> out) {
    if (hex.size() != out.size() * 2) return false;
    auto nib = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    for (size_t i = 0; i < out.size(); ++i) {
        const int hi = nib(hex[2 * i]), lo = nib(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = uint8_t(hi << 4 | lo);
    }
    return true;
}

void derive_model_key(const Key& owner_key, const ModelId& id, uint8_t* out) {
    hkdf(owner_key, id, "secureinfer model key v1", std::span<uint8_t>(out, kKeyBytes));
}

void derive_manifest_key(const uint8_t* model_key, const ModelId& id, uint8_t* out) {
    hkdf(std::span<const uint8_t>(model_key, kKeyBytes), id, "secureinfer manifest v1",
         std::span<uint8_t>(out, kKeyBytes));
}

void derive_tensor_key(const uint8_t* model_key, const ModelId& id, std::string_view name, uint8_t* out) {
    std::string info = "secureinfer tensor v1";
    info.push_back('\0');
    info.append(name);
    hkdf(std::span<const uint8_t>(model_key, kKeyBytes), id, info, std::span<uint8_t>(out, kKeyBytes));
}

std::array<uint8_t, kHeaderBytes> encode_header(const Header& h) {
    std::vector<uint8_t> a(kMagic, kMagic + 8);
    put(a, h.version, 4);
    put(a, h.release, 4);
    a.insert(a.end(), h.model_id.begin(), h.model_id.end());
    put(a, h.manifest_len, 8);
    put(a, h.table_len, 8);
    put(a, h.payload_offset, 8);
    put(a, 0, 8);
    std::array<uint8_t, kHeaderBytes> out{};
    std::memcpy(out.data(), a.data(), kHeaderBytes);
    return out;
}

Header decode_header(std::span<const uint8_t> b) {
    if (b.size() < kHeaderBytes)
        fail(Status::format, "package truncated: " + std::to_string(b.size()) + " bytes, shorter than its " +
                                 std::to_string(kHeaderBytes) + "-byte header");
    if (std::memcmp(b.data(), kMagic, 8) != 0) fail(Status::format, "not a secureinfer package (bad magic)");
    Header h;
    h.version = uint32_t(get(b.data() + 8, 4));
    if (h.version != kFormatVersion)
        fail(Status::unsupported, "package format version " + std::to_string(h.version) +
                                      " is not supported (this build reads version " +
                                      std::to_string(kFormatVersion) + ")" +
                                      (h.version < kFormatVersion ? "; pack the model again" : ""));
    h.release = uint32_t(get(b.data() + 12, 4));
    if ((h.release & ~(kReleaseLogprobsMask | kReleaseNll)) != 0 || get(b.data() + 56, 8) != 0)
        fail(Status::format, "package header: non-zero reserved fields");
    std::memcpy(h.model_id.data(), b.data() + 16, kIdBytes);
    h.manifest_len = get(b.data() + 32, 8);
    h.table_len = get(b.data() + 40, 8);
    h.payload_offset = get(b.data() + 48, 8);
    const uint64_t limit = uint64_t(1) << 30;
    if (h.manifest_len == 0 || h.manifest_len > limit || h.table_len > limit ||
        h.payload_offset != kHeaderBytes + h.manifest_len + h.table_len + kHashBytes)
        fail(Status::format, "package header: manifest, table and payload lengths do not add up");
    return h;
}

void put_f32(std::vector<uint8_t>& a, float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    put(a, u, 4);
}

namespace {

float get_f32(const uint8_t* p) {
    const uint32_t u = uint32_t(get(p, 4));
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

constexpr size_t kSecretEntryBytes = 36, kConfigBytes = 7 * 4 + 2 * 4 + 4, kPolicyBytes = 16, kDigestBytes = 52;
constexpr char kBindMagic[4] = {'B', 'I', 'N', 'D'};

}  // namespace

std::vector<uint8_t> encode_table(const Table& t) {
    std::vector<uint8_t> a;
    put(a, t.secrets.size(), 4);
    for (const auto& e : t.secrets) {
        put(a, e.kind, 4);
        put(a, uint32_t(e.layer), 4);
        put(a, uint32_t(e.proj), 4);
        put(a, e.elements, 8);
        put(a, e.chunk_elements, 8);
        put(a, e.n_chunks, 4);
        put_f32(a, e.scale);
    }
    a.insert(a.end(), kBindMagic, kBindMagic + 4);
    const BoundConfig& c = t.config;
    for (int32_t v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len})
        put(a, uint32_t(v), 4);
    put_f32(a, c.rope_theta);
    put_f32(a, c.norm_eps);
    put(a, c.tied, 4);
    put(a, c.rope_freq_factors.size(), 4);
    for (float f : c.rope_freq_factors) put_f32(a, f);
    put_f32(a, t.sampling.max_temperature);
    put(a, uint32_t(t.sampling.min_top_k), 4);
    put_f32(a, t.sampling.min_top_p);
    put_f32(a, t.sampling.min_logprob_noise);
    put(a, t.publics.size(), 4);
    for (const auto& d : t.publics) {
        put(a, d.kind, 4);
        put(a, uint32_t(d.layer), 4);
        put(a, uint32_t(d.proj), 4);
        put(a, d.bytes, 8);
        a.insert(a.end(), d.sha256.begin(), d.sha256.end());
    }
    return a;
}

Table decode_table(std::span<const uint8_t> b) {
    Table t;
    size_t at = 0;
    auto need = [&](size_t n, const char* what) {
        if (n > b.size() - at) fail(Status::format, std::string("package table truncated in ") + what);
    };
    need(4, "the secret entry count");
    const uint64_t n = get(b.data(), 4);
    at = 4;
    if (n > (b.size() - at) / kSecretEntryBytes)
        fail(Status::format, "package secret table: " + std::to_string(n) + " entries do not fit its " +
                                 std::to_string(b.size()) + " bytes");
    t.secrets.resize(static_cast<size_t>(n));
    for (size_t i = 0; i < t.secrets.size(); ++i, at += kSecretEntryBytes) {
        const uint8_t* p = b.data() + at;
        SecretEntry& e = t.secrets[i];
        e.kind = uint32_t(get(p, 4));
        e.layer = int32_t(uint32_t(get(p + 4, 4)));
        e.proj = int32_t(uint32_t(get(p + 8, 4)));
        e.elements = get(p + 12, 8);
        e.chunk_elements = get(p + 20, 8);
        e.n_chunks = uint32_t(get(p + 28, 4));
        e.scale = get_f32(p + 32);
        if (e.elements == 0 || e.chunk_elements == 0 || e.chunk_elements > kChunkElements ||
            e.n_chunks != (e.elements + e.chunk_elements - 1) / e.chunk_elements)
            fail(Status::format, "package secret table: entry " + std::to_string(i) + " has inconsistent sizes");
    }
    need(4 + kConfigBytes + 4 + kPolicyBytes + 4, "the public model binding");
    if (std::memcmp(b.data() + at, kBindMagic, 4) != 0)
        fail(Status::format, "package table: no public model binding after the secret entries");
    at += 4;
    const uint8_t* p = b.data() + at;
    BoundConfig& c = t.config;
    int32_t* ints[] = {&c.dim, &c.hidden_dim, &c.n_layers, &c.n_heads, &c.n_kv_heads, &c.vocab_size, &c.seq_len};
    for (int i = 0; i < 7; ++i) *ints[i] = int32_t(uint32_t(get(p + 4 * i, 4)));
    c.rope_theta = get_f32(p + 28);
    c.norm_eps = get_f32(p + 32);
    c.tied = uint32_t(get(p + 36, 4));
    at += kConfigBytes;
    const uint64_t nf = get(b.data() + at, 4);
    at += 4;
    if (nf > kMaxRopeFactors || nf * 4 > b.size() - at || b.size() - at - nf * 4 < kPolicyBytes + 4)
        fail(Status::format, "package table: " + std::to_string(nf) + " RoPE frequency factors do not fit its " +
                                 std::to_string(b.size() - at) + " remaining bytes");
    c.rope_freq_factors.resize(static_cast<size_t>(nf));
    for (float& f : c.rope_freq_factors) {
        f = get_f32(b.data() + at);
        at += 4;
    }
    p = b.data() + at;
    SamplingPolicy& s = t.sampling;
    s.max_temperature = get_f32(p);
    s.min_top_k = int32_t(uint32_t(get(p + 4, 4)));
    s.min_top_p = get_f32(p + 8);
    s.min_logprob_noise = get_f32(p + 12);
    at += kPolicyBytes;
    if (!(s.max_temperature >= 0.0f && s.max_temperature <= 1000.0f) || s.min_top_k < 0 ||
        !(s.min_top_p >= 0.0f && s.min_top_p <= 1.0f) || !(s.min_logprob_noise >= 0.0f && s.min_logprob_noise <= 1e6f))
        fail(Status::format, "package table: sampling policy out of range");
    const uint64_t m = get(b.data() + at, 4);
    at += 4;
    if (m > (b.size() - at) / kDigestBytes || at + m * kDigestBytes != b.size())
        fail(Status::format, "package table: " + std::to_string(m) + " public tensor digests do not fit its " +
                                 std::to_string(b.size() - at) + " remaining bytes");
    t.publics.resize(static_cast<size_t>(m));
    for (auto& d : t.publics) {
        p = b.data() + at;
        d.kind = uint32_t(get(p, 4));
        d.layer = int32_t(uint32_t(get(p + 4, 4)));
        d.proj = int32_t(uint32_t(get(p + 8, 4)));
        d.bytes = get(p + 12, 8);
        std::memcpy(d.sha256.data(), p + 20, kHashBytes);
        at += kDigestBytes;
    }
    return t;
}

std::string secret_tensor_name(uint32_t kind, int layer, int proj) {
    // TensorKind values of boundary/enclave_messages.h
    const std::string blk = "blk." + std::to_string(layer) + ".";
    static const char* const kStems[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"};
    const bool proj_ok = proj >= 0 && proj < 7;
    switch (kind) {
        case 0: return "token_embd.weight";
        case 1: return "output_norm.weight";
        case 2: return "output.weight";
        case 3: return blk + "attn_norm.weight";
        case 4: return blk + "ffn_norm.weight";
        case 5: return proj_ok ? blk + kStems[proj] + ".weight" : "";
        case 7: return proj_ok ? blk + kStems[proj] + ".weight.lora_a" : "";
        case 8: return proj_ok ? blk + kStems[proj] + ".weight.lora_b" : "";
        default: return "";
    }
}

std::vector<uint8_t> chunk_aad(const ModelId& id, std::string_view name, uint32_t chunk, uint32_t n_chunks,
                               uint64_t elements) {
    std::vector<uint8_t> a = {'S', 'I', 'P', 'T'};
    put(a, kFormatVersion, 4);
    a.insert(a.end(), id.begin(), id.end());
    put(a, name.size(), 2);
    a.insert(a.end(), name.begin(), name.end());
    put(a, chunk, 4);
    put(a, n_chunks, 4);
    put(a, elements, 8);
    return a;
}

std::array<uint8_t, kIvBytes> chunk_iv(uint32_t chunk) {
    std::array<uint8_t, kIvBytes> iv{};
    for (int i = 0; i < 4; ++i) iv[size_t(i)] = uint8_t(chunk >> (8 * i));
    return iv;
}

std::array<uint8_t, kReportBytes> encode_report(const Report& r) {
    std::array<uint8_t, kReportBytes> a{};
    const uint8_t head[8] = {'S', 'I', 'R', 'P', 1, 0, 0, 0};
    std::memcpy(a.data(), head, 8);
    std::memcpy(a.data() + 8, r.measurement.data(), 32);
    std::memcpy(a.data() + 40, r.nonce.data(), 32);
    std::memcpy(a.data() + 72, r.enclave_pub.data(), 32);
    return a;
}

Report decode_report(std::span<const uint8_t> b) {
    const uint8_t head[8] = {'S', 'I', 'R', 'P', 1, 0, 0, 0};
    if (b.size() != kReportBytes || std::memcmp(b.data(), head, 8) != 0)
        fail(Status::format, "malformed attestation report");
    Report r;
    std::memcpy(r.measurement.data(), b.data() + 8, 32);
    std::memcpy(r.nonce.data(), b.data() + 40, 32);
    std::memcpy(r.enclave_pub.data(), b.data() + 72, 32);
    return r;
}

void derive_wrap_key(std::span<const uint8_t> shared, const Report& r, const PubKey& server_pub, const ModelId& id,
                     uint8_t* out) {
    std::string info = "secureinfer key release v1";
    info.append(reinterpret_cast<const char*>(r.measurement.data()), 32);
    info.append(reinterpret_cast<const char*>(r.enclave_pub.data()), 32);
    info.append(reinterpret_cast<const char*>(server_pub.data()), 32);
    info.append(reinterpret_cast<const char*>(id.data()), id.size());
    hkdf(shared, r.nonce, info, std::span<uint8_t>(out, kKeyBytes));
}

X25519Pair x25519_generate() {
    X25519Pair p;
    p.priv.assign(32, 0);
    random_bytes(p.priv);
    PKey k;
    k.k = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, p.priv.data(), 32);
    size_t n = 32;
    if (!k.k || EVP_PKEY_get_raw_public_key(k.k, p.pub.data(), &n) != 1 || n != 32) crypto_fail("X25519 key generation");
    return p;
}

void x25519_derive(const uint8_t* priv, const PubKey& peer, uint8_t* out) {
    PKey mine, theirs;
    mine.k = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, priv, 32);
    theirs.k = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, peer.data(), 32);
    if (!mine.k || !theirs.k) fail(Status::security, "X25519: unusable public key");
    PKeyCtx x;
    x.c = EVP_PKEY_CTX_new(mine.k, nullptr);
    size_t n = 32;
    // OpenSSL refuses an all-zero shared secret (a low-order peer key).
    if (!x.c || EVP_PKEY_derive_init(x.c) != 1 || EVP_PKEY_derive_set_peer(x.c, theirs.k) != 1 ||
        EVP_PKEY_derive(x.c, out, &n) != 1 || n != 32)
        fail(Status::security, "X25519: key agreement failed (degenerate public key)");
}

PubKey ed25519_public(const uint8_t* seed) {
    PKey k;
    k.k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed, 32);
    PubKey pub{};
    size_t n = 32;
    if (!k.k || EVP_PKEY_get_raw_public_key(k.k, pub.data(), &n) != 1 || n != 32) crypto_fail("Ed25519 key");
    return pub;
}

std::array<uint8_t, kSigBytes> ed25519_sign(const uint8_t* seed, std::span<const uint8_t> msg) {
    PKey k;
    k.k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed, 32);
    MdCtx m;
    std::array<uint8_t, kSigBytes> sig{};
    size_t n = sig.size();
    if (!k.k || !m.c || EVP_DigestSignInit(m.c, nullptr, nullptr, nullptr, k.k) != 1 ||
        EVP_DigestSign(m.c, sig.data(), &n, msg.data(), msg.size()) != 1 || n != sig.size())
        crypto_fail("Ed25519 signing");
    return sig;
}

bool ed25519_verify(const PubKey& pub, std::span<const uint8_t> msg, std::span<const uint8_t> sig) {
    if (sig.size() != kSigBytes) return false;
    PKey k;
    k.k = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, pub.data(), pub.size());
    MdCtx m;
    return k.k && m.c && EVP_DigestVerifyInit(m.c, nullptr, nullptr, nullptr, k.k) == 1 &&
           EVP_DigestVerify(m.c, sig.data(), sig.size(), msg.data(), msg.size()) == 1;
}

std::vector<uint8_t> encode_quote_body(std::string_view type, std::span<const uint8_t> report, const PubKey& quoting_pub) {
    std::vector<uint8_t> q = {'S', 'I', 'Q', 'T', 1, 0};
    put(q, type.size(), 2);
    q.insert(q.end(), type.begin(), type.end());
    put(q, report.size(), 4);
    q.insert(q.end(), report.begin(), report.end());
    q.insert(q.end(), quoting_pub.begin(), quoting_pub.end());
    return q;
}

Quote decode_quote(std::span<const uint8_t> b) {
    auto bad = [](const std::string& why) { fail(Status::format, "malformed quote: " + why); };
    if (b.size() < 8 || std::memcmp(b.data(), "SIQT\x01\x00", 6) != 0) bad("bad magic or version");
    const size_t tl = size_t(get(b.data() + 6, 2));
    if (tl == 0 || tl > 64 || b.size() < 8 + tl + 4) bad("bad type length");
    Quote q;
    q.type.assign(reinterpret_cast<const char*>(b.data() + 8), tl);
    const size_t rl = size_t(get(b.data() + 8 + tl, 4));
    const size_t at = 12 + tl;
    if (rl != kReportBytes || b.size() != at + rl + kPubBytes + kSigBytes) bad("bad length");
    q.report = decode_report(b.subspan(at, rl));
    std::memcpy(q.quoting_pub.data(), b.data() + at + rl, kPubBytes);
    std::memcpy(q.signature.data(), b.data() + at + rl + kPubBytes, kSigBytes);
    q.signed_bytes.assign(b.begin(), b.begin() + std::ptrdiff_t(at + rl + kPubBytes));
    return q;
}

void warm_up() {
    Key k{};
    random_bytes(k);
    ModelId id{};
    uint8_t out[kKeyBytes + kTagBytes];
    derive_model_key(k, id, out);
    (void)hmac_sha256(k, k);
    (void)sha256(k);
    const X25519Pair a = x25519_generate(), b = x25519_generate();
    x25519_derive(a.priv.data(), b.pub, out);
    const auto sig = ed25519_sign(k.data(), k);
    (void)ed25519_verify(ed25519_public(k.data()), k, sig);
    const auto iv = chunk_iv(0);
    gcm_seal(k.data(), iv.data(), k, k.data(), k.size(), out);
    (void)gcm_open(k.data(), iv.data(), k, out, k.size(), out);
    OPENSSL_cleanse(k.data(), k.size());
    OPENSSL_cleanse(out, sizeof out);
}

std::array<uint8_t, kWrappedBytes> wrap_model_key(const uint8_t* model_key, const Report& r, const ModelId& id) {
    const X25519Pair eph = x25519_generate();
    SecretVector<uint8_t> shared(32), wrap(32);
    x25519_derive(eph.priv.data(), r.enclave_pub, shared.data());
    derive_wrap_key(shared, r, eph.pub, id, wrap.data());
    std::array<uint8_t, kWrappedBytes> out{};
    std::memcpy(out.data(), eph.pub.data(), kPubBytes);
    const uint8_t iv[kIvBytes] = {};  // the wrap key is used once
    gcm_seal(wrap.data(), iv, id, model_key, kKeyBytes, out.data() + kPubBytes);
    return out;
}

}  // namespace si::pkg
