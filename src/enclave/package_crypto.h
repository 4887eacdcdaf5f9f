// Cryptography of protected model packages, attestation reports and sealed keys (docs/PACKAGES.md), shared by the
// trusted core (which opens packages and unwraps keys) and the model owner's tools (pack, keyserver), so that both
// sides derive the same keys and bind the same associated data. Pure functions over libcrypto; no I/O.
//
// Keys, all HKDF-SHA256:
//   model key    = HKDF(owner key, salt = model id, "secureinfer model key v1")        one per package
//   manifest key = HKDF(model key, salt = model id, "secureinfer manifest v1")         HMAC of the package header
//   tensor key   = HKDF(model key, salt = model id, "secureinfer tensor v1" 0 name)    AES-256-GCM, per tensor
//   wrap key     = HKDF(X25519 shared secret, salt = nonce, "secureinfer key release v1" | measurement |
//                       enclave public key | keyserver public key | model id)           key release to one enclave
//   sealing key  = HKDF(device secret, salt = measurement, "secureinfer sealing key v1") (the platform derives it)
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/secret_memory.h"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_md_ctx_st EVP_MD_CTX;

namespace si::pkg {

constexpr size_t kKeyBytes = 32, kIdBytes = 16, kNonceBytes = 32, kHashBytes = 32, kPubBytes = 32;
constexpr size_t kIvBytes = 12, kTagBytes = 16, kSigBytes = 64;

using Key = std::array<uint8_t, kKeyBytes>;
using ModelId = std::array<uint8_t, kIdBytes>;
using Hash = std::array<uint8_t, kHashBytes>;
using Nonce = std::array<uint8_t, kNonceBytes>;
using PubKey = std::array<uint8_t, kPubBytes>;

// ---- primitives ------------------------------------------------------------------------------------------------

Hash sha256(std::span<const uint8_t> data);
// Appends f as the little-endian bytes of its IEEE-754 binary32 form (how the table and manifest hash floats).
void put_f32(std::vector<uint8_t>& a, float f);
// SHA-256 over data arriving in pieces (the trusted core hashes each public tensor chunk by chunk as it arrives).
class Sha256Stream {
public:
    Sha256Stream();
    ~Sha256Stream();
    Sha256Stream(Sha256Stream&& o) noexcept : c_(o.c_) { o.c_ = nullptr; }
    Sha256Stream(const Sha256Stream&) = delete;
    Sha256Stream& operator=(const Sha256Stream&) = delete;
    void update(const void* data, size_t n);
    Hash finish();  // and starts over

private:
    EVP_MD_CTX* c_ = nullptr;
};
Hash hmac_sha256(std::span<const uint8_t> key, std::span<const uint8_t> data);
// HKDF-SHA256 (extract and expand) into out.
void hkdf(std::span<const uint8_t> ikm, std::span<const uint8_t> salt, std::string_view info, std::span<uint8_t> out);
// Constant-time comparison.
bool equal(std::span<const uint8_t> a, std::span<const uint8_t> b);
// Fills out from the OS CSPRNG (RAND_priv_bytes). Throws Status::internal when none is available.
void random_bytes(std::span<uint8_t> out);

// AES-256-GCM. seal writes ciphertext | 16-byte tag (n + 16 bytes) to out. open reads ciphertext | tag (n + 16
// bytes) and writes n bytes; it returns false when authentication fails, and out is then zeroed.
void gcm_seal(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out);
bool gcm_open(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out);

// gcm_seal for many messages: one cipher context, re-keyed for each, so that sealing a batch allocates nothing per
// message (allocations inside the trusted core go to one shared secret arena). Freeing it cleanses the key schedule.
class GcmSealer {
public:
    GcmSealer();
    ~GcmSealer();
    GcmSealer(const GcmSealer&) = delete;
    GcmSealer& operator=(const GcmSealer&) = delete;
    void seal(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out);

private:
    EVP_CIPHER_CTX* c_ = nullptr;
};

// gcm_open for many messages, one cipher context: a session opens a sealed unit on every crossing, and setting up a
// context costs about as much as opening a few KiB.
class GcmOpener {
public:
    GcmOpener();
    ~GcmOpener();
    GcmOpener(const GcmOpener&) = delete;
    GcmOpener& operator=(const GcmOpener&) = delete;
    bool open(const uint8_t* key, const uint8_t* iv, std::span<const uint8_t> aad, const uint8_t* in, size_t n,
              uint8_t* out);

private:
    EVP_CIPHER_CTX* c_ = nullptr;
};

std::string to_hex(std::span<const uint8_t> bytes);
// Parses exactly out.size() bytes of hex; false on any other input.
bool from_hex(std::string_view hex, std::span<uint8_t> out);

// ---- package keys ----------------------------------------------------------------------------------------------

void derive_model_key(const Key& owner_key, const ModelId& id, uint8_t* out);
void derive_manifest_key(const uint8_t* model_key, const ModelId& id, uint8_t* out);
void derive_tensor_key(const uint8_t* model_key, const ModelId& id, std::string_view name, uint8_t* out);

// ---- package layout --------------------------------------------------------------------------------------------
//
//   header     64 bytes: magic "SIPKG\0\r\n" | u32 format version | u32 flags (0) | model id (16) |
//              u64 manifest length | u64 table length | u64 payload offset | 0 (8)
//   manifest   JSON for people and the host (tensors, parts, sizes, sha256 of every part)
//   table      for the trusted core, binary (below): the secret tensors, the owner's sampling policy, and the
//              public model it binds (configuration and a SHA-256 of every public tensor as the core receives it)
//   mac        HMAC-SHA256 under the manifest key of header | manifest | table
//   payload    the parts the manifest lists, back to back (the public GGUF, then the secret tensors' chunks)
//
// Every multi-byte integer is little-endian.

constexpr char kMagic[8] = {'S', 'I', 'P', 'K', 'G', '\0', '\r', '\n'};
// 2: the table binds the public model and the sampling policy; 3: and the RoPE frequency factors (Llama 3.1 scaling).
// Older versions are refused (pack the model again): a version 2 table cannot say which factors the model runs with.
constexpr uint32_t kFormatVersion = 3;
constexpr size_t kHeaderBytes = 64;
// Secret tensors are encrypted in chunks of at most this many elements (whole rows for matrices), so that each
// chunk fits one enclave message.
constexpr uint64_t kChunkElements = uint64_t(1) << 20;

// What the owner lets the trusted core release beyond sampled tokens (header bytes 12-15, authenticated with the
// manifest). 0: nothing: no log-probabilities, no log-likelihood evaluation (perplexity).
constexpr uint32_t kReleaseLogprobsMask = 0xFFFFu;  // the largest top-K of log-probabilities per token
constexpr uint32_t kReleaseNll = 1u << 16;          // log-likelihoods of given tokens (si_eval_nll, perplexity)

struct Header {
    uint32_t version = kFormatVersion;
    uint32_t release = 0;  // kRelease* bits
    ModelId model_id{};
    uint64_t manifest_len = 0, table_len = 0, payload_offset = 0;
};
std::array<uint8_t, kHeaderBytes> encode_header(const Header& h);
// Throws Status::format (bad magic, non-zero reserved fields, lengths that do not add up) or Status::unsupported
// (another format version), each naming the problem.
Header decode_header(std::span<const uint8_t> bytes);

// A secret tensor as the trusted core sees it. kind/layer/proj use the enclave wire format's TensorKind and
// si::Proj; f32 data, `elements` in all, encrypted in `n_chunks` chunks of `chunk_elements` (the last may be
// shorter). scale: the LoRA scale of lora_a (0 otherwise).
struct SecretEntry {
    uint32_t kind = 0;
    int32_t layer = 0, proj = 0;
    uint64_t elements = 0, chunk_elements = 0;
    uint32_t n_chunks = 0;
    float scale = 0.0f;
};

// The model configuration the forward pass uses, as the host sends it in `configure`: the trusted core refuses a
// package whose host sends anything else (another layer count, an untied classifier, another rope theta, other or
// missing RoPE frequency factors...).
struct BoundConfig {
    int32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
    float rope_theta = 0.0f, norm_eps = 0.0f;
    uint32_t tied = 0;
    std::vector<float> rope_freq_factors;  // empty: none (head_dim / 2 values otherwise, ModelConfig's)
    bool operator==(const BoundConfig&) const = default;
};
constexpr uint32_t kMaxRopeFactors = 1u << 16;

// A public tensor as the host uploads it in the clear: wire TensorKind, layer, projection, its length in bytes and
// the public_tensor_digest of those bytes (f32 little-endian; int8 rows for proj_weight and classifier_i8, with their
// f32 row scales as proj_scale and classifier_scale).
struct PublicDigest {
    uint32_t kind = 0;
    int32_t layer = 0, proj = 0;
    uint64_t bytes = 0;
    Hash sha256{};
};

// The digest of a public tensor's upload bytes: SHA-256 over "SIPUB v1", the length (u64) and the SHA-256 of each
// leaf of kLeafBytes (the last may be shorter), so that the trusted core hashes the leaves of a chunk in parallel.
constexpr size_t kLeafBytes = size_t(256) << 10;
Hash public_tensor_digest(std::span<const uint8_t> bytes);
Hash combine_leaves(uint64_t total_bytes, std::span<const Hash> leaves);

// What the owner lets the host or an API client choose for sampling, enforced inside the trusted core: a request
// outside these bounds is refused. Sharper distributions (small top-k / top-p, high temperature) and noiseless
// log-probabilities make each released token a finer measurement of the logits (docs/SECURITY-EVAL.md, A6, A10).
struct SamplingPolicy {
    float max_temperature = 2.0f;
    int32_t min_top_k = 0;            // a request's top_k must be 0 (off) or at least this
    float min_top_p = 0.0f;           // a request's top_p must be at least this
    float min_logprob_noise = 0.0f;   // released log-probabilities carry Gaussian noise of at least this deviation
    bool operator==(const SamplingPolicy&) const = default;
};

// The table (format version 3):
//   u32 n | n secret entries (36 bytes each) | "BIND" | BoundConfig (7 x i32, 2 x f32, u32) |
//   u32 f | f RoPE frequency factors (f32; f = 0: none) |
//   SamplingPolicy (f32, i32, f32, f32) | u32 m | m public digests (u32 kind, i32 layer, i32 proj, u64 bytes, 32)
struct Table {
    std::vector<SecretEntry> secrets;
    BoundConfig config;
    SamplingPolicy sampling;
    std::vector<PublicDigest> publics;
};
std::vector<uint8_t> encode_table(const Table& t);
// Throws Status::format naming the problem (truncation, trailing bytes, inconsistent sizes, a bad policy).
Table decode_table(std::span<const uint8_t> bytes);

// The name a secret tensor is encrypted under: the GGUF name, and "<projection>.lora_a" / ".lora_b" for adapters.
// Empty for a kind that is never stored encrypted.
std::string secret_tensor_name(uint32_t kind, int layer, int proj);

// Associated data of chunk `chunk` of a secret tensor, and its IV (the chunk index; each tensor has its own key).
std::vector<uint8_t> chunk_aad(const ModelId& id, std::string_view name, uint32_t chunk, uint32_t n_chunks,
                               uint64_t elements);
std::array<uint8_t, kIvBytes> chunk_iv(uint32_t chunk);

// ---- attestation -----------------------------------------------------------------------------------------------
//
// report (made by the trusted core): "SIRP" | u16 version 1 | u16 0 | measurement (32) | nonce (32) |
//                                    enclave X25519 public key (32)
// quote (made by the quoting component, outside the trusted core):
//   "SIQT" | u16 version 1 | u16 type length | type ("software-tee") | u32 report length | report |
//   quoting Ed25519 public key (32) | Ed25519 signature (64) over everything before it

constexpr size_t kReportBytes = 8 + 3 * 32;
struct Report {
    Hash measurement{};
    Nonce nonce{};
    PubKey enclave_pub{};
};
std::array<uint8_t, kReportBytes> encode_report(const Report& r);
Report decode_report(std::span<const uint8_t> bytes);  // Status::format on anything else

// The key the keyserver sends: keyserver X25519 public key (32) | AES-256-GCM(wrap key, zero IV, aad = model id,
// model key) (32 + 16).
constexpr size_t kWrappedBytes = kPubBytes + kKeyBytes + kTagBytes;
void derive_wrap_key(std::span<const uint8_t> shared, const Report& r, const PubKey& server_pub, const ModelId& id,
                     uint8_t* out);

// X25519 and Ed25519 over raw 32-byte keys.
struct X25519Pair {
    SecretVector<uint8_t> priv;  // 32 bytes
    PubKey pub{};
};
X25519Pair x25519_generate();
// The shared secret (32 bytes); throws Status::security for a degenerate peer key.
void x25519_derive(const uint8_t* priv, const PubKey& peer, uint8_t* out);
PubKey ed25519_public(const uint8_t* seed);
std::array<uint8_t, kSigBytes> ed25519_sign(const uint8_t* seed, std::span<const uint8_t> msg);
bool ed25519_verify(const PubKey& pub, std::span<const uint8_t> msg, std::span<const uint8_t> sig);

// Everything in a quote before its signature, and a parsed quote (Status::format on malformed bytes).
std::vector<uint8_t> encode_quote_body(std::string_view type, std::span<const uint8_t> report, const PubKey& quoting_pub);
struct Quote {
    std::string type;
    Report report;
    PubKey quoting_pub{};
    std::array<uint8_t, kSigBytes> signature{};
    std::vector<uint8_t> signed_bytes;  // everything before the signature
};
Quote decode_quote(std::span<const uint8_t> bytes);

// Runs every primitive above once, so that libcrypto has fetched its algorithms before a sandbox closes.
void warm_up();

// Key release by the owner's side: wraps the model key for the enclave whose report this is.
std::array<uint8_t, kWrappedBytes> wrap_model_key(const uint8_t* model_key, const Report& r, const ModelId& id);

// ---- sealed keys -----------------------------------------------------------------------------------------------
//
// "SISK" | u16 version 1 | u16 0 | model id (16) | IV (12) | AES-256-GCM(sealing key, aad = the 24 bytes before
// the IV | measurement, model key) (32 + 16)
constexpr size_t kSealedBytes = 8 + kIdBytes + kIvBytes + kKeyBytes + kTagBytes;

}  // namespace si::pkg
