// The trusted core: the only code that sees secret tensors, keys and unmasked activations (DESIGN.md sections 2, 4
// and 5). Pure computation on one thread: no files, sockets, threads or clocks; diagnostics go through the OCALL
// table. The three si_ecall_* functions (ecalls.cpp) wrap one instance.
//
// Protocol (messages in boundary/enclave_messages.h), one request per call:
//   configure -> upload* -> finalize (answers with the offload plan) -> [sampler] -> eval -> (offload <-> products)*
//   -> result / ok, then eval again ... ; reset at any time after finalize.
// eval starts a forward pass over T tokens. At each stage of each layer (qkv, attn_out, ffn_in, ffn_out) the core
// quantises the stage input to b-bit integers per token, computes secret projections itself, and, when public
// projections remain and offloading is on (secureinfer), masks the input with fresh AES-256-CTR pads and answers
// with an `offload` message. The host returns W x' for each listed projection in a `products` request; the core
// removes W r (computed here, online), checks each product with Freivalds' test and continues. A failed check
// latches: this call and every later one fail with Status::integrity and nothing more is released. With
// offloading off (enclave-only) a pass runs to its end in the eval call.
// Offline unblinding factors: `precompute {layer, stage, count}` (between passes) reserves count single-token
// crossings' worth of pads, computes W R for the batch with one matrix-matrix product per offloaded projection and
// answers `sealed`: one AES-256-GCM unit per crossing under a key that never leaves the core, with associated data
// binding layer, stage, the unit's mask-range offset, count, the batch sequence number and the position in the
// batch. Later single-token crossings of that (layer, stage) take their pads from the reserved ranges, in order,
// and name the unit (batch, batch_index) in `offload`; the host must return exactly that unit in `products`
// (missing, replayed, reordered, altered or foreign units latch an integrity failure). When none remain, W r is
// computed online again. At the end of a pass only a sampled token
// (optionally with noised top-K log-probabilities) or a summed NLL (an evaluation feature) leaves the core.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "boundary/enclave_abi.h"

#ifndef SI_TRUSTED_CORE_MAX_BYTES
// Most memory one core may commit for a model (weights, keys, KV cache, scratch); configure refuses more. Fuzzing
// builds lower it.
#define SI_TRUSTED_CORE_MAX_BYTES (uint64_t(64) << 30)
#endif

namespace si {

class TrustedCore {
public:
    // platform (may be null): measurement, sealing key and quoting for protected packages.
    explicit TrustedCore(const si_ocall_table* ocalls, const si_platform* platform = nullptr);
    ~TrustedCore();
    TrustedCore(const TrustedCore&) = delete;
    TrustedCore& operator=(const TrustedCore&) = delete;

    // Handles one request (already copied into the core's memory) and returns the response. Throws si::Error with
    // a secret-free message; after an integrity failure every call throws Status::integrity.
    std::vector<uint8_t> process(std::span<const uint8_t> request);
    bool failed() const { return failed_; }

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
    bool failed_ = false;
    si_ocall_table ocalls_{};
};

}  // namespace si
