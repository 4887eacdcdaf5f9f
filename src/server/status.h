// GET /v1/secureinfer/status: what protects the served model (the enclave host and its isolation, the measurement a
// keyserver checks, the package and its owner's release policy) and what leaves the enclave, as JSON.
#pragma once
#include <string>

namespace si::server {

struct StatusInputs {
    std::string protection;  // si_context_protection's JSON
    std::string model_id, mode;
    int n_ctx = 0, parallel = 1, max_tokens = 0;
    int logprobs = 0;          // top-K log-probabilities the contexts release
    float logprob_noise = 0;   // their noise's standard deviation
    std::string warnings;      // one per line
};

// {"model", "mode", "n_ctx", "parallel", "max_tokens", "enclave": {"host", "isolation", "measurement",
//  "measurement_config"}, "package", "secret_tensors", "adapter", "released": {"tokens", "logprobs_top_k",
//  "logprob_noise", "summary"}, "warnings": [...]}
std::string status_json(const StatusInputs& in);

}  // namespace si::server
