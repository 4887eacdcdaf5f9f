// Float matrix products of the plaintext engine (integer products: qgemm.h): weights row-major [N][K] ("out x in"), activations row-major [T][K],
// results row-major [T][N]. Every entry point parallelises over output rows on the given pool (nullptr: inline).
#pragma once
#include <cstdint>

namespace si {

class ThreadPool;

// Y[t][n] = sum_k W[n][k] * X[t][k]   (f32)
void matmul_f32(ThreadPool* pool, const float* W, int64_t N, int64_t K, const float* X, int64_t T, float* Y);

// Per-row symmetric int8 quantisation of a [rows][cols] matrix: q = round(w / scale), scale = max|w| / 127.
void quantize_rows_i8(const float* W, int64_t rows, int64_t cols, int8_t* q, float* scale, int32_t* rowsum);

}  // namespace si
