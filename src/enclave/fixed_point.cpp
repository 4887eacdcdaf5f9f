#include "enclave/fixed_point.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "common/error.h"

namespace si {

int activation_bits(int64_t K) {
    constexpr int64_t kLimit = (int64_t(1) << 31) - 1;
    constexpr int64_t kMaxK = kLimit / (128 * activation_qmax(kMinActivationBits));  // 16777215
    if (K < 1 || K > kMaxK)
        fail(Status::unsupported, "fixed point: inner dimension " + std::to_string(K) +
                                      " out of range for exact int32 products (1 to 16777215)");
    int b = kMaxActivationBits;
    while (K * 128 * int64_t(activation_qmax(b)) > kLimit) --b;
    return b;
}

namespace {

// round(clamp(v, -fq, fq)) for an integer fq < 2^22: v * inv can exceed qmax by a rounding error, and the clamp keeps
// the bound of activation_bits exact (clamping before rounding gives the same result as after). Adding and
// subtracting 1.5 * 2^23 rounds to the nearest integer, ties to even, as nearbyint does in the default rounding mode,
// and vectorises.
inline int32_t round_clamped(float v, float fq) {
    constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
    v = v > fq ? fq : v;
    v = v < -fq ? -fq : v;
    return int32_t((v + kRoundMagic) - kRoundMagic);
}

}  // namespace

void quantize_activations(const float* X, int64_t T, int64_t K, int bits, int32_t* Q, float* scale) {
    if (bits < kMinActivationBits || bits > kMaxActivationBits)
        fail(Status::invalid_argument, "fixed point: activation width " + std::to_string(bits) + " out of range");
    const int32_t qmax = activation_qmax(bits);
    const float fq = float(qmax);
    static_assert(activation_qmax(kMaxActivationBits) < (1 << 22));
    for (int64_t t = 0; t < T; ++t) {
        const float* x = X + t * K;
        int32_t* q = Q + t * K;
        // max |x| as the largest magnitude bit pattern: for non-negative floats the bit order is the numeric
        // order, and infinities and NaNs lie above every finite value. An integer reduction vectorises.
        uint32_t amax_bits = 0;
        for (int64_t k = 0; k < K; ++k) {
            uint32_t b;
            std::memcpy(&b, x + k, 4);
            b &= 0x7fffffffu;
            amax_bits = b > amax_bits ? b : amax_bits;
        }
        if (amax_bits >= 0x7f800000u) fail(Status::integrity, "non-finite activation inside the trusted core; the session is stopped");
        float amax;
        std::memcpy(&amax, &amax_bits, 4);
        if (amax == 0.0f) {
            scale[t] = 0.0f;
            for (int64_t k = 0; k < K; ++k) q[k] = 0;
            continue;
        }
        scale[t] = amax / fq;
        const float inv = fq / amax;
        if (inv <= std::numeric_limits<float>::max()) {
            for (int64_t k = 0; k < K; ++k) q[k] = round_clamped(x[k] * inv, fq);
        } else {
            // max |x| below about qmax / FLT_MAX: 1 / amax overflows, so scale through x / amax (in [-1, 1]).
            for (int64_t k = 0; k < K; ++k) q[k] = round_clamped(x[k] / amax * fq, fq);
        }
    }
}

void dequantize_product(const int32_t* Y, int64_t T, int64_t N, const float* w_scale, const float* x_scale,
                        float* out) {
    for (int64_t t = 0; t < T; ++t) {
        const float xs = x_scale[t];
        for (int64_t n = 0; n < N; ++n) out[t * N + n] = float(Y[t * N + n]) * (w_scale[n] * xs);
    }
}

}  // namespace si
