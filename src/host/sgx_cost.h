// A cost model for real SGX hardware, which the development machines lack: it replays a run's counted crossings,
// boundary bytes and enclave memory (a Plan, plus measured or estimated compute time per domain) with published SGX
// parameters and projects the latency per step on SGX1 and SGX2 machines. A projection, not a measurement.
//
// Sources for the defaults (see docs/SGX.md):
//   - ECALL/OCALL round trip 8,000-17,000 cycles: Weisse, Bertacco, Austin, "Regaining Lost Cycles with HotCalls",
//     ISCA 2017 (about 8,200-17,000 cycles measured on Skylake); we take 13,000.
//   - SGX1 EPC 128 MiB of which about 93 MiB usable; EPC paging about 40,000 cycles per 4 KiB page (eviction plus
//     reload with re-encryption): Arnautov et al., "SCONE", OSDI 2016; Taassori et al., "VAULT", ASPLOS 2018.
//   - SGX2 on 3rd-generation Xeon Scalable (Ice Lake): EPC up to 512 GiB per socket, total memory encryption
//     instead of the SGX1 memory encryption engine: Intel, "Intel SGX on 3rd Gen Xeon Scalable" (2021).
#pragma once
#include <string>

#include "host/plan.h"

namespace si {

struct SgxParams {
    std::string name;                // "sgx1", "sgx2"
    double cpu_ghz = 3.0;
    double transition_cycles = 13000;  // one ECALL in and out
    double epc_bytes = 93.0 * (1 << 20);
    double page_fault_cycles = 40000;  // per 4 KiB page brought back into the EPC
    double enclave_memory_slowdown = 1.0;  // multiplier on enclave compute time (memory encryption)
};

SgxParams sgx_params(const std::string& name);  // "sgx1" or "sgx2"; throws Status::invalid_argument otherwise

struct StepTimes {
    double enclave_s = 0, accel_s = 0, host_s = 0;  // compute per step, measured (bench) or estimated (plan)
};

struct SgxProjection {
    double compute_s = 0;      // enclave (with slowdown) + accelerator + host
    double transitions_s = 0;  // crossings x transition cost
    double paging_s = 0;       // EPC overflow, re-read every step (kept factors: their step's share)
    double total_s() const { return compute_s + transitions_s + paging_s; }
};

SgxProjection project_sgx(const Plan& plan, const StepTimes& times, const SgxParams& sgx);

// Compute times estimated from the plan's FLOPs at the given throughputs (GFLOP/s), for `plan` without a run.
StepTimes estimate_times(const Plan& plan, double enclave_gflops, double accel_gflops, double host_gflops);

}  // namespace si
