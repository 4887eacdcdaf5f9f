#include "common/qgemm.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "common/error.h"
#include "common/secret_memory.h"
#include "common/threadpool.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define SI_QGEMM_VNNI 1
#endif

namespace si {

namespace {

constexpr int64_t kBlock = 16;  // rows per packed block = int32 lanes of a zmm register

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Byte planes of the activations: plane p of token t at planes + (p * T + t) * cols4. Padding columns hold zero.
// Inside the trusted core these are unmasked activations or pads: secret memory, wiped when released.
struct Planes {
    SecretVector<uint8_t> data;
    int64_t T = 0, cols4 = 0;
    const uint8_t* plane(int p, int64_t t) const { return data.data() + (p * T + t) * cols4; }
};

// Planes recombine as Y = sum_p acc_p << 8p (mod 2^32), minus 128 * rowsum on the top plane when it held a signed
// byte shifted by +128 (wrap-around arithmetic is a ring homomorphism, so this is exact mod 2^32).

#if SI_QGEMM_VNNI
inline __m512i shift_plane(__m512i a, int p) {
    switch (p) {
        case 0: return a;
        case 1: return _mm512_slli_epi32(a, 8);
        case 2: return _mm512_slli_epi32(a, 16);
        default: return _mm512_slli_epi32(a, 24);
    }
}
#endif

template <int P, int RB, int C>
void kernel_tile(const PackedI8& W, const Planes& X, int64_t nb, int64_t t0, bool top_signed, uint32_t* Y, int64_t ldy) {
    const int64_t kq_n = W.cols4 / 4;
#if SI_QGEMM_VNNI
    __m512i acc[P][RB][C];
    for (int p = 0; p < P; ++p)
        for (int r = 0; r < RB; ++r)
            for (int c = 0; c < C; ++c) acc[p][r][c] = _mm512_setzero_si512();
    const int8_t* wb[RB];
    for (int r = 0; r < RB; ++r) wb[r] = W.data.data() + (nb + r) * kBlock * W.cols4;
    const uint8_t* xp[P][C];
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < C; ++c) xp[p][c] = X.plane(p, t0 + c);
    for (int64_t kq = 0; kq < kq_n; ++kq) {
        __m512i w[RB];
        for (int r = 0; r < RB; ++r) w[r] = _mm512_loadu_si512(wb[r] + kq * 64);
        for (int p = 0; p < P; ++p)
            for (int c = 0; c < C; ++c) {
                int32_t q;
                std::memcpy(&q, xp[p][c] + kq * 4, 4);
                const __m512i x = _mm512_set1_epi32(q);
                for (int r = 0; r < RB; ++r) acc[p][r][c] = _mm512_dpbusd_epi32(acc[p][r][c], x, w[r]);
            }
    }
    for (int r = 0; r < RB; ++r) {
        const int64_t n0 = (nb + r) * kBlock;
        const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(W.rowsum.data() + n0), 7);  // 128 * rowsum
        const int64_t valid = std::min<int64_t>(kBlock, W.rows - n0);
        const __mmask16 m = __mmask16((1u << valid) - 1);
        for (int c = 0; c < C; ++c) {
            __m512i y = _mm512_setzero_si512();
            for (int p = 0; p < P; ++p) {
                __m512i a = acc[p][r][c];
                if (p == P - 1 && top_signed) a = _mm512_sub_epi32(a, corr);
                y = _mm512_add_epi32(y, shift_plane(a, p));
            }
            _mm512_mask_storeu_epi32(Y + (t0 + c) * ldy + n0, m, y);
        }
    }
#else
    for (int r = 0; r < RB; ++r) {
        const int64_t n0 = (nb + r) * kBlock;
        const int8_t* wb = W.data.data() + (nb + r) * kBlock * W.cols4;
        for (int c = 0; c < C; ++c)
            for (int64_t i = 0; i < kBlock && n0 + i < W.rows; ++i) {
                uint32_t y = 0;
                for (int p = 0; p < P; ++p) {
                    const uint8_t* x = X.plane(p, t0 + c);
                    int32_t a = 0;
                    for (int64_t kq = 0; kq < kq_n; ++kq)
                        for (int j = 0; j < 4; ++j) a += int32_t(x[kq * 4 + j]) * int32_t(wb[kq * 64 + i * 4 + j]);
                    if (p == P - 1 && top_signed) a -= 128 * W.rowsum[size_t(n0 + i)];
                    y += uint32_t(a) << (8 * p);
                }
                Y[(t0 + c) * ldy + n0 + i] = y;
            }
    }
#endif
}

// Token tiles of C columns over the row blocks [nb_begin, nb_end) and tokens [t_begin, t_end), RB blocks at a time.
template <int P, int RB, int C>
void run_blocks(const PackedI8& W, const Planes& X, int64_t t_begin, int64_t t_end, bool top_signed, uint32_t* Y,
                int64_t nb_begin, int64_t nb_end) {
    int64_t nb = nb_begin;
    for (; nb + RB <= nb_end; nb += RB) {
        int64_t t = t_begin;
        for (; t + C <= t_end; t += C) kernel_tile<P, RB, C>(W, X, nb, t, top_signed, Y, W.rows);
        for (; t < t_end; ++t) kernel_tile<P, RB, 1>(W, X, nb, t, top_signed, Y, W.rows);
    }
    for (; nb < nb_end; ++nb) {
        int64_t t = t_begin;
        for (; t + C <= t_end; t += C) kernel_tile<P, 1, C>(W, X, nb, t, top_signed, Y, W.rows);
        for (; t < t_end; ++t) kernel_tile<P, 1, 1>(W, X, nb, t, top_signed, Y, W.rows);
    }
}

// Multi-token products run as (row chunk, token tile) tasks. A tile's planes (P * tile * K bytes) stay in L2 while
// its row chunks sweep them; short-and-wide products split their tokens further so that a pool of any size (the
// trusted core does not know how many threads its platform lends it) gets at least kMinTasks tasks.
constexpr int64_t kRowBlocksPerTask = 4;
constexpr int64_t kMaxTokenTile = 64;
constexpr int64_t kMinTasks = 64;

int64_t token_tile(int64_t T, int64_t n_row_chunks) {
    int64_t tiles = (T + kMaxTokenTile - 1) / kMaxTokenTile;
    if (n_row_chunks * tiles < kMinTasks) tiles = std::min((T + 7) / 8, (kMinTasks + n_row_chunks - 1) / n_row_chunks);
    return round_up((T + tiles - 1) / tiles, 8);
}

template <int P>
void gemm_planes(ThreadPool* pool, const PackedI8& W, const Planes& X, int64_t T, bool top_signed, uint32_t* Y) {
    const int64_t n_blocks = round_up(W.rows, kBlock) / kBlock;
    if (T == 1) {
        // decode: more row blocks in flight to hide the accumulate latency
        auto body = [&](int64_t b, int64_t e) { run_blocks<P, (P >= 4 ? 2 : 4), 1>(W, X, 0, 1, top_signed, Y, b, e); };
        if (pool)
            pool->parallel_for(n_blocks, kRowBlocksPerTask, body);
        else
            body(0, n_blocks);
        return;
    }
    // Tasks are (row chunk, token tile) pairs, row chunks outermost so that neighbouring tasks share weights.
    const int64_t n_row_chunks = (n_blocks + kRowBlocksPerTask - 1) / kRowBlocksPerTask;
    const int64_t tile = token_tile(T, n_row_chunks), n_token_tiles = (T + tile - 1) / tile;
    auto body = [&](int64_t task_begin, int64_t task_end) {
        for (int64_t task = task_begin; task < task_end; ++task) {
            const int64_t b = task / n_token_tiles * kRowBlocksPerTask, e = std::min(n_blocks, b + kRowBlocksPerTask);
            const int64_t t0 = task % n_token_tiles * tile, t1 = std::min(T, t0 + tile);
            if constexpr (P == 1)
                run_blocks<1, 2, 8>(W, X, t0, t1, top_signed, Y, b, e);
            else if constexpr (P == 2)
                run_blocks<2, 2, 4>(W, X, t0, t1, top_signed, Y, b, e);
            else
                run_blocks<P, 2, 2>(W, X, t0, t1, top_signed, Y, b, e);
        }
    };
    if (pool)
        pool->parallel_for(n_row_chunks * n_token_tiles, 1, body);
    else
        body(0, n_row_chunks * n_token_tiles);
}

Planes make_planes(int P, int64_t T, int64_t cols, int64_t cols4) {
    Planes X;
    X.T = T;
    X.cols4 = cols4;
    X.data.assign(size_t(P * T * cols4), 0);
    return X;
}

}  // namespace

PackedI8 PackedI8::pack(const int8_t* W, int64_t rows, int64_t cols, bool secret) {
    if (rows <= 0 || cols <= 0) fail(Status::invalid_argument, "PackedI8: empty matrix");
    PackedI8 p;
    p.data = decltype(p.data)(MaybeSecretAllocator<int8_t>(secret));
    p.rowsum = decltype(p.rowsum)(MaybeSecretAllocator<int32_t>(secret));
    p.rows = rows;
    p.cols = cols;
    p.cols4 = round_up(cols, 4);
    const int64_t rows16 = round_up(rows, kBlock);
    p.data.assign(size_t(rows16 * p.cols4), 0);
    p.rowsum.assign(size_t(rows16), 0);
    for (int64_t n = 0; n < rows; ++n) {
        int32_t s = 0;
        for (int64_t k = 0; k < cols; ++k) {
            const int8_t v = W[n * cols + k];
            p.data[size_t((n / kBlock) * kBlock * p.cols4 + (k / 4) * 64 + (n % kBlock) * 4 + k % 4)] = v;
            s += v;
        }
        p.rowsum[size_t(n)] = s;
    }
    return p;
}

int8_t PackedI8::at(int64_t n, int64_t k) const {
    return data[size_t((n / kBlock) * kBlock * cols4 + (k / 4) * 64 + (n % kBlock) * 4 + k % 4)];
}

void gemm_i8(ThreadPool* pool, const PackedI8& W, const int8_t* X, int64_t T, int32_t* Y) {
    Planes P = make_planes(1, T, W.cols, W.cols4);
    for (int64_t t = 0; t < T; ++t) {
        uint8_t* d = P.data.data() + t * W.cols4;
        for (int64_t k = 0; k < W.cols; ++k) d[k] = uint8_t(int32_t(X[t * W.cols + k]) + 128);
    }
    gemm_planes<1>(pool, W, P, T, true, reinterpret_cast<uint32_t*>(Y));
}

void gemm_i16(ThreadPool* pool, const PackedI8& W, const int32_t* X, int64_t T, int32_t* Y) {
    Planes P = make_planes(2, T, W.cols, W.cols4);
    for (int64_t t = 0; t < T; ++t) {
        uint8_t* lo = P.data.data() + t * W.cols4;
        uint8_t* hi = P.data.data() + (T + t) * W.cols4;
        for (int64_t k = 0; k < W.cols; ++k) {
            const int32_t x = X[t * W.cols + k];
            lo[k] = uint8_t(x & 0xff);
            hi[k] = uint8_t((x >> 8) + 128);  // signed high byte, shifted into [0, 255]
        }
    }
    gemm_planes<2>(pool, W, P, T, true, reinterpret_cast<uint32_t*>(Y));
}

void gemm_masked(ThreadPool* pool, const PackedI8& W, const uint32_t* X, int64_t T, uint32_t* Y) {
    Planes P = make_planes(4, T, W.cols, W.cols4);
    for (int p = 0; p < 4; ++p)
        for (int64_t t = 0; t < T; ++t) {
            uint8_t* d = P.data.data() + (p * T + t) * W.cols4;
            const uint32_t* x = X + t * W.cols;
            for (int64_t k = 0; k < W.cols; ++k) d[k] = uint8_t(x[k] >> (8 * p));
        }
    gemm_planes<4>(pool, W, P, T, false, Y);
}

}  // namespace si
