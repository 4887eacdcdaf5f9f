// Sequence slots and batched steps (continuous batching in one session): batched decode gives every sequence
// exactly the tokens it gets alone (sequences of different prompt lengths joining and leaving mid-stream, prompts in
// chunks between decode steps, precomputed factors consumed per row); masks never repeat across rows, slots or
// steps; a tampered product in one row stops the session; one slot's KV cache and sampler never leak into another
// or into the next request of the same slot.
#include "secureinfer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <set>

#include "backends/accelerator.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/staged_forward.h"
#include "common/threadpool.h"
#include "engine/random_model.h"
#include "host/enclave_host.h"
#include "host/secure_session.h"
#include "testutil.h"

using namespace si;

namespace {

using test::stories;

// A small random model: GQA, untied classifier.
const ModelWeights& tiny() {
    static const ModelWeights w = [] {
        ModelConfig c;
        c.dim = 32;
        c.hidden_dim = 48;
        c.n_layers = 2;
        c.n_heads = 4;
        c.n_kv_heads = 2;
        c.vocab_size = 64;
        c.seq_len = 128;
        return random_model(c, 11, true);
    }();
    return w;
}

SecureSessionParams params(SecureMode mode, int slots) {
    SecureSessionParams p;
    p.mode = mode;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = 1;
    p.slots = slots;
    return p;
}

Status status_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.status();
    }
    return Status::ok;
}

const SecureMode kModes[] = {SecureMode::gpu_only, SecureMode::enclave_only, SecureMode::secureinfer};

// A sequence of a schedule: joins at step `join` in slot `slot`, feeds its prompt `chunk` tokens per step, then
// generates n tokens and leaves (its slot is reset for whoever comes next).
struct Seq {
    int slot;
    std::vector<int32_t> prompt;
    int join;
    int n;
    int chunk;
    SamplerParams sampler{0.0f, 0, 1.0f, 0};
    Seq(int slot, std::vector<int32_t> prompt, int join, int n, int chunk, SamplerParams sampler = {0.0f, 0, 1.0f, 0})
        : slot(slot), prompt(std::move(prompt)), join(join), n(n), chunk(chunk), sampler(sampler) {}
    // progress
    size_t fed = 0;
    std::vector<int32_t> out;
    bool done = false;
};

// Runs the schedule through s.step, one batched pass per step over every active sequence; returns each sequence's
// tokens. Sequences sharing a slot must not overlap in time (the later one joins after the earlier one left).
// before_step (may be empty) runs before every step with the step's rows, as a server's scheduler would.
std::vector<std::vector<int32_t>> run_schedule(SecureSession& s, std::vector<Seq> seqs, int* rows_out = nullptr,
                                               const std::function<void(int)>& before_step = {}) {
    int rows = 0;
    std::map<int, int> owner;  // slot -> sequence currently in it
    for (int stepno = 0;; ++stepno) {
        std::vector<SlotStep> batch;
        std::vector<size_t> who;
        std::vector<std::vector<int32_t>> chunks;
        chunks.reserve(seqs.size());
        bool pending = false;
        for (size_t i = 0; i < seqs.size(); ++i) {
            Seq& q = seqs[i];
            if (q.done) continue;
            pending = true;
            if (q.join > stepno) continue;
            if (owner.count(q.slot) && owner[q.slot] != int(i)) continue;  // wait for the slot
            if (!owner.count(q.slot)) {
                owner[q.slot] = int(i);
                s.reset_slot(q.slot);
                s.set_sampler(q.slot, q.sampler);
            }
            if (q.fed < q.prompt.size()) {
                const size_t n = std::min(size_t(q.chunk), q.prompt.size() - q.fed);
                chunks.emplace_back(q.prompt.begin() + long(q.fed), q.prompt.begin() + long(q.fed + n));
                q.fed += n;
                batch.push_back(SlotStep{q.slot, chunks.back(), q.fed == q.prompt.size()});
            } else {
                chunks.push_back({q.out.back()});
                batch.push_back(SlotStep{q.slot, chunks.back(), true});
            }
            who.push_back(i);
        }
        if (!pending) break;
        if (batch.empty()) continue;
        int step_rows = 0;
        for (const SlotStep& b : batch) step_rows += int(b.tokens.size());
        rows += step_rows;
        if (before_step) before_step(step_rows);
        const std::vector<int32_t> toks = s.step(batch);
        EXPECT_EQ(toks.size(), batch.size());
        for (size_t j = 0; j < who.size(); ++j) {
            Seq& q = seqs[who[j]];
            if (!batch[j].sample) {
                EXPECT_EQ(toks[j], -1);
                continue;
            }
            q.out.push_back(toks[j]);
            if (int(q.out.size()) == q.n) {
                q.done = true;
                owner.erase(q.slot);
            }
        }
    }
    if (rows_out) *rows_out = rows;
    std::vector<std::vector<int32_t>> out;
    for (const Seq& q : seqs) out.push_back(q.out);
    return out;
}

// The sequence alone: a fresh one-slot session, the prompt at once, then one token per call.
std::vector<int32_t> alone(const ModelWeights& w, SecureMode mode, const Seq& q) {
    SecureSession s(w, params(mode, 1));
    s.set_sampler(q.sampler);
    std::vector<int32_t> out;
    int32_t t = s.eval_sample(q.prompt);
    out.push_back(t);
    while (int(out.size()) < q.n) {
        t = s.eval_sample(std::span<const int32_t>(&t, 1));
        out.push_back(t);
    }
    return out;
}

std::vector<int32_t> prompt_of(int n, uint32_t seed, int vocab) {
    std::mt19937 rng(seed);
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& t : p) t = int32_t(rng() % uint32_t(vocab));
    return p;
}

// Four sequences on three slots: different prompt lengths, joining at different steps, one prompt fed in chunks
// between the others' decode steps, the fourth taking the slot the first leaves; one samples with a seed.
std::vector<Seq> schedule(const ModelWeights& w) {
    const int V = w.cfg.vocab_size;
    std::vector<Seq> s;
    s.push_back(Seq{0, prompt_of(5, 1, V), 0, 6, 64});
    s.push_back(Seq{1, prompt_of(1, 2, V), 2, 9, 64});
    s.push_back(Seq{2, prompt_of(13, 3, V), 3, 5, 4});  // a long prompt in chunks of 4
    s.push_back(Seq{0, prompt_of(8, 4, V), 4, 7, 3});   // joins when slot 0 is free again
    s[1].sampler = SamplerParams{0.9f, 20, 0.95f, 77};
    return s;
}

TEST(Batch, BatchedDecodeGivesEachSequenceItsTokensAlone) {
    for (const ModelWeights* w : {&tiny(), &stories()}) {
        const auto seqs = schedule(*w);
        for (SecureMode mode : kModes) {
            SCOPED_TRACE(secure_mode_name(mode));
            SecureSession s(*w, params(mode, 3));
            const auto got = run_schedule(s, seqs);
            for (size_t i = 0; i < seqs.size(); ++i) {
                EXPECT_EQ(got[i], alone(*w, mode, seqs[i])) << "sequence " << i;
                EXPECT_EQ(int(got[i].size()), seqs[i].n);
            }
        }
    }
    // the three presets agree with each other too (greedy sequences; the same fixed-point products)
    const auto seqs = schedule(stories());
    std::vector<std::vector<std::vector<int32_t>>> all;
    for (SecureMode mode : kModes) {
        SecureSession s(stories(), params(mode, 3));
        all.push_back(run_schedule(s, seqs));
    }
    EXPECT_EQ(all[0][0], all[2][0]);
    EXPECT_EQ(all[1][2], all[2][2]);
}

TEST(Batch, PrecomputedFactorsAreConsumedPerRowIncludingPrompts) {
    const ModelWeights& w = stories();
    const auto seqs = schedule(w);
    std::vector<std::vector<int32_t>> want;
    for (const Seq& q : seqs) want.push_back(alone(w, SecureMode::secureinfer, q));
    for (int64_t inside : {int64_t(256) << 20, int64_t(0)}) {  // kept in the core; sealed in the host
        SCOPED_TRACE(inside ? "kept" : "sealed");
        auto p = params(SecureMode::secureinfer, 3);
        p.precompute_inside_bytes = inside;
        SecureSession s(w, p);
        s.precompute(200);
        ASSERT_EQ(s.precomputed_available(), 200);
        int rows = 0;
        EXPECT_EQ(run_schedule(s, seqs, &rows), want);
        // one unit per row of every crossing, prompt rows included: none ran online
        EXPECT_EQ(s.precomputed_available(), 200 - rows);
        EXPECT_TRUE(s.warnings().empty() || s.warnings().back().find("exhausted") == std::string::npos);
    }
    // too few: crossings past them fall back to online unblinding, with the same tokens
    SecureSession s(w, params(SecureMode::secureinfer, 3));
    s.precompute(9);
    EXPECT_EQ(run_schedule(s, seqs), want);
    EXPECT_LT(s.precomputed_available(), 9);
}

// Records every product's input rows: the plaintext quantised activations (gpu-only) or the masked ones.
class RecordingAccelerator final : public Accelerator {
public:
    explicit RecordingAccelerator(int64_t tamper_call = -1, int64_t tamper_row = 0)
        : inner_(make_cpu_accelerator(nullptr)), tamper_call_(tamper_call), tamper_row_(tamper_row) {}
    const char* name() const override { return "recording"; }
    bool supports(AccelOp op, DType t) const override { return inner_->supports(op, t); }
    WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override { return inner_->upload_i8(W, N, K); }
    WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override { return inner_->upload_f32(W, N, K); }
    void release(WeightHandle& w) override { inner_->release(w); }
    void mul_mat_masked(const WeightHandle& W, const uint32_t* X, int64_t T, uint32_t* Y) override {
        record(X, T, W.cols);
        inner_->mul_mat_masked(W, X, T, Y);
        if (calls_ - 1 == tamper_call_) {
            Y[size_t((tamper_row_ % T) * W.rows + (W.rows / 2))] += 1;  // one element of one row
            tampered_ = true;
        }
    }
    void mul_mat_int(const WeightHandle& W, const int32_t* X, int64_t T, int32_t* Y) override {
        record(reinterpret_cast<const uint32_t*>(X), T, W.cols);
        inner_->mul_mat_int(W, X, T, Y);
    }
    void mul_mat_i8(const WeightHandle& W, const int8_t* X, int64_t T, int32_t* Y) override { inner_->mul_mat_i8(W, X, T, Y); }
    void mul_mat_f32(const WeightHandle& W, const float* X, int64_t T, float* Y) override { inner_->mul_mat_f32(W, X, T, Y); }

    std::vector<std::vector<std::vector<uint32_t>>> rows;  // [call][row][K]
    int64_t calls_ = 0;
    std::vector<int64_t> rows_per_call;
    bool tampered_ = false;

private:
    void record(const uint32_t* X, int64_t T, int64_t K) {
        ++calls_;
        rows_per_call.push_back(T);
        auto& c = rows.emplace_back();
        for (int64_t t = 0; t < T; ++t) c.emplace_back(X + t * K, X + (t + 1) * K);
    }
    std::unique_ptr<Accelerator> inner_;
    int64_t tamper_call_, tamper_row_;
};

// The same crossings, row for row, in a gpu-only and a secureinfer run of one schedule: each masked row's pad
// r = x' - x (mod 2^32) is fresh.
void expect_fresh_pads(const RecordingAccelerator& plain, const RecordingAccelerator& masked) {
    // one batched product per crossing over all active rows
    ASSERT_EQ(plain.rows_per_call, masked.rows_per_call);
    EXPECT_GT(*std::max_element(masked.rows_per_call.begin(), masked.rows_per_call.end()), 3);
    // every pair of adjacent pad words is new (a reused pad, whole or in part, at any offset, in any row, slot or
    // step, would repeat one; by chance: about 2^-64 per pair)
    std::set<std::pair<uint32_t, uint32_t>> seen;
    size_t words = 0, same_rows = 0;
    for (size_t c = 0; c < plain.rows.size(); ++c)
        for (size_t t = 0; t < plain.rows[c].size(); ++t) {
            const auto& x = plain.rows[c][t];
            const auto& xm = masked.rows[c][t];
            ASSERT_EQ(x.size(), xm.size());
            std::vector<uint32_t> r(x.size());
            for (size_t i = 0; i < x.size(); ++i) r[i] = xm[i] - x[i];
            for (size_t i = 0; i + 1 < r.size(); ++i)
                ASSERT_TRUE(seen.insert({r[i], r[i + 1]}).second) << "call " << c << " row " << t << " word " << i;
            words += r.size();
            same_rows += x == xm;
        }
    EXPECT_GT(words, 50000u);
    EXPECT_EQ(same_rows, 0u);
}

TEST(Batch, MasksNeverRepeatAcrossRowsSlotsOrSteps) {
    const ModelWeights& w = stories();
    auto seqs = schedule(w);
    for (Seq& q : seqs) q.sampler = SamplerParams{0.0f, 0, 1.0f, 0};  // the same tokens in both runs
    auto plain = std::make_shared<RecordingAccelerator>();
    auto masked = std::make_shared<RecordingAccelerator>();
    {
        auto p = params(SecureMode::gpu_only, 3);
        p.accelerator = plain;
        SecureSession s(w, p);
        run_schedule(s, seqs);
    }
    {
        auto p = params(SecureMode::secureinfer, 3);
        p.accelerator = masked;
        SecureSession s(w, p);
        s.precompute(40);  // the first crossings' pads were reserved ahead, the later ones drawn online
        run_schedule(s, seqs);
        EXPECT_EQ(s.precomputed_available(), 0);
    }
    expect_fresh_pads(*plain, *masked);
}

// The server's sustained precompute (src/server/batcher.cpp): a small store, topped up before every step it cannot
// cover, on the same session between steps. Every row still takes its own unit (none runs online, none is used
// twice), the pads never repeat, and every sequence gets its tokens alone.
TEST(Batch, StoreRefilledBetweenStepsKeepsTokensAndFreshPads) {
    const ModelWeights& w = stories();
    auto seqs = schedule(w);
    for (Seq& q : seqs) q.sampler = SamplerParams{0.0f, 0, 1.0f, 0};
    std::vector<std::vector<int32_t>> want;
    for (const Seq& q : seqs) want.push_back(alone(w, SecureMode::secureinfer, q));
    auto plain = std::make_shared<RecordingAccelerator>();
    auto masked = std::make_shared<RecordingAccelerator>();
    {
        auto p = params(SecureMode::gpu_only, 3);
        p.accelerator = plain;
        SecureSession s(w, p);
        EXPECT_EQ(run_schedule(s, seqs), want);
    }
    auto p = params(SecureMode::secureinfer, 3);
    p.accelerator = masked;
    SecureSession s(w, p);
    const int target = 12;  // rows: more than the largest step of the schedule
    s.precompute(target);
    int made = target, refills = 0, rows = 0;
    const auto got = run_schedule(s, seqs, &rows, [&](int step_rows) {
        if (s.precomputed_available() >= step_rows) return;
        const int n = target - s.precomputed_available();
        s.precompute(n);
        made += n;
        ++refills;
    });
    EXPECT_EQ(got, want);
    EXPECT_GE(refills, 3);
    EXPECT_EQ(made - s.precomputed_available(), rows);  // one unit per row: none ran online
    EXPECT_TRUE(s.warnings().empty() || s.warnings().back().find("exhausted") == std::string::npos);
    expect_fresh_pads(*plain, *masked);
}

TEST(Batch, TamperedProductInOneRowStopsTheSession) {
    const ModelWeights& w = tiny();
    const auto seqs = schedule(w);
    int64_t calls = 0;
    std::vector<int64_t> rows_per_call;
    {
        auto acc = std::make_shared<RecordingAccelerator>();
        auto p = params(SecureMode::secureinfer, 3);
        p.accelerator = acc;
        SecureSession s(w, p);
        run_schedule(s, seqs);
        calls = acc->calls_;
        rows_per_call = acc->rows_per_call;
    }
    std::mt19937_64 rng(5);
    for (int trial = 0; trial < 60; ++trial) {
        // a batched crossing (several rows), tampered in one of its rows
        int64_t call = 0;
        do call = int64_t(rng() % uint64_t(calls));
        while (rows_per_call[size_t(call)] < 2);
        const int64_t row = int64_t(rng() % uint64_t(rows_per_call[size_t(call)]));
        auto acc = std::make_shared<RecordingAccelerator>(call, row);
        auto p = params(SecureMode::secureinfer, 3);
        p.accelerator = acc;
        if (trial % 2) p.precompute_inside_bytes = 0;
        SecureSession s(w, p);
        if (trial % 3 == 0) s.precompute(16);
        Status st = Status::ok;
        std::vector<int32_t> released;
        try {
            run_schedule(s, seqs);
        } catch (const Error& e) {
            st = e.status();
        }
        ASSERT_TRUE(acc->tampered_) << "trial " << trial;
        ASSERT_EQ(st, Status::integrity) << "trial " << trial;
        // the session is over for every slot
        EXPECT_EQ(status_of([&] {
                      const int32_t t = 1;
                      const SlotStep b{1, std::span<const int32_t>(&t, 1), true};
                      s.step(std::span<const SlotStep>(&b, 1));
                  }),
                  Status::integrity);
        EXPECT_EQ(status_of([&] { s.reset_slot(2); }), Status::integrity);
        EXPECT_EQ(status_of([&] { s.eval_sample(std::vector<int32_t>{1}); }), Status::integrity);
    }
}

TEST(Batch, SlotsNeverLeakIntoEachOtherOrTheNextRequest) {
    const ModelWeights& w = stories();
    const int V = w.cfg.vocab_size;
    for (SecureMode mode : kModes) {
        SCOPED_TRACE(secure_mode_name(mode));
        // a sampled request (temperature 1, seeded), alone in a fresh session
        Seq req{1, prompt_of(6, 9, V), 0, 8, 64, SamplerParams{1.0f, 0, 1.0f, 1234}};
        const auto want = alone(w, mode, req);
        SecureSession s(w, params(mode, 2));
        // a previous request in the same slot (and another in slot 0, still running), then the request again:
        // the same tokens as in a fresh session, so nothing of the earlier request's cache or draws is observed
        Seq before{1, prompt_of(20, 10, V), 0, 12, 64, SamplerParams{1.0f, 0, 1.0f, 1234}};
        Seq other{0, prompt_of(3, 11, V), 0, 30, 64};
        auto r1 = run_schedule(s, {before, other});
        const uint64_t used = s.kv_bytes();
        EXPECT_GT(used, 0u);
        EXPECT_EQ(s.slot_pos(1), 20 + 12 - 1);
        auto r2 = run_schedule(s, {req});
        EXPECT_EQ(r2[0], want);
        // the same request twice in a row also repeats exactly
        EXPECT_EQ(run_schedule(s, {req})[0], want);
        // reset frees the slot's cache (memory follows use: whole chunks of positions)
        s.reset_slot(1);
        s.reset_slot(0);
        EXPECT_EQ(s.slot_pos(1), 0);
        EXPECT_EQ(s.kv_bytes(), 0u);
        const int32_t t = 5;
        const SlotStep one{1, std::span<const int32_t>(&t, 1), true};
        s.step(std::span<const SlotStep>(&one, 1));
        EXPECT_EQ(s.kv_bytes(), uint64_t(2) * w.cfg.n_layers * KvCache::kChunk * w.cfg.kv_dim() * 4);
    }
}

TEST(Batch, BadSlotRequestsAreRefusedClearly) {
    const ModelWeights& w = tiny();
    for (int bad : {0, 1025, -3}) {
        test::expect_error([&] { SecureSession s(w, params(SecureMode::secureinfer, bad)); }, Status::invalid_argument,
                           "slot count " + std::to_string(bad) + " out of range [1, 1024]");
    }
    SecureSession s(w, params(SecureMode::secureinfer, 2));
    const std::vector<int32_t> a = {1, 2}, b = {3};
    const SlotStep twice[] = {{1, a, true}, {1, b, true}};
    test::expect_error([&] { s.step(twice); }, Status::invalid_argument, "step: slot 1 named twice");
    const SlotStep out_of_range[] = {{2, a, true}};
    test::expect_error([&] { s.step(out_of_range); }, Status::invalid_argument, "step: slot 2 out of range [0, 2)");
    const std::vector<int32_t> part1(static_cast<size_t>(s.n_batch() - 20), 1), part2(21, 2);
    const SlotStep too_many[] = {{0, part1, true}, {1, part2, true}};
    test::expect_error([&] { s.step(too_many); }, Status::invalid_argument, "exceed the batch of");
    test::expect_error([&] { s.reset_slot(7); }, Status::invalid_argument, "reset_slot: slot 7 out of range [0, 2)");
    // the trusted core checks for itself: an absurd slot count at configure, a slot it does not have in a step
    auto host = std::shared_ptr<EnclaveHost>(make_inprocess_host());
    wire::Encoder e(wire::MsgType::configure);
    e.add(wire::Tag::cfg_ints, std::vector<int32_t>{32, 48, 2, 4, 2, 64, 128, 128});
    e.add(wire::Tag::cfg_floats, std::vector<float>{10000.0f, 1e-5f});
    e.scalar<uint8_t>(wire::Tag::offload, 1);
    e.scalar<uint8_t>(wire::Tag::tied, 0);
    e.scalar<int32_t>(wire::Tag::slot_count, 1 << 20);
    std::vector<uint8_t> resp;
    test::expect_error([&] { host->call(e.finish(), resp); }, Status::invalid_argument,
                       "configure: slot count 1048576 out of range [1, 1024]");
    // the session keeps working after refused requests
    const SlotStep fine[] = {{0, a, true}, {1, b, true}};
    EXPECT_EQ(s.step(fine).size(), 2u);
}

TEST(Batch, CApiSlots) {
    si_model* m = nullptr;
    si_model_params mp = si_model_default_params();
    const std::string tok = test::shared("models/tok512.bin");
    mp.tokenizer_path = tok.c_str();
    ASSERT_EQ(si_model_load(test::shared("models/stories260K.bin").c_str(), &mp, &m), SI_OK);
    si_context_params cp = si_context_default_params();
    cp.enclave_host = SI_HOST_INPROCESS;
    cp.n_threads = 1;
    si_context* c = nullptr;
    EXPECT_EQ(si_slots_context_init(m, &cp, 0, &c), SI_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(si_last_error()).find("slot count 0 out of range [1, 1024]"), std::string::npos);
    ASSERT_EQ(si_slots_context_init(m, &cp, 2, &c), SI_OK) << si_last_error();
    EXPECT_EQ(si_slots_count(c), 2);
    const si_sampler_params greedy{0.0f, 0, 1.0f, 0};
    ASSERT_EQ(si_slots_set_sampler(c, 0, &greedy), SI_OK);
    ASSERT_EQ(si_slots_set_sampler(c, 1, &greedy), SI_OK);
    // two sequences in lockstep, against the session API's single-sequence runs
    const std::vector<int32_t> pa = {1, 403, 407}, pb = {1, 261};
    std::vector<int32_t> a, b;
    si_token out[2];
    si_slot_step st[2] = {{0, pa.data(), pa.size(), 1}, {1, pb.data(), pb.size(), 1}};
    for (int i = 0; i < 6; ++i) {
        ASSERT_EQ(si_slots_step(c, st, 2, out), SI_OK) << si_last_error();
        a.push_back(out[0]);
        b.push_back(out[1]);
        st[0] = {0, &a.back(), 1, 1};
        st[1] = {1, &b.back(), 1, 1};
    }
    EXPECT_EQ(si_slots_pos(c, 0), 3 + 5);
    EXPECT_EQ(si_slots_pos(c, 1), 2 + 5);
    EXPECT_EQ(si_slots_pos(c, 2), -1);
    EXPECT_EQ(a, alone(stories(), SecureMode::secureinfer, Seq{0, pa, 0, 6, 64}));
    EXPECT_EQ(b, alone(stories(), SecureMode::secureinfer, Seq{0, pb, 0, 6, 64}));
    EXPECT_EQ(si_slots_reset(c, 1), SI_OK);
    EXPECT_EQ(si_slots_pos(c, 1), 0);
    EXPECT_EQ(si_slots_reset(c, 5), SI_ERR_INVALID_ARGUMENT);
    si_context_free(c);
    cp.mode = SI_MODE_PLAIN;
    EXPECT_EQ(si_slots_context_init(m, &cp, 2, &c), SI_ERR_INVALID_ARGUMENT);
    si_model_free(m);
}

// bench --concurrency and --slot-memory run end to end and report every runner and level.
TEST(Batch, BenchConcurrencyAndSlotMemoryReport) {
    const std::string model = test::shared("models/stories260K.bin");
    const auto r = test::run_cli({"bench", "-m", model, "--concurrency", "1,3", "-n", "3", "--ttft-prompt", "20", "-r",
                                  "1", "--host", "inprocess", "-t", "1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const char* runner : {"gpu-only", "enclave-only", "secureinfer online", "secureinfer precomputed",
                               "secureinfer sustained"})
        for (const char* level : {" | 1 | ", " | 3 | "})
            EXPECT_NE(r.out.find(std::string(runner) + level), std::string::npos) << runner << level << "\n" << r.out;
    EXPECT_NE(r.out.find("time to first token, 20-token prompt"), std::string::npos) << r.out;
    const auto m = test::run_cli({"bench", "-m", model, "--slot-memory", "3", "--slot-memory-positions", "40", "-t", "1"});
    ASSERT_EQ(m.exit_code, 0) << m.err;
    EXPECT_NE(m.out.find("3 slots / (1 slot + 2 KV caches)"), std::string::npos) << m.out;
    const auto bad = test::run_cli({"bench", "-m", model, "--concurrency", "0"});
    EXPECT_NE(bad.exit_code, 0);
}

}  // namespace
