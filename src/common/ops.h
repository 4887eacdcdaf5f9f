// Element-wise and row-wise operations of the LLaMA block. Pure functions on caller-owned buffers.
#pragma once
#include <cstddef>
#include <cstdint>

namespace si {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * weight[i]    (x and out may alias)
void rmsnorm(float* out, const float* x, const float* weight, int n, float eps);

// Rotates interleaved pairs (v[2i], v[2i+1]) of every head of a [n_heads][head_dim] vector by pos * theta^(-2i/head_dim).
// freq_factors: null, or head_dim / 2 divisors of the rotation frequencies (Llama 3.1 RoPE scaling).
void rope(float* v, int n_heads, int head_dim, int pos, float theta, const float* freq_factors = nullptr);

// In-place softmax of x[0..n).
void softmax(float* x, int n);

// out[i] = silu(gate[i]) * up[i]   (out may alias gate)
void swiglu(float* out, const float* gate, const float* up, int n);

// Per-token symmetric quantisation of x[0..n) to int8 in [-127, 127]; returns the scale (max|x| / 127, 0 for x = 0).
float quantize_row_i8(const float* x, int n, int8_t* q);

}  // namespace si

namespace si {
// sum_i a[i] * b[i]
float dot_f32(const float* a, const float* b, int n);
// y[i] += alpha * x[i]
void axpy_f32(float* y, float alpha, const float* x, int n);
}  // namespace si

namespace si {
// Causal attention of query heads [h_begin, h_end) of one token: for each head h,
// out_h = sum_p softmax_p(q_h . k_p / sqrt(head_dim)) v_p over the positions p < n_keys, where q_h and out_h are
// the head's slices of the token's [n_heads][head_dim] vectors q and out, and k_p, v_p are the slices of cache head
// h / group in the rows keys + p * stride and values + p * stride. The cache is read row by row, once for all the
// heads: a head's slice of a row is only head_dim floats, so sweeping the rows once per head would stride through
// memory the prefetchers follow poorly. att is scratch of (h_end - h_begin) * n_keys floats.
void attend_heads(float* out, const float* q, const float* keys, const float* values, int n_keys, size_t stride,
                  int head_dim, int group, int h_begin, int h_end, float* att);

// Work items [begin, end) of a pass's attention, item i being query head i % n_heads of token t = i / n_heads, which
// sits at position pos + t and attends to the cache rows 0 .. pos + t; each token's run of items is one attend_heads
// call. Token t's query is q + t * q_stride, its output out + t * out_stride. att: attend_scratch(...) floats.
void attend_items(int64_t begin, int64_t end, int n_heads, int pos, float* out, size_t out_stride, const float* q,
                  size_t q_stride, const float* keys, const float* values, size_t stride, int head_dim, int group,
                  float* att);
// Scratch floats attend_items needs for items [begin, end) of a pass of T tokens at position pos.
inline size_t attend_scratch(int64_t begin, int64_t end, int n_heads, int pos, int T) {
    return size_t(end - begin < n_heads ? end - begin : n_heads) * size_t(pos + T);
}
}  // namespace si
