// GGUF format layer: writer/reader round trips, conversion error bounds, the shared llama.cpp fixtures, and one
// crafted corrupt file per failure mode (each checked for its status and a specific part of its message).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/fp16.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "testutil.h"

using namespace si;
using namespace si::gguf;

namespace {

// ---- hand-built file images -------------------------------------------------------------------------------------

struct Bytes {
    std::string s;
    template <class T>
    Bytes& put(T v) {
        s.append(reinterpret_cast<const char*>(&v), sizeof v);
        return *this;
    }
    Bytes& u32(uint32_t v) { return put(v); }
    Bytes& u64(uint64_t v) { return put(v); }
    Bytes& str(std::string_view v) {
        u64(v.size());
        s.append(v);
        return *this;
    }
    Bytes& raw(std::string_view v) {
        s.append(v);
        return *this;
    }
    Bytes& pad(size_t a) {
        s.append((a - s.size() % a) % a, '\0');
        return *this;
    }
    Bytes& zeros(size_t n) {
        s.append(n, '\0');
        return *this;
    }
};

Bytes header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    Bytes b;
    b.raw("GGUF").u32(version).u64(n_tensors).u64(n_kv);
    return b;
}
std::string kv_u32(std::string_view key, uint32_t v) { return Bytes().str(key).u32(uint32_t(ValueType::u32)).u32(v).s; }
std::string kv_str(std::string_view key, std::string_view v) {
    return Bytes().str(key).u32(uint32_t(ValueType::string)).str(v).s;
}
std::string tinfo(std::string_view name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    Bytes b;
    b.str(name).u32(uint32_t(ne.size()));
    for (uint64_t x : ne) b.u64(x);
    b.u32(type).u64(offset);
    return b.s;
}
// A complete file: header, metadata, tensor infos, padding to `align`, then `data_bytes` zero bytes of data.
std::string image(const std::vector<std::string>& kvs, const std::vector<std::string>& infos, size_t data_bytes,
                  size_t align = 32) {
    Bytes b = header(infos.size(), kvs.size());
    for (const auto& k : kvs) b.raw(k);
    for (const auto& t : infos) b.raw(t);
    b.pad(align).zeros(data_bytes);
    return b.s;
}

// Parses (and, for model files, loads) the bytes and checks the error's status and message.
enum class Stage { parse, model, vocab };
void expect_error(const std::string& bytes, Status status, const std::string& part, Stage stage = Stage::parse) {
    SCOPED_TRACE("expecting: " + part);
    try {
        const Reader r = Reader::from_memory(bytes, "bad.gguf");
        if (stage == Stage::model) load_gguf_model(r);
        if (stage == Stage::vocab) load_gguf_vocab(r);
        ADD_FAILURE() << "no error";
    } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_EQ(int(e.status()), int(status)) << msg;
        EXPECT_NE(msg.find(part), std::string::npos) << msg;
        EXPECT_EQ(msg.rfind("bad.gguf: ", 0), 0u) << "message must name the file: " << msg;
    }
}

// ---- tiny models -----------------------------------------------------------------------------------------------

ModelWeights random_model(const ModelConfig& cfg, bool tied, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    auto fill = [&](size_t n) {
        std::vector<float> v(n);
        for (auto& x : v) x = U(rng);
        return v;
    };
    ModelWeights w;
    w.cfg = cfg;
    const size_t d = cfg.dim, h = cfg.hidden_dim, kv = cfg.kv_dim(), v = cfg.vocab_size;
    w.tok_embeddings = fill(v * d);
    for (int l = 0; l < cfg.n_layers; ++l) {
        LayerWeights L;
        L.attn_norm = fill(d);
        L.wq = fill(d * d);
        L.wk = fill(kv * d);
        L.wv = fill(kv * d);
        L.wo = fill(d * d);
        L.ffn_norm = fill(d);
        L.w1 = fill(h * d);
        L.w2 = fill(d * h);
        L.w3 = fill(h * d);
        w.layers.push_back(std::move(L));
    }
    w.final_norm = fill(d);
    if (!tied) w.classifier = fill(v * d);
    return w;
}

Vocab simple_vocab(int n) {
    Vocab v;
    for (int i = 0; i < n; ++i) {
        v.pieces.push_back(i == 0 ? "<unk>" : i == 1 ? "<s>" : i == 2 ? "</s>" : "\xe2\x96\x81t" + std::to_string(i));
        v.scores.push_back(-float(i));
        v.types.push_back(i == 0 ? TokenType::unknown : i < 3 ? TokenType::control : TokenType::normal);
    }
    return v;
}

// stories260K's shape (hidden 172 is not a multiple of 32) with fewer layers.
ModelConfig stories_like() {
    ModelConfig c;
    c.dim = 64;
    c.hidden_dim = 172;
    c.n_layers = 2;
    c.n_heads = 8;
    c.n_kv_heads = 4;
    c.vocab_size = 64;
    c.seq_len = 128;
    return c;
}

ModelConfig tiny_cfg() {
    ModelConfig c;
    c.dim = 32;
    c.hidden_dim = 64;
    c.n_layers = 1;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = 16;
    c.seq_len = 32;
    return c;
}

// A file image of a tiny valid model (F32).
std::string tiny_model_image(bool tied = false) {
    const std::string dir = test::scratch_dir();
    const std::string path = dir + "/tiny.gguf";
    write_gguf_model(path, random_model(tiny_cfg(), tied, 7), simple_vocab(16), GgufWeightType::f32, "tiny");
    return test::read_file(path);
}

// Copies a file through the writer with edits: drop keys, override keys, drop tensors, replace tensors.
struct Edit {
    std::set<std::string> drop_keys;
    std::vector<KeyValue> set_keys;
    std::set<std::string> drop_tensors;
    std::function<bool(Writer&, const TensorInfo&, const Reader&)> replace_tensor;  // true when handled
};
std::string rewrite(const std::string& bytes, const Edit& e) {
    const Reader r = Reader::from_memory(bytes, "in.gguf");
    Writer w;
    for (const auto& kv : r.metadata())
        if (!e.drop_keys.count(kv.key)) w.set(kv.key, kv.value);
    for (const auto& kv : e.set_keys) w.set(kv.key, kv.value);
    for (const auto& t : r.tensors()) {
        if (e.drop_tensors.count(t.name)) continue;
        if (e.replace_tensor && e.replace_tensor(w, t, r)) continue;
        const auto data = r.tensor_data(t);
        w.add_tensor_raw(t.name, t.shape(), t.type, {data.begin(), data.end()});
    }
    return w.serialize();
}

uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// A writer with one value of every metadata type and a few tensors (F32, F16, BF16, Q8_0).
Writer all_types_writer(uint32_t alignment) {
    Writer w;
    if (alignment != kDefaultAlignment) w.set_alignment(alignment);
    w.set_u8("t.u8", 250);
    w.set_i8("t.i8", -100);
    w.set_u16("t.u16", 65000);
    w.set_i16("t.i16", -32000);
    w.set_u32("t.u32", 4000000000u);
    w.set_i32("t.i32", -2000000000);
    w.set_u64("t.u64", 18000000000000000000ull);
    w.set_i64("t.i64", -9000000000000000000ll);
    w.set_f32("t.f32", 3.14159274f);
    float nan_payload;
    const uint32_t nan_bits = 0x7fc12345u;
    std::memcpy(&nan_payload, &nan_bits, 4);
    w.set_f32("t.f32nan", nan_payload);
    w.set_f64("t.f64", -2.718281828459045);
    w.set_bool("t.true", true);
    w.set_bool("t.false", false);
    w.set_str("t.str", "h\xc3\xa9llo");
    w.set_str("t.empty", "");
    w.set_str("t.bytes", std::string("\xff\xfe\0\x01 not utf-8", 15));
    w.set_array<uint8_t>("a.u8", {0, 1, 255});
    w.set_array<int8_t>("a.i8", {-128, 0, 127});
    w.set_array<uint16_t>("a.u16", {0, 65535});
    w.set_array<int16_t>("a.i16", {-32768, 32767});
    w.set_array<uint32_t>("a.u32", {1, 2, 4294967295u});
    w.set_array<int32_t>("a.i32", {-1, 0, 1, 2147483647});
    w.set_array<uint64_t>("a.u64", {0, 18446744073709551615ull});
    w.set_array<int64_t>("a.i64", {-9223372036854775807ll - 1, 9223372036854775807ll});
    w.set_array<float>("a.f32", {0.5f, -0.0f, std::numeric_limits<float>::infinity(), 1e-40f});
    w.set_array<double>("a.f64", {1e300, -1e-300});
    w.set_array<bool>("a.bool", {true, false, true});
    w.set_array<float>("a.empty", {});
    w.set_strs("a.str", {"a", "", "\xe2\x96\x81the", std::string("\0z", 2)});
    w.set_strs("a.str_empty", {});

    std::vector<float> f32 = {1.0f, -0.0f, 1e-45f, std::numeric_limits<float>::infinity(), 3.0f, -7.25f};
    float qnan;
    const uint32_t qnan_bits = 0xffc00001u;
    std::memcpy(&qnan, &qnan_bits, 4);
    f32.push_back(qnan);
    f32.push_back(123456.789f);
    w.add_tensor("f32", {4, 2}, TensorType::F32, f32);
    w.add_tensor("f16", {3}, TensorType::F16, std::vector<float>{0.5f, -2.0f, 65504.0f});
    w.add_tensor("bf16", {2}, TensorType::BF16, std::vector<float>{1.5f, -3.0f});
    std::vector<float> q(64);
    for (size_t i = 0; i < q.size(); ++i) q[i] = float(i) - 31.5f;
    w.add_tensor("q8_0", {32, 2}, TensorType::Q8_0, q);
    w.add_tensor("f32_3d", {1, 2, 3}, TensorType::F32, std::vector<float>{1, 2, 3, 4, 5, 6});
    return w;
}

}  // namespace

// ---- round trips -----------------------------------------------------------------------------------------------

TEST(GgufRoundTrip, EveryMetadataTypeAndTensorTypeAtAlignment32And64) {
    for (uint32_t alignment : {32u, 64u}) {
        SCOPED_TRACE("alignment " + std::to_string(alignment));
        const Writer w = all_types_writer(alignment);
        const std::string bytes = w.serialize();
        const Reader r = Reader::from_memory(bytes, "rt.gguf");
        EXPECT_EQ(r.version(), 3u);
        EXPECT_EQ(r.alignment(), alignment);
        EXPECT_EQ(r.data_offset() % alignment, 0u);
        EXPECT_EQ(bytes.size() % alignment, 0u);
        for (const auto& t : r.tensors()) EXPECT_EQ(t.offset % alignment, 0u) << t.name;

        // The image survives a read-write cycle byte for byte.
        const std::string again = rewrite(bytes, {});
        EXPECT_EQ(again, bytes);

        // Scalars.
        EXPECT_EQ(r.get("t.u8"), Value::u8(250));
        EXPECT_EQ(r.get("t.i8"), Value::i8(-100));
        EXPECT_EQ(r.get("t.i16"), Value::i16(-32000));
        EXPECT_EQ(r.get_u32("t.u8"), 250u);
        EXPECT_EQ(r.get_i32("t.i8"), -100);
        EXPECT_EQ(r.get_u32("t.u16"), 65000u);
        EXPECT_EQ(r.get_i32("t.i16"), -32000);
        EXPECT_EQ(r.get_u32("t.u32"), 4000000000u);
        EXPECT_EQ(r.get_i32("t.i32"), -2000000000);
        EXPECT_EQ(r.get_u64("t.u64"), 18000000000000000000ull);
        EXPECT_EQ(r.get_i64("t.i64"), -9000000000000000000ll);
        EXPECT_EQ(r.get_i64("t.u32"), 4000000000ll);
        EXPECT_EQ(f32_bits(r.get_f32("t.f32")), f32_bits(3.14159274f));
        EXPECT_EQ(r.get("t.f32nan").scalar_bits(), 0x7fc12345u);  // NaN payload kept
        EXPECT_EQ(r.get_f64("t.f64"), -2.718281828459045);
        EXPECT_TRUE(r.get_bool("t.true"));
        EXPECT_FALSE(r.get_bool("t.false"));
        EXPECT_EQ(r.get_str("t.str"), "h\xc3\xa9llo");
        EXPECT_EQ(r.get_str("t.empty"), "");
        EXPECT_EQ(r.get_str("t.bytes"), std::string("\xff\xfe\0\x01 not utf-8", 15));
        // Arrays.
        EXPECT_EQ(r.get_int_array("a.u8"), (std::vector<int64_t>{0, 1, 255}));
        EXPECT_EQ(r.get_int_array("a.i8"), (std::vector<int64_t>{-128, 0, 127}));
        EXPECT_EQ(r.get_int_array("a.u16"), (std::vector<int64_t>{0, 65535}));
        EXPECT_EQ(r.get_int_array("a.i16"), (std::vector<int64_t>{-32768, 32767}));
        EXPECT_EQ(r.get_int_array("a.u32"), (std::vector<int64_t>{1, 2, 4294967295ll}));
        EXPECT_EQ(r.get_int_array("a.i32"), (std::vector<int64_t>{-1, 0, 1, 2147483647}));
        EXPECT_EQ(r.get_int_array("a.i64"), (std::vector<int64_t>{std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}));
        EXPECT_EQ(r.get("a.u64"), Value::array<uint64_t>({0, 18446744073709551615ull}));
        const auto f = r.get_f32_array("a.f32");
        ASSERT_EQ(f.size(), 4u);
        EXPECT_EQ(f32_bits(f[1]), f32_bits(-0.0f));
        EXPECT_TRUE(std::isinf(f[2]));
        EXPECT_EQ(f32_bits(f[3]), f32_bits(1e-40f));
        EXPECT_EQ(r.get("a.f64"), Value::array<double>({1e300, -1e-300}));
        EXPECT_EQ(r.get("a.bool"), Value::array<bool>({true, false, true}));
        EXPECT_EQ(r.get("a.empty").array_size(), 0u);
        EXPECT_EQ(r.get_str_array("a.str"), (std::vector<std::string>{"a", "", "\xe2\x96\x81the", std::string("\0z", 2)}));
        EXPECT_TRUE(r.get_str_array("a.str_empty").empty());
        // Metadata keeps file order.
        EXPECT_EQ(r.metadata().front().key, alignment == 32 ? "t.u8" : "general.alignment");

        // Tensors.
        const TensorInfo& tf = r.tensor("f32");
        EXPECT_EQ(tf.shape(), (std::vector<uint64_t>{4, 2}));
        EXPECT_EQ(tf.type, TensorType::F32);
        const auto f32 = r.to_f32(tf);
        EXPECT_EQ(f32_bits(f32[1]), f32_bits(-0.0f));
        EXPECT_EQ(f32_bits(f32[2]), f32_bits(1e-45f));
        EXPECT_EQ(f32_bits(f32[6]), 0xffc00001u);
        EXPECT_EQ(f32[7], 123456.789f);
        EXPECT_EQ(r.to_f32(r.tensor("f16")), (std::vector<float>{0.5f, -2.0f, 65504.0f}));
        EXPECT_EQ(r.to_f32(r.tensor("bf16")), (std::vector<float>{1.5f, -3.0f}));
        EXPECT_EQ(r.tensor("q8_0").n_bytes, 2 * kQ8_0BlockBytes);
        EXPECT_EQ(r.tensor("f32_3d").shape(), (std::vector<uint64_t>{1, 2, 3}));
        EXPECT_EQ(r.find_tensor("nope"), nullptr);
    }
}

TEST(GgufRoundTrip, WriteIsAtomicAndMatchesSerialize) {
    const std::string dir = test::scratch_dir();
    const std::string path = dir + "/out.gguf";
    const Writer w = all_types_writer(64);
    w.write(path);
    EXPECT_EQ(test::read_file(path), w.serialize());
    // No temporary left behind.
    size_t files = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++files;
    EXPECT_EQ(files, 1u);
    const Reader r = Reader::open(path);
    EXPECT_EQ(r.get_u32("t.u16"), 65000u);
    EXPECT_EQ(r.file_size(), std::filesystem::file_size(path));
    // A path in a missing directory is an io error naming the path.
    try {
        w.write(dir + "/missing/out.gguf");
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::io);
        EXPECT_NE(std::string(e.what()).find("missing/out.gguf"), std::string::npos) << e.what();
    }
}

TEST(GgufRoundTrip, TypedGettersRejectMismatches) {
    const std::string bytes = all_types_writer(32).serialize();
    const Reader r = Reader::from_memory(bytes, "rt.gguf");
    auto expect = [&](const std::function<void()>& f, const std::string& part) {
        try {
            f();
            ADD_FAILURE() << "no error, expected " << part;
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Status::format) << e.what();
            EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
        }
    };
    expect([&] { r.get_u32("t.str"); }, "rt.gguf: metadata 't.str' has type string, expected an integer");
    expect([&] { r.get_u32("t.i8"); }, "metadata 't.i8' value -100 does not fit in u32");
    expect([&] { r.get_u32("t.u64"); }, "does not fit in u32");
    expect([&] { r.get_i32("t.u32"); }, "does not fit in i32");
    expect([&] { r.get_i64("t.u64"); }, "does not fit in i64");
    expect([&] { r.get_f32("t.u32"); }, "expected f32 or f64");
    expect([&] { r.get_bool("t.u8"); }, "has type u8, expected bool");
    expect([&] { r.get_str("a.str"); }, "has type array of string, expected string");
    expect([&] { r.get_str_array("a.u8"); }, "has type array of u8, expected array of string");
    expect([&] { r.get_f32_array("a.i32"); }, "expected array of f32");
    expect([&] { r.get_int_array("a.f32"); }, "expected array of integers");
    expect([&] { r.get_int_array("a.u64"); }, "element 1 does not fit in i64");
    expect([&] { r.get("missing.key"); }, "missing metadata key 'missing.key'");
    expect([&] { r.tensor("missing"); }, "missing tensor 'missing'");
    EXPECT_FALSE(r.opt_u32("missing.key").has_value());
    EXPECT_EQ(r.opt_u32("t.u8"), 250u);
    EXPECT_EQ(r.opt_str("t.str"), "h\xc3\xa9llo");
    EXPECT_FALSE(r.opt_bool("missing").has_value());
    EXPECT_EQ(r.opt_f32("t.f64"), float(-2.718281828459045));
}

TEST(GgufRoundTrip, RenderIsShortAndEscaped) {
    EXPECT_EQ(render(Value::u32(7)), "7");
    EXPECT_EQ(render(Value::i8(-3)), "-3");
    EXPECT_EQ(render(Value::boolean(true)), "true");
    EXPECT_EQ(render(Value::string("a\"b\n")), "\"a\\\"b\\x0a\"");
    EXPECT_EQ(render(Value::array<uint32_t>({1, 2, 3}), 2), "[u32 x 3: 1, 2, ...]");
    EXPECT_EQ(render(Value::strings({"x"})), "[string x 1: \"x\"]");
}

TEST(GgufRoundTrip, WriterRejectsBadInput) {
    Writer w;
    auto expect = [&](const std::function<void()>& f, const std::string& part) {
        try {
            f();
            ADD_FAILURE() << "no error, expected " << part;
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
            EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
        }
    };
    const std::vector<float> four(4, 1.0f);
    expect([&] { w.set_alignment(48); }, "power of two");
    expect([&] { w.set_u64("general.alignment", 64); }, "u32 power of two");
    expect([&] { w.set_u32("", 1); }, "metadata key");
    expect([&] { w.add_tensor("", {4}, TensorType::F32, four); }, "must be 1..63 bytes");
    expect([&] { w.add_tensor(std::string(64, 'x'), {4}, TensorType::F32, four); }, "must be 1..63 bytes");
    expect([&] { w.add_tensor("t", {5}, TensorType::F32, four); }, "needs 5 values, got 4");
    expect([&] { w.add_tensor("t", {4, 0}, TensorType::F32, four); }, "invalid shape [4, 0]");
    expect([&] { w.add_tensor("t", {1, 1, 1, 1, 4}, TensorType::F32, four); }, "needs 1..4 dimensions");
    expect([&] { w.add_tensor("t", {4}, TensorType::Q8_0, four); }, "not a multiple of the Q8_0 block size 32");
    expect([&] { w.add_tensor("t", {4}, TensorType::Q4_0, four); }, "not a multiple of the Q4_0 block size");
    expect([&] { w.add_tensor("t", {4}, TensorType::F16, std::vector<float>{1, 2, 70000, 4}); }, "tensor 't': value 70000");
    expect([&] { w.add_tensor("t", {4}, TensorType::F16, std::vector<float>{1, NAN, 3, 4}); }, "non-finite");
    expect([&] { w.add_tensor_raw("t", std::vector<uint64_t>{32}, TensorType::Q4_0, std::vector<uint8_t>(17)); }, "needs 18 bytes, got 17");
    w.add_tensor("t", {4}, TensorType::F32, four);
    expect([&] { w.add_tensor("t", {4}, TensorType::F32, four); }, "duplicate tensor name 't'");
    expect([&] { w.set_alignment(64); }, "before adding tensors");
    // Replacing a key keeps one entry.
    w.set_u32("k", 1);
    w.set_u32("k", 2);
    const std::string bytes = w.serialize();
    const Reader r = Reader::from_memory(bytes, "w.gguf");
    EXPECT_EQ(r.metadata().size(), 1u);
    EXPECT_EQ(r.get_u32("k"), 2u);
}

// ---- conversions ------------------------------------------------------------------------------------------------

// F16: round to nearest even, so |x - f16(x)| <= 2^-11 |x| for normal halves (|x| >= 2^-14) and <= 2^-25 below.
TEST(GgufConvert, F16ErrorBound) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> mant(1.0f, 2.0f);
    std::uniform_int_distribution<int> ex(-30, 14);
    std::vector<float> x(20000);
    for (auto& v : x) v = std::ldexp(mant(rng), ex(rng)) * (rng() & 1 ? 1.0f : -1.0f);
    x.push_back(65504.0f);
    x.push_back(0.0f);
    const auto h = f32_to_f16(x.data(), x.size());
    double worst_rel = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        const float y = fp16_to_fp32(h[i]);
        const double err = std::fabs(double(y) - double(x[i]));
        if (std::fabs(x[i]) >= 0x1p-14f) {
            worst_rel = std::max(worst_rel, err / std::fabs(x[i]));
            ASSERT_LE(err, std::ldexp(std::fabs(x[i]), -11)) << x[i];
        } else {
            ASSERT_LE(err, 0x1p-25) << x[i];
        }
    }
    EXPECT_GT(worst_rel, 0x1p-13);  // the bound is nearly attained: the test data exercises rounding
    // Exactly representable values survive unchanged, so an F16 -> F32 -> F16 round trip is bit exact.
    for (uint32_t bits = 0; bits < 0x10000; ++bits) {
        if ((bits & 0x7c00) == 0x7c00) continue;  // inf / nan
        const float f = fp16_to_fp32(uint16_t(bits));
        ASSERT_EQ(f32_to_f16(&f, 1)[0], uint16_t(bits));
    }
}

// Q8_0: d = max|x|/127 stored as fp16; |x - q d_h| <= d/2 + 127 |d - d_h| <= (0.5 + 127 * 2^-11) d < 0.57 max|x| / 127.
TEST(GgufConvert, Q8_0ErrorBound) {
    std::mt19937 rng(2);
    std::normal_distribution<float> N(0.0f, 1.0f);
    const size_t n = 32 * 500;
    std::vector<float> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = N(rng) * (i / 32 % 7 + 1) * 0.05f;  // varied block scales
    for (size_t i = 0; i < 32; ++i) x[i] = 0.0f;  // an all-zero block quantises to exact zeros
    const auto q = quantize_q8_0(x.data(), n);
    ASSERT_EQ(q.size(), n / 32 * 34);
    std::vector<float> y(n);
    dequantize_q8_0(q.data(), n, y.data());
    double worst = 0;
    for (size_t b = 0; b < n / 32; ++b) {
        float amax = 0;
        for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
        const double bound = 0.57 * amax / 127.0;
        for (size_t j = 0; j < 32; ++j) {
            const double err = std::fabs(double(y[b * 32 + j]) - x[b * 32 + j]);
            ASSERT_LE(err, bound) << "block " << b;
            if (amax > 0) worst = std::max(worst, err / (amax / 127.0));
        }
        // The largest element maps to +-127 exactly.
        if (amax > 0) {
            bool found = false;
            for (size_t j = 0; j < 32; ++j) found |= std::abs(int8_t(q[b * 34 + 2 + j])) == 127;
            EXPECT_TRUE(found);
        }
    }
    EXPECT_GT(worst, 0.45);  // the half-step part of the bound is reached
    for (size_t j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.0f);
    // Quantising dequantised data again gives the same bytes (a Q8_0 -> F32 -> Q8_0 trip is stable).
    EXPECT_EQ(quantize_q8_0(y.data(), n), q);
}

TEST(GgufConvert, Q8_0RejectsBadInput) {
    std::vector<float> x(33, 1.0f);
    EXPECT_THROW(quantize_q8_0(x.data(), 33), Error);
    x[3] = INFINITY;
    EXPECT_THROW(quantize_q8_0(x.data(), 32), Error);
}

TEST(GgufConvert, TypeTable) {
    EXPECT_STREQ(type_traits(8)->name, "Q8_0");
    EXPECT_EQ(type_traits(8)->type_size, 34u);
    EXPECT_EQ(type_traits(12)->block_size, 256u);
    EXPECT_EQ(type_traits(30)->type_size, 2u);
    EXPECT_EQ(type_traits(4), nullptr);  // removed from ggml
    EXPECT_EQ(type_traits(40), nullptr);
    EXPECT_EQ(type_traits(0xffffffffu), nullptr);
}

// ---- models --------------------------------------------------------------------------------------------------

TEST(GgufModel, WriteLoadRoundTripF32IsBitExact) {
    const std::string dir = test::scratch_dir();
    for (bool tied : {false, true}) {
        const ModelWeights w = random_model(tiny_cfg(), tied, 3);
        Vocab v = simple_vocab(16);
        v.add_space_prefix = false;
        const std::string path = dir + "/m.gguf";
        EXPECT_TRUE(write_gguf_model(path, w, v, GgufWeightType::f32, "tiny").empty());
        const Reader r = Reader::open(path);
        EXPECT_EQ(r.get_str("general.architecture"), "llama");
        EXPECT_EQ(r.get_str("general.name"), "tiny");
        EXPECT_EQ(r.get_u32("general.file_type"), 0u);
        EXPECT_EQ(r.get_u32("llama.rope.dimension_count"), 8u);
        EXPECT_TRUE(r.get_bool("tokenizer.ggml.add_bos_token"));
        EXPECT_FALSE(r.get_bool("tokenizer.ggml.add_eos_token"));
        EXPECT_EQ(r.find_tensor("output.weight") == nullptr, tied);
        const ModelWeights m = load_gguf_model(r);
        EXPECT_EQ(m.cfg.dim, 32);
        EXPECT_EQ(m.cfg.n_kv_heads, 2);
        EXPECT_EQ(m.cfg.rope_theta, 10000.0f);
        EXPECT_EQ(m.cfg.norm_eps, 1e-5f);
        EXPECT_EQ(m.tied(), tied);
        EXPECT_EQ(m.tok_embeddings, w.tok_embeddings);
        EXPECT_EQ(m.layers[0].wk, w.layers[0].wk);
        EXPECT_EQ(m.layers[0].w2, w.layers[0].w2);
        EXPECT_EQ(m.final_norm, w.final_norm);
        EXPECT_EQ(m.classifier, w.classifier);
        const Vocab mv = load_gguf_vocab(r);
        EXPECT_EQ(mv.pieces, v.pieces);
        EXPECT_EQ(mv.scores, v.scores);
        EXPECT_EQ(mv.types, v.types);
        EXPECT_FALSE(mv.add_space_prefix);
        // Row order is preserved: element [row][col] of wq is at ne = {col, row}.
        const TensorInfo& q = r.tensor("blk.0.attn_q.weight");
        EXPECT_EQ(q.shape(), (std::vector<uint64_t>{32, 32}));
        EXPECT_EQ(r.tensor("blk.0.attn_k.weight").shape(), (std::vector<uint64_t>{32, 16}));
        EXPECT_EQ(r.tensor("blk.0.ffn_down.weight").shape(), (std::vector<uint64_t>{64, 32}));
        EXPECT_EQ(r.to_f32(q)[1 * 32 + 5], w.layers[0].wq[1 * 32 + 5]);
    }
}

TEST(GgufModel, Q8_0WithF16FallbackForHidden172) {
    const std::string dir = test::scratch_dir();
    const ModelWeights w = random_model(stories_like(), true, 5);
    const std::string path = dir + "/q8.gguf";
    const auto notes = write_gguf_model(path, w, simple_vocab(64), GgufWeightType::q8_0, "stories-like");
    ASSERT_EQ(notes.size(), 2u);  // ffn_down of each layer
    EXPECT_EQ(notes[0], "blk.0.ffn_down.weight: ne[0] = 172 is not a multiple of 32; stored as F16");
    const Reader r = Reader::open(path);
    EXPECT_EQ(r.get_u32("general.file_type"), 7u);
    EXPECT_EQ(r.tensor("token_embd.weight").type, TensorType::Q8_0);
    EXPECT_EQ(r.tensor("blk.0.attn_q.weight").type, TensorType::Q8_0);
    EXPECT_EQ(r.tensor("blk.0.ffn_gate.weight").type, TensorType::Q8_0);
    EXPECT_EQ(r.tensor("blk.1.ffn_down.weight").type, TensorType::F16);
    EXPECT_EQ(r.tensor("blk.0.attn_norm.weight").type, TensorType::F32);
    const ModelWeights m = load_gguf_model(r);
    EXPECT_EQ(m.final_norm, w.final_norm);
    // Weights are uniform in [-1, 1]: Q8_0 error <= 0.57/127 per element, F16 error <= 2^-11.
    auto max_err = [](const std::vector<float>& a, const std::vector<float>& b) {
        float e = 0;
        for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
        return e;
    };
    EXPECT_LE(max_err(m.layers[1].wq, w.layers[1].wq), 0.57f / 127);
    EXPECT_LE(max_err(m.tok_embeddings, w.tok_embeddings), 0.57f / 127);
    EXPECT_LE(max_err(m.layers[0].w2, w.layers[0].w2), 1.0f / 2048);
    EXPECT_GT(max_err(m.layers[1].wq, w.layers[1].wq), 0.0f);
}

TEST(GgufModel, F16OfF16ModelIsBitExact) {
    // The shared fixture holds F16 matrices: loading and writing them back as F16 loses nothing.
    const Reader src = Reader::open(test::shared("models/llama-2-tiny-random.gguf"));
    const ModelWeights w = load_gguf_model(src);
    const Vocab v = load_gguf_vocab(src);
    const std::string path = test::scratch_dir() + "/tiny-f16.gguf";
    EXPECT_TRUE(write_gguf_model(path, w, v, GgufWeightType::f16, "copy").empty());
    const Reader r = Reader::open(path);
    for (const char* name : {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "output.weight"}) {
        const auto a = src.tensor_data(src.tensor(name));
        const auto b = r.tensor_data(r.tensor(name));
        ASSERT_EQ(a.size(), b.size()) << name;
        EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin())) << name;
    }
    EXPECT_EQ(load_gguf_vocab(r).pieces, v.pieces);
}

TEST(GgufModel, WriterRejectsInconsistentInput) {
    const std::string path = test::scratch_dir() + "/x.gguf";
    ModelWeights w = random_model(tiny_cfg(), false, 1);
    try {
        write_gguf_model(path, w, simple_vocab(15), GgufWeightType::f32, "x");
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("15 tokens, but the model's vocabulary size is 16"), std::string::npos) << e.what();
    }
    w.layers[0].wq.pop_back();
    try {
        write_gguf_model(path, w, simple_vocab(16), GgufWeightType::f32, "x");
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("attn_q"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(GgufShared, TinyRandomLlama2) {
    const Reader r = Reader::open(test::shared("models/llama-2-tiny-random.gguf"));
    EXPECT_EQ(r.version(), 3u);
    EXPECT_EQ(r.alignment(), 32u);
    EXPECT_EQ(r.tensors().size(), 12u);
    EXPECT_EQ(r.metadata().size(), 18u);
    const ModelConfig c = read_gguf_config(r);
    EXPECT_EQ(c.dim, 8);
    EXPECT_EQ(c.hidden_dim, 32);
    EXPECT_EQ(c.n_layers, 1);
    EXPECT_EQ(c.n_heads, 2);
    EXPECT_EQ(c.n_kv_heads, 2);
    EXPECT_EQ(c.vocab_size, 32000);
    EXPECT_EQ(c.seq_len, 4096);
    EXPECT_EQ(c.rope_theta, 10000.0f);
    EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
    EXPECT_EQ(r.tensor("token_embd.weight").shape(), (std::vector<uint64_t>{8, 32000}));
    EXPECT_EQ(r.tensor("token_embd.weight").type, TensorType::F16);
    EXPECT_EQ(r.tensor("blk.0.ffn_down.weight").shape(), (std::vector<uint64_t>{32, 8}));
    EXPECT_EQ(r.tensor("blk.0.ffn_gate.weight").shape(), (std::vector<uint64_t>{8, 32}));
    EXPECT_EQ(r.tensor("blk.0.attn_norm.weight").type, TensorType::F32);
    EXPECT_EQ(r.tensor("output.weight").offset, 514144u);
    const ModelWeights w = load_gguf_model(r);
    EXPECT_FALSE(w.tied());
    EXPECT_EQ(w.tok_embeddings.size(), 8u * 32000);
    EXPECT_EQ(w.layers[0].w1.size(), 32u * 8);
    for (float x : w.layers[0].wq) EXPECT_TRUE(std::isfinite(x));
    const Vocab v = load_gguf_vocab(r);
    EXPECT_EQ(v.size(), 32000u);
    EXPECT_EQ(v.pieces[29871], "\xe2\x96\x81");

    const GgufInfo info = describe_gguf(r);
    EXPECT_EQ(info.architecture, "llama");
    EXPECT_EQ(info.model_name, "LLaMA v2");
    ASSERT_TRUE(info.config.has_value());
    EXPECT_EQ(info.config->vocab_size, 32000);
    EXPECT_FALSE(info.tied_classifier);
    ASSERT_EQ(info.tensors.size(), 12u);
    EXPECT_EQ(info.tensors[0].name, "token_embd.weight");
    EXPECT_EQ(info.tensors[0].type, "F16");
    EXPECT_EQ(info.tensors[0].n_bytes, 8u * 32000 * 2);
    EXPECT_EQ(info.n_params, 2 * 8 * 32000 + 4 * 64 + 3 * 256 + 3 * 8);
    EXPECT_EQ(info.metadata[0], (std::pair<std::string, std::string>{"general.architecture", "\"llama\""}));
    const auto tok = std::find_if(info.metadata.begin(), info.metadata.end(), [](auto& kv) { return kv.first == "tokenizer.ggml.tokens"; });
    ASSERT_NE(tok, info.metadata.end());
    EXPECT_EQ(tok->second.rfind("[string x 32000: \"<unk>\", \"<s>\"", 0), 0u) << tok->second;
}

TEST(GgufShared, LlamaSpmVocab) {
    const Reader r = Reader::open(test::shared("models/ggml-vocab-llama-spm.gguf"));
    EXPECT_TRUE(r.tensors().empty());
    // The file ends right after the metadata: without tensors the padding to the data section may be absent.
    EXPECT_EQ(r.file_size(), 723869u);
    EXPECT_EQ(r.data_offset(), 723872u);
    const Vocab v = load_gguf_vocab(r);
    ASSERT_EQ(v.size(), 32000u);
    EXPECT_EQ(v.pieces[0], "<unk>");
    EXPECT_EQ(v.pieces[1], "<s>");
    EXPECT_EQ(v.pieces[2], "</s>");
    EXPECT_EQ(v.pieces[3], "<0x00>");
    EXPECT_EQ(v.pieces[13], "<0x0A>");
    EXPECT_EQ(v.pieces[278], "\xe2\x96\x81the");
    EXPECT_EQ(v.pieces[15043], "\xe2\x96\x81Hello");
    EXPECT_EQ(v.pieces[31999], "\xe7\xbb\x99");
    EXPECT_EQ(v.scores[278], -19.0f);
    EXPECT_EQ(v.scores[29871], -1e9f);
    EXPECT_EQ(v.types[0], TokenType::unknown);
    EXPECT_EQ(v.types[1], TokenType::control);
    EXPECT_EQ(v.types[258], TokenType::byte);
    EXPECT_EQ(v.types[259], TokenType::normal);
    EXPECT_EQ(v.bos_id, 1);
    EXPECT_EQ(v.eos_id, 2);
    EXPECT_EQ(v.unk_id, 0);
    EXPECT_TRUE(v.add_space_prefix);
    EXPECT_EQ(std::count(v.types.begin(), v.types.end(), TokenType::byte), 256);
    // Hyper-parameters of Llama-2 7B are readable, but there are no weights.
    const ModelConfig c = read_gguf_config(r);
    EXPECT_EQ(c.dim, 4096);
    EXPECT_EQ(c.n_layers, 32);
    EXPECT_EQ(c.vocab_size, 32000);
    try {
        load_gguf_model(r);
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::format);
        EXPECT_NE(std::string(e.what()).find("missing tensor 'token_embd.weight'"), std::string::npos) << e.what();
    }
    // Both fixtures carry the same Llama-2 vocabulary.
    EXPECT_EQ(load_gguf_vocab(Reader::open(test::shared("models/llama-2-tiny-random.gguf"))).pieces, v.pieces);
}

TEST(GgufShared, OpenErrors) {
    try {
        Reader::open(test::shared("models/does-not-exist.gguf"));
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::io);
        EXPECT_NE(std::string(e.what()).find("does-not-exist.gguf: cannot open"), std::string::npos) << e.what();
    }
    try {
        Reader::open(test::shared("models"));
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::io);
        EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
    const std::string empty = test::scratch_dir() + "/empty.gguf";
    test::write_file(empty, "");
    try {
        Reader::open(empty);
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::format);
        EXPECT_NE(std::string(e.what()).find("truncated at offset 0 reading magic"), std::string::npos) << e.what();
    }
}

// ---- corrupt files: one per failure mode ---------------------------------------------------------------------

TEST(GgufCorrupt, Header) {
    expect_error("GGUX" + header(0, 0).s.substr(4), Status::format, "bad magic 0x58554747 (not a GGUF file)");
    expect_error(header(0, 0, 1).s, Status::unsupported, "unsupported GGUF version 1 (supported: 2, 3)");
    expect_error(header(0, 0, 4).s, Status::unsupported, "unsupported GGUF version 4");
    expect_error(header(0, 0, 0x03000000).s, Status::unsupported, "the file looks big-endian");
    // Version 2 has the same layout as 3.
    EXPECT_NO_THROW(Reader::from_memory(header(0, 0, 2).s, "v2.gguf"));
    EXPECT_EQ(Reader::from_memory(header(0, 0, 2).s, "v2.gguf").version(), 2u);
}

TEST(GgufCorrupt, TruncatedAtEachStage) {
    const std::string good = image({kv_str("general.name", "abc")}, {tinfo("w", {8}, 0, 0)}, 32);
    EXPECT_NO_THROW(Reader::from_memory(good, "good.gguf"));
    expect_error("", Status::format, "truncated at offset 0 reading magic");
    expect_error(good.substr(0, 3), Status::format, "truncated at offset 0 reading magic");
    expect_error(good.substr(0, 6), Status::format, "truncated at offset 4 reading version (need 4 bytes, 2 remain)");
    expect_error(good.substr(0, 12), Status::format, "truncated at offset 8 reading tensor count");
    expect_error(good.substr(0, 20), Status::format, "truncated at offset 16 reading metadata count");

    // A long first entry (96 bytes, at offset 24) leaves room for the count checks, so the cut lands in entry 1.
    const std::string base = header(0, 2).s + kv_str("general.name", std::string(64, 'n'));
    const std::string ks = kv_str("k.str", "abc");  // 8 + 5 key, 4 type, 8 + 3 value
    expect_error(base + ks.substr(0, 4), Status::format, "truncated at offset 120 reading length of key of metadata entry 1");
    expect_error(base + ks.substr(0, 10), Status::format,
                 "key of metadata entry 1: string length 5 at offset 120 extends past end of file (size 130)");
    expect_error(base + ks.substr(0, 15), Status::format, "reading value type of metadata 'k.str'");
    expect_error(base + ks.substr(0, 21), Status::format, "reading length of value of metadata 'k.str'");
    expect_error(base + ks.substr(0, 26), Status::format, "value of metadata 'k.str': string length 3");
    const std::string ku = kv_u32("k.u32", 7);
    expect_error(base + ku.substr(0, 19), Status::format, "reading value of metadata 'k.u32' (need 4 bytes, 2 remain)");
    const std::string arr = Bytes().str("a").u32(9).u32(4).u64(3).u32(1).u32(2).u32(3).s;
    expect_error(base + arr.substr(0, 15), Status::format, "reading element type of metadata 'a'");
    expect_error(base + arr.substr(0, 21), Status::format, "reading length of metadata 'a'");
    // Fixed-size elements are counted before they are read, so a short array is caught by the length check.
    expect_error(base + arr.substr(0, 33), Status::format, "metadata 'a': array length 3 is larger than the remaining 8 bytes");

    // Tensor info complete, data section missing or short.
    const std::string infos = header(1, 0).s + tinfo("w", {8}, 0, 0);  // 24 + 33 bytes
    expect_error(infos, Status::format, "truncated: data section at offset 64 starts past end of file (size 57)");
    expect_error(good.substr(0, good.size() - 1), Status::format,
                 "tensor 'w' data [offset 0, 32 bytes] extends past end of file (data section at 96, size 127)");
}

TEST(GgufCorrupt, TruncatedTensorInfoFields) {
    // One tensor info padded with a long key so the count checks pass and the cut lands in each field in turn.
    const std::string kv = kv_str("general.name", std::string(64, 'n'));
    const std::string ti = tinfo("w", {8, 2}, 0, 0);
    const std::string base = header(1, 1).s + kv;
    expect_error(base + ti.substr(0, 4), Status::format, "reading length of name of tensor 0");
    expect_error(base + ti.substr(0, 8), Status::format, "name of tensor 0: string length 1");
    expect_error(base + ti.substr(0, 11), Status::format, "reading n_dims of tensor 'w'");
    expect_error(base + ti.substr(0, 17), Status::format, "reading ne[0] of tensor 'w'");
    expect_error(base + ti.substr(0, 25), Status::format, "reading ne[1] of tensor 'w'");
    expect_error(base + ti.substr(0, 31), Status::format, "reading type of tensor 'w'");
    expect_error(base + ti.substr(0, 35), Status::format, "reading data offset of tensor 'w'");
    expect_error(base + ti.substr(0, 40), Status::format, "reading data offset of tensor 'w'");
}

TEST(GgufCorrupt, StringLengthPastEofAndAbsurdCounts) {
    expect_error(header(0, 1).s + Bytes().u64(1ull << 40).s + std::string(16, 'k'), Status::format,
                 "string length 1099511627776 at offset 24 extends past end of file (size 48)");
    expect_error(header(0, 1).s + Bytes().str("k").u32(8).u64(~0ull).s, Status::format,
                 "value of metadata 'k': string length 18446744073709551615");
    expect_error(header(1ull << 62, 0).s + std::string(64, '\0'), Status::format,
                 "tensor count 4611686018427387904 is larger than the remaining 64 bytes could hold");
    expect_error(header(0, ~0ull).s + std::string(64, '\0'), Status::format, "metadata count 18446744073709551615 is larger");
    expect_error(header(1, 2).s + std::string(40, '\0'), Status::format,
                 "2 metadata entries and 1 tensor infos cannot fit in the remaining 40 bytes");
    expect_error(header(0, 1).s + Bytes().str("a").u32(9).u32(8).u64(1ull << 60).s + std::string(64, '\0'), Status::format,
                 "metadata 'a': array length 1152921504606846976 is larger than the remaining 64 bytes could hold");
    expect_error(header(0, 1).s + Bytes().str("a").u32(9).u32(12).u64(9).s + std::string(64, '\0'), Status::format,
                 "array length 9 is larger than the remaining 64 bytes");
    // A string array whose elements claim more than the file has.
    expect_error(header(0, 1).s + Bytes().str("a").u32(9).u32(8).u64(2).str("x").u64(100).s, Status::format,
                 "metadata 'a' element 1: string length 100");
}

TEST(GgufCorrupt, ValueTypes) {
    expect_error(header(0, 1).s + Bytes().str("k").u32(13).u32(0).s, Status::format, "metadata 'k' has unknown value type 13");
    expect_error(header(0, 1).s + Bytes().str("k").u32(0xffffffff).u32(0).s, Status::format, "unknown value type 4294967295");
    expect_error(header(0, 1).s + Bytes().str("k").u32(9).u32(77).u64(0).s, Status::format,
                 "metadata 'k' is an array of unknown value type 77");
    expect_error(header(0, 1).s + Bytes().str("k").u32(9).u32(9).u64(1).u32(4).u64(0).s, Status::unsupported,
                 "metadata 'k' is an array of arrays");
}

TEST(GgufCorrupt, KeysAndNames) {
    expect_error(image({kv_u32("a", 1), kv_u32("a", 2)}, {}, 0), Status::format, "duplicate metadata key 'a'");
    expect_error(image({kv_u32("", 1)}, {}, 0), Status::format, "metadata entry 0 has an empty key");
    expect_error(image({}, {tinfo("w", {8}, 0, 0), tinfo("w", {8}, 0, 32)}, 64), Status::format, "duplicate tensor name 'w'");
    expect_error(image({}, {tinfo("", {8}, 0, 0)}, 32), Status::format, "tensor 0 has an empty name");
    expect_error(image({}, {tinfo(std::string(65, 'x'), {8}, 0, 0)}, 32), Status::format, "tensor 0 name is 65 bytes long (limit 64)");
    EXPECT_NO_THROW(Reader::from_memory(image({}, {tinfo(std::string(64, 'x'), {8}, 0, 0)}, 32), "ok.gguf"));
    // Keys and names are bytes: invalid UTF-8 is accepted.
    const Reader r = Reader::from_memory(image({kv_u32("\xff\xfe", 5)}, {tinfo("\xc3(", {8}, 0, 0)}, 32), "bytes.gguf");
    EXPECT_EQ(r.get_u32("\xff\xfe"), 5u);
    EXPECT_NE(r.find_tensor("\xc3("), nullptr);
}

TEST(GgufCorrupt, Alignment) {
    expect_error(image({kv_u32("general.alignment", 0)}, {}, 0), Status::format, "general.alignment 0 is not a nonzero power of two");
    expect_error(image({kv_u32("general.alignment", 48)}, {}, 0), Status::format, "general.alignment 48 is not a nonzero power of two");
    expect_error(image({kv_str("general.alignment", "32")}, {}, 0), Status::format, "general.alignment has type string");
    expect_error(image({Bytes().str("general.alignment").u32(5).u32(uint32_t(-64)).s}, {}, 0), Status::format,
                 "general.alignment has type i32, expected an unsigned integer");
    // A valid non-default alignment governs the data section and offsets.
    const std::string ok = image({kv_u32("general.alignment", 64)}, {tinfo("a", {8}, 0, 0), tinfo("b", {8}, 0, 64)}, 96, 64);
    const Reader r = Reader::from_memory(ok, "a64.gguf");
    EXPECT_EQ(r.alignment(), 64u);
    EXPECT_EQ(r.data_offset() % 64, 0u);
    expect_error(image({kv_u32("general.alignment", 64)}, {tinfo("a", {8}, 0, 32)}, 96, 64), Status::format,
                 "tensor 'a' data offset 32 is not a multiple of the alignment 64");
}

TEST(GgufCorrupt, TensorShapesAndTypes) {
    expect_error(image({}, {tinfo("w", {}, 0, 0)}, 32), Status::format, "tensor 'w' has n_dims 0 (must be 1..4)");
    expect_error(image({}, {tinfo("w", {1, 1, 1, 1, 8}, 0, 0)}, 32), Status::format, "tensor 'w' has n_dims 5 (must be 1..4)");
    expect_error(image({}, {tinfo("w", {8, 0}, 0, 0)}, 32), Status::format, "tensor 'w' has zero dimension ne[1] in shape [8, 0]");
    expect_error(image({}, {tinfo("w", {1ull << 32, 1ull << 32}, 0, 0)}, 32), Status::format,
                 "tensor 'w' shape [4294967296, 4294967296] overflows the element count");
    expect_error(image({}, {tinfo("w", {~0ull}, 24, 0)}, 32), Status::format, "overflows the element count");
    expect_error(image({}, {tinfo("w", {1ull << 62}, 0, 0)}, 32), Status::format, "tensor 'w' shape [4611686018427387904] overflows the byte size");
    expect_error(image({}, {tinfo("w", {8}, 99, 0)}, 32), Status::unsupported, "tensor 'w' has unknown ggml type 99");
    expect_error(image({}, {tinfo("w", {8}, 4, 0)}, 32), Status::unsupported, "tensor 'w' has unknown ggml type 4");
    expect_error(image({}, {tinfo("w", {33}, 8, 0)}, 64), Status::format, "tensor 'w' ne[0] = 33 is not a multiple of the Q8_0 block size 32");
    expect_error(image({}, {tinfo("w", {8}, 0, 4)}, 32), Status::format, "tensor 'w' data offset 4 is not a multiple of the alignment 32");
}

TEST(GgufCorrupt, TensorData) {
    expect_error(image({}, {tinfo("w", {16}, 0, 0)}, 32), Status::format,
                 "tensor 'w' data [offset 0, 64 bytes] extends past end of file (data section at 64, size 96)");
    expect_error(image({}, {tinfo("w", {8}, 0, 1ull << 63)}, 32), Status::format, "tensor 'w' data [offset 9223372036854775808, 32 bytes] extends past end of file");
    expect_error(image({}, {tinfo("a", {16}, 0, 0), tinfo("b", {8}, 0, 32)}, 96), Status::format,
                 "tensor 'b' data [offset 32, 32 bytes] overlaps tensor 'a' [offset 0, 64 bytes]");
    expect_error(image({}, {tinfo("a", {8}, 0, 0), tinfo("b", {8}, 0, 0)}, 96), Status::format, "overlaps tensor");
    // Shared bytes are the only problem: adjacent tensors and gaps are fine, in any order.
    EXPECT_NO_THROW(Reader::from_memory(image({}, {tinfo("b", {8}, 0, 64), tinfo("a", {8}, 0, 0)}, 96), "ok.gguf"));
    // A type that cannot be dequantised (IQ2_XXS: 256 elements in 66 bytes) is reported when its data is requested.
    const Reader r = Reader::from_memory(image({}, {tinfo("q", {256}, 16, 0)}, 96), "iq2.gguf");
    EXPECT_EQ(r.tensor("q").n_bytes, 66u);
    try {
        r.to_f32(r.tensor("q"));
        ADD_FAILURE();
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::unsupported);
        EXPECT_NE(std::string(e.what()).find("iq2.gguf: tensor 'q' has type IQ2_XXS, which cannot be dequantised "
                                             "(supported: F32, F16, BF16, Q4_0"),
                  std::string::npos)
            << e.what();
    }
}

// llama.cpp's block formats: a type number ggml no longer defines, a row that is not a whole number of blocks, and
// data cut short each name the tensor.
TEST(GgufCorrupt, QuantisedTensors) {
    // 31 was Q4_0_4_4, removed from GGUF files by ggml.
    expect_error(image({}, {tinfo("blk.0.attn_q.weight", {256}, 31, 0)}, 160), Status::unsupported,
                 "tensor 'blk.0.attn_q.weight' has unknown ggml type 31");
    expect_error(image({}, {tinfo("blk.0.ffn_down.weight", {172, 64}, 12, 0)}, 160), Status::format,
                 "tensor 'blk.0.ffn_down.weight' ne[0] = 172 is not a multiple of the Q4_K block size 256");
    expect_error(image({}, {tinfo("w", {96}, 23, 0)}, 160), Status::format,
                 "tensor 'w' ne[0] = 96 is not a multiple of the IQ4_XS block size 256");
    expect_error(image({}, {tinfo("w", {48}, 20, 0)}, 160), Status::format,
                 "tensor 'w' ne[0] = 48 is not a multiple of the IQ4_NL block size 32");
    // Q6_K: 210 bytes per 256 elements; two rows need 420 bytes, the file holds 416.
    expect_error(image({}, {tinfo("output.weight", {256, 2}, 14, 0)}, 416), Status::format,
                 "tensor 'output.weight' data [offset 0, 420 bytes] extends past end of file");
    // Q5_K, Q3_K, Q2_K block sizes.
    EXPECT_EQ(Reader::from_memory(image({}, {tinfo("w", {512}, 13, 0)}, 352), "q5k.gguf").tensor("w").n_bytes, 352u);
    EXPECT_EQ(Reader::from_memory(image({}, {tinfo("w", {256}, 11, 0)}, 128), "q3k.gguf").tensor("w").n_bytes, 110u);
    EXPECT_EQ(Reader::from_memory(image({}, {tinfo("w", {256}, 10, 0)}, 96), "q2k.gguf").tensor("w").n_bytes, 84u);
    // Every supported type dequantises a well-formed tensor without error.
    for (const uint32_t type : {2u, 3u, 6u, 7u, 8u, 10u, 11u, 12u, 13u, 14u, 20u, 23u}) {
        const Reader r = Reader::from_memory(image({}, {tinfo("w", {256}, type, 0)}, 288), "ok.gguf");
        EXPECT_EQ(r.to_f32(r.tensor("w")).size(), 256u) << type;
    }
}

TEST(GgufCorrupt, ModelLevel) {
    const std::string good = tiny_model_image();
    EXPECT_NO_THROW(load_gguf_model(Reader::from_memory(good, "good.gguf")));
    auto with = [&](const std::string& key, Value v) {
        Edit e;
        e.set_keys.push_back({key, std::move(v)});
        return rewrite(good, e);
    };
    auto without_key = [&](const std::string& key) {
        Edit e;
        e.drop_keys.insert(key);
        return rewrite(good, e);
    };
    auto without_tensor = [&](const std::string& name) {
        Edit e;
        e.drop_tensors.insert(name);
        return rewrite(good, e);
    };
    expect_error(with("general.architecture", Value::string("gpt2")), Status::unsupported,
                 "architecture 'gpt2' is not supported (only llama)", Stage::model);
    expect_error(without_key("general.architecture"), Status::format, "missing metadata key 'general.architecture'", Stage::model);
    expect_error(without_key("llama.embedding_length"), Status::format, "missing metadata key 'llama.embedding_length'", Stage::model);
    expect_error(with("llama.block_count", Value::string("1")), Status::format,
                 "metadata 'llama.block_count' has type string, expected an integer", Stage::model);
    expect_error(with("llama.block_count", Value::i32(-1)), Status::format, "metadata 'llama.block_count' value -1 does not fit in u32", Stage::model);
    expect_error(with("llama.attention.head_count", Value::u32(6)), Status::format, "dimension 32 is not a multiple of head count 6", Stage::model);
    expect_error(with("llama.embedding_length", Value::u32(0x80000000u)), Status::format, "llama.embedding_length = 2147483648 is out of range", Stage::model);
    expect_error(with("llama.rope.dimension_count", Value::u32(4)), Status::unsupported,
                 "llama.rope.dimension_count 4 differs from the head dimension 8", Stage::model);
    expect_error(with("llama.expert_count", Value::u32(8)), Status::unsupported, "mixture-of-experts", Stage::model);
    expect_error(with("llama.rope.scaling.type", Value::string("linear")), Status::unsupported, "RoPE scaling 'linear'", Stage::model);
    expect_error(with("llama.vocab_size", Value::u32(17)), Status::format,
                 "llama.vocab_size 17 disagrees with token_embd.weight shape [32, 16]", Stage::model);
    expect_error(with("llama.attention.layer_norm_rms_epsilon", Value::string("x")), Status::format,
                 "has type string, expected f32 or f64", Stage::model);
    expect_error(without_tensor("blk.0.ffn_up.weight"), Status::format, "missing tensor 'blk.0.ffn_up.weight'", Stage::model);
    expect_error(without_tensor("token_embd.weight"), Status::format, "missing tensor 'token_embd.weight'", Stage::model);

    // Wrong shape: attn_k stored as [32, 8] instead of [32, 16].
    Edit shape;
    shape.replace_tensor = [](Writer& w, const TensorInfo& t, const Reader&) {
        if (t.name != "blk.0.attn_k.weight") return false;
        w.add_tensor(t.name, {32, 8}, TensorType::F32, std::vector<float>(256, 0.0f));
        return true;
    };
    expect_error(rewrite(good, shape), Status::format, "tensor 'blk.0.attn_k.weight' has shape [32, 8], expected [32, 16]", Stage::model);
    // An extra tensor outside the layout.
    Edit extra;
    extra.replace_tensor = [](Writer& w, const TensorInfo& t, const Reader& r) {
        if (t.name != "output_norm.weight") return false;
        const auto d = r.tensor_data(t);
        w.add_tensor_raw(t.name, t.shape(), t.type, {d.begin(), d.end()});
        w.add_tensor("blk.0.attn_q.bias", {32}, TensorType::F32, std::vector<float>(32, 0.0f));
        return true;
    };
    expect_error(rewrite(good, extra), Status::unsupported, "tensor 'blk.0.attn_q.bias' is not part of the supported llama layout", Stage::model);
    // A tensor type the loader cannot dequantise.
    Edit i8;
    i8.replace_tensor = [](Writer& w, const TensorInfo& t, const Reader&) {
        if (t.name != "blk.0.attn_q.weight") return false;
        w.add_tensor_raw(t.name, t.shape(), TensorType::I8, std::vector<uint8_t>(t.n_elements, 0));
        return true;
    };
    expect_error(rewrite(good, i8), Status::unsupported,
                 "tensor 'blk.0.attn_q.weight' has type I8, which cannot be dequantised", Stage::model);
    // Tied: no output.weight is fine.
    EXPECT_TRUE(load_gguf_model(Reader::from_memory(without_tensor("output.weight"), "tied.gguf")).tied());
}

TEST(GgufCorrupt, VocabLevel) {
    const std::string good = tiny_model_image();
    EXPECT_NO_THROW(load_gguf_vocab(Reader::from_memory(good, "good.gguf")));
    auto with = [&](const std::string& key, Value v) {
        Edit e;
        e.set_keys.push_back({key, std::move(v)});
        return rewrite(good, e);
    };
    auto without_key = [&](const std::string& key) {
        Edit e;
        e.drop_keys.insert(key);
        return rewrite(good, e);
    };
    expect_error(with("tokenizer.ggml.model", Value::string("bert")), Status::unsupported,
                 "tokenizer model 'bert' is not supported (llama: SentencePiece, gpt2: byte-level BPE)", Stage::vocab);
    expect_error(with("tokenizer.ggml.model", Value::string("gpt2")), Status::format,
                 "tokenizer.ggml.merges is missing: a gpt2 (byte-level BPE) vocabulary needs its merges", Stage::vocab);
    expect_error(without_key("tokenizer.ggml.tokens"), Status::format, "missing metadata key 'tokenizer.ggml.tokens'", Stage::vocab);
    expect_error(with("tokenizer.ggml.tokens", Value::strings({})), Status::format, "tokenizer.ggml.tokens is empty", Stage::vocab);
    expect_error(with("tokenizer.ggml.tokens", Value::array<uint32_t>({1, 2})), Status::format,
                 "metadata 'tokenizer.ggml.tokens' has type array of u32, expected array of string", Stage::vocab);
    expect_error(with("tokenizer.ggml.bos_token_id", Value::u32(16)), Status::format,
                 "tokenizer.ggml.bos_token_id 16 is out of range (vocabulary has 16 tokens)", Stage::vocab);
    expect_error(with("tokenizer.ggml.eos_token_id", Value::i32(-1)), Status::format, "does not fit in u32", Stage::vocab);
    expect_error(with("tokenizer.ggml.unknown_token_id", Value::u64(1ull << 40)), Status::format, "does not fit in u32", Stage::vocab);
    expect_error(with("tokenizer.ggml.scores", Value::array<float>({1.0f})), Status::format,
                 "tokenizer.ggml.scores has 1 entries, expected 16 (one per token)", Stage::vocab);
    std::vector<int32_t> types(16, 1);
    types[5] = 9;
    expect_error(with("tokenizer.ggml.token_type", Value::array(types)), Status::format,
                 "tokenizer.ggml.token_type[5] = 9 is not a valid token type (0..6)", Stage::vocab);
    expect_error(with("tokenizer.ggml.add_space_prefix", Value::u8(1)), Status::format, "expected bool", Stage::vocab);
    // Defaults when optional keys are absent.
    Edit e;
    e.drop_keys = {"tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_space_prefix"};
    const Vocab v = load_gguf_vocab(Reader::from_memory(rewrite(good, e), "defaults.gguf"));
    EXPECT_EQ(v.scores, std::vector<float>(16, 0.0f));
    EXPECT_EQ(v.types, std::vector<TokenType>(16, TokenType::normal));
    EXPECT_EQ(v.bos_id, 1);
    EXPECT_TRUE(v.add_space_prefix);
}

// ---- robustness sweeps -----------------------------------------------------------------------------------------

namespace {
// Parses and uses everything; only si::Error may escape (anything else fails the test).
void exercise(const std::string& bytes) {
    try {
        const Reader r = Reader::from_memory(bytes, "sweep.gguf");
        for (const auto& kv : r.metadata()) (void)render(kv.value);
        for (const auto& t : r.tensors())
            if (can_dequantize(t.type)) (void)r.to_f32(t);
        (void)describe_gguf(r);
        try {
            (void)load_gguf_model(r);
        } catch (const Error&) {
        }
        try {
            (void)load_gguf_vocab(r);
        } catch (const Error&) {
        }
    } catch (const Error& e) {
        const Status s = e.status();
        ASSERT_TRUE(s == Status::format || s == Status::unsupported) << e.what();
    }
}
}  // namespace

TEST(GgufSweep, EveryTruncationGivesACleanError) {
    // Every cut before the end of the last tensor's data must fail with a format error; cuts inside the final
    // padding still parse (nothing is missing).
    auto needed = [](const std::string& bytes) {
        const Reader r = Reader::from_memory(bytes, "full.gguf");
        uint64_t end = 0;
        for (const auto& t : r.tensors()) end = std::max(end, r.data_offset() + t.offset + t.n_bytes);
        return end;
    };
    auto check = [](const std::string& bytes, size_t n, uint64_t need, bool load) {
        try {
            const Reader r = Reader::from_memory(bytes.substr(0, n), "cut.gguf");
            if (load) (void)load_gguf_model(r);
            EXPECT_GE(n, need) << "truncation at " << n << " parsed";
        } catch (const Error& e) {
            EXPECT_EQ(e.status(), Status::format) << n << ": " << e.what();
            EXPECT_LT(n, need) << n << ": " << e.what();
        }
    };
    const std::string small = all_types_writer(32).serialize();
    const uint64_t small_need = needed(small);
    EXPECT_LT(small_need, small.size());  // the last tensor is padded
    for (size_t n = 0; n <= small.size(); ++n) check(small, n, small_need, false);
    const std::string model = tiny_model_image();
    const uint64_t model_need = needed(model);
    for (size_t n = 0; n <= model.size(); n += 1 + n / 64) check(model, n, model_need, true);
    check(model, model_need - 1, model_need, true);
}

TEST(GgufSweep, SingleByteCorruptionNeverCrashes) {
    const std::string small = all_types_writer(32).serialize();
    for (size_t i = 0; i < small.size(); ++i) {
        for (uint8_t v : {uint8_t(0x00), uint8_t(0xff), uint8_t(0x7f), uint8_t(small[i] ^ 0x01)}) {
            std::string m = small;
            m[i] = char(v);
            exercise(m);
        }
    }
    const std::string model = tiny_model_image(true);
    for (size_t i = 0; i < model.size(); i += 7) {
        std::string m = model;
        m[i] = char(m[i] ^ 0x80);
        exercise(m);
    }
}
