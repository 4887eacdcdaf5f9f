// Bounded-memory loading: models read one tensor at a time (common/tensor_source.h) give exactly what the dense f32
// path gives (the same f32 values, logits, products and tokens), and the secure presets never hold an f32 copy of
// the model.
#include <gtest/gtest.h>
#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/tensor_source.h"
#include "engine/engine.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/model_file.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "testutil.h"
#include "train/lora.h"

using namespace si;

namespace {

const std::string kQ4KM = std::string(SI_SOURCE_DIR) + "/tests/data/quants/stories260K-h256-Q4_K_M.gguf";

// stories260K's real weights written as Q8_0 (its 172-wide ffn_down falls back to F16): a file whose values are
// not those of the f32 model, so the bounded path must dequantise them as the dense path does.
const std::string& q8_file() {
    static const std::string path = [] {
        const std::string p = test::scratch_dir() + "/bounded-q8_0.gguf";
        Vocab v;
        v.pieces.resize(size_t(test::stories().cfg.vocab_size));
        for (size_t i = 0; i < v.pieces.size(); ++i) v.pieces[i] = "<t" + std::to_string(i) + ">";
        write_gguf_model(p, test::stories(), v, GgufWeightType::q8_0, "bounded");
        return p;
    }();
    return path;
}

// Wraps a source and records the largest single request in f32 elements.
class CountingSource final : public TensorSource {
public:
    explicit CountingSource(const TensorSource& inner) : inner_(inner) {}
    const ModelConfig& config() const override { return inner_.config(); }
    bool tied() const override { return inner_.tied(); }
    int64_t largest() const { return largest_; }

protected:
    void do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const override {
        {
            std::lock_guard<std::mutex> lock(mu_);
            largest_ = std::max(largest_, n * inner_.tensor_cols(name));
        }
        inner_.read_rows(name, row0, n, out);
    }

private:
    const TensorSource& inner_;
    mutable std::mutex mu_;
    mutable int64_t largest_ = 0;
};

SecureSessionParams params(SecureMode mode) {
    SecureSessionParams p;
    p.mode = mode;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 2;
    return p;
}

std::vector<int32_t> greedy(SecureSession& s, const std::vector<int32_t>& prompt, int n) {
    s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    std::vector<int32_t> out{s.eval_sample(prompt)};
    while (int(out.size()) < n) out.push_back(s.eval_sample(std::span<const int32_t>(&out.back(), 1)));
    return out;
}

long status_kib(const char* key) {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(key, 0) == 0) return std::stol(line.substr(std::strlen(key)));
    return -1;
}

const std::vector<int32_t> kPrompt = {1, 403, 261, 285, 300, 94, 7, 500};

}  // namespace

TEST(BoundedLoad, GgufSourceValuesEqualTheDenseLoad) {
    for (const std::string& path : {q8_file(), kQ4KM}) {
        const gguf::Reader r = gguf::Reader::open(path);
        const ModelWeights dense = load_gguf_model(r);
        const GgufSource src(r);
        EXPECT_EQ(src.tied(), dense.tied()) << path;
        const DenseSource want(dense);
        for (const std::string& name : model_tensor_names(src.config(), src.tied())) {
            const std::vector<float> got = src.read(name);
            ASSERT_EQ(got, want.tensor(name)) << path << " " << name;
            // any row range: the same bytes as the rows of the whole tensor
            const int64_t rows = src.tensor_rows(name), cols = src.tensor_cols(name);
            if (rows < 3) continue;
            std::vector<float> part(size_t(2 * cols));
            src.read_rows(name, rows / 2, 2, part.data());
            EXPECT_TRUE(std::equal(part.begin(), part.end(), got.begin() + (rows / 2) * cols)) << name;
        }
    }
}

TEST(BoundedLoad, BadRequestsAreRefused) {
    const gguf::Reader r = gguf::Reader::open(q8_file());
    const GgufSource src(r);
    float x[64];
    test::expect_error([&] { src.read_rows("blk.9.attn_q.weight", 0, 1, x); }, Status::invalid_argument,
                       "tensor 'blk.9.attn_q.weight' is not part of this model");
    test::expect_error([&] { src.read_rows("output_norm.weight", 0, 2, x); }, Status::invalid_argument,
                       "rows [0, 2) out of range (1 rows)");
    test::expect_error([&] { (void)src.read("output.weight"); }, Status::invalid_argument,
                       "tensor 'output.weight' is not part of this model");  // tied: token_embd is the classifier
}

TEST(BoundedLoad, EngineFromSourceGivesTheDenseLogits) {
    for (const std::string& path : {q8_file(), kQ4KM}) {
        const ModelFile dense = load_model_file(path);
        const ModelFile lazy = load_model_file(path, "", LoadWeights::lazy);
        ASSERT_TRUE(lazy.lazy);
        EXPECT_TRUE(lazy.weights.tok_embeddings.empty());  // no f32 tensor in the lazily loaded file
        for (const WeightFormat f : {WeightFormat::f32, WeightFormat::int8, WeightFormat::native}) {
            EngineParams p;
            p.n_threads = 2;
            p.weights = f;
            Engine a(dense.weights, p, dense.gguf.get());
            Engine b(*lazy.source, p, lazy.gguf.get());
            Engine c(lazy.source, p, lazy.gguf.get());  // embedding rows read from the file
            EXPECT_EQ(a.weight_bytes(), b.weight_bytes());
            const size_t embd = size_t(dense.weights.cfg.vocab_size) * size_t(dense.weights.cfg.dim) * 4;
            EXPECT_EQ(a.weight_bytes(), c.weight_bytes() + embd);
            const int V = dense.weights.cfg.vocab_size;
            const float* la = a.eval(kPrompt, true);
            const std::vector<float> want(la, la + kPrompt.size() * size_t(V));
            const float* lb = b.eval(kPrompt, true);
            ASSERT_TRUE(std::equal(want.begin(), want.end(), lb)) << path << " " << weight_format_name(f);
            const float* lc = c.eval(kPrompt, true);
            ASSERT_TRUE(std::equal(want.begin(), want.end(), lc)) << path << " " << weight_format_name(f);
        }
    }
}

TEST(BoundedLoad, SecurePresetsFromSourceGiveTheDenseTokensAndProducts) {
    for (const std::string& path : {q8_file(), kQ4KM}) {
        const ModelFile dense = load_model_file(path);
        const ModelFile lazy = load_model_file(path, "", LoadWeights::lazy);
        // gpu-only: every logit bit-identical (the same int8 products)
        {
            SecureSession a(dense.weights, params(SecureMode::gpu_only));
            SecureSession b(lazy.source, params(SecureMode::gpu_only));  // embedding rows read from the file
            const int V = dense.weights.cfg.vocab_size;
            const float* la = a.eval_logits(kPrompt, true);
            const std::vector<float> want(la, la + kPrompt.size() * size_t(V));
            const float* lb = b.eval_logits(kPrompt, true);
            ASSERT_TRUE(std::equal(want.begin(), want.end(), lb)) << path;
        }
        // the enclave presets: the same greedy tokens and the same summed NLL (a function of every logit)
        for (const SecureMode m : {SecureMode::secureinfer, SecureMode::enclave_only}) {
            SecureSession a(dense.weights, params(m));
            SecureSession b(*lazy.source, params(m));
            EXPECT_EQ(greedy(a, kPrompt, 12), greedy(b, kPrompt, 12)) << path << " " << secure_mode_name(m);
            a.reset();
            b.reset();
            std::vector<int32_t> targets(kPrompt.begin() + 1, kPrompt.end());
            targets.push_back(-1);
            EXPECT_EQ(a.eval_nll(kPrompt, targets), b.eval_nll(kPrompt, targets)) << path << " " << secure_mode_name(m);
        }
    }
}

TEST(BoundedLoad, LoadingReadsEachTensorInSmallPieces) {
    // No consumer asks for more than a few MiB of f32 at a time, nor reads the model more than once (the
    // classifier of a tied model is token_embd read a second time, for its int8 rows).
    ModelConfig c = shape_preset("stories15m");
    c.seq_len = 64;
    const RandomSource random(c, 5);
    const int64_t embd = int64_t(c.vocab_size) * c.dim;
    const uint64_t params_f32 = c.n_params(true);
    for (const SecureMode m : {SecureMode::gpu_only, SecureMode::secureinfer, SecureMode::enclave_only}) {
        const CountingSource src(random);
        SecureSession s(src, params(m));
        // gpu-only keeps the f32 embeddings on the host, read whole; everything else comes in pieces
        EXPECT_LE(src.largest(), m == SecureMode::gpu_only ? embd : int64_t(1) << 22) << secure_mode_name(m);
        // the embeddings' 8 MiB upload chunks each re-read the row they split
        EXPECT_GE(src.f32_elements_read(), params_f32 + uint64_t(embd)) << secure_mode_name(m);
        EXPECT_LE(src.f32_elements_read(), params_f32 + uint64_t(embd) + 16 * uint64_t(c.dim)) << secure_mode_name(m);
    }
    for (const WeightFormat f : {WeightFormat::int8, WeightFormat::native}) {
        const CountingSource src(random);
        EngineParams p;
        p.n_threads = 2;
        p.weights = f;
        Engine e(src, p);
        // int8 reads tensor by tensor (the tied classifier is quantised from the embeddings the engine keeps);
        // native, without a file, re-quantises a block of rows at a time, the classifier read again
        EXPECT_LE(src.largest(), std::max<int64_t>(embd, int64_t(c.hidden_dim) * c.dim)) << weight_format_name(f);
        EXPECT_EQ(src.f32_elements_read(), params_f32 + (f == WeightFormat::native ? uint64_t(embd) : 0))
            << weight_format_name(f);
    }
}

// Measures the resident set, so it is built only without AddressSanitizer: ASan's allocator keeps freed blocks in
// quarantine (256 MiB by default) and pads every block, so its peak says nothing about what the loader holds. The
// sanitizer build still runs LoadingReadsEachTensorInSmallPieces above, which bounds what each consumer reads.
#if !defined(__SANITIZE_ADDRESS__)
TEST(BoundedLoad, SecurePresetsStayWithinTheirInt8Bytes) {
    // A 100M-parameter model (400 MB in f32): loading gpu-only keeps the accelerator's int8 copy; secureinfer (core
    // in this process) a second int8 copy and the f32 embeddings inside the core. Peak resident memory (VmHWM,
    // reset before each load) grows by that plus the temporaries of one matrix at a time.
    ModelConfig c = shape_preset("stories110m");
    c.seq_len = 64;
    const auto src = std::make_shared<const RandomSource>(c, 9);
    const double int8_bytes = double(c.n_params(true));
    const double embd_f32 = 4.0 * c.vocab_size * c.dim;
    for (const SecureMode m : {SecureMode::gpu_only, SecureMode::secureinfer}) {
        malloc_trim(0);  // what earlier tests freed leaves the resident set, so it cannot be reused unseen
        {
            std::ofstream clear("/proc/self/clear_refs");
            clear << "5";  // resets VmHWM to the current resident size
            ASSERT_TRUE(clear.good()) << "cannot reset the peak resident size";
        }
        const long before = status_kib("VmHWM:");
        double grew = 0;
        {
            SecureSession s(src, params(m));
            grew = double(status_kib("VmHWM:") - before) * 1024.0;
        }
        // gpu-only reads embedding rows from the source: the int8 weights alone (the target: 1.2x);
        // secureinfer: two int8 copies and the core's f32 embeddings
        const double copies = m == SecureMode::gpu_only ? 1.0 : 2.0;
        const double embd = m == SecureMode::gpu_only ? 0.0 : embd_f32;
        std::printf("%s: peak resident memory grew by %.1f MiB loading (int8 weights %.1f MiB)\n",
                    secure_mode_name(m), grew / 1048576.0, int8_bytes / 1048576.0);
        // Temporaries (measured about 100 MiB here: the largest matrix's int8 rows on their way, blocks of f32 rows,
        // message buffers) get half an f32 copy of room: a whole f32 copy of the model would exceed the bound.
        EXPECT_LT(grew, copies * int8_bytes + embd + 2.0 * int8_bytes) << secure_mode_name(m);
        if (m == SecureMode::gpu_only) {
            EXPECT_LT(grew, 2.0 * int8_bytes);
        }
    }
}

#endif  // !__SANITIZE_ADDRESS__

TEST(BoundedLoad, RandomSourceIsStreamable) {
    ModelConfig c = shape_preset("stories15m");
    c.n_layers = 2;
    const RandomSource a(c, 3), b(c, 3), other(c, 4);
    for (const std::string& name : {std::string("token_embd.weight"), proj_tensor_name(1, Proj::w2)}) {
        const std::vector<float> whole = a.read(name);
        EXPECT_EQ(whole, b.read(name)) << name;  // a function of the seed alone
        EXPECT_NE(whole, other.read(name)) << name;
        for (const float x : whole) ASSERT_TRUE(x >= -0.05f && x < 0.05f) << name;
        // rows in any order and any pieces: the same values
        const int64_t rows = a.tensor_rows(name), cols = a.tensor_cols(name);
        std::vector<float> pieces(whole.size());
        for (int64_t r0 = rows; r0 > 0;) {
            const int64_t n = std::min<int64_t>(r0, 37);
            r0 -= n;
            a.read_rows(name, r0, n, pieces.data() + r0 * cols);
        }
        EXPECT_EQ(pieces, whole) << name;
    }
    EXPECT_NE(a.read(proj_tensor_name(0, Proj::q)), a.read(proj_tensor_name(1, Proj::q)));  // one stream per tensor
    for (const float x : a.read("blk.1.ffn_norm.weight")) EXPECT_EQ(x, 1.0f);
    EXPECT_TRUE(a.tied());
    EXPECT_FALSE(RandomSource(c, 3, true).tied());
}

TEST(BoundedLoad, SevenBillionShapes) {
    const ModelConfig l2 = shape_preset("llama2-7b");
    EXPECT_EQ(l2.dim, 4096);
    EXPECT_EQ(l2.n_layers, 32);
    EXPECT_EQ(l2.n_kv_heads, 32);
    EXPECT_EQ(l2.hidden_dim, 11008);
    EXPECT_EQ(l2.vocab_size, 32000);
    EXPECT_EQ(l2.n_params(true), uint64_t(6607343616));  // Llama 2 7B: 6.74 billion with its untied classifier
    const ModelConfig l3 = shape_preset("llama3-8b");
    EXPECT_EQ(l3.n_kv_heads, 8);
    EXPECT_EQ(l3.hidden_dim, 14336);
    EXPECT_EQ(l3.vocab_size, 128256);
    EXPECT_EQ(l3.rope_theta, 500000.0f);
    ASSERT_EQ(l3.rope_freq_factors.size(), 64u);
    EXPECT_EQ(l3.rope_freq_factors.front(), 1.0f);  // high frequencies unscaled
    EXPECT_EQ(l3.rope_freq_factors.back(), 8.0f);   // low frequencies divided by the factor
    EXPECT_EQ(l3.n_params(false), uint64_t(8030261248));  // Llama 3.1 8B
}

TEST(BoundedLoad, StreamingWriterWritesTheDenseFile) {
    // convert --random-shape writes from the source a block of rows at a time: the same bytes as writing the whole
    // model from memory, in every output type.
    ModelConfig c = shape_preset("stories260k");
    const RandomSource src(c, 11, true);
    const ModelWeights dense = materialize(src);
    Vocab v;
    v.pieces.resize(size_t(c.vocab_size));
    for (size_t i = 0; i < v.pieces.size(); ++i) v.pieces[i] = "<t" + std::to_string(i) + ">";
    for (const GgufWeightType t : {GgufWeightType::f32, GgufWeightType::f16, GgufWeightType::q8_0}) {
        const std::string a = test::scratch_dir() + "/stream-a.gguf", b = test::scratch_dir() + "/stream-b.gguf";
        const auto notes_a = write_gguf_model(a, src, v, t, "s");
        const auto notes_b = write_gguf_model(b, dense, v, t, "s");
        EXPECT_EQ(notes_a, notes_b);
        EXPECT_EQ(test::read_file(a), test::read_file(b)) << gguf_weight_type_name(t);
        if (t == GgufWeightType::f32) {
            const gguf::Reader r = gguf::Reader::open(a);
            EXPECT_EQ(GgufSource(r).read(proj_tensor_name(4, Proj::w2)), src.read(proj_tensor_name(4, Proj::w2)));
        }
    }
}

TEST(BoundedLoad, TheCorePacksAProjectionOnceAndRefusesItAgain) {
    // The trusted core packs a projection (and derives its Freivalds key) as soon as its upload completes; a later
    // chunk of it, even an empty one at its end, would re-pack whatever it held then: refused.
    si_enclave* e = nullptr;
    ASSERT_EQ(si_ecall_create(nullptr, &e), 0);
    std::vector<uint8_t> buf(1 << 16);
    std::string err;
    auto call = [&](const std::vector<uint8_t>& req) {
        size_t len = 0;
        const int rc = si_ecall_process(e, req.data(), req.size(), buf.data(), buf.size(), &len);
        err = rc != 0 ? reinterpret_cast<const char*>(buf.data()) : "";
        return rc;
    };
    ModelConfig c = shape_preset("stories260k");
    wire::Encoder conf(wire::MsgType::configure);
    conf.add(wire::Tag::cfg_ints, std::vector<int32_t>{c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                                                      c.vocab_size, c.seq_len, 16});
    conf.add(wire::Tag::cfg_floats, std::vector<float>{c.rope_theta, c.norm_eps});
    conf.scalar<uint8_t>(wire::Tag::offload, 1);
    conf.scalar<uint8_t>(wire::Tag::tied, 1);
    ASSERT_EQ(call(conf.finish()), 0) << err;
    const uint64_t n = uint64_t(c.dim) * uint64_t(c.dim);  // blk.0.attn_q
    auto upload = [&](uint64_t offset, size_t count) {
        wire::Encoder up(wire::MsgType::upload);
        up.scalar<uint32_t>(wire::Tag::kind, uint32_t(wire::TensorKind::proj_weight));
        up.scalar<int32_t>(wire::Tag::layer, 0);
        up.scalar<int32_t>(wire::Tag::proj, int32_t(Proj::q));
        up.scalar<uint64_t>(wire::Tag::offset, offset);
        up.scalar<uint64_t>(wire::Tag::total, n);
        up.add(wire::Tag::data_i8, std::vector<int8_t>(count, 3));
        if (offset == 0) up.scalar<uint8_t>(wire::Tag::secret, 0);
        return call(up.finish());
    };
    EXPECT_EQ(upload(0, size_t(n / 2)), 0) << err;
    EXPECT_EQ(upload(n / 2, size_t(n - n / 2)), 0) << err;
    EXPECT_EQ(upload(n, 0), int(Status::invalid_argument));
    EXPECT_NE(err.find("blk.0.attn_q.weight: sent twice"), std::string::npos) << err;
    EXPECT_EQ(upload(0, size_t(n)), int(Status::invalid_argument));
    EXPECT_NE(err.find("sent twice"), std::string::npos) << err;
    si_ecall_destroy(e);
}

// A protected package's public model is read in place, one tensor at a time, like a plain file: nothing dense is
// built when it is opened, its secret base tensors read as zeros without being stored, and a session loading it
// through its source gives the tokens of the unpacked model and adapter.
TEST(BoundedLoad, PackageLoadsItsPublicModelThroughItsSource) {
    const std::string model = test::shared("models/stories260K.bin"), tok = test::shared("models/tok512.bin");
    const std::string dir = test::scratch_dir();
    const std::string path = dir + "/model.sipkg", key_file = dir + "/owner.key";
    pkg::Key owner = generate_owner_key();
    write_owner_key(key_file, owner);
    PackOptions o;
    o.base = model;
    o.tokenizer = tok;
    o.loras = {test::adapter_path()};
    o.secret = test::kScrapedSecrets;  // blk.0.attn_q.weight, blk.3.ffn_down.weight
    write_package(path, o, owner);

    const auto package = Package::open(path);
    const ModelFile& pm = package->model();
    const ModelWeights& base = test::stories();
    ASSERT_TRUE(pm.lazy);
    ASSERT_NE(pm.source, nullptr);
    EXPECT_TRUE(pm.weights.layers.empty());
    EXPECT_TRUE(pm.weights.tok_embeddings.empty());
    EXPECT_EQ(pm.weights.cfg.dim, base.cfg.dim);
    EXPECT_EQ(pm.source->tied(), base.tied());
    EXPECT_EQ(pm.source->f32_elements_read(), 0u);
    // public tensors as stored, secret placeholders zero
    EXPECT_EQ(pm.source->read("blk.0.attn_k.weight"), base.layers[0].wk);
    EXPECT_EQ(pm.source->read("token_embd.weight"), base.tok_embeddings);
    const std::vector<float> q = pm.source->read("blk.0.attn_q.weight");
    ASSERT_EQ(q.size(), base.layers[0].wq.size());
    EXPECT_TRUE(std::all_of(q.begin(), q.end(), [](float x) { return x == 0.0f; }));
    std::vector<float> row(size_t(pm.source->tensor_cols("blk.3.ffn_down.weight")), 1.0f);
    pm.source->read_rows("blk.3.ffn_down.weight", 5, 1, row.data());
    EXPECT_TRUE(std::all_of(row.begin(), row.end(), [](float x) { return x == 0.0f; }));

    // the unpacked model and adapter
    const train::LoraAdapter adapter = train::read_lora_adapter(test::adapter_path(), base.cfg);
    SecureSessionParams rp = params(SecureMode::secureinfer);
    rp.lora = &adapter;
    SecureSession ref(base, rp);
    const std::vector<int32_t> want = greedy(ref, kPrompt, 12);

    // the package, its public tensors counted as the session reads them
    const CountingSource src(*pm.source);
    SecureSessionParams pp = params(SecureMode::secureinfer);
    pp.package = package;
    pp.key.device_dir = dir + "/device";
    pp.key.owner_key_file = key_file;
    SecureSession s(src, pp);
    EXPECT_EQ(greedy(s, kPrompt, 12), want);
    const ModelConfig& c = base.cfg;
    const int64_t embd = int64_t(c.vocab_size) * c.dim;
    // no request larger than one tensor, each tensor read once (the embeddings' upload chunks re-read a row each)
    EXPECT_LE(src.largest(), std::max<int64_t>(embd, int64_t(c.hidden_dim) * c.dim));
    EXPECT_GE(src.f32_elements_read(), c.n_params(base.tied()));
    EXPECT_LE(src.f32_elements_read(), c.n_params(base.tied()) + uint64_t(embd) + 16 * uint64_t(c.dim));
}
