// The partition plan of one transformer block (and the model's ends) for a mode: which domain runs each op, its
// FLOPs, the bytes that cross the enclave boundary, and the enclave memory it needs. Pure arithmetic on the
// hyper-parameters; `secureinfer plan` prints it and the SGX cost model (sgx_cost.h) projects latencies from it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/model.h"

namespace si {

enum class Mode { plain, gpu_only, enclave_only, secureinfer };
const char* mode_name(Mode m);  // "plain", "gpu-only", "enclave-only", "secureinfer"
Mode parse_mode(const std::string& name);  // throws Status::invalid_argument listing the valid names

enum class Domain { enclave, accelerator, host };
const char* domain_name(Domain d);

struct PlanParams {
    Mode mode = Mode::secureinfer;
    int n_tokens = 1;          // tokens per step (1: decode; the prompt length for prefill)
    int n_ctx = 0;             // attended positions (0: the model's context)
    int lora_rank = 0;         // 0: no adapter
    std::vector<Proj> lora_targets;
    bool offline_unblinding = false;  // W r precomputed (its cost is reported apart, per token)
};

struct PlanOp {
    std::string name;        // "attn_norm", "qkv", ...
    Domain domain = Domain::enclave;
    double flops = 0;        // per step (n_tokens tokens)
    double bytes_to_accel = 0, bytes_from_accel = 0;  // crossing the boundary, per step
    int crossings = 0;       // round trips per step
    bool per_layer = true;   // false for the model's ends (embedding, final norm, classifier, sampling)
};

struct Plan {
    ModelConfig cfg;
    PlanParams params;
    std::vector<PlanOp> ops;  // one block's ops (per_layer) followed by the ends
    // Totals over the whole model for one step.
    double flops_enclave = 0, flops_accel = 0, flops_host = 0;
    double flops_offline = 0;         // precomputed unblinding work per step (offline mode only)
    double bytes_to_accel = 0, bytes_from_accel = 0;
    int crossings = 0;
    double enclave_memory = 0;        // bytes: secrets, KV cache, keys, scratch (and weights when computed inside)
    // Offline mode with factors kept inside (set by the caller, who knows the store): its size, and the part each
    // step reads once (one unit per crossing).
    double kept_factor_bytes = 0, kept_step_bytes = 0;
    double offloaded_share() const;   // flops_accel / all online flops
};

Plan make_plan(const ModelConfig& cfg, const PlanParams& p);

}  // namespace si
