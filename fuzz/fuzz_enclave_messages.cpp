// libFuzzer target for the enclave boundary: the request decoder and si_ecall_process on a fresh trusted core. Any
// input must be answered with a status and, on failure, a NUL-terminated message; never a crash, an out-of-bounds
// access, undefined behaviour, or a response longer than the buffer.
//
// The first input byte picks what the rest is:
//   0   one message for the decoder; a message that decodes must re-encode to the same bytes
//   1   a sequence of requests (u32 little-endian length, then that many bytes, repeated) for a fresh core
//   2   the same, for a fresh core that already holds a tiny model (secureinfer offload on), so that eval,
//       products, sampler and reset requests reach the forward pass and the integrity check
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"

using namespace si;

namespace {

constexpr size_t kRespCap = size_t(4) << 20;
constexpr int kMaxRequests = 16;

uint8_t g_resp[kRespCap];

void check_call(si_enclave* e, const uint8_t* req, size_t n) {
    size_t len = 0;
    g_resp[0] = 0;
    const int rc = si_ecall_process(e, req, n, g_resp, kRespCap, &len);
    if (rc > 0 || rc < int(Status::internal)) __builtin_trap();
    if (rc == 0 && len > kRespCap) __builtin_trap();
    if (rc != 0 && (len != 0 || strnlen(reinterpret_cast<const char*>(g_resp), kRespCap) == kRespCap)) __builtin_trap();
}

void must_ok(si_enclave* e, const std::vector<uint8_t>& req) {
    size_t len = 0;
    if (si_ecall_process(e, req.data(), req.size(), g_resp, kRespCap, &len) != 0) __builtin_trap();
}

// dim 8, hidden 12, 1 layer, 2 heads, 1 kv head, vocab 16, context 16; every weight a small deterministic value.
void load_tiny(si_enclave* e) {
    using wire::Encoder;
    using wire::MsgType;
    using wire::Tag;
    using wire::TensorKind;
    const int d = 8, h = 12, kv = 4, v = 16;
    Encoder c(MsgType::configure);
    c.add(Tag::cfg_ints, std::vector<int32_t>{d, h, 1, 2, 1, v, 16, 16});
    c.add(Tag::cfg_floats, std::vector<float>{10000.0f, 1e-5f});
    c.scalar<uint8_t>(Tag::offload, 1);
    c.scalar<uint8_t>(Tag::tied, 1);
    must_ok(e, c.finish());
    auto upload_f32 = [&](TensorKind k, int layer, int proj, size_t n) {
        std::vector<float> data(n);
        for (size_t i = 0; i < n; ++i) data[i] = float(int(i * 7 % 13) - 6) / 16.0f;
        Encoder u(MsgType::upload);
        u.scalar<uint32_t>(Tag::kind, uint32_t(k));
        u.scalar<int32_t>(Tag::layer, layer);
        u.scalar<int32_t>(Tag::proj, proj);
        u.scalar<uint64_t>(Tag::offset, 0);
        u.scalar<uint64_t>(Tag::total, n);
        u.add(Tag::data_f32, data);
        must_ok(e, u.finish());
    };
    upload_f32(TensorKind::tok_embeddings, 0, 0, size_t(v * d));
    upload_f32(TensorKind::final_norm, 0, 0, size_t(d));
    upload_f32(TensorKind::attn_norm, 0, 0, size_t(d));
    upload_f32(TensorKind::ffn_norm, 0, 0, size_t(d));
    const int rows[7] = {d, kv, kv, d, h, d, h}, cols[7] = {d, d, d, d, d, h, d};
    for (int p = 0; p < 7; ++p) {
        std::vector<int8_t> w(size_t(rows[p] * cols[p]));
        for (size_t i = 0; i < w.size(); ++i) w[i] = int8_t(int(i * 31 % 255) - 127);
        Encoder u(MsgType::upload);
        u.scalar<uint32_t>(Tag::kind, uint32_t(TensorKind::proj_weight));
        u.scalar<int32_t>(Tag::layer, 0);
        u.scalar<int32_t>(Tag::proj, p);
        u.scalar<uint64_t>(Tag::offset, 0);
        u.scalar<uint64_t>(Tag::total, w.size());
        u.add(Tag::data_i8, w);
        u.scalar<uint8_t>(Tag::secret, p == 3 ? 1 : 0);  // one projection stays inside
        must_ok(e, u.finish());
        upload_f32(TensorKind::proj_scale, 0, p, size_t(rows[p]));
    }
    {  // the classifier (tied: token_embd) as int8 rows with scales, offloaded like the projections
        std::vector<int8_t> w(size_t(v * d));
        for (size_t i = 0; i < w.size(); ++i) w[i] = int8_t(int(i * 17 % 255) - 127);
        Encoder u(MsgType::upload);
        u.scalar<uint32_t>(Tag::kind, uint32_t(TensorKind::classifier_i8));
        u.scalar<int32_t>(Tag::layer, 0);
        u.scalar<int32_t>(Tag::proj, 0);
        u.scalar<uint64_t>(Tag::offset, 0);
        u.scalar<uint64_t>(Tag::total, w.size());
        u.add(Tag::data_i8, w);
        u.scalar<uint8_t>(Tag::secret, 0);
        must_ok(e, u.finish());
        upload_f32(TensorKind::classifier_scale, 0, 0, size_t(v));
    }
    must_ok(e, Encoder(MsgType::finalize).finish());
}

void decoder_round_trip(const uint8_t* data, size_t size) {
    wire::Message m;
    try {
        m = wire::decode(std::span<const uint8_t>(data, size));
    } catch (const Error&) {
        return;
    }
    // Re-encode the fields in their order (walking the framing the decoder accepted): the framing is canonical, so
    // the bytes must come back unchanged. Every field must also read back through its typed accessor.
    wire::Encoder e(m.type());
    size_t at = wire::kHeaderBytes;
    while (at < size) {
        uint16_t tag;
        uint32_t count;
        std::memcpy(&tag, data + at, 2);
        std::memcpy(&count, data + at + 4, 4);
        const auto type = wire::WireType(data[at + 2]);
        const size_t bytes = size_t(count) * wire::wire_size(type);
        const wire::Field& f = m.field(wire::Tag(tag), type, count);
        if (f.data != data + at + wire::kFieldHeaderBytes) __builtin_trap();
        uint8_t* dst = e.reserve(wire::Tag(tag), type, count);
        if (bytes) std::memcpy(dst, f.data, bytes);
        at += wire::kFieldHeaderBytes + ((bytes + 7) & ~size_t(7));
    }
    const std::vector<uint8_t> again = e.finish();
    if (again.size() != size || std::memcmp(again.data(), data, size) != 0) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    const uint8_t mode = data[0] % 3;
    ++data;
    --size;
    if (mode == 0) {
        decoder_round_trip(data, size);
        return 0;
    }
    si_enclave* e = nullptr;
    if (si_ecall_create(nullptr, &e) != 0 || !e) __builtin_trap();
    if (mode == 2) load_tiny(e);
    size_t at = 0;
    for (int i = 0; i < kMaxRequests && size - at >= 4; ++i) {
        uint32_t len;
        std::memcpy(&len, data + at, 4);
        at += 4;
        const size_t n = std::min<size_t>(len, size - at);
        // A fresh copy of exactly n bytes, so that reads past the request are caught by the sanitizer.
        std::vector<uint8_t> req(data + at, data + at + n);
        check_call(e, req.data(), req.size());
        at += n;
    }
    si_ecall_destroy(e);
    return 0;
}
