// bench --concurrency and bench --slot-memory (src/cli/bench_concurrency.cpp).
#pragma once
#include <string>
#include <vector>

#include "common/model.h"

namespace si::cli {

struct ConcurrencyBench {
    std::vector<int> levels{1, 4, 16, 64};  // concurrent streams (sequence slots of one session)
    int n_gen = 32;                         // decode steps per measurement
    int ttft_prompt = 512;                  // prompt of the time-to-first-token test (0: skip)
    int reps = 3;
    int threads = 0;
    bool worker_host = true;
    int inside_mib = 256;
    std::string backend = "cpu";
    std::string json;
};

// Aggregate decode tokens/s and per-stream token latency (p50, p99) of gpu-only, enclave-only and secureinfer
// (online, precomputed, and sustained: the precompute interleaved on the same cores), TTFT, offloaded FLOP shares.
int bench_concurrency(const ModelWeights& w, const std::string& model_name, const ConcurrencyBench& o);

// Memory of one session with `slots` sequence slots, each holding `positions` tokens, against one slot holding as
// many plus the extra slots' KV caches: each configuration measured in a fresh child process (resident set growth).
int bench_slot_memory(const ModelWeights& w, const std::string& model_name, int slots, int positions, int threads);

}  // namespace si::cli
