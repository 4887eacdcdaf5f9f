#include "host/trace.h"

#include <cstring>
#include <filesystem>

#include "common/error.h"

namespace si {

namespace {
constexpr const char* kTraceOps[] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
}  // namespace

const char* trace_op(Proj p) { return kTraceOps[int(p)]; }

std::optional<Proj> trace_op_proj(std::string_view op) {
    for (Proj p : kAllProj)
        if (op == kTraceOps[int(p)]) return p;
    return std::nullopt;
}

namespace {

size_t dtype_size(TraceDType t) {
    switch (t) {
        case TraceDType::i8:
        case TraceDType::u8: return 1;
        case TraceDType::i32:
        case TraceDType::u32:
        case TraceDType::f32: return 4;
        case TraceDType::f64: return 8;
    }
    return 0;
}

const char* npy_descr(TraceDType t) {
    switch (t) {
        case TraceDType::i8: return "|i1";
        case TraceDType::u8: return "|u1";
        case TraceDType::i32: return "<i4";
        case TraceDType::u32: return "<u4";
        case TraceDType::f32: return "<f4";
        case TraceDType::f64: return "<f8";
    }
    return "?";
}

std::string shape_json(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

}  // namespace

const char* trace_dtype_name(TraceDType t) {
    switch (t) {
        case TraceDType::i8: return "int8";
        case TraceDType::u8: return "uint8";
        case TraceDType::i32: return "int32";
        case TraceDType::u32: return "uint32";
        case TraceDType::f32: return "float32";
        case TraceDType::f64: return "float64";
    }
    return "?";
}

void write_npy(const std::string& path, TraceDType dtype, const std::vector<int64_t>& shape, const void* data) {
    std::string py_shape = "(";
    int64_t n = 1;
    for (size_t i = 0; i < shape.size(); ++i) {
        py_shape += (i ? ", " : "") + std::to_string(shape[i]);
        n *= shape[i];
    }
    py_shape += shape.size() == 1 ? ",)" : ")";
    std::string header = std::string("{'descr': '") + npy_descr(dtype) + "', 'fortran_order': False, 'shape': " +
                         py_shape + ", }";
    // magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64, ending in \n
    const size_t total = (10 + header.size() + 1 + 63) / 64 * 64;
    header.append(total - 10 - header.size() - 1, ' ');
    header += '\n';
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) fail(Status::io, path + ": cannot create trace file");
    const uint16_t hlen = uint16_t(header.size());
    const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(hlen & 0xff), uint8_t(hlen >> 8)};
    const size_t bytes = size_t(n) * dtype_size(dtype);
    bool ok = std::fwrite(pre, 1, sizeof pre, f) == sizeof pre &&
              std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
              (bytes == 0 || std::fwrite(data, 1, bytes, f) == bytes);
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) fail(Status::io, path + ": cannot write trace file");
}

TraceWriter::TraceWriter(const std::string& dir) : dir_(dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) fail(Status::io, dir + ": cannot create the trace directory: " + ec.message());
    const std::string path = dir + "/index.jsonl";
    index_ = std::fopen(path.c_str(), "w");
    if (!index_) fail(Status::io, path + ": cannot create the trace index");
}

TraceWriter::~TraceWriter() {
    if (index_) std::fclose(index_);
}

std::string TraceWriter::write(int layer, const std::string& op, const std::string& role, TraceDType dtype,
                               const std::vector<int64_t>& shape, const void* data) {
    char name[64];
    std::snprintf(name, sizeof name, "%06llu", static_cast<unsigned long long>(files_++));
    std::string file = name;
    file += '_';
    if (layer >= 0) file.append("L").append(std::to_string(layer)).append("_");
    file.append(op).append("_").append(role).append(".npy");
    write_npy(dir_ + "/" + file, dtype, shape, data);
    index(layer, op, role, dtype, shape, file);
    return file;
}

void TraceWriter::index(int layer, const std::string& op, const std::string& role, TraceDType dtype,
                        const std::vector<int64_t>& shape, const std::string& file) {
    const std::string line = "{\"seq\": " + std::to_string(seq_++) + ", \"layer\": " + std::to_string(layer) +
                             ", \"op\": \"" + op + "\", \"role\": \"" + role + "\", \"dtype\": \"" +
                             trace_dtype_name(dtype) + "\", \"shape\": " + shape_json(shape) + ", \"file\": \"" + file +
                             "\"}\n";
    if (std::fwrite(line.data(), 1, line.size(), index_) != line.size() || std::fflush(index_) != 0)
        fail(Status::io, dir_ + "/index.jsonl: cannot write the trace index");
}

}  // namespace si
