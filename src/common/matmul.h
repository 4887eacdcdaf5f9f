// Float matrix products of the plaintext engine (integer products: qgemm.h): weights row-major [N][K] ("out x in"), activations row-major [T][K],
// results row-major [T][N]. Every entry point parallelises over output rows on the given pool (nullptr: inline).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace si {

class ThreadPool;

// Y[t][n] = sum_k W[n][k] * X[t][k]   (f32)
void matmul_f32(ThreadPool* pool, const float* W, int64_t N, int64_t K, const float* X, int64_t T, float* Y);

// Per-row symmetric int8 quantisation of a [rows][cols] matrix: q = round(w / scale), scale = max|w| / 127.
void quantize_rows_i8(const float* W, int64_t rows, int64_t cols, int8_t* q, float* scale, int32_t* rowsum);

}  // namespace si

namespace si {

// W [rows][cols] f32 in blocks of 16 rows stored column by column ([rows/16][cols][16], rows padded with zeros), so
// a vector load gives one column of 16 rows and products need no horizontal sums. For the engine's weights, which
// are multiplied many times.
struct PackedF32 {
    int64_t rows = 0, cols = 0;
    std::vector<float> data;
    static PackedF32 pack(const float* W, int64_t rows, int64_t cols);
    size_t bytes() const { return data.size() * sizeof(float); }
};

// Y[t][n] = sum_k W[n][k] * X[t][k], summed over k in order (results do not depend on threads or tiling).
void matmul_f32_packed(ThreadPool* pool, const PackedF32& W, const float* X, int64_t T, float* Y);

}  // namespace si
