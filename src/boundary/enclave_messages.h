// The wire format of the enclave boundary: what si_ecall_process (enclave_abi.h) takes and returns.
//
// A message is a 16-byte header followed by typed fields, everything little-endian:
//
//   header  u32 magic "SIEM" (0x4d454953) | u16 version (kMessageVersion) | u16 type (MsgType)
//           u32 field count (<= kMaxFields) | u32 reserved, zero
//   field   u16 tag (Tag) | u8 dtype (WireType) | u8 reserved, zero | u32 element count
//           count * size(dtype) bytes of payload, then zero bytes up to the next multiple of 8
//
// The fields must cover the message exactly. Tags may appear at most once per message; unknown tags, types,
// dtypes, non-zero reserved or padding bytes, and lengths past the end are errors. The decoder never trusts an
// offset or count it has not checked against the buffer it was given, reads payloads with memcpy (no alignment
// assumptions), and throws si::Error(invalid_argument) naming the problem.
//
// Pure code: the C++ standard library and common/error.h only, so the trusted core and the host share it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace si::wire {

constexpr uint32_t kMagic = 0x4d454953u;  // "SIEM"
constexpr uint16_t kMessageVersion = 1;
constexpr uint32_t kMaxFields = 32;
constexpr size_t kHeaderBytes = 16;
constexpr size_t kFieldHeaderBytes = 8;

enum class MsgType : uint16_t {
    // requests (host -> trusted core)
    configure = 1,  // model hyper-parameters, context length, offload policy
    upload = 2,     // one chunk of one tensor
    finalize = 3,   // every tensor is in: build keys, pack weights; response: the offload plan
    sampler = 4,    // sampling and log-probability release settings
    eval = 5,       // start a forward pass over tokens; what to return at its end
    products = 6,   // the accelerator's (masked) products of the pending crossing
    reset = 7,      // forget the KV cache
    precompute = 8, // offline unblinding factors for the next `count_t` crossings of (layer, stage)
    // protected packages (docs/PACKAGES.md)
    attest = 9,        // a fresh ephemeral X25519 key and a quote binding it to the measurement and `nonce`
    release = 10,      // the model key wrapped to that key (`wrapped_key`, `model_id`); answer: ok [+ sealed_key]
    unseal = 11,       // a sealed model key from an earlier release (`sealed_key`)
    manifest = 12,     // the package's authenticated header, manifest and secret table (`manifest`)
    upload_secret = 13,// one encrypted chunk (`ciphertext`, chunk index in `offset`) of a secret tensor
    unit = 14,      // the pending crossing's sealed unblinding factors (`sealed`), sent ahead of its products so
                    // that the core opens them while the accelerator computes
    step = 15,      // one batched forward pass over several sequence slots (`slots`, `counts`, `tokens`, `sample`):
                    // each slot's tokens appended to its own KV cache; answer (after its crossings): result with
                    // `slots`, `tokens` (the sampled token per slot, -1 where none was asked) and `counts` (positions)
    // responses (trusted core -> host)
    ok = 101,       // done; carries pos and the enclave's work counters
    offload = 102,  // a crossing: masked activations for the accelerator
    result = 103,   // the end of a pass: a sampled token, log-probabilities, or a summed NLL
    plan = 104,     // which projections are offloaded (answer to finalize)
    sealed = 105,   // a batch of sealed unblinding factors (answer to precompute), to be stored by the host
    quote = 106,    // answer to attest: `quote`
};

enum class WireType : uint8_t { u8 = 1, i8 = 2, i32 = 3, u32 = 4, f32 = 5, u64 = 6, f64 = 7 };
size_t wire_size(WireType t);  // 0 for an unknown type

enum class Tag : uint16_t {
    cfg_ints = 1,       // i32[8]: dim, hidden, layers, heads, kv heads, vocab, seq_len, n_ctx
    cfg_floats = 2,     // f32[2 + n]: rope theta, norm eps, then head_dim / 2 RoPE frequency factors if any
    offload = 3,        // u8: 1 offloads public base projections (secureinfer), 0 offloads nothing (enclave-only)
    tied = 4,           // u8: 1 when the classifier is tied to the token embeddings
    kind = 5,           // u32: TensorKind
    layer = 6,          // i32
    proj = 7,           // i32: si::Proj
    offset = 8,         // u64: element offset of this chunk
    total = 9,          // u64: total elements of the tensor
    data_f32 = 10,      // f32[]: chunk data
    data_i8 = 11,       // i8[]: chunk data
    secret = 12,        // u8: the tensor is secret (never offloaded)
    rank = 13,          // i32: LoRA rank
    scale = 14,         // f32: LoRA scale
    temperature = 15,   // f32
    top_k = 16,         // i32
    top_p = 17,         // f32
    seed = 18,          // u64
    logprobs = 19,      // i32: top-K log-probabilities to release with each sampled token (0: none)
    logprob_noise = 20, // f32: standard deviation of the Gaussian noise added before release
    tokens = 21,        // i32[T]
    output = 22,        // u8: OutputKind
    targets = 23,       // i32[T]: NLL targets, -1 for none
    stage = 24,         // u8: si::Stage
    crossing = 25,      // u64: crossing sequence number
    projs = 26,         // u8[]: the projections of this crossing (si::Proj values)
    activations = 27,   // u32[T * K]: masked activations
    products = 28,      // u32[T * sum N]: the products, projection after projection
    count_t = 29,       // i32: T
    count_k = 30,       // i32: K
    pos = 31,           // i32: the context position after the call
    flops = 32,         // u64: enclave floating-point / integer work done in this call
    token = 33,         // i32: the sampled token
    logprob_ids = 34,   // i32[K]
    logprob_values = 35,// f32[K]
    nll_sum = 36,       // f64
    nll_count = 37,     // u64
    plan = 38,          // u8[layers * 7]: 1 where the projection is offloaded
    batch = 39,         // u64[T]: per row of a crossing, the sequence number of its precomputed batch (from 1)
    batch_index = 40,   // u32[T]: per row, its position within that batch
    sealed = 41,        // u8[]: sealed unblinding factors: count_t units of (12-byte IV | ciphertext | 16-byte tag)
    nonce = 42,         // u8[32]: the verifier's nonce
    quote = 43,         // u8[]: a signed attestation quote (enclave/package_crypto.h)
    wrapped_key = 44,   // u8[80]: a model key wrapped to the enclave's ephemeral key
    sealed_key = 45,    // u8[]: a model key sealed to the enclave's measurement
    manifest = 46,      // u8[]: package header | manifest | secret table | MAC
    ciphertext = 47,    // u8[]: an encrypted chunk with its tag
    model_id = 48,      // u8[16]
    serial_decode = 49, // u8 (configure, optional): 1 runs single-token products on the calling thread only
    keep = 50,          // u8: precompute: 1 keeps the factors inside the core (answer: sealed without `sealed`);
                        //     offload: the crossing's factors are kept inside, the host hands back nothing
                        //     (u8[T] when the crossing has several rows: 1 for each row whose factors are kept)
    slot = 51,          // i32: a sequence slot (sampler, reset); absent: slot 0
    slot_count = 52,    // i32 (configure, optional): sequence slots, each with its own KV cache (default 1)
    slots = 53,         // i32[S]: the slots of a step, distinct
    counts = 54,        // i32[S]: tokens per slot of a step (result: each slot's position after it)
    sample = 55,        // u8[S]: 1 where a step samples the token after the slot's last one
};
constexpr uint16_t kMaxTag = 55;

enum class TensorKind : uint32_t {
    tok_embeddings = 0,  // f32 [vocab][dim]
    final_norm = 1,      // f32 [dim]
    classifier = 2,      // f32 [vocab][dim] (untied models only)
    attn_norm = 3,       // f32 [dim], per layer
    ffn_norm = 4,        // f32 [dim], per layer
    proj_weight = 5,     // i8 [rows][cols], per layer and projection
    proj_scale = 6,      // f32 [rows], per layer and projection
    lora_a = 7,          // f32 [rank][cols], per layer and projection (first chunk carries rank and scale)
    lora_b = 8,          // f32 [rows][rank]
    classifier_i8 = 9,   // i8 [vocab][dim]: the classifier (output, or token_embd when tied) as a base projection
    classifier_scale = 10,  // f32 [vocab]
};
constexpr uint32_t kMaxTensorKind = 10;

enum class OutputKind : uint8_t { none = 0, sample = 1, nll = 2 };

// Builds a message. Fields are appended in order; finish() returns the bytes.
class Encoder {
public:
    // capacity: the expected message size in bytes, reserved up front so that large payloads are not copied again
    // as the buffer grows.
    explicit Encoder(MsgType type, size_t capacity = 0);
    template <class T>
    Encoder& add(Tag tag, std::span<const T> values);
    template <class T>
    Encoder& add(Tag tag, const std::vector<T>& v) { return add(tag, std::span<const T>(v)); }
    template <class T>
    Encoder& scalar(Tag tag, T value) { return add(tag, std::span<const T>(&value, 1)); }
    // Reserves a field of n elements and returns where to write its payload (valid until the next call).
    uint8_t* reserve(Tag tag, WireType type, size_t n);
    std::vector<uint8_t> finish();
    size_t size() const { return buf_.size(); }

private:
    std::vector<uint8_t> buf_;
    uint32_t n_fields_ = 0;
};

// A decoded field: a view into the decoded buffer.
struct Field {
    WireType type = WireType::u8;
    uint32_t count = 0;
    const uint8_t* data = nullptr;
};

// A decoded, validated message. Holds views into the buffer it was decoded from, which must outlive it.
class Message {
public:
    MsgType type() const { return type_; }
    bool has(Tag tag) const { return fields_[size_t(tag)].data != nullptr; }
    // The field, which must exist with type `type` and (unless count is -1) exactly `count` elements.
    const Field& field(Tag tag, WireType type, int64_t count = -1) const;
    template <class T>
    T scalar(Tag tag) const;
    template <class T>
    std::vector<T> array(Tag tag, int64_t count = -1) const;
    // Copies the field's elements into out (which must hold exactly count elements).
    template <class T>
    void copy(Tag tag, T* out, size_t count) const;

private:
    friend Message decode(std::span<const uint8_t> bytes);
    MsgType type_ = MsgType::ok;
    Field fields_[kMaxTag + 1];
};

// Decodes and validates the framing of a message (not its semantics). Throws si::Error(invalid_argument).
Message decode(std::span<const uint8_t> bytes);
const char* msg_type_name(MsgType t);
const char* tag_name(Tag t);

}  // namespace si::wire
