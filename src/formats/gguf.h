// GGUF (versions 2 and 3): a defensive reader for untrusted files and a writer that produces files llama.cpp loads.
//
// Layout (all little-endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, n_kv key/value pairs
// (string key, u32 value type, value), n_tensors tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 ggml
// type, u64 offset relative to the data section), padding to the alignment, then the data section. Strings are a
// u64 length followed by that many bytes (not NUL-terminated; not required to be valid UTF-8).
//
// The reader validates everything before exposing it: every count, length and offset is checked against the bytes
// that remain, so a hostile file yields si::Error (Status::format, Status::unsupported or Status::io) and never an
// out-of-bounds read or an allocation larger than a small multiple of the file size.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace si::gguf {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
inline constexpr uint32_t kDefaultAlignment = 32;
inline constexpr uint32_t kMaxDims = 4;
inline constexpr size_t kMaxTensorName = 64;  // the GGUF spec's limit; ggml itself needs < 64 (see Writer)
inline constexpr const char* kAlignmentKey = "general.alignment";

// Metadata value types, numbered as in the file.
enum class ValueType : uint32_t {
    u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9,
    u64 = 10, i64 = 11, f64 = 12,
};
const char* value_type_name(ValueType t);  // "u8", ..., "string", "array"; "unknown" for anything else
bool is_integer(ValueType t);
// Bytes one element of a fixed-size type occupies in the file (0 for string and array).
size_t value_type_size(ValueType t);

// ggml tensor types, numbered as in ggml.h (gaps are types ggml removed).
enum class TensorType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
    I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};
struct TypeTraits {
    const char* name;     // "F32", "Q8_0", ...
    uint32_t block_size;  // elements per block (1 for plain types)
    uint32_t type_size;   // bytes per block
};
// nullptr for a type number ggml does not define.
const TypeTraits* type_traits(uint32_t type);
const char* type_name(TensorType t);  // "?" when unknown
// True for the types to_f32() can dequantise: F32, F16, BF16 and llama.cpp's block formats Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (formats/quants.h).
bool can_dequantize(TensorType t);

inline constexpr size_t kQ8_0Block = 32;       // elements per Q8_0 block
inline constexpr size_t kQ8_0BlockBytes = 34;  // fp16 scale d + 32 x int8

// Q8_0 exactly as ggml's reference quantiser: d = max|x| / 127 (stored as fp16), q = round(x / d).
// Error bound per element: |x - dequant(q)| <= 0.57 * max|x_block| / 127 while d is a normal fp16 number
// (half a step, plus up to 127 steps of the fp16 rounding of d, 2^-11 relative).
// n must be a multiple of 32; inputs must be finite (throws Status::invalid_argument otherwise).
std::vector<uint8_t> quantize_q8_0(const float* x, size_t n);
void dequantize_q8_0(const uint8_t* blocks, size_t n, float* out);
// IEEE binary16 with round-to-nearest-even: relative error <= 2^-11 for |x| in [2^-14, 65504]; absolute error
// <= 2^-25 below that. Throws Status::invalid_argument for non-finite input or |x| > 65504 (it would become inf).
std::vector<uint16_t> f32_to_f16(const float* x, size_t n);
// Converts float data into the stored bytes of F32, F16, BF16 or Q8_0 (throws Status::invalid_argument otherwise).
std::vector<uint8_t> encode(TensorType type, const float* x, size_t n);
// Dequantises n elements of any can_dequantize() type (the caller guarantees the byte count).
void decode(TensorType type, const uint8_t* data, size_t n, float* out);

// One metadata value. Scalars keep their exact type; numeric arrays keep their raw little-endian element bytes so
// that a read-write round trip is bit exact.
class Value {
public:
    Value() = default;
    static Value u8(uint8_t v);
    static Value i8(int8_t v);
    static Value u16(uint16_t v);
    static Value i16(int16_t v);
    static Value u32(uint32_t v);
    static Value i32(int32_t v);
    static Value u64(uint64_t v);
    static Value i64(int64_t v);
    static Value f32(float v);
    static Value f64(double v);
    static Value boolean(bool v);
    static Value string(std::string v);
    static Value strings(std::vector<std::string> v);
    // Numeric or bool arrays (T = uint8_t, int8_t, ..., float, double, bool).
    template <class T>
    static Value array(const std::vector<T>& v);
    // An array of fixed-size elements from raw little-endian bytes (size must be n * element size).
    static Value raw_array(ValueType elem, uint64_t n, std::vector<uint8_t> bytes);

    ValueType type() const { return type_; }
    ValueType array_type() const { return elem_; }  // meaningful when type() == array
    uint64_t array_size() const { return n_; }
    bool is_integer() const { return gguf::is_integer(type_); }

    // Exact accessors: std::nullopt when the value's type does not allow the conversion without loss.
    std::optional<uint64_t> as_u64() const;  // any integer type, non-negative
    std::optional<int64_t> as_i64() const;   // any integer type that fits
    std::optional<double> as_f64() const;    // f32 or f64
    std::optional<bool> as_bool() const;
    const std::string* as_string() const;  // nullptr unless type() == string

    // Array element access (arrays only).
    const std::vector<std::string>& string_items() const { return strs_; }  // string arrays
    const std::vector<uint8_t>& raw_items() const { return raw_; }         // fixed-size element arrays
    std::optional<int64_t> int_item(uint64_t i) const;                     // integer element arrays
    std::optional<double> float_item(uint64_t i) const;                    // f32 / f64 element arrays

    // Raw scalar bits (little-endian bit pattern, zero-extended), for bit-exact comparisons.
    uint64_t scalar_bits() const { return bits_; }
    bool operator==(const Value& o) const;

private:
    friend class Reader;
    ValueType type_ = ValueType::u8;
    ValueType elem_ = ValueType::u8;
    uint64_t bits_ = 0;  // scalar payload
    uint64_t n_ = 0;     // array length
    std::string str_;
    std::vector<std::string> strs_;
    std::vector<uint8_t> raw_;
};

// A short human-readable rendering: scalars in full, strings quoted, arrays as "[u32 x 3: 1, 2, 3]" with at most
// max_items items shown.
std::string render(const Value& v, size_t max_items = 8);

struct KeyValue {
    std::string key;
    Value value;
};

struct TensorInfo {
    std::string name;
    uint32_t n_dims = 0;
    std::array<uint64_t, kMaxDims> ne{1, 1, 1, 1};  // ne[0] is the innermost (contiguous) dimension
    TensorType type = TensorType::F32;
    uint64_t offset = 0;  // relative to the start of the data section
    uint64_t n_elements = 0;
    uint64_t n_bytes = 0;
    std::vector<uint64_t> shape() const { return {ne.begin(), ne.begin() + n_dims}; }
};

std::string shape_string(std::span<const uint64_t> ne);  // "[8, 32000]"

class Reader {
public:
    // Memory-maps the file read-only (the descriptor is closed at once). Throws Status::io if it cannot be opened
    // or is not a regular file; parse errors as from_memory.
    static Reader open(const std::string& path);
    // Parses a copy of the bytes; `name` is used in error messages.
    static Reader from_memory(const void* data, size_t size, std::string name);
    static Reader from_memory(std::string_view bytes, std::string name) {
        return from_memory(bytes.data(), bytes.size(), std::move(name));
    }

    Reader(Reader&&) noexcept;
    Reader& operator=(Reader&&) noexcept;
    ~Reader();

    const std::string& name() const { return name_; }
    uint32_t version() const { return version_; }
    uint32_t alignment() const { return alignment_; }
    uint64_t file_size() const { return size_; }
    // Absolute offset of the data section; may exceed file_size() in a file without tensors (padding omitted).
    uint64_t data_offset() const { return data_offset_; }

    // Metadata in file order.
    const std::vector<KeyValue>& metadata() const { return kv_; }
    bool has(const std::string& key) const { return find(key) != nullptr; }
    const Value* find(const std::string& key) const;
    // Throws Status::format "<name>: missing metadata key '<key>'" when absent.
    const Value& get(const std::string& key) const;

    // Typed getters: Status::format when missing, of the wrong type, or out of range for the requested type.
    // Integer getters accept any integer type whose value fits; float getters accept f32 and f64.
    uint32_t get_u32(const std::string& key) const;
    int32_t get_i32(const std::string& key) const;
    uint64_t get_u64(const std::string& key) const;
    int64_t get_i64(const std::string& key) const;
    float get_f32(const std::string& key) const;
    double get_f64(const std::string& key) const;
    bool get_bool(const std::string& key) const;
    std::string get_str(const std::string& key) const;
    std::vector<std::string> get_str_array(const std::string& key) const;
    std::vector<float> get_f32_array(const std::string& key) const;  // f32 or f64 elements
    std::vector<int64_t> get_int_array(const std::string& key) const;  // any integer elements
    // Optional forms: std::nullopt when absent; the same errors as above when present but unusable.
    std::optional<uint32_t> opt_u32(const std::string& key) const;
    std::optional<int32_t> opt_i32(const std::string& key) const;
    std::optional<uint64_t> opt_u64(const std::string& key) const;
    std::optional<float> opt_f32(const std::string& key) const;
    std::optional<bool> opt_bool(const std::string& key) const;
    std::optional<std::string> opt_str(const std::string& key) const;

    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const TensorInfo* find_tensor(const std::string& name) const;
    // Throws Status::format "<name>: missing tensor '<tensor>'" when absent.
    const TensorInfo& tensor(const std::string& name) const;
    // The tensor's bytes inside the file (already checked to lie within it).
    std::span<const uint8_t> tensor_data(const TensorInfo& t) const;
    // Dequantised copy (any can_dequantize() type; Status::unsupported naming the tensor for other types).
    std::vector<float> to_f32(const TensorInfo& t) const;
    // A memory-mapped file: gives the tensor's pages back (they leave this process's resident set and are read
    // from the page cache again if touched). A copy in memory (from_memory) is left alone.
    void release(const TensorInfo& t) const;

private:
    struct Storage;
    Reader() = default;
    void parse();
    [[noreturn]] void bad(const std::string& why) const;
    [[noreturn]] void type_error(const std::string& key, const Value& v, const char* expected) const;

    std::string name_;
    std::unique_ptr<Storage> storage_;
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
    uint32_t version_ = 0;
    uint32_t alignment_ = kDefaultAlignment;
    uint64_t data_offset_ = 0;
    std::vector<KeyValue> kv_;
    std::unordered_map<std::string, size_t> kv_index_;
    std::vector<TensorInfo> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

class Writer {
public:
    // Sets (or replaces, keeping its position) a metadata value. "general.alignment" must be a u32 power of two.
    void set(const std::string& key, Value v);
    void set_u8(const std::string& k, uint8_t v) { set(k, Value::u8(v)); }
    void set_i8(const std::string& k, int8_t v) { set(k, Value::i8(v)); }
    void set_u16(const std::string& k, uint16_t v) { set(k, Value::u16(v)); }
    void set_i16(const std::string& k, int16_t v) { set(k, Value::i16(v)); }
    void set_u32(const std::string& k, uint32_t v) { set(k, Value::u32(v)); }
    void set_i32(const std::string& k, int32_t v) { set(k, Value::i32(v)); }
    void set_u64(const std::string& k, uint64_t v) { set(k, Value::u64(v)); }
    void set_i64(const std::string& k, int64_t v) { set(k, Value::i64(v)); }
    void set_f32(const std::string& k, float v) { set(k, Value::f32(v)); }
    void set_f64(const std::string& k, double v) { set(k, Value::f64(v)); }
    void set_bool(const std::string& k, bool v) { set(k, Value::boolean(v)); }
    void set_str(const std::string& k, std::string v) { set(k, Value::string(std::move(v))); }
    void set_strs(const std::string& k, std::vector<std::string> v) { set(k, Value::strings(std::move(v))); }
    template <class T>
    void set_array(const std::string& k, const std::vector<T>& v) { set(k, Value::array(v)); }
    void set_alignment(uint32_t a) { set(kAlignmentKey, Value::u32(a)); }
    uint32_t alignment() const;

    // Adds a tensor from float data stored as F32, F16, BF16 or Q8_0. ne[0] is the innermost dimension (for a
    // row-major [rows][cols] matrix: ne = {cols, rows}). Throws Status::invalid_argument on a bad name, duplicate
    // name, bad shape, data size mismatch, or values the type cannot hold.
    void add_tensor(const std::string& name, std::span<const uint64_t> ne, TensorType type, std::span<const float> data);
    void add_tensor(const std::string& name, std::initializer_list<uint64_t> ne, TensorType type, std::span<const float> data) {
        add_tensor(name, std::span<const uint64_t>(ne.begin(), ne.size()), type, data);
    }
    // Adds already-encoded bytes of any known type (size must match the shape).
    void add_tensor_raw(const std::string& name, std::span<const uint64_t> ne, TensorType type, std::vector<uint8_t> bytes);
    // Adds a tensor whose values are produced only when write() reaches it, a few MiB of rows (ne[0] values each)
    // at a time: rows(row0, n, out) writes rows [row0, row0 + n) to out[n * ne[0]]; each block is encoded and
    // dropped, so a file is written with one block of one tensor in memory. serialize() calls it too.
    using RowProducer = std::function<void(uint64_t row0, uint64_t n, float* out)>;
    void add_tensor_deferred(const std::string& name, std::span<const uint64_t> ne, TensorType type, RowProducer rows);

    size_t n_tensors() const { return tensors_.size(); }
    // The complete file image.
    std::string serialize() const;
    // Writes to `path` atomically (`path`.tmp in the same directory, then rename). Status::io on failure.
    void write(const std::string& path) const;

private:
    struct Pending {
        TensorInfo info;
        std::vector<uint8_t> bytes;
        RowProducer deferred;  // add_tensor_deferred
    };
    // A deferred tensor's bytes, block of rows after block of rows, to `out`.
    void write_deferred(const Pending& p, const std::function<void(const void*, size_t)>& out) const;
    void check_new_tensor(const std::string& name, std::span<const uint64_t> ne, TensorType type, TensorInfo& info) const;
    std::vector<KeyValue> kv_;
    std::unordered_map<std::string, size_t> kv_index_;
    std::vector<Pending> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace si::gguf
