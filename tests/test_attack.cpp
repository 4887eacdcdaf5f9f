// Security evaluation (src/attack): the numerical core (Hungarian, SVD, Procrustes, least squares, AUC, intervals)
// and the positive controls of DESIGN.md section 8 on small sizes: A1 recovers S1's fine-tuned weights, A2 recovers
// S0's LoRA delta, A3 flags S3's static masks and not S5's, A4 separates S2's float-masked traces, A8 catches every
// tampered product on S5; and on S5 (the production SecureSession and its boundary trace) A1-A4 find nothing. A5-A7:
// the surrogate gains from S0's leaked weights and not from S5's; the last layer comes out of released
// log-probabilities and nothing comes out without them; membership labels are right and a memorising adapter is
// caught.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "attack/api_attacks.h"
#include "attack/attacks.h"
#include "attack/experiment.h"
#include "attack/fidelity.h"
#include "attack/linalg.h"
#include "attack/schemes.h"
#include "attack/trace_reader.h"
#include "common/tokenizer.h"
#include "formats/llama2c.h"
#include "formats/model_file.h"
#include "testutil.h"
#include "train/trainer.h"

using namespace si;
using namespace si::attack;

namespace {

using test::stories;

// A random LoRA adapter on every projection (B != 0), with a delta of a few percent of the base weights, like a
// trained one.
train::LoraAdapter random_adapter(const ModelConfig& cfg, int rank, uint64_t seed, float magnitude = 0.05f) {
    SplitMix rng(seed);
    return test::lora_on_every_projection(
        cfg, rank, float(rank), [&](const ProjShape& s) { return float(rng.normal() / std::sqrt(double(s.cols))); },
        [&](const ProjShape&) { return float(magnitude * rng.normal()); });
}

std::vector<std::vector<int32_t>> token_prompts(int count, int len, uint64_t seed) {
    SplitMix rng(seed);
    std::vector<std::vector<int32_t>> out;
    for (int i = 0; i < count; ++i) {
        std::vector<int32_t> p = {1};
        for (int t = 1; t < len; ++t) p.push_back(int32_t(3 + rng.below(500)));
        out.push_back(p);
    }
    return out;
}

}  // namespace

TEST(AttackMath, HungarianFindsTheOptimalAssignment) {
    Mat c(3, 4);
    const double v[] = {4, 1, 3, 9, 2, 0, 5, 9, 3, 2, 2, 9};
    c.a.assign(std::begin(v), std::end(v));
    const auto a = hungarian(c);
    EXPECT_EQ(a, (std::vector<int>{1, 0, 2}));  // 1 + 2 + 2 = 5 is the minimum
    // a random permutation is recovered from a noisy similarity
    SplitMix rng(5);
    const auto perm = random_permutation(40, rng);
    Mat cost(40, 40);
    for (int i = 0; i < 40; ++i)
        for (int j = 0; j < 40; ++j) cost(i, j) = (perm[size_t(i)] == j ? -1.0 : 0.0) + 0.3 * rng.uniform();
    const auto b = hungarian(cost);
    for (int i = 0; i < 40; ++i) EXPECT_EQ(b[size_t(i)], perm[size_t(i)]);
}

TEST(AttackMath, SvdProcrustesAndPrincipalAngles) {
    SplitMix rng(7);
    Mat A(9, 5);
    for (auto& v : A.a) v = rng.normal();
    const Svd s = svd(A);
    // U S V^T reconstructs A; singular values descend
    for (int64_t i = 0; i < 9; ++i)
        for (int64_t j = 0; j < 5; ++j) {
            double r = 0;
            for (int k = 0; k < 5; ++k) r += s.U(i, k) * s.S[size_t(k)] * s.V(j, k);
            EXPECT_NEAR(r, A(i, j), 1e-10);
        }
    for (size_t k = 1; k < s.S.size(); ++k) EXPECT_GE(s.S[k - 1], s.S[k]);
    // Procrustes recovers a rotation
    const Svd q = svd(Mat([&] {
        Mat m(5, 5);
        for (auto& v : m.a) v = rng.normal();
        return m;
    }()));
    const Mat R = matmul(q.U, transpose(q.V));
    const Mat B = matmul(A, R);
    const Mat Rh = procrustes(A, B);
    for (size_t i = 0; i < R.a.size(); ++i) EXPECT_NEAR(Rh.a[i], R.a[i], 1e-9);
    const auto pc = principal_cosines(A, B);
    EXPECT_NEAR(pc.front(), 1.0, 1e-9);
}

TEST(AttackMath, LeastSquaresAucAndIntervals) {
    SplitMix rng(9);
    Mat X(50, 4), W(3, 4);
    for (auto& v : X.a) v = rng.normal();
    for (auto& v : W.a) v = rng.normal();
    const Mat Y = matmul(X, transpose(W));
    double r2 = 0;
    const Mat Wh = least_squares(X, Y, 1e-12, &r2);
    for (size_t i = 0; i < W.a.size(); ++i) EXPECT_NEAR(Wh.a[i], W.a[i], 1e-6);
    EXPECT_NEAR(r2, 1.0, 1e-9);
    EXPECT_DOUBLE_EQ(roc_auc({0.1, 0.4, 0.35, 0.8}, {0, 0, 1, 1}), 0.75);
    EXPECT_DOUBLE_EQ(roc_auc({1, 1, 1, 1}, {0, 1, 0, 1}), 0.5);
    EXPECT_DOUBLE_EQ(tpr_at_fpr({0.1, 0.2, 0.9, 0.95}, {0, 0, 1, 1}, 0.01), 1.0);
    const Interval t = t_interval({1.0, 2.0, 3.0});
    EXPECT_NEAR(t.lo, 2.0 - 4.303 * 1.0 / std::sqrt(3.0), 1e-9);
    const Interval p = proportion_interval(1000, 1000);
    EXPECT_NEAR(p.lo, std::pow(0.025, 1.0 / 1000), 1e-6);  // Clopper-Pearson with no failures
    EXPECT_EQ(p.hi, 1.0);
}

// The paired one-sided test behind the verdicts against a decoy null, and the rule that an experiment which observed
// nothing did not run.
TEST(AttackMath, PairedTestAndObservations) {
    // Student t tails against tabulated values: P(T > 2.776 | df 4) = 0.025, P(T > 12.706 | df 1) = 0.025,
    // P(T > 1.833 | df 9) = 0.05; symmetric about 0.
    EXPECT_NEAR(t_upper_tail(2.776, 4), 0.025, 2e-4);
    EXPECT_NEAR(t_upper_tail(12.706, 1), 0.025, 2e-4);
    EXPECT_NEAR(t_upper_tail(1.833, 9), 0.05, 2e-4);
    EXPECT_NEAR(t_upper_tail(0.0, 7), 0.5, 1e-12);
    EXPECT_NEAR(t_upper_tail(-1.833, 9), 0.95, 2e-4);
    // victim above decoy on every seed with little spread: significant; the reverse, or equal values: not
    const PairedTest up = paired_test({0.56, 0.55, 0.57, 0.58, 0.56}, {0.50, 0.49, 0.52, 0.50, 0.51});
    EXPECT_EQ(up.n, 5);
    EXPECT_NEAR(up.mean_diff, 0.06, 1e-12);
    EXPECT_NEAR(up.t, 0.06 / (std::sqrt(0.0006 / 4.0) / std::sqrt(5.0)), 1e-9);
    EXPECT_GT(up.p, 1e-4);  // t = 10.95 with 4 degrees of freedom: p = 0.0002
    EXPECT_LT(up.p, 3e-4);
    EXPECT_GT(paired_test({0.50, 0.49, 0.52, 0.50, 0.51}, {0.56, 0.55, 0.57, 0.58, 0.56}).p, 0.999);
    EXPECT_EQ(paired_test({0.0053, 0.0053, 0.0053}, {0.0053, 0.0053, 0.0053}).p, 1.0);
    EXPECT_EQ(paired_test({0.2, 0.2, 0.2}, {0.1, 0.1, 0.1}).p, 0.0);  // a constant positive difference
    EXPECT_EQ(paired_test({}, {}).p, 1.0);
    Observations o;
    o.required = {"matrices", "rows"};
    EXPECT_FALSE(o.ran());
    o.matrices = 35;
    EXPECT_FALSE(o.ran()) << "no rows observed";
    o.rows = 1;
    EXPECT_TRUE(o.ran());
    EXPECT_FALSE(Observations{}.ran()) << "nothing required: nothing said what the attack observed";
}

// BLEU of the fidelity metrics: identical continuations score 1, a known case by hand, and the brevity penalty.
TEST(AttackMath, CorpusBleu) {
    const std::vector<std::vector<int32_t>> ref = {{1, 2, 3, 4, 5, 6, 7, 8}};
    EXPECT_NEAR(corpus_bleu(ref, ref), 1.0, 1e-12);
    // one token changed in the middle: 1-grams 7/8, 2-grams 5/7, 3-grams 3/6, 4-grams 1/5
    const std::vector<std::vector<int32_t>> one = {{1, 2, 3, 9, 5, 6, 7, 8}};
    EXPECT_NEAR(corpus_bleu(one, ref), std::pow(7.0 / 8 * 5.0 / 7 * 3.0 / 6 * 1.0 / 5, 0.25), 1e-12);
    // nothing in common: every order smoothed to 0.1 match
    const std::vector<std::vector<int32_t>> none = {{20, 21, 22, 23, 24, 25, 26, 27}};
    EXPECT_NEAR(corpus_bleu(none, ref), std::pow(0.1 / 8 * 0.1 / 7 * 0.1 / 6 * 0.1 / 5, 0.25), 1e-12);
    // a prefix half as long: all n-grams match, brevity penalty exp(1 - 8/4)
    const std::vector<std::vector<int32_t>> half = {{1, 2, 3, 4}};
    EXPECT_NEAR(corpus_bleu(half, ref), std::exp(1.0 - 2.0), 1e-12);
}

// A1 on S1: the obfuscated fine-tuned weights (permutations, scales, fake rows) are aligned with the public base;
// the recovered delta matches the adapter's. On S5 the weights are the public base only.
TEST(AttackControls, A1RecoversS1AndFindsNothingOnS5) {
    const auto ad = random_adapter(stories().cfg, 4, 11);
    const auto prompts = token_prompts(1, 8, 1);
    const std::string dir = test::scratch_dir();
    SchemeOptions o;
    o.seed = 3;
    run_scheme(Scheme::s1, stories(), &ad, prompts, dir + "/s1", o);
    const DeltaScore s1 = score_delta(a1_align_weights(TraceReader(dir + "/s1"), stories()), stories(), ad);
    EXPECT_EQ(s1.matrices, 35);
    EXPECT_GE(s1.rho, 0.9) << "rel err " << s1.rel_err;
    run_scheme(Scheme::s5, stories(), &ad, prompts, dir + "/s5", o);
    const DeltaScore s5 = score_delta(a1_align_weights(TraceReader(dir + "/s5"), stories()), stories(), ad);
    EXPECT_EQ(s5.matrices, 35);
    EXPECT_LT(std::abs(s5.rho), 0.1);
}

// A2 on S0: regression of the offloaded map from inputs and outputs recovers the LoRA delta; on S5 the masked,
// wrapped products give nothing.
TEST(AttackControls, A2RecoversS0AndFindsNothingOnS5) {
    const auto ad = random_adapter(stories().cfg, 4, 12);
    const auto prompts = token_prompts(2, 128, 2);
    const std::string dir = test::scratch_dir();
    SchemeOptions o;
    run_scheme(Scheme::s0, stories(), &ad, prompts, dir + "/s0", o);
    double r2 = 0;
    const DeltaScore s0 = score_delta(a2_regress(TraceReader(dir + "/s0"), stories(), &r2), stories(), ad);
    EXPECT_GE(s0.rho, 0.9);
    EXPECT_GT(r2, 0.999);
    run_scheme(Scheme::s5, stories(), &ad, prompts, dir + "/s5", o);
    const DeltaScore s5 = score_delta(a2_regress(TraceReader(dir + "/s5"), stories(), &r2), stories(), ad);
    EXPECT_LT(std::abs(s5.rho), 0.1);
    EXPECT_LT(r2, 0.05);
}

// A3: S3's reused static masks are found (within a session and across sessions); S5's one-time pads never repeat.
TEST(AttackControls, A3FlagsS3AndNotS5) {
    const auto ad = random_adapter(stories().cfg, 2, 13);
    const auto prompts = token_prompts(2, 16, 3);
    const std::string dir = test::scratch_dir();
    SchemeOptions o;
    for (const char* s : {"s3a", "s3b"}) run_scheme(Scheme::s3, stories(), &ad, prompts, dir + "/" + s, o);
    const TraceReader a(dir + "/s3a"), b(dir + "/s3b");
    const MaskHygiene h3 = a3_mask_hygiene({&a, &b});
    EXPECT_GT(h3.vectors, 0);
    EXPECT_GT(h3.repeat_rate(), 0.9);
    EXPECT_GT(h3.cross_rate(), 0.9);
    EXPECT_NEAR(h3.masks_per_slot, 4.0, 0.5);
    for (const char* s : {"s5a", "s5b"}) run_scheme(Scheme::s5, stories(), &ad, prompts, dir + "/" + s, o);
    const TraceReader c(dir + "/s5a"), d(dir + "/s5b");
    const MaskHygiene h5 = a3_mask_hygiene({&c, &d});
    EXPECT_EQ(h5.vectors, h3.vectors);
    EXPECT_EQ(h5.repeated, 0);
    EXPECT_EQ(h5.cross_session, 0);
}

// A4, the indistinguishability game: traces of two chosen prompts (fresh masks each time); a classifier trained on
// some traces tells S2's float-masked activations apart; on S5 it is at chance.
TEST(AttackControls, A4SeparatesS2AndNotS5) {
    const auto ad = random_adapter(stories().cfg, 2, 14);
    const Tokenizer tok(load_vocab_file(test::shared("models/tok512.bin")));
    auto window = [&](const std::string& file, int len) {
        const auto ids = tok.encode(test::read_file(test::shared("data/" + file)).substr(20000, 4000), false);
        std::vector<int32_t> p = {1};
        p.insert(p.end(), ids.begin(), ids.begin() + len - 1);
        return p;
    };
    const int kTraces = 24, kLen = 12;
    std::vector<std::vector<int32_t>> prompts(kTraces, window("austen_persuasion.txt", kLen));
    prompts.insert(prompts.end(), kTraces, window("tinystories_val.txt", kLen));
    std::vector<int> labels(kTraces, 1);
    labels.insert(labels.end(), kTraces, 0);
    const std::string dir = test::scratch_dir();
    SchemeOptions o;
    run_scheme(Scheme::s2, stories(), &ad, prompts, dir + "/s2", o);
    const double auc2 = a4_distinguish(trace_pass_features(TraceReader(dir + "/s2")), labels, 1, 1);
    EXPECT_GE(auc2, 0.9);
    run_scheme(Scheme::s5, stories(), &ad, prompts, dir + "/s5", o);
    const double auc5 = a4_distinguish(trace_pass_features(TraceReader(dir + "/s5")), labels, 1, 1);
    // With no signal, the AUC of n against n samples scatters with sd sqrt((2n + 1) / (12 n^2)) (Mann-Whitney), 0.084
    // here: a bound of 0.1 failed about one run in four. 3.5 sd keeps false failures below 1 in 2000, far from S2's.
    const double null_sd = std::sqrt((2.0 * kTraces + 1) / (12.0 * kTraces * kTraces));
    EXPECT_NEAR(auc5, 0.5, 3.5 * null_sd);
}

// A8: every tampered product against S5 is detected and nothing is released from the tampered step on; on S3
// (no integrity check) tampering goes unnoticed.
TEST(AttackControls, A8DetectsAllTamperingOnS5) {
    const auto ad = random_adapter(stories().cfg, 2, 15);
    SchemeOptions o;
    o.host = EnclaveHostKind::inprocess;
    const TamperResult r = a8_tamper(Scheme::s5, stories(), &ad, 60, 2, 1, o);
    EXPECT_EQ(r.trials, 60);
    EXPECT_EQ(r.tampered, 60);
    EXPECT_EQ(r.detected, 60);
    EXPECT_EQ(r.released_after, 0);
    EXPECT_EQ(r.prefix_mismatch, 0);
    const TamperResult w = a8_tamper(Scheme::s3, stories(), &ad, 20, 2, 1, o);
    EXPECT_EQ(w.tampered, 20);
    EXPECT_EQ(w.detected, 0);
}

// ---- A5-A7 ----------------------------------------------------------------------------------------------------------

namespace {

std::vector<int32_t> austen_tokens(const std::string& file, size_t offset, size_t bytes) {
    static const Tokenizer tok(load_vocab_file(test::shared("models/tok512.bin")));
    return tok.encode(test::read_file(test::shared("data/" + file)).substr(offset, bytes), false);
}

train::TrainOptions small_lora(int steps, int batch, int ctx, uint64_t seed) {
    train::TrainOptions o;
    o.lora_rank = 4;
    o.lora_alpha = 8.0f;
    o.steps = steps;
    o.batch = batch;
    o.ctx = ctx;
    o.lr = 1e-2f;
    o.warmup = 2;
    o.seed = seed;
    o.threads = 1;
    return o;
}

}  // namespace

// The analysis of A6 on synthetic log-probabilities: rows log softmax(W h) of a classifier W [vocab][dim] have a
// centred rank of dim; the SVD finds it and the subspace, and Gaussian noise on the released values blurs both.
TEST(AttackMath, LogprobMatrixRevealsHiddenDimension) {
    ModelWeights w;
    w.cfg.dim = 6;
    w.cfg.vocab_size = 40;
    w.tok_embeddings.resize(40 * 6);
    SplitMix rng(21);
    for (auto& v : w.tok_embeddings) v = float(rng.normal());
    auto rows = [&](double noise) {
        Mat Q(30, 40);
        for (int i = 0; i < 30; ++i) {
            double h[6];
            for (double& x : h) x = rng.normal();
            std::vector<double> lg(40);
            double mx = -1e300;
            for (int v = 0; v < 40; ++v) {
                for (int c = 0; c < 6; ++c) lg[size_t(v)] += double(w.tok_embeddings[size_t(v * 6 + c)]) * h[c];
                mx = std::max(mx, lg[size_t(v)]);
            }
            double z = 0;
            for (double x : lg) z += std::exp(x - mx);
            for (int v = 0; v < 40; ++v) Q(i, v) = lg[size_t(v)] - mx - std::log(z) + noise * rng.normal();
        }
        return Q;
    };
    std::vector<int> cols(40);
    std::iota(cols.begin(), cols.end(), 0);
    const LastLayerExtraction exact = analyse_logprob_matrix(rows(0.0), cols, w);
    EXPECT_EQ(exact.hidden_dim, 6);
    EXPECT_GT(exact.gap, 1e6);
    EXPECT_GT(exact.subspace_cos, 0.999999);
    const LastLayerExtraction noisy = analyse_logprob_matrix(rows(3.0), cols, w);
    EXPECT_LT(noisy.subspace_cos, 0.95);
    EXPECT_EQ(analyse_logprob_matrix(Mat(0, 0), {}, w).hidden_dim, 0);
    EXPECT_DOUBLE_EQ(leakage_ratio(20.0, 12.0, 10.0), 0.8);
    EXPECT_DOUBLE_EQ(leakage_ratio(20.0, 20.0, 10.0), 0.0);
}

// A6 through the production API (SecureSession): with logprobs = vocabulary the classifier's column space and the
// hidden size (64) come out; with logprobs off (the default) the API releases none and the attack has nothing.
TEST(AttackControls, A6ExtractsTheLastLayerOnlyWhenLogprobsAreReleased) {
    const auto ad = random_adapter(stories().cfg, 2, 16);
    SchemeOptions o;
    o.host = EnclaveHostKind::inprocess;
    const auto prompts = token_prompts(24, 6, 4);
    const LastLayerExtraction on = a6_logprob_queries(stories(), &ad, prompts, 3, stories().cfg.vocab_size, 0.0f, o, nullptr);
    EXPECT_EQ(on.rows, 96);
    EXPECT_EQ(on.columns, stories().cfg.vocab_size);
    EXPECT_EQ(on.hidden_dim, stories().cfg.dim);
    EXPECT_GT(on.subspace_cos, 0.99);
    const LastLayerExtraction off = a6_logprob_queries(stories(), &ad, prompts, 3, 0, 0.0f, o, nullptr);
    EXPECT_EQ(off.queries, on.queries);
    EXPECT_EQ(off.rows, 0);
    EXPECT_EQ(off.hidden_dim, 0);
    EXPECT_EQ(off.subspace_cos, 0.0);
    const LastLayerExtraction noisy = a6_logprob_queries(stories(), &ad, prompts, 3, stories().cfg.vocab_size, 2.0f, o, nullptr);
    EXPECT_NE(noisy.hidden_dim, stories().cfg.dim);
    EXPECT_LT(noisy.subspace_cos, on.subspace_cos - 0.1);
}

// A5 end to end on small sizes: a "victim" adapter trained on Austen; the attacker fine-tunes from what the trace
// leaks on a small budget of other Austen text. S0 leaks the fine-tuned weights exactly (surrogate close to the
// victim, L well above 0.05); S5 leaks the int8 base only (L about 0).
TEST(AttackControls, A5SurrogateGainsFromS0AndNotFromS5) {
    const ModelWeights& base = stories();
    train::TextCorpus vc;
    vc.train.push_back(austen_tokens("austen_emma.txt", 50000, 60000));
    const train::LoraAdapter victim = [&] {
        train::Trainer tr(base, small_lora(50, 4, 48, 1), vc);
        while (!tr.done()) tr.train_step();
        return tr.adapter("victim");
    }();
    train::TextCorpus priv;
    priv.train.push_back(austen_tokens("austen_emma.txt", 120000, 200000));
    const train::TextCorpus budget = budget_corpus(priv, 0.01, 1);
    ASSERT_EQ(budget.train.size(), 1u);
    EXPECT_NEAR(double(budget.train[0].size()), 0.01 * double(priv.train[0].size()), 1.0);
    const auto eval = even_windows(austen_tokens("austen_persuasion.txt", 30000, 30000), 16, 48, 1);
    ASSERT_EQ(eval.size(), 16u);
    const double ppl_victim = perplexity(eval_windows(merged_model(base, victim), eval, 0, 1));
    train::TrainOptions to = small_lora(8, 2, 32, 5);
    to.lr = 3e-3f;
    const double ppl_bb = perplexity(eval_windows(fine_tune(base, budget, to), eval, 0, 1));
    ASSERT_GT(ppl_bb - ppl_victim, 1.0);
    const std::string dir = test::scratch_dir();
    SchemeOptions o;
    o.host = EnclaveHostKind::inprocess;
    double L[2];
    int i = 0;
    for (Scheme s : {Scheme::s0, Scheme::s5}) {
        const std::string d = dir + "/" + scheme_name(s);
        run_scheme(s, base, &victim, token_prompts(1, 4, 5), d, o);
        const auto est = leaked_weights(TraceReader(d), base);
        EXPECT_EQ(est.size(), 35u);
        const DeltaScore ds = score_delta(est, base, victim);
        if (s == Scheme::s0) {
            EXPECT_GT(ds.rho, 0.9999);
        }
        const double ppl = perplexity(eval_windows(fine_tune(apply_estimates(base, est), budget, to), eval, 0, 1));
        L[i++] = leakage_ratio(ppl_bb, ppl, ppl_victim);
        std::printf("%s: victim %.3f black-box %.3f surrogate %.3f L %.4f\n", scheme_name(s), ppl_victim, ppl_bb, ppl, L[i - 1]);
    }
    EXPECT_GT(L[0], 0.5);
    EXPECT_LT(std::abs(L[1]), 0.05);
}

// A7: the membership labels are right (members are windows the recipe drew; non-members overlap none of them), and
// the loss-based score finds the training windows of an adapter that memorised them (positive control), while the
// base calibrates a model that never saw them to about chance.
TEST(AttackControls, A7MembershipLabelsAndAMemorisingAdapter) {
    const ModelWeights& base = stories();
    train::TextCorpus priv;
    priv.bos = 1;
    priv.train.push_back(austen_tokens("austen_emma.txt", 0, 40000));
    priv.train.push_back(austen_tokens("austen_mansfield_park.txt", 0, 30000));
    const train::TrainOptions recipe = small_lora(30, 4, 32, 3);
    const MembershipSet set = membership_set(base, priv, recipe, 20, 24, 7);
    ASSERT_EQ(set.windows.size(), 40u);
    // brute force: every training window of the recipe, as token strings
    const train::Trainer tr(base, recipe, priv);
    std::vector<std::vector<int32_t>> drawn;
    std::vector<std::vector<uint8_t>> cover(priv.train.size());
    for (size_t f = 0; f < priv.train.size(); ++f) cover[f].assign(priv.train[f].size(), 0);
    for (int st = 0; st < recipe.steps; ++st)
        for (int b = 0; b < recipe.batch; ++b) {
            const auto w = tr.window_origin(st, b);
            const auto& s = priv.train[w.stream];
            drawn.emplace_back(s.begin() + int64_t(w.offset), s.begin() + int64_t(w.offset) + recipe.ctx);
            for (int k = 0; k < recipe.ctx; ++k) cover[w.stream][size_t(w.offset) + size_t(k)] = 1;
        }
    for (size_t i = 0; i < set.windows.size(); ++i) {
        const std::vector<int32_t> body(set.windows[i].begin() + 1, set.windows[i].end());
        ASSERT_EQ(body.size(), 24u);
        if (set.labels[i] == 1) {
            bool found = false;
            for (const auto& d : drawn) found = found || std::equal(body.begin(), body.end(), d.begin());
            EXPECT_TRUE(found) << "member window " << i << " is not a training window";
        } else {
            // find it in the streams and check no training window touched it
            bool clean = false;
            for (size_t f = 0; f < priv.train.size() && !clean; ++f)
                for (size_t p = 0; p + body.size() <= priv.train[f].size() && !clean; ++p)
                    if (std::equal(body.begin(), body.end(), priv.train[f].begin() + int64_t(p))) {
                        bool touched = false;
                        for (size_t k = 0; k < body.size(); ++k) touched = touched || cover[f][p + k];
                        clean = !touched;
                    }
            EXPECT_TRUE(clean) << "non-member window " << i << " overlaps a training window";
        }
    }
    // positive control: an adapter trained for many epochs on 8 short windows memorises them
    const auto text = austen_tokens("austen_emma.txt", 60000, 6000);
    std::vector<std::vector<int32_t>> wins;
    std::vector<int> labels;
    train::TextCorpus mem;
    mem.bos = 1;
    for (int i = 0; i < 16; ++i) {
        std::vector<int32_t> w = {1};
        w.insert(w.end(), text.begin() + i * 40, text.begin() + i * 40 + 24);
        if (i % 2 == 0) mem.train.emplace_back(w.begin() + 1, w.end());
        wins.push_back(std::move(w));
        labels.push_back(i % 2 == 0 ? 1 : 0);
    }
    train::Trainer mt(base, small_lora(60, 8, 24, 4), mem);
    while (!mt.done()) mt.train_step();
    const WindowEval ref = eval_windows(base, wins, 0, 1), model = eval_windows(mt.weights(), wins, 0, 1);
    std::vector<double> score;
    for (size_t i = 0; i < wins.size(); ++i) score.push_back(ref.nll[i] - model.nll[i]);
    const MembershipMetrics m = membership_metrics(score, labels);
    EXPECT_GE(m.auc, 0.9);
}
