// The trainer: analytic gradients against finite differences (double precision, every parameter kind), the training
// forward pass against the engine, LoRA adapter files (round trip, merging, validation), determinism, checkpoint
// resume, and the finetune command's usage errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "common/error.h"
#include "common/tokenizer.h"
#include "engine/engine.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/llama2c.h"
#include "formats/model_file.h"
#include "train/lora.h"
#include "train/params.h"
#include "train/trainer.h"
#include "train/transformer.h"
#include "testutil.h"

using namespace si;
using namespace si::train;

namespace {

using test::stories;

const Tokenizer& stories_tok() {
    static const Tokenizer t(load_vocab_file(test::shared("models/tok512.bin")), "tok512.bin");
    return t;
}

// A tiny model with weights large enough that every path carries gradient: 2 layers, GQA (4 heads, 2 kv heads of
// width 2), untied or tied classifier.
ModelWeights tiny_model(uint64_t seed, bool tied) {
    ModelConfig c;
    c.dim = 8;
    c.hidden_dim = 12;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = 11;
    c.seq_len = 16;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> w(-0.5f, 0.5f), g(0.5f, 1.5f);
    auto fill = [&](std::vector<float>& v, size_t n, std::uniform_real_distribution<float>& d) {
        v.resize(n);
        for (auto& x : v) x = d(rng);
    };
    ModelWeights m;
    m.cfg = c;
    const size_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), V = c.vocab_size;
    fill(m.tok_embeddings, V * d, w);
    m.layers.resize(size_t(c.n_layers));
    for (auto& L : m.layers) {
        fill(L.attn_norm, d, g);
        fill(L.wq, d * d, w);
        fill(L.wk, kv * d, w);
        fill(L.wv, kv * d, w);
        fill(L.wo, d * d, w);
        fill(L.ffn_norm, d, g);
        fill(L.w1, h * d, w);
        fill(L.w2, d * h, w);
        fill(L.w3, h * d, w);
    }
    fill(m.final_norm, d, g);
    if (!tied) fill(m.classifier, V * d, w);
    return m;
}

struct GradCheckResult {
    double max_abs_err = 0.0;
    std::string worst;
    size_t checked = 0;
    std::vector<std::string> kinds_with_gradient;  // tensor names whose gradient is not all zero
};

// Central differences, h = 1e-5, on every element of every trainable tensor. The loss is the mean cross-entropy of
// two sequences of five tokens (one target ignored).
GradCheckResult grad_check(const ModelWeights& m, bool lora, int rank, double alpha) {
    ThreadPool pool(1);  // thousands of tiny passes: thread hand-offs would cost more than they save
    Transformer<double> net(m.cfg, pool);
    const std::vector<int32_t> tokens = {1, 4, 7, 2, 9, 3, 10, 0, 5, 5};
    const std::vector<int32_t> targets = {4, 7, 2, -1, 6, 10, 0, 5, 5, 8};
    const int B = 2, S = 5;
    const ParamLayout base_layout = model_layout(m.cfg, m.tied());
    std::vector<double> base = pack_model<double>(m, base_layout);
    ParamLayout layout = lora ? lora_layout(m.cfg, rank, kAllProj) : base_layout;
    std::vector<double> params = lora ? std::vector<double>(layout.size()) : base;
    if (lora) {
        std::mt19937_64 rng(7);
        std::uniform_real_distribution<double> u(-0.5, 0.5);
        for (auto& x : params) x = u(rng);  // B != 0 so that A receives gradient too
    }
    const double s = lora ? alpha / rank : 0.0;
    auto view = [&](std::vector<double>& p) {
        if (!lora) return as_const(bind_model<double>(m.cfg, layout, p.data()));
        ModelRef<double> r = bind_model<double>(m.cfg, base_layout, base.data());
        bind_lora<double>(r, m.cfg, layout, p.data());
        return as_const(r);
    };
    const double n_scored = 9.0;
    auto loss = [&](std::vector<double>& p) { return net.forward(view(p), s, tokens.data(), targets.data(), B, S) / n_scored; };

    std::vector<double> grad(params.size(), 0.0);
    loss(params);
    ModelRef<double> g;
    if (lora)
        bind_lora<double>(g, m.cfg, layout, grad.data());
    else
        g = bind_model<double>(m.cfg, layout, grad.data());
    net.backward(view(params), g, s, 1.0 / n_scored);

    GradCheckResult res;
    const double h = 1e-5;
    for (const TensorSlot& slot : layout.slots()) {
        bool nonzero = false;
        for (size_t i = slot.offset; i < slot.offset + slot.size(); ++i) {
            const double keep = params[i];
            params[i] = keep + h;
            const double up = loss(params);
            params[i] = keep - h;
            const double down = loss(params);
            params[i] = keep;
            const double numeric = (up - down) / (2 * h);
            const double err = std::fabs(grad[i] - numeric) / (1e-7 + 1e-6 * std::fabs(numeric));
            if (err > res.max_abs_err) {
                res.max_abs_err = err;
                res.worst = slot.name + "[" + std::to_string(i - slot.offset) + "] analytic " + std::to_string(grad[i]) +
                            " numeric " + std::to_string(numeric);
            }
            nonzero = nonzero || grad[i] != 0.0;
            ++res.checked;
        }
        if (nonzero) res.kinds_with_gradient.push_back(slot.name);
    }
    return res;
}

}  // namespace

// Tolerance: |analytic - numeric| <= 1e-7 + 1e-6 * |numeric| for every element (the reported error is that ratio,
// so it must stay below 1). In double, central differences with h = 1e-5 are accurate to about 1e-10 here.
TEST(TrainGrad, FullModelUntiedMatchesFiniteDifferences) {
    const ModelWeights m = tiny_model(1, false);
    const auto r = grad_check(m, false, 0, 0);
    EXPECT_LT(r.max_abs_err, 1.0) << r.worst;
    std::printf("[   INFO   ] %zu gradients, worst error / tolerance %.3g\n", r.checked, r.max_abs_err);
    // every tensor kind receives gradient: embeddings, both norms, all seven projections, final norm, classifier
    EXPECT_EQ(r.kinds_with_gradient.size(), model_layout(m.cfg, false).slots().size());
    EXPECT_EQ(r.checked, model_layout(m.cfg, false).size());
}

TEST(TrainGrad, FullModelTiedMatchesFiniteDifferences) {
    const ModelWeights m = tiny_model(2, true);
    const auto r = grad_check(m, false, 0, 0);
    EXPECT_LT(r.max_abs_err, 1.0) << r.worst;
    std::printf("[   INFO   ] %zu gradients, worst error / tolerance %.3g\n", r.checked, r.max_abs_err);
    EXPECT_EQ(r.kinds_with_gradient.size(), model_layout(m.cfg, true).slots().size());
}

TEST(TrainGrad, LoraFactorsMatchFiniteDifferences) {
    const ModelWeights m = tiny_model(3, true);
    const auto r = grad_check(m, true, 2, 3.0);
    EXPECT_LT(r.max_abs_err, 1.0) << r.worst;
    std::printf("[   INFO   ] %zu gradients, worst error / tolerance %.3g\n", r.checked, r.max_abs_err);
    // lora_a and lora_b of all seven projections in both layers
    EXPECT_EQ(r.kinds_with_gradient.size(), size_t(2 * 7 * 2));
}

// The training forward pass (float) reproduces Engine::eval logits: same formulas, same matmul kernel.
// Bound: max |difference| <= 1e-4 on logits of magnitude ~10 (float rounding of different summation orders).
TEST(TrainForward, MatchesEngineLogits) {
    const ModelWeights& w = stories();
    const auto ids = stories_tok().encode("Once upon a time, there was a little girl named Lily. She loved to play outside.", true);
    const int S = int(ids.size());
    ThreadPool pool(2);
    Transformer<float> net(w.cfg, pool);
    const ParamLayout layout = model_layout(w.cfg, w.tied());
    const std::vector<float> packed = pack_model<float>(w, layout);
    // two copies of the sequence in one batch: sequences must not see each other
    std::vector<int32_t> tokens(ids.begin(), ids.end());
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    net.forward(bind_model<const float>(w.cfg, layout, packed.data()), 0.0f, tokens.data(), nullptr, 2, S);
    EngineParams ep;
    ep.n_threads = 1;
    Engine e(w, ep);
    const float* ref = e.eval(ids, true);
    const int V = w.cfg.vocab_size;
    double max_diff = 0.0;
    for (int b = 0; b < 2; ++b)
        for (int i = 0; i < S * V; ++i) max_diff = std::max(max_diff, double(std::fabs(net.logits()[size_t(b * S * V + i)] - ref[i])));
    EXPECT_LE(max_diff, 1e-4);
    std::printf("[   INFO   ] max |trainer - engine| logit difference %.3g\n", max_diff);
}

namespace {

// A short text repeated: enough for windows of 32 tokens, small enough to memorise in a few dozen steps.
TextCorpus tiny_corpus() {
    std::string text;
    for (int i = 0; i < 12; ++i)
        text += "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    TextCorpus c;
    c.bos = stories_tok().bos();
    const auto ids = stories_tok().encode(text, false);
    c.train = {ids};
    c.eval = {std::vector<int32_t>(ids.begin(), ids.begin() + 200)};
    return c;
}

TrainOptions tiny_options() {
    TrainOptions o;
    o.lora_rank = 4;
    o.lora_alpha = 8;
    o.steps = 6;
    o.batch = 3;
    o.ctx = 32;
    o.lr = 1e-2f;
    o.warmup = 2;
    o.threads = 2;
    o.seed = 11;
    return o;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Random LoRA factors (B != 0) for every projection of stories260K.
LoraAdapter random_adapter(int rank, float alpha, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.0f, 0.05f);
    const test::LoraDraw draw = [&](const ProjShape&) { return n(rng); };
    return test::lora_on_every_projection(stories().cfg, rank, alpha, draw, draw);
}

}  // namespace

TEST(TrainLoop, LossDecreasesWhenOverfittingTinyText) {
    for (bool full : {false, true}) {
        TrainOptions o = tiny_options();
        o.full = full;
        o.steps = 25;
        o.lr = full ? 3e-3f : 1e-2f;
        Trainer tr(stories(), o, tiny_corpus());
        const double before = tr.evaluate(0);
        double first = 0, last = 0;
        while (!tr.done()) {
            const StepStats st = tr.train_step();
            if (st.step == 1) first = st.loss;
            last = st.loss;
        }
        const double after = tr.evaluate(0);
        EXPECT_LT(after, 0.5 * before) << (full ? "full" : "lora") << ": eval " << before << " -> " << after;
        EXPECT_LT(last, 0.5 * first) << (full ? "full" : "lora") << ": train " << first << " -> " << last;
    }
}

TEST(TrainLoop, DeterministicForSeedAndThreads) {
    auto run = [](int threads, uint64_t seed) {
        TrainOptions o = tiny_options();
        o.threads = threads;
        o.seed = seed;
        Trainer tr(stories(), o, tiny_corpus());
        while (!tr.done()) tr.train_step();
        return lora_adapter_writer(tr.adapter("x"), stories().cfg).serialize();
    };
    const std::string a = run(2, 11), b = run(2, 11);
    EXPECT_TRUE(a == b) << "same seed and threads must give a bit-identical adapter";
    // each window's gradient is computed by one thread and the sum has a fixed order: thread count does not matter
    EXPECT_TRUE(a == run(1, 11));
    EXPECT_FALSE(a == run(2, 12));
}

TEST(TrainLoop, CheckpointResumeMatchesUninterruptedRun) {
    const std::string dir = test::scratch_dir();
    for (bool full : {false, true}) {
        TrainOptions o = tiny_options();
        o.full = full;
        Trainer whole(stories(), o, tiny_corpus());
        while (!whole.done()) whole.train_step();

        Trainer first(stories(), o, tiny_corpus());
        for (int i = 0; i < 3; ++i) first.train_step();
        const std::string ck = dir + (full ? "/full.ckpt" : "/lora.ckpt");
        first.save_checkpoint(ck);
        Trainer resumed(stories(), o, tiny_corpus());
        resumed.load_checkpoint(ck);
        EXPECT_EQ(resumed.step(), 3);
        while (!resumed.done()) resumed.train_step();
        EXPECT_TRUE(same_bits(whole.parameters(), resumed.parameters())) << (full ? "full" : "lora");

        // a checkpoint only resumes the run it came from
        TrainOptions other = o;
        other.lr *= 2;
        Trainer mismatch(stories(), other, tiny_corpus());
        try {
            mismatch.load_checkpoint(ck);
            ADD_FAILURE() << "checkpoint with another learning rate accepted";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("lr"), std::string::npos) << e.what();
        }
    }
}

TEST(TrainSchedule, WarmupThenCosine) {
    TrainOptions o;
    o.lr = 1.0f;
    o.warmup = 10;
    o.steps = 110;
    o.min_lr_ratio = 0.1f;
    EXPECT_DOUBLE_EQ(learning_rate(o, 0), 0.1);
    EXPECT_DOUBLE_EQ(learning_rate(o, 9), 1.0);
    EXPECT_NEAR(learning_rate(o, 60), 0.55, 1e-8);  // min_lr_ratio is a float
    EXPECT_NEAR(learning_rate(o, 110), 0.1, 1e-8);
}

TEST(LoraFile, RoundTripKeepsEveryTensorAndLlamaCppConventions) {
    const std::string path = test::scratch_dir() + "/a.gguf";
    TrainOptions o = tiny_options();
    o.lora_targets = {Proj::q, Proj::v, Proj::w2};
    Trainer tr(stories(), o, tiny_corpus());
    tr.train_step();
    tr.train_step();
    const LoraAdapter ad = tr.adapter("roundtrip");
    write_lora_adapter(path, ad, stories().cfg);

    const gguf::Reader r = gguf::Reader::open(path);
    EXPECT_EQ(r.get_str("general.architecture"), "llama");
    EXPECT_EQ(r.get_str("general.type"), "adapter");
    EXPECT_EQ(r.get_str("adapter.type"), "lora");
    EXPECT_EQ(r.get("adapter.lora.alpha").type(), gguf::ValueType::f32);
    EXPECT_EQ(r.get_f32("adapter.lora.alpha"), 8.0f);
    EXPECT_EQ(r.tensors().size(), size_t(5 * 3 * 2));
    // llama.cpp: lora_a ne = {in, rank}, lora_b ne = {rank, out}
    EXPECT_EQ(r.tensor("blk.0.attn_q.weight.lora_a").shape(), (std::vector<uint64_t>{64, 4}));
    EXPECT_EQ(r.tensor("blk.0.attn_q.weight.lora_b").shape(), (std::vector<uint64_t>{4, 64}));
    EXPECT_EQ(r.tensor("blk.4.attn_v.weight.lora_b").shape(), (std::vector<uint64_t>{4, 32}));
    EXPECT_EQ(r.tensor("blk.2.ffn_down.weight.lora_a").shape(), (std::vector<uint64_t>{172, 4}));
    EXPECT_EQ(r.tensor("blk.2.ffn_down.weight.lora_b").shape(), (std::vector<uint64_t>{4, 64}));

    const LoraAdapter back = read_lora_adapter(path, stories().cfg);
    EXPECT_EQ(back.alpha, ad.alpha);
    EXPECT_EQ(back.name, "roundtrip");
    ASSERT_EQ(back.tensors.size(), ad.tensors.size());
    for (size_t i = 0; i < ad.tensors.size(); ++i) {
        EXPECT_EQ(back.tensors[i].layer, ad.tensors[i].layer);
        EXPECT_EQ(back.tensors[i].proj, ad.tensors[i].proj);
        EXPECT_EQ(back.tensors[i].rank, 4);
        EXPECT_TRUE(same_bits(back.tensors[i].a, ad.tensors[i].a));
        EXPECT_TRUE(same_bits(back.tensors[i].b, ad.tensors[i].b));
    }
}

// Merging W + scale * alpha / rank * B A into the base and running the engine gives the logits of the trainer's
// unmerged LoRA forward pass (bound 1e-4, float rounding), at scale 1 and at scale 0.5.
TEST(LoraFile, MergedEngineMatchesTrainerLoraForward) {
    const ModelWeights& w = stories();
    const LoraAdapter ad = random_adapter(8, 16.0f, 5);
    const auto ids = stories_tok().encode("The little dog ran to the park and saw a big red ball.", true);
    const int S = int(ids.size()), V = w.cfg.vocab_size;
    const ParamLayout base_layout = model_layout(w.cfg, true);
    const std::vector<float> base = pack_model<float>(w, base_layout);
    const ParamLayout ll = lora_layout(w.cfg, 8, kAllProj);
    std::vector<float> lp(ll.size());
    for (const LoraTensor& t : ad.tensors) {
        const std::string name = proj_tensor_name(t.layer, t.proj);
        std::copy(t.a.begin(), t.a.end(), lp.begin() + std::ptrdiff_t(ll.at(name + ".lora_a").offset));
        std::copy(t.b.begin(), t.b.end(), lp.begin() + std::ptrdiff_t(ll.at(name + ".lora_b").offset));
    }
    ModelRef<const float> view = bind_model<const float>(w.cfg, base_layout, base.data());
    bind_lora<const float>(view, w.cfg, ll, lp.data());
    ThreadPool pool(1);
    Transformer<float> net(w.cfg, pool);
    for (float scale : {1.0f, 0.5f}) {
        net.forward(view, scale * 16.0f / 8.0f, ids.data(), nullptr, 1, S);
        ModelWeights merged = w;
        merge_lora(merged, ad, scale);
        EngineParams ep;
        ep.n_threads = 1;
        Engine e(merged, ep);
        const float* ref = e.eval(ids, true);
        double max_diff = 0.0, max_change = 0.0;
        Engine plain(w, ep);
        const float* base_logits = plain.eval(ids, true);
        for (int i = 0; i < S * V; ++i) {
            max_diff = std::max(max_diff, double(std::fabs(net.logits()[size_t(i)] - ref[i])));
            max_change = std::max(max_change, double(std::fabs(ref[i] - base_logits[i])));
        }
        EXPECT_LE(max_diff, 1e-4) << "scale " << scale;
        std::printf("[   INFO   ] scale %.1f: max |merged engine - LoRA forward| %.3g (adapter moves logits by %.3g)\n",
                    double(scale), max_diff, max_change);
        EXPECT_GT(max_change, 0.1) << "the adapter must actually change the logits";
    }
}

namespace {

// An adapter file for stories260K with the given metadata and tensors (name, ne).
std::string write_adapter(const std::string& path, const std::string& arch, const std::string& type,
                          const std::vector<std::pair<std::string, std::vector<uint64_t>>>& tensors,
                          const std::string& adapter_type = "lora") {
    gguf::Writer w;
    if (!arch.empty()) w.set_str("general.architecture", arch);
    if (!type.empty()) w.set_str("general.type", type);
    w.set_str("adapter.type", adapter_type);
    w.set_f32("adapter.lora.alpha", 16.0f);
    for (const auto& [name, ne] : tensors) {
        size_t n = 1;
        for (uint64_t x : ne) n *= size_t(x);
        std::vector<float> data(n, 0.01f);
        w.add_tensor(name, ne, gguf::TensorType::F32, data);
    }
    w.write(path);
    return path;
}

std::string adapter_error(const std::string& path) {
    try {
        read_lora_adapter(path, stories().cfg);
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST(LoraFile, BadAdaptersGiveClearErrors) {
    const std::string d = test::scratch_dir();
    const std::vector<std::pair<std::string, std::vector<uint64_t>>> good = {
        {"blk.0.attn_q.weight.lora_a", {64, 8}}, {"blk.0.attn_q.weight.lora_b", {8, 64}}};
    EXPECT_EQ(adapter_error(write_adapter(d + "/good.gguf", "llama", "adapter", good)), "(no error)");

    auto has = [](const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; };
    std::string m = adapter_error(write_adapter(d + "/shape.gguf", "llama", "adapter",
                                                {{"blk.0.attn_k.weight.lora_a", {64, 8}}, {"blk.0.attn_k.weight.lora_b", {8, 64}}}));
    EXPECT_TRUE(has(m, "blk.0.attn_k.weight.lora_b") && has(m, "[8, 64]") && has(m, "shape")) << m;
    m = adapter_error(write_adapter(d + "/shape_a.gguf", "llama", "adapter",
                                    {{"blk.1.ffn_down.weight.lora_a", {64, 8}}, {"blk.1.ffn_down.weight.lora_b", {8, 64}}}));
    EXPECT_TRUE(has(m, "blk.1.ffn_down.weight.lora_a") && has(m, "[172, rank]")) << m;
    m = adapter_error(write_adapter(d + "/rank.gguf", "llama", "adapter",
                                    {{"blk.0.attn_q.weight.lora_a", {64, 8}}, {"blk.0.attn_q.weight.lora_b", {4, 64}}}));
    EXPECT_TRUE(has(m, "rank") && has(m, "blk.0.attn_q.weight.lora_a")) << m;
    m = adapter_error(write_adapter(d + "/missing_b.gguf", "llama", "adapter", {{"blk.0.attn_q.weight.lora_a", {64, 8}}}));
    EXPECT_TRUE(has(m, "no matching 'blk.0.attn_q.weight.lora_b'")) << m;
    m = adapter_error(write_adapter(d + "/arch.gguf", "gpt2", "adapter", good));
    EXPECT_TRUE(has(m, "architecture 'gpt2'")) << m;
    m = adapter_error(write_adapter(d + "/type.gguf", "llama", "model", good));
    EXPECT_TRUE(has(m, "not a LoRA adapter") && has(m, "'model'")) << m;
    m = adapter_error(write_adapter(d + "/notype.gguf", "llama", "", good));
    EXPECT_TRUE(has(m, "general.type is missing")) << m;
    m = adapter_error(write_adapter(d + "/ia3.gguf", "llama", "adapter", good, "ia3"));
    EXPECT_TRUE(has(m, "adapter.type 'ia3'")) << m;
    m = adapter_error(write_adapter(d + "/layer.gguf", "llama", "adapter",
                                    {{"blk.7.attn_q.weight.lora_a", {64, 8}}, {"blk.7.attn_q.weight.lora_b", {8, 64}}}));
    EXPECT_TRUE(has(m, "blk.7.attn_q.weight.lora_a") && has(m, "layer 7") && has(m, "5 layers")) << m;
    m = adapter_error(write_adapter(d + "/embd.gguf", "llama", "adapter",
                                    {{"token_embd.weight.lora_a", {64, 8}}, {"token_embd.weight.lora_b", {8, 512}}}));
    EXPECT_TRUE(has(m, "token_embd.weight.lora_a") && has(m, "only the attention and FFN")) << m;
    m = adapter_error(write_adapter(d + "/suffix.gguf", "llama", "adapter", {{"blk.0.attn_q.weight", {64, 64}}}));
    EXPECT_TRUE(has(m, "'blk.0.attn_q.weight' is not a LoRA factor")) << m;
    // the base model itself is not an adapter
    m = adapter_error(test::shared("models/llama-2-tiny-random.gguf"));
    EXPECT_TRUE(has(m, "not a LoRA adapter")) << m;

    // through the CLI: exit 1 with the tensor named
    const auto r = test::run_cli({"perplexity", "-m", test::shared("models/stories260K.bin"), "--tokenizer",
                                  test::shared("models/tok512.bin"), "-f", test::shared("data/austen_persuasion.txt"), "--ctx",
                                  "32", "--chunks", "1", "--lora", d + "/shape.gguf"});
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(has(r.err, "blk.0.attn_k.weight.lora_b")) << r.err;
}

TEST(FinetuneCli, UsageErrorsExit2) {
    const std::string m = test::shared("models/stories260K.bin"), tok = test::shared("models/tok512.bin");
    const std::string data = test::shared("data/austen_persuasion.txt");
    const std::vector<std::vector<std::string>> cases = {
        {"finetune", "-m", m, "--tokenizer", tok, "-o", "/tmp/x.gguf"},                                  // no --data
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data},                                       // no -o
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--lora-targets", "q,x"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--full", "--lora-rank", "4"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--lora-rank", "0"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--ctx", "1000"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--steps", "0"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--checkpoint-every", "5"},
        {"finetune", "-m", m, "--tokenizer", tok, "--data", data, "-o", "/tmp/x.gguf", "--eval-fraction", "0"},
        {"perplexity", "-m", m, "--tokenizer", tok, "-f", data, "--lora-scale", "0.5"},                  // scale without --lora
    };
    for (const auto& args : cases) {
        const auto r = test::run_cli(args);
        std::string joined;
        for (const auto& a : args) joined += a + " ";
        EXPECT_EQ(r.exit_code, 2) << joined << "\n" << r.err;
        EXPECT_FALSE(r.err.empty()) << joined;
    }
}

TEST(FinetuneCli, TrainsAdapterAndFullModelThatLoad) {
    const std::string d = test::scratch_dir();
    std::string text;
    for (int i = 0; i < 20; ++i) text += "Mr. Darcy walked into the room, and Elizabeth looked up from her book with a smile. ";
    test::write_file(d + "/train.txt", text);
    const std::string m = test::shared("models/stories260K.bin"), tok = test::shared("models/tok512.bin");
    const std::vector<std::string> common = {"-m", m, "--tokenizer", tok, "--data", d + "/train.txt", "--steps", "4",
                                             "--batch", "2", "--ctx", "32", "--eval-fraction", "0.2", "--eval-every", "2",
                                             "-t", "2", "-q"};
    auto args = std::vector<std::string>{"finetune"};
    args.insert(args.end(), common.begin(), common.end());
    auto lora = args;
    lora.insert(lora.end(), {"--lora-rank", "4", "--lora-targets", "q,v", "-o", d + "/a.gguf", "--log", d + "/curve.tsv"});
    auto r = test::run_cli(lora);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("LoRA adapter after 4 steps"), std::string::npos) << r.out;
    const std::string curve = test::read_file(d + "/curve.tsv");
    EXPECT_EQ(std::count(curve.begin(), curve.end(), '\n'), 4) << curve;  // header, steps 0, 2, 4
    EXPECT_EQ(read_lora_adapter(d + "/a.gguf", stories().cfg).tensors.size(), size_t(10));

    auto full = args;
    full.insert(full.end(), {"--full", "-o", d + "/full.gguf"});
    r = test::run_cli(full);
    ASSERT_EQ(r.exit_code, 0) << r.err;

    const std::vector<std::string> ppl = {"perplexity", "-m", m, "--tokenizer", tok, "-f", d + "/train.txt", "--ctx", "32"};
    auto with = ppl;
    with.insert(with.end(), {"--lora", d + "/a.gguf", "--lora-scale", "0.5"});
    r = test::run_cli(with);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = test::run_cli({"perplexity", "-m", d + "/full.gguf", "-f", d + "/train.txt", "--ctx", "32"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = test::run_cli({"run", "-m", m, "--tokenizer", tok, "--lora", d + "/a.gguf", "-n", "8", "--temp", "0"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
}
