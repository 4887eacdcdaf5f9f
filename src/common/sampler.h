// Token samplers: greedy, temperature, top-k, top-p. Seeded with a 64-bit value; the same seed, logits and
// parameters always give the same token.
#pragma once
#include <cstdint>
#include <utility>

#include "common/secret_memory.h"

namespace si {

struct SamplerParams {
    float temperature = 0.8f;  // <= 0: greedy (argmax)
    int top_k = 40;            // <= 0 or >= vocab: disabled
    float top_p = 0.95f;       // >= 1: disabled
    uint64_t seed = 0;
};

class Sampler {
public:
    explicit Sampler(const SamplerParams& params);
    // Restarts the random stream as if constructed with this seed (the trusted core reseeds a package's sampler
    // for every draw).
    void reseed(uint64_t seed);
    // Picks a token from logits[0..n). The logits are not modified.
    int32_t sample(const float* logits, int n);
    static int32_t argmax(const float* logits, int n);
    const SamplerParams& params() const { return params_; }

private:
    float next_uniform();  // [0, 1)
    SamplerParams params_;
    uint64_t state_;
    SecretVector<std::pair<float, int32_t>> cand_;  // the candidates' logits: secret inside the trusted core
};

}  // namespace si
