// Reading a boundary trace (DESIGN.md section 7) the way an attacker on the host would: DIR/index.jsonl and the .npy
// files it names. Nothing else is available to the attacks.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace si::attack {

struct TraceEntry {
    uint64_t seq = 0;
    int layer = -1;
    std::string op, role, dtype, file;
    std::vector<int64_t> shape;
    int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
    int64_t cols() const { return shape.size() < 2 ? 1 : shape[1]; }
    int64_t count() const;
};

class TraceReader {
public:
    // Reads DIR/index.jsonl. Throws si::Error(io or format) naming the file.
    explicit TraceReader(const std::string& dir);
    const std::string& dir() const { return dir_; }
    const std::vector<TraceEntry>& entries() const { return entries_; }

    // A tensor as doubles: integers as their value (uint32 read as the signed int32 with the same bits when
    // as_signed, which is how a wrapped mod 2^32 product reads back), floats as they are.
    std::vector<double> load(const TraceEntry& e, bool as_signed = true) const;
    // The raw 32-bit words of an int32 / uint32 tensor. Throws for other dtypes.
    std::vector<uint32_t> load_u32(const TraceEntry& e) const;

private:
    std::string raw(const TraceEntry& e, size_t elem) const;
    std::string dir_;
    std::vector<TraceEntry> entries_;
};

}  // namespace si::attack
