// Random-weight models with real shapes, for speed measurements (speed does not depend on weight values).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/tensor_source.h"

namespace si {

// Known shapes: "stories260k", "stories15m", "stories110m", "tinyllama" (TinyLlama-1.1B), "llama2-7b" (Llama 2
// 7B), "llama3-8b" (Llama 3.1 8B: 8 KV heads, 128256-token vocabulary, RoPE theta 500000 with Llama 3.1's frequency
// factors; context 8192). Throws
// si::Error(invalid_argument) listing the known names for anything else.
ModelConfig shape_preset(const std::string& name);
std::vector<std::string> shape_names();

// Weights uniform in [-0.05, 0.05) (norm weights 1), deterministic for a seed; classifier tied unless `untied`.
ModelWeights random_model(const ModelConfig& cfg, uint64_t seed, bool untied = false);

// Random weights one tensor at a time (bounded memory: a 7B model never exists whole). Every element is a function
// of (seed, tensor name, index) alone, so any rows of any tensor come out the same in any order and in parallel:
// matrices uniform in [-0.05, 0.05), norms 1. (Other values than random_model's, which draws one sequence.)
class RandomSource final : public TensorSource {
public:
    RandomSource(const ModelConfig& cfg, uint64_t seed, bool untied = false);
    const ModelConfig& config() const override { return cfg_; }
    bool tied() const override { return !untied_; }

protected:
    void do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const override;

private:
    ModelConfig cfg_;
    uint64_t seed_ = 0;
    bool untied_ = false;
};

}  // namespace si
