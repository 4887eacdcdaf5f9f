#include "attack/experiment.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "attack/eval_internal.h"
#include "common/error.h"
#include "formats/model_file.h"
#include "train/trainer.h"

namespace si::attack {

namespace fs = std::filesystem;
using namespace detail;

namespace {
// Per attack, in enum order: its name, what it does, the metric it reports, which way that metric leaks, and the
// value at which a scheme counts as broken.
struct AttackInfo {
    const char* name;
    const char* description;
    const char* metric;
    const char* direction;
    double threshold;
};
constexpr AttackInfo kAttacks[] = {
    {"A1", "alignment of offloaded weights with the public base (Hungarian matching, scale fit)", "delta cosine rho",
     "higher leaks more", 0.9},
    {"A2", "least-squares regression of the offloaded map from boundary inputs and outputs", "delta cosine rho",
     "higher leaks more", 0.9},
    {"A3", "mask hygiene: repeated masks within and across sessions", "mask repeat rate", "higher leaks more", 0.01},
    {"A4", "distinguishing the masked activations of two chosen prompts (logistic regression per token)", "AUC",
     "distance from 0.5 leaks", 0.9},
    {"A5",
     "surrogate fine-tuning from the base plus the weights the trace leaks, on 1% of the private corpus; leakage "
     "ratio on Persuasion",
     "leakage ratio L", "higher leaks more", 0.05},
    {"A6", "last-layer extraction from released log-probabilities (SVD, subspace cosine)", "subspace cosine",
     "higher leaks more", 0.9},
    {"A7", "membership inference on the adapter's training windows (calibrated loss / agreement, AUC)",
     "membership AUC", "higher leaks more", 0.9},
    {"A8", "tampering with accelerator results", "detection rate", "lower leaks more", 1.0},
    {"A9", "chosen public weights and configuration: the read-out construction reads the LoRA update through tokens",
     "update cosine", "higher leaks more", 0.9},
    {"A10", "sampler oracle: chosen seeds and temperatures (top-k 2) read the top-two logit gap by bisection",
     "logit-gap error (nats)", "lower leaks more", 0.01},
    {"A11", "forged quotes (the attacker's key, a claimed device key) and a replayed genuine quote for the model key",
     "model key recovered", "higher leaks more", 1.0},
    {"A12", "the host's user reads the device credentials and opens the sealed model key", "model key recovered",
     "higher leaks more", 1.0},
    {"A13", "replayed, reordered, foreign and altered sealed units and sealed model keys",
     "substitutions accepted (fraction)", "higher leaks more", 1e-9},
};
static_assert(std::size(kAttacks) == size_t(Attack::a13) + 1);

const AttackInfo& info(Attack a) { return kAttacks[size_t(a)]; }
}  // namespace

const char* attack_name(Attack a) { return info(a).name; }

const char* attack_description(Attack a) { return info(a).description; }

void detail::attack_metric(Attack a, ExperimentResult& r) {
    r.metric = info(a).metric;
    r.direction = info(a).direction;
    r.threshold = info(a).threshold;
}

std::optional<Attack> parse_attack(const std::string& s) {
    for (size_t i = 0; i < std::size(kAttacks); ++i) {
        const std::string n = kAttacks[i].name;
        if (s.size() == n.size() && std::tolower(s[0]) == 'a' && s.substr(1) == n.substr(1)) return Attack(i);
    }
    return std::nullopt;
}

std::string AttackVariant::label() const {
    std::string s;
    auto add = [&](const std::string& x) { s += (s.empty() ? "" : ", ") + x; };
    if (overfit) add("over-fitted control");
    if (weak) add("control");
    if (unblinding != Unblinding::online) add(unblinding_name(unblinding));
    if (white_box) add("white-box");
    if (nll_oracle) add("eval_nll oracle");
    if (logprobs != 0) add("logprobs=" + (logprobs < 0 ? std::string("vocab") : std::to_string(logprobs)));
    if (logprob_noise > 0.0f) {
        char b[32];
        std::snprintf(b, sizeof b, "%g", double(logprob_noise));
        add(std::string("noise=") + b);
    }
    return s;
}

int64_t Observations::get(const std::string& k) const {
    if (k == "matrices") return matrices;
    if (k == "rows") return rows;
    if (k == "features") return features;
    if (k == "queries") return queries;
    fail(Status::invalid_argument, "unknown observation count " + k);
}

bool Observations::ran() const {
    if (required.empty()) return false;
    for (const auto& k : required)
        if (get(k) <= 0) return false;
    return true;
}

void Observations::add(const Observations& o) {
    matrices += o.matrices;
    rows += o.rows;
    features = std::max(features, o.features);
    queries += o.queries;
    if (required.empty()) required = o.required;
}

nlohmann::json Observations::json() const {
    return {{"matrices", matrices}, {"rows", rows}, {"features", features}, {"queries", queries}, {"required", required}};
}

namespace {

// What a trace holds, by kind: accelerator weights, inputs, outputs, messages to and from the trusted core (with
// their bytes), token ids in and sampled tokens out.
nlohmann::json trace_summary(const TraceReader& tr) {
    int64_t weights = 0, acc_in = 0, acc_out = 0, to_core = 0, from_core = 0, to_bytes = 0, from_bytes = 0, sampled = 0;
    std::map<std::string, int64_t> kinds;
    for (const TraceEntry& e : tr.entries()) {
        if (e.op.rfind("enclave.", 0) == 0) {
            (e.role == "input" ? to_core : from_core) += 1;
            (e.role == "input" ? to_bytes : from_bytes) += e.count();
            ++kinds[e.op.substr(8) + (e.role == "input" ? " >" : " <")];
        } else if (e.role == "weight") {
            ++weights;
        } else if (e.layer >= 0 && e.role == "input") {
            ++acc_in;
        } else if (e.layer >= 0 && e.role == "output") {
            ++acc_out;
        } else if (e.op == "sample") {
            ++sampled;
        }
    }
    return {{"accelerator_weights", weights}, {"accelerator_inputs", acc_in}, {"accelerator_outputs", acc_out},
            {"messages_to_core", to_core},    {"bytes_to_core", to_bytes},    {"messages_from_core", from_core},
            {"bytes_from_core", from_bytes},  {"sampled_tokens", sampled},    {"messages_by_type", kinds}};
}

// A2's rows: the crossing inputs of the block projections in the trace (token rows).
int64_t a2_rows(const TraceReader& tr) {
    int64_t n = 0;
    for (const TraceEntry& e : tr.entries())
        if (e.role == "input" && e.layer >= 0 && e.op != "classifier") n += e.rows();
    return n;
}

SchemeOptions scheme_options(EvalContext& ctx, uint64_t seed) {
    SchemeOptions o;
    o.seed = seed + 1;
    o.threads = ctx.config().threads;
    o.host = ctx.config().host;
    return o;
}

// The trace attacks (A1-A5) see S5 as deployed: the package path, with output sampled after each prompt.
SchemeOptions trace_options(EvalContext& ctx, Scheme scheme, const AttackVariant& variant, uint64_t seed, int generate) {
    SchemeOptions o = scheme_options(ctx, seed);
    if (scheme == Scheme::s5) {
        o.package = ctx.package_path();
        o.unblinding = variant.unblinding;
        o.generate = generate;
    }
    return o;
}

// The release policy an API variant needs from the package's owner.
ReleasePolicy release_policy(const AttackVariant& v) {
    return v.logprobs != 0 || v.nll_oracle ? ReleasePolicy::permissive : ReleasePolicy::owner_default;
}

struct SeedOutcome {
    double value = 0.0;
    nlohmann::json extra;
    std::string isolation;
    // how much the attack observed: matrices, rows, features, queries (the ones that apply)
    Observations obs;
    // A1, A2: the delta cosine per crossing slot (slot_delta_cosines), the units of the paired test
    std::vector<double> slots;
};

// What the scheme's trace leaks of the weights: one short prompt is enough, since the weights cross at load time.
// A1's trace is that same session (one Persuasion prompt of 16 tokens, 4 sampled tokens, the same options), so when
// A1 ran first its trace's leak is reused (EvalContext::leak) instead of another session.
std::map<ProjKey, Mat> leaked_by_trace(EvalContext& ctx, Scheme scheme, const train::LoraAdapter& adapter,
                                       const SchemeOptions& base_opt, const std::string& name, int seed, SeedOutcome& out) {
    const EvalContext::LeakKey key{int(scheme), int(base_opt.unblinding), &adapter, seed};
    if (const auto* hit = ctx.leak(key)) {
        out.isolation = hit->isolation;
        return hit->weights;
    }
    SchemeOptions opt = base_opt;
    if (scheme == Scheme::s5 && !opt.package) {
        opt.package = ctx.package_path();
        opt.generate = 4;
    }
    const auto prompts = ctx.prompts("persuasion", 1, 16, uint64_t(seed));
    const std::string dir = ctx.trace_dir(name);
    out.isolation = run_scheme(scheme, ctx.base(), &adapter, prompts, dir, opt);
    std::map<ProjKey, Mat> est;
    {
        const TraceReader tr(dir);
        est = leaked_weights(tr, ctx.base());
    }
    ctx.drop_trace(dir);
    ctx.set_leak(key, {est, out.isolation});
    return est;
}

// One seed of one (scheme, attack) pair; `adapter` is what the scheme serves, `secret` what the score is against.
SeedOutcome run_seed(EvalContext& ctx, Scheme scheme, Attack attack, const AttackVariant& variant,
                     const train::LoraAdapter& adapter, const train::LoraAdapter& secret, int seed, const std::string& tag) {
    const bool quick = ctx.config().quick;
    const ModelWeights& base = ctx.base();
    SchemeOptions opt = scheme_options(ctx, uint64_t(seed));
    // S5's API (A6, A7, A8) is served from the package path, unblinded as the variant says: under the owner's
    // default policy when nothing but tokens is released, and from a package packed with a permissive policy
    // (log-probabilities of the whole vocabulary, NLL) for the variants that release log-probabilities or NLLs.
    if (scheme == Scheme::s5 && !variant.white_box &&
        (attack == Attack::a6 || attack == Attack::a7 || attack == Attack::a8)) {
        opt.package = ctx.package_path();
        opt.unblinding = variant.unblinding;
        opt.policy = release_policy(variant);
    }
    SeedOutcome out;
    const std::string name = std::string(scheme_name(scheme)) + "_" + attack_name(attack) + "_" + tag + "_" + std::to_string(seed);
    const ApiAttackSizes z = api_sizes(quick);
    switch (attack) {
        case Attack::a1:
        case Attack::a2: {
            const auto prompts = attack == Attack::a1 ? ctx.prompts("persuasion", 1, 16, uint64_t(seed))
                                                      : ctx.prompts("persuasion", quick ? 2 : 4, quick ? 128 : 256, uint64_t(seed));
            const std::string dir = ctx.trace_dir(name);
            out.isolation = run_scheme(scheme, base, &adapter, prompts, dir,
                                       trace_options(ctx, scheme, variant, uint64_t(seed), attack == Attack::a1 ? 4 : 8));
            const TraceReader tr(dir);
            double r2 = 0.0;
            const auto est = attack == Attack::a1 ? a1_align_weights(tr, base) : a2_regress(tr, base, &r2);
            if (attack == Attack::a1) {
                // A5's (and A7 white-box's) leak from this same session: what leaked_weights reads, which is A1's
                // alignment except for plaintext float weights of the base's shape (S0, S2), read as they are
                const bool plain = scheme == Scheme::s0 || scheme == Scheme::s2;
                ctx.set_leak({int(scheme), int(variant.unblinding), &adapter, seed},
                             {plain ? leaked_weights(tr, base) : est, out.isolation});
            }
            const DeltaScore s = score_delta(est, base, secret);
            out.value = s.rho;
            out.slots = slot_delta_cosines(est, base, secret);
            out.extra = {{"rho", s.rho}, {"rel_err", s.rel_err}, {"matrices", s.matrices}, {"slot_rho", out.slots}};
            if (attack == Attack::a2) out.extra["r2"] = r2;
            out.obs.matrices = s.matrices;
            out.obs.rows = attack == Attack::a2 ? a2_rows(tr) : 0;
            out.extra["trace"] = trace_summary(tr);
            out.obs.required = attack == Attack::a1 ? std::vector<std::string>{"matrices"}
                                                    : std::vector<std::string>{"matrices", "rows"};
            ctx.drop_trace(dir);
            break;
        }
        case Attack::a3: {
            const auto prompts = ctx.prompts("persuasion", quick ? 3 : 6, 64, uint64_t(seed));
            const std::string d1 = ctx.trace_dir(name + "_s1"), d2 = ctx.trace_dir(name + "_s2");
            const SchemeOptions o3 = trace_options(ctx, scheme, variant, uint64_t(seed), 8);
            out.isolation = run_scheme(scheme, base, &adapter, prompts, d1, o3);
            run_scheme(scheme, base, &adapter, prompts, d2, o3);
            const TraceReader r1(d1), r2(d2);
            const MaskHygiene h = a3_mask_hygiene({&r1, &r2});
            out.value = h.repeat_rate();
            out.extra = {{"rows", h.vectors},           {"repeated", h.repeated},
                         {"repeat_rate", h.repeat_rate()}, {"cross_session_rate", h.cross_rate()},
                         {"masks_per_slot", h.masks_per_slot}, {"rows_per_slot", h.rows_per_slot},
                         {"trace", trace_summary(r1)}};
            out.obs.rows = h.vectors;
            out.obs.required = {"rows"};
            ctx.drop_trace(d1);
            ctx.drop_trace(d2);
            break;
        }
        case Attack::a4: {
            // The indistinguishability game: the attacker picks two prompts (an Austen and a TinyStories window),
            // obtains traces of each with fresh masks, trains on half of them and guesses the prompt of the rest.
            const int P = quick ? 40 : 80, L = quick ? 16 : 24;
            const auto pa = ctx.prompts("persuasion", 1, L, uint64_t(seed) + 100);
            const auto pb = ctx.prompts("tinystories", 1, L, uint64_t(seed) + 100);
            std::vector<std::vector<int32_t>> all(size_t(P), pa[0]);
            all.insert(all.end(), size_t(P), pb[0]);
            std::vector<int> labels(size_t(P), 1);
            labels.insert(labels.end(), size_t(P), 0);
            const std::string dir = ctx.trace_dir(name);
            out.isolation = run_scheme(scheme, base, &adapter, all, dir, trace_options(ctx, scheme, variant, uint64_t(seed), 0));
            const TraceReader tr(dir);
            const std::vector<Mat> feats = trace_pass_features(tr);
            out.value = a4_distinguish(feats, labels, 1, uint64_t(seed));
            int64_t units = 0;
            for (const Mat& f : feats) units += f.rows;
            out.extra = {{"auc", out.value}, {"traces", feats.size()}, {"units", units},
                         {"features", feats.empty() ? 0 : feats[0].cols}};
            out.obs.rows = units;
            out.obs.features = feats.empty() ? 0 : feats[0].cols;
            out.obs.queries = int64_t(feats.size());
            out.obs.required = {"rows", "features", "queries"};
            ctx.drop_trace(dir);
            break;
        }
        case Attack::a5: {
            // What the trace leaks, merged into the base; then the same fine-tuning on the same budget as the
            // black-box baseline, which starts from the base.
            const std::map<ProjKey, Mat> est =
                leaked_by_trace(ctx, scheme, adapter, trace_options(ctx, scheme, variant, uint64_t(seed), 4), name, seed, out);
            const DeltaScore ds = score_delta(est, base, secret);
            const double bb = ctx.a5_fine_tuned_ppl(seed, base);
            const double sur = ctx.a5_fine_tuned_ppl(seed, apply_estimates(base, est));
            const double vic = ctx.a5_victim_ppl();
            out.value = leakage_ratio(bb, sur, vic);
            const train::TrainOptions to = a5_train_options(ctx.config(), seed);
            out.extra = {{"L", out.value},
                         {"ppl_blackbox", bb},
                         {"ppl_surrogate", sur},
                         {"ppl_victim", vic},
                         {"ppl_base", ctx.a5_base_ppl()},
                         {"leaked_delta_rho", ds.rho},
                         {"leaked_matrices", ds.matrices},
                         {"budget_tokens", budget_corpus(ctx.private_corpus(), kBudgetFraction, uint64_t(seed)).train_tokens()},
                         {"steps", to.steps},
                         {"batch", to.batch},
                         {"ctx", to.ctx},
                         {"eval_windows", ctx.a5_eval_windows().size()},
                         {"eval_len", ctx.a5_eval_windows().front().size() - 1}};
            {
                const ModelWeights sur_w = apply_estimates(base, est);
                const Fidelity fb = ctx.a5_fidelity(seed, base), fs = ctx.a5_fidelity(seed, sur_w);
                out.extra["token_match_blackbox"] = fb.token_match;
                out.extra["bleu_blackbox"] = fb.bleu;
                out.extra["token_match_surrogate"] = fs.token_match;
                out.extra["bleu_surrogate"] = fs.bleu;
                out.extra["fidelity_prompts"] = fs.prompts;
                out.extra["fidelity_tokens"] = fs.tokens;
            }
            out.obs.matrices = ds.matrices;
            out.obs.rows = int64_t(ctx.a5_eval_windows().size());
            out.obs.required = {"matrices", "rows"};
            break;
        }
        case Attack::a6: {
            LastLayerExtraction r;
            const int np = variant.nll_oracle ? z.a6_oracle_rows : z.a6_prompts;
            auto prompts = ctx.prompts("persuasion", np / 2, z.a6_prompt_len, uint64_t(seed) + 600);
            const auto more = ctx.prompts("tinystories", np - np / 2, z.a6_prompt_len, uint64_t(seed) + 600);
            prompts.insert(prompts.end(), more.begin(), more.end());
            if (variant.nll_oracle) {
                r = a6_nll_oracle(base, &adapter, prompts, z.a6_oracle_cols, uint64_t(seed), opt, &out.isolation);
            } else {
                const int K = variant.logprobs < 0 ? base.cfg.vocab_size : variant.logprobs;
                r = a6_logprob_queries(base, &adapter, prompts, z.a6_gen, K, variant.logprob_noise, opt, &out.isolation);
            }
            out.value = r.subspace_cos;
            nlohmann::json sv = nlohmann::json::array();
            const int d = r.hidden_dim;
            for (int i = std::max(0, d - 3); i < std::min<int>(int(r.singular_values.size()), d + 3); ++i)
                sv.push_back(r.singular_values[size_t(i)]);
            out.extra = {{"subspace_cos", r.subspace_cos},
                         {"min_cos", r.min_cos},
                         {"hidden_dim", r.hidden_dim},
                         {"true_dim", base.cfg.dim},
                         {"gap_ratio", r.gap},
                         {"singular_values_around_gap", sv},
                         {"rows", r.rows},
                         {"columns", r.columns},
                         {"queries", r.queries}};
            out.obs.rows = r.rows;
            out.obs.features = r.columns;
            out.obs.queries = r.queries;
            out.obs.required = {"queries"};  // logprobs off: queries answered with tokens only, no row
            break;
        }
        case Attack::a7: {
            const MembershipSet& set = variant.overfit ? ctx.a7_overfit_set(seed) : ctx.a7_set(seed);
            const WindowEval& ref = variant.overfit ? ctx.a7_overfit_base_eval(seed) : ctx.a7_base_eval(seed);
            std::vector<double> score, raw;
            std::string kind;
            int64_t queries = 0;
            if (variant.white_box) {
                // the fine-tuned weights as the scheme's trace exposes them, evaluated on the candidate windows
                const std::map<ProjKey, Mat> est = leaked_by_trace(ctx, scheme, adapter, opt, name, seed, out);
                const WindowEval m = eval_windows(apply_estimates(base, est), set.windows, 0, ctx.config().threads);
                for (size_t i = 0; i < m.nll.size(); ++i) {
                    score.push_back(ref.nll[i] - m.nll[i]);
                    raw.push_back(-m.nll[i]);
                }
                kind = "white-box: NLL of the window, minus the base's";
            } else {
                const int K = variant.logprobs < 0 ? base.cfg.vocab_size : variant.logprobs;
                const ApiWindowScores a = api_window_scores(base, &adapter, set.windows, variant.nll_oracle ? 0 : z.a7_tail, K,
                                                            variant.logprob_noise, variant.nll_oracle, opt, &out.isolation);
                queries = a.queries;
                for (size_t i = 0; i < set.windows.size(); ++i) {
                    if (variant.nll_oracle) {
                        score.push_back(ref.nll[i] - a.nll_oracle[i]);
                        raw.push_back(-a.nll_oracle[i]);
                    } else if (K > 0) {
                        score.push_back(ref.tail_nll[i] - a.tail_nll[i]);
                        raw.push_back(-a.tail_nll[i]);
                    } else {
                        score.push_back(a.tail_greedy[i] - ref.tail_greedy[i]);
                        raw.push_back(a.tail_greedy[i]);
                    }
                }
                kind = variant.nll_oracle ? "eval_nll oracle: NLL of the window, minus the base's"
                       : K > 0            ? "released log-probabilities: NLL of the last targets, minus the base's"
                                          : "tokens only: greedy agreement on the last targets, minus the base's";
            }
            const MembershipMetrics m = membership_metrics(score, set.labels);
            const MembershipMetrics u = membership_metrics(raw, set.labels);
            out.value = m.auc;
            out.extra = {{"auc", m.auc},
                         {"tpr_at_1pct_fpr", m.tpr_at_1pct},
                         {"auc_uncalibrated", u.auc},
                         {"score", kind},
                         {"windows", set.windows.size()},
                         {"window_len", set.windows.front().size() - 1},
                         {"queries", queries}};
            out.obs.rows = int64_t(set.windows.size());
            out.obs.queries = queries;
            out.obs.required = variant.white_box ? std::vector<std::string>{"rows"}
                                                 : std::vector<std::string>{"rows", "queries"};
            break;
        }
        default: break;
        case Attack::a8: {
            // the trials split over the seeds, the remainder going to the first ones; S5 with precomputed unblinding
            // gets a third of them per mode (the same Freivalds check, on W r from a unit instead of computed online;
            // a fresh session per trial is what costs)
            const int ns = std::max(ctx.config().seeds, 1);
            const int all = variant.unblinding == Unblinding::online ? ctx.config().a8_trials
                                                                     : std::max(1, ctx.config().a8_trials / 3);
            const int trials = std::max(1, all / ns + (seed < all % ns ? 1 : 0));
            const int n = scheme == Scheme::s5 ? trials : std::min(trials, 100);
            const TamperResult r = a8_tamper(scheme, base, &adapter, n, 3, uint64_t(seed), opt);
            out.value = r.trials ? double(r.detected) / double(r.trials) : 0.0;
            out.isolation = r.isolation;
            out.extra = {{"trials", r.trials},
                         {"tampered", r.tampered},
                         {"detected", r.detected},
                         {"undetected_output_changed", r.undetected_changed},
                         {"tokens_released_after_detection", r.released_after},
                         {"released_prefix_mismatch", r.prefix_mismatch}};
            out.obs.queries = r.trials;
            out.obs.rows = r.tampered;
            out.obs.required = {"queries", "rows"};
            break;
        }
    }
    return out;
}

}  // namespace

ExperimentResult run_experiment(EvalContext& ctx, Scheme scheme, Attack attack, const AttackVariant& variant) {
    if (is_active(attack)) {
        if (scheme != Scheme::s5) fail(Status::invalid_argument, std::string(attack_name(attack)) + " runs against S5 only");
        return run_active_experiment(ctx, attack, variant);
    }
    const auto t0 = std::chrono::steady_clock::now();
    ExperimentResult r;
    r.scheme = scheme;
    r.attack = attack;
    r.variant = variant.label();
    r.control = scheme != Scheme::s5 && !(scheme == Scheme::s2 && attack == Attack::a2);
    // A6: an API that releases exact log-probabilities is the attack's positive control; noisy ones and the
    // perplexity oracle are reported for information. A7: everything but S5's default API is informative.
    if (attack == Attack::a6) {
        r.control = variant.logprobs != 0 && variant.logprob_noise == 0.0f && !variant.nll_oracle;
        r.informative = variant.logprob_noise > 0.0f || variant.nll_oracle;
    }
    if (attack == Attack::a7) {
        r.control = variant.overfit;
        r.informative = !variant.overfit && (scheme != Scheme::s5 || !r.variant.empty());
    }
    // S5 runs on the package path (every attack here): under the owner's default policy, or the permissive one the
    // API variants releasing log-probabilities or NLLs need; the simulated schemes and white-box scores have none.
    r.policy = scheme == Scheme::s5 && !variant.white_box ? release_policy_name(release_policy(variant)) : "-";
    r.extra = nlohmann::json::array();
    r.metric = info(attack).metric;
    r.direction = info(attack).direction;
    r.threshold = info(attack).threshold;
    const int seeds = std::max(ctx.config().seeds, 1);
    nlohmann::json null_extra = nlohmann::json::array();
    int64_t detected = 0, trials = 0;
    // A1, A2: the per-slot values of victim and null, paired seed by seed and slot by slot
    std::vector<double> unit_victim, unit_null;
    bool units_paired = attack == Attack::a1 || attack == Attack::a2;
    r.obs.required.clear();
    r.ran = true;
    for (int s = 0; s < seeds; ++s) {
        const train::LoraAdapter& served = variant.overfit ? ctx.a7_overfit_adapter(s) : ctx.victim();
        SeedOutcome o = run_seed(ctx, scheme, attack, variant, served, served, s, "victim");
        r.values.push_back(o.value);
        o.extra["observations"] = o.obs.json();
        r.extra.push_back(o.extra);
        r.ran = r.ran && o.obs.ran();
        r.obs.add(o.obs);
        if (r.isolation.empty()) r.isolation = o.isolation;
        if (attack == Attack::a8) {
            detected += o.extra["detected"].get<int64_t>();
            trials += o.extra["trials"].get<int64_t>();
        }
        if (((scheme == Scheme::s5 && attack != Attack::a8) || attack == Attack::a7) && !variant.overfit) {
            // A7's null is a same-distribution reference (Austen without the candidate windows); the others' a
            // TinyStories decoy
            const train::LoraAdapter& null = attack == Attack::a7 ? ctx.a7_reference(s) : ctx.decoy(s);
            SeedOutcome n = run_seed(ctx, scheme, attack, variant, null, ctx.victim(), s, "decoy");
            r.null_values.push_back(n.value);
            if (units_paired && n.slots.size() == o.slots.size() && !o.slots.empty()) {
                unit_victim.insert(unit_victim.end(), o.slots.begin(), o.slots.end());
                unit_null.insert(unit_null.end(), n.slots.begin(), n.slots.end());
            } else {
                units_paired = false;
            }
            null_extra.push_back(n.extra);
        }
        if (ctx.config().verbose)
            std::fprintf(stderr, "attack: %s on %s%s seed %d: %s = %.4f%s\n", attack_name(attack), scheme_name(scheme),
                         r.variant.empty() ? "" : (" [" + r.variant + "]").c_str(), s, r.metric.c_str(), o.value,
                         r.null_values.size() == size_t(s + 1)
                             ? (" (decoy null " + std::to_string(r.null_values.back()) + ")").c_str()
                             : "");
    }
    r.interval = attack == Attack::a8 ? proportion_interval(detected, trials) : t_interval(r.values);
    if (!r.null_values.empty()) {
        r.has_null = true;
        r.null_interval = t_interval(r.null_values);
        r.extra = {{"victim", r.extra}, {"decoy", null_extra}};
        if (units_paired) r.extra["paired_per_seed"] = [&] {
            const PairedTest ps = paired_test(r.values, r.null_values);
            return nlohmann::json{{"seeds", ps.n}, {"mean_difference", ps.mean_diff}, {"t", ps.t}, {"p_one_sided", ps.p}};
        }();
    } else {
        r.extra = {{"victim", r.extra}};
    }
    // Verdicts. A weak scheme (or a control) is broken when the attack reaches its success threshold. A result with
    // a decoy null is broken when it reaches the threshold, or when the victim leaks more than the decoy seed by seed:
    // the paired one-sided t test at the shared level alpha / family (Bonferroni over the claims about S5). A4 leaks
    // by its distance from chance, |AUC - 0.5|.
    const double m = r.interval.mean;
    if (r.has_null) {
        std::vector<double> v = r.values, n = r.null_values;
        if (attack == Attack::a4)
            for (auto* x : {&v, &n})
                for (double& e : *x) e = std::abs(e - 0.5);
        // A1, A2: the pairs are (seed, crossing slot): each slot's estimate comes from its own crossings, so the
        // test has seeds x slots pairs instead of one per seed (docs/SECURITY-EVAL.md, "The A2 closest call")
        r.paired = units_paired ? paired_test(unit_victim, unit_null) : paired_test(v, n);
        r.paired_units = units_paired ? "seed x crossing slot" : "seed";
        r.level = ctx.config().alpha / double(std::max(1, ctx.config().family));
    }
    const bool paired_leak = r.has_null && r.paired.p < r.level;
    switch (attack) {
        case Attack::a1:
        case Attack::a2:
        case Attack::a3:
        case Attack::a5:
        case Attack::a6:
        case Attack::a7: r.broken = m >= r.threshold || paired_leak; break;
        case Attack::a4: r.broken = m >= r.threshold || std::abs(m - 0.5) > 0.03 || paired_leak; break;
        case Attack::a8: r.broken = detected < trials; break;
        default: break;
    }
    r.seconds = seconds_since(t0);
    return r;
}

nlohmann::json result_json(const ExperimentResult& r) {
    auto iv = [](const Interval& i) {
        return nlohmann::json{{"n", i.n}, {"mean", i.mean}, {"sd", i.sd}, {"ci95", {i.lo, i.hi}},
                              {"prediction95", {i.predict_lo, i.predict_hi}}};
    };
    nlohmann::json j = {{"scheme", scheme_name(r.scheme)},
                        {"scheme_description", scheme_description(r.scheme)},
                        {"attack", attack_name(r.attack)},
                        {"attack_description", attack_description(r.attack)},
                        {"variant", r.variant},
                        {"informative", r.informative},
                        {"metric", r.metric},
                        {"direction", r.direction},
                        {"threshold", r.threshold},
                        {"values", r.values},
                        {"interval", iv(r.interval)},
                        {"positive_control", r.control},
                        {"verdict", r.verdict()},
                        {"isolation", r.isolation},
                        {"policy", r.policy},
                        {"seconds", r.seconds},
                        {"observations", r.obs.json()},
                        {"ran", r.ran},
                        {"details", r.extra}};
    if (r.has_null) {
        j["null_values"] = r.null_values;
        j["null_interval"] = iv(r.null_interval);
        j["paired_test"] = {{"pairs", r.paired.n},           {"units", r.paired_units}, {"mean_difference", r.paired.mean_diff},
                            {"t", r.paired.t},               {"p_one_sided", r.paired.p}, {"level", r.level}};
    }
    return j;
}

}  // namespace si::attack
