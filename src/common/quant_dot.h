// Dot products of weight rows stored in ggml's block formats with int8-quantised activations, the way llama.cpp's
// CPU backend multiplies quantised matrices: the weights are read in their file format (never expanded), the
// activations are quantised once per token to 8 bits with one scale per block (Q8_0-style blocks of 32 for Q4_0 and
// Q8_0 rows, Q8_K-style blocks of 256 with sums of 16 for the k-quants), and each block's integer dot product is
// exact before it is scaled.
//
// Every kernel has a portable scalar reference (namespace ref) computing the same integers; the vector kernels
// (AVX2 where the compiler targets it, VNNI's vpdpbusd for the signed 8-bit products where present) sum the scaled
// block products in a different order, so they agree with the reference to float rounding, not bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>

namespace si::qdot {

// Weight formats with native kernels (values are ggml's type numbers).
enum class WType : uint32_t { q4_0 = 2, q8_0 = 8, q4_k = 12, q6_k = 14 };
bool is_native(uint32_t ggml_type);
// Elements per block and bytes per block of a weight format.
int64_t block_elems(WType t);
size_t block_bytes(WType t);
// True when the format's rows use Q8_K activations (k-quants), false for Q8_0 activations.
inline bool uses_q8k(WType t) { return t == WType::q4_k || t == WType::q6_k; }

// Activations of one token, quantised for both block sizes (n must be a multiple of 32; the Q8_K form is only
// filled, and only usable, when n is a multiple of 256).
//   q0 [n] int8, d0 [n/32], s0 [n/32]: blocks of 32, d = max|x| / 127, q = round(x / d), s = sum of the block's q
//   qk [n] int8, dk [n/256], bsums [n/16]: blocks of 256 and the sum of each run of 16 quants
void quantize_q8_0(const float* x, int64_t n, int8_t* q0, float* d0, int16_t* s0);
void quantize_q8_k(const float* x, int64_t n, int8_t* qk, float* dk, int16_t* bsums);

// One row of n elements in format t (its n / block_elems blocks) times one token's activations: the Q8_0 form
// (q0, d0, s0) for q4_0 / q8_0, the Q8_K form (qk, dk, bsums) for q4_k / q6_k.
float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums);

// Q8_0 weights written by this process (for matrices whose file format has no native kernel): ggml's reference
// quantiser, d = max|x| / 127 stored as fp16.
void quantize_row_q8_0_weights(const float* x, int64_t n, uint8_t* out);

namespace ref {
float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums);
}

}  // namespace si::qdot
