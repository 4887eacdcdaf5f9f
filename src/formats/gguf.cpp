#include "formats/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>

#include "common/error.h"
#include "common/fp16.h"
#include "formats/quants.h"

namespace si::gguf {

static_assert(std::endian::native == std::endian::little, "GGUF data is read in place: little-endian hosts only");

// ---------------------------------------------------------------------------------------------------------------
// Types

const char* value_type_name(ValueType t) {
    switch (t) {
        case ValueType::u8: return "u8";
        case ValueType::i8: return "i8";
        case ValueType::u16: return "u16";
        case ValueType::i16: return "i16";
        case ValueType::u32: return "u32";
        case ValueType::i32: return "i32";
        case ValueType::f32: return "f32";
        case ValueType::boolean: return "bool";
        case ValueType::string: return "string";
        case ValueType::array: return "array";
        case ValueType::u64: return "u64";
        case ValueType::i64: return "i64";
        case ValueType::f64: return "f64";
    }
    return "unknown";
}

bool is_integer(ValueType t) {
    switch (t) {
        case ValueType::u8: case ValueType::i8: case ValueType::u16: case ValueType::i16:
        case ValueType::u32: case ValueType::i32: case ValueType::u64: case ValueType::i64: return true;
        default: return false;
    }
}

static bool is_signed(ValueType t) {
    return t == ValueType::i8 || t == ValueType::i16 || t == ValueType::i32 || t == ValueType::i64;
}

size_t value_type_size(ValueType t) {
    switch (t) {
        case ValueType::u8: case ValueType::i8: case ValueType::boolean: return 1;
        case ValueType::u16: case ValueType::i16: return 2;
        case ValueType::u32: case ValueType::i32: case ValueType::f32: return 4;
        case ValueType::u64: case ValueType::i64: case ValueType::f64: return 8;
        default: return 0;
    }
}

static bool known_value_type(uint32_t t) { return t <= uint32_t(ValueType::f64); }

const TypeTraits* type_traits(uint32_t type) {
    // Block sizes and bytes per block as in ggml's type_traits; removed type numbers stay empty.
    static const TypeTraits kTraits[] = {
        {"F32", 1, 4},          {"F16", 1, 2},          {"Q4_0", 32, 18},      {"Q4_1", 32, 20},
        {nullptr, 0, 0},        {nullptr, 0, 0},        {"Q5_0", 32, 22},      {"Q5_1", 32, 24},
        {"Q8_0", 32, 34},       {"Q8_1", 32, 36},       {"Q2_K", 256, 84},     {"Q3_K", 256, 110},
        {"Q4_K", 256, 144},     {"Q5_K", 256, 176},     {"Q6_K", 256, 210},    {"Q8_K", 256, 292},
        {"IQ2_XXS", 256, 66},   {"IQ2_XS", 256, 74},    {"IQ3_XXS", 256, 98},  {"IQ1_S", 256, 50},
        {"IQ4_NL", 32, 18},     {"IQ3_S", 256, 110},    {"IQ2_S", 256, 82},    {"IQ4_XS", 256, 136},
        {"I8", 1, 1},           {"I16", 1, 2},          {"I32", 1, 4},         {"I64", 1, 8},
        {"F64", 1, 8},          {"IQ1_M", 256, 56},     {"BF16", 1, 2},        {nullptr, 0, 0},
        {nullptr, 0, 0},        {nullptr, 0, 0},        {"TQ1_0", 256, 54},    {"TQ2_0", 256, 66},
        {nullptr, 0, 0},        {nullptr, 0, 0},        {nullptr, 0, 0},       {"MXFP4", 32, 17},
    };
    if (type >= std::size(kTraits) || kTraits[type].name == nullptr) return nullptr;
    return &kTraits[type];
}

const char* type_name(TensorType t) {
    const TypeTraits* tr = type_traits(uint32_t(t));
    return tr ? tr->name : "?";
}

bool can_dequantize(TensorType t) { return quants::supported(t); }

std::string shape_string(std::span<const uint64_t> ne) {
    std::string s = "[";
    for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

// ---------------------------------------------------------------------------------------------------------------
// Conversions

static void require_finite(const float* x, size_t n, const char* type) {
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i]))
            fail(Status::invalid_argument, std::string("cannot store non-finite value at element ") + std::to_string(i) + " as " + type);
}

std::vector<uint8_t> quantize_q8_0(const float* x, size_t n) {
    if (n % kQ8_0Block != 0)
        fail(Status::invalid_argument, "Q8_0 needs a multiple of 32 elements, got " + std::to_string(n));
    require_finite(x, n, "Q8_0");
    std::vector<uint8_t> out(n / kQ8_0Block * kQ8_0BlockBytes);
    for (size_t b = 0; b < n / kQ8_0Block; ++b) {
        const float* xb = x + b * kQ8_0Block;
        uint8_t* yb = out.data() + b * kQ8_0BlockBytes;
        float amax = 0.0f;
        for (size_t j = 0; j < kQ8_0Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
        // Same arithmetic as ggml's quantize_row_q8_0_ref, so files match what llama-quantize produces.
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = fp32_to_fp16(d);
        std::memcpy(yb, &dh, 2);
        for (size_t j = 0; j < kQ8_0Block; ++j) {
            const float q = std::round(xb[j] * id);
            yb[2 + j] = uint8_t(int8_t(std::clamp(q, -127.0f, 127.0f)));
        }
    }
    return out;
}

void dequantize_q8_0(const uint8_t* blocks, size_t n, float* out) {
    for (size_t b = 0; b < n / kQ8_0Block; ++b) {
        const uint8_t* yb = blocks + b * kQ8_0BlockBytes;
        uint16_t dh;
        std::memcpy(&dh, yb, 2);
        const float d = fp16_to_fp32(dh);
        for (size_t j = 0; j < kQ8_0Block; ++j) out[b * kQ8_0Block + j] = float(int8_t(yb[2 + j])) * d;
    }
}

std::vector<uint16_t> f32_to_f16(const float* x, size_t n) {
    require_finite(x, n, "F16");
    std::vector<uint16_t> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (std::fabs(x[i]) > 65504.0f)
            fail(Status::invalid_argument, "value " + std::to_string(x[i]) + " at element " + std::to_string(i) + " overflows F16");
        out[i] = fp32_to_fp16(x[i]);
    }
    return out;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 64);  // keep NaN a (quiet) NaN
    return uint16_t((u + (0x7fff + ((u >> 16) & 1))) >> 16);             // round to nearest even
}

static float bf16_to_f32(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::vector<uint8_t> encode(TensorType type, const float* x, size_t n) {
    std::vector<uint8_t> out;
    switch (type) {
        case TensorType::F32:
            out.resize(n * 4);
            if (n) std::memcpy(out.data(), x, n * 4);
            return out;
        case TensorType::F16: {
            const auto h = f32_to_f16(x, n);
            out.resize(n * 2);
            if (n) std::memcpy(out.data(), h.data(), n * 2);
            return out;
        }
        case TensorType::BF16:
            out.resize(n * 2);
            for (size_t i = 0; i < n; ++i) {
                const uint16_t h = f32_to_bf16(x[i]);
                std::memcpy(out.data() + 2 * i, &h, 2);
            }
            return out;
        case TensorType::Q8_0: return quantize_q8_0(x, n);
        default: break;
    }
    fail(Status::invalid_argument, std::string("cannot encode float data as ") + type_name(type) + " (only F32, F16, BF16, Q8_0)");
}

void decode(TensorType type, const uint8_t* data, size_t n, float* out) {
    switch (type) {
        case TensorType::F32:
            if (n) std::memcpy(out, data, n * 4);
            return;
        case TensorType::F16:
            for (size_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, data + 2 * i, 2);
                out[i] = fp16_to_fp32(h);
            }
            return;
        case TensorType::BF16:
            for (size_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, data + 2 * i, 2);
                out[i] = bf16_to_f32(h);
            }
            return;
        case TensorType::Q8_0: dequantize_q8_0(data, n, out); return;
        default: break;
    }
    quants::dequantize(type, data, n, out);  // the other block formats, or an error naming the type
}

// ---------------------------------------------------------------------------------------------------------------
// Value

#define SI_GGUF_SCALAR(fn, T, VT)                      \
    Value Value::fn(T v) {                             \
        Value out;                                     \
        out.type_ = ValueType::VT;                     \
        std::memcpy(&out.bits_, &v, sizeof(T));        \
        return out;                                    \
    }
SI_GGUF_SCALAR(u8, uint8_t, u8)
SI_GGUF_SCALAR(i8, int8_t, i8)
SI_GGUF_SCALAR(u16, uint16_t, u16)
SI_GGUF_SCALAR(i16, int16_t, i16)
SI_GGUF_SCALAR(u32, uint32_t, u32)
SI_GGUF_SCALAR(i32, int32_t, i32)
SI_GGUF_SCALAR(u64, uint64_t, u64)
SI_GGUF_SCALAR(i64, int64_t, i64)
SI_GGUF_SCALAR(f32, float, f32)
SI_GGUF_SCALAR(f64, double, f64)
#undef SI_GGUF_SCALAR

Value Value::boolean(bool v) {
    Value out;
    out.type_ = ValueType::boolean;
    out.bits_ = v ? 1 : 0;
    return out;
}

Value Value::string(std::string v) {
    Value out;
    out.type_ = ValueType::string;
    out.str_ = std::move(v);
    return out;
}

Value Value::strings(std::vector<std::string> v) {
    Value out;
    out.type_ = ValueType::array;
    out.elem_ = ValueType::string;
    out.n_ = v.size();
    out.strs_ = std::move(v);
    return out;
}

Value Value::raw_array(ValueType elem, uint64_t n, std::vector<uint8_t> bytes) {
    const size_t es = value_type_size(elem);
    if (es == 0) fail(Status::invalid_argument, std::string("raw arrays need a fixed-size element type, not ") + value_type_name(elem));
    if (n > bytes.size() / es || n * es != bytes.size())
        fail(Status::invalid_argument, "raw array of " + std::to_string(n) + " " + value_type_name(elem) + " needs " +
                                           std::to_string(n * es) + " bytes, got " + std::to_string(bytes.size()));
    Value out;
    out.type_ = ValueType::array;
    out.elem_ = elem;
    out.n_ = n;
    out.raw_ = std::move(bytes);
    return out;
}

template <class T>
constexpr ValueType value_type_of() {
    if constexpr (std::is_same_v<T, uint8_t>) return ValueType::u8;
    else if constexpr (std::is_same_v<T, int8_t>) return ValueType::i8;
    else if constexpr (std::is_same_v<T, uint16_t>) return ValueType::u16;
    else if constexpr (std::is_same_v<T, int16_t>) return ValueType::i16;
    else if constexpr (std::is_same_v<T, uint32_t>) return ValueType::u32;
    else if constexpr (std::is_same_v<T, int32_t>) return ValueType::i32;
    else if constexpr (std::is_same_v<T, uint64_t>) return ValueType::u64;
    else if constexpr (std::is_same_v<T, int64_t>) return ValueType::i64;
    else if constexpr (std::is_same_v<T, float>) return ValueType::f32;
    else if constexpr (std::is_same_v<T, double>) return ValueType::f64;
    else return ValueType::boolean;
}

template <class T>
Value Value::array(const std::vector<T>& v) {
    std::vector<uint8_t> bytes(v.size() * sizeof(T));
    if constexpr (std::is_same_v<T, bool>) {
        for (size_t i = 0; i < v.size(); ++i) bytes[i] = v[i] ? 1 : 0;
    } else if (!v.empty()) {
        std::memcpy(bytes.data(), v.data(), bytes.size());
    }
    return raw_array(value_type_of<T>(), v.size(), std::move(bytes));
}
template Value Value::array(const std::vector<uint8_t>&);
template Value Value::array(const std::vector<int8_t>&);
template Value Value::array(const std::vector<uint16_t>&);
template Value Value::array(const std::vector<int16_t>&);
template Value Value::array(const std::vector<uint32_t>&);
template Value Value::array(const std::vector<int32_t>&);
template Value Value::array(const std::vector<uint64_t>&);
template Value Value::array(const std::vector<int64_t>&);
template Value Value::array(const std::vector<float>&);
template Value Value::array(const std::vector<double>&);
template Value Value::array(const std::vector<bool>&);

// Reads an integer of type t from its little-endian bit pattern, sign-extending signed types.
static bool int_from_bits(ValueType t, uint64_t bits, int64_t* s, uint64_t* u, bool* negative) {
    if (!is_integer(t)) return false;
    const size_t sz = value_type_size(t);
    if (is_signed(t)) {
        const unsigned shift = unsigned(64 - 8 * sz);
        const int64_t v = int64_t(bits << shift) >> shift;
        *s = v;
        *u = uint64_t(v);
        *negative = v < 0;
    } else {
        *u = bits;
        *s = int64_t(bits);
        *negative = false;
    }
    return true;
}

std::optional<uint64_t> Value::as_u64() const {
    int64_t s = 0;
    uint64_t u = 0;
    bool neg = false;
    if (!int_from_bits(type_, bits_, &s, &u, &neg) || neg) return std::nullopt;
    return u;
}

std::optional<int64_t> Value::as_i64() const {
    int64_t s = 0;
    uint64_t u = 0;
    bool neg = false;
    if (!int_from_bits(type_, bits_, &s, &u, &neg)) return std::nullopt;
    if (!is_signed(type_) && u > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return s;
}

static double float_from_bits(ValueType t, uint64_t bits) {
    if (t == ValueType::f32) {
        float f;
        const uint32_t b = uint32_t(bits);
        std::memcpy(&f, &b, 4);
        return f;
    }
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
}

std::optional<double> Value::as_f64() const {
    if (type_ != ValueType::f32 && type_ != ValueType::f64) return std::nullopt;
    return float_from_bits(type_, bits_);
}

std::optional<bool> Value::as_bool() const {
    if (type_ != ValueType::boolean) return std::nullopt;
    return bits_ != 0;
}

const std::string* Value::as_string() const { return type_ == ValueType::string ? &str_ : nullptr; }

static uint64_t item_bits(const std::vector<uint8_t>& raw, size_t es, uint64_t i) {
    uint64_t bits = 0;
    std::memcpy(&bits, raw.data() + i * es, es);
    return bits;
}

std::optional<int64_t> Value::int_item(uint64_t i) const {
    if (type_ != ValueType::array || !gguf::is_integer(elem_) || i >= n_) return std::nullopt;
    int64_t s = 0;
    uint64_t u = 0;
    bool neg = false;
    int_from_bits(elem_, item_bits(raw_, value_type_size(elem_), i), &s, &u, &neg);
    if (!is_signed(elem_) && u > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return s;
}

std::optional<double> Value::float_item(uint64_t i) const {
    if (type_ != ValueType::array || (elem_ != ValueType::f32 && elem_ != ValueType::f64) || i >= n_) return std::nullopt;
    return float_from_bits(elem_, item_bits(raw_, value_type_size(elem_), i));
}

bool Value::operator==(const Value& o) const {
    return type_ == o.type_ && (type_ != ValueType::array || elem_ == o.elem_) && bits_ == o.bits_ && n_ == o.n_ &&
           str_ == o.str_ && strs_ == o.strs_ && raw_ == o.raw_;
}

static std::string quote(const std::string& s, size_t max_len = 64) {
    std::string out = "\"";
    for (size_t i = 0; i < s.size() && i < max_len; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += char(c);
        } else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else {
            out += char(c);  // bytes >= 0x80 pass through: UTF-8 prints as text, invalid bytes stay bytes
        }
    }
    if (s.size() > max_len) out += "...";
    return out + "\"";
}

static std::string render_scalar(ValueType t, uint64_t bits) {
    if (t == ValueType::boolean) return bits ? "true" : "false";
    if (t == ValueType::f32 || t == ValueType::f64) {
        std::ostringstream ss;
        ss.precision(t == ValueType::f32 ? 9 : 17);
        ss << float_from_bits(t, bits);
        return ss.str();
    }
    int64_t s = 0;
    uint64_t u = 0;
    bool neg = false;
    int_from_bits(t, bits, &s, &u, &neg);
    return is_signed(t) ? std::to_string(s) : std::to_string(u);
}

std::string render(const Value& v, size_t max_items) {
    if (v.type() == ValueType::string) return quote(*v.as_string());
    if (v.type() != ValueType::array) return render_scalar(v.type(), v.scalar_bits());
    std::string out = std::string("[") + value_type_name(v.array_type()) + " x " + std::to_string(v.array_size());
    const uint64_t shown = std::min<uint64_t>(v.array_size(), max_items);
    for (uint64_t i = 0; i < shown; ++i) {
        out += i ? ", " : ": ";
        if (v.array_type() == ValueType::string) out += quote(v.string_items()[i], 32);
        else out += render_scalar(v.array_type(), item_bits(v.raw_items(), value_type_size(v.array_type()), i));
    }
    if (shown < v.array_size()) out += ", ...";
    return out + "]";
}

// ---------------------------------------------------------------------------------------------------------------
// Reader

struct Reader::Storage {
    std::vector<uint8_t> copy;  // from_memory
    void* map = nullptr;        // open()
    size_t map_size = 0;
    ~Storage() {
        if (map) munmap(map, map_size);
    }
};

Reader::Reader(Reader&&) noexcept = default;
Reader& Reader::operator=(Reader&&) noexcept = default;
Reader::~Reader() = default;

void Reader::bad(const std::string& why) const { fail(Status::format, name_ + ": " + why); }

Reader Reader::open(const std::string& path) {
    Reader r;
    r.name_ = path;
    r.storage_ = std::make_unique<Storage>();
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(Status::io, path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        ::close(fd);
        fail(Status::io, path + ": cannot stat: " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(Status::io, path + ": not a regular file");
    }
    const uint64_t size = uint64_t(st.st_size);
    if (size > 0) {
        // A read-only private mapping: tensor data is paged in on demand and never copied.
        void* p = mmap(nullptr, size_t(size), PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            const int e = errno;
            ::close(fd);
            fail(Status::io, path + ": cannot map " + std::to_string(size) + " bytes: " + std::strerror(e));
        }
        r.storage_->map = p;
        r.storage_->map_size = size_t(size);
        r.data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
    r.size_ = size;
    r.parse();
    return r;
}

Reader Reader::from_memory(const void* data, size_t size, std::string name) {
    Reader r;
    r.name_ = std::move(name);
    r.storage_ = std::make_unique<Storage>();
    r.storage_->copy.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + size);
    r.data_ = r.storage_->copy.data();
    r.size_ = size;
    r.parse();
    return r;
}

namespace {

// Bounds-checked sequential reads over the file image. Every read states what it is for, so a truncated file is
// reported as "truncated at offset X reading Y".
class Cursor {
public:
    Cursor(const uint8_t* data, uint64_t size, const std::string& name) : d_(data), size_(size), name_(name) {}
    uint64_t pos() const { return pos_; }
    uint64_t left() const { return size_ - pos_; }

    void need(uint64_t n, const std::string& what) const {
        if (n > left())
            fail(Status::format, name_ + ": truncated at offset " + std::to_string(pos_) + " reading " + what + " (need " +
                                     std::to_string(n) + " bytes, " + std::to_string(left()) + " remain)");
    }
    template <class T>
    T read(const std::string& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, d_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string read_string(const std::string& what) {
        const uint64_t at = pos_;
        const uint64_t n = read<uint64_t>("length of " + what);
        if (n > left())
            fail(Status::format, name_ + ": " + what + ": string length " + std::to_string(n) + " at offset " +
                                     std::to_string(at) + " extends past end of file (size " + std::to_string(size_) + ")");
        std::string s(reinterpret_cast<const char*>(d_ + pos_), size_t(n));
        pos_ += n;
        return s;
    }
    const uint8_t* take(uint64_t n, const std::string& what) {
        need(n, what);
        const uint8_t* p = d_ + pos_;
        pos_ += n;
        return p;
    }

private:
    const uint8_t* d_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& name_;
};

// The fewest bytes a metadata entry (key of length 1, type, one-byte value) and a tensor info (name of length 1,
// n_dims, one dimension, type, offset) can take: counts beyond remaining / minimum are rejected before any loop.
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;
constexpr uint64_t kMaxKeyLength = 65535;  // the GGUF spec's limit

}  // namespace

void Reader::parse() {
    Cursor c(data_, size_, name_);
    if (size_ < 4) bad("truncated at offset 0 reading magic (file is " + std::to_string(size_) + " bytes)");
    const uint32_t magic = c.read<uint32_t>("magic");
    if (magic != kMagic) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "0x%08x", magic);
        bad(std::string("bad magic ") + buf + " (not a GGUF file)");
    }
    version_ = c.read<uint32_t>("version");
    if (version_ != 2 && version_ != 3) {
        std::string msg = name_ + ": unsupported GGUF version " + std::to_string(version_) + " (supported: 2, 3)";
        if ((version_ & 0xffff) == 0 && version_ != 0) msg += "; the file looks big-endian";
        fail(Status::unsupported, msg);
    }
    const uint64_t n_tensors = c.read<uint64_t>("tensor count");
    const uint64_t n_kv = c.read<uint64_t>("metadata count");
    if (n_tensors > c.left() / kMinTensorInfoBytes)
        bad("tensor count " + std::to_string(n_tensors) + " is larger than the remaining " + std::to_string(c.left()) +
            " bytes could hold");
    if (n_kv > c.left() / kMinKvBytes)
        bad("metadata count " + std::to_string(n_kv) + " is larger than the remaining " + std::to_string(c.left()) +
            " bytes could hold");
    if (n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes > c.left())
        bad(std::to_string(n_kv) + " metadata entries and " + std::to_string(n_tensors) +
            " tensor infos cannot fit in the remaining " + std::to_string(c.left()) + " bytes");

    kv_.reserve(size_t(n_kv));
    for (uint64_t i = 0; i < n_kv; ++i) {
        const std::string entry = "metadata entry " + std::to_string(i);
        std::string key = c.read_string("key of " + entry);
        if (key.empty()) bad(entry + " has an empty key");
        if (key.size() > kMaxKeyLength) bad(entry + " key is " + std::to_string(key.size()) + " bytes long (limit 65535)");
        if (kv_index_.count(key)) bad("duplicate metadata key '" + key + "'");
        const std::string what = "metadata '" + key + "'";
        const uint32_t type = c.read<uint32_t>("value type of " + what);
        if (!known_value_type(type)) bad(what + " has unknown value type " + std::to_string(type));
        Value v;
        v.type_ = ValueType(type);
        if (v.type_ == ValueType::string) {
            v.str_ = c.read_string("value of " + what);
        } else if (v.type_ == ValueType::array) {
            const uint32_t elem = c.read<uint32_t>("element type of " + what);
            if (!known_value_type(elem)) bad(what + " is an array of unknown value type " + std::to_string(elem));
            if (ValueType(elem) == ValueType::array)
                fail(Status::unsupported, name_ + ": " + what + " is an array of arrays (nested arrays are not supported)");
            v.elem_ = ValueType(elem);
            const uint64_t n = c.read<uint64_t>("length of " + what);
            const size_t es = value_type_size(v.elem_);
            const uint64_t min_item = es ? es : 8;  // a string element is at least its u64 length
            if (n > c.left() / min_item)
                bad(what + ": array length " + std::to_string(n) + " is larger than the remaining " +
                    std::to_string(c.left()) + " bytes could hold");
            v.n_ = n;
            if (es) {
                const uint8_t* p = c.take(n * es, "elements of " + what);
                v.raw_.assign(p, p + n * es);
            } else {
                v.strs_.reserve(size_t(n));
                for (uint64_t j = 0; j < n; ++j) v.strs_.push_back(c.read_string(what + " element " + std::to_string(j)));
            }
        } else {
            const size_t es = value_type_size(v.type_);
            const uint8_t* p = c.take(es, "value of " + what);
            std::memcpy(&v.bits_, p, es);
        }
        kv_index_.emplace(key, kv_.size());
        kv_.push_back({std::move(key), std::move(v)});
    }

    if (const Value* a = find(kAlignmentKey)) {
        const auto u = a->as_u64();
        if (!u) bad(std::string(kAlignmentKey) + " has type " + value_type_name(a->type()) + ", expected an unsigned integer");
        if (*u == 0 || *u > (uint64_t(1) << 31) || !std::has_single_bit(*u))
            bad(std::string(kAlignmentKey) + " " + std::to_string(*u) + " is not a nonzero power of two (at most 2^31)");
        alignment_ = uint32_t(*u);
    }

    tensors_.reserve(size_t(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        TensorInfo t;
        t.name = c.read_string("name of tensor " + std::to_string(i));
        if (t.name.empty()) bad("tensor " + std::to_string(i) + " has an empty name");
        if (t.name.size() > kMaxTensorName)
            bad("tensor " + std::to_string(i) + " name is " + std::to_string(t.name.size()) + " bytes long (limit 64)");
        if (tensor_index_.count(t.name)) bad("duplicate tensor name '" + t.name + "'");
        const std::string what = "tensor '" + t.name + "'";
        t.n_dims = c.read<uint32_t>("n_dims of " + what);
        if (t.n_dims == 0 || t.n_dims > kMaxDims) bad(what + " has n_dims " + std::to_string(t.n_dims) + " (must be 1..4)");
        for (uint32_t j = 0; j < t.n_dims; ++j) t.ne[j] = c.read<uint64_t>("ne[" + std::to_string(j) + "] of " + what);
        const std::span<const uint64_t> shape(t.ne.data(), t.n_dims);
        uint64_t n = 1;
        for (uint32_t j = 0; j < t.n_dims; ++j) {
            if (t.ne[j] == 0) bad(what + " has zero dimension ne[" + std::to_string(j) + "] in shape " + shape_string(shape));
            // ggml counts elements in int64_t.
            if (t.ne[j] > uint64_t(std::numeric_limits<int64_t>::max()) / n)
                bad(what + " shape " + shape_string(shape) + " overflows the element count");
            n *= t.ne[j];
        }
        t.n_elements = n;
        const uint32_t type = c.read<uint32_t>("type of " + what);
        const TypeTraits* tr = type_traits(type);
        if (!tr) fail(Status::unsupported, name_ + ": " + what + " has unknown ggml type " + std::to_string(type));
        t.type = TensorType(type);
        if (t.ne[0] % tr->block_size != 0)
            bad(what + " ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of the " + tr->name + " block size " +
                std::to_string(tr->block_size));
        const uint64_t blocks = n / tr->block_size;
        if (blocks > uint64_t(std::numeric_limits<int64_t>::max()) / tr->type_size)
            bad(what + " shape " + shape_string(shape) + " overflows the byte size");
        t.n_bytes = blocks * tr->type_size;
        t.offset = c.read<uint64_t>("data offset of " + what);
        if (t.offset % alignment_ != 0)
            bad(what + " data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                std::to_string(alignment_));
        tensor_index_.emplace(t.name, tensors_.size());
        tensors_.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment (files without tensors may omit the padding).
    const uint64_t pad = (alignment_ - c.pos() % alignment_) % alignment_;
    data_offset_ = c.pos() + pad;
    if (tensors_.empty()) return;
    if (data_offset_ > size_)
        bad("truncated: data section at offset " + std::to_string(data_offset_) + " starts past end of file (size " +
            std::to_string(size_) + ")");
    const uint64_t data_size = size_ - data_offset_;
    for (const TensorInfo& t : tensors_) {
        if (t.offset > data_size || t.n_bytes > data_size - t.offset)
            bad("tensor '" + t.name + "' data [offset " + std::to_string(t.offset) + ", " + std::to_string(t.n_bytes) +
                " bytes] extends past end of file (data section at " + std::to_string(data_offset_) + ", size " +
                std::to_string(size_) + ")");
    }
    std::vector<size_t> order(tensors_.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
        const TensorInfo& p = tensors_[order[k - 1]];
        const TensorInfo& q = tensors_[order[k]];
        if (p.offset + p.n_bytes > q.offset)
            bad("tensor '" + q.name + "' data [offset " + std::to_string(q.offset) + ", " + std::to_string(q.n_bytes) +
                " bytes] overlaps tensor '" + p.name + "' [offset " + std::to_string(p.offset) + ", " +
                std::to_string(p.n_bytes) + " bytes]");
    }
}

const Value* Reader::find(const std::string& key) const {
    const auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].value;
}

const Value& Reader::get(const std::string& key) const {
    const Value* v = find(key);
    if (!v) bad("missing metadata key '" + key + "'");
    return *v;
}

static std::string describe_type(const Value& v) {
    if (v.type() == ValueType::array) return std::string("array of ") + value_type_name(v.array_type());
    return value_type_name(v.type());
}

void Reader::type_error(const std::string& key, const Value& v, const char* expected) const {
    bad("metadata '" + key + "' has type " + describe_type(v) + ", expected " + expected);
}

template <class T>
static std::optional<T> fit_int(const Value& v) {
    if constexpr (std::is_signed_v<T>) {
        const auto s = v.as_i64();
        if (!s || *s < std::numeric_limits<T>::min() || *s > std::numeric_limits<T>::max()) return std::nullopt;
        return T(*s);
    } else {
        const auto u = v.as_u64();
        if (!u || *u > std::numeric_limits<T>::max()) return std::nullopt;
        return T(*u);
    }
}

#define SI_GGUF_INT_GETTER(fn, opt, T, label)                                                                         \
    T Reader::fn(const std::string& key) const {                                                                      \
        const Value& v = get(key);                                                                                    \
        if (!v.is_integer()) type_error(key, v, "an integer");                                                        \
        const auto r = fit_int<T>(v);                                                                                 \
        if (!r) bad("metadata '" + key + "' value " + render(v) + " does not fit in " label);                         \
        return *r;                                                                                                    \
    }                                                                                                                 \
    std::optional<T> Reader::opt(const std::string& key) const {                                                     \
        if (!has(key)) return std::nullopt;                                                                           \
        return fn(key);                                                                                               \
    }
SI_GGUF_INT_GETTER(get_u32, opt_u32, uint32_t, "u32")
SI_GGUF_INT_GETTER(get_i32, opt_i32, int32_t, "i32")
SI_GGUF_INT_GETTER(get_u64, opt_u64, uint64_t, "u64")
#undef SI_GGUF_INT_GETTER

int64_t Reader::get_i64(const std::string& key) const {
    const Value& v = get(key);
    if (!v.is_integer()) type_error(key, v, "an integer");
    const auto r = v.as_i64();
    if (!r) bad("metadata '" + key + "' value " + render(v) + " does not fit in i64");
    return *r;
}

double Reader::get_f64(const std::string& key) const {
    const Value& v = get(key);
    const auto r = v.as_f64();
    if (!r) type_error(key, v, "f32 or f64");
    return *r;
}

float Reader::get_f32(const std::string& key) const {
    const double d = get_f64(key);
    if (std::isfinite(d) && std::fabs(d) > double(std::numeric_limits<float>::max()))
        bad("metadata '" + key + "' value " + render(get(key)) + " does not fit in f32");
    return float(d);
}

bool Reader::get_bool(const std::string& key) const {
    const Value& v = get(key);
    const auto r = v.as_bool();
    if (!r) type_error(key, v, "bool");
    return *r;
}

std::string Reader::get_str(const std::string& key) const {
    const Value& v = get(key);
    const std::string* s = v.as_string();
    if (!s) type_error(key, v, "string");
    return *s;
}

std::vector<std::string> Reader::get_str_array(const std::string& key) const {
    const Value& v = get(key);
    if (v.type() != ValueType::array || v.array_type() != ValueType::string) type_error(key, v, "array of string");
    return v.string_items();
}

std::vector<float> Reader::get_f32_array(const std::string& key) const {
    const Value& v = get(key);
    if (v.type() != ValueType::array || (v.array_type() != ValueType::f32 && v.array_type() != ValueType::f64))
        type_error(key, v, "array of f32");
    std::vector<float> out(size_t(v.array_size()));
    for (uint64_t i = 0; i < v.array_size(); ++i) out[i] = float(*v.float_item(i));
    return out;
}

std::vector<int64_t> Reader::get_int_array(const std::string& key) const {
    const Value& v = get(key);
    if (v.type() != ValueType::array || !is_integer(v.array_type())) type_error(key, v, "array of integers");
    std::vector<int64_t> out(size_t(v.array_size()));
    for (uint64_t i = 0; i < v.array_size(); ++i) {
        const auto x = v.int_item(i);
        if (!x) bad("metadata '" + key + "' element " + std::to_string(i) + " does not fit in i64");
        out[i] = *x;
    }
    return out;
}

std::optional<float> Reader::opt_f32(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    return get_f32(key);
}
std::optional<bool> Reader::opt_bool(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    return get_bool(key);
}
std::optional<std::string> Reader::opt_str(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    return get_str(key);
}

const TensorInfo* Reader::find_tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& Reader::tensor(const std::string& name) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) bad("missing tensor '" + name + "'");
    return *t;
}

std::span<const uint8_t> Reader::tensor_data(const TensorInfo& t) const {
    // Only infos of this reader are valid here; re-check so a foreign info cannot read out of bounds.
    const TensorInfo* own = find_tensor(t.name);
    if (!own || own->offset != t.offset || own->n_bytes != t.n_bytes)
        fail(Status::invalid_argument, name_ + ": tensor '" + t.name + "' does not belong to this file");
    return {data_ + data_offset_ + t.offset, size_t(t.n_bytes)};
}

std::vector<float> Reader::to_f32(const TensorInfo& t) const {
    const auto bytes = tensor_data(t);
    if (!can_dequantize(t.type))
        fail(Status::unsupported, name_ + ": tensor '" + t.name + "' has type " + type_name(t.type) +
                                      ", which cannot be dequantised (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
                                      "Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
    std::vector<float> out(size_t(t.n_elements));
    decode(t.type, bytes.data(), out.size(), out.data());
    return out;
}

void Reader::release(const TensorInfo& t) const {
    if (!storage_ || !storage_->map) return;
    const std::span<const uint8_t> bytes = tensor_data(t);
    // whole pages inside the tensor only: its neighbours keep theirs
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) / page * page;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data() + bytes.size())) / page * page;
    if (end > begin) madvise(reinterpret_cast<void*>(begin), size_t(end - begin), MADV_DONTNEED);
}

// ---------------------------------------------------------------------------------------------------------------
// Writer

void Writer::set(const std::string& key, Value v) {
    if (key.empty() || key.size() > kMaxKeyLength)
        fail(Status::invalid_argument, "metadata key must be 1..65535 bytes long, got " + std::to_string(key.size()));
    if (key == kAlignmentKey) {
        const auto u = v.type() == ValueType::u32 ? v.as_u64() : std::nullopt;
        if (!u || *u == 0 || *u > (uint64_t(1) << 31) || !std::has_single_bit(*u))
            fail(Status::invalid_argument, std::string(kAlignmentKey) + " must be a u32 power of two, got " + render(v));
        if (!tensors_.empty()) fail(Status::invalid_argument, "set the alignment before adding tensors");
    }
    const auto it = kv_index_.find(key);
    if (it != kv_index_.end()) {
        kv_[it->second].value = std::move(v);
        return;
    }
    kv_index_.emplace(key, kv_.size());
    kv_.push_back({key, std::move(v)});
}

uint32_t Writer::alignment() const {
    const auto it = kv_index_.find(kAlignmentKey);
    return it == kv_index_.end() ? kDefaultAlignment : uint32_t(*kv_[it->second].value.as_u64());
}

void Writer::check_new_tensor(const std::string& name, std::span<const uint64_t> ne, TensorType type, TensorInfo& info) const {
    // ggml keeps names in a 64-byte buffer including the terminating NUL.
    if (name.empty() || name.size() >= kMaxTensorName)
        fail(Status::invalid_argument, "tensor name '" + name + "' must be 1..63 bytes long");
    if (tensor_index_.count(name)) fail(Status::invalid_argument, "duplicate tensor name '" + name + "'");
    if (ne.empty() || ne.size() > kMaxDims)
        fail(Status::invalid_argument, "tensor '" + name + "' needs 1..4 dimensions, got " + std::to_string(ne.size()));
    const TypeTraits* tr = type_traits(uint32_t(type));
    if (!tr) fail(Status::invalid_argument, "tensor '" + name + "' has unknown type " + std::to_string(uint32_t(type)));
    uint64_t n = 1;
    for (size_t j = 0; j < ne.size(); ++j) {
        if (ne[j] == 0 || ne[j] > uint64_t(std::numeric_limits<int64_t>::max()) / n)
            fail(Status::invalid_argument, "tensor '" + name + "' has invalid shape " + shape_string(ne));
        n *= ne[j];
    }
    if (ne[0] % tr->block_size != 0)
        fail(Status::invalid_argument, "tensor '" + name + "' ne[0] = " + std::to_string(ne[0]) + " is not a multiple of the " +
                                           tr->name + " block size " + std::to_string(tr->block_size));
    info.name = name;
    info.n_dims = uint32_t(ne.size());
    std::copy(ne.begin(), ne.end(), info.ne.begin());
    info.type = type;
    info.n_elements = n;
    info.n_bytes = n / tr->block_size * tr->type_size;
}

void Writer::add_tensor(const std::string& name, std::span<const uint64_t> ne, TensorType type, std::span<const float> data) {
    Pending p;
    check_new_tensor(name, ne, type, p.info);
    if (data.size() != p.info.n_elements)
        fail(Status::invalid_argument, "tensor '" + name + "' shape " + shape_string(ne) + " needs " +
                                           std::to_string(p.info.n_elements) + " values, got " + std::to_string(data.size()));
    try {
        p.bytes = encode(type, data.data(), data.size());
    } catch (const Error& e) {
        fail(e.status(), "tensor '" + name + "': " + e.what());
    }
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(p));
}

void Writer::add_tensor_raw(const std::string& name, std::span<const uint64_t> ne, TensorType type, std::vector<uint8_t> bytes) {
    Pending p;
    check_new_tensor(name, ne, type, p.info);
    if (bytes.size() != p.info.n_bytes)
        fail(Status::invalid_argument, "tensor '" + name + "' of type " + type_name(type) + " and shape " + shape_string(ne) +
                                           " needs " + std::to_string(p.info.n_bytes) + " bytes, got " + std::to_string(bytes.size()));
    p.bytes = std::move(bytes);
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(p));
}

void Writer::add_tensor_deferred(const std::string& name, std::span<const uint64_t> ne, TensorType type,
                                 RowProducer rows) {
    Pending p;
    check_new_tensor(name, ne, type, p.info);
    p.deferred = std::move(rows);
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(p));
}

void Writer::write_deferred(const Pending& p, const std::function<void(const void*, size_t)>& out) const {
    // Rows hold whole blocks (check_new_tensor), so the encodings of blocks of rows add up to the tensor's.
    const uint64_t cols = p.info.ne[0], rows = p.info.n_elements / cols;
    const uint64_t block = std::max<uint64_t>(1, (uint64_t(1) << 20) / cols);
    std::vector<float> data;
    for (uint64_t r0 = 0; r0 < rows; r0 += block) {
        const uint64_t n = std::min(block, rows - r0);
        data.resize(size_t(n * cols));
        p.deferred(r0, n, data.data());
        try {
            const std::vector<uint8_t> bytes = encode(p.info.type, data.data(), data.size());
            out(bytes.data(), bytes.size());
        } catch (const Error& e) {
            fail(e.status(), "tensor '" + p.info.name + "': " + e.what());
        }
    }
}

namespace {

using Sink = std::function<void(const void*, size_t)>;
// Writes tensor i's bytes when its data pointer is null (a deferred tensor).
using Produce = std::function<void(size_t, const Sink&)>;

template <class T>
void put(const Sink& out, T v) {
    out(&v, sizeof v);
}
void put_string(const Sink& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    out(s.data(), s.size());
}
void put_zeros(const Sink& out, uint64_t n) {
    static const uint8_t zeros[256] = {};
    while (n) {
        const size_t k = size_t(std::min<uint64_t>(n, sizeof zeros));
        out(zeros, k);
        n -= k;
    }
}
uint64_t pad_to(uint64_t n, uint64_t a) { return (a - n % a) % a; }

}  // namespace

static void serialize_to(const std::vector<KeyValue>& kv, const std::vector<TensorInfo>& infos,
                         const std::vector<const std::vector<uint8_t>*>& data, const Produce& produce,
                         uint32_t alignment, const Sink& raw_out) {
    uint64_t written = 0;
    const Sink out = [&](const void* p, size_t n) {
        raw_out(p, n);
        written += n;
    };
    put<uint32_t>(out, kMagic);
    put<uint32_t>(out, 3);
    put<uint64_t>(out, infos.size());
    put<uint64_t>(out, kv.size());
    for (const KeyValue& e : kv) {
        put_string(out, e.key);
        const Value& v = e.value;
        put<uint32_t>(out, uint32_t(v.type()));
        if (v.type() == ValueType::string) {
            put_string(out, *v.as_string());
        } else if (v.type() == ValueType::array) {
            put<uint32_t>(out, uint32_t(v.array_type()));
            put<uint64_t>(out, v.array_size());
            if (v.array_type() == ValueType::string)
                for (const auto& s : v.string_items()) put_string(out, s);
            else
                out(v.raw_items().data(), v.raw_items().size());
        } else {
            const uint64_t bits = v.scalar_bits();
            out(&bits, value_type_size(v.type()));
        }
    }
    for (const TensorInfo& t : infos) {
        put_string(out, t.name);
        put<uint32_t>(out, t.n_dims);
        for (uint32_t j = 0; j < t.n_dims; ++j) put<uint64_t>(out, t.ne[j]);
        put<uint32_t>(out, uint32_t(t.type));
        put<uint64_t>(out, t.offset);
    }
    put_zeros(out, pad_to(written, alignment));
    // Like ggml, every tensor (the last included) is padded to the alignment.
    for (size_t i = 0; i < infos.size(); ++i) {
        if (data[i]) {
            out(data[i]->data(), data[i]->size());
            put_zeros(out, pad_to(data[i]->size(), alignment));
        } else {
            produce(i, out);
            put_zeros(out, pad_to(infos[i].n_bytes, alignment));
        }
    }
}

static void serialize_writer(const std::vector<KeyValue>& kv, const std::vector<TensorInfo>& infos_in,
                             const std::vector<const std::vector<uint8_t>*>& data, const Produce& produce,
                             uint32_t alignment, const Sink& out) {
    std::vector<TensorInfo> infos = infos_in;
    uint64_t offset = 0;
    for (TensorInfo& t : infos) {
        t.offset = offset;
        offset += t.n_bytes + pad_to(t.n_bytes, alignment);
    }
    serialize_to(kv, infos, data, produce, alignment, out);
}

std::string Writer::serialize() const {
    std::vector<TensorInfo> infos;
    std::vector<const std::vector<uint8_t>*> data;
    for (const Pending& p : tensors_) {
        infos.push_back(p.info);
        data.push_back(p.deferred ? nullptr : &p.bytes);
    }
    const Produce produce = [&](size_t i, const Sink& out) { write_deferred(tensors_[i], out); };
    std::string image;
    serialize_writer(kv_, infos, data, produce, alignment(), [&](const void* p, size_t n) { image.append(static_cast<const char*>(p), n); });
    return image;
}

void Writer::write(const std::string& path) const {
    // Written next to the target and renamed into place, so readers never see a half-written file.
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail(Status::io, path + ": cannot create temporary file '" + tmp + "': " + std::strerror(errno));
    int err = 0;
    std::vector<TensorInfo> infos;
    std::vector<const std::vector<uint8_t>*> data;
    for (const Pending& p : tensors_) {
        infos.push_back(p.info);
        data.push_back(p.deferred ? nullptr : &p.bytes);
    }
    const Produce produce = [&](size_t i, const Sink& out) { write_deferred(tensors_[i], out); };
    try {
        serialize_writer(kv_, infos, data, produce, alignment(), [&](const void* p, size_t n) {
            if (!err && n && std::fwrite(p, 1, n, f) != n) err = errno ? errno : EIO;
        });
    } catch (...) {  // a deferred tensor failed: no half-written file stays behind
        std::fclose(f);
        std::remove(tmp.c_str());
        throw;
    }
    if (!err && std::fflush(f) != 0) err = errno;
    if (!err && fsync(fileno(f)) != 0) err = errno;
    if (std::fclose(f) != 0 && !err) err = errno;
    if (!err && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
    if (err) {
        std::remove(tmp.c_str());
        fail(Status::io, path + ": cannot write: " + std::strerror(err));
    }
}

}  // namespace si::gguf
