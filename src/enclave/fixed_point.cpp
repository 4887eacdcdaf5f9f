#include "enclave/fixed_point.h"

#include <cmath>
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

void quantize_activations(const float* X, int64_t T, int64_t K, int bits, int32_t* Q, float* scale) {
    if (bits < kMinActivationBits || bits > kMaxActivationBits)
        fail(Status::invalid_argument, "fixed point: activation width " + std::to_string(bits) + " out of range");
    const int32_t qmax = activation_qmax(bits);
    for (int64_t t = 0; t < T; ++t) {
        const float* x = X + t * K;
        int32_t* q = Q + t * K;
        float amax = 0.0f;
        bool finite = true;
        for (int64_t k = 0; k < K; ++k) {
            finite &= std::isfinite(x[k]);
            amax = std::fmax(amax, std::fabs(x[k]));
        }
        if (!finite) fail(Status::invalid_argument, "fixed point: non-finite activation");
        if (amax == 0.0f) {
            scale[t] = 0.0f;
            for (int64_t k = 0; k < K; ++k) q[k] = 0;
            continue;
        }
        scale[t] = amax / float(qmax);
        const float inv = float(qmax) / amax;
        for (int64_t k = 0; k < K; ++k) {
            // x * inv can exceed qmax by a rounding error; the clamp keeps the bound of activation_bits exact.
            const float v = std::nearbyint(x[k] * inv);
            q[k] = int32_t(std::fmax(-float(qmax), std::fmin(float(qmax), v)));
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
