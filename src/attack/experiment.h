// Experiments of the security evaluation: one (scheme, attack) pair run over seeds, its null distribution (the same
// attack on S5 serving a decoy adapter, scored against the victim's secret), intervals and a verdict; and the suite
// behind `secureinfer security-report`, which writes report.md, report.json and report.svg.
#pragma once
#include <compare>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attack/api_attacks.h"
#include "attack/attacks.h"
#include "attack/fidelity.h"
#include "attack/linalg.h"
#include "attack/package_path.h"
#include "attack/schemes.h"
#include "common/model.h"
#include "common/tokenizer.h"
#include "host/secure_session.h"
#include "train/lora.h"

namespace si::attack {

enum class Attack { a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13 };
// A9-A13 are the active attacks (attack/active.h).
inline bool is_active(Attack a) { return int(a) >= int(Attack::a9); }
const char* attack_name(Attack a);         // "A1" ...
const char* attack_description(Attack a);
std::optional<Attack> parse_attack(const std::string& s);

// How an API-level attack queries S5 (A6, A7), and which model A7 scores with. The default is the default API:
// sampled tokens only.
struct AttackVariant {
    int logprobs = 0;             // top-K log-probabilities the session releases (0: off, the default; -1: vocabulary)
    float logprob_noise = 0.0f;   // their Gaussian perturbation (SecureSessionParams::logprob_noise)
    bool nll_oracle = false;      // query the perplexity feature (SecureSession::eval_nll) instead of eval_sample
    bool white_box = false;       // A7: score with the fine-tuned weights as the scheme's trace exposes them
    // A7's positive control: S5 serves an adapter over-fitted on a few member windows (real membership signal),
    // judged by the same tokens-only attack.
    bool overfit = false;
    // A9-A13: the attack's positive control (the weak core, keyserver, credentials or unit store of attack/active.h)
    // instead of S5.
    bool weak = false;
    // S5 on the package path (A1-A13): how its sessions unblind (decode steps, and A4's passes, from precomputed
    // factors when not online).
    Unblinding unblinding = Unblinding::online;
    std::string label() const;    // "" for the default; e.g. "logprobs=512, noise=0.5"
};

// How much an experiment observed, summed over the victim's seeds: weight matrices, rows (masked vectors, windows,
// log-probability rows, tampered products), features per row, queries (passes, API calls, trials, forgeries). An
// entry whose `required` counts are zero on any seed did not run, which fails the suite.
struct Observations {
    int64_t matrices = 0, rows = 0, features = 0, queries = 0;
    std::vector<std::string> required;
    int64_t get(const std::string& k) const;
    bool ran() const;  // every required count positive
    void add(const Observations& o);  // sums the counts, features the largest; required kept
    nlohmann::json json() const;
};

struct EvalConfig {
    std::string model, tokenizer;     // public base (declared attacker knowledge)
    std::string victim_adapter;       // the private fine-tune (secret; used to run the victim and to score only)
    std::string shared_dir = "../shared";
    std::string work_dir;             // traces and decoys go here
    bool quick = false;
    int seeds = 3;
    int threads = 1;
    int a8_trials = 1000;
    EnclaveHostKind host = EnclaveHostKind::automatic;
    bool keep_traces = false;
    bool verbose = true;
    // security_report: called with (experiments done, experiments planned, the next one's name) before each
    // experiment and once at the end (name ""); may be empty.
    std::function<void(int done, int total, const std::string& next)> progress;
    // The shared significance level of the claims about S5 compared with their decoy null (paired, one-sided), and
    // the number of such claims it is split over (Bonferroni): each is tested at alpha / family.
    double alpha = 0.01;
    int family = 1;
};

// Everything an experiment needs, loaded once: the base, tokenizer, victim adapter, text streams, and the decoy
// adapters (one per seed, trained here on TinyStories with the project's trainer, never on the private corpus).
class EvalContext {
public:
    explicit EvalContext(const EvalConfig& cfg);
    ~EvalContext();  // removes a temporary work directory it created (unless keep_traces)
    const EvalConfig& config() const { return cfg_; }
    void set_family(int n) { cfg_.family = std::max(1, n); }
    // S5 as deployed: packages of the victim and the decoys, a keyserver, the registered device (created on first
    // use in the work directory).
    std::shared_ptr<PackagePath> package_path();
    const ModelWeights& base() const { return base_; }
    const train::LoraAdapter& victim() const { return victim_; }
    const train::LoraAdapter& decoy(int seed);  // trained on first use
    // `count` windows of `len` tokens (BOS first) from a text source ("persuasion", "tinystories"), at seeded
    // positions.
    std::vector<std::vector<int32_t>> prompts(const std::string& source, int count, int len, uint64_t seed);
    std::string trace_dir(const std::string& name);
    void drop_trace(const std::string& dir);
    double decoy_seconds() const { return decoy_seconds_; }
    int32_t bos() const { return tok_->bos(); }

    // The private corpus (the victim's five training novels, held-out tails removed: A5's budget is drawn from it,
    // A7's candidate windows come from it) and the whole of Persuasion (A5's held-out evaluation); loaded on first use.
    const train::TextCorpus& private_corpus();
    const std::vector<int32_t>& persuasion();
    // A5: perplexity on Persuasion of a model fine-tuned from `start` on seed's budget (cached: the trainer is
    // deterministic, so the same start and seed give the same model), of the victim, and the evaluation windows.
    double a5_fine_tuned_ppl(int seed, const ModelWeights& start);
    // The research's fidelity metrics of that fine-tuned model against the victim (attack/fidelity.h) on held-out
    // Persuasion prompts (computed with the perplexity, cached the same way).
    const Fidelity& a5_fidelity(int seed, const ModelWeights& start);
    double a5_victim_ppl();
    double a5_base_ppl();
    const std::vector<std::vector<int32_t>>& a5_eval_windows();
    // A7: the candidate windows of seed (members and never-trained windows of the victim's recipe) and the public
    // base's evaluation of them (the attacker's calibration), cached per seed.
    const MembershipSet& a7_set(int seed);
    const WindowEval& a7_base_eval(int seed);
    // A7's positive control: a few member windows of seed's set, over-fitted by an adapter of their own (trained
    // here, many epochs), against as many non-member windows; that adapter; the base's evaluation of the windows.
    // A7's null: a reference adapter of the victim's rank trained on the private corpus without seed's candidate
    // windows (the same text distribution; neither members nor non-members seen), cached per seed.
    const train::LoraAdapter& a7_reference(int seed);
    const MembershipSet& a7_overfit_set(int seed);
    const train::LoraAdapter& a7_overfit_adapter(int seed);
    const WindowEval& a7_overfit_base_eval(int seed);
    // What a scheme's trace leaks of the weights (leaked_weights), per (scheme, unblinding, served adapter, seed):
    // A1's trace and A5's (and A7 white-box's) are the same session, so the first one's is kept for the others.
    struct LeakKey {
        int scheme, unblinding;
        const train::LoraAdapter* adapter;
        int seed;
        auto operator<=>(const LeakKey&) const = default;
    };
    struct Leak {
        std::map<ProjKey, Mat> weights;
        std::string isolation;
    };
    const Leak* leak(const LeakKey& k) const {
        const auto it = leaks_.find(k);
        return it == leaks_.end() ? nullptr : &it->second;
    }
    void set_leak(const LeakKey& k, Leak l) { leaks_[k] = std::move(l); }

private:
    // Training options for an adapter shaped like the victim's (its rank and alpha), seeded, warmup 5, on the
    // configured threads; the caller sets steps, batch, context and learning rate.
    train::TrainOptions victim_shaped(uint64_t seed) const;
    const std::vector<int32_t>& text(const std::string& source);
    EvalConfig cfg_;
    ModelWeights base_;
    std::unique_ptr<Tokenizer> tok_;
    train::LoraAdapter victim_;
    std::vector<std::optional<train::LoraAdapter>> decoys_;
    std::map<std::string, std::vector<int32_t>> texts_;
    double decoy_seconds_ = 0.0;
    std::optional<train::TextCorpus> private_;
    std::optional<std::vector<int32_t>> persuasion_;
    std::vector<std::vector<int32_t>> a5_windows_;
    std::map<std::pair<int, uint64_t>, double> a5_ppl_;
    std::map<std::pair<int, uint64_t>, Fidelity> a5_fid_;
    std::vector<std::vector<int32_t>> fid_prompts_, fid_victim_;
    std::optional<double> a5_victim_ppl_, a5_base_ppl_;
    std::map<int, MembershipSet> a7_sets_;
    std::map<int, WindowEval> a7_base_;
    std::map<int, MembershipSet> a7_over_sets_;
    std::map<int, train::LoraAdapter> a7_over_, a7_ref_;
    std::map<int, WindowEval> a7_over_base_;
    std::shared_ptr<PackagePath> package_;
    std::map<LeakKey, Leak> leaks_;
    bool own_work_dir_ = false;
};

struct ExperimentResult {
    Scheme scheme = Scheme::s5;
    Attack attack = Attack::a1;
    std::string variant;           // AttackVariant::label(): "" for the default API
    bool informative = false;      // reported, but neither a positive control nor a claim about S5's default API
    std::string metric;            // name of the metric
    std::string direction;         // "higher leaks more" / "distance from 0.5 leaks"
    double threshold = 0.0;        // success threshold of the attack (positive controls must reach it)
    std::vector<double> values;    // per seed
    std::vector<double> null_values;  // per seed: the attack on S5 serving a decoy, scored against the victim
    Interval interval, null_interval;
    bool has_null = false;
    bool control = false;          // a weak scheme: the attack must break it
    bool broken = false;
    Observations obs;              // summed over the victim's seeds
    bool ran = true;               // every seed observed something (Observations::ran)
    PairedTest paired;             // victim against decoy (when has_null), paired by paired_units
    std::string paired_units = "seed";  // "seed", or (A1, A2) "seed x crossing slot"
    double level = 0.0;            // the paired test's level: alpha / family (0: no paired test)
    std::string isolation;         // the enclave host (S5) or "simulated"
    std::string policy;            // S5: the package's release policy (release_policy_name); "-" without a package
    nlohmann::json extra;          // secondary metrics per seed
    double seconds = 0.0;
    std::string verdict() const { return !ran ? "did not run" : broken ? "broken" : "not broken"; }
};

// Runs `attack` against `scheme` over cfg.seeds seeds (A8: cfg.a8_trials trials in all) and, for S5 (and A7 on any
// scheme), the decoy null.
ExperimentResult run_experiment(EvalContext& ctx, Scheme scheme, Attack attack, const AttackVariant& variant = {});
// A9-A13 (run_experiment calls it for them): one run against S5 on the package path, or against the attack's control.
ExperimentResult run_active_experiment(EvalContext& ctx, Attack attack, const AttackVariant& variant);

nlohmann::json result_json(const ExperimentResult& r);

// The suite: every (scheme, attack) pair the attacks apply to; writes report.md, report.json and report.svg into
// out_dir. Returns the results.
std::vector<ExperimentResult> security_report(EvalContext& ctx, const std::string& out_dir, const std::string& command);

}  // namespace si::attack
