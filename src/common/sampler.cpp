#include "common/sampler.h"

#include <algorithm>
#include <cmath>

namespace si {

Sampler::Sampler(const SamplerParams& params) : params_(params) { reseed(params.seed); }

void Sampler::reseed(uint64_t seed) {
    params_.seed = seed;
    // splitmix64 of the seed, so that nearby seeds give unrelated streams and seed 0 is valid
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    state_ = (z ^ (z >> 31)) | 1;
}

float Sampler::next_uniform() {
    // xorshift64*: top 24 bits -> [0, 1)
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return float((state_ * 0x2545f4914f6cdd1dull) >> 40) / 16777216.0f;
}

int32_t Sampler::argmax(const float* logits, int n) {
    return int32_t(std::max_element(logits, logits + n) - logits);
}

int32_t Sampler::sample(const float* logits, int n) {
    if (params_.temperature <= 0.0f) return argmax(logits, n);

    cand_.resize(size_t(n));
    for (int i = 0; i < n; ++i) cand_[size_t(i)] = {logits[i], i};
    auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    size_t keep = size_t(n);
    if (params_.top_k > 0 && params_.top_k < n) {
        keep = size_t(params_.top_k);
        std::partial_sort(cand_.begin(), cand_.begin() + std::ptrdiff_t(keep), cand_.end(), by_logit);
    } else {
        std::sort(cand_.begin(), cand_.end(), by_logit);
    }
    cand_.resize(keep);

    // softmax with temperature over the kept candidates (sorted, so cand_[0] holds the max)
    const float mx = cand_[0].first;
    float sum = 0.0f;
    for (auto& c : cand_) {
        c.first = std::exp((c.first - mx) / params_.temperature);
        sum += c.first;
    }
    for (auto& c : cand_) c.first /= sum;

    // top-p: the smallest prefix whose mass reaches p
    if (params_.top_p < 1.0f) {
        float cum = 0.0f;
        size_t cut = cand_.size();
        for (size_t i = 0; i < cand_.size(); ++i) {
            cum += cand_[i].first;
            if (cum >= params_.top_p) {
                cut = i + 1;
                break;
            }
        }
        cand_.resize(cut);
        sum = cum;
    } else {
        sum = 1.0f;
    }

    const float r = next_uniform() * sum;
    float cum = 0.0f;
    for (const auto& c : cand_) {
        cum += c.first;
        if (r < cum) return c.second;
    }
    return cand_.back().second;
}

}  // namespace si
