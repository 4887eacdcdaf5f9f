// The research's fidelity metrics of a surrogate against the victim (for A5's surrogates and the black-box
// baseline): greedy token match and BLEU on held-out prompts (Persuasion, never in the private training corpus).
//   token match  teacher-forced: on the victim's own greedy continuation of each prompt, the fraction of positions
//                where the surrogate's argmax equals the victim's next token;
//   BLEU         corpus BLEU-4 (uniform weights, brevity penalty; an n-gram order without any match counts 0.1 of a
//                match: smoothing method 1 of Chen and Cherry) of the surrogate's free-running greedy
//                continuations against the victim's, over token ids.
#pragma once
#include <cstdint>
#include <vector>

#include "common/model.h"

namespace si::attack {

struct Fidelity {
    double token_match = 0.0, bleu = 0.0;
    int64_t prompts = 0, tokens = 0;
};

// Greedy continuations of `gen` tokens after each prompt (f32 engine).
std::vector<std::vector<int32_t>> greedy_continuations(const ModelWeights& w, const std::vector<std::vector<int32_t>>& prompts,
                                                       int gen, int threads);
Fidelity fidelity(const ModelWeights& surrogate, const std::vector<std::vector<int32_t>>& prompts,
                  const std::vector<std::vector<int32_t>>& victim_continuations, int threads);
// Corpus BLEU-4 of candidates against one reference each.
double corpus_bleu(const std::vector<std::vector<int32_t>>& candidates, const std::vector<std::vector<int32_t>>& references);

}  // namespace si::attack
