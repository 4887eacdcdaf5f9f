#include "common/ops.h"

#include <algorithm>
#include <cmath>

namespace si {

void rmsnorm(float* out, const float* x, const float* weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
    for (int i = 0; i < n; ++i) out[i] = x[i] * inv * weight[i];
}

void rope(float* v, int n_heads, int head_dim, int pos, float theta, const float* freq_factors) {
    for (int i = 0; i < head_dim; i += 2) {
        float freq = 1.0f / std::pow(theta, float(i) / float(head_dim));
        if (freq_factors) freq /= freq_factors[i / 2];
        const float angle = float(pos) * freq;
        const float c = std::cos(angle), s = std::sin(angle);
        for (int h = 0; h < n_heads; ++h) {
            float* p = v + h * head_dim + i;
            const float a = p[0], b = p[1];
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

void softmax(float* x, int n) {
    const float mx = *std::max_element(x, x + n);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; ++i) x[i] *= inv;
}

void swiglu(float* out, const float* gate, const float* up, int n) {
    for (int i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

float quantize_row_i8(const float* x, int n, int8_t* q) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < n; ++i) q[i] = int8_t(std::clamp(int(std::lrintf(x[i] * inv)), -127, 127));
    return scale;
}

}  // namespace si

#if defined(__AVX512F__)
// GCC 12 warns about the undefined-upper-half idiom inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace si {

float dot_f32(const float* a, const float* b, int n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 m = __mmask16((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
#endif
}

void axpy_f32(float* y, float alpha, const float* x, int n) {
    for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace si

namespace si {

void attend_heads(float* out, const float* q, const float* keys, const float* values, int n_keys, size_t stride,
                  int head_dim, int group, int h_begin, int h_end, float* att) {
    const float inv_sqrt = 1.0f / std::sqrt(float(head_dim));
    const int n = h_end - h_begin;
    auto kv_off = [&](int h) { return size_t(h / group) * size_t(head_dim); };
    // scores, row by row: att[h - h_begin][p]
    for (int p = 0; p < n_keys; ++p) {
        const float* row = keys + size_t(p) * stride;
        for (int h = h_begin; h < h_end; ++h)
            att[size_t(h - h_begin) * n_keys + p] = dot_f32(q + size_t(h) * head_dim, row + kv_off(h), head_dim) * inv_sqrt;
    }
    for (int i = 0; i < n; ++i) softmax(att + size_t(i) * n_keys, n_keys);
    std::fill_n(out + size_t(h_begin) * head_dim, size_t(n) * head_dim, 0.0f);
    for (int p = 0; p < n_keys; ++p) {
        const float* row = values + size_t(p) * stride;
        for (int h = h_begin; h < h_end; ++h)
            axpy_f32(out + size_t(h) * head_dim, att[size_t(h - h_begin) * n_keys + p], row + kv_off(h), head_dim);
    }
}

void attend_items(int64_t begin, int64_t end, int n_heads, int pos, float* out, size_t out_stride, const float* q,
                  size_t q_stride, const float* keys, const float* values, size_t stride, int head_dim, int group,
                  float* att) {
    for (int64_t i = begin; i < end;) {
        const int64_t t = i / n_heads;
        const int h0 = int(i % n_heads), h1 = int(std::min<int64_t>(n_heads, h0 + (end - i)));
        attend_heads(out + size_t(t) * out_stride, q + size_t(t) * q_stride, keys, values, pos + int(t) + 1, stride,
                     head_dim, group, h0, h1, att);
        i += h1 - h0;
    }
}

}  // namespace si
