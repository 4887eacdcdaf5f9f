// The evaluation's models and data (EvalContext): the public base and tokenizer, the victim adapter, text windows,
// decoy adapters trained on TinyStories, A5's fine-tuning and perplexities, A7's candidate windows.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "attack/eval_internal.h"
#include "attack/experiment.h"
#include "common/error.h"
#include "formats/model_file.h"
#include "train/trainer.h"

namespace si::attack {

namespace fs = std::filesystem;

namespace detail {

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

}  // namespace detail

using namespace detail;

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
    package_.reset();  // stops the keyserver
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

train::TrainOptions EvalContext::victim_shaped(uint64_t seed) const {
    train::TrainOptions o;
    o.lora_rank = victim_.tensors.empty() ? 8 : victim_.tensors[0].rank;
    o.lora_alpha = victim_.alpha;
    o.warmup = 5;
    o.seed = seed;
    o.threads = cfg_.threads;
    return o;
}

const train::LoraAdapter& EvalContext::decoy(int seed) {
    if (seed < 0) seed = 0;
    if (size_t(seed) >= decoys_.size()) decoys_.resize(size_t(seed) + 1);
    auto& slot = decoys_[size_t(seed)];
    if (slot) return *slot;
    const auto t0 = std::chrono::steady_clock::now();
    train::TrainOptions o = victim_shaped(1000 + uint64_t(seed));
    o.steps = cfg_.quick ? 30 : 60;
    o.batch = 4;
    o.ctx = 64;
    o.lr = 5e-3f;
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

namespace detail {

ApiAttackSizes api_sizes(bool quick) {
    if (quick) return {40, 4, 64, 48, 64, 48, 8, 3, 68, 72, 48, 128, 32};
    return {200, 8, 128, 128, 256, 96, 12, 3, 96, 128, 120, 256, 64};
}


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

}  // namespace detail

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
    if (fid_prompts_.empty()) {
        // held-out prompts: Persuasion windows at seeded positions, 32 tokens; the victim's greedy continuations
        fid_prompts_ = prompts("persuasion", cfg_.quick ? 32 : 64, 32, 777);
        fid_victim_ = greedy_continuations(merged_model(base_, victim_), fid_prompts_, 32, cfg_.threads);
    }
    a5_fid_[key] = fidelity(tuned, fid_prompts_, fid_victim_, cfg_.threads);
    if (cfg_.verbose)
        std::fprintf(stderr, "attack: A5 fine-tune (seed %d, %zu budget tokens) in %.1f s: perplexity %.3f\n", seed,
                     budget.train_tokens(), seconds_since(t0), ppl);
    return a5_ppl_[key] = ppl;
}

const Fidelity& EvalContext::a5_fidelity(int seed, const ModelWeights& start) {
    a5_fine_tuned_ppl(seed, start);
    return a5_fid_.at(std::make_pair(seed, weights_fingerprint(start)));
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

// A7's control: 8 member and 8 non-member windows of the seed's set, cut to 128 scored tokens (quick: 64); an adapter
// of the victim's rank over-fitted on the 8 members (100 steps of 8 windows: about 100 epochs; quick: 60).
namespace {
constexpr int kOverfitPerClass = 8;
int overfit_len(bool quick) { return quick ? 64 : 128; }
}

const train::LoraAdapter& EvalContext::a7_reference(int seed) {
    auto it = a7_ref_.find(seed);
    if (it != a7_ref_.end()) return it->second;
    const auto t0 = std::chrono::steady_clock::now();
    train::TrainOptions o = victim_shaped(4000 + uint64_t(seed));
    o.steps = cfg_.quick ? 30 : 60;
    o.batch = 4;
    o.ctx = 128;
    o.lr = 5e-3f;
    train::TextCorpus c = corpus_without(private_corpus(), a7_set(seed));
    std::erase_if(c.train, [&](const std::vector<int32_t>& t) { return int64_t(t.size()) < int64_t(o.ctx) + 2; });
    train::Trainer tr(base_, o, std::move(c));
    while (!tr.done()) tr.train_step();
    decoy_seconds_ += seconds_since(t0);
    if (cfg_.verbose)
        std::fprintf(stderr, "attack: A7 reference adapter %d (Austen without the candidate windows) in %.1f s\n", seed,
                     seconds_since(t0));
    return a7_ref_[seed] = tr.adapter("reference-" + std::to_string(seed));
}

const MembershipSet& EvalContext::a7_overfit_set(int seed) {
    auto it = a7_over_sets_.find(seed);
    if (it != a7_over_sets_.end()) return it->second;
    const MembershipSet& full = a7_set(seed);
    MembershipSet out;
    int taken[2] = {0, 0};
    for (size_t i = 0; i < full.windows.size(); ++i) {
        const int y = full.labels[i];
        if (taken[y] >= kOverfitPerClass) continue;
        ++taken[y];
        const auto& w = full.windows[i];
        out.windows.emplace_back(w.begin(), w.begin() + std::min<int64_t>(int64_t(w.size()), overfit_len(cfg_.quick) + 1));
        out.labels.push_back(y);
    }
    if (taken[0] < kOverfitPerClass || taken[1] < kOverfitPerClass)
        fail(Status::invalid_argument, "A7 control: too few candidate windows");
    return a7_over_sets_[seed] = std::move(out);
}

const train::LoraAdapter& EvalContext::a7_overfit_adapter(int seed) {
    auto it = a7_over_.find(seed);
    if (it != a7_over_.end()) return it->second;
    const auto t0 = std::chrono::steady_clock::now();
    const MembershipSet& set = a7_overfit_set(seed);
    train::TextCorpus mem;
    mem.bos = bos();
    for (size_t i = 0; i < set.windows.size(); ++i)
        if (set.labels[i] == 1) mem.train.emplace_back(set.windows[i].begin() + 1, set.windows[i].end());
    train::TrainOptions o = victim_shaped(3000 + uint64_t(seed));
    o.steps = cfg_.quick ? 60 : 100;
    o.batch = 8;
    o.ctx = overfit_len(cfg_.quick);
    o.lr = 1e-2f;
    train::Trainer tr(base_, o, std::move(mem));
    while (!tr.done()) tr.train_step();
    if (cfg_.verbose)
        std::fprintf(stderr, "attack: A7 control: adapter over-fitted on %d windows in %.1f s\n", kOverfitPerClass,
                     seconds_since(t0));
    return a7_over_[seed] = tr.adapter("overfit-" + std::to_string(seed));
}

const WindowEval& EvalContext::a7_overfit_base_eval(int seed) {
    auto it = a7_over_base_.find(seed);
    if (it != a7_over_base_.end()) return it->second;
    return a7_over_base_[seed] = eval_windows(base_, a7_overfit_set(seed).windows, api_sizes(cfg_.quick).a7_tail, cfg_.threads);
}

std::shared_ptr<PackagePath> EvalContext::package_path() {
    if (!package_) package_ = std::make_shared<PackagePath>(cfg_.model, cfg_.tokenizer, cfg_.work_dir + "/package-path", cfg_.host, cfg_.threads);
    return package_;
}

}  // namespace si::attack
