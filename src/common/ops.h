// Element-wise and row-wise operations of the LLaMA block. Pure functions on caller-owned buffers.
#pragma once
#include <cstddef>
#include <cstdint>

namespace si {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * weight[i]    (x and out may alias)
void rmsnorm(float* out, const float* x, const float* weight, int n, float eps);

// Rotates interleaved pairs (v[2i], v[2i+1]) of every head of a [n_heads][head_dim] vector by pos * theta^(-2i/head_dim).
void rope(float* v, int n_heads, int head_dim, int pos, float theta);

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
// One query head of causal attention: out[0..head_dim) = sum_p softmax_p(q . k_p / sqrt(head_dim)) v_p over the
// positions p < n_keys, where k_p = keys + p * stride and v_p = values + p * stride. att is scratch of n_keys floats.
void attend_head(float* out, const float* q, const float* keys, const float* values, int n_keys, size_t stride,
                 int head_dim, float* att);

// Query heads [h_begin, h_end) of one token, the same arithmetic as attend_head on each (bit-identical results), but
// reading the cache row by row: a head's slice of a row is only head_dim floats, so sweeping the rows once per head
// strides through memory the prefetchers follow poorly, while one sweep for all the heads reads it in address order.
// q and out are the token's [n_heads][head_dim] vectors; query head h reads cache head h / group; att is scratch of
// (h_end - h_begin) * n_keys floats.
void attend_heads(float* out, const float* q, const float* keys, const float* values, int n_keys, size_t stride,
                  int head_dim, int group, int h_begin, int h_end, float* att);
}  // namespace si
