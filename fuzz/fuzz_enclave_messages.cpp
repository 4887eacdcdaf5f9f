// libFuzzer target for the enclave boundary: the request decoder and si_ecall_process on a fresh trusted core. Any
// input must be answered with a status and, on failure, a NUL-terminated message; never a crash, an out-of-bounds
// access, undefined behaviour, or a response longer than the buffer.
//
// The cores run on a software TEE platform whose device secret and quoting key are fixed, test-only bytes (written
// to a temporary directory at start-up and read back by tee::SoftwarePlatform), so that attest, release, unseal and,
// with a model key, manifest and upload_secret are reached. The first input byte picks what the rest is:
//   0   one message for the decoder; a message that decodes must re-encode to the same bytes
//   1   a sequence of requests (u32 little-endian length, then that many bytes, repeated) for a fresh core
//   2   the same, for a fresh core that already holds a tiny model (secureinfer offload on), so that eval,
//       products, sampler and reset requests reach the forward pass and the integrity check
//   3   the same, for a fresh core that already unsealed a fixed model key (kModelKey, sealed to this platform), so
//       that manifest and upload_secret requests reach authentication and chunk opening
// SI_FUZZ_WRITE_SEEDS=DIR writes this target's attestation and package seeds to DIR and exits (they are in
// fuzz/corpus/enclave_messages; rerun it when the platform or the messages change).
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "enclave/package_crypto.h"
#include "host/software_tee.h"

using namespace si;

namespace {

constexpr size_t kRespCap = size_t(4) << 20;
constexpr int kMaxRequests = 16;

uint8_t g_resp[kRespCap];

bool g_verbose = false;  // SI_FUZZ_VERBOSE=1: each request's type and answer on stderr (checking seeds)

void check_call(si_enclave* e, const uint8_t* req, size_t n) {
    size_t len = 0;
    g_resp[0] = 0;
    const int rc = si_ecall_process(e, req, n, g_resp, kRespCap, &len);
    if (g_verbose)
        std::fprintf(stderr, "request type %u: %d %.200s\n", n >= 8 ? unsigned(req[6] | req[7] << 8) : 0u, rc,
                     rc ? reinterpret_cast<const char*>(g_resp) : "ok");
    if (rc > 0 || rc < int(Status::internal)) __builtin_trap();
    if (rc == 0 && len > kRespCap) __builtin_trap();
    if (rc != 0 && (len != 0 || strnlen(reinterpret_cast<const char*>(g_resp), kRespCap) == kRespCap)) __builtin_trap();
}

void must_ok(si_enclave* e, const std::vector<uint8_t>& req) {
    size_t len = 0;
    if (si_ecall_process(e, req.data(), req.size(), g_resp, kRespCap, &len) != 0) __builtin_trap();
}

// ---- the platform ------------------------------------------------------------------------------------------------

std::unique_ptr<tee::SoftwarePlatform> g_platform;
const pkg::ModelId kModelId = {0x6d, 0x6f, 0x64, 0x65, 0x6c, 0x2d, 0x69, 0x64, 1, 2, 3, 4, 5, 6, 7, 8};
const uint8_t kModelKey[32] = {0x4b, 0x45, 0x59, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3,
                               4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
std::vector<uint8_t> g_sealed;  // kModelKey sealed to g_platform

void write_fixed(const std::string& path, uint8_t first) {
    uint8_t b[32];
    for (int i = 0; i < 32; ++i) b[i] = uint8_t(first + 7 * i);
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, b, sizeof b) != ssize_t(sizeof b)) __builtin_trap();
    close(fd);
}

// The sealed form the core makes (trusted_core.cpp seal_model_key), with a fixed IV: test-only.
std::vector<uint8_t> seal_fixed_key() {
    std::vector<uint8_t> blob = {'S', 'I', 'S', 'K', 1, 0, 0, 0};
    blob.insert(blob.end(), kModelId.begin(), kModelId.end());
    std::vector<uint8_t> aad(blob);
    const si_platform* p = g_platform->get();
    aad.insert(aad.end(), p->measurement, p->measurement + 32);
    const uint8_t iv[pkg::kIvBytes] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    blob.insert(blob.end(), iv, iv + sizeof iv);
    blob.resize(pkg::kSealedBytes);
    pkg::gcm_seal(p->sealing_key, iv, aad, kModelKey, sizeof kModelKey, blob.data() + 8 + pkg::kIdBytes + sizeof iv);
    return blob;
}

void make_platform() {
    char dir[] = "/tmp/si-fuzz-device-XXXXXX";
    if (!mkdtemp(dir)) __builtin_trap();
    const std::string d = dir;
    write_fixed(d + "/device-secret", 0x11);
    write_fixed(d + "/quoting-key", 0x22);
    const std::string label = "secureinfer fuzz enclave";
    const pkg::Hash m = tee::measurement(pkg::sha256(std::span<const uint8_t>(
                                             reinterpret_cast<const uint8_t*>(label.data()), label.size())),
                                         "fuzz");
    g_platform = std::make_unique<tee::SoftwarePlatform>(d, m);  // keeps what it read
    unlink((d + "/device-secret").c_str());
    unlink((d + "/quoting-key").c_str());
    rmdir(dir);
    g_sealed = seal_fixed_key();
}

wire::Encoder tiny_configure() {
    wire::Encoder c(wire::MsgType::configure);
    c.add(wire::Tag::cfg_ints, std::vector<int32_t>{8, 12, 1, 2, 1, 16, 16, 16});
    c.add(wire::Tag::cfg_floats, std::vector<float>{10000.0f, 1e-5f});
    c.scalar<uint8_t>(wire::Tag::offload, 1);
    c.scalar<uint8_t>(wire::Tag::tied, 1);
    return c;
}

std::vector<uint8_t> unseal_request(std::vector<uint8_t> blob) {
    wire::Encoder u(wire::MsgType::unseal);
    u.add(wire::Tag::sealed_key, blob);
    return u.finish();
}

// dim 8, hidden 12, 1 layer, 2 heads, 1 kv head, vocab 16, context 16; every weight a small deterministic value.
void load_tiny(si_enclave* e) {
    using wire::Encoder;
    using wire::MsgType;
    using wire::Tag;
    using wire::TensorKind;
    const int d = 8, h = 12, kv = 4, v = 16;
    must_ok(e, tiny_configure().finish());
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

// ---- seeds ---------------------------------------------------------------------------------------------------------

void write_seed(const std::string& dir, const char* name, uint8_t mode, const std::vector<std::vector<uint8_t>>& reqs) {
    std::vector<uint8_t> b = {mode};
    for (const auto& r : reqs) {
        const uint32_t n = uint32_t(r.size());
        b.insert(b.end(), reinterpret_cast<const uint8_t*>(&n), reinterpret_cast<const uint8_t*>(&n) + 4);
        b.insert(b.end(), r.begin(), r.end());
    }
    const std::string path = dir + "/" + name;
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(b.data(), 1, b.size(), f) != b.size() || std::fclose(f) != 0) __builtin_trap();
}

void write_seeds(const std::string& dir) {
    using wire::Encoder;
    using wire::MsgType;
    using wire::Tag;
    std::vector<uint8_t> nonce(32, 0x4e);
    Encoder attest(MsgType::attest);
    attest.add(Tag::nonce, nonce);
    Encoder release(MsgType::release);
    release.add(Tag::wrapped_key, std::vector<uint8_t>(pkg::kWrappedBytes, 0x57));
    release.add(Tag::model_id, std::span<const uint8_t>(kModelId));
    Encoder eval(MsgType::eval);
    eval.add(Tag::tokens, std::vector<int32_t>{1, 2});
    eval.scalar<uint8_t>(Tag::output, 1);
    // a package prefix: the header's magic and zeros, for the mutator to work on
    std::vector<uint8_t> prefix = {'S', 'I', 'P', 'K', 'G', 0, '\r', '\n', 1};
    prefix.resize(pkg::kHeaderBytes + 64 + pkg::kHashBytes);
    Encoder manifest(MsgType::manifest);
    manifest.add(Tag::manifest, prefix);
    Encoder secret(MsgType::upload_secret);
    secret.scalar<uint32_t>(Tag::kind, uint32_t(wire::TensorKind::lora_a));
    secret.scalar<int32_t>(Tag::layer, 0);
    secret.scalar<int32_t>(Tag::proj, 0);
    secret.scalar<uint64_t>(Tag::offset, 0);
    secret.add(Tag::ciphertext, std::vector<uint8_t>(64 + pkg::kTagBytes, 0x43));
    std::vector<uint8_t> altered = g_sealed;
    altered[40] ^= 1;

    const auto at = attest.finish(), rel = release.finish(), ev = eval.finish(), man = manifest.finish(),
               sec = secret.finish(), cfg = tiny_configure().finish(), un = unseal_request(g_sealed);
    // A valid package for kModelKey with one secret tensor (layer 0's attn_norm, 8 floats): manifest, then its chunk.
    pkg::SecretEntry norm;
    norm.kind = uint32_t(wire::TensorKind::attn_norm);
    norm.elements = norm.chunk_elements = 8;
    norm.n_chunks = 1;
    pkg::Table tbl;
    tbl.secrets = {norm};
    tbl.config = {8, 12, 1, 2, 1, 16, 16, 10000.0f, 1e-5f, 1};  // tiny_configure's model
    const std::vector<uint8_t> table = pkg::encode_table(tbl);
    const std::string json = "{}";
    pkg::Header ph;
    ph.model_id = kModelId;
    ph.manifest_len = json.size();
    ph.table_len = table.size();
    ph.payload_offset = pkg::kHeaderBytes + json.size() + table.size() + pkg::kHashBytes;
    const auto head = pkg::encode_header(ph);
    std::vector<uint8_t> good(head.begin(), head.end());
    good.insert(good.end(), json.begin(), json.end());
    good.insert(good.end(), table.begin(), table.end());
    std::vector<uint8_t> mk(32), tk(32);
    pkg::derive_manifest_key(kModelKey, kModelId, mk.data());
    const pkg::Hash mac = pkg::hmac_sha256(mk, good);
    good.insert(good.end(), mac.begin(), mac.end());
    Encoder good_manifest(MsgType::manifest);
    good_manifest.add(Tag::manifest, good);
    const std::string name = pkg::secret_tensor_name(norm.kind, 0, 0);
    pkg::derive_tensor_key(kModelKey, kModelId, name, tk.data());
    const std::vector<float> values = {1, 2, 3, 4, 5, 6, 7, 8};
    std::vector<uint8_t> ct(values.size() * 4 + pkg::kTagBytes);
    const auto iv = pkg::chunk_iv(0);
    pkg::gcm_seal(tk.data(), iv.data(), pkg::chunk_aad(kModelId, name, 0, 1, 8),
                  reinterpret_cast<const uint8_t*>(values.data()), values.size() * 4, ct.data());
    Encoder chunk(MsgType::upload_secret);
    chunk.scalar<uint32_t>(Tag::kind, norm.kind);
    chunk.scalar<int32_t>(Tag::layer, 0);
    chunk.scalar<int32_t>(Tag::proj, 0);
    chunk.scalar<uint64_t>(Tag::offset, 0);
    chunk.add(Tag::ciphertext, ct);
    const auto gm = good_manifest.finish(), ch = chunk.finish();
    write_seed(dir, "keyed_package_chunk", 3, {cfg, gm, ch, ch, Encoder(MsgType::finalize).finish()});

    write_seed(dir, "platform_attest_twice", 1, {at, at});
    write_seed(dir, "platform_attest_release", 1, {at, rel, rel});
    write_seed(dir, "platform_release_without_attest", 1, {rel});
    write_seed(dir, "platform_unseal_then_manifest", 1, {un, un, cfg, man, ev});
    write_seed(dir, "platform_unseal_altered", 1, {unseal_request(altered), at});
    write_seed(dir, "keyed_manifest", 3, {cfg, man, sec});
    write_seed(dir, "keyed_upload_secret_first", 3, {cfg, sec});
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

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    make_platform();
    g_verbose = std::getenv("SI_FUZZ_VERBOSE") != nullptr;
    if (const char* dir = std::getenv("SI_FUZZ_WRITE_SEEDS"); dir && *dir) {
        write_seeds(dir);
        std::exit(0);
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 1) return 0;
    const uint8_t mode = data[0] % 4;
    ++data;
    --size;
    if (mode == 0) {
        decoder_round_trip(data, size);
        return 0;
    }
    si_enclave* e = nullptr;
    if (si_ecall_create_ex(nullptr, g_platform->get(), &e) != 0 || !e) __builtin_trap();
    if (mode == 2) load_tiny(e);
    if (mode == 3) must_ok(e, unseal_request(g_sealed));
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
