#include "train/gemm.h"

#include <algorithm>
#include <type_traits>

#if defined(__AVX512F__)
// GCC 12 warns about the undefined-upper-half idiom inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace si::train {

namespace {

constexpr int64_t kRows = 4;   // rows of C per tile
constexpr int64_t kCols = 32;  // columns of C per tile (two 16-float vectors)

// The reference form, used for double and where AVX-512 is absent.
template <class T>
void tile_generic(const T* A, int64_t k, const T* B, int64_t m, T* C, int64_t rows, int64_t m0, int64_t cols, bool acc) {
    for (int64_t r = 0; r < rows; ++r) {
        T c[kCols];
        for (int64_t j = 0; j < cols; ++j) c[j] = acc ? C[r * m + m0 + j] : T(0);
        for (int64_t q = 0; q < k; ++q) {
            const T a = A[r * k + q];
            const T* b = B + q * m + m0;
            for (int64_t j = 0; j < cols; ++j) c[j] += a * b[j];
        }
        for (int64_t j = 0; j < cols; ++j) C[r * m + m0 + j] = c[j];
    }
}

#if defined(__AVX512F__)
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// R rows x V vectors of C held in registers across the whole k loop.
template <int R, int V>
void tile_avx512(const float* A, int64_t k, const float* B, int64_t m, float* C, int64_t m0, int64_t cols, bool acc) {
    const __mmask16 mk[2] = {lanes(cols), lanes(cols - 16)};
    __m512 c[R][V];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v)
            c[r][v] = acc ? _mm512_maskz_loadu_ps(mk[v], C + r * m + m0 + 16 * v) : _mm512_setzero_ps();
    for (int64_t q = 0; q < k; ++q) {
        __m512 b[V];
        for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(mk[v], B + q * m + m0 + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(A[r * k + q]);
            for (int v = 0; v < V; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(C + r * m + m0 + 16 * v, mk[v], c[r][v]);
}

template <int R>
void tile_rows(const float* A, int64_t k, const float* B, int64_t m, float* C, int64_t m0, int64_t cols, bool acc) {
    if (cols > 16)
        tile_avx512<R, 2>(A, k, B, m, C, m0, cols, acc);
    else
        tile_avx512<R, 1>(A, k, B, m, C, m0, cols, acc);
}
#endif

template <class T>
void tile(const T* A, int64_t k, const T* B, int64_t m, T* C, int64_t rows, int64_t m0, int64_t cols, bool acc) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
        switch (rows) {
            case 4: tile_rows<4>(A, k, B, m, C, m0, cols, acc); return;
            case 3: tile_rows<3>(A, k, B, m, C, m0, cols, acc); return;
            case 2: tile_rows<2>(A, k, B, m, C, m0, cols, acc); return;
            default: tile_rows<1>(A, k, B, m, C, m0, cols, acc); return;
        }
    }
#endif
    tile_generic(A, k, B, m, C, rows, m0, cols, acc);
}

}  // namespace

template <class T>
void gemm(ThreadPool& pool, const T* A, int64_t n, int64_t k, const T* B, int64_t m, T* C, bool accumulate) {
    const int64_t row_blocks = (n + kRows - 1) / kRows;
    pool.parallel_for(row_blocks, 8, [&](int64_t b, int64_t e) {
        for (int64_t rb = b; rb < e; ++rb) {
            const int64_t r0 = rb * kRows, rows = std::min(kRows, n - r0);
            for (int64_t m0 = 0; m0 < m; m0 += kCols)
                tile(A + r0 * k, k, B, m, C + r0 * m, rows, m0, std::min(kCols, m - m0), accumulate);
        }
    });
}

template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, std::vector<T>& dst) {
    dst.resize(size_t(rows * cols));
    constexpr int64_t kB = 32;
    for (int64_t r0 = 0; r0 < rows; r0 += kB)
        for (int64_t c0 = 0; c0 < cols; c0 += kB) {
            const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t c = c0; c < c1; ++c) dst[size_t(c * rows + r)] = src[r * cols + c];
        }
}

template void gemm<float>(ThreadPool&, const float*, int64_t, int64_t, const float*, int64_t, float*, bool);
template void gemm<double>(ThreadPool&, const double*, int64_t, int64_t, const double*, int64_t, double*, bool);
template void transpose<float>(const float*, int64_t, int64_t, std::vector<float>&);
template void transpose<double>(const double*, int64_t, int64_t, std::vector<double>&);

}  // namespace si::train
