// Fixed-point activations for exact integer products (DESIGN.md section 5).
//
// Weights are int8 in [-128, 127] with a per-output-row scale; activations are quantised per token to the symmetric
// range [-(2^(b-1) - 1), 2^(b-1) - 1] with a per-token scale. The width b is chosen per inner dimension K so that
// every product stays representable:
//
//     |sum_k w_k x_k| <= K * 128 * (2^(b-1) - 1) <= 2^31 - 1
//
// i.e. b is the largest integer with 2^(b-1) - 1 <= floor((2^31 - 1) / (128 K)), clamped to [2, 16] (16 bits is
// plenty of resolution; K too large for b = 2 is refused). Then W x, computed mod 2^32 on masked data, reads back
// exactly as a signed int32. Examples: K = 768 -> b = 15, K = 2048 -> b = 14, K = 5632 -> b = 12.
#pragma once
#include <cstdint>

namespace si {

constexpr int kMinActivationBits = 2;
constexpr int kMaxActivationBits = 16;

// The activation width b for inner dimension K (see above). Throws si::Error if K < 1 or K > 16777215.
int activation_bits(int64_t K);

// Largest quantised magnitude for width b: 2^(b-1) - 1.
constexpr int32_t activation_qmax(int bits) { return (int32_t(1) << (bits - 1)) - 1; }

// Per-token quantisation of X [T][K]: Q[t][k] = round(X[t][k] / scale[t]) with scale[t] = max_k |X[t][k]| / qmax,
// so |Q| <= qmax. A token of zeros gets scale 0 and Q = 0. Throws si::Error on a non-finite input.
void quantize_activations(const float* X, int64_t T, int64_t K, int bits, int32_t* Q, float* scale);

// out[t][n] = Y[t][n] * w_scale[n] * x_scale[t] for Y [T][N].
void dequantize_product(const int32_t* Y, int64_t T, int64_t N, const float* w_scale, const float* x_scale,
                        float* out);

}  // namespace si
