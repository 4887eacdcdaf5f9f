// Float matrix kernel in "dot-product form": weights and activations are row-major along K, so every output is a
// dot product of a weight row with an activation row. Tiles of 4 weight rows x 4 tokens keep 16 accumulators in
// registers; decode (T = 1) streams each weight row exactly once.
#include "common/matmul.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <vector>

#include "common/threadpool.h"

#if defined(__AVX512F__)
// GCC 12 warns about the undefined-upper-half idiom inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace si {

namespace {

constexpr int64_t kRowBlock = 16;  // rows per parallel work item

void run_rows(ThreadPool* pool, int64_t N, const std::function<void(int64_t, int64_t)>& fn) {
    if (pool)
        pool->parallel_for(N, kRowBlock, fn);
    else
        fn(0, N);
}

#if defined(__AVX512F__)
inline __mmask16 tail_mask16(int64_t rem) { return rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1); }

// out[r][t] = dot(W[n0 + r], X[t]) for R rows x C tokens (R, C <= 4).
template <int R, int C>
inline void dot_tile_f32(const float* W, int64_t K, const float* X, int64_t n0, int64_t t0, int64_t N, float* Y) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = tail_mask16(K - k);
        __m512 x[C];
        for (int c = 0; c < C; ++c) x[c] = _mm512_maskz_loadu_ps(m, X + (t0 + c) * K + k);
        for (int r = 0; r < R; ++r) {
            const __m512 w = _mm512_maskz_loadu_ps(m, W + (n0 + r) * K + k);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(w, x[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) Y[(t0 + c) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][c]);
}
#endif

template <int R, int C>
inline void dot_tile_f32_scalar(const float* W, int64_t K, const float* X, int64_t n0, int64_t t0, int64_t N, float* Y) {
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            const float* w = W + (n0 + r) * K;
            const float* x = X + (t0 + c) * K;
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += w[k] * x[k];
            Y[(t0 + c) * N + n0 + r] = s;
        }
}


#if defined(__AVX512F__)
#define SI_F32_TILE dot_tile_f32
#else
#define SI_F32_TILE dot_tile_f32_scalar
#endif

void f32_rows(const float* W, int64_t N, int64_t K, const float* X, int64_t T, float* Y, int64_t n_begin, int64_t n_end) {
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t tc = std::min<int64_t>(4, T - t0);
        int64_t n = n_begin;
        for (; n + 4 <= n_end; n += 4) {
            switch (tc) {
                case 4: SI_F32_TILE<4, 4>(W, K, X, n, t0, N, Y); break;
                case 3: SI_F32_TILE<4, 3>(W, K, X, n, t0, N, Y); break;
                case 2: SI_F32_TILE<4, 2>(W, K, X, n, t0, N, Y); break;
                default: SI_F32_TILE<4, 1>(W, K, X, n, t0, N, Y); break;
            }
        }
        for (; n < n_end; ++n) {
            switch (tc) {
                case 4: SI_F32_TILE<1, 4>(W, K, X, n, t0, N, Y); break;
                case 3: SI_F32_TILE<1, 3>(W, K, X, n, t0, N, Y); break;
                case 2: SI_F32_TILE<1, 2>(W, K, X, n, t0, N, Y); break;
                default: SI_F32_TILE<1, 1>(W, K, X, n, t0, N, Y); break;
            }
        }
    }
}

// Token blocks of this many rows keep a block of weight rows hot in L1/L2 while every token of the block uses them.
constexpr int64_t kTokenBlock = 64;

}  // namespace

void matmul_f32(ThreadPool* pool, const float* W, int64_t N, int64_t K, const float* X, int64_t T, float* Y) {
    for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
        const int64_t tb = std::min(kTokenBlock, T - t0);
        run_rows(pool, N, [&](int64_t b, int64_t e) { f32_rows(W, N, K, X + t0 * K, tb, Y + t0 * N, b, e); });
    }
}

void quantize_rows_i8(const float* W, int64_t rows, int64_t cols, int8_t* q, float* scale, int32_t* rowsum) {
    constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to nearest, ties to even
    for (int64_t r = 0; r < rows; ++r) {
        const float* w = W + r * cols;
        int8_t* qr = q + r * cols;
        // max |w| over the row, NaNs skipped, as the largest magnitude bit pattern (for non-negative floats the
        // bit order is the numeric order): integer reductions vectorise where a float one does not.
        uint32_t amax_bits = 0, nonfinite = 0;
        for (int64_t c = 0; c < cols; ++c) {
            uint32_t b;
            std::memcpy(&b, w + c, 4);
            b &= 0x7fffffffu;
            nonfinite |= uint32_t(b >= 0x7f800000u);
            b &= 0u - uint32_t(b <= 0x7f800000u);  // NaN -> 0
            amax_bits = b > amax_bits ? b : amax_bits;
        }
        float amax;
        std::memcpy(&amax, &amax_bits, 4);
        const float s = amax / 127.0f;
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        int32_t sum = 0;
        if (!nonfinite) {
            for (int64_t c = 0; c < cols; ++c) {
                float v = w[c] * inv;  // round to nearest even, clamped to [-127, 127]
                v = v > 127.0f ? 127.0f : v;
                v = v < -127.0f ? -127.0f : v;
                const int32_t iv = int32_t((v + kRoundMagic) - kRoundMagic);
                qr[c] = int8_t(iv);
                sum += iv;
            }
        } else {
            // a row with infinities or NaNs (a broken model; it still loads): the same rounding, NaN -> 0
            for (int64_t c = 0; c < cols; ++c) {
                const float v = w[c] * inv;
                const int32_t iv = v == v ? std::clamp(int32_t(std::lrintf(std::clamp(v, -127.0f, 127.0f))), -127, 127) : 0;
                qr[c] = int8_t(iv);
                sum += iv;
            }
        }
        scale[r] = s;
        if (rowsum) rowsum[r] = sum;
    }
}

}  // namespace si

namespace si {

namespace {

constexpr int64_t kF32Block = 16;

// RB blocks of 16 rows x C tokens; accumulators acc[r][c] hold 16 outputs each.
template <int RB, int C>
inline void f32_packed_tile(const PackedF32& W, const float* X, int64_t nb, int64_t t0, float* Y) {
    const int64_t K = W.cols, N = W.rows;
#if defined(__AVX512F__)
    __m512 acc[RB][C];
    for (int r = 0; r < RB; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const float* wb[RB];
    for (int r = 0; r < RB; ++r) wb[r] = W.data.data() + (nb + r) * kF32Block * K;
    for (int64_t k = 0; k < K; ++k) {
        __m512 w[RB];
        for (int r = 0; r < RB; ++r) w[r] = _mm512_loadu_ps(wb[r] + k * kF32Block);
        for (int c = 0; c < C; ++c) {
            const __m512 x = _mm512_set1_ps(X[(t0 + c) * K + k]);
            for (int r = 0; r < RB; ++r) acc[r][c] = _mm512_fmadd_ps(w[r], x, acc[r][c]);
        }
    }
    for (int r = 0; r < RB; ++r) {
        const int64_t n0 = (nb + r) * kF32Block;
        const int64_t valid = std::min<int64_t>(kF32Block, N - n0);
        const __mmask16 m = __mmask16((1u << valid) - 1);
        for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(Y + (t0 + c) * N + n0, m, acc[r][c]);
    }
#else
    for (int r = 0; r < RB; ++r) {
        const int64_t n0 = (nb + r) * kF32Block;
        const float* wb = W.data.data() + (nb + r) * kF32Block * K;
        for (int c = 0; c < C; ++c)
            for (int64_t i = 0; i < kF32Block && n0 + i < N; ++i) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; ++k) s = std::fma(wb[k * kF32Block + i], X[(t0 + c) * K + k], s);
                Y[(t0 + c) * N + n0 + i] = s;
            }
    }
#endif
}

template <int RB, int C>
void f32_packed_blocks(const PackedF32& W, const float* X, int64_t T, float* Y, int64_t b, int64_t e) {
    int64_t nb = b;
    for (; nb + RB <= e; nb += RB) {
        int64_t t = 0;
        for (; t + C <= T; t += C) f32_packed_tile<RB, C>(W, X, nb, t, Y);
        for (; t < T; ++t) f32_packed_tile<RB, 1>(W, X, nb, t, Y);
    }
    for (; nb < e; ++nb) {
        int64_t t = 0;
        for (; t + C <= T; t += C) f32_packed_tile<1, C>(W, X, nb, t, Y);
        for (; t < T; ++t) f32_packed_tile<1, 1>(W, X, nb, t, Y);
    }
}

}  // namespace

PackedF32 PackedF32::pack(const float* W, int64_t rows, int64_t cols) {
    PackedF32 p;
    p.rows = rows;
    p.cols = cols;
    const int64_t blocks = (rows + kF32Block - 1) / kF32Block;
    p.data.assign(size_t(blocks * kF32Block * cols), 0.0f);
    for (int64_t n = 0; n < rows; ++n)
        for (int64_t k = 0; k < cols; ++k)
            p.data[size_t((n / kF32Block) * kF32Block * cols + k * kF32Block + n % kF32Block)] = W[n * cols + k];
    return p;
}

void matmul_f32_packed(ThreadPool* pool, const PackedF32& W, const float* X, int64_t T, float* Y) {
    const int64_t blocks = (W.rows + kF32Block - 1) / kF32Block;
    for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
        const int64_t tb = std::min(kTokenBlock, T - t0);
        const float* Xb = X + t0 * W.cols;
        float* Yb = Y + t0 * W.rows;
        auto body = [&](int64_t b, int64_t e) {
            if (tb == 1)
                f32_packed_blocks<4, 1>(W, Xb, tb, Yb, b, e);  // decode: four independent accumulate chains
            else
                f32_packed_blocks<2, 6>(W, Xb, tb, Yb, b, e);
        };
        if (pool)
            pool->parallel_for(blocks, 2, body);
        else
            body(0, blocks);
    }
}

}  // namespace si
