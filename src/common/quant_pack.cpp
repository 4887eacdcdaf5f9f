// Weight rows interleaved in groups of 16 for the AVX-512 VNNI kernels (layout in quant_dot.h). Compiled with
// -ffp-contract=off (CMakeLists.txt), as is quant_dot.cpp: each row's float operations are the scalar reference's,
// in its order, so the results are equal bit for bit.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "common/quant_dot.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SI_QPACK_AVX512 1
#include <immintrin.h>
// GCC 12 reports the undefined source vectors inside the AVX-512 conversion intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define SI_QPACK_AVX512 0
#endif

namespace si::qdot {

namespace {

// Bytes per group of 16 rows and one block (super-block for q6_k): quants, then scales.
size_t quant_bytes(WType t) {
    switch (t) {
        case WType::q4_0: return 256;
        case WType::q8_0: return 512;
        case WType::q4_k: return 2048;
        case WType::q6_k: return 3072;
    }
    return 0;
}
size_t scale_bytes(WType t) { return t == WType::q6_k ? 32 + 256 : t == WType::q4_k ? 32 + 32 + 192 : 32; }

// The 256 six-bit values (0..63) of a Q6_K super-block, element order.
void q6_k_values(const uint8_t* w, uint8_t v[256]) {
    const uint8_t* ql = w;
    const uint8_t* qh = w + 128;
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t lo0 = ql[64 * h + l], lo1 = ql[64 * h + l + 32], hb = qh[32 * h + l];
            v[128 * h + l] = uint8_t((lo0 & 0xF) | ((hb & 3) << 4));
            v[128 * h + l + 32] = uint8_t((lo1 & 0xF) | (((hb >> 2) & 3) << 4));
            v[128 * h + l + 64] = uint8_t((lo0 >> 4) | (((hb >> 4) & 3) << 4));
            v[128 * h + l + 96] = uint8_t((lo1 >> 4) | (((hb >> 6) & 3) << 4));
        }
}

}  // namespace

bool has_packed(WType) { return SI_QPACK_AVX512; }

void Packed::Free::operator()(uint8_t* p) const { std::free(p); }

Packed::Packed(WType t, const uint8_t* src, int64_t rows, int64_t cols, size_t row_bytes)
    : type_(t), rows_(rows), cols_(cols) {
    const int64_t be = block_elems(t);
    if (rows <= 0 || cols <= 0 || cols % be != 0 || row_bytes != size_t(cols / be) * block_bytes(t))
        fail(Status::internal, "interleaved packing: bad matrix shape");
    const int64_t nb = cols / be;
    const size_t qb = quant_bytes(t), sb = scale_bytes(t);
    group_bytes_ = (size_t(nb) * (qb + sb) + 63) / 64 * 64;  // every group 64-byte aligned
    const size_t total = size_t(groups()) * group_bytes_;
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, total)));
    if (!data_) fail(Status::out_of_memory, "out of memory packing a matrix");
    std::memset(data_.get(), 0, total);
    for (int64_t g = 0; g < groups(); ++g) {
        uint8_t* quants = data_.get() + size_t(g) * group_bytes_;
        uint8_t* scales = quants + size_t(nb) * qb;
        for (int r = 0; r < kGroupRows; ++r) {
            const int64_t row = g * kGroupRows + r;
            if (row >= rows) break;  // padding stays zero: zero scales, zero products
            const uint8_t* w = src + size_t(row) * row_bytes;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* blk = w + size_t(b) * block_bytes(t);
                uint8_t* qd = quants + size_t(b) * qb;
                uint8_t* sd = scales + size_t(b) * sb;
                if (t == WType::q4_0) {
                    std::memcpy(sd + 2 * r, blk, 2);
                    for (int j = 0; j < 4; ++j) std::memcpy(qd + 64 * j + 4 * r, blk + 2 + 4 * j, 4);
                } else if (t == WType::q8_0) {
                    std::memcpy(sd + 2 * r, blk, 2);
                    for (int j = 0; j < 8; ++j)
                        for (int i = 0; i < 4; ++i) qd[64 * j + 4 * r + i] = uint8_t(blk[2 + 4 * j + i] ^ 0x80);
                } else if (t == WType::q4_k) {
                    std::memcpy(sd + 2 * r, blk, 2);
                    std::memcpy(sd + 32 + 2 * r, blk + 2, 2);
                    for (int k = 0; k < 12; ++k) sd[64 + 16 * k + r] = blk[4 + k];
                    for (int j = 0; j < 4; ++j)
                        for (int k = 0; k < 8; ++k) std::memcpy(qd + 512 * j + 64 * k + 4 * r, blk + 16 + 32 * j + 4 * k, 4);
                } else {
                    uint8_t v[256];
                    q6_k_values(blk, v);
                    std::memcpy(sd + 2 * r, blk + 208, 2);
                    for (int s = 0; s < 16; ++s) {
                        sd[32 + 16 * s + r] = blk[192 + s];
                        const uint8_t* e = v + 16 * s;
                        uint8_t* o = qd + 192 * s + 4 * r;
                        for (int i = 0; i < 4; ++i) {
                            o[i] = uint8_t((e[i] & 0xF) | ((e[4 + i] & 0xF) << 4));
                            o[64 + i] = uint8_t((e[8 + i] & 0xF) | ((e[12 + i] & 0xF) << 4));
                            o[128 + i] = uint8_t((e[i] >> 4) | ((e[4 + i] >> 4) << 2) | ((e[8 + i] >> 4) << 4) |
                                                 ((e[12 + i] >> 4) << 6));
                        }
                    }
                }
            }
        }
    }
}

#if SI_QPACK_AVX512
namespace {

inline __m512i bcast4(const int8_t* x) {
    int32_t v;
    std::memcpy(&v, x, 4);
    return _mm512_set1_epi32(v);
}
inline __m512 scales16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i ld(const uint8_t* p) { return _mm512_load_si512(p); }
// Decoding streams every matrix from memory once per token: the quants are prefetched this far ahead of their use
// (the groups of a thread's rows lie back to back), which measured faster than the hardware prefetcher alone.
constexpr size_t kPrefetchAhead = 2048;
inline void prefetch(const uint8_t* p, int lines) {
    for (int i = 0; i < lines; ++i) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + 64 * i), _MM_HINT_T0);
}
constexpr int kOr_AndBC = 0xF8;  // ternary logic: a | (b & c)

// One group of 16 rows times NT tokens. Per row and token, the block's exact integer, then
// acc = acc + (float(int) * scale_w) * scale_x, as the reference does.
template <int NT>
void q4_0_group(const uint8_t* grp, int64_t nb, const int8_t* q, const float* d, const int16_t* s, int64_t cols,
                float* Y, int64_t ldy, __mmask16 m) {
    const uint8_t* scl = grp + size_t(nb) * 256;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qb = grp + size_t(b) * 256;
        prefetch(qb, 4);
        __m512i w[8];
        for (int j = 0; j < 4; ++j) {
            const __m512i v = ld(qb + 64 * j);
            w[j] = _mm512_and_si512(v, low);
            w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        const __m512 dw = scales16(scl + 32 * b);
        for (int t = 0; t < NT; ++t) {
            const int8_t* x = q + t * cols + 32 * b;
            __m512i ia = _mm512_set1_epi32(-8 * int32_t(s[t * nb + b])), ib = _mm512_setzero_si512();
            for (int j = 0; j < 4; ++j) {
                ia = _mm512_dpbusd_epi32(ia, w[j], bcast4(x + 4 * j));
                ib = _mm512_dpbusd_epi32(ib, w[4 + j], bcast4(x + 16 + 4 * j));
            }
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib)), dw);
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(f, _mm512_set1_ps(d[t * nb + b])));
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(Y + t * ldy, m, acc[t]);
}

template <int NT>
void q8_0_group(const uint8_t* grp, int64_t nb, const int8_t* q, const float* d, const int16_t* s, int64_t cols,
                float* Y, int64_t ldy, __mmask16 m) {
    const uint8_t* scl = grp + size_t(nb) * 512;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qb = grp + size_t(b) * 512;
        prefetch(qb, 8);
        const __m512 dw = scales16(scl + 32 * b);
        for (int t = 0; t < NT; ++t) {
            const int8_t* x = q + t * cols + 32 * b;
            __m512i ia = _mm512_set1_epi32(-128 * int32_t(s[t * nb + b])), ib = _mm512_setzero_si512();
            for (int j = 0; j < 4; ++j) {
                ia = _mm512_dpbusd_epi32(ia, ld(qb + 64 * j), bcast4(x + 4 * j));
                ib = _mm512_dpbusd_epi32(ib, ld(qb + 256 + 64 * j), bcast4(x + 16 + 4 * j));
            }
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib)), dw);
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(f, _mm512_set1_ps(d[t * nb + b])));
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(Y + t * ldy, m, acc[t]);
}

// Q6_K: per sub-block of 16 elements the exact sum of (q - 32) x (the -32 through the activations' sums of 16),
// times the row's sub-block scale, summed over the super-block in int32; then (scale_x * scale_w) * float(sum).
template <int NT>
void q6_k_group(const uint8_t* grp, int64_t nsb, const int8_t* q, const float* d, const int16_t* bsums, int64_t cols,
                float* Y, int64_t ldy, __mmask16 m) {
    const uint8_t* scl = grp + size_t(nsb) * 3072;
    const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; ++b) {
        const uint8_t* qb = grp + size_t(b) * 3072;
        const uint8_t* sb = scl + size_t(b) * 288;
        __m512i tot[NT];
        for (int t = 0; t < NT; ++t) tot[t] = _mm512_setzero_si512();
        for (int s = 0; s < 16; ++s) {
            prefetch(qb + 192 * s, 3);
            const __m512i l0 = ld(qb + 192 * s), l1 = ld(qb + 192 * s + 64), h = ld(qb + 192 * s + 128);
            const __m512i v0 = _mm512_ternarylogic_epi32(_mm512_and_si512(l0, low), _mm512_slli_epi16(h, 4), top, kOr_AndBC);
            const __m512i v1 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(l0, 4), low),
                                                         _mm512_slli_epi16(h, 2), top, kOr_AndBC);
            const __m512i v2 = _mm512_ternarylogic_epi32(_mm512_and_si512(l1, low), h, top, kOr_AndBC);
            const __m512i v3 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(l1, 4), low),
                                                         _mm512_srli_epi16(h, 2), top, kOr_AndBC);
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(sb + 32 + 16 * s)));
            for (int t = 0; t < NT; ++t) {
                const int8_t* x = q + t * cols + 256 * b + 16 * s;
                __m512i ia = _mm512_set1_epi32(-32 * int32_t(bsums[t * (cols / 16) + 16 * b + s]));
                ia = _mm512_dpbusd_epi32(ia, v0, bcast4(x));
                ia = _mm512_dpbusd_epi32(ia, v1, bcast4(x + 4));
                ia = _mm512_dpbusd_epi32(ia, v2, bcast4(x + 8));
                ia = _mm512_dpbusd_epi32(ia, v3, bcast4(x + 12));
                tot[t] = _mm512_add_epi32(tot[t], _mm512_mullo_epi32(ia, sc));
            }
        }
        const __m512 dw = scales16(sb);
        for (int t = 0; t < NT; ++t) {
            const __m512 ds = _mm512_mul_ps(_mm512_set1_ps(d[t * nsb + b]), dw);
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(ds, _mm512_cvtepi32_ps(tot[t])));
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(Y + t * ldy, m, acc[t]);
}

// Q4_K: per pair of sub-blocks (2j, 2j+1) the exact nibble sums of both (low and high nibbles of the same bytes),
// times the rows' 6-bit scales, summed in int32; the mins' term sum_s m[s] (bsums[2s] + bsums[2s+1]) through
// vpdpwssd on pairs of 16-bit mins; then scale_x * (dmaj * float(sumi) - dmin * float(summ)) as the reference.
template <int NT>
void q4_k_group(const uint8_t* grp, int64_t nsb, const int8_t* q, const float* d, const int16_t* bsums, int64_t cols,
                float* Y, int64_t ldy, __mmask16 m) {
    const uint8_t* scl = grp + size_t(nsb) * 2048;
    const __m512i low = _mm512_set1_epi8(0x0F), six = _mm512_set1_epi32(63), nib = _mm512_set1_epi32(0x0F);
    constexpr int kSelectCAB = 0xE4;  // ternary logic: c ? a : b
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; ++b) {
        const uint8_t* qb = grp + size_t(b) * 2048;
        const uint8_t* sb = scl + size_t(b) * 256;
        // the 12 scale bytes of 16 rows, one 32-bit lane per row, decoded as ggml's get_scale_min_k4
        __m512i Q[12];
        for (int k = 0; k < 12; ++k)
            Q[k] = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(sb + 64 + 16 * k)));
        __m512i sc[8], mn[4];
        for (int j = 0; j < 4; ++j) {
            sc[j] = _mm512_and_si512(Q[j], six);
            sc[4 + j] = _mm512_ternarylogic_epi32(Q[8 + j], _mm512_srli_epi32(Q[j], 2), nib, kSelectCAB);
        }
        {
            __m512i mv[8];
            for (int j = 0; j < 4; ++j) {
                mv[j] = _mm512_and_si512(Q[4 + j], six);
                mv[4 + j] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(Q[8 + j], 4), _mm512_srli_epi32(Q[4 + j], 2), nib,
                                                      kSelectCAB);
            }
            for (int p = 0; p < 4; ++p) mn[p] = _mm512_or_si512(mv[2 * p], _mm512_slli_epi32(mv[2 * p + 1], 16));
        }
        __m512i sumi[NT], summ[NT];
        for (int t = 0; t < NT; ++t) {
            sumi[t] = _mm512_setzero_si512();
            summ[t] = _mm512_setzero_si512();
            const int16_t* bs = bsums + t * (cols / 16) + 16 * b;
            for (int p = 0; p < 4; ++p) {
                const int32_t lo = bs[4 * p] + bs[4 * p + 1], hi = bs[4 * p + 2] + bs[4 * p + 3];
                const int32_t both = int32_t((uint32_t(lo) & 0xFFFFu) | (uint32_t(hi) << 16));
                summ[t] = _mm512_dpwssd_epi32(summ[t], mn[p], _mm512_set1_epi32(both));
            }
        }
        for (int j = 0; j < 4; ++j) {
            __m512i lo[8], hi[8];
            prefetch(qb + 512 * j, 8);
            for (int k = 0; k < 8; ++k) {
                const __m512i v = ld(qb + 512 * j + 64 * k);
                lo[k] = _mm512_and_si512(v, low);
                hi[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int t = 0; t < NT; ++t) {
                const int8_t* x = q + t * cols + 256 * b + 64 * j;
                __m512i al = _mm512_setzero_si512(), ah = _mm512_setzero_si512();
                for (int k = 0; k < 8; ++k) {
                    al = _mm512_dpbusd_epi32(al, lo[k], bcast4(x + 4 * k));
                    ah = _mm512_dpbusd_epi32(ah, hi[k], bcast4(x + 32 + 4 * k));
                }
                sumi[t] = _mm512_add_epi32(sumi[t], _mm512_add_epi32(_mm512_mullo_epi32(al, sc[2 * j]),
                                                                     _mm512_mullo_epi32(ah, sc[2 * j + 1])));
            }
        }
        const __m512 dmaj = scales16(sb), dmin = scales16(sb + 32);
        for (int t = 0; t < NT; ++t) {
            const __m512 v = _mm512_sub_ps(_mm512_mul_ps(dmaj, _mm512_cvtepi32_ps(sumi[t])),
                                           _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(summ[t])));
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_set1_ps(d[t * nsb + b]), v));
        }
    }
    for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(Y + t * ldy, m, acc[t]);
}

using GroupFn = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const int16_t*, int64_t, float*, int64_t,
                         __mmask16);

template <int NT>
struct Q40 {
    static constexpr GroupFn fn = q4_0_group<NT>;
};
template <int NT>
struct Q80 {
    static constexpr GroupFn fn = q8_0_group<NT>;
};
template <int NT>
struct Q4K {
    static constexpr GroupFn fn = q4_k_group<NT>;
};
template <int NT>
struct Q6K {
    static constexpr GroupFn fn = q6_k_group<NT>;
};

template <template <int> class K>
constexpr GroupFn tiles[5] = {nullptr, K<1>::fn, K<2>::fn, K<3>::fn, K<4>::fn};

}  // namespace
#endif

void gemm_packed(const Packed& W, int64_t g0, int64_t g1, const int8_t* q, const float* d, const int16_t* sums,
                 int64_t T, float* Y, int64_t ldy) {
#if SI_QPACK_AVX512
    const WType t = W.type();
    const int64_t cols = W.cols(), nb = cols / block_elems(t);
    const GroupFn* fns = t == WType::q4_0   ? tiles<Q40>
                         : t == WType::q8_0 ? tiles<Q80>
                         : t == WType::q4_k ? tiles<Q4K>
                                            : tiles<Q6K>;
    const int64_t sum_stride = uses_q8k(t) ? cols / 16 : nb;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t r0 = g * kGroupRows;
        const int64_t live = std::min<int64_t>(kGroupRows, W.rows() - r0);
        const __mmask16 m = __mmask16((1u << live) - 1u);
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int nt = int(std::min<int64_t>(4, T - t0));
            fns[nt](W.group(g), nb, q + t0 * cols, d + t0 * nb, sums + t0 * sum_stride, cols, Y + t0 * ldy + r0, ldy, m);
        }
    }
#else
    (void)W, (void)g0, (void)g1, (void)q, (void)d, (void)sums, (void)T, (void)Y, (void)ldy;
    fail(Status::internal, "interleaved kernels are not built for this CPU (AVX-512 VNNI)");
#endif
}

}  // namespace si::qdot
