// Shared between the evaluation's files (eval_models.cpp, experiment.cpp, report.cpp): sizes and helpers.
#pragma once
#include <chrono>

#include "attack/experiment.h"
#include "train/trainer.h"

namespace si::attack::detail {

double seconds_since(std::chrono::steady_clock::time_point t0);

// Sizes of A5-A7. The quick suite (CI) keeps them small: short perplexity windows and few training steps.
struct ApiAttackSizes {
    // A5
    int a5_steps, a5_batch, a5_ctx, a5_eval_windows, a5_eval_len;
    // A6
    int a6_prompts, a6_prompt_len, a6_gen, a6_oracle_rows, a6_oracle_cols;
    // A7
    int a7_per_class, a7_len, a7_tail;
};

ApiAttackSizes api_sizes(bool quick);

constexpr double kBudgetFraction = 0.01;  // A5: the attacker's share of the private corpus
constexpr float kA6Noise = 0.5f;          // A6: the Gaussian perturbation of the noisy variant (nats)

train::TrainOptions a5_train_options(const EvalConfig& cfg, int seed);

// The metric, its direction and threshold of an attack, into r.
void attack_metric(Attack a, ExperimentResult& r);

}  // namespace si::attack::detail
