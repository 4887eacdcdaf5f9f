// The partition presets end to end (DESIGN.md sections 4-7): identical tokens in gpu-only, enclave-only and
// secureinfer; tampering caught every time with no output after it; secret tensors never on the accelerator;
// perplexity against the f32 engine; the boundary trace (no correlation with plaintext, no secret bytes); LoRA in
// the enclave against the engine on merged weights; released log-probabilities; the boundary's defences against
// malformed requests.
// First: <signal.h> (pulled in below) defines a macro named si_status.
#include "secureinfer.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "backends/accelerator.h"
#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/matmul.h"
#include "common/staged_forward.h"
#include "common/threadpool.h"
#include "engine/engine.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/llama2c.h"
#include "formats/model_file.h"
#include "host/secure_session.h"
#include "host/worker_host.h"
#include "testutil.h"
#include "train/lora.h"

using namespace si;

namespace {

const std::vector<int32_t> kGolden = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338};

using test::stories;

// A small random model for the many-trial tests: GQA, untied classifier.
const ModelWeights& tiny() {
    static const ModelWeights w = [] {
        ModelConfig c;
        c.dim = 32;
        c.hidden_dim = 48;
        c.n_layers = 2;
        c.n_heads = 4;
        c.n_kv_heads = 2;
        c.vocab_size = 64;
        c.seq_len = 64;
        return random_model(c, 7, true);
    }();
    return w;
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

Status status_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.status();
    }
    return Status::ok;
}

SecureSessionParams params(SecureMode mode, int threads = 1) {
    SecureSessionParams p;
    p.mode = mode;
    p.host = EnclaveHostKind::inprocess;
    p.n_threads = threads;
    return p;
}

std::vector<int32_t> greedy(SecureSession& s, const std::vector<int32_t>& prompt, int n) {
    s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    std::vector<int32_t> out;
    int32_t t = s.eval_sample(prompt);
    out.push_back(t);
    while (int(out.size()) < n) {
        t = s.eval_sample(std::span<const int32_t>(&t, 1));
        out.push_back(t);
    }
    return out;
}

// A LoRA adapter on every projection of every layer, large enough to change the model's outputs visibly.
train::LoraAdapter random_lora(const ModelConfig& cfg, uint64_t seed, int rank = 4) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.0f, 0.15f);
    const test::LoraDraw draw = [&](const ProjShape&) { return nd(rng); };
    return test::lora_on_every_projection(cfg, rank, float(2 * rank), draw, draw);  // scale alpha / rank = 2
}

// Forwards to the CPU backend; alters one value of the `target`-th product (counting from 0).
class TamperingAccelerator final : public Accelerator {
public:
    TamperingAccelerator(ThreadPool* pool, int64_t target, uint64_t seed)
        : inner_(make_cpu_accelerator(pool)), target_(target), rng_(seed) {}
    const char* name() const override { return "tampering"; }
    bool supports(AccelOp op, DType t) const override { return inner_->supports(op, t); }
    WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override { return inner_->upload_i8(W, N, K); }
    WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override { return inner_->upload_f32(W, N, K); }
    void release(WeightHandle& w) override { inner_->release(w); }
    void mul_mat_masked(const WeightHandle& W, const uint32_t* X, int64_t T, uint32_t* Y) override {
        inner_->mul_mat_masked(W, X, T, Y);
        if (calls_++ != target_) return;
        const size_t i = size_t(rng_() % uint64_t(T * W.rows));
        uint32_t delta = 0;
        while (delta == 0) delta = uint32_t(rng_());
        // Three kinds of alteration: an added offset, a single flipped bit, a small (+-1) change.
        switch (rng_() % 3) {
            case 0: Y[i] += delta; break;
            case 1: Y[i] ^= uint32_t(1) << (delta % 32); break;
            default: Y[i] += (delta & 1) ? 1u : ~0u; break;
        }
        tampered_ = true;
    }
    void mul_mat_i8(const WeightHandle& W, const int8_t* X, int64_t T, int32_t* Y) override { inner_->mul_mat_i8(W, X, T, Y); }
    void mul_mat_f32(const WeightHandle& W, const float* X, int64_t T, float* Y) override { inner_->mul_mat_f32(W, X, T, Y); }
    bool tampered() const { return tampered_; }
    int64_t calls() const { return calls_; }

private:
    std::unique_ptr<Accelerator> inner_;
    int64_t target_;
    std::mt19937_64 rng_;
    int64_t calls_ = 0;
    bool tampered_ = false;
};

double pearson(const std::vector<double>& a, const std::vector<double>& b) {
    const size_t n = a.size();
    double ma = 0, mb = 0;
    for (size_t i = 0; i < n; ++i) {
        ma += a[i];
        mb += b[i];
    }
    ma /= double(n);
    mb /= double(n);
    double sab = 0, saa = 0, sbb = 0;
    for (size_t i = 0; i < n; ++i) {
        sab += (a[i] - ma) * (b[i] - mb);
        saa += (a[i] - ma) * (a[i] - ma);
        sbb += (b[i] - mb) * (b[i] - mb);
    }
    return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0.0;
}

// The data of a .npy file written by TraceWriter, as doubles (dtype from the index).
std::vector<double> load_npy(const std::string& path, const std::string& dtype) {
    const std::string bytes = test::read_file(path);
    const size_t hlen = uint8_t(bytes[8]) | (size_t(uint8_t(bytes[9])) << 8);
    const char* p = bytes.data() + 10 + hlen;
    const size_t n = bytes.size() - 10 - hlen;
    std::vector<double> out;
    if (dtype == "uint32") {
        for (size_t i = 0; i + 4 <= n; i += 4) {
            uint32_t v;
            std::memcpy(&v, p + i, 4);
            out.push_back(double(v));
        }
    } else if (dtype == "int32") {
        for (size_t i = 0; i + 4 <= n; i += 4) {
            int32_t v;
            std::memcpy(&v, p + i, 4);
            out.push_back(double(v));
        }
    }
    return out;
}

std::vector<nlohmann::json> read_index(const std::string& dir) {
    std::ifstream f(dir + "/index.jsonl");
    std::vector<nlohmann::json> out;
    std::string line;
    while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line));
    return out;
}

}  // namespace

// ---- identical tokens --------------------------------------------------------------------------------------------

TEST(Secure, IdenticalGreedyTokensInAllThreeModes) {
    const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};
    std::map<std::string, std::vector<int32_t>> got;
    for (SecureMode m : {SecureMode::gpu_only, SecureMode::enclave_only, SecureMode::secureinfer}) {
        SecureSession s(stories(), params(m));
        got[secure_mode_name(m)] = greedy(s, prompt, 128);
    }
    EXPECT_EQ(got["gpu-only"], got["secureinfer"]);
    EXPECT_EQ(got["enclave-only"], got["secureinfer"]);
    // and the model still tells its story: the int8 / fixed-point path stays on the f32 reference text
    SecureSession from_bos(stories(), params(SecureMode::secureinfer));
    EXPECT_EQ(greedy(from_bos, {1}, 16), kGolden);
}

TEST(Secure, PrefillBatchingDoesNotChangeTokens) {
    std::vector<int32_t> prompt = {1};
    prompt.insert(prompt.end(), kGolden.begin(), kGolden.end());
    auto p = params(SecureMode::secureinfer);
    SecureSession whole(stories(), p);
    p.n_batch = 5;  // four passes for the prompt, the last one partial
    SecureSession split(stories(), p);
    EXPECT_EQ(greedy(whole, prompt, 24), greedy(split, prompt, 24));
}

TEST(Secure, WorkerProcessHostGivesTheSameTokens) {
    const std::string worker = default_worker_path();
    if (access(worker.c_str(), X_OK) != 0) GTEST_SKIP() << "no worker executable at " << worker;
    auto p = params(SecureMode::secureinfer);
    p.host = EnclaveHostKind::worker;
    SecureSession s(stories(), p);
    EXPECT_NE(s.isolation().find("worker process"), std::string::npos) << s.isolation();
    SecureSession ref(stories(), params(SecureMode::gpu_only));
    const auto want = greedy(ref, {1}, 32);
    EXPECT_EQ(greedy(s, {1}, 32), want);
    p.worker_spin_us = 200;  // doorbells that spin before they sleep: the same protocol, sooner
    SecureSession spinning(stories(), p);
    EXPECT_EQ(greedy(spinning, {1}, 32), want);
}

// pin_cpu: the constructing thread and the worker's serving thread share one CPU; same tokens. A CPU that is not
// there is a clear start-up error.
TEST(Secure, PinnedWorkerGivesTheSameTokens) {
    const std::string worker = default_worker_path();
    if (access(worker.c_str(), X_OK) != 0) GTEST_SKIP() << "no worker executable at " << worker;
    cpu_set_t saved;
    ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
    int cpu = 0;
    while (cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &saved)) ++cpu;
    ASSERT_LT(cpu, CPU_SETSIZE);
    SecureSession ref(stories(), params(SecureMode::gpu_only));
    const auto want = greedy(ref, {1}, 32);
    auto p = params(SecureMode::secureinfer, 2);
    p.host = EnclaveHostKind::worker;
    p.pin_cpu = cpu;
    {
        SecureSession s(stories(), p);
        cpu_set_t now;
        ASSERT_EQ(sched_getaffinity(0, sizeof now, &now), 0);
        EXPECT_EQ(CPU_COUNT(&now), 1);
        EXPECT_TRUE(CPU_ISSET(cpu, &now));
        s.precompute(8);  // the worker's loop threads were not confined with its serving thread
        EXPECT_EQ(greedy(s, {1}, 32), want);
    }
    ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
    int absent = CPU_SETSIZE - 1;
    while (absent > 0 && CPU_ISSET(absent, &saved)) --absent;
    p.pin_cpu = absent;
    const std::string err = error_of([&] { SecureSession bad(stories(), p); });
    EXPECT_NE(err.find("cannot run on CPU " + std::to_string(absent)), std::string::npos) << err;
    cpu_set_t after;
    ASSERT_EQ(sched_getaffinity(0, sizeof after, &after), 0);
    EXPECT_TRUE(CPU_EQUAL(&after, &saved));  // a failed start leaves the caller's affinity alone
}

// With spinning doorbells the worker serves a request while the host goes on: each precomputed crossing's sealed
// unit then goes ahead of its products, as one more call, and the tokens stay the same.
TEST(Secure, SpinningWorkerOpensUnitsAheadWithTheSameTokens) {
    const std::string worker = default_worker_path();
    if (access(worker.c_str(), X_OK) != 0) GTEST_SKIP() << "no worker executable at " << worker;
    SecureSession ref(stories(), params(SecureMode::gpu_only));
    const auto want = greedy(ref, {1}, 16);
    uint64_t calls[2] = {0, 0};
    for (int spin : {0, 1}) {
        auto p = params(SecureMode::secureinfer);
        p.host = EnclaveHostKind::worker;
        p.worker_spin_us = spin ? 50 : 0;
        p.precompute_inside_bytes = 0;  // sealed units, to be sent ahead
        SecureSession s(stories(), p);
        s.precompute(8);
        s.reset_stats();
        EXPECT_EQ(greedy(s, {1}, 16), want) << "spin " << spin;
        calls[spin] = s.stats().enclave_calls;
    }
    // the first 8 passes are single-token, so each of their crossings used a precomputed unit
    EXPECT_EQ(calls[1] - calls[0], uint64_t(8 * (4 * stories().cfg.n_layers + 1)));
}

// The trusted core's matrix products (enclave-only, online unblinding, precompute) run on its own thread pool,
// which the worker starts before its seccomp filter: several threads give the same tokens as one, and the worker
// survives them (a thread created after the filter would kill it).
TEST(Secure, EnclaveThreadsGiveTheSameTokens) {
    const std::string worker = default_worker_path();
    if (access(worker.c_str(), X_OK) != 0) GTEST_SKIP() << "no worker executable at " << worker;
    const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};
    for (SecureMode m : {SecureMode::enclave_only, SecureMode::secureinfer}) {
        auto one = params(m);
        one.n_threads = 1;
        SecureSession ref(stories(), one);
        const auto want = greedy(ref, prompt, 24);
        for (EnclaveHostKind h : {EnclaveHostKind::worker, EnclaveHostKind::inprocess}) {
            auto p = params(m);
            p.n_threads = 3;
            p.host = h;
            // an injected backend: the core gets its threads in secureinfer mode too (not so with the CPU backend
            // it would share the cores with)
            if (m == SecureMode::secureinfer) p.accelerator = std::shared_ptr<Accelerator>(make_cpu_accelerator(nullptr));
            SecureSession s(stories(), p);
            if (m == SecureMode::secureinfer) s.precompute(6);  // a matrix-matrix product on the pool
            EXPECT_EQ(greedy(s, prompt, 24), want) << secure_mode_name(m) << " " << s.isolation();
        }
    }
    // With the CPU backend the core keeps single-token products to one thread but still precomputes (products
    // and sealing) on its pool: in the worker that is OpenSSL on threads under the seccomp filter.
    for (EnclaveHostKind h : {EnclaveHostKind::worker, EnclaveHostKind::inprocess}) {
        auto one = params(SecureMode::secureinfer);
        SecureSession ref(stories(), one);
        const auto want = greedy(ref, prompt, 40);
        auto p = params(SecureMode::secureinfer, 3);
        p.host = h;
        SecureSession s(stories(), p);
        s.precompute(48);
        EXPECT_EQ(greedy(s, prompt, 40), want) << s.isolation();
        EXPECT_GT(s.precomputed_available(), 0);
    }
}

TEST(Secure, SeededSamplingMatchesAcrossModes) {
    std::vector<std::vector<int32_t>> runs;
    for (SecureMode m : {SecureMode::gpu_only, SecureMode::secureinfer}) {
        SecureSession s(stories(), params(m));
        s.set_sampler(SamplerParams{0.9f, 40, 0.9f, 1234});
        std::vector<int32_t> out;
        int32_t t = s.eval_sample(std::vector<int32_t>{1});
        for (int i = 0; i < 40; ++i) {
            out.push_back(t);
            t = s.eval_sample(std::span<const int32_t>(&t, 1));
        }
        runs.push_back(out);
    }
    EXPECT_EQ(runs[0], runs[1]);
}

// ---- integrity ---------------------------------------------------------------------------------------------------

// 1000 trials: a fresh session each, one value of one product altered (a random product of a short generation, a
// random element, one of three kinds of alteration). Every trial must fail with Status::integrity at the step
// that consumed the tampered product, release no token from that step, and refuse everything afterwards.
TEST(Secure, TamperedProductIsCaughtInEveryTrial) {
    const ModelWeights& w = tiny();
    const std::vector<int32_t> prompt = {1, 5, 9};
    constexpr int kSteps = 6;
    std::vector<int32_t> reference;
    int64_t products = 0;
    {
        auto p = params(SecureMode::secureinfer, 1);
        auto acc = std::make_shared<TamperingAccelerator>(nullptr, -1, 0);
        p.accelerator = acc;
        SecureSession s(w, p);
        reference = greedy(s, prompt, kSteps);
        products = acc->calls();
    }
    // one product per crossing: the four stages of every block (q|k|v and w1|w3 stacked), then the classifier
    ASSERT_EQ(products, int64_t(kSteps) * (w.cfg.n_layers * kStages + 1));
    std::mt19937_64 rng(2024);
    int caught = 0;
    constexpr int kTrials = 1000;
    for (int trial = 0; trial < kTrials; ++trial) {
        const int64_t target = int64_t(rng() % uint64_t(products));
        auto p = params(SecureMode::secureinfer, 1);
        auto acc = std::make_shared<TamperingAccelerator>(nullptr, target, rng());
        p.accelerator = acc;
        SecureSession s(w, p);
        std::vector<int32_t> released;
        Status st = Status::ok;
        int32_t t = -1;
        for (int step = 0; step < kSteps && st == Status::ok; ++step) {
            st = status_of([&] {
                t = step == 0 ? s.eval_sample(prompt) : s.eval_sample(std::span<const int32_t>(&t, 1));
                released.push_back(t);
            });
        }
        ASSERT_TRUE(acc->tampered()) << "trial " << trial;
        ASSERT_EQ(st, Status::integrity) << "trial " << trial << ": tampering with product " << target << " missed";
        // Tokens released before the tampered step are the untampered ones; none from the tampered step or after.
        const int64_t tampered_step = target / (w.cfg.n_layers * kStages + 1);
        ASSERT_EQ(int64_t(released.size()), tampered_step) << "trial " << trial;
        ASSERT_TRUE(std::equal(released.begin(), released.end(), reference.begin()));
        // The session is over: every later call fails.
        ASSERT_EQ(status_of([&] { s.eval_sample(std::vector<int32_t>{1}); }), Status::integrity);
        ASSERT_EQ(status_of([&] { s.reset(); }), Status::integrity);
        ASSERT_EQ(status_of([&] { s.eval_nll(std::vector<int32_t>{1, 2}, std::vector<int32_t>{2, -1}); }),
                  Status::integrity);
        ++caught;
    }
    EXPECT_EQ(caught, kTrials);
}

TEST(Secure, TamperingWithStoriesIsCaught) {
    std::mt19937_64 rng(99);
    for (int trial = 0; trial < 10; ++trial) {
        const int64_t target = int64_t(rng() % 420);  // within 20 decoding steps of 21 products
        auto p = params(SecureMode::secureinfer);
        auto acc = std::make_shared<TamperingAccelerator>(nullptr, target, rng());
        p.accelerator = acc;
        SecureSession s(stories(), p);
        EXPECT_EQ(status_of([&] { greedy(s, {1}, 20); }), Status::integrity) << "trial " << trial;
        EXPECT_EQ(status_of([&] { s.eval_sample(std::vector<int32_t>{1}); }), Status::integrity);
    }
}

// The host may replay an earlier (correct) product or answer the wrong crossing: neither gets through.
TEST(Secure, ReplayedOrMisaddressedProductsAreRefused) {
    const ModelWeights& w = tiny();
    auto host = std::shared_ptr<EnclaveHost>(make_inprocess_host());
    auto p = params(SecureMode::secureinfer, 1);
    p.enclave_host = host;
    SecureSession s(w, p);  // configures and loads the core through `host`
    // Drive the core by hand from here: start a pass and answer its first crossing.
    auto acc = make_cpu_accelerator(nullptr);
    auto eval = wire::Encoder(wire::MsgType::eval);
    eval.add(wire::Tag::tokens, std::vector<int32_t>{1, 2});
    eval.scalar<uint8_t>(wire::Tag::output, 0);
    std::vector<uint8_t> resp;
    host->call(eval.finish(), resp);
    const std::vector<uint8_t> first_resp = resp;
    const wire::Message m = wire::decode(first_resp);
    ASSERT_EQ(m.type(), wire::MsgType::offload);
    const int32_t T = m.scalar<int32_t>(wire::Tag::count_t), K = m.scalar<int32_t>(wire::Tag::count_k);
    auto bogus = [&](uint64_t crossing, int32_t layer, size_t n) {
        wire::Encoder e(wire::MsgType::products);
        e.scalar<int32_t>(wire::Tag::layer, layer);
        e.scalar<uint8_t>(wire::Tag::stage, 0);
        e.scalar<uint64_t>(wire::Tag::crossing, crossing);
        e.add(wire::Tag::products, std::vector<uint32_t>(n, 0));
        return e.finish();
    };
    const uint64_t c = m.scalar<uint64_t>(wire::Tag::crossing);
    const size_t n = size_t(T) * size_t(w.cfg.dim + 2 * w.cfg.kv_dim());
    EXPECT_EQ(status_of([&] { host->call(bogus(c + 1, 0, n), resp); }), Status::invalid_argument);
    // the pass was abandoned: its crossing can no longer be answered
    EXPECT_EQ(status_of([&] { host->call(bogus(c, 0, n), resp); }), Status::invalid_argument);
    // A new pass; replaying products computed for the earlier crossing (another mask) fails the check.
    std::vector<uint32_t> x(size_t(T * K));
    m.copy(wire::Tag::activations, x.data(), x.size());
    eval = wire::Encoder(wire::MsgType::eval);
    eval.add(wire::Tag::tokens, std::vector<int32_t>{1, 2});
    eval.scalar<uint8_t>(wire::Tag::output, 0);
    host->call(eval.finish(), resp);
    const wire::Message m2 = wire::decode(resp);
    // answer crossing 2 with a product of crossing 1's masked input: a consistent-looking but wrong product
    wire::Encoder e(wire::MsgType::products);
    e.scalar<int32_t>(wire::Tag::layer, 0);
    e.scalar<uint8_t>(wire::Tag::stage, 0);
    e.scalar<uint64_t>(wire::Tag::crossing, m2.scalar<uint64_t>(wire::Tag::crossing));
    std::vector<uint32_t> prod;
    for (Proj pj : {Proj::q, Proj::k, Proj::v}) {
        const ProjShape sh = proj_shape(w.cfg, pj);
        std::vector<int8_t> q(size_t(sh.rows * sh.cols));
        std::vector<float> sc(size_t(sh.rows));
        const auto& L = w.layers[0];
        const std::vector<float>& src = pj == Proj::q ? L.wq : pj == Proj::k ? L.wk : L.wv;
        quantize_rows_i8(src.data(), sh.rows, sh.cols, q.data(), sc.data(), nullptr);
        auto h = acc->upload_i8(q.data(), sh.rows, sh.cols);
        std::vector<uint32_t> y(size_t(T * sh.rows));
        acc->mul_mat_masked(h, x.data(), T, y.data());
        prod.insert(prod.end(), y.begin(), y.end());
    }
    e.add(wire::Tag::products, prod);
    EXPECT_EQ(status_of([&] { host->call(e.finish(), resp); }), Status::integrity);
    EXPECT_EQ(status_of([&] { s.eval(std::vector<int32_t>{1}); }), Status::integrity);
}

// ---- secret tensors and the plan -----------------------------------------------------------------------------------

TEST(Secure, SecretTensorsStayOffTheAccelerator) {
    auto p = params(SecureMode::gpu_only);
    p.secret_tensors = {"blk.0.attn_q.weight"};
    try {
        SecureSession s(stories(), p);
        FAIL() << "gpu-only accepted a model with secret tensors";
    } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::security);
        EXPECT_NE(std::string(e.what()).find("--insecure"), std::string::npos) << e.what();
    }
    p.insecure = true;
    SecureSession insecure(stories(), p);
    ASSERT_FALSE(insecure.warnings().empty());

    auto sp = params(SecureMode::secureinfer);
    sp.secret_tensors = {"blk.0.attn_q.weight", "blk.2.ffn_down.weight", "blk.4.attn_output.weight"};
    SecureSession secure(stories(), sp);
    for (int l = 0; l < 5; ++l)
        for (Proj pj : kAllProj) {
            const bool secret = (l == 0 && pj == Proj::q) || (l == 2 && pj == Proj::w2) || (l == 4 && pj == Proj::o);
            EXPECT_EQ(secure.plan()[size_t(l) * 7 + size_t(pj)], secret ? 0 : 1) << proj_tensor_name(l, pj);
        }
    ASSERT_EQ(secure.plan().size(), size_t(5 * 7 + 1));
    EXPECT_EQ(secure.plan().back(), 1) << "a public classifier is offloaded";
    // The same integer arithmetic inside and outside: the tokens do not change.
    const auto want = greedy(insecure, {1}, 48);
    EXPECT_EQ(greedy(secure, {1}, 48), want);

    // The classifier (token_embd when tied, else output) declared secret stays inside, computed there.
    auto cp = params(SecureMode::secureinfer);
    cp.secret_tensors = {"blk.1.ffn_gate.weight", stories().tied() ? "token_embd.weight" : "output.weight"};
    auto acc = std::make_shared<TamperingAccelerator>(nullptr, -1, 0);
    cp.accelerator = acc;
    SecureSession cls_secret(stories(), cp);
    ASSERT_EQ(cls_secret.plan().size(), size_t(5 * 7 + 1));
    EXPECT_EQ(cls_secret.plan().back(), 0);
    EXPECT_EQ(cls_secret.plan()[size_t(1) * 7 + size_t(Proj::w1)], 0);
    EXPECT_EQ(greedy(cls_secret, {1}, 48), want);
    // every stage of the five blocks keeps an offloaded projection (w3 goes alone in block 1); no classifier
    EXPECT_EQ(acc->calls(), int64_t(48) * (5 * kStages)) << "no classifier product on the accelerator";
    auto all = params(SecureMode::secureinfer);
    all.secret_tensors = {"*"};
    SecureSession everything(stories(), all);
    for (uint8_t o : everything.plan()) EXPECT_EQ(o, 0);

    auto bad = params(SecureMode::secureinfer);
    bad.secret_tensors = {"blk.9.attn_q.weight"};
    EXPECT_EQ(status_of([&] { SecureSession s(stories(), bad); }), Status::invalid_argument);
}

// A model package declares its secret tensors in its GGUF metadata (secureinfer.secret_tensors).
TEST(Secure, ModelFileDeclaresSecretTensors) {
    const std::string dir = test::scratch_dir();
    const std::string plain = dir + "/m.gguf", secret = dir + "/secret.gguf";
    write_gguf_model(plain, stories(), load_vocab_file(test::shared("models/tok512.bin")), GgufWeightType::f32, "m");
    {
        const gguf::Reader r = gguf::Reader::open(plain);
        gguf::Writer w;
        for (const auto& kv : r.metadata()) w.set(kv.key, kv.value);
        for (const auto& t : r.tensors()) {
            const auto bytes = r.tensor_data(t);
            const auto shape = t.shape();
            w.add_tensor_raw(t.name, shape, t.type, std::vector<uint8_t>(bytes.begin(), bytes.end()));
        }
        w.set_strs("secureinfer.secret_tensors", {"blk.0.attn_q.weight", "blk.3.ffn_down.weight",
                                                  stories().tied() ? "token_embd.weight" : "output.weight"});
        w.write(secret);
    }
    si_model* m = nullptr;
    ASSERT_EQ(si_model_load(secret.c_str(), nullptr, &m), SI_OK) << si_last_error();
    si_context_params cp = si_context_default_params();
    cp.enclave_host = SI_HOST_INPROCESS;
    cp.n_threads = 1;
    cp.mode = SI_MODE_GPU_ONLY;
    si_context* c = nullptr;
    EXPECT_EQ(si_context_init(m, &cp, &c), SI_ERR_SECURITY);
    EXPECT_NE(std::string(si_last_error()).find("blk.0.attn_q.weight"), std::string::npos) << si_last_error();
    cp.mode = SI_MODE_SECUREINFER;
    const std::string trace = dir + "/trace";
    cp.trace_dir = trace.c_str();
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK) << si_last_error();
    int weights = 0;
    for (const auto& e : read_index(trace))
        if (e["role"] == "weight") {
            ++weights;
            EXPECT_FALSE(e["layer"] == 0 && e["op"] == "wq");
            EXPECT_FALSE(e["layer"] == 3 && e["op"] == "w2");
            EXPECT_NE(e["op"], "classifier");
        }
    EXPECT_EQ(weights, 5 * 7 - 2);  // the classifier is secret too: it stays inside
    si_context_free(c);
    si_model_free(m);
}

TEST(Secure, LogitsNeverLeaveTheEnclave) {
    SecureSession s(stories(), params(SecureMode::secureinfer));
    EXPECT_EQ(status_of([&] { s.eval_logits(std::vector<int32_t>{1}, false); }), Status::security);
    SecureSession e(stories(), params(SecureMode::enclave_only));
    EXPECT_EQ(status_of([&] { e.eval_logits(std::vector<int32_t>{1}, false); }), Status::security);
}

// ---- perplexity --------------------------------------------------------------------------------------------------

// NLL over windows of 256 tokens (BOS + 255) of tinystories_val: the three presets agree exactly, and are within
// 1% of the f32 engine's perplexity. (The CLI measures the whole file; this test uses its first 8 windows.)
TEST(Secure, PerplexityWithinOnePercentOfF32Engine) {
    std::vector<int32_t> ids;
    {
        const std::string text = test::read_file(test::shared("data/tinystories_val.txt")).substr(0, 12000);
        si_model* m = nullptr;
        si_model_params mp = si_model_default_params();
        const std::string tok = test::shared("models/tok512.bin");
        mp.tokenizer_path = tok.c_str();
        ASSERT_EQ(si_model_load(test::shared("models/stories260K.bin").c_str(), &mp, &m), SI_OK) << si_last_error();
        ids.resize(text.size() + 2);
        size_t n = 0;
        ASSERT_EQ(si_tokenize(m, text.data(), text.size(), 0, ids.data(), ids.size(), &n), SI_OK);
        ids.resize(n);
        si_model_free(m);
    }
    constexpr int kWindow = 256, kWindows = 8;
    ASSERT_GE(ids.size(), size_t((kWindow - 1) * kWindows));
    EngineParams ep;
    ep.n_ctx = kWindow;
    Engine ref(stories(), ep);
    double ref_nll = 0;
    uint64_t ref_n = 0;
    std::map<std::string, std::pair<double, uint64_t>> got;
    std::vector<std::unique_ptr<SecureSession>> sessions;
    for (SecureMode m : {SecureMode::gpu_only, SecureMode::enclave_only, SecureMode::secureinfer}) {
        auto p = params(m);
        p.n_ctx = kWindow;
        sessions.push_back(std::make_unique<SecureSession>(stories(), p));
    }
    for (int w = 0; w < kWindows; ++w) {
        std::vector<int32_t> batch = {1};
        batch.insert(batch.end(), ids.begin() + w * (kWindow - 1), ids.begin() + (w + 1) * (kWindow - 1));
        std::vector<int32_t> targets(batch.begin() + 1, batch.end());
        targets.push_back(-1);
        ref.reset();
        const float* logits = ref.eval(batch, true);
        for (size_t i = 0; i + 1 < batch.size(); ++i) {
            ref_nll += token_nll(logits + i * 512, 512, batch[i + 1]);
            ++ref_n;
        }
        for (auto& s : sessions) {
            s->reset();
            const auto [sum, n] = s->eval_nll(batch, targets);
            got[secure_mode_name(s->mode())].first += sum;
            got[secure_mode_name(s->mode())].second += n;
        }
    }
    const double ref_ppl = std::exp(ref_nll / double(ref_n));
    for (auto& [mode, v] : got) {
        EXPECT_EQ(v.second, ref_n) << mode;
        const double ppl = std::exp(v.first / double(v.second));
        EXPECT_LT(std::fabs(ppl / ref_ppl - 1.0), 0.01) << mode << ": ppl " << ppl << " vs f32 " << ref_ppl;
        std::printf("perplexity %s: %.5f (f32 engine %.5f, %+.4f%%)\n", mode.c_str(), ppl, ref_ppl,
                    100.0 * (ppl / ref_ppl - 1.0));
    }
    EXPECT_EQ(got["gpu-only"].first, got["secureinfer"].first);
    EXPECT_EQ(got["enclave-only"].first, got["secureinfer"].first);
}

// ---- boundary trace ----------------------------------------------------------------------------------------------

TEST(Secure, TraceIsUncorrelatedWithPlaintextActivations) {
    const std::string dir = test::scratch_dir();
    std::vector<int32_t> prompt = {1};
    for (int i = 0; i < 255; ++i) prompt.push_back(3 + (i * 37) % 500);
    for (SecureMode m : {SecureMode::gpu_only, SecureMode::secureinfer}) {
        auto p = params(m);
        p.trace_dir = dir + "/" + secure_mode_name(m);
        SecureSession s(stories(), p);
        greedy(s, prompt, 12);
    }
    const auto plain = read_index(dir + "/gpu-only"), masked = read_index(dir + "/secureinfer");
    ASSERT_EQ(plain.size(), masked.size());
    std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> small;  // pooled per role
    int checked = 0, pooled = 0;
    std::set<std::string> seen;
    for (size_t i = 0; i < plain.size(); ++i) {
        const auto &a = plain[i], &b = masked[i];
        ASSERT_EQ(a["op"], b["op"]);
        ASSERT_EQ(a["role"], b["role"]);
        ASSERT_EQ(a["layer"], b["layer"]);
        ASSERT_EQ(a["shape"], b["shape"]);
        ASSERT_EQ(b["seq"], i);
        const std::string role = b["role"];
        if (role != "input" && role != "output") continue;
        if (a["layer"].get<int>() < 0) continue;  // token ids in, sampled tokens out: public by design
        if (!seen.insert(b["file"].get<std::string>()).second) continue;  // a fused crossing's shared input
        // What the host sees is masked: uint32 uniform, against the plaintext integers of the same crossing.
        ASSERT_EQ(b["dtype"], "uint32");
        ASSERT_EQ(a["dtype"], "int32");
        const auto x = load_npy(dir + "/gpu-only/" + a["file"].get<std::string>(), "int32");
        const auto y = load_npy(dir + "/secureinfer/" + b["file"].get<std::string>(), "uint32");
        ASSERT_EQ(x.size(), y.size());
        if (x.size() >= 8192) {
            EXPECT_LT(std::fabs(pearson(x, y)), 0.05) << b["file"];
            ++checked;
        } else {
            auto& pool = small[role];
            pool.first.insert(pool.first.end(), x.begin(), x.end());
            pool.second.insert(pool.second.end(), y.begin(), y.end());
        }
    }
    for (auto& [key, v] : small) {
        ASSERT_GE(v.first.size(), size_t(16384)) << key;
        EXPECT_LT(std::fabs(pearson(v.first, v.second)), 0.05) << key << " over " << v.first.size() << " elements";
        ++pooled;
    }
    EXPECT_EQ(checked, 5 * (4 + 7));  // the prefill: 4 masked inputs and 7 products per layer
    EXPECT_EQ(pooled, 2);  // decoding steps, pooled over projections and layers per role
    // Positive control: the same statistic does see the plaintext (the gpu-only trace against itself shifted by a
    // constant, which is what a reused mask would leave).
    const auto x = load_npy(dir + "/gpu-only/" + plain[5 * 7]["file"].get<std::string>(), "int32");
    std::vector<double> shifted = x;
    for (auto& v : shifted) v = std::fmod(v + 12345678.0 + 4294967296.0, 4294967296.0);
    EXPECT_GT(std::fabs(pearson(x, shifted)), 0.5);
}

TEST(Secure, TraceHoldsNoSecretTensor) {
    const std::string dir = test::scratch_dir();
    const ModelWeights& w = stories();
    const train::LoraAdapter lora = random_lora(w.cfg, 5);
    auto p = params(SecureMode::secureinfer);
    p.trace_dir = dir;
    p.lora = &lora;
    p.secret_tensors = {"blk.1.attn_v.weight", "blk.3.ffn_up.weight"};
    {
        SecureSession s(w, p);
        greedy(s, {1, 403, 407}, 16);
        s.reset();
        s.eval_nll(std::vector<int32_t>{1, 403, 407, 261}, std::vector<int32_t>{403, 407, 261, -1});
    }
    std::string all;
    for (const auto& e : std::filesystem::directory_iterator(dir)) all += test::read_file(e.path().string());
    ASSERT_GT(all.size(), size_t(100000));
    // The int8 rows of the secret projections (as the host would quantise them) and windows of the LoRA factors.
    for (auto [layer, pj, src] : {std::tuple{1, Proj::v, &w.layers[1].wv}, std::tuple{3, Proj::w3, &w.layers[3].w3}}) {
        const ProjShape sh = proj_shape(w.cfg, pj);
        std::vector<int8_t> q(size_t(sh.rows * sh.cols));
        std::vector<float> sc(size_t(sh.rows));
        quantize_rows_i8(src->data(), sh.rows, sh.cols, q.data(), sc.data(), nullptr);
        for (int64_t r = 0; r < sh.rows; r += 7) {
            const std::string row(reinterpret_cast<const char*>(q.data() + r * sh.cols), size_t(sh.cols));
            EXPECT_EQ(all.find(row), std::string::npos) << proj_tensor_name(layer, pj) << " row " << r;
        }
    }
    for (const auto& t : lora.tensors)
        for (const auto* m : {&t.a, &t.b})
            for (size_t i = 0; i + 4 <= m->size(); i += 37) {
                const std::string win(reinterpret_cast<const char*>(m->data() + i), 16);
                ASSERT_EQ(all.find(win), std::string::npos) << "LoRA factor bytes in the trace";
            }
    // and the index lists no weight upload for the secret projections
    for (const auto& e : read_index(dir))
        if (e["role"] == "weight") {
            EXPECT_FALSE(e["layer"] == 1 && e["op"] == "wv");
            EXPECT_FALSE(e["layer"] == 3 && e["op"] == "w3");
        }
}

// ---- LoRA --------------------------------------------------------------------------------------------------------

// LoRA applied in the enclave as W0 x + scale B (A x) with W0 x from the masked offload, against the f32 engine on
// merged weights W0 + scale B A, where W0 is the public int8 base (each row dequantised: w_scale[row] * q). The only
// difference left is the fixed-point rounding of the activations at the seven projections and the classifier (also
// a public int8 base projection, dequantised the same way; b = 16 bits here).
// Stated bound: max |logit difference| < 0.01 over a 17-token sequence (logits span about +-20). The adapter itself
// moves the logits by far more (checked), so the bound has teeth. The secure modes match gpu-only exactly (NLL and
// tokens), so this bound holds for the enclave's logits too.
TEST(Secure, LoraInTheEnclaveMatchesMergedWeights) {
    const ModelWeights& w = stories();
    const train::LoraAdapter lora = random_lora(w.cfg, 11);
    ModelWeights base = w;  // the int8 public base, dequantised
    for (int l = 0; l < w.cfg.n_layers; ++l) {
        LayerWeights& L = base.layers[size_t(l)];
        std::vector<float>* dst[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3};
        for (Proj pj : kAllProj) {
            const ProjShape sh = proj_shape(w.cfg, pj);
            std::vector<int8_t> q(size_t(sh.rows * sh.cols));
            std::vector<float> sc(size_t(sh.rows));
            quantize_rows_i8(dst[int(pj)]->data(), sh.rows, sh.cols, q.data(), sc.data(), nullptr);
            for (int64_t r = 0; r < sh.rows; ++r)
                for (int64_t c = 0; c < sh.cols; ++c)
                    (*dst[int(pj)])[size_t(r * sh.cols + c)] = float(q[size_t(r * sh.cols + c)]) * sc[size_t(r)];
        }
    }
    {
        // the classifier is a public int8 base projection too (the token embeddings, when tied, stay f32)
        const std::vector<float>& W = w.tied() ? w.tok_embeddings : w.classifier;
        const int64_t rows = w.cfg.vocab_size, cols = w.cfg.dim;
        std::vector<int8_t> q(static_cast<size_t>(rows * cols));
        std::vector<float> sc(static_cast<size_t>(rows));
        quantize_rows_i8(W.data(), rows, cols, q.data(), sc.data(), nullptr);
        base.classifier.resize(size_t(rows * cols));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c)
                base.classifier[size_t(r * cols + c)] = float(q[size_t(r * cols + c)]) * sc[size_t(r)];
    }
    ModelWeights merged = base;
    train::merge_lora(merged, lora, 1.0f);
    std::vector<int32_t> toks = {1};
    toks.insert(toks.end(), kGolden.begin(), kGolden.end());
    const int V = w.cfg.vocab_size;
    const size_t n = toks.size() * size_t(V);
    auto max_diff = [&](const float* a, const float* b) {
        float d = 0;
        for (size_t i = 0; i < n; ++i) d = std::max(d, std::fabs(a[i] - b[i]));
        return d;
    };
    EngineParams ep;
    ep.n_threads = 1;
    Engine base_f32(base, ep), merged_f32(merged, ep);
    const float* lb = base_f32.eval(toks, true);
    const std::vector<float> f32_base(lb, lb + n);
    const float* lm = merged_f32.eval(toks, true);
    const std::vector<float> f32_merged(lm, lm + n);

    auto gp = params(SecureMode::gpu_only);
    SecureSession gpu_base(w, gp);
    const float err0 = max_diff(gpu_base.eval_logits(toks, true), f32_base.data());
    gp.lora = &lora;
    gp.insecure = true;
    SecureSession gpu_lora(w, gp);
    const float err = max_diff(gpu_lora.eval_logits(toks, true), f32_merged.data());
    const float effect = max_diff(f32_merged.data(), f32_base.data());
    EXPECT_LT(err0, 0.01f);
    EXPECT_LT(err, 0.01f) << "without adapter: " << err0;
    EXPECT_GT(effect, 100.0f * 0.01f) << "the adapter must change the model far more than the bound";
    std::printf("LoRA check: max |logit diff| %.5f with adapter, %.5f without; the adapter moves logits by %.3f\n",
                double(err), double(err0), double(effect));

    auto sp = params(SecureMode::secureinfer);
    sp.lora = &lora;
    SecureSession secure(w, sp);
    gpu_lora.reset();
    std::vector<int32_t> targets(toks.begin() + 1, toks.end());
    targets.push_back(-1);
    EXPECT_EQ(secure.eval_nll(toks, targets), gpu_lora.eval_nll(toks, targets));
    secure.reset();
    gpu_lora.reset();
    EXPECT_EQ(greedy(secure, {1}, 32), greedy(gpu_lora, {1}, 32));
    // gpu-only refuses an adapter unless forced
    auto refuse = params(SecureMode::gpu_only);
    refuse.lora = &lora;
    EXPECT_EQ(status_of([&] { SecureSession s(w, refuse); }), Status::security);
}

// ---- log-probabilities -------------------------------------------------------------------------------------------

TEST(Secure, LogprobsAreReleasedOnlyOnRequestWithConfiguredNoise) {
    auto p = params(SecureMode::secureinfer);
    SecureSession none(stories(), p);
    std::vector<TokenLogprob> lp;
    none.eval_sample(std::vector<int32_t>{1}, &lp);
    EXPECT_TRUE(lp.empty());

    p.logprobs = 5;
    SecureSession exact(stories(), p);
    auto g = params(SecureMode::gpu_only);
    g.logprobs = 5;
    SecureSession gpu(stories(), g);
    p.logprob_noise = 0.5f;
    SecureSession noisy(stories(), p);
    std::vector<double> deltas;
    int32_t a = 1, b = 1, c = 1;
    for (int step = 0; step < 40; ++step) {
        std::vector<TokenLogprob> la, lb, lc;
        a = exact.eval_sample(std::span<const int32_t>(&a, 1), &la);
        b = gpu.eval_sample(std::span<const int32_t>(&b, 1), &lb);
        c = noisy.eval_sample(std::span<const int32_t>(&c, 1), &lc);
        ASSERT_EQ(la.size(), 5u);
        ASSERT_EQ(a, c);  // sampling uses the logits, never the noised values
        EXPECT_EQ(la[0].token, a);  // greedy: the best entry is the sampled token
        float prev = 0;
        for (size_t i = 0; i < la.size(); ++i) {
            EXPECT_EQ(la[i].token, lb[i].token);
            EXPECT_EQ(la[i].logprob, lb[i].logprob);
            EXPECT_LE(la[i].logprob, 0.0f);
            if (i) {
                EXPECT_LE(la[i].logprob, prev);
            }
            prev = la[i].logprob;
            EXPECT_EQ(lc[i].token, la[i].token);
            deltas.push_back(double(lc[i].logprob) - double(la[i].logprob));
        }
    }
    double mean = 0, var = 0;
    for (double d : deltas) mean += d;
    mean /= double(deltas.size());
    for (double d : deltas) var += (d - mean) * (d - mean);
    const double sd = std::sqrt(var / double(deltas.size() - 1));
    EXPECT_NEAR(mean, 0.0, 0.15);
    EXPECT_NEAR(sd, 0.5, 0.1);
}

// ---- the boundary's defences -------------------------------------------------------------------------------------

namespace {

struct Core {
    si_enclave* e = nullptr;
    std::vector<uint8_t> buf = std::vector<uint8_t>(1 << 20);
    Core() { EXPECT_EQ(si_ecall_create(nullptr, &e), 0); }
    ~Core() { si_ecall_destroy(e); }
    int call(const std::vector<uint8_t>& req, std::string* err = nullptr) {
        size_t len = 0;
        const int rc = si_ecall_process(e, req.data(), req.size(), buf.data(), buf.size(), &len);
        if (rc != 0 && err) *err = reinterpret_cast<const char*>(buf.data());
        return rc;
    }
};

std::vector<uint8_t> configure_tiny() {
    const ModelConfig& c = tiny().cfg;
    wire::Encoder e(wire::MsgType::configure);
    e.add(wire::Tag::cfg_ints, std::vector<int32_t>{c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                                                   c.vocab_size, c.seq_len, c.seq_len});
    e.add(wire::Tag::cfg_floats, std::vector<float>{c.rope_theta, c.norm_eps});
    e.scalar<uint8_t>(wire::Tag::offload, 1);
    e.scalar<uint8_t>(wire::Tag::tied, 0);
    return e.finish();
}

}  // namespace

TEST(Secure, MalformedRequestsGetErrorsNotUndefinedBehaviour) {
    const int kInvalid = int(Status::invalid_argument);
    {
        Core c;
        std::string err;
        EXPECT_EQ(c.call({}, &err), kInvalid);
        EXPECT_NE(err.find("malformed message"), std::string::npos) << err;
        EXPECT_EQ(c.call(std::vector<uint8_t>(16, 0xff), &err), kInvalid);
        auto good = configure_tiny();
        auto trunc = std::vector<uint8_t>(good.begin(), good.end() - 3);
        EXPECT_EQ(c.call(trunc, &err), kInvalid);
        EXPECT_NE(err.find("past the end"), std::string::npos) << err;
        auto dup = good;  // a count that points far past the end
        dup[16 + 4] = 0xff;
        dup[16 + 7] = 0x7f;
        EXPECT_EQ(c.call(dup), kInvalid);
        // semantic errors: eval before the model is loaded, products without a crossing
        wire::Encoder ev(wire::MsgType::eval);
        ev.add(wire::Tag::tokens, std::vector<int32_t>{1});
        ev.scalar<uint8_t>(wire::Tag::output, 1);
        EXPECT_EQ(c.call(ev.finish(), &err), kInvalid);
        EXPECT_NE(err.find("not loaded"), std::string::npos) << err;
        EXPECT_EQ(c.call(good), 0);
        EXPECT_EQ(c.call(good, &err), kInvalid);  // configured twice
        // uploads out of range
        wire::Encoder up(wire::MsgType::upload);
        up.scalar<uint32_t>(wire::Tag::kind, uint32_t(wire::TensorKind::attn_norm));
        up.scalar<int32_t>(wire::Tag::layer, 7);
        up.scalar<int32_t>(wire::Tag::proj, 0);
        up.scalar<uint64_t>(wire::Tag::offset, 0);
        up.scalar<uint64_t>(wire::Tag::total, 32);
        up.add(wire::Tag::data_f32, std::vector<float>(32, 1.0f));
        EXPECT_EQ(c.call(up.finish(), &err), kInvalid);
        EXPECT_NE(err.find("layer 7 out of range"), std::string::npos) << err;
        wire::Encoder up2(wire::MsgType::upload);
        up2.scalar<uint32_t>(wire::Tag::kind, uint32_t(wire::TensorKind::final_norm));
        up2.scalar<int32_t>(wire::Tag::layer, 0);
        up2.scalar<int32_t>(wire::Tag::proj, 0);
        up2.scalar<uint64_t>(wire::Tag::offset, 16);
        up2.scalar<uint64_t>(wire::Tag::total, 32);
        up2.add(wire::Tag::data_f32, std::vector<float>(32, 1.0f));
        EXPECT_EQ(c.call(up2.finish(), &err), kInvalid);  // out of order, and past the end
        EXPECT_EQ(c.call(wire::Encoder(wire::MsgType::finalize).finish(), &err), kInvalid);
        EXPECT_NE(err.find("missing or incomplete"), std::string::npos) << err;
        // a response type as a request
        EXPECT_EQ(c.call(wire::Encoder(wire::MsgType::ok).finish()), kInvalid);
    }
    // Random corruption of valid requests, each on a fresh core: errors, never crashes (the sanitizer build
    // checks for undefined behaviour too; fuzz/fuzz_enclave_messages.cpp goes further).
    std::mt19937_64 rng(1);
    const auto good = configure_tiny();
    for (int i = 0; i < 3000; ++i) {
        Core c;
        auto req = good;
        const int flips = 1 + int(rng() % 4);
        for (int f = 0; f < flips; ++f) req[rng() % req.size()] ^= uint8_t(1u << (rng() % 8));
        if (rng() % 4 == 0) req.resize(rng() % req.size());
        const int rc = c.call(req);
        EXPECT_LE(rc, 0);
        EXPECT_GE(rc, int(Status::internal));
    }
}

// ---- C API and CLI -----------------------------------------------------------------------------------------------

TEST(Secure, CApiRoutesModes) {
    si_model* m = nullptr;
    si_model_params mp = si_model_default_params();
    const std::string tok = test::shared("models/tok512.bin");
    mp.tokenizer_path = tok.c_str();
    ASSERT_EQ(si_model_load(test::shared("models/stories260K.bin").c_str(), &mp, &m), SI_OK);
    si_context_params cp = si_context_default_params();
    EXPECT_EQ(cp.mode, SI_MODE_SECUREINFER);
    cp.enclave_host = SI_HOST_INPROCESS;
    si_context* c = nullptr;
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK) << si_last_error();
    const si_token bos = 1;
    std::vector<float> logits(512);
    EXPECT_EQ(si_eval(c, &bos, 1, 0, logits.data()), SI_ERR_SECURITY);
    EXPECT_EQ(si_eval(c, &bos, 1, 0, nullptr), SI_OK);
    si_stats st{};
    ASSERT_EQ(si_context_stats(c, &st), SI_OK);
    EXPECT_EQ(st.crossings, 20u);  // 5 layers x 4 stages
    EXPECT_GT(st.bytes_to_enclave, 0u);
    si_context_free(c);
    cp.mode = SI_MODE_GPU_ONLY;
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK);
    EXPECT_EQ(si_eval(c, &bos, 1, 0, logits.data()), SI_OK);
    si_context_free(c);
    si_model_free(m);
}

TEST(Secure, CliModesStatsAndTrace) {
    const std::string model = test::shared("models/stories260K.bin"), tok = test::shared("models/tok512.bin");
    std::map<std::string, std::string> outs;
    for (const char* mode : {"gpu-only", "enclave-only", "secureinfer"}) {
        const auto r = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "40", "--temp", "0", "--mode", mode,
                                      "--host", "inprocess", "--stats", "-t", "1"});
        ASSERT_EQ(r.exit_code, 0) << r.err;
        outs[mode] = r.out;
        EXPECT_NE(r.err.find("stats: crossings"), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("stats: bytes host->enclave"), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("accelerator"), std::string::npos) << r.err;
        if (std::string(mode) != "gpu-only") {
            EXPECT_NE(r.err.find("WARNING"), std::string::npos) << "in-process must warn loudly: " << r.err;
        }
    }
    EXPECT_EQ(outs["gpu-only"], outs["secureinfer"]);
    EXPECT_EQ(outs["enclave-only"], outs["secureinfer"]);
    // the default mode is secureinfer
    const auto d = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "40", "--temp", "0", "--host", "inprocess", "-t", "1"});
    ASSERT_EQ(d.exit_code, 0) << d.err;
    EXPECT_EQ(d.out, outs["secureinfer"]);
    // gpu-only refuses secrets without --insecure
    const auto refused = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "4", "--mode", "gpu-only",
                                        "--secret", "blk.0.attn_q.weight"});
    EXPECT_EQ(refused.exit_code, 1);
    EXPECT_NE(refused.err.find("--insecure"), std::string::npos) << refused.err;
    // trace
    const std::string dir = test::scratch_dir() + "/trace";
    const auto t = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "4", "--temp", "0", "--host", "inprocess",
                                  "-t", "1", "--trace", dir});
    ASSERT_EQ(t.exit_code, 0) << t.err;
    const auto index = read_index(dir);
    ASSERT_FALSE(index.empty());
    for (const char* key : {"seq", "layer", "op", "role", "dtype", "shape", "file"}) EXPECT_TRUE(index[0].contains(key));
    // usage errors
    const auto u = test::run_cli({"run", "-m", model, "--mode", "secureinfer", "--weights", "int8"});
    EXPECT_EQ(u.exit_code, 2);
    EXPECT_NE(u.err.find("--weights applies to --mode plain"), std::string::npos) << u.err;
}

// ---- offline unblinding factors (secureinfer precompute) ----------------------------------------------------------

namespace {

// An enclave host in the middle: records the precompute answers and the crossings, and can tamper with the sealed
// unit that one request hands back (a products request, or with `ahead` the unit request sent before it).
class SealedWatchHost final : public EnclaveHost {
public:
    enum class Tamper { none, replay, flip, foreign };
    explicit SealedWatchHost(Tamper t, bool ahead = false) : inner_(make_inprocess_host()), tamper_(t), ahead_(ahead) {}
    std::string isolation() const override { return inner_->isolation(); }
    bool concurrent() const override { return ahead_; }
    void call(std::span<const uint8_t> request, std::vector<uint8_t>& response) override {
        const wire::Message m = wire::decode(request);
        std::vector<uint8_t> changed;
        if ((m.type() == wire::MsgType::products || m.type() == wire::MsgType::unit) && m.has(wire::Tag::sealed)) {
            const int32_t layer = m.scalar<int32_t>(wire::Tag::layer);
            const uint8_t stage = m.scalar<uint8_t>(wire::Tag::stage);
            const auto unit = m.array<uint8_t>(wire::Tag::sealed);
            ++sealed_seen;
            if (m.type() == wire::MsgType::unit) ++units_ahead;
            std::vector<uint8_t> use = unit;
            if (!tampered) {
                if (tamper_ == Tamper::flip) {
                    use[use.size() / 2] ^= 0x01;
                } else if (tamper_ == Tamper::replay && last_.count({layer, stage})) {
                    use = last_[{layer, stage}];
                } else if (tamper_ == Tamper::foreign && layer > 0 && last_.count({layer - 1, stage}) &&
                           last_[{layer - 1, stage}].size() == unit.size()) {
                    use = last_[{layer - 1, stage}];
                }
                tampered = use != unit;
            }
            last_[{layer, stage}] = unit;
            if (use != unit) {
                wire::Encoder e(m.type());
                e.scalar<int32_t>(wire::Tag::layer, layer);
                e.scalar<uint8_t>(wire::Tag::stage, stage);
                e.scalar<uint64_t>(wire::Tag::crossing, m.scalar<uint64_t>(wire::Tag::crossing));
                if (m.has(wire::Tag::products)) e.add(wire::Tag::products, m.array<uint32_t>(wire::Tag::products));
                e.add(wire::Tag::sealed, use);
                changed = e.finish();
            }
        }
        if (changed.empty())
            inner_->call(request, response);
        else
            inner_->call(changed, response);
        const wire::Message r = wire::decode(response);
        if (r.type() == wire::MsgType::sealed) {
            const uint64_t off = r.scalar<uint64_t>(wire::Tag::offset);
            const uint64_t n = uint64_t(r.scalar<int32_t>(wire::Tag::count_t)) * uint64_t(r.scalar<int32_t>(wire::Tag::count_k));
            ranges.push_back({off, n, online_since});
            online_since = 0;
        } else if (r.type() == wire::MsgType::offload) {
            if (r.has(wire::Tag::batch)) {
                ++precomputed_crossings;
                if (r.has(wire::Tag::keep)) ++kept_crossings;
            }
            else
                online_since += uint64_t(r.scalar<int32_t>(wire::Tag::count_t)) * uint64_t(r.scalar<int32_t>(wire::Tag::count_k));
        }
    }
    struct Range {
        uint64_t offset, count, online_before;  // online masks drawn since the previous precompute answer
    };
    std::vector<Range> ranges;
    uint64_t online_since = 0, precomputed_crossings = 0, kept_crossings = 0;
    int sealed_seen = 0, units_ahead = 0;
    bool tampered = false;

private:
    std::unique_ptr<EnclaveHost> inner_;
    Tamper tamper_;
    bool ahead_ = false;
    std::map<std::pair<int32_t, uint8_t>, std::vector<uint8_t>> last_;
};

}  // namespace

TEST(Secure, PrecomputedFactorsGiveTheSameTokensAsOnline) {
    const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};
    SecureSession online(stories(), params(SecureMode::secureinfer));
    const auto want = greedy(online, prompt, 24);
    // enough for every decode step
    auto host = std::make_shared<SealedWatchHost>(SealedWatchHost::Tamper::none);
    auto p = params(SecureMode::secureinfer);
    p.enclave_host = host;
    p.precompute_inside_bytes = 0;  // every factor sealed and stored by the host
    SecureSession off(stories(), p);
    int calls = 0, total = 0;
    off.precompute(24, [&](int done, int t) { calls = done, total = t; });
    EXPECT_EQ(calls, total);
    EXPECT_GT(total, 0);
    EXPECT_EQ(off.precomputed_available(), 24);
    EXPECT_EQ(off.stats().precomputed_tokens, 24u);
    EXPECT_GT(off.stats().offline.seconds, 0.0);
    EXPECT_GT(off.stats().offline.flops, 0.0);
    EXPECT_EQ(greedy(off, prompt, 24), want);
    // 23 decode steps; the prompt's blocks run online, but its classifier crossing (one token) uses a sealed unit
    EXPECT_EQ(off.precomputed_available(), 0);
    EXPECT_GT(host->precomputed_crossings, 0u);
    EXPECT_EQ(host->sealed_seen, int(host->precomputed_crossings));
    EXPECT_EQ(host->units_ahead, 0);
    EXPECT_EQ(host->kept_crossings, 0u);
    // kept inside the core (the default budget holds them all): no sealed unit crosses the boundary
    auto inside = std::make_shared<SealedWatchHost>(SealedWatchHost::Tamper::none);
    auto pk = params(SecureMode::secureinfer);
    pk.enclave_host = inside;
    SecureSession kept(stories(), pk);
    kept.precompute(24);
    EXPECT_EQ(kept.precomputed_available(), 24);
    EXPECT_EQ(greedy(kept, prompt, 24), want);
    EXPECT_EQ(kept.precomputed_available(), 0);
    EXPECT_EQ(inside->precomputed_crossings, host->precomputed_crossings);
    EXPECT_EQ(inside->kept_crossings, inside->precomputed_crossings);
    EXPECT_EQ(inside->sealed_seen, 0);
    // a budget for part of them: the first batches are kept, the rest sealed; the same tokens
    auto split = std::make_shared<SealedWatchHost>(SealedWatchHost::Tamper::none);
    pk.enclave_host = split;
    pk.precompute_inside_bytes = 24 * 4 * 3 * stories().cfg.dim;  // about a tenth of the factors
    SecureSession part_kept(stories(), pk);
    part_kept.precompute(24);
    EXPECT_EQ(greedy(part_kept, prompt, 24), want);
    EXPECT_GT(split->kept_crossings, 0u);
    EXPECT_GT(split->sealed_seen, 0);
    EXPECT_EQ(split->kept_crossings + uint64_t(split->sealed_seen), split->precomputed_crossings);
    // a concurrent host gets each unit ahead of its products (the core opens it while the accelerator computes)
    auto ahead = std::make_shared<SealedWatchHost>(SealedWatchHost::Tamper::none, true);
    p.enclave_host = ahead;  // still precompute_inside_bytes = 0
    SecureSession early(stories(), p);
    early.precompute(24);
    EXPECT_EQ(greedy(early, prompt, 24), want);
    EXPECT_GT(ahead->precomputed_crossings, 0u);
    EXPECT_EQ(ahead->units_ahead, int(ahead->precomputed_crossings));
    EXPECT_EQ(ahead->sealed_seen, ahead->units_ahead);
    // fewer than needed: the rest falls back to online unblinding, with the same tokens and one warning
    SecureSession part(stories(), params(SecureMode::secureinfer));
    part.precompute(7);
    EXPECT_EQ(greedy(part, prompt, 24), want);
    EXPECT_EQ(part.precomputed_available(), 0);
    const auto w = part.warnings();
    EXPECT_EQ(std::count(w.begin(), w.end(),
                         std::string("precomputed unblinding factors exhausted: falling back to online unblinding")),
              1);
    // precompute is a secureinfer feature
    SecureSession gpu(stories(), params(SecureMode::gpu_only));
    EXPECT_EQ(status_of([&] { gpu.precompute(4); }), Status::unsupported);
}

TEST(Secure, SealedFactorsAreConsumedExactlyOnce) {
    const std::vector<int32_t> prompt = {1, 403, 407};
    for (int variant = 0; variant < 6; ++variant) {
        const auto t = std::array{SealedWatchHost::Tamper::replay, SealedWatchHost::Tamper::flip,
                                  SealedWatchHost::Tamper::foreign}[variant % 3];
        const bool ahead = variant >= 3;  // the unit travels alone, before the products
        SCOPED_TRACE(ahead ? "unit ahead of its products" : "unit with its products");
        auto host = std::make_shared<SealedWatchHost>(t, ahead);
        auto p = params(SecureMode::secureinfer);
        p.enclave_host = host;
        p.precompute_inside_bytes = 0;
        SecureSession s(stories(), p);
        s.precompute(8);
        s.set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
        // the prompt's classifier crossing (one token) already uses a sealed unit, so it may be the tampered one
        int32_t tok = -1;
        Status st = status_of([&] { tok = s.eval_sample(prompt); });
        int released = 0;
        for (int i = 0; i < 8 && st == Status::ok; ++i) {
            st = status_of([&] { tok = s.eval_sample(std::span<const int32_t>(&tok, 1)); });
            if (st == Status::ok) ++released;
        }
        EXPECT_TRUE(host->tampered) << int(t);
        EXPECT_EQ(st, Status::integrity) << int(t);
        // the tampered step released nothing, and the session stays stopped
        EXPECT_LT(released, 8) << int(t);
        EXPECT_EQ(status_of([&] { s.eval(std::vector<int32_t>{1}); }), Status::integrity) << int(t);
        EXPECT_EQ(status_of([&] { s.precompute(1); }), Status::integrity) << int(t);
    }
    // withholding the sealed unit the core asks for is an integrity failure too
    auto inner = std::shared_ptr<EnclaveHost>(make_inprocess_host());
    auto p = params(SecureMode::secureinfer);
    p.enclave_host = inner;
    SecureSession s(stories(), p);
    wire::Encoder pre(wire::MsgType::precompute);
    pre.scalar<int32_t>(wire::Tag::layer, 0);
    pre.scalar<uint8_t>(wire::Tag::stage, 0);
    pre.scalar<int32_t>(wire::Tag::count_t, 2);
    std::vector<uint8_t> resp;
    inner->call(pre.finish(), resp);
    ASSERT_EQ(wire::decode(resp).type(), wire::MsgType::sealed);
    wire::Encoder ev(wire::MsgType::eval);
    ev.add(wire::Tag::tokens, std::vector<int32_t>{1});
    ev.scalar<uint8_t>(wire::Tag::output, 0);
    inner->call(ev.finish(), resp);
    const std::vector<uint8_t> off_resp = resp;
    const wire::Message m = wire::decode(off_resp);
    ASSERT_EQ(m.type(), wire::MsgType::offload);
    ASSERT_TRUE(m.has(wire::Tag::batch));
    EXPECT_EQ(m.scalar<uint32_t>(wire::Tag::batch_index), 0u);
    const int32_t T = m.scalar<int32_t>(wire::Tag::count_t);
    const size_t n = size_t(T) * size_t(stories().cfg.dim + 2 * stories().cfg.kv_dim());
    wire::Encoder pe(wire::MsgType::products);
    pe.scalar<int32_t>(wire::Tag::layer, 0);
    pe.scalar<uint8_t>(wire::Tag::stage, 0);
    pe.scalar<uint64_t>(wire::Tag::crossing, m.scalar<uint64_t>(wire::Tag::crossing));
    pe.add(wire::Tag::products, std::vector<uint32_t>(n, 0));
    EXPECT_EQ(status_of([&] { inner->call(pe.finish(), resp); }), Status::integrity);
    EXPECT_EQ(status_of([&] { s.eval(std::vector<int32_t>{1}); }), Status::integrity);
}

// The unit request (a crossing's sealed unit ahead of its products) is accepted once, only for the pending crossing,
// and only when that crossing uses precomputed factors; the products then come without it.
TEST(Secure, SealedUnitAheadFollowsTheProtocol) {
    auto inner = std::shared_ptr<EnclaveHost>(make_inprocess_host());
    auto p = params(SecureMode::secureinfer);
    p.enclave_host = inner;
    SecureSession s(stories(), p);  // loads the model into the core behind `inner`
    const size_t rows = size_t(stories().cfg.dim + 2 * stories().cfg.kv_dim());
    wire::Encoder pre(wire::MsgType::precompute);
    pre.scalar<int32_t>(wire::Tag::layer, 0);
    pre.scalar<uint8_t>(wire::Tag::stage, 0);
    pre.scalar<int32_t>(wire::Tag::count_t, 4);
    std::vector<uint8_t> sealed_resp, resp;
    inner->call(pre.finish(), sealed_resp);
    const wire::Message sm = wire::decode(sealed_resp);
    ASSERT_EQ(sm.type(), wire::MsgType::sealed);
    const auto blob = sm.array<uint8_t>(wire::Tag::sealed);
    const size_t unit_bytes = rows * 4 + 16;
    ASSERT_EQ(blob.size(), 4 * unit_bytes);
    const auto unit_of = [&](uint32_t idx) {
        return std::vector<uint8_t>(blob.begin() + std::ptrdiff_t(idx * unit_bytes),
                                    blob.begin() + std::ptrdiff_t((idx + 1) * unit_bytes));
    };
    // starts a pass over `tokens` and returns its first crossing
    const auto begin_pass = [&](std::vector<int32_t> tokens) {
        wire::Encoder ev(wire::MsgType::eval);
        ev.add(wire::Tag::tokens, tokens);
        ev.scalar<uint8_t>(wire::Tag::output, 0);
        inner->call(ev.finish(), resp);
        return resp;
    };
    const auto message = [&](wire::MsgType type, const wire::Message& off, const std::vector<uint8_t>* unit,
                             bool with_products) {
        wire::Encoder e(type);
        e.scalar<int32_t>(wire::Tag::layer, off.scalar<int32_t>(wire::Tag::layer));
        e.scalar<uint8_t>(wire::Tag::stage, off.scalar<uint8_t>(wire::Tag::stage));
        e.scalar<uint64_t>(wire::Tag::crossing, off.scalar<uint64_t>(wire::Tag::crossing));
        if (with_products)
            e.add(wire::Tag::products, std::vector<uint32_t>(size_t(off.scalar<int32_t>(wire::Tag::count_t)) * rows, 0));
        if (unit) e.add(wire::Tag::sealed, *unit);
        return e.finish();
    };
    const auto error_of = [&](const std::vector<uint8_t>& req) {
        try {
            inner->call(req, resp);
        } catch (const Error& e) {
            return std::pair<Status, std::string>(e.status(), e.what());
        }
        return std::pair<Status, std::string>(Status::ok, "");
    };

    // the same unit twice
    std::vector<uint8_t> first = begin_pass({1});
    wire::Message off = wire::decode(first);
    ASSERT_EQ(off.type(), wire::MsgType::offload);
    ASSERT_EQ(off.scalar<uint32_t>(wire::Tag::batch_index), 0u);
    const auto u0 = unit_of(0);
    EXPECT_EQ(error_of(message(wire::MsgType::unit, off, &u0, false)).first, Status::ok);
    EXPECT_EQ(wire::decode(resp).type(), wire::MsgType::ok);
    auto e = error_of(message(wire::MsgType::unit, off, &u0, false));
    EXPECT_EQ(e.first, Status::invalid_argument);
    EXPECT_NE(e.second.find("unit: the crossing's sealed unit was already sent"), std::string::npos) << e.second;

    // a unit, then products that carry it again (the pass above was abandoned; this one uses position 1)
    first = begin_pass({1});
    off = wire::decode(first);
    ASSERT_EQ(off.scalar<uint32_t>(wire::Tag::batch_index), 1u);
    const auto u1 = unit_of(1);
    EXPECT_EQ(error_of(message(wire::MsgType::unit, off, &u1, false)).first, Status::ok);
    e = error_of(message(wire::MsgType::products, off, &u1, true));
    EXPECT_EQ(e.first, Status::invalid_argument);
    EXPECT_NE(e.second.find("products: the crossing's sealed unit was already sent"), std::string::npos) << e.second;

    // a unit for another crossing than the pending one
    first = begin_pass({1});
    off = wire::decode(first);
    const auto u2 = unit_of(2);
    wire::Encoder wrong(wire::MsgType::unit);
    wrong.scalar<int32_t>(wire::Tag::layer, 0);
    wrong.scalar<uint8_t>(wire::Tag::stage, 0);
    wrong.scalar<uint64_t>(wire::Tag::crossing, off.scalar<uint64_t>(wire::Tag::crossing) + 1);
    wrong.add(wire::Tag::sealed, u2);
    e = error_of(wrong.finish());
    EXPECT_EQ(e.first, Status::invalid_argument);
    EXPECT_NE(e.second.find("unit: they answer crossing"), std::string::npos) << e.second;

    // a unit for a crossing that uses no precomputed factors (two tokens: online unblinding)
    first = begin_pass({1, 403});
    off = wire::decode(first);
    ASSERT_FALSE(off.has(wire::Tag::batch));
    const auto u3 = unit_of(3);
    e = error_of(message(wire::MsgType::unit, off, &u3, false));
    EXPECT_EQ(e.first, Status::invalid_argument);
    EXPECT_NE(e.second.find("unit: sealed unblinding factors for a crossing that uses none"), std::string::npos)
        << e.second;
    // a unit outside a pass
    e = error_of(message(wire::MsgType::unit, off, &u3, false));
    EXPECT_NE(e.second.find("unit: no crossing is pending"), std::string::npos) << e.second;
}

// Factors kept inside the core: the offload says so (keep), and a sealed unit offered for such a crossing, with its
// products or ahead of them, is refused; keep must be 0 or 1.
TEST(Secure, KeptFactorsTakeNoSealedUnit) {
    auto inner = std::shared_ptr<EnclaveHost>(make_inprocess_host());
    auto p = params(SecureMode::secureinfer);
    p.enclave_host = inner;
    SecureSession s(stories(), p);
    const size_t rows = size_t(stories().cfg.dim + 2 * stories().cfg.kv_dim());
    const auto precompute = [&](uint8_t keep) {
        wire::Encoder pre(wire::MsgType::precompute);
        pre.scalar<int32_t>(wire::Tag::layer, 0);
        pre.scalar<uint8_t>(wire::Tag::stage, 0);
        pre.scalar<int32_t>(wire::Tag::count_t, 2);
        pre.scalar<uint8_t>(wire::Tag::keep, keep);
        std::vector<uint8_t> r;
        inner->call(pre.finish(), r);
        return r;
    };
    std::string err = error_of([&] { precompute(2); });
    EXPECT_NE(err.find("precompute: keep must be 0 or 1"), std::string::npos) << err;
    const std::vector<uint8_t> kept_resp = precompute(1), sealed_resp = precompute(0);  // decoded views need them
    const wire::Message km = wire::decode(kept_resp);
    ASSERT_EQ(km.type(), wire::MsgType::sealed);
    EXPECT_TRUE(km.has(wire::Tag::keep));
    EXPECT_FALSE(km.has(wire::Tag::sealed));
    // a sealed unit of the same slot from another batch, to offer where none belongs
    const wire::Message sm = wire::decode(sealed_resp);
    const auto blob = sm.array<uint8_t>(wire::Tag::sealed);
    const std::vector<uint8_t> foreign(blob.begin(), blob.begin() + std::ptrdiff_t(rows * 4 + 16));
    for (const bool ahead : {true, false}) {
        wire::Encoder ev(wire::MsgType::eval);
        ev.add(wire::Tag::tokens, std::vector<int32_t>{1});
        ev.scalar<uint8_t>(wire::Tag::output, 0);
        std::vector<uint8_t> resp;
        inner->call(ev.finish(), resp);
        const std::vector<uint8_t> off_bytes = resp;
        const wire::Message off = wire::decode(off_bytes);
        ASSERT_EQ(off.type(), wire::MsgType::offload);
        EXPECT_TRUE(off.has(wire::Tag::keep));
        wire::Encoder e(ahead ? wire::MsgType::unit : wire::MsgType::products);
        e.scalar<int32_t>(wire::Tag::layer, 0);
        e.scalar<uint8_t>(wire::Tag::stage, 0);
        e.scalar<uint64_t>(wire::Tag::crossing, off.scalar<uint64_t>(wire::Tag::crossing));
        if (!ahead) e.add(wire::Tag::products, std::vector<uint32_t>(rows, 0));
        e.add(wire::Tag::sealed, foreign);
        err = error_of([&] { inner->call(e.finish(), resp); });
        EXPECT_NE(err.find(std::string(ahead ? "unit" : "products") +
                           ": the crossing's factors are kept inside the core; no sealed unit belongs to it"),
                  std::string::npos)
            << err;
    }
}

TEST(Secure, PrecomputedAndOnlineMasksNeverOverlap) {
    auto host = std::make_shared<SealedWatchHost>(SealedWatchHost::Tamper::none);
    auto p = params(SecureMode::secureinfer);
    p.enclave_host = host;
    SecureSession s(stories(), p);
    s.precompute(2);
    greedy(s, {1, 403, 407}, 5);  // prefill online, 2 decode steps precomputed, 2 online
    s.precompute(3);
    greedy(s, {7}, 6);  // prefill online, 3 precomputed, 2 online
    s.precompute(1);
    ASSERT_GE(host->ranges.size(), 3u);
    // Every range starts exactly where the stream stood: after every earlier range and every online pad drawn
    // since, so reserved pads, online pads and other batches never share a position.
    uint64_t end = 0;
    uint64_t online_total = 0;
    for (const auto& r : host->ranges) {
        EXPECT_EQ(r.offset, end + r.online_before);
        EXPECT_GT(r.count, 0u);
        end = r.offset + r.count;
        online_total += r.online_before;
    }
    EXPECT_GT(online_total, 0u);
    // three precompute calls of one batch per offloaded (layer, stage); 2 + 3 decode steps used them
    ASSERT_EQ(host->ranges.size() % 3, 0u);
    EXPECT_EQ(host->precomputed_crossings, uint64_t(5) * (host->ranges.size() / 3));
}

TEST(Secure, CliAndCApiPrecompute) {
    const std::string model = test::shared("models/stories260K.bin"), tok = test::shared("models/tok512.bin");
    const auto online = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "24", "--temp", "0", "--host",
                                       "inprocess", "-t", "1"});
    ASSERT_EQ(online.exit_code, 0) << online.err;
    // 10 precomputed decode steps, then online: the same text, one fallback notice
    const auto pre = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "24", "--temp", "0", "--host",
                                    "inprocess", "-t", "1", "--precompute", "10"});
    ASSERT_EQ(pre.exit_code, 0) << pre.err;
    EXPECT_EQ(pre.out, online.out);
    EXPECT_NE(pre.err.find("tokens/s"), std::string::npos) << pre.err;
    EXPECT_NE(pre.err.find("precomputed unblinding factors exhausted: falling back to online unblinding"),
              std::string::npos) << pre.err;
    const auto bad = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "4", "--mode", "gpu-only",
                                    "--precompute", "4"});
    EXPECT_EQ(bad.exit_code, 2) << bad.err;
    const auto cmd = test::run_cli({"precompute", "-m", model, "--tokenizer", tok, "-n", "16", "--host", "inprocess",
                                    "-t", "1"});
    ASSERT_EQ(cmd.exit_code, 0) << cmd.err;
    EXPECT_NE(cmd.out.find("16 tokens of unblinding factors"), std::string::npos) << cmd.out;
    EXPECT_NE(cmd.out.find("MiB kept inside the enclave, 0.0 MiB sealed to host memory"), std::string::npos) << cmd.out;
    const auto cmd_sealed = test::run_cli({"precompute", "-m", model, "--tokenizer", tok, "-n", "16", "--host",
                                           "inprocess", "-t", "1", "--precompute-inside", "0"});
    ASSERT_EQ(cmd_sealed.exit_code, 0) << cmd_sealed.err;
    EXPECT_NE(cmd_sealed.out.find("0.0 MiB kept inside the enclave"), std::string::npos) << cmd_sealed.out;
    EXPECT_NE(cmd.err.find("precompute: done 16 tokens in "), std::string::npos) << cmd.err;
    // every factor sealed to host memory: the same text
    const auto sealed = test::run_cli({"run", "-m", model, "--tokenizer", tok, "-n", "24", "--temp", "0", "--host",
                                       "inprocess", "-t", "1", "--precompute", "10", "--precompute-inside", "0"});
    ASSERT_EQ(sealed.exit_code, 0) << sealed.err;
    EXPECT_EQ(sealed.out, online.out);
    const auto too_much = test::run_cli({"run", "-m", model, "--tokenizer", tok, "--precompute", "4",
                                         "--precompute-inside", "2048"});
    EXPECT_EQ(too_much.exit_code, 2) << too_much.err;
    EXPECT_NE(too_much.err.find("--precompute-inside"), std::string::npos) << too_much.err;
    // the C API
    si_model* m = nullptr;
    si_model_params mp = si_model_default_params();
    mp.tokenizer_path = tok.c_str();
    ASSERT_EQ(si_model_load(model.c_str(), &mp, &m), SI_OK);
    si_context_params cp = si_context_default_params();
    cp.enclave_host = SI_HOST_INPROCESS;
    si_context* c = nullptr;
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK) << si_last_error();
    int calls = 0;
    double secs = -1.0;
    EXPECT_EQ(si_context_precompute(c, 4, [](int, int, void* u) { ++*static_cast<int*>(u); }, &calls, &secs), SI_OK)
        << si_last_error();
    EXPECT_GT(calls, 0);
    EXPECT_GE(secs, 0.0);
    si_context_free(c);
    si_context_params big = cp;
    big.precompute_inside_mib = 1025;
    EXPECT_EQ(si_context_init(m, &big, &c), SI_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(si_last_error()).find("precompute_inside_mib must be in [0, 1024]"), std::string::npos)
        << si_last_error();
    cp.mode = SI_MODE_GPU_ONLY;
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK);
    EXPECT_NE(si_context_precompute(c, 4, nullptr, nullptr, nullptr), SI_OK);
    si_context_free(c);
    si_model_free(m);
}
