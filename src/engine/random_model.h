// Random-weight models with real shapes, for speed measurements (speed does not depend on weight values).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/model.h"

namespace si {

// Known shapes: "stories260k", "stories15m", "stories110m", "tinyllama" (TinyLlama-1.1B). Throws
// si::Error(invalid_argument) listing the known names for anything else.
ModelConfig shape_preset(const std::string& name);
std::vector<std::string> shape_names();

// Weights uniform in [-0.05, 0.05) (norm weights 1), deterministic for a seed; classifier tied unless `untied`.
ModelWeights random_model(const ModelConfig& cfg, uint64_t seed, bool untied = false);

}  // namespace si
