// Exact integer products of int8 weights with activations split into unsigned byte planes, on a weight layout
// packed for VNNI (vpdpbusd: 4 u8 x s8 products summed into each int32 lane). One kernel family serves:
//   gemm_i8      int8 activations              -> int32, exact                (plaintext int8 engine)
//   gemm_i16     activations of <= 16 bits      -> int32, exact when |W x| < 2^31 (gpu-only / enclave-only)
//   gemm_masked  u32 activations (masked)       -> u32, exact mod 2^32          (secureinfer offload)
// Every output element is computed from whole-row sums, so results do not depend on threads or tiling.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/secret_memory.h"

namespace si {

class ThreadPool;

// W [rows][cols] int8 in blocks of 16 rows; within a block, for every 4 consecutive columns k..k+3, 16 x 4 bytes
// (row-major over the 16 rows). Rows are padded to 16 and columns to 4 with zeros.
// A secret matrix (a fine-tuned weight inside the trusted core) is packed into secret memory, a public one into
// ordinary memory.
struct PackedI8 {
    int64_t rows = 0, cols = 0;
    int64_t cols4 = 0;  // cols rounded up to 4
    MaybeSecretVector<int8_t> data;     // [rows/16][cols4/4][16][4]
    MaybeSecretVector<int32_t> rowsum;  // sum_k W[n][k], padded rows 0

    static PackedI8 pack(const int8_t* W, int64_t rows, int64_t cols, bool secret = false);
    size_t bytes() const { return data.size() + rowsum.size() * 4; }
    // Row n, column k of the original matrix (for references and tests).
    int8_t at(int64_t n, int64_t k) const;
};

// Y[t][n] = sum_k W[n][k] X[t][k]
void gemm_i8(ThreadPool* pool, const PackedI8& W, const int8_t* X, int64_t T, int32_t* Y);
// X values must lie in [-32768, 32767].
void gemm_i16(ThreadPool* pool, const PackedI8& W, const int32_t* X, int64_t T, int32_t* Y);
// Y = W X mod 2^32
void gemm_masked(ThreadPool* pool, const PackedI8& W, const uint32_t* X, int64_t T, uint32_t* Y);

}  // namespace si
