// The attacks of DESIGN.md section 8. Each one uses only what the attacker has: the boundary trace (TraceReader),
// what the API returns, and declared knowledge (the public base model, public text). Scoring against the secret
// happens outside the attack (score_delta), with the secret passed in only there.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "attack/linalg.h"
#include "attack/schemes.h"
#include "attack/trace_reader.h"
#include "common/model.h"
#include "train/lora.h"

namespace si::attack {

using ProjKey = std::pair<int, Proj>;  // (layer, projection)

// ---- A1: alignment of offloaded weights with the public base ------------------------------------------------------

// Aligns an offloaded matrix Wp [M][K] (M >= N rows: possibly permuted, scaled, with fake rows; columns possibly
// permuted) with the public base W0 [N][K]: Hungarian matching of rows and columns (alternating, started from
// permutation- and scale-invariant row profiles, from the identity and from column profiles; the best wins), then a per-row least-squares scale fit against W0, and finally
// an orthogonal Procrustes check (kept only when it explains Wp better than the permutation). Returns the estimate
// of the offloaded (fine-tuned) weights in W0's coordinates, and in *objective the mean |cos| of matched rows.
Mat align_to_base(const Mat& Wp, const Mat& W0, double* objective = nullptr);

// Every offloaded block projection in the trace (role "weight"), aligned with the base.
std::map<ProjKey, Mat> a1_align_weights(const TraceReader& trace, const ModelWeights& base);

// ---- A2: regression of the offloaded map from boundary inputs and outputs -----------------------------------------

// For every (layer, projection) with inputs and outputs in the trace: the least-squares map from the crossing inputs
// to the returned outputs (as the host reads them: 32-bit words as signed integers), aligned with the base like A1.
// r2: pooled coefficient of determination of the regressions (how linear the observed input -> output map is).
std::map<ProjKey, Mat> a2_regress(const TraceReader& trace, const ModelWeights& base, double* r2);

// Scoring of A1 / A2 estimates against the secret: delta cosine rho = cos(W_hat - W0, W - W0) over all estimated
// projections together, and the relative error ||(W_hat - W0) - (W - W0)|| / ||W - W0||.
struct DeltaScore {
    double rho = 0.0, rel_err = 1.0;
    int matrices = 0;
};
DeltaScore score_delta(const std::map<ProjKey, Mat>& estimates, const ModelWeights& base,
                       const train::LoraAdapter& secret);
// The same delta cosine per crossing slot: per layer, the projections that share one boundary input (q k v; o;
// gate and up; down) together, in (layer, slot) order; slots without an estimate are left out. Each slot's
// estimate comes from its own crossings (its own pads), so on a scheme whose trace does not depend on the adapter
// the slots are independent replicates; the paired test of victim against decoy is run over (seed, slot) pairs.
std::vector<double> slot_delta_cosines(const std::map<ProjKey, Mat>& estimates, const ModelWeights& base,
                                       const train::LoraAdapter& secret);

// ---- A3: mask hygiene -----------------------------------------------------------------------------------------------

struct MaskHygiene {
    int64_t vectors = 0;          // masked input rows examined (32-bit integer inputs only)
    int64_t repeated = 0;         // rows that share their mask with another row (their difference is a plaintext difference)
    int64_t cross_session = 0;    // rows of a later session that share a mask with an earlier session's row
    int64_t later_vectors = 0;    // rows in sessions after the first
    double masks_per_slot = 0.0;  // distinct masks per (layer, input) slot, estimated from the clusters
    double rows_per_slot = 0.0;
    double repeat_rate() const { return vectors ? double(repeated) / double(vectors) : 0.0; }
    double cross_rate() const { return later_vectors ? double(cross_session) / double(later_vectors) : 0.0; }
};
// Two masked rows x + r and x' + r share r exactly when their difference, read as signed 32-bit integers, lies in
// the activation range in every element; found by sorting on the first element and checking neighbours. Sessions
// are traces of separate sessions (same prompts), to test the seeding.
MaskHygiene a3_mask_hygiene(const std::vector<const TraceReader*>& sessions);

// ---- A4: distinguishing masked activations ------------------------------------------------------------------------

// One pass (prompt) of a trace as features: per token, every block crossing input of that token concatenated
// (32-bit words as signed integers scaled by 2^-31; floats as they are).
std::vector<Mat> trace_pass_features(const TraceReader& trace);
// AUC of an L2 logistic-regression classifier between the passes of two prompt sets (label per pass), trained on
// half of each set's passes (chosen by seed) and scored on the other half; a unit is `pool` consecutive tokens
// (features averaged).
double a4_distinguish(const std::vector<Mat>& passes, const std::vector<int>& labels, int pool, uint64_t seed,
                      double l2 = 1.0);

// ---- A8: tampering with accelerator results -----------------------------------------------------------------------

struct TamperResult {
    int64_t trials = 0;
    int64_t tampered = 0;          // trials in which a product was actually altered
    int64_t detected = 0;          // the session stopped with an integrity error
    int64_t undetected_changed = 0;  // not detected, and the released tokens differ from the untampered run
    int64_t released_after = 0;    // tokens released from the tampered step or later, over all detected trials
    int64_t prefix_mismatch = 0;   // trials whose tokens before the tampered step differ from the reference
    std::string isolation;
};
// Per trial: a fresh session of `scheme` (S5: the production SecureSession with a tampering accelerator; S3 and
// the other simulated schemes: a product hook), a prompt and `steps` greedy decoding steps; one product, chosen
// uniformly, altered (an added offset, a flipped bit, a +-1 change, or a replayed earlier product).
TamperResult a8_tamper(Scheme scheme, const ModelWeights& base, const train::LoraAdapter* adapter, int trials,
                       int steps, uint64_t seed, const SchemeOptions& options);

}  // namespace si::attack
