// The attacks of DESIGN.md section 8 that combine the boundary trace with the model's API and attacker-side training
// and evaluation: A5 surrogate fine-tuning, A6 last-layer extraction from log-probabilities, A7 membership inference.
//
// What the attacker has: the public base (stories260K), the boundary trace of the scheme (A5), the API of a
// session (A6, A7: SecureSession::eval_sample, which releases sampled tokens and, only when the session was started
// with SecureSessionParams::logprobs > 0, top-K log-probabilities with Gaussian noise of logprob_noise; and
// SecureSession::eval_nll, the perplexity feature, which releases one summed NLL per pass), a small in-domain budget
// (A5: 1% of the private corpus) and candidate windows (A7). The secret (the victim adapter) and the membership
// labels are used only to score.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "attack/attacks.h"
#include "attack/linalg.h"
#include "attack/schemes.h"
#include "attack/trace_reader.h"
#include "common/model.h"
#include "train/lora.h"
#include "train/trainer.h"

namespace si::attack {

// ---- evaluation of text windows with plain (f32) weights ----------------------------------------------------------

// A window of L scored tokens is given as L + 1 ids {BOS, t0 .. t(L-1)}: the model reads ids[0 .. L-1] and predicts
// ids[1 .. L].
struct WindowEval {
    std::vector<double> nll;          // per window: mean NLL over all L targets (nats/token)
    std::vector<double> tail_nll;     // per window: mean NLL over the last `tail` targets
    std::vector<double> tail_greedy;  // per window: fraction of the last `tail` targets equal to the argmax
};
WindowEval eval_windows(const ModelWeights& w, const std::vector<std::vector<int32_t>>& windows, int tail, int threads);
// exp(mean of the per-window mean NLLs) (all windows have the same length here).
double perplexity(const WindowEval& e);

// The base with an adapter merged at scale 1 (f32).
ModelWeights merged_model(const ModelWeights& base, const train::LoraAdapter& adapter);

// `count` non-overlapping windows of `len` scored tokens, evenly spaced over `text` (L + 1 ids each, BOS first).
std::vector<std::vector<int32_t>> even_windows(const std::vector<int32_t>& text, int count, int len, int32_t bos);

// ---- the private corpus and the victim's training recipe ---------------------------------------------------------

// The reference adapter's recipe (scripts/train-reference-adapter.sh): the five Austen novels other than Persuasion,
// the last 2% of each held out, LoRA rank 8 / alpha 16 on all projections, 1000 steps of 8 windows of 256 tokens,
// seed 1. The evaluation needs it for two things only: A5's in-domain budget is drawn from these files, and A7's
// membership labels are the windows this recipe trained on.
std::vector<std::string> private_corpus_files(const std::string& shared_dir);
train::TrainOptions reference_recipe();
inline constexpr double kReferenceEvalFraction = 0.02;

// ---- A5: surrogate fine-tuning ------------------------------------------------------------------------------------

// What the trace leaks about the offloaded projections, as full weights in the base's coordinates: a float weight of
// the base's shape is read as it is (plaintext offload, S0); anything else (permuted, scaled, with fake rows: S1;
// int8: S3, S5) is aligned with the base by A1 (align_to_base). Projections absent from the trace are not included.
std::map<ProjKey, Mat> leaked_weights(const TraceReader& trace, const ModelWeights& base);
// The base with every leaked projection replaced by its estimate.
ModelWeights apply_estimates(const ModelWeights& base, const std::map<ProjKey, Mat>& estimates);

// The attacker's in-domain budget: from each private training stream, one contiguous chunk of `fraction` of its
// tokens at a seeded position (so `fraction` of the private corpus in all).
train::TextCorpus budget_corpus(const train::TextCorpus& priv, double fraction, uint64_t seed);

// LoRA fine-tuning with the project's trainer from `start` (the public base, or the base with leaked weights) on the
// budget; returns the resulting model (adapter merged).
ModelWeights fine_tune(const ModelWeights& start, const train::TextCorpus& budget, const train::TrainOptions& options);

// L = (PPL_blackbox - PPL_surrogate) / (PPL_blackbox - PPL_victim) (DESIGN.md section 8).
double leakage_ratio(double ppl_blackbox, double ppl_surrogate, double ppl_victim);

// ---- A6: last-layer extraction from log-probabilities ------------------------------------------------------------

struct LastLayerExtraction {
    int64_t queries = 0;        // API calls made
    int64_t rows = 0;           // log-probability vectors obtained
    int64_t columns = 0;        // vocabulary entries known in every row (the matrix's width)
    int hidden_dim = 0;         // estimated: position of the largest ratio of consecutive singular values (0: none)
    double gap = 0.0;           // that ratio
    double subspace_cos = 0.0;  // mean of the principal cosines between the span of the top `dim` right singular
                                // vectors (dim: the model's hidden size, public) and the classifier's column space
                                // (angles the recovered subspace lacks, with fewer rows than dim, count 0)
    double min_cos = 0.0;       // the smallest of them
    std::vector<double> singular_values;  // leading ones (up to 96), for the report
};
// The analysis: Q [n][c] are log-probability vectors over the vocabulary entries `cols`. Rows are centred (which
// removes the log-normaliser), the SVD gives the hidden dimension from the largest gap, and the top `dim` right
// singular vectors are compared with the centred classifier rows W[cols] of the base (principal cosines).
LastLayerExtraction analyse_logprob_matrix(const Mat& Q, const std::vector<int>& cols, const ModelWeights& base);

// Queries a SecureSession (secureinfer preset) serving `adapter` with session parameters logprobs / logprob_noise:
// each prompt is fed with eval_sample and followed by `gen` greedy steps; every returned log-probability vector is a
// row. With logprobs = 0 (the default) the API returns none and the attack has nothing.
LastLayerExtraction a6_logprob_queries(const ModelWeights& base, const train::LoraAdapter* adapter,
                                       const std::vector<std::vector<int32_t>>& prompts, int gen, int logprobs,
                                       float logprob_noise, const SchemeOptions& options, std::string* isolation);
// The same attack through the perplexity feature (SecureSession::eval_nll) of a session with logprobs off: one pass
// of a prompt with a single scored target v (at its last position) returns log p(v | prompt); one row per prompt,
// over `cols` vocabulary entries chosen by seed.
LastLayerExtraction a6_nll_oracle(const ModelWeights& base, const train::LoraAdapter* adapter,
                                  const std::vector<std::vector<int32_t>>& prompts, int cols, uint64_t seed,
                                  const SchemeOptions& options, std::string* isolation);

// ---- A7: membership inference -------------------------------------------------------------------------------------

struct MembershipSet {
    std::vector<std::vector<int32_t>> windows;  // L + 1 ids each, BOS first
    std::vector<int> labels;                    // 1: trained on (member), 0: never trained on
    std::vector<std::pair<size_t, size_t>> origins;  // (stream, offset) of each window's first token in the corpus
};
// The corpus without the set's windows (streams split around them): what a same-distribution reference model for
// membership is trained on.
train::TextCorpus corpus_without(const train::TextCorpus& priv, const MembershipSet& set);
// Members: windows the recipe drew during training (random steps and batch indices; their first `len` tokens).
// Non-members: windows of the same training streams that no training window of the whole run overlaps (the same
// text distribution, never seen). `priv` must be the corpus the recipe trained on.
MembershipSet membership_set(const ModelWeights& base, const train::TextCorpus& priv, const train::TrainOptions& recipe,
                             int per_class, int len, uint64_t seed);

// Membership scores obtained through a SecureSession's API (higher = more likely a member after calibration by the
// caller): per window the eval_nll oracle's mean NLL (one pass), and over the last `tail` targets the teacher-forced
// greedy agreement (eval_sample: tokens only) and, when logprobs > 0, the mean NLL from the released log-probabilities
// (the true token's entry; the smallest released value when it is not among the top K).
struct ApiWindowScores {
    std::vector<double> nll_oracle, tail_greedy, tail_nll;
    int64_t queries = 0;
};
ApiWindowScores api_window_scores(const ModelWeights& base, const train::LoraAdapter* adapter,
                                  const std::vector<std::vector<int32_t>>& windows, int tail, int logprobs,
                                  float logprob_noise, bool nll_oracle, const SchemeOptions& options,
                                  std::string* isolation);

struct MembershipMetrics {
    double auc = 0.5, tpr_at_1pct = 0.0;
};
MembershipMetrics membership_metrics(const std::vector<double>& scores, const std::vector<int>& labels);

}  // namespace si::attack
