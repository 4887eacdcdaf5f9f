#include "boundary/enclave_messages.h"

#include <algorithm>

#include <bit>
#include <cstring>

#include "common/error.h"

static_assert(std::endian::native == std::endian::little, "the enclave wire format assumes a little-endian machine");

namespace si::wire {

namespace {

template <class T>
constexpr WireType wire_type_of();
template <> constexpr WireType wire_type_of<uint8_t>() { return WireType::u8; }
template <> constexpr WireType wire_type_of<int8_t>() { return WireType::i8; }
template <> constexpr WireType wire_type_of<int32_t>() { return WireType::i32; }
template <> constexpr WireType wire_type_of<uint32_t>() { return WireType::u32; }
template <> constexpr WireType wire_type_of<float>() { return WireType::f32; }
template <> constexpr WireType wire_type_of<uint64_t>() { return WireType::u64; }
template <> constexpr WireType wire_type_of<double>() { return WireType::f64; }

const char* type_name(WireType t) {
    switch (t) {
        case WireType::u8: return "u8";
        case WireType::i8: return "i8";
        case WireType::i32: return "i32";
        case WireType::u32: return "u32";
        case WireType::f32: return "f32";
        case WireType::u64: return "u64";
        case WireType::f64: return "f64";
    }
    return "?";
}

[[noreturn]] void bad(const std::string& why) { fail(Status::invalid_argument, "malformed message: " + why); }

uint16_t rd16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
uint32_t rd32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
void wr16(std::vector<uint8_t>& b, size_t at, uint16_t v) { std::memcpy(b.data() + at, &v, 2); }
void wr32(std::vector<uint8_t>& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }

bool known_type(uint16_t t) { return (t >= 1 && t <= 15) || (t >= 101 && t <= 106); }

constexpr size_t pad8(size_t n) { return (n + 7) & ~size_t(7); }

}  // namespace

size_t wire_size(WireType t) {
    switch (t) {
        case WireType::u8:
        case WireType::i8: return 1;
        case WireType::i32:
        case WireType::u32:
        case WireType::f32: return 4;
        case WireType::u64:
        case WireType::f64: return 8;
    }
    return 0;
}

const char* msg_type_name(MsgType t) {
    switch (t) {
        case MsgType::configure: return "configure";
        case MsgType::upload: return "upload";
        case MsgType::finalize: return "finalize";
        case MsgType::sampler: return "sampler";
        case MsgType::eval: return "eval";
        case MsgType::products: return "products";
        case MsgType::reset: return "reset";
        case MsgType::precompute: return "precompute";
        case MsgType::ok: return "ok";
        case MsgType::offload: return "offload";
        case MsgType::result: return "result";
        case MsgType::plan: return "plan";
        case MsgType::sealed: return "sealed";
        case MsgType::attest: return "attest";
        case MsgType::release: return "release";
        case MsgType::unseal: return "unseal";
        case MsgType::manifest: return "manifest";
        case MsgType::upload_secret: return "upload_secret";
        case MsgType::unit: return "unit";
        case MsgType::step: return "step";
        case MsgType::quote: return "quote";
    }
    return "?";
}

const char* tag_name(Tag t) {
    static const char* const kNames[] = {
        "?", "cfg_ints", "cfg_floats", "offload", "tied", "kind", "layer", "proj", "offset", "total", "data_f32",
        "data_i8", "secret", "rank", "scale", "temperature", "top_k", "top_p", "seed", "logprobs", "logprob_noise",
        "tokens", "output", "targets", "stage", "crossing", "projs", "activations", "products", "count_t", "count_k",
        "pos", "flops", "token", "logprob_ids", "logprob_values", "nll_sum", "nll_count", "plan",
        "batch", "batch_index", "sealed", "nonce", "quote", "wrapped_key", "sealed_key", "manifest", "ciphertext",
        "model_id", "serial_decode", "keep", "slot", "slot_count", "slots", "counts", "sample"};
    static_assert(sizeof(kNames) / sizeof(kNames[0]) == kMaxTag + 1);
    return uint16_t(t) <= kMaxTag ? kNames[uint16_t(t)] : "?";
}

Encoder::Encoder(MsgType type, size_t capacity) {
    buf_.reserve(std::max<size_t>(capacity, kHeaderBytes));
    buf_.assign(kHeaderBytes, 0);
    wr32(buf_, 0, kMagic);
    wr16(buf_, 4, kMessageVersion);
    wr16(buf_, 6, uint16_t(type));
}

uint8_t* Encoder::reserve(Tag tag, WireType type, size_t n) {
    const size_t es = wire_size(type);
    if (n > UINT32_MAX || n > (size_t(1) << 40) / es)
        fail(Status::invalid_argument, std::string("message field ") + tag_name(tag) + " is too large");
    if (n_fields_ >= kMaxFields) fail(Status::internal, "message has too many fields");
    const size_t at = buf_.size();
    const size_t bytes = n * es;
    buf_.resize(at + kFieldHeaderBytes + pad8(bytes), 0);
    wr16(buf_, at, uint16_t(tag));
    buf_[at + 2] = uint8_t(type);
    wr32(buf_, at + 4, uint32_t(n));
    ++n_fields_;
    return buf_.data() + at + kFieldHeaderBytes;
}

template <class T>
Encoder& Encoder::add(Tag tag, std::span<const T> values) {
    uint8_t* p = reserve(tag, wire_type_of<T>(), values.size());
    if (!values.empty()) std::memcpy(p, values.data(), values.size_bytes());
    return *this;
}

std::vector<uint8_t> Encoder::finish() {
    wr32(buf_, 8, n_fields_);
    return std::move(buf_);
}

Message decode(std::span<const uint8_t> bytes) {
    const uint8_t* p = bytes.data();
    const size_t n = bytes.size();
    if (n < kHeaderBytes) bad("shorter than its header (" + std::to_string(n) + " bytes)");
    if (rd32(p) != kMagic) bad("bad magic");
    if (rd16(p + 4) != kMessageVersion)
        bad("version " + std::to_string(rd16(p + 4)) + ", expected " + std::to_string(kMessageVersion));
    const uint16_t type = rd16(p + 6);
    if (!known_type(type)) bad("unknown message type " + std::to_string(type));
    const uint32_t n_fields = rd32(p + 8);
    if (n_fields > kMaxFields) bad("too many fields (" + std::to_string(n_fields) + ")");
    if (rd32(p + 12) != 0) bad("non-zero reserved header bytes");
    Message m;
    m.type_ = MsgType(type);
    size_t at = kHeaderBytes;
    for (uint32_t i = 0; i < n_fields; ++i) {
        if (n - at < kFieldHeaderBytes) bad("field " + std::to_string(i) + " header past the end");
        const uint16_t tag = rd16(p + at);
        const uint8_t dtype = p[at + 2];
        const uint32_t count = rd32(p + at + 4);
        if (tag == 0 || tag > kMaxTag) bad("unknown field tag " + std::to_string(tag));
        if (p[at + 3] != 0) bad(std::string("field ") + tag_name(Tag(tag)) + ": non-zero reserved byte");
        const size_t es = wire_size(WireType(dtype));
        if (es == 0) bad(std::string("field ") + tag_name(Tag(tag)) + ": unknown element type " + std::to_string(dtype));
        if (m.fields_[tag].data) bad(std::string("field ") + tag_name(Tag(tag)) + " appears twice");
        at += kFieldHeaderBytes;
        const size_t len = size_t(count) * es;  // < 2^35: no overflow
        const size_t padded = pad8(len);
        if (padded > n - at) bad(std::string("field ") + tag_name(Tag(tag)) + " runs past the end of the message");
        for (size_t k = len; k < padded; ++k)
            if (p[at + k] != 0) bad(std::string("field ") + tag_name(Tag(tag)) + ": non-zero padding");
        m.fields_[tag] = Field{WireType(dtype), count, p + at};
        at += padded;
    }
    if (at != n) bad(std::to_string(n - at) + " trailing bytes after the last field");
    return m;
}

const Field& Message::field(Tag tag, WireType type, int64_t count) const {
    const uint16_t t = uint16_t(tag);
    if (t == 0 || t > kMaxTag) fail(Status::internal, "bad field tag");
    const Field& f = fields_[t];
    const std::string what = std::string(msg_type_name(type_)) + " message: field " + tag_name(tag);
    if (!f.data) fail(Status::invalid_argument, what + " is missing");
    if (f.type != type)
        fail(Status::invalid_argument, what + " has type " + type_name(f.type) + ", expected " + type_name(type));
    if (count >= 0 && int64_t(f.count) != count)
        fail(Status::invalid_argument,
             what + " has " + std::to_string(f.count) + " elements, expected " + std::to_string(count));
    return f;
}

template <class T>
T Message::scalar(Tag tag) const {
    const Field& f = field(tag, wire_type_of<T>(), 1);
    T v;
    std::memcpy(&v, f.data, sizeof(T));
    return v;
}

template <class T>
std::vector<T> Message::array(Tag tag, int64_t count) const {
    const Field& f = field(tag, wire_type_of<T>(), count);
    std::vector<T> v(f.count);
    if (f.count) std::memcpy(v.data(), f.data, size_t(f.count) * sizeof(T));
    return v;
}

template <class T>
void Message::copy(Tag tag, T* out, size_t count) const {
    const Field& f = field(tag, wire_type_of<T>(), int64_t(count));
    if (count) std::memcpy(out, f.data, count * sizeof(T));
}

#define SI_WIRE_INSTANTIATE(T)                                               \
    template Encoder& Encoder::add<T>(Tag, std::span<const T>);              \
    template T Message::scalar<T>(Tag) const;                                \
    template std::vector<T> Message::array<T>(Tag, int64_t) const;           \
    template void Message::copy<T>(Tag, T*, size_t) const;
SI_WIRE_INSTANTIATE(uint8_t)
SI_WIRE_INSTANTIATE(int8_t)
SI_WIRE_INSTANTIATE(int32_t)
SI_WIRE_INSTANTIATE(uint32_t)
SI_WIRE_INSTANTIATE(float)
SI_WIRE_INSTANTIATE(uint64_t)
SI_WIRE_INSTANTIATE(double)
#undef SI_WIRE_INSTANTIATE

}  // namespace si::wire
