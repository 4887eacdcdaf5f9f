// Protected model packages (docs/PACKAGES.md): pack -> attest -> key release -> run gives the tokens of the
// unpacked model and adapter; every kind of bad input is refused with its own message before anything decrypted is
// used; the package, the sealed key and the boundary trace hold no secret tensor bytes in the clear.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "enclave/package_crypto.h"
#include "formats/gguf.h"
#include "formats/model_file.h"
#include "host/enclave_host.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "host/software_tee.h"
#include "host/worker_host.h"
#include "testutil.h"
#include "train/lora.h"

using namespace si;
using si::test::expect_error;

namespace {

const std::string kModel = test::shared("models/stories260K.bin");
const std::string kTok = test::shared("models/tok512.bin");
const std::string kAdapter = test::adapter_path();

const ModelFile& base_model() {
    static const ModelFile f = load_model_file(kModel, kTok);
    return f;
}

std::string worker_next_to_cli() {
    return std::filesystem::path(SI_CLI).parent_path().string() + "/secureinfer-worker";
}

// A package of stories260K + the Austen adapter under a fresh owner key, made once per test.
struct Packed {
    std::string dir, path, key_file, device;
    pkg::Key owner{};
};

Packed make_package(const std::string& secret = "lora", int release_logprobs = 0, bool release_nll = false) {
    Packed p;
    p.dir = test::scratch_dir();
    p.path = p.dir + "/model.sipkg";
    p.key_file = p.dir + "/owner.key";
    p.device = p.dir + "/device";
    p.owner = generate_owner_key();
    write_owner_key(p.key_file, p.owner);
    PackOptions o;
    o.base = kModel;
    o.tokenizer = kTok;
    o.loras = {kAdapter};
    o.secret = secret;
    o.release_logprobs = release_logprobs;
    o.release_nll = release_nll;
    write_package(p.path, o, p.owner);
    return p;
}

std::vector<int32_t> greedy(SecureSession& s, int n) {
    s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    std::vector<int32_t> out;
    int32_t t = s.eval_sample(std::vector<int32_t>{1});
    for (int i = 0; i < n; ++i) {
        out.push_back(t);
        t = s.eval_sample(std::span<const int32_t>(&t, 1));
    }
    return out;
}

std::vector<int32_t> reference_tokens(int n, SecureMode mode = SecureMode::secureinfer) {
    static const train::LoraAdapter a = train::read_lora_adapter(kAdapter, base_model().weights.cfg);
    SecureSessionParams p;
    p.mode = mode;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 2;
    p.lora = &a;
    SecureSession s(base_model().weights, p);
    return greedy(s, n);
}

SecureSessionParams package_params(const Packed& pk, std::shared_ptr<const Package> package) {
    SecureSessionParams p;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 2;
    p.package = std::move(package);
    p.key.device_dir = pk.device;
    p.key.owner_key_file = pk.key_file;
    return p;
}


std::string slurp(const std::string& path) { return test::read_file(path); }

// Every adapter tensor's raw bytes (F32), for searching other files for them.
std::vector<std::string> adapter_tensor_bytes() { return test::gguf_tensor_bytes(kAdapter); }

// Whether `hay` contains any 64-byte window of any secret tensor (or the whole of a smaller one).
bool holds_secret_bytes(const std::string& hay, const std::vector<std::string>& secrets) {
    for (const auto& s : secrets)
        for (size_t at = 0; at < s.size(); at += 64) {
            const std::string needle = s.substr(at, std::min<size_t>(64, s.size() - at));
            if (needle.size() >= 16 && hay.find(needle) != std::string::npos) return true;
        }
    return false;
}

void flip_byte(const std::string& path, size_t at) {
    std::string b = slurp(path);
    ASSERT_LT(at, b.size());
    b[at] = char(b[at] ^ 0x20);
    test::write_file(path, b);
}

nlohmann::json manifest_of(const std::string& path) {
    const std::string b = slurp(path);
    const pkg::Header h = pkg::decode_header(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
    return nlohmann::json::parse(b.substr(pkg::kHeaderBytes, size_t(h.manifest_len)));
}

// Absolute file offset of a secret tensor's ciphertext.
size_t secret_offset(const std::string& path, const std::string& tensor) {
    const std::string b = slurp(path);
    const pkg::Header h = pkg::decode_header(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
    const auto m = manifest_of(path);
    size_t secret_part = 0;
    for (const auto& p : m["parts"])
        if (p["name"] == "secret.bin") secret_part = p["offset"];
    for (const auto& t : m["tensors"])
        if (t["name"] == tensor) return size_t(h.payload_offset) + secret_part + size_t(t["offset"]);
    ADD_FAILURE() << "no tensor " << tensor;
    return 0;
}

}  // namespace

// A root user on the device reads the enclave worker's memory through /proc/PID/mem while it serves a package
// (the attack memfd_secret exists for, DESIGN.md section 3). It finds the public weights the core keeps (in their
// packed layout, which only the core makes), but no byte of a secret tensor in any form the core holds: not the
// decrypted floats, not the int8 rows, not the packed int8 blocks, not the adapter.
TEST(Package, RootReadingTheWorkerMemoryFindsNoSecretTensor) {
    if (geteuid() != 0) GTEST_SKIP() << "reading another user's process memory needs root";
    const Packed pk = make_package(test::kScrapedSecrets);
    const auto package = Package::open(pk.path);
    auto p = package_params(pk, package);
    p.host = EnclaveHostKind::worker;
    p.worker_path = worker_next_to_cli();
    SecureSession s(package->model().source, p);
    if (s.isolation().find("memfd_secret") == std::string::npos)
        GTEST_SKIP() << "the worker's secret memory is not memfd_secret here (" << s.isolation()
                     << "); the fallback is readable by root, as reported";
    EXPECT_EQ(greedy(s, 8), reference_tokens(8));
    const std::vector<pid_t> workers = test::children_named("secureinfer-wor");
    ASSERT_EQ(workers.size(), 1u);

    // What to look for: a public projection (the positive control), then each secret in each form.
    test::SecretScanner scanner = test::scraped_secrets_scanner(base_model().weights, adapter_tensor_bytes());
    const test::Scraped m = test::scrape_memory(workers[0], [&](const char* data, size_t n) { scanner.scan(data, n); });
    std::printf("read %zu MiB of the worker's memory; %zu MiB refused; %zu GiB of reservations not read\n",
                m.read >> 20, m.refused >> 20, m.skipped >> 30);
    ASSERT_GT(m.read, size_t(1) << 20) << "could not read the worker's memory at all";
    EXPECT_GT(m.refused, size_t(0)) << "no region was refused: where is the secret arena?";
    // The scan works: the core's packed copy of a public projection is there to be found.
    EXPECT_TRUE(scanner.found(0)) << "the scan missed the " << scanner.name(0);
    for (size_t i = 1; i < scanner.targets(); ++i) EXPECT_FALSE(scanner.found(i)) << "found " << scanner.name(i);
    // The thread that runs the core's requests has its stack in secret memory too (its frames held plaintext of the
    // adapter once: libcrypto's block buffers); the main thread, which only waits, has an ordinary one.
    size_t unreadable = 0;
    bool main_readable = false;
    for (const auto& t : test::thread_stacks(workers[0])) {
        unreadable += !t.readable;
        if (t.tid == workers[0]) main_readable = t.readable;
    }
    EXPECT_TRUE(main_readable) << "could not read the main thread's stack: the check does not work";
    EXPECT_EQ(unreadable, 1u) << "the serving thread's stack is readable";
}

TEST(Package, SameTokensAsTheUnpackedModelAndAdapter) {
    const Packed pk = make_package();
    const auto package = Package::open(pk.path);
    EXPECT_TRUE(package->has_adapter());
    EXPECT_TRUE(package->secret_base_tensors().empty());
    SecureSession s(package->model().source, package_params(pk, package));
    EXPECT_EQ(greedy(s, 24), reference_tokens(24));
    // the public base projections are still offloaded
    EXPECT_EQ(std::count(s.plan().begin(), s.plan().end(), 1), std::ptrdiff_t(s.plan().size()));
}

TEST(Package, SecretAllKeepsEveryWeightInTheEnclave) {
    const Packed pk = make_package("all");
    const auto package = Package::open(pk.path);
    EXPECT_EQ(package->secret_base_tensors(), std::vector<std::string>{"*"});
    // nothing of the model is in the clear: the public part holds no tensor data
    const auto base = base_model().weights;
    const std::string bytes = slurp(pk.path);
    EXPECT_FALSE(holds_secret_bytes(bytes, {std::string(reinterpret_cast<const char*>(base.layers[0].wq.data()),
                                                         base.layers[0].wq.size() * 4),
                                             std::string(reinterpret_cast<const char*>(base.tok_embeddings.data()),
                                                         1024)}));
    SecureSession s(package->model().source, package_params(pk, package));
    EXPECT_EQ(std::count(s.plan().begin(), s.plan().end(), 1), 0);  // nothing offloaded
    EXPECT_EQ(greedy(s, 16), reference_tokens(16));
}

// Log-probabilities and log-likelihoods are oracles on the model's outputs (SECURITY-EVAL.md, A6): the trusted core
// releases them for a package only as far as its owner allowed at packing time, whatever the host asks.
TEST(Package, OwnerPolicyBoundsWhatLeavesBesidesTokens) {
    const std::vector<int32_t> tokens = {1, 403, 407, 261}, targets = {403, 407, 261, 378};
    {
        const Packed pk = make_package();
        const auto package = Package::open(pk.path);
        EXPECT_EQ(package->release(), 0u);
        SecureSession s(package->model().source, package_params(pk, package));
        expect_error([&] { s.eval_nll(tokens, targets); }, Status::security,
                     "the package's owner does not allow log-likelihood evaluation (perplexity)");
        auto p = package_params(pk, package);
        p.logprobs = 1;
        SecureSession lp(package->model().source, p);
        lp.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
        expect_error([&] { lp.eval_sample(std::vector<int32_t>{1}); }, Status::security,
                     "the package's owner allows at most 0 log-probabilities per token; 1 were asked");
    }
    const Packed pk = make_package("lora", 5, true);
    const auto package = Package::open(pk.path);
    EXPECT_EQ(package->release(), 5u | pkg::kReleaseNll);
    auto p = package_params(pk, package);
    p.logprobs = 5;
    SecureSession s(package->model().source, p);
    const auto [nll, n] = s.eval_nll(tokens, targets);
    EXPECT_EQ(n, targets.size());
    EXPECT_GT(nll, 0.0);
    s.reset();
    s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    std::vector<TokenLogprob> lps;
    s.eval_sample(std::vector<int32_t>{1}, &lps);
    EXPECT_EQ(lps.size(), 5u);
    EXPECT_NE(describe_package(pk.path).find("release: top-5 log-probabilities per token, log-likelihood evaluation "
                                             "allowed"), std::string::npos);
}

TEST(Package, NamedSecretTensorStaysInside) {
    const Packed pk = make_package("blk.0.attn_q.weight,output_norm.weight");
    const auto package = Package::open(pk.path);
    SecureSession s(package->model().source, package_params(pk, package));
    EXPECT_EQ(s.plan()[0], 0);  // blk.0.attn_q
    EXPECT_EQ(s.plan()[1], 1);
    EXPECT_EQ(greedy(s, 16), reference_tokens(16));
}

TEST(Package, InspectShowsTheManifestWithoutAKey) {
    const Packed pk = make_package();
    const std::string text = describe_package(pk.path);
    EXPECT_NE(text.find("secret blk.0.attn_q.weight.lora_a"), std::string::npos) << text;
    EXPECT_NE(text.find("public blk.0.attn_q.weight"), std::string::npos);
    EXPECT_NE(text.find("part: public.gguf"), std::string::npos);
}

TEST(Package, WrongKeyIsRefusedBeforeAnythingIsDecrypted) {
    const Packed pk = make_package();
    Packed other = pk;
    other.key_file = pk.dir + "/other.key";
    write_owner_key(other.key_file, generate_owner_key());
    const auto package = Package::open(pk.path);
    expect_error([&] { SecureSession s(package->model().source, package_params(other, package)); },
                 Status::integrity, "package manifest failed authentication: the model key is wrong");
}

TEST(Package, FlippedCiphertextOrTagIsCaughtByTheHostAndByTheEnclave) {
    const Packed pk = make_package();
    const std::string name = "blk.2.ffn_down.weight.lora_b";
    const size_t at = secret_offset(pk.path, name);
    for (const bool tag : {false, true}) {
        SCOPED_TRACE(tag ? "tag" : "ciphertext");
        const std::string copy = pk.dir + (tag ? "/tag.sipkg" : "/ct.sipkg");
        std::filesystem::copy_file(pk.path, copy, std::filesystem::copy_options::overwrite_existing);
        const auto m = manifest_of(copy);
        size_t size = 0;
        for (const auto& t : m["tensors"])
            if (t["name"] == name) size = t["size"];
        flip_byte(copy, tag ? at + size - 3 : at + 5);
        expect_error([&] { Package::open(copy); }, Status::integrity,
                     "secret tensor " + name + ": its ciphertext does not match its sha256");
        // Without the host's check, the trusted core's own authentication refuses the chunk.
        const auto unchecked = Package::open(copy, false);
        expect_error([&] { SecureSession s(unchecked->model().source, package_params(pk, unchecked)); },
                     Status::integrity, "secret tensor " + name + " chunk 0 failed authentication");
    }
}

TEST(Package, FlippedManifestFieldIsRefused) {
    const Packed pk = make_package();
    const std::string b = slurp(pk.path);
    const size_t name_at = b.find("\"stories260K\"");
    ASSERT_NE(name_at, std::string::npos);
    flip_byte(pk.path, name_at + 1);  // "Stories260K": still a valid manifest for the host
    const auto package = Package::open(pk.path);
    expect_error([&] { SecureSession s(package->model().source, package_params(pk, package)); }, Status::integrity,
                 "package manifest failed authentication");
    // a byte of the binary secret table, and of the MAC
    const pkg::Header h = pkg::decode_header(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
    for (size_t at : {size_t(pkg::kHeaderBytes + h.manifest_len + 4 + 32), size_t(h.payload_offset - 1)}) {
        test::write_file(pk.path, b);
        flip_byte(pk.path, at);
        const auto p2 = Package::open(pk.path, false);
        expect_error([&] { SecureSession s(p2->model().source, package_params(pk, p2)); }, Status::integrity,
                     "package manifest failed authentication");
    }
}

TEST(Package, FlippedPublicTensorIsRefused) {
    const Packed pk = make_package();
    const auto m = manifest_of(pk.path);
    const std::string b = slurp(pk.path);
    const pkg::Header h = pkg::decode_header(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
    const size_t public_size = m["parts"][0]["size"];
    flip_byte(pk.path, size_t(h.payload_offset) + public_size - 100);  // inside the last public tensor
    expect_error([&] { Package::open(pk.path); }, Status::integrity,
                 "part public.gguf does not match its sha256 in the manifest");
}

TEST(Package, TruncatedOrMissingPartsAreRefused) {
    const Packed pk = make_package();
    const std::string b = slurp(pk.path);
    const pkg::Header h = pkg::decode_header(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
    const std::string t = pk.dir + "/t.sipkg";
    test::write_file(t, b.substr(0, 40));
    expect_error([&] { Package::open(t); }, Status::format, "shorter than its 64-byte header");
    test::write_file(t, b.substr(0, size_t(h.payload_offset) - 10));
    expect_error([&] { Package::open(t); }, Status::format, "truncated");
    test::write_file(t, b.substr(0, b.size() - 1000));
    expect_error([&] { Package::open(t); }, Status::format, "part secret.bin");
    test::write_file(t, b.substr(0, size_t(h.payload_offset) + 5000));
    expect_error([&] { Package::open(t); }, Status::format, "extends past the end of the file");
    // a manifest that leaves out the secret part (re-encoded: the host sees no MAC problem, only the gap)
    auto m = manifest_of(pk.path);
    m["parts"].erase(1);
    const std::string man = m.dump();
    pkg::Header h2 = h;
    h2.manifest_len = man.size();
    h2.payload_offset = pkg::kHeaderBytes + man.size() + h.table_len + pkg::kHashBytes;
    const auto head = pkg::encode_header(h2);
    std::string nb(reinterpret_cast<const char*>(head.data()), head.size());
    nb += man;
    nb += b.substr(size_t(pkg::kHeaderBytes + h.manifest_len), size_t(h.table_len + pkg::kHashBytes));
    nb += b.substr(size_t(h.payload_offset), size_t(m["parts"][0]["size"]));
    test::write_file(t, nb);
    expect_error([&] { Package::open(t); }, Status::format, "manifest lists no part 'secret.bin' (missing part)");
    test::write_file(t, "");
    expect_error([&] { Package::open(t); }, Status::format, "package truncated");
    expect_error([&] { Package::open(pk.dir + "/absent.sipkg"); }, Status::io, "cannot open");
}

TEST(Package, AnotherFormatVersionIsRefused) {
    const Packed pk = make_package();
    std::string b = slurp(pk.path);
    // version 2 tables do not say which RoPE frequency factors the model runs with: pack again
    for (const char v : {1, 2}) {
        b[8] = v;
        test::write_file(pk.path, b);
        expect_error([&] { Package::open(pk.path); }, Status::unsupported,
                     "package format version " + std::to_string(int(v)) +
                         " is not supported (this build reads version 3); pack the model again");
    }
    b[8] = 4;
    test::write_file(pk.path, b);
    expect_error([&] { Package::open(pk.path); }, Status::unsupported,
                 "package format version 4 is not supported (this build reads version 3)");
}

TEST(Package, OwnerKeyFilesAreCheckedAndNeverOverwritten) {
    const std::string dir = test::scratch_dir();
    write_owner_key(dir + "/k", generate_owner_key());
    expect_error([&] { write_owner_key(dir + "/k", generate_owner_key()); }, Status::io, "already exists");
    test::write_file(dir + "/bad", "secureinfer-owner-key v1 1234\n");
    expect_error([&] { read_owner_key(dir + "/bad"); }, Status::format, "not a secureinfer owner key");
    EXPECT_EQ(std::filesystem::status(dir + "/k").permissions() & std::filesystem::perms::all,
              std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
}

// ---- attestation and key release --------------------------------------------------------------------------------

namespace {

using Core = test::SoftwareCore;
using test::measurement_of;

}  // namespace

TEST(Attestation, KeyReleaseToAnAllowedMeasurementAndEveryRefusal) {
    const std::string dir = test::scratch_dir();
    const pkg::Hash good = measurement_of("good"), evil = measurement_of("evil");
    Core core(dir + "/dev", good);
    const pkg::Key owner = generate_owner_key();
    AttestationPolicy policy;
    policy.allowed_measurements = {good};
    policy.accept_software_tee = true;
    policy.devices = {{"dev", core.platform->quoting_public_key()}};
    KeyService ks(owner, policy, std::chrono::seconds(60));
    std::vector<std::string> warnings;
    ks.set_warn([&](const std::string& w) { warnings.push_back(w); });
    auto now = std::chrono::steady_clock::now();
    ks.set_clock([&] { return now; });
    pkg::ModelId id{};
    pkg::random_bytes(id);

    // software-tee refused without the accept flag
    {
        AttestationPolicy strict = policy;
        strict.accept_software_tee = false;
        KeyService s2(owner, strict);
        const auto q = core.quote(s2.new_nonce());
        expect_error([&] { s2.release(q, id); }, Status::security, "type software-tee");
    }
    // wrong measurement
    {
        Core other(dir + "/dev", evil);
        const auto q = other.quote(ks.new_nonce());
        expect_error([&] { ks.release(q, id); }, Status::security, "is not in the allow list");
    }
    // bad signature: a flipped byte in the signed report, and in the signature itself
    for (const size_t from_end : {size_t(pkg::kSigBytes + pkg::kPubBytes + 3), size_t(5)}) {
        auto q = core.quote(ks.new_nonce());
        q[q.size() - from_end] ^= 1;
        expect_error([&] { ks.release(q, id); }, Status::security, "signature does not verify");
    }
    // a nonce the keyserver never issued
    {
        pkg::Nonce n{};
        pkg::random_bytes(n);
        expect_error([&] { ks.release(core.quote(n), id); }, Status::security, "nonce was not issued by this keyserver");
    }
    // stale nonce
    {
        const auto q = core.quote(ks.new_nonce());
        now += std::chrono::seconds(61);
        expect_error([&] { ks.release(q, id); }, Status::security, "nonce is stale");
    }
    // the good path, then the same quote replayed
    const auto q = core.quote(ks.new_nonce());
    warnings.clear();
    const auto wrapped = ks.release(q, id);
    ASSERT_EQ(warnings.size(), 2u);
    EXPECT_NE(warnings[0].find("WARNING: accepting a software-tee quote of device dev"), std::string::npos);
    EXPECT_EQ(warnings[1], "released model key for " + pkg::to_hex(id) + " to device dev");
    expect_error([&] { ks.release(q, id); }, Status::security, "nonce was already used (a replayed quote)");
    // the wrapped key opens only in the enclave that attested, once
    {
        Core other(dir + "/dev", good);
        (void)other.quote(ks.new_nonce());
        expect_error([&] { other.release(wrapped, id); }, Status::security, "does not open under this enclave's");
    }
    const std::vector<uint8_t> sealed = core.release(wrapped, id);
    EXPECT_EQ(sealed.size(), pkg::kSealedBytes);

    // sealing: the same measurement on the same device unseals; another measurement cannot
    {
        Core same(dir + "/dev", good);
        EXPECT_NO_THROW(same.unseal(sealed));
    }
    {
        Core other(dir + "/dev", evil);
        expect_error([&] { other.unseal(sealed); }, Status::security, "sealed by an enclave with another measurement");
    }
    {
        Core other_device(dir + "/dev2", good);
        expect_error([&] { other_device.unseal(sealed); }, Status::security, "does not open under this enclave's sealing key");
    }
}

TEST(Attestation, KeyserverOverHttpAndSealedRestart) {
    const Packed pk = make_package();
    tee::provision_device(pk.device);
    AttestationPolicy policy;
    policy.allowed_measurements = {inprocess_measurement()};
    policy.accept_software_tee = true;
    policy.devices = {{"this-host", tee::read_quoting_public_key(pk.device)}};
    KeyService ks(pk.owner, policy);
    ks.set_warn([](const std::string&) {});
    KeyServer server(ks);
    const int port = server.start("127.0.0.1", 0);
    const auto package = Package::open(pk.path);
    SecureSessionParams p = package_params(pk, package);
    p.key.owner_key_file.clear();
    p.key.keyserver_url = "http://127.0.0.1:" + std::to_string(port);
    p.key.sealed_key_path = pk.dir + "/model.sealed";
    const auto want = reference_tokens(12);
    {
        SecureSession s(package->model().source, p);
        EXPECT_EQ(greedy(s, 12), want);
    }
    ASSERT_TRUE(std::filesystem::exists(p.key.sealed_key_path));
    server.stop();
    // restart without the keyserver: the sealed key
    p.key.keyserver_url.clear();
    {
        SecureSession s(package->model().source, p);
        EXPECT_EQ(greedy(s, 12), want);
    }
    // the keyserver refuses a measurement it does not allow, with its reason
    AttestationPolicy strict = policy;
    strict.allowed_measurements = {measurement_of("other")};
    KeyService ks2(pk.owner, strict);
    KeyServer server2(ks2);
    const int port2 = server2.start("127.0.0.1", 0);
    p.key.keyserver_url = "http://127.0.0.1:" + std::to_string(port2);
    p.key.sealed_key_path.clear();
    expect_error([&] { SecureSession s(package->model().source, p); }, Status::security,
                 "keyserver refused to release the model key: quote refused: measurement");
}

// ---- end to end with the CLI and the hardened worker ---------------------------------------------------------------

TEST(PackageCli, KeygenPackKeyserverRunMatchesUnpackedAndLeaksNoSecretBytes) {
    const std::string dir = test::scratch_dir();
    setenv("SI_DEVICE_DIR", (dir + "/device").c_str(), 1);
    const std::string key = dir + "/owner.key", pkgf = dir + "/m.sipkg", sealed = dir + "/m.sealed";
    auto r = test::run_cli({"keygen", "-o", key});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = test::run_cli({"pack", "--base", kModel, "--tokenizer", kTok, "--lora", kAdapter, "--key-file", key, "-o", pkgf});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = test::run_cli({"inspect", pkgf});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("secret: lora"), std::string::npos);
    r = test::run_cli({"measure"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string m = r.out.substr(0, 64);
    pkg::Hash allowed{};
    ASSERT_TRUE(pkg::from_hex(m, allowed)) << r.out;
    WorkerOptions wo;
    wo.worker_path = worker_next_to_cli();
    EXPECT_EQ(allowed, worker_measurement(wo));

    // the owner's keyserver, on loopback in this process, with the device registered as device-key prints it
    r = test::run_cli({"device-key", "--name", "dev-1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    AttestationPolicy policy;
    policy.allowed_measurements = {allowed};
    policy.accept_software_tee = true;
    policy.devices = {parse_device(r.out.substr(0, r.out.find('\n')))};
    EXPECT_EQ(policy.devices[0].name, "dev-1");
    KeyService ks(read_owner_key(key), policy);
    ks.set_warn([](const std::string&) {});
    KeyServer server(ks);
    const std::string url = "http://127.0.0.1:" + std::to_string(server.start("127.0.0.1", 0));

    const std::vector<std::string> gen = {"-p", "Once upon a time", "-n", "24", "--temp", "0", "-t", "2"};
    auto args = std::vector<std::string>{"run", "--package", pkgf, "--keyserver", url, "--sealed-key", sealed,
                                         "--host", "worker", "--trace", dir + "/trace"};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto packed = test::run_cli(args);
    ASSERT_EQ(packed.exit_code, 0) << packed.err;
    args = {"run", "-m", kModel, "--tokenizer", kTok, "--lora", kAdapter, "--host", "worker"};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto plain = test::run_cli(args);
    ASSERT_EQ(plain.exit_code, 0) << plain.err;
    EXPECT_EQ(packed.out, plain.out);
    EXPECT_GT(packed.out.size(), 20u);

    // the sealed key restarts without the keyserver
    server.stop();
    args = {"run", "--package", pkgf, "--sealed-key", sealed, "--host", "worker"};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto restarted = test::run_cli(args);
    ASSERT_EQ(restarted.exit_code, 0) << restarted.err;
    EXPECT_EQ(restarted.out, plain.out);
    // another measurement (the in-process core of the CLI) cannot unseal it
    args = {"run", "--package", pkgf, "--sealed-key", sealed, "--host", "inprocess"};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto other = test::run_cli(args);
    EXPECT_EQ(other.exit_code, 1);
    EXPECT_NE(other.err.find("sealed by an enclave with another measurement"), std::string::npos) << other.err;
    EXPECT_EQ(other.out, "");

    // nothing the host can read holds the adapter's bytes: the package, the sealed key, the boundary trace
    const auto secrets = adapter_tensor_bytes();
    ASSERT_TRUE(holds_secret_bytes(slurp(kAdapter), secrets));  // the search works
    EXPECT_FALSE(holds_secret_bytes(slurp(pkgf), secrets));
    EXPECT_FALSE(holds_secret_bytes(slurp(sealed), secrets));
    size_t trace_files = 0;
    for (const auto& f : std::filesystem::recursive_directory_iterator(dir + "/trace")) {
        ++trace_files;
        EXPECT_FALSE(holds_secret_bytes(slurp(f.path().string()), secrets)) << f.path();
    }
    EXPECT_GT(trace_files, 10u);
    unsetenv("SI_DEVICE_DIR");
}

TEST(PackageCli, UsageAndRefusals) {
    const std::string dir = test::scratch_dir();
    auto r = test::run_cli({"run", "--keyserver", "http://127.0.0.1:1", "-m", kModel});
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_NE(r.err.find("apply to --package only"), std::string::npos) << r.err;
    r = test::run_cli({"keyserver", "--key-file", dir + "/none", "--allow", "zz"});
    EXPECT_EQ(r.exit_code, 2) << r.err;
    r = test::run_cli({"pack", "--base", kModel, "--tokenizer", kTok, "--key-file", dir + "/none", "-o", dir + "/x"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("cannot open"), std::string::npos) << r.err;
}
