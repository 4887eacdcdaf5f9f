#include "host/sgx_cost.h"

#include <algorithm>

#include "common/error.h"

namespace si {

SgxParams sgx_params(const std::string& name) {
    SgxParams p;
    p.name = name;
    if (name == "sgx1") {
        p.epc_bytes = 93.0 * (1 << 20);
        p.enclave_memory_slowdown = 1.2;  // MEE: integrity tree walks on EPC misses
    } else if (name == "sgx2") {
        p.epc_bytes = 512.0 * (1ull << 30);
        p.enclave_memory_slowdown = 1.05;  // TME-MK, no integrity tree
    } else {
        fail(Status::invalid_argument, "unknown SGX cost model '" + name + "' (valid: sgx1, sgx2)");
    }
    return p;
}

SgxProjection project_sgx(const Plan& plan, const StepTimes& t, const SgxParams& sgx) {
    SgxProjection r;
    r.compute_s = t.enclave_s * sgx.enclave_memory_slowdown + t.accel_s + t.host_s;
    // Every crossing is one ECALL (the stage) whose return carries the next masked input; enclave-only has one
    // ECALL per step; gpu-only and plain have none.
    const double ecalls = plan.params.mode == Mode::enclave_only ? 1.0 : plan.crossings;
    r.transitions_s = (plan.params.mode == Mode::plain || plan.params.mode == Mode::gpu_only)
                          ? 0.0
                          : ecalls * sgx.transition_cycles / (sgx.cpu_ghz * 1e9);
    const double overflow = std::max(0.0, plan.enclave_memory - sgx.epc_bytes);
    // Kept factors are read once each, one unit per crossing: what of the store does not fit beside the rest comes
    // in from outside the EPC, a step's share at a time.
    const double kept_out = plan.kept_factor_bytes > 0
                                ? std::min(1.0, std::max(0.0, plan.enclave_memory + plan.kept_factor_bytes - sgx.epc_bytes) /
                                                    plan.kept_factor_bytes)
                                : 0.0;
    r.paging_s = (overflow + kept_out * plan.kept_step_bytes) / 4096.0 * sgx.page_fault_cycles / (sgx.cpu_ghz * 1e9);
    return r;
}

StepTimes estimate_times(const Plan& plan, double enclave_gflops, double accel_gflops, double host_gflops) {
    StepTimes t;
    t.enclave_s = plan.flops_enclave / (enclave_gflops * 1e9);
    t.accel_s = plan.flops_accel / (accel_gflops * 1e9);
    t.host_s = plan.flops_host / (host_gflops * 1e9);
    return t;
}

}  // namespace si
