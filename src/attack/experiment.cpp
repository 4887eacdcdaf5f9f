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

#include "common/error.h"
#include "formats/model_file.h"
#include "train/trainer.h"

namespace si::attack {

namespace fs = std::filesystem;

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
};
static_assert(std::size(kAttacks) == size_t(Attack::a8) + 1);

const AttackInfo& info(Attack a) { return kAttacks[size_t(a)]; }
}  // namespace

const char* attack_name(Attack a) { return info(a).name; }

const char* attack_description(Attack a) { return info(a).description; }

std::optional<Attack> parse_attack(const std::string& s) {
    for (Attack a : {Attack::a1, Attack::a2, Attack::a3, Attack::a4, Attack::a5, Attack::a6, Attack::a7, Attack::a8}) {
        const std::string n = attack_name(a);
        if (s == n || (s.size() == 2 && std::tolower(s[0]) == 'a' && s[1] == n[1])) return a;
    }
    return std::nullopt;
}

std::string AttackVariant::label() const {
    std::string s;
    auto add = [&](const std::string& x) { s += (s.empty() ? "" : ", ") + x; };
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

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string read_prefix(const std::string& path, size_t max_bytes) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(Status::io, path + ": cannot open");
    std::string s(max_bytes, '\0');
    f.read(s.data(), std::streamsize(max_bytes));
    s.resize(size_t(f.gcount()));
    return s;
}

}  // namespace

EvalContext::EvalContext(const EvalConfig& cfg) : cfg_(cfg) {
    ModelFile mf = load_model_file(cfg_.model, cfg_.tokenizer);
    base_ = std::move(mf.weights);
    tok_ = std::make_unique<Tokenizer>(mf.vocab, mf.vocab_path);
    victim_ = train::read_lora_adapter(cfg_.victim_adapter, base_.cfg);
    if (cfg_.work_dir.empty()) {
        cfg_.work_dir = (fs::temp_directory_path() / ("si-attack-" + std::to_string(getpid()))).string();
        own_work_dir_ = true;
    }
    fs::create_directories(cfg_.work_dir);
    decoys_.resize(size_t(std::max(cfg_.seeds, 1)));
}

EvalContext::~EvalContext() {
    if (own_work_dir_ && !cfg_.keep_traces) {
        std::error_code ec;
        fs::remove_all(cfg_.work_dir, ec);
    }
}

const std::vector<int32_t>& EvalContext::text(const std::string& source) {
    auto it = texts_.find(source);
    if (it != texts_.end()) return it->second;
    std::string file;
    if (source == "persuasion")
        file = cfg_.shared_dir + "/data/austen_persuasion.txt";
    else if (source == "tinystories")
        file = cfg_.shared_dir + "/data/tinystories_val.txt";
    else
        fail(Status::invalid_argument, "unknown text source " + source);
    // Enough text for every window the suite draws; the rest of the file is not needed.
    std::vector<int32_t> ids = tok_->encode(read_prefix(file, size_t(256) << 10), false);
    return texts_[source] = std::move(ids);
}

std::vector<std::vector<int32_t>> EvalContext::prompts(const std::string& source, int count, int len, uint64_t seed) {
    const std::vector<int32_t>& t = text(source);
    if (int64_t(t.size()) < len + 1) fail(Status::invalid_argument, source + ": text too short");
    SplitMix rng(seed * 0x632be59bd9b4e019ULL + std::hash<std::string>{}(source));
    std::vector<std::vector<int32_t>> out;
    for (int i = 0; i < count; ++i) {
        const size_t pos = size_t(rng.below(t.size() - size_t(len)));
        std::vector<int32_t> p = {tok_->bos()};
        p.insert(p.end(), t.begin() + int64_t(pos), t.begin() + int64_t(pos) + (len - 1));
        out.push_back(std::move(p));
    }
    return out;
}

const train::LoraAdapter& EvalContext::decoy(int seed) {
    if (seed < 0) seed = 0;
    if (size_t(seed) >= decoys_.size()) decoys_.resize(size_t(seed) + 1);
    auto& slot = decoys_[size_t(seed)];
    if (slot) return *slot;
    const auto t0 = std::chrono::steady_clock::now();
    train::TrainOptions o;
    o.lora_rank = victim_.tensors.empty() ? 8 : victim_.tensors[0].rank;
    o.lora_alpha = victim_.alpha;
    o.steps = cfg_.quick ? 30 : 60;
    o.batch = 4;
    o.ctx = 64;
    o.lr = 5e-3f;
    o.warmup = 5;
    o.seed = 1000 + uint64_t(seed);
    o.threads = cfg_.threads;
    // The decoy is fine-tuned separately, on other text (TinyStories), with its own seed.
    train::TextCorpus corpus;
    corpus.bos = tok_->bos();
    const std::vector<int32_t>& t = text("tinystories");
    const size_t cut = t.size() - t.size() / 50;
    corpus.train.emplace_back(t.begin(), t.begin() + int64_t(cut));
    corpus.eval.emplace_back(t.begin() + int64_t(cut), t.end());
    train::Trainer tr(base_, o, std::move(corpus));
    while (!tr.done()) tr.train_step();
    slot = tr.adapter("decoy-" + std::to_string(seed));
    decoy_seconds_ += seconds_since(t0);
    if (cfg_.verbose) std::fprintf(stderr, "attack: trained decoy adapter %d (%d steps) in %.1f s\n", seed, o.steps, seconds_since(t0));
    return *slot;
}

std::string EvalContext::trace_dir(const std::string& name) {
    const std::string d = cfg_.work_dir + "/" + name;
    std::error_code ec;
    fs::remove_all(d, ec);
    return d;
}

void EvalContext::drop_trace(const std::string& dir) {
    if (cfg_.keep_traces) return;
    std::error_code ec;
    fs::remove_all(dir, ec);
}

namespace {

// Sizes of A5-A7. The quick suite (CI) keeps them small: short perplexity windows and few training steps.
struct ApiAttackSizes {
    // A5
    int a5_steps, a5_batch, a5_ctx, a5_eval_windows, a5_eval_len;
    // A6
    int a6_prompts, a6_prompt_len, a6_gen, a6_oracle_rows, a6_oracle_cols;
    // A7
    int a7_per_class, a7_len, a7_tail;
};

ApiAttackSizes api_sizes(bool quick) {
    if (quick) return {40, 4, 64, 48, 64, 48, 8, 3, 68, 72, 48, 128, 32};
    return {200, 8, 128, 128, 256, 96, 12, 3, 96, 128, 120, 256, 64};
}

constexpr double kBudgetFraction = 0.01;  // A5: the attacker's share of the private corpus
constexpr float kA6Noise = 0.5f;          // A6: the Gaussian perturbation of the noisy variant (nats)

train::TrainOptions a5_train_options(const EvalConfig& cfg, int seed) {
    const ApiAttackSizes z = api_sizes(cfg.quick);
    train::TrainOptions o;
    o.lora_rank = 8;
    o.lora_alpha = 16.0f;
    o.steps = z.a5_steps;
    o.batch = z.a5_batch;
    o.ctx = z.a5_ctx;
    o.lr = 5e-3f;
    o.warmup = std::max(1, z.a5_steps / 10);
    o.seed = 2000 + uint64_t(seed);
    o.threads = cfg.threads;
    return o;
}

uint64_t weights_fingerprint(const ModelWeights& w) {
    uint64_t h = 0xcbf29ce484222325ULL;
    auto mix = [&](const std::vector<float>& v) {
        const auto* p = reinterpret_cast<const uint8_t*>(v.data());
        for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
    };
    mix(w.tok_embeddings);
    for (const auto& L : w.layers)
        for (const auto* t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3, &L.attn_norm, &L.ffn_norm}) mix(*t);
    mix(w.final_norm);
    mix(w.classifier);
    return h;
}

}  // namespace

const train::TextCorpus& EvalContext::private_corpus() {
    if (!private_) private_ = train::load_corpus(*tok_, private_corpus_files(cfg_.shared_dir), {}, kReferenceEvalFraction);
    return *private_;
}

const std::vector<int32_t>& EvalContext::persuasion() {
    if (!persuasion_) {
        const std::string f = cfg_.shared_dir + "/data/austen_persuasion.txt";
        persuasion_ = tok_->encode(read_prefix(f, size_t(1) << 30), false);
    }
    return *persuasion_;
}

const std::vector<std::vector<int32_t>>& EvalContext::a5_eval_windows() {
    if (a5_windows_.empty()) {
        const ApiAttackSizes z = api_sizes(cfg_.quick);
        a5_windows_ = even_windows(persuasion(), z.a5_eval_windows, z.a5_eval_len, bos());
    }
    return a5_windows_;
}

double EvalContext::a5_fine_tuned_ppl(int seed, const ModelWeights& start) {
    const auto key = std::make_pair(seed, weights_fingerprint(start));
    auto it = a5_ppl_.find(key);
    if (it != a5_ppl_.end()) return it->second;
    const auto t0 = std::chrono::steady_clock::now();
    const train::TextCorpus budget = budget_corpus(private_corpus(), kBudgetFraction, uint64_t(seed));
    const ModelWeights tuned = fine_tune(start, budget, a5_train_options(cfg_, seed));
    const double ppl = perplexity(eval_windows(tuned, a5_eval_windows(), 0, cfg_.threads));
    if (cfg_.verbose)
        std::fprintf(stderr, "attack: A5 fine-tune (seed %d, %zu budget tokens) in %.1f s: perplexity %.3f\n", seed,
                     budget.train_tokens(), seconds_since(t0), ppl);
    return a5_ppl_[key] = ppl;
}

double EvalContext::a5_victim_ppl() {
    if (!a5_victim_ppl_) a5_victim_ppl_ = perplexity(eval_windows(merged_model(base_, victim_), a5_eval_windows(), 0, cfg_.threads));
    return *a5_victim_ppl_;
}

double EvalContext::a5_base_ppl() {
    if (!a5_base_ppl_) a5_base_ppl_ = perplexity(eval_windows(base_, a5_eval_windows(), 0, cfg_.threads));
    return *a5_base_ppl_;
}

const MembershipSet& EvalContext::a7_set(int seed) {
    auto it = a7_sets_.find(seed);
    if (it != a7_sets_.end()) return it->second;
    const ApiAttackSizes z = api_sizes(cfg_.quick);
    return a7_sets_[seed] = membership_set(base_, private_corpus(), reference_recipe(), z.a7_per_class, z.a7_len,
                                           uint64_t(seed));
}

const WindowEval& EvalContext::a7_base_eval(int seed) {
    auto it = a7_base_.find(seed);
    if (it != a7_base_.end()) return it->second;
    return a7_base_[seed] = eval_windows(base_, a7_set(seed).windows, api_sizes(cfg_.quick).a7_tail, cfg_.threads);
}

namespace {

SchemeOptions scheme_options(const EvalContext& ctx, uint64_t seed) {
    SchemeOptions o;
    o.seed = seed + 1;
    o.threads = ctx.config().threads;
    o.host = ctx.config().host;
    return o;
}

struct SeedOutcome {
    double value = 0.0;
    nlohmann::json extra;
    std::string isolation;
};

// What the scheme's trace leaks of the weights: one short prompt is enough, since the weights cross at load time.
std::map<ProjKey, Mat> leaked_by_trace(EvalContext& ctx, Scheme scheme, const train::LoraAdapter& adapter,
                                       const SchemeOptions& opt, const std::string& name, int seed, SeedOutcome& out) {
    const auto prompts = ctx.prompts("persuasion", 1, 16, uint64_t(seed));
    const std::string dir = ctx.trace_dir(name);
    out.isolation = run_scheme(scheme, ctx.base(), &adapter, prompts, dir, opt);
    std::map<ProjKey, Mat> est;
    {
        const TraceReader tr(dir);
        est = leaked_weights(tr, ctx.base());
    }
    ctx.drop_trace(dir);
    return est;
}

// One seed of one (scheme, attack) pair; `adapter` is what the scheme serves, `secret` what the score is against.
SeedOutcome run_seed(EvalContext& ctx, Scheme scheme, Attack attack, const AttackVariant& variant,
                     const train::LoraAdapter& adapter, const train::LoraAdapter& secret, int seed, const std::string& tag) {
    const bool quick = ctx.config().quick;
    const ModelWeights& base = ctx.base();
    const SchemeOptions opt = scheme_options(ctx, uint64_t(seed));
    SeedOutcome out;
    const std::string name = std::string(scheme_name(scheme)) + "_" + attack_name(attack) + "_" + tag + "_" + std::to_string(seed);
    const ApiAttackSizes z = api_sizes(quick);
    switch (attack) {
        case Attack::a1:
        case Attack::a2: {
            const auto prompts = attack == Attack::a1 ? ctx.prompts("persuasion", 1, 16, uint64_t(seed))
                                                      : ctx.prompts("persuasion", quick ? 2 : 4, quick ? 128 : 256, uint64_t(seed));
            const std::string dir = ctx.trace_dir(name);
            out.isolation = run_scheme(scheme, base, &adapter, prompts, dir, opt);
            const TraceReader tr(dir);
            double r2 = 0.0;
            const auto est = attack == Attack::a1 ? a1_align_weights(tr, base) : a2_regress(tr, base, &r2);
            const DeltaScore s = score_delta(est, base, secret);
            out.value = s.rho;
            out.extra = {{"rho", s.rho}, {"rel_err", s.rel_err}, {"matrices", s.matrices}};
            if (attack == Attack::a2) out.extra["r2"] = r2;
            ctx.drop_trace(dir);
            break;
        }
        case Attack::a3: {
            const auto prompts = ctx.prompts("persuasion", quick ? 3 : 6, 64, uint64_t(seed));
            const std::string d1 = ctx.trace_dir(name + "_s1"), d2 = ctx.trace_dir(name + "_s2");
            out.isolation = run_scheme(scheme, base, &adapter, prompts, d1, opt);
            run_scheme(scheme, base, &adapter, prompts, d2, opt);
            const TraceReader r1(d1), r2(d2);
            const MaskHygiene h = a3_mask_hygiene({&r1, &r2});
            out.value = h.repeat_rate();
            out.extra = {{"rows", h.vectors},           {"repeated", h.repeated},
                         {"repeat_rate", h.repeat_rate()}, {"cross_session_rate", h.cross_rate()},
                         {"masks_per_slot", h.masks_per_slot}, {"rows_per_slot", h.rows_per_slot}};
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
            out.isolation = run_scheme(scheme, base, &adapter, all, dir, opt);
            const TraceReader tr(dir);
            const std::vector<Mat> feats = trace_pass_features(tr);
            out.value = a4_distinguish(feats, labels, 1, uint64_t(seed));
            out.extra = {{"auc", out.value}, {"traces", 2 * P}, {"units", int64_t(2 * P) * L},
                         {"features", feats.empty() ? 0 : feats[0].cols}};
            ctx.drop_trace(dir);
            break;
        }
        case Attack::a5: {
            // What the trace leaks, merged into the base; then the same fine-tuning on the same budget as the
            // black-box baseline, which starts from the base.
            const std::map<ProjKey, Mat> est = leaked_by_trace(ctx, scheme, adapter, opt, name, seed, out);
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
            break;
        }
        case Attack::a7: {
            const MembershipSet& set = ctx.a7_set(seed);
            const WindowEval& ref = ctx.a7_base_eval(seed);
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
            break;
        }
        case Attack::a8: {
            // the trials split over the seeds, the remainder going to the first ones
            const int ns = std::max(ctx.config().seeds, 1);
            const int trials = std::max(1, ctx.config().a8_trials / ns + (seed < ctx.config().a8_trials % ns ? 1 : 0));
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
            break;
        }
    }
    return out;
}

}  // namespace

ExperimentResult run_experiment(EvalContext& ctx, Scheme scheme, Attack attack, const AttackVariant& variant) {
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
        r.control = false;
        r.informative = scheme != Scheme::s5 || !r.variant.empty();
    }
    r.extra = nlohmann::json::array();
    r.metric = info(attack).metric;
    r.direction = info(attack).direction;
    r.threshold = info(attack).threshold;
    const int seeds = std::max(ctx.config().seeds, 1);
    nlohmann::json null_extra = nlohmann::json::array();
    int64_t detected = 0, trials = 0;
    for (int s = 0; s < seeds; ++s) {
        SeedOutcome o = run_seed(ctx, scheme, attack, variant, ctx.victim(), ctx.victim(), s, "victim");
        r.values.push_back(o.value);
        r.extra.push_back(o.extra);
        if (r.isolation.empty()) r.isolation = o.isolation;
        if (attack == Attack::a8) {
            detected += o.extra["detected"].get<int64_t>();
            trials += o.extra["trials"].get<int64_t>();
        }
        if ((scheme == Scheme::s5 && attack != Attack::a8) || attack == Attack::a7) {
            SeedOutcome n = run_seed(ctx, scheme, attack, variant, ctx.decoy(s), ctx.victim(), s, "decoy");
            r.null_values.push_back(n.value);
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
    } else {
        r.extra = {{"victim", r.extra}};
    }
    // Verdicts. A weak scheme is broken when the attack reaches its success threshold. S5 is broken when the score
    // reaches the threshold or lies beyond the decoy null's 95% prediction interval in the leaking direction.
    const double m = r.interval.mean;
    switch (attack) {
        case Attack::a1:
        case Attack::a2:
        case Attack::a3:
        case Attack::a5:
        case Attack::a6:
        case Attack::a7:
            r.broken = m >= r.threshold || (r.has_null && r.interval.lo > r.null_interval.predict_hi &&
                                            m - r.null_interval.mean > 1e-9);
            break;
        case Attack::a4:
            r.broken = m >= r.threshold || std::abs(m - 0.5) > 0.03 ||
                       (r.has_null && (r.interval.lo > r.null_interval.predict_hi || r.interval.hi < r.null_interval.predict_lo));
            break;
        case Attack::a8: r.broken = detected < trials; break;
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
                        {"seconds", r.seconds},
                        {"details", r.extra}};
    if (r.has_null) {
        j["null_values"] = r.null_values;
        j["null_interval"] = iv(r.null_interval);
    }
    return j;
}

namespace {

const char* kAttackerModel =
    "The attacker controls everything outside the enclave (DESIGN.md section 1): the host program, the accelerator "
    "and its memory, the disk, and every byte that crosses the enclave boundary, which it records as the boundary "
    "trace (DESIGN.md section 7: the weights uploaded to the accelerator, every masked input and every returned "
    "product). It knows the architecture, the tokenizer and the public base weights (stories260K), may hold public "
    "text, chooses the prompts, and may alter any product the accelerator returns (A8). It does not see inside the "
    "enclave: the adapter, the masks, the unmasked activations. Secrets are used only to score the attacks.";

std::string fmt(double v, int prec = 4) {
    char b[64];
    std::snprintf(b, sizeof b, "%.*f", prec, v);
    return b;
}

// "logprobs=512, noise=0.5" -> "lp512 n0.5": a bar label that fits.
std::string short_variant(const std::string& v) {
    std::string o;
    size_t i = 0;
    while (i < v.size()) {
        size_t j = v.find(", ", i);
        if (j == std::string::npos) j = v.size();
        std::string part = v.substr(i, j - i);
        if (part.rfind("logprobs=", 0) == 0) part = "lp" + part.substr(9);
        else if (part.rfind("noise=", 0) == 0) part = "n" + part.substr(6);
        else if (part == "eval_nll oracle") part = "nll";
        else if (part == "white-box") part = "wb";
        o += (o.empty() ? "" : " ") + part;
        i = j + 2;
    }
    return o;
}

std::string svg_escape(const std::string& s) {
    std::string o;
    for (char c : s) {
        if (c == '<') o += "&lt;";
        else if (c == '>') o += "&gt;";
        else if (c == '&') o += "&amp;";
        else o += c;
    }
    return o;
}

// One panel per attack: a bar per scheme (mean, 95% interval whiskers), the decoy null's prediction band on S5,
// and the attack's threshold as a dashed line. All metrics lie in [0, 1].
std::string render_svg(const std::vector<ExperimentResult>& rs) {
    std::vector<Attack> attacks;
    for (const auto& r : rs)
        if (std::find(attacks.begin(), attacks.end(), r.attack) == attacks.end()) attacks.push_back(r.attack);
    const int pw = 230, ph = 220, left = 40, top = 40, plot_h = 140;
    const int W = int(attacks.size()) * pw + 20, H = ph + 50;
    std::ostringstream o;
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    o << "<text x=\"10\" y=\"16\" font-size=\"13\" font-weight=\"bold\">secureinfer security evaluation: metric per "
         "scheme (mean, 95% CI; grey band: decoy null on S5; dashed: attack threshold; red: broken)</text>\n";
    for (size_t a = 0; a < attacks.size(); ++a) {
        const int x0 = int(a) * pw + 10;
        std::vector<const ExperimentResult*> col;
        for (const auto& r : rs)
            if (r.attack == attacks[a]) col.push_back(&r);
        const auto y_of = [&](double v) { return top + plot_h - int(std::lround(std::clamp(v, 0.0, 1.0) * plot_h)); };
        o << "<g>\n<text x=\"" << x0 + left << "\" y=\"" << top - 8 << "\" font-weight=\"bold\">" << attack_name(attacks[a])
          << ": " << svg_escape(col.front()->metric) << "</text>\n";
        o << "<line x1=\"" << x0 + left << "\" y1=\"" << top << "\" x2=\"" << x0 + left << "\" y2=\"" << top + plot_h
          << "\" stroke=\"black\"/>\n<line x1=\"" << x0 + left << "\" y1=\"" << top + plot_h << "\" x2=\"" << x0 + pw - 10
          << "\" y2=\"" << top + plot_h << "\" stroke=\"black\"/>\n";
        for (double t : {0.0, 0.5, 1.0})
            o << "<text x=\"" << x0 + left - 4 << "\" y=\"" << y_of(t) + 4 << "\" text-anchor=\"end\">" << fmt(t, 1) << "</text>\n";
        const double thr = col.front()->threshold;
        o << "<line x1=\"" << x0 + left << "\" y1=\"" << y_of(thr) << "\" x2=\"" << x0 + pw - 10 << "\" y2=\"" << y_of(thr)
          << "\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n";
        const int slot = (pw - left - 20) / int(std::max<size_t>(col.size(), 1));
        for (size_t i = 0; i < col.size(); ++i) {
            const ExperimentResult& r = *col[i];
            const int bx = x0 + left + 6 + int(i) * slot, bw = std::max(8, slot - 12);
            if (r.has_null) {
                const int y1 = y_of(r.null_interval.predict_hi), y2 = y_of(r.null_interval.predict_lo);
                o << "<rect x=\"" << bx - 3 << "\" y=\"" << y1 << "\" width=\"" << bw + 6 << "\" height=\"" << std::max(2, y2 - y1)
                  << "\" fill=\"#ccc\"/>\n";
            }
            const int yb = y_of(r.interval.mean);
            o << "<rect x=\"" << bx << "\" y=\"" << yb << "\" width=\"" << bw << "\" height=\"" << top + plot_h - yb
              << "\" fill=\"" << (r.broken ? "#d62728" : "#2ca02c") << "\" fill-opacity=\"0.8\"/>\n";
            const int yl = y_of(r.interval.lo), yh = y_of(r.interval.hi), cx = bx + bw / 2;
            o << "<line x1=\"" << cx << "\" y1=\"" << yl << "\" x2=\"" << cx << "\" y2=\"" << yh << "\" stroke=\"black\"/>\n";
            o << "<text x=\"" << cx << "\" y=\"" << top + plot_h + 14 << "\" text-anchor=\"middle\">" << scheme_name(r.scheme)
              << "</text>\n<text x=\"" << cx << "\" y=\"" << top + plot_h + 28 << "\" text-anchor=\"middle\" font-size=\"9\">"
              << fmt(r.interval.mean, 3) << "</text>\n";
            if (!r.variant.empty())
                o << "<text x=\"" << cx << "\" y=\"" << top + plot_h + 40 << "\" text-anchor=\"middle\" font-size=\"7\">"
                  << svg_escape(short_variant(r.variant)) << "</text>\n";
        }
        o << "</g>\n";
    }
    o << "</svg>\n";
    return o.str();
}

}  // namespace

std::vector<ExperimentResult> security_report(EvalContext& ctx, const std::string& out_dir, const std::string& command) {
    const auto t0 = std::chrono::steady_clock::now();
    fs::create_directories(out_dir);
    // (scheme, attack, positive control: the attack must break the scheme, variant, informative). A2 on S2 is
    // informative: float masks keep the adapter out of the products (A4 is what breaks S2). A6's control is an API
    // releasing exact log-probabilities; its noisy and perplexity-oracle variants, and A7's variants other than S5's
    // default API, are informative.
    struct Planned {
        Scheme s;
        Attack a;
        bool control;
        AttackVariant v = {};
        bool informative = false;
    };
    AttackVariant lp, lp_noise, oracle, white;
    lp.logprobs = -1;
    lp_noise.logprobs = -1;
    lp_noise.logprob_noise = kA6Noise;
    oracle.nll_oracle = true;
    white.white_box = true;
    const std::vector<Planned> plan = {
        {Scheme::s1, Attack::a1, true},  {Scheme::s0, Attack::a1, true},  {Scheme::s5, Attack::a1, false},
        {Scheme::s0, Attack::a2, true},  {Scheme::s1, Attack::a2, true},  {Scheme::s2, Attack::a2, false, {}, true},
        {Scheme::s5, Attack::a2, false}, {Scheme::s3, Attack::a3, true},  {Scheme::s5, Attack::a3, false},
        {Scheme::s2, Attack::a4, true},  {Scheme::s5, Attack::a4, false}, {Scheme::s0, Attack::a5, true},
        {Scheme::s1, Attack::a5, true},  {Scheme::s5, Attack::a5, false}, {Scheme::s5, Attack::a6, true, lp},
        {Scheme::s5, Attack::a6, false, lp_noise, true}, {Scheme::s5, Attack::a6, false, oracle, true},
        {Scheme::s5, Attack::a6, false}, {Scheme::s0, Attack::a7, false, white, true},
        {Scheme::s5, Attack::a7, false, oracle, true}, {Scheme::s5, Attack::a7, false, lp, true},
        {Scheme::s5, Attack::a7, false}, {Scheme::s3, Attack::a8, true},  {Scheme::s5, Attack::a8, false},
    };
    std::vector<ExperimentResult> rs;
    for (const auto& p : plan) {
        if (ctx.config().progress)
            ctx.config().progress(int(rs.size()), int(plan.size()),
                                  std::string(attack_name(p.a)) + " on " + scheme_name(p.s));
        rs.push_back(run_experiment(ctx, p.s, p.a, p.v));
        rs.back().control = p.control;
        rs.back().informative = p.informative;
        const auto& r = rs.back();
        if (ctx.config().verbose)
            std::fprintf(stderr, "attack: %s on %s%s: %s %.4f [%.4f, %.4f] -> %s (%.1f s)\n", attack_name(p.a),
                         scheme_name(p.s), r.variant.empty() ? "" : (" [" + r.variant + "]").c_str(), r.metric.c_str(),
                         r.interval.mean, r.interval.lo, r.interval.hi, r.verdict().c_str(), r.seconds);
    }
    if (ctx.config().progress) ctx.config().progress(int(rs.size()), int(plan.size()), "");
    const double total = seconds_since(t0);
    std::string isolation;
    for (const auto& r : rs)
        if (r.scheme == Scheme::s5 && !r.isolation.empty()) isolation = r.isolation;
    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));

    nlohmann::json j;
    j["command"] = command;
    j["date"] = date;
    j["quick"] = ctx.config().quick;
    j["seeds"] = ctx.config().seeds;
    j["build"] = {{"enclave_host", isolation},
                  {"compiler", __VERSION__},
                  {"schemes_S0_S3", "simulated on the trusted core's staged forward pass (src/attack/schemes.cpp)"}};
    j["attacker_model"] = kAttackerModel;
    j["model"] = ctx.config().model;
    j["victim_adapter"] = ctx.config().victim_adapter;
    j["decoys"] = "LoRA adapters of the victim's rank, trained on TinyStories with the project's trainer, one per seed";
    j["seconds"] = total;
    j["entries"] = nlohmann::json::array();
    for (const auto& r : rs) j["entries"].push_back(result_json(r));
    {
        std::ofstream f(out_dir + "/report.json");
        f << j.dump(2) << "\n";
    }
    {
        std::ofstream f(out_dir + "/report.svg");
        f << render_svg(rs);
    }
    std::ostringstream md;
    md << "# secureinfer security report\n\n";
    md << "- command: `" << command << "`\n- date: " << date << "\n- build: enclave host for S5: **" << isolation
       << "**; S0-S3 simulated on the trusted core's staged forward pass\n- model: `" << ctx.config().model
       << "`; victim adapter: `" << ctx.config().victim_adapter << "`\n- seeds: " << ctx.config().seeds
       << (ctx.config().quick ? " (quick)" : "") << "; total time " << fmt(total, 1) << " s (decoy training "
       << fmt(ctx.decoy_seconds(), 1) << " s)\n\n";
    md << "## Attacker model\n\n" << kAttackerModel << "\n\n";
    md << "## Results\n\nThe null is the same attack on S5 (A7: on the same scheme) serving a decoy adapter (trained "
          "separately, on TinyStories), scored against the victim's secret; its 95% prediction interval is shown. Weak "
          "schemes are positive controls: the attack must break them (A6: an API releasing exact log-probabilities). "
          "Informative entries (other API settings, the perplexity feature as an oracle, white-box membership) are "
          "reported but are no claim about S5's default API. A5: L = (PPL_blackbox - PPL_surrogate) / (PPL_blackbox - "
          "PPL_victim) on Persuasion, surrogate and black-box fine-tuned on the same 1% of the private corpus.\n\n";
    md << "| scheme | attack | metric | mean | 95% CI | decoy null (95% PI) | verdict | control | time |\n";
    md << "|---|---|---|---:|---|---|---|---|---:|\n";
    for (const auto& r : rs) {
        md << "| " << scheme_name(r.scheme) << (r.variant.empty() ? "" : " (" + r.variant + ")") << " | "
           << attack_name(r.attack) << " | " << r.metric << " | " << fmt(r.interval.mean) << " | [" << fmt(r.interval.lo)
           << ", " << fmt(r.interval.hi) << "] | "
           << (r.has_null ? "[" + fmt(r.null_interval.predict_lo) + ", " + fmt(r.null_interval.predict_hi) + "]" : "–")
           << " | **" << r.verdict() << "** | " << (r.control ? "yes" : r.informative ? "no (informative)" : "no") << " | "
           << fmt(r.seconds, 1) << " s |\n";
    }
    md << "\n## Details per experiment\n\n";
    for (const auto& r : rs) {
        md << "- **" << attack_name(r.attack) << " on " << scheme_name(r.scheme)
           << (r.variant.empty() ? "" : " (" + r.variant + ")") << "** (" << scheme_description(r.scheme)
           << "; " << attack_description(r.attack) << "): per seed `" << r.extra.dump() << "`\n";
    }
    md << "\nPlot: report.svg. Machine-readable: report.json.\n";
    {
        std::ofstream f(out_dir + "/report.md");
        f << md.str();
    }
    return rs;
}

}  // namespace si::attack
