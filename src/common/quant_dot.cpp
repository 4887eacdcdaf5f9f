#include "common/quant_dot.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/fp16.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SI_QDOT_AVX2 1
#include <immintrin.h>
#else
#define SI_QDOT_AVX2 0
#endif

namespace si::qdot {

bool is_native(uint32_t t) {
    return t == uint32_t(WType::q4_0) || t == uint32_t(WType::q8_0) || t == uint32_t(WType::q4_k) ||
           t == uint32_t(WType::q6_k);
}

int64_t block_elems(WType t) { return uses_q8k(t) ? 256 : 32; }

size_t block_bytes(WType t) {
    switch (t) {
        case WType::q4_0: return 18;
        case WType::q8_0: return 34;
        case WType::q4_k: return 144;
        case WType::q6_k: return 210;
    }
    return 0;
}

namespace {

inline float half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#if SI_QDOT_AVX2
    return _cvtsh_ss(h);
#else
    return fp16_to_fp32(h);
#endif
}

// The eight 6-bit scales and mins of a Q4_K super-block (layout as in ggml's get_scale_min_k4).
inline void k4_scales(const uint8_t* q, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = q[j] & 63;
            m[j] = q[j + 4] & 63;
        } else {
            sc[j] = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
            m[j] = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
        }
    }
}

}  // namespace

// The scalar activation quantisers (ref::quantize_*, below with the other references) are what these compute.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
// GCC 12 reports the undefined source vectors inside the AVX-512 intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 32 or 256 values of one block: amax, then q = round-to-nearest-even(clamp(x * id)) as lrint in the default rounding
// mode; the same operations as the scalar loops below, so the same bytes.
namespace {
inline float amax16(const float* x, int n) {
    __m512 m = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    return _mm512_reduce_max_ps(m);
}
// q[0..15] from x[0..15]; returns their sum.
inline int quant16(const float* x, float id, int8_t* q) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(id)),
                                                 _mm512_set1_ps(-127.0f)),
                                   _mm512_set1_ps(127.0f));
    const __m512i i = _mm512_cvtps_epi32(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(i));
    return _mm512_reduce_add_epi32(i);
}
}  // namespace

void quantize_q8_0(const float* x, int64_t n, int8_t* q, float* d, int16_t* sums) {
    for (int64_t b = 0; b < n / 32; ++b) {
        const float* xb = x + b * 32;
        const float s = amax16(xb, 32) / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        sums[b] = int16_t(quant16(xb, id, q + b * 32) + quant16(xb + 16, id, q + b * 32 + 16));
    }
}

void quantize_q8_k(const float* x, int64_t n, int8_t* q, float* d, int16_t* bsums) {
    for (int64_t b = 0; b < n / 256; ++b) {
        const float* xb = x + b * 256;
        const float s = amax16(xb, 256) / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int g = 0; g < 16; ++g) bsums[b * 16 + g] = int16_t(quant16(xb + 16 * g, id, q + b * 256 + 16 * g));
    }
}
#else
void quantize_q8_0(const float* x, int64_t n, int8_t* q, float* d, int16_t* sums) { ref::quantize_q8_0(x, n, q, d, sums); }
void quantize_q8_k(const float* x, int64_t n, int8_t* q, float* d, int16_t* bsums) { ref::quantize_q8_k(x, n, q, d, bsums); }
#endif

void quantize_row_q8_0_weights(const float* x, int64_t n, uint8_t* out) {
    for (int64_t b = 0; b < n / 32; ++b) {
        const float* xb = x + b * 32;
        uint8_t* yb = out + b * 34;
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = fp32_to_fp16(d);
        std::memcpy(yb, &dh, 2);
        for (int j = 0; j < 32; ++j) yb[2 + j] = uint8_t(int8_t(std::clamp(std::round(xb[j] * id), -127.0f, 127.0f)));
    }
}

// ---- scalar references ----------------------------------------------------------------------------------------

namespace ref {

namespace {

// The references stay scalar: GCC 12 with -march=native (AVX-512 VNNI) vectorises the signed int8 x int8 loop of
// q8_0 into vpdpbusd-based code that returns wrong sums (caught by tests/test_quants.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#define SI_SCALAR __attribute__((optimize("no-tree-vectorize")))
#else
#define SI_SCALAR
#endif

SI_SCALAR void quantize_q8_0_impl(const float* x, int64_t n, int8_t* q, float* d, int16_t* sums) {
    for (int64_t b = 0; b < n / 32; ++b) {
        const float* xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float s = amax / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            q[b * 32 + j] = int8_t(std::lrint(std::clamp(xb[j] * id, -127.0f, 127.0f)));
            sum += q[b * 32 + j];
        }
        sums[b] = int16_t(sum);
    }
}

SI_SCALAR void quantize_q8_k_impl(const float* x, int64_t n, int8_t* q, float* d, int16_t* bsums) {
    for (int64_t b = 0; b < n / 256; ++b) {
        const float* xb = x + b * 256;
        float amax = 0.0f;
        for (int j = 0; j < 256; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float s = amax / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        int8_t* qb = q + b * 256;
        for (int j = 0; j < 256; ++j) qb[j] = int8_t(std::lrint(std::clamp(xb[j] * id, -127.0f, 127.0f)));
        for (int g = 0; g < 16; ++g) {
            int sum = 0;
            for (int j = 0; j < 16; ++j) sum += qb[g * 16 + j];
            bsums[b * 16 + g] = int16_t(sum);
        }
    }
}

SI_SCALAR float q4_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 32; ++b, w += 18, q += 32) {
        int s = 0;
        for (int j = 0; j < 16; ++j) s += ((w[2 + j] & 0xF) - 8) * q[j] + ((w[2 + j] >> 4) - 8) * q[j + 16];
        sum += float(s) * half(w) * d[b];
    }
    return sum;
}

SI_SCALAR float q8_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 32; ++b, w += 34, q += 32) {
        int s = 0;
        for (int j = 0; j < 32; ++j) s += int8_t(w[2 + j]) * q[j];
        sum += float(s) * half(w) * d[b];
    }
    return sum;
}

SI_SCALAR float q4_k(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 256; ++b, w += 144, q += 256, bsums += 16) {
        uint8_t sc[8], m[8];
        k4_scales(w + 4, sc, m);
        const uint8_t* qs = w + 16;
        int sumi = 0, summ = 0;
        for (int j = 0; j < 4; ++j) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; ++l) {
                lo += (qs[32 * j + l] & 0xF) * q[64 * j + l];
                hi += (qs[32 * j + l] >> 4) * q[64 * j + 32 + l];
            }
            sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        for (int s = 0; s < 8; ++s) summ += m[s] * (bsums[2 * s] + bsums[2 * s + 1]);
        sum += d[b] * (half(w) * float(sumi) - half(w + 2) * float(summ));
    }
    return sum;
}

SI_SCALAR float q6_k(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 256; ++b, w += 210, q += 256, bsums += 16) {
        const uint8_t* ql = w;
        const uint8_t* qh = w + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
        int sumi = 0;
        for (int h = 0; h < 2; ++h) {
            int sub[8] = {0};
            for (int l = 0; l < 32; ++l) {
                const int q1 = (ql[64 * h + l] & 0xF) | (((qh[32 * h + l] >> 0) & 3) << 4);
                const int q2 = (ql[64 * h + l + 32] & 0xF) | (((qh[32 * h + l] >> 2) & 3) << 4);
                const int q3 = (ql[64 * h + l] >> 4) | (((qh[32 * h + l] >> 4) & 3) << 4);
                const int q4 = (ql[64 * h + l + 32] >> 4) | (((qh[32 * h + l] >> 6) & 3) << 4);
                const int8_t* x = q + 128 * h;
                sub[l / 16] += q1 * x[l];
                sub[2 + l / 16] += q2 * x[l + 32];
                sub[4 + l / 16] += q3 * x[l + 64];
                sub[6 + l / 16] += q4 * x[l + 96];
            }
            for (int s = 0; s < 8; ++s) sumi += sc[8 * h + s] * sub[s];
        }
        int corr = 0;
        for (int s = 0; s < 16; ++s) corr += sc[s] * bsums[s];
        sum += d[b] * half(w + 208) * float(sumi - 32 * corr);
    }
    return sum;
}

}  // namespace

float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
    switch (t) {
        case WType::q4_0: return q4_0(row, n, q, d);
        case WType::q8_0: return q8_0(row, n, q, d);
        case WType::q4_k: return q4_k(row, n, q, d, bsums);
        case WType::q6_k: return q6_k(row, n, q, d, bsums);
    }
    return 0.0f;
}

void quantize_q8_0(const float* x, int64_t n, int8_t* q, float* d, int16_t* sums) { quantize_q8_0_impl(x, n, q, d, sums); }
void quantize_q8_k(const float* x, int64_t n, int8_t* q, float* d, int16_t* bsums) { quantize_q8_k_impl(x, n, q, d, bsums); }

}  // namespace ref

// ---- AVX2 ---------------------------------------------------------------------------------------------------------

#if SI_QDOT_AVX2
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Signed int8 x signed int8, 32 lanes, summed in eight int32 lanes: |w| (unsigned) times x with w's sign
// (|pair sums| <= 2 * 127 * 128: no saturation).
inline __m256i dot_s8(__m256i w, __m256i x) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define SI_QDOT_VNNI 1
inline __m256i dpbusd(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#elif defined(__AVXVNNI__)
#define SI_QDOT_VNNI 1
inline __m256i dpbusd(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#else
#define SI_QDOT_VNNI 0
#endif

#if SI_QDOT_VNNI
// With vpdpbusd (unsigned x signed bytes) the weights are made unsigned by an offset that the activations' block sum
// takes back out: sum (w + o) x - o sum x. Q8_0: o = 128 (w xor 0x80); Q4_0: the stored nibble is w + 8.
float q8_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* sums) {
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    const __m256i flip = _mm256_set1_epi8(char(0x80));
    for (int64_t b = 0; b < n / 32; ++b, w += 34, q += 32) {
        const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)), flip);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const float s = half(w) * d[b];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dpbusd(wv, xv)), _mm256_set1_ps(s), acc);
        corr += s * float(sums[b]);
    }
    return hsum(acc) - 128.0f * corr;
}

float q4_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* sums) {
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n / 32; ++b, w += 18, q += 32) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2));
        // bytes 0..15: low nibbles (elements 0..15); bytes 16..31: high nibbles (elements 16..31)
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const float s = half(w) * d[b];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dpbusd(nib, xv)), _mm256_set1_ps(s), acc);
        corr += s * float(sums[b]);
    }
    return hsum(acc) - 8.0f * corr;
}
#else
float q8_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t*) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 32; ++b, w += 34, q += 32) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(wv, xv)), _mm256_set1_ps(half(w) * d[b]), acc);
    }
    return hsum(acc);
}

float q4_0(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t*) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    for (int64_t b = 0; b < n / 32; ++b, w += 18, q += 32) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2));
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        const __m256i wv = _mm256_sub_epi8(nib, eight);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(wv, xv)), _mm256_set1_ps(half(w) * d[b]), acc);
    }
    return hsum(acc);
}
#endif

float q4_k(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
    __m256 acc = _mm256_setzero_ps();
    float acc_m = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n / 256; ++b, w += 144, q += 256, bsums += 16) {
        uint8_t sc[8], m[8];
        k4_scales(w + 4, sc, m);
        const uint8_t* qs = w + 16;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
            const __m256i lo = _mm256_and_si256(raw, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * j));
            const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * j + 32));
            // unsigned nibble x signed int8: pairs <= 2 * 15 * 128, then times the 6-bit scale in int32
            const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_set1_epi16(sc[2 * j]));
            const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), _mm256_set1_epi16(sc[2 * j + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        int summ = 0;
        for (int s = 0; s < 8; ++s) summ += m[s] * (bsums[2 * s] + bsums[2 * s + 1]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d[b] * half(w)), acc);
        acc_m += d[b] * half(w + 2) * float(summ);
    }
    return hsum(acc) - acc_m;
}

float q6_k(const uint8_t* w, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < n / 256; ++b, w += 210, q += 256, bsums += 16) {
        const uint8_t* ql = w;
        const uint8_t* qh = w + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
            __m256i v[4];
            v[0] = _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            v[1] = _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(hb, m30));
            v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                   _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
            for (int k = 0; k < 4; ++k) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128 * h + 32 * k));
                const int s = 8 * h + 2 * k;  // sub-blocks s (bytes 0..15) and s + 1 (bytes 16..31)
                const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(v[k], xv), scale));
            }
        }
        int corr = 0;
        for (int s = 0; s < 16; ++s) corr += sc[s] * bsums[s];
        const float dd = d[b] * half(w + 208);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(dd), acc);
        acc = _mm256_sub_ps(acc, _mm256_setr_ps(dd * float(32 * corr), 0, 0, 0, 0, 0, 0, 0));
    }
    return hsum(acc);
}

}  // namespace
#endif

float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums) {
#if SI_QDOT_AVX2
    switch (t) {
        case WType::q4_0: return q4_0(row, n, q, d, bsums);
        case WType::q8_0: return q8_0(row, n, q, d, bsums);
        case WType::q4_k: return q4_k(row, n, q, d, bsums);
        case WType::q6_k: return q6_k(row, n, q, d, bsums);
    }
    return 0.0f;
#else
    return ref::dot_row(t, row, n, q, d, bsums);
#endif
}

}  // namespace si::qdot
