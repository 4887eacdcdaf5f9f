// The boundary trace (DESIGN.md section 7): every tensor that crosses the enclave boundary or goes to the
// accelerator, exactly as the host sees it. One NumPy .npy file per tensor and DIR/index.jsonl with one JSON object
// per tensor, in order:
//   {"seq": n, "layer": l, "op": "wq", "role": "input", "dtype": "uint32", "shape": [T, K], "file": "..."}
// layer is -1 for tensors outside the blocks (token ids in, sampled tokens out, and every message between the host and
// the trusted core: op "enclave.<message type>", role "input" for a request, "output" for a response, dtype uint8). A tensor used by several products
// (the masked input of a fused q/k/v crossing) is written once and indexed once per product.
#pragma once
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/model.h"

namespace si {

// The "op" of a projection's product in the index: "wq", "wk", "wv", "wo", "w1", "w2", "w3"; and back.
const char* trace_op(Proj p);
std::optional<Proj> trace_op_proj(std::string_view op);

enum class TraceDType { i8, i32, u32, f32, f64, u8 };

class TraceWriter {
public:
    // Creates dir (and parents) if needed; an existing index.jsonl is replaced. Throws si::Error(io).
    explicit TraceWriter(const std::string& dir);
    ~TraceWriter();
    TraceWriter(const TraceWriter&) = delete;
    TraceWriter& operator=(const TraceWriter&) = delete;

    // Writes a tensor and indexes it; returns its file name (relative to dir).
    std::string write(int layer, const std::string& op, const std::string& role, TraceDType dtype,
                      const std::vector<int64_t>& shape, const void* data);
    // Indexes a tensor already written (by write) under another op.
    void index(int layer, const std::string& op, const std::string& role, TraceDType dtype,
               const std::vector<int64_t>& shape, const std::string& file);

    const std::string& dir() const { return dir_; }
    uint64_t entries() const { return seq_; }

private:
    std::string dir_;
    std::FILE* index_ = nullptr;
    uint64_t seq_ = 0;
    uint64_t files_ = 0;
};

// Writes one array as a NumPy .npy (format 1.0, C order). Throws si::Error(io).
void write_npy(const std::string& path, TraceDType dtype, const std::vector<int64_t>& shape, const void* data);
const char* trace_dtype_name(TraceDType t);  // numpy names: "int8", "int32", "uint32", "float32", "float64"

}  // namespace si
