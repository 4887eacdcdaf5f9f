#include "host/secure_session.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "backends/accelerator.h"
#include "boundary/enclave_abi.h"
#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/matmul.h"
#include "common/staged_forward.h"
#include "common/tensor_source.h"
#include "common/threadpool.h"
#include "enclave/fixed_point.h"
#include "enclave/package_crypto.h"
#include "host/enclave_host.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "host/trace.h"
#include "host/worker_host.h"
#include "train/lora.h"

namespace si {

namespace {

using wire::Encoder;
using wire::Message;
using wire::MsgType;
using wire::Tag;
using wire::TensorKind;
using wire::WireType;

// Upload chunks stay far below SI_ENCLAVE_MAX_MESSAGE.
constexpr size_t kChunkBytes = size_t(8) << 20;
// Room for headers and small fields next to the bulk field of a crossing.
constexpr size_t kMessageSlack = 64 << 10;
// Pause instructions the presets' pool spins after each loop before sleeping (the enclave's pools' value).
constexpr int kSessionPoolSpin = 2000;

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Adds the wall time of a scope to a counter.
struct ScopedTime {
    double& acc;
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    ~ScopedTime() { acc += seconds_since(t0); }
};

// The projections of a crossing slot: a block's stage, or (layer n_layers, stage qkv) the classifier.
std::span<const Proj> slot_projs(int layer, int n_layers, Stage st) {
    static constexpr Proj kCls[] = {kClassifierSlot};
    if (layer == n_layers) return st == Stage::qkv ? std::span<const Proj>(kCls) : std::span<const Proj>();
    return stage_projs(st);
}

bool slot_has(int layer, int n_layers, Stage s, Proj p) {
    for (Proj q : slot_projs(layer, n_layers, s))
        if (q == p) return true;
    return false;
}

}  // namespace

const char* secure_mode_name(SecureMode m) {
    switch (m) {
        case SecureMode::gpu_only: return "gpu-only";
        case SecureMode::enclave_only: return "enclave-only";
        case SecureMode::secureinfer: return "secureinfer";
    }
    return "?";
}

std::optional<SecureMode> parse_secure_mode(const std::string& s) {
    if (s == "gpu-only") return SecureMode::gpu_only;
    if (s == "enclave-only") return SecureMode::enclave_only;
    if (s == "secureinfer") return SecureMode::secureinfer;
    return std::nullopt;
}

struct SecureSession::HostProj {
    int64_t rows = 0, cols = 0;
    std::vector<float> scale;  // gpu-only dequantisation
};

// The accelerator's weight for one crossing slot: its offloaded projections stacked row-wise (q|k|v, w1|w3), so
// that a crossing is one product (its input crosses once; a GPU pays its fixed cost per call once).
struct SecureSession::SlotWeights {
    WeightHandle handle;
    std::vector<uint8_t> projs;       // the projections, in stage order
    std::vector<int64_t> proj_rows;   // the rows of each
    int64_t rows = 0;                 // their rows together
};

namespace {
// Y [T][rows] of a stacked product to the wire layout: projection after projection, each [T][rows_p].
void unstack(const uint32_t* y, int64_t T, int64_t rows, std::span<const int64_t> proj_rows, uint8_t* out) {
    int64_t at = 0;
    for (const int64_t r : proj_rows) {
        for (int64_t t = 0; t < T; ++t, out += r * 4) std::memcpy(out, y + t * rows + at, size_t(r) * 4);
        at += r;
    }
}
}  // namespace

// The gpu-only preset's plaintext state on the host.
struct SecureSession::Gpu {
    std::unique_ptr<StagedForward> fw;
    std::vector<KvCache> caches;                     // [slot]
    std::vector<std::unique_ptr<Sampler>> samplers;  // [slot]
    std::vector<SamplerParams> sampler_params;       // [slot]
    std::vector<float> logits;
    std::vector<int32_t> xq, acc, stacked;
    std::vector<float> xs;
    std::mt19937_64 noise{std::random_device{}()};
};

// Host time of a public call: its wall time minus what the enclave and the accelerator spent inside it.
class SecureSession::Timer {
public:
    explicit Timer(SessionStats& s) : s_(s), e0_(s.enclave.seconds), a0_(s.accelerator.seconds) {}
    ~Timer() {
        const double inside = (s_.enclave.seconds - e0_) + (s_.accelerator.seconds - a0_);
        s_.host.seconds += std::max(0.0, seconds_since(t0_) - inside);
    }

private:
    SessionStats& s_;
    double e0_, a0_;
    std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

SecureSession::SecureSession(const ModelWeights& w, SecureSessionParams params)
    : SecureSession(DenseSource(w), std::move(params)) {}

SecureSession::SecureSession(const TensorSource& src, SecureSessionParams params) : params_(std::move(params)) {
    init(src, nullptr);
}

SecureSession::SecureSession(std::shared_ptr<const TensorSource> src, SecureSessionParams params)
    : params_(std::move(params)) {
    if (!src) fail(Status::invalid_argument, "no model source");
    init(*src, src);
}

void SecureSession::init(const TensorSource& src, std::shared_ptr<const TensorSource> keep) {
    cfg_ = src.config();
    cfg_.validate("model");
    cfg_tied_ = src.tied();
    n_ctx_ = params_.n_ctx > 0 ? std::min(params_.n_ctx, cfg_.seq_len) : cfg_.seq_len;
    if (params_.n_batch <= 0) fail(Status::invalid_argument, "batch size must be positive");
    if (params_.slots < 1 || params_.slots > 1024)
        fail(Status::invalid_argument, "slot count " + std::to_string(params_.slots) + " out of range [1, 1024]");
    slot_pos_.assign(size_t(params_.slots), 0);
    if (params_.logprobs < 0 || params_.logprobs > cfg_.vocab_size)
        fail(Status::invalid_argument, "--logprobs must lie in [0, vocabulary size " + std::to_string(cfg_.vocab_size) + "]");
    if (!std::isfinite(params_.logprob_noise) || params_.logprob_noise < 0.0f)
        fail(Status::invalid_argument, "the log-probability noise must be a non-negative number");

    if (params_.package) {
        if (params_.lora)
            fail(Status::invalid_argument, "a protected package carries its own adapters; another cannot be added");
        if (params_.mode == SecureMode::gpu_only)
            fail(Status::security, "a protected package's secret tensors open only inside the enclave: the gpu-only "
                                   "preset cannot run it");
        for (const auto& n : params_.package->secret_base_tensors()) params_.secret_tensors.push_back(n);
    }
    // Secret declarations must name real tensors, so a typo cannot silently leave a tensor public.
    std::vector<std::string> names = {"token_embd.weight", "output_norm.weight", "output.weight"};
    for (int l = 0; l < cfg_.n_layers; ++l) {
        names.push_back("blk." + std::to_string(l) + ".attn_norm.weight");
        names.push_back("blk." + std::to_string(l) + ".ffn_norm.weight");
        for (Proj p : kAllProj) names.push_back(proj_tensor_name(l, p));
    }
    for (const auto& s : params_.secret_tensors)
        if (s != "*" && std::find(names.begin(), names.end(), s) == names.end())
            fail(Status::invalid_argument, "secret tensor declaration names no tensor of this model: " + s);

    // A crossing (masked input out, products back) must fit one message: larger prefills are split into passes.
    const int64_t d = cfg_.dim, h = cfg_.hidden_dim, kv = cfg_.kv_dim();
    const int64_t widest = std::max({d, h, d + 2 * kv, 2 * h, int64_t(cfg_.vocab_size)});
    const int64_t max_T = int64_t(SI_ENCLAVE_MAX_MESSAGE - kMessageSlack) / (4 * widest);
    if (max_T < 1)
        fail(Status::unsupported, "a single token's crossing of this model (" + std::to_string(4 * widest) +
                                      " bytes) exceeds the enclave message limit of " +
                                      std::to_string(SI_ENCLAVE_MAX_MESSAGE) + " bytes");
    n_batch_ = int(std::min<int64_t>({params_.n_batch, max_T, n_ctx_}));

    // The presets' pool spins briefly after each loop (as the enclave's pools do), not the plain engine's ~1 ms
    // (50000 pauses on a recent Xeon): in secureinfer mode the enclave's threads run on the same cores between the
    // accelerator's products, and a server's stepping thread hands over to the request threads between steps, so a
    // spinning worker only takes a core from the thread everything waits for. Measured on the 2-vCPU VM under load,
    // `serve --parallel 4 -t 2`, stories110M shape: gpu-only 37 -> 130-155 tokens/s, secureinfer 40-48 -> 58-62
    // (BENCHMARKS.md, "Continuous batching").
    pool_ = std::make_unique<ThreadPool>(params_.n_threads, kSessionPoolSpin);
    accel_ = params_.accelerator ? params_.accelerator
                                 : std::shared_ptr<Accelerator>(make_accelerator(params_.accelerator_backend, pool_.get()));
    if (!params_.trace_dir.empty()) trace_ = std::make_unique<TraceWriter>(params_.trace_dir);

    // The public int8 base projections are quantised one at a time from the source as the model loads (stream_
    // projections): the same bytes go to the accelerator and the enclave (which would catch any difference with
    // Freivalds' check); only their scales stay here.
    projs_.resize(size_t(cfg_.n_layers) * 7 + 1);
    for (int l = 0; l < cfg_.n_layers; ++l)
        for (Proj p : kAllProj) {
            const ProjShape s = proj_shape(cfg_, p);
            projs_[size_t(l) * 7 + size_t(p)].rows = s.rows;
            projs_[size_t(l) * 7 + size_t(p)].cols = s.cols;
        }
    projs_.back().rows = cfg_.vocab_size;  // the classifier (output, or token_embd when tied), layer n_layers
    projs_.back().cols = cfg_.dim;
    // What goes on the accelerator: everything in gpu-only; in secureinfer every projection not declared secret
    // (the trusted core's plan at finalize must agree); nothing in enclave-only.
    plan_.assign(projs_.size(), 0);
    for (int l = 0; l < cfg_.n_layers; ++l)
        for (Proj p : kAllProj)
            plan_[size_t(l) * 7 + size_t(p)] = params_.mode == SecureMode::gpu_only ||
                                                (params_.mode == SecureMode::secureinfer && !is_secret(proj_tensor_name(l, p)));
    plan_.back() = params_.mode == SecureMode::gpu_only || (params_.mode == SecureMode::secureinfer && !classifier_secret());
    try {
        if (params_.mode == SecureMode::gpu_only)
            load_gpu(src, std::move(keep));
        else
            load_enclave(src);
    } catch (...) {
        for (auto& sw : slots_)  // an injected accelerator outlives this session
            if (sw.handle) accel_->release(sw.handle);
        throw;
    }
}

SecureSession::~SecureSession() {
    if (accel_)
        for (auto& sw : slots_)
            if (sw.handle) accel_->release(sw.handle);
}

bool SecureSession::is_secret(const std::string& name) const {
    for (const auto& s : params_.secret_tensors)
        if (s == "*" || s == name) return true;
    return false;
}

std::string SecureSession::isolation() const {
    return host_ ? host_->isolation() : "none (gpu-only: everything runs in plaintext on the host and accelerator)";
}

std::vector<std::string> SecureSession::warnings() const {
    std::vector<std::string> w = warnings_;
    if (host_)
        for (auto& s : host_->warnings()) w.push_back(s);
    return w;
}

const char* SecureSession::op_name(int layer, int p) const {
    return layer == cfg_.n_layers ? "classifier" : trace_op(Proj(p));
}

bool SecureSession::classifier_secret() const {
    return is_secret("output.weight") || (cfg_tied_ && is_secret("token_embd.weight"));
}

void SecureSession::stream_projections(const TensorSource& src, int layer, SessionStats& s,
                                       const std::function<void(Proj, const int8_t*, const HostProj&)>& to_enclave,
                                       const std::function<bool(Proj)>& enclave_needs) {
    if (slots_.empty()) slots_.resize(size_t(cfg_.n_layers + 1) * kStages);
    std::vector<int8_t> stacked, own;
    std::vector<float> rows_f32;
    for (int st = 0; st < kStages; ++st) {
        SlotWeights& sw = slots_[size_t(layer) * kStages + size_t(st)];
        int64_t total = 0, cols = 0;
        for (Proj p : slot_projs(layer, cfg_.n_layers, Stage(st)))
            if (plan_[size_t(layer) * 7 + size_t(p)]) total += projs_[size_t(layer) * 7 + size_t(p)].rows;
        stacked.clear();
        stacked.shrink_to_fit();
        if (total > 0) stacked.resize(size_t(total * projs_[size_t(layer) * 7 + size_t(slot_projs(layer, cfg_.n_layers, Stage(st))[0])].cols));
        for (Proj p : slot_projs(layer, cfg_.n_layers, Stage(st))) {
            HostProj& hp = projs_[size_t(layer) * 7 + size_t(p)];
            const bool off = plan_[size_t(layer) * 7 + size_t(p)] != 0;
            if (!off && !(enclave_needs && enclave_needs(p))) continue;
            // Offloaded rows are quantised in place into the stage's stacked weight; the others into a temporary.
            int8_t* q = nullptr;
            if (off) {
                q = stacked.data() + sw.rows * hp.cols;
            } else {
                own.resize(size_t(hp.rows * hp.cols));
                q = own.data();
            }
            const std::string name = layer == cfg_.n_layers ? src.classifier_name() : proj_tensor_name(layer, p);
            hp.scale.resize(size_t(hp.rows));
            // f32 a few MiB at a time (per-row quantisation: the same bytes as the whole matrix at once)
            const int64_t block = std::max<int64_t>(1, (int64_t(1) << 22) / hp.cols);
            for (int64_t r0 = 0; r0 < hp.rows; r0 += block) {
                const int64_t n = std::min(block, hp.rows - r0);
                rows_f32.resize(size_t(n * hp.cols));
                src.read_rows(name, r0, n, rows_f32.data());
                quantize_rows_i8(rows_f32.data(), n, hp.cols, q + r0 * hp.cols, hp.scale.data() + r0, nullptr);
            }
            src.release(name);
            if (to_enclave && enclave_needs && enclave_needs(p)) to_enclave(p, q, hp);
            if (!off) continue;
            sw.projs.push_back(uint8_t(p));
            sw.proj_rows.push_back(hp.rows);
            sw.rows += hp.rows;
            cols = hp.cols;
            s.bytes_to_accelerator += size_t(hp.rows * hp.cols);
            if (trace_) trace_->write(layer, op_name(layer, int(p)), "weight", TraceDType::i8, {hp.rows, hp.cols}, q);
        }
        if (sw.projs.empty()) continue;
        ScopedTime t{s.accelerator.seconds};
        sw.handle = accel_->upload_i8(stacked.data(), sw.rows, cols);
    }
    std::vector<float>().swap(rows_f32);
}

const SecureSession::SlotWeights& SecureSession::slot_weights(int layer, int stage, std::span<const uint8_t> projs) const {
    const SlotWeights& sw = slots_[size_t(layer) * kStages + size_t(stage)];
    if (!sw.handle || !std::equal(projs.begin(), projs.end(), sw.projs.begin(), sw.projs.end()))
        fail(Status::internal, "the trusted core sent an offload request outside its plan");
    return sw;
}

// ---- gpu-only ---------------------------------------------------------------------------------------------------

void SecureSession::load_gpu(const TensorSource& src, std::shared_ptr<const TensorSource> keep) {
    Timer timer(load_);
    const bool secrets = !params_.secret_tensors.empty() || params_.lora;
    if (secrets && !params_.insecure)
        fail(Status::security, std::string("the model has secret tensors (") +
                                   (params_.lora ? "a LoRA adapter" : "declared secret: " + params_.secret_tensors[0]) +
                                   "); the gpu-only preset would put them on the accelerator in plaintext. Use "
                                   "--mode secureinfer, or --insecure to run it anyway (benchmarking only)");
    if (secrets)
        warnings_.push_back("insecure: secret tensors are processed in plaintext on the host and the accelerator");
    gpu_ = std::make_unique<Gpu>();
    // the classifier is the int8 base projection at layer n_layers, on the accelerator like q .. w2
    // The embeddings: each token's row read from the source when the session holds it, else a table here.
    StagedForward::EmbeddingRows rows;
    if (keep)
        rows = [keep](int32_t token, float* out) { keep->read_rows("token_embd.weight", token, 1, out); };
    gpu_->fw = std::make_unique<StagedForward>(cfg_, n_ctx_, true, pool_.get(), std::move(rows));
    StagedForward& fw = *gpu_->fw;
    if (!keep) src.read("token_embd.weight", fw.tok_embeddings().data());
    src.read("output_norm.weight", fw.final_norm().data());
    for (int l = 0; l < cfg_.n_layers; ++l) {
        src.read("blk." + std::to_string(l) + ".attn_norm.weight", fw.attn_norm(l).data());
        src.read("blk." + std::to_string(l) + ".ffn_norm.weight", fw.ffn_norm(l).data());
    }
    if (params_.lora)
        for (const auto& t : params_.lora->tensors) {
            LoraUpdate& u = fw.set_lora(t.layer, t.proj, t.rank, params_.lora->tensor_scale(t, params_.lora_scale));
            if (t.a.size() != u.a.size() || t.b.size() != u.b.size())
                fail(Status::invalid_argument, "LoRA adapter tensor for " + proj_tensor_name(t.layer, t.proj) +
                                                   " does not fit the model");
            std::copy(t.a.begin(), t.a.end(), u.a.begin());
            std::copy(t.b.begin(), t.b.end(), u.b.begin());
        }
    // The classifier first: its transient copies (the largest matrix, on its way to the accelerator) then come
    // before the layers' weights are resident, not on top of them.
    stream_projections(src, cfg_.n_layers, load_, nullptr, nullptr);
    for (int l = 0; l < cfg_.n_layers; ++l) stream_projections(src, l, load_, nullptr, nullptr);
    gpu_->caches = std::vector<KvCache>(size_t(params_.slots));
    gpu_->sampler_params.assign(size_t(params_.slots), SamplerParams{0.0f, 0, 1.0f, 0});
    for (const SamplerParams& sp : gpu_->sampler_params) gpu_->samplers.push_back(std::make_unique<Sampler>(sp));
}

void SecureSession::run_gpu_pass(std::span<const int32_t> tokens) {
    const SlotStep one{0, tokens, false};
    run_gpu_pass(std::span<const SlotStep>(&one, 1));
}

void SecureSession::run_gpu_pass(std::span<const SlotStep> batch) {
    StagedForward& fw = *gpu_->fw;
    const uint64_t f0 = fw.flops();
    std::vector<PassSegment> segs;
    for (const SlotStep& b : batch)
        segs.push_back(PassSegment{&gpu_->caches[size_t(b.slot)], b.tokens.data(), int(b.tokens.size())});
    fw.begin(segs);
    const int T = fw.T();
    struct Abort {  // a failure mid-pass leaves no half-done pass behind
        StagedForward& fw;
        bool armed = true;
        ~Abort() {
            if (armed) fw.abort_pass();
        }
    } abort{fw};
    while (!fw.done()) {
        const int l = fw.layer();
        const int64_t K = fw.stage_cols();
        gpu_->xq.resize(size_t(T * K));
        gpu_->xs.resize(size_t(T));
        quantize_activations(fw.stage_input(), T, K, activation_bits(K), gpu_->xq.data(), gpu_->xs.data());
        const SlotWeights& sw = slots_[size_t(l) * kStages + size_t(fw.stage())];
        gpu_->stacked.resize(size_t(T * sw.rows));
        {
            ScopedTime t{stats_.accelerator.seconds};
            accel_->mul_mat_int(sw.handle, gpu_->xq.data(), T, gpu_->stacked.data());
        }
        ++stats_.accelerator_calls;
        stats_.accelerator.flops += 2.0 * double(T) * double(sw.rows * K);
        stats_.bytes_to_accelerator += size_t(T * K) * 4;
        stats_.bytes_from_accelerator += size_t(T * sw.rows) * 4;
        gpu_->acc.resize(size_t(T * sw.rows));
        unstack(reinterpret_cast<const uint32_t*>(gpu_->stacked.data()), T, sw.rows, sw.proj_rows,
                reinterpret_cast<uint8_t*>(gpu_->acc.data()));
        std::string in_file;
        const int32_t* acc = gpu_->acc.data();
        for (uint8_t pi : sw.projs) {
            const Proj p = Proj(pi);
            const HostProj& hp = projs_[size_t(l) * 7 + size_t(p)];
            if (trace_) {
                if (in_file.empty())
                    in_file = trace_->write(l, trace_op(p), "input", TraceDType::i32, {T, K}, gpu_->xq.data());
                else
                    trace_->index(l, trace_op(p), "input", TraceDType::i32, {T, K}, in_file);
                trace_->write(l, trace_op(p), "output", TraceDType::i32, {T, hp.rows}, acc);
            }
            dequantize_product(acc, T, hp.rows, hp.scale.data(), gpu_->xs.data(), fw.proj_output(p));
            acc += T * hp.rows;
        }
        ++stats_.crossings;
        fw.finish_stage();
    }
    abort.armed = false;
    stats_.host.flops += double(fw.flops() - f0);
    pos_ = gpu_->caches[0].pos();
    for (const SlotStep& b : batch) slot_pos_[size_t(b.slot)] = gpu_->caches[size_t(b.slot)].pos();
}

// Logits [n][vocab] of tokens t0 .. t0 + n - 1 of the finished pass: final norm, then the int8 classifier on the
// accelerator (mul_mat_int), exactly as the enclave computes it.
void SecureSession::gpu_logits(int t0, int n, float* out) {
    std::vector<int> rows(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) rows[size_t(i)] = t0 + i;
    gpu_logits(rows, out);
}

void SecureSession::gpu_logits(std::span<const int> rows, float* out) {
    StagedForward& fw = *gpu_->fw;
    const int64_t d = cfg_.dim;
    const int n = int(rows.size());
    const uint64_t f0 = fw.flops();
    std::vector<float> h(size_t(n) * size_t(d));
    for (int i = 0; i < n; ++i) fw.final_hidden(rows[size_t(i)], h.data() + size_t(i) * size_t(d));
    stats_.host.flops += double(fw.flops() - f0);
    gpu_->xq.resize(size_t(n) * size_t(d));
    gpu_->xs.resize(size_t(n));
    quantize_activations(h.data(), n, d, activation_bits(d), gpu_->xq.data(), gpu_->xs.data());
    const HostProj& hp = projs_.back();
    gpu_->acc.resize(size_t(n) * size_t(hp.rows));
    {
        ScopedTime t{stats_.accelerator.seconds};
        accel_->mul_mat_int(slots_[size_t(cfg_.n_layers) * kStages].handle, gpu_->xq.data(), n, gpu_->acc.data());
    }
    ++stats_.accelerator_calls;
    ++stats_.crossings;
    stats_.accelerator.flops += 2.0 * double(n) * double(hp.rows * hp.cols);
    stats_.bytes_to_accelerator += size_t(n) * size_t(d) * 4;
    stats_.bytes_from_accelerator += size_t(n) * size_t(hp.rows) * 4;
    if (trace_) {
        trace_->write(cfg_.n_layers, "classifier", "input", TraceDType::i32, {n, d}, gpu_->xq.data());
        trace_->write(cfg_.n_layers, "classifier", "output", TraceDType::i32, {n, hp.rows}, gpu_->acc.data());
    }
    dequantize_product(gpu_->acc.data(), n, hp.rows, hp.scale.data(), gpu_->xs.data(), out);
}

// ---- enclave modes ----------------------------------------------------------------------------------------------

std::vector<uint8_t> SecureSession::call(const std::vector<uint8_t>& request, SessionStats& s) {
    if (failed_)
        fail(Status::integrity, "the session was stopped after an integrity failure; no further output is released");
    std::vector<uint8_t> response;
    trace_message(request, "input");
    timed_enclave(s, [&] { host_->call(request, response); });
    trace_message(response, "output");
    account(request.size(), response, s);
    return response;
}

void SecureSession::start_call(const std::vector<uint8_t>& request, SessionStats& s) {
    if (failed_)
        fail(Status::integrity, "the session was stopped after an integrity failure; no further output is released");
    trace_message(request, "input");
    timed_enclave(s, [&] { host_->start_call(request); });
}

std::vector<uint8_t> SecureSession::finish_call(size_t request_bytes, SessionStats& s) {
    std::vector<uint8_t> response;
    timed_enclave(s, [&] { host_->finish_call(response); });
    trace_message(response, "output");
    account(request_bytes, response, s);
    return response;
}

// Every message between this process and the trusted core goes into the trace as the bytes that cross: requests
// (configure, uploads, manifest, encrypted secret chunks, attestation, key release, sealed units, products, control)
// as "input", responses (crossings, sealed batches, quotes, sampled tokens) as "output".
void SecureSession::trace_message(std::span<const uint8_t> bytes, const char* role) {
    if (!trace_ || !params_.trace_messages) return;
    std::string op = "enclave.";
    if (bytes.size() >= wire::kHeaderBytes) {
        uint16_t type = 0;
        std::memcpy(&type, bytes.data() + 6, sizeof type);
        const std::string name = wire::msg_type_name(MsgType(type));
        op += name == "?" ? std::to_string(type) : name;
    } else {
        op += "short";
    }
    trace_->write(-1, op, role, TraceDType::u8, {int64_t(bytes.size())}, bytes.data());
}

void SecureSession::timed_enclave(SessionStats& s, const std::function<void()>& f) {
    try {
        ScopedTime t{s.enclave.seconds};
        f();
    } catch (const Error& e) {
        if (e.status() == Status::integrity) failed_ = true;  // stops the session for good
        throw;
    }
}

void SecureSession::account(size_t request_bytes, const std::vector<uint8_t>& response, SessionStats& s) {
    ++s.enclave_calls;
    s.bytes_to_enclave += request_bytes;
    s.bytes_from_enclave += response.size();
    const Message m = wire::decode(response);
    if (m.has(Tag::flops)) s.enclave.flops += double(m.scalar<uint64_t>(Tag::flops));
}

std::span<const uint8_t> SecureSession::take_unit(int layer, int stage, uint64_t seq, uint32_t idx) {
    auto& q = sealed_[size_t(layer) * kStages + size_t(stage)];
    while (!q.empty() && q.front().seq < seq) q.pop_front();
    if (q.empty() || q.front().seq != seq || idx >= q.front().count) return {};
    SealedBatch& b = q.front();
    b.next = idx + 1;
    // The span stays valid until the batch is popped: by the next take_unit of this slot, one crossing later.
    const std::span<const uint8_t> unit(b.blob.data() + size_t(idx) * b.unit, b.unit);
    if (b.next == b.count) {
        kept_bytes_ -= b.kept;
        spent_.push_back(std::move(b.blob));
        q.pop_front();
    }
    return unit;
}

long peak_rss_kib(int pid) {
    std::ifstream f(pid > 0 ? "/proc/" + std::to_string(pid) + "/status" : std::string("/proc/self/status"));
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
    return -1;
}

long SecureSession::worker_peak_rss_kib() const {
    const auto* w = dynamic_cast<const WorkerHost*>(host_.get());
    return w ? peak_rss_kib(int(w->pid())) : -1;
}

size_t secret_working_set(const ModelConfig& c, int n_ctx, int n_batch, int64_t precompute_inside_bytes,
                          size_t adapter_bytes, int slots) {
    const double dim = c.dim, hidden = c.hidden_dim, kv = c.kv_dim(), layers = c.n_layers;
    const double weights = 2.0 * c.vocab_size * dim + dim +
                           layers * (2.0 * dim + 2.0 * dim * dim + 2.0 * dim * kv + 3.0 * dim * hidden);
    // every slot's cache at full context, and one more for the copy while a cache grows
    const double kv_cache = 2.0 * layers * std::max(n_ctx, 1) * kv * 4.0 * (std::max(slots, 1) + 1);
    const double activations = 16.0 * std::max(n_batch, 1) * (dim + hidden + c.n_heads * double(std::max(n_ctx, 1))) * 4.0;
    const double total = 5.0 * weights + kv_cache + activations + double(std::max<int64_t>(precompute_inside_bytes, 0)) +
                         double(adapter_bytes) + double(64 << 20);
    return size_t(std::clamp(total, double(64 << 20), double(kMaxSecretArenaBytes)));
}

void SecureSession::load_enclave(const TensorSource& src) {
    Timer timer(load_);
    if (params_.enclave_host) {
        host_ = params_.enclave_host;
    } else {
        EnclaveHostKind kind = params_.host;
        if (kind == EnclaveHostKind::automatic) {
            std::string path = params_.worker_path;
            try {
                if (path.empty()) path = default_worker_path();
            } catch (const Error&) {
                path.clear();
            }
            kind = !path.empty() && access(path.c_str(), X_OK) == 0 ? EnclaveHostKind::worker : EnclaveHostKind::inprocess;
            if (kind == EnclaveHostKind::inprocess)
                warnings_.push_back("the enclave worker executable (secureinfer-worker) was not found: the trusted "
                                    "core runs INSIDE this process with NO isolation");
        }
        // A package needs the software TEE's platform (attestation, sealing). A worker installed setuid to the
        // software TEE's user brings that user's device; otherwise the device files of this process's user
        // (development credentials) come first.
        WorkerOptions o;
        o.worker_path = params_.worker_path;
        const bool system_worker = kind == EnclaveHostKind::worker && worker_is_setuid(o);
        std::string device_dir;
        if (params_.package && !system_worker) {
            device_dir = params_.key.device_dir.empty() ? tee::default_device_dir() : params_.key.device_dir;
            tee::provision_device(device_dir);
        }
        const int enclave_threads = params_.n_threads;
        if (kind == EnclaveHostKind::worker) {
            o.attest = params_.package != nullptr;
            o.device_dir = device_dir;
            o.insecure_memory = params_.insecure_memory;
            size_t adapter_bytes = 0;
            if (params_.lora)
                for (const auto& t : params_.lora->tensors) adapter_bytes += (t.a.size() + t.b.size()) * sizeof(float);
            o.secret_arena_bytes = secret_working_set(cfg_, n_ctx_, n_batch_, params_.precompute_inside_bytes,
                                                      adapter_bytes, params_.slots);
            o.enclave_threads = enclave_threads;
            o.spin = std::chrono::microseconds(params_.worker_spin_us);
            if (params_.pin_cpu >= CPU_SETSIZE)
                fail(Status::invalid_argument, "pin_cpu " + std::to_string(params_.pin_cpu) + " is not a CPU number");
            o.serve_cpu = params_.pin_cpu;
            host_ = make_worker_host(o);
            // Pinned after the worker started: it would inherit this thread's affinity, and its loop threads need
            // every CPU (the worker pins its own serving thread).
            if (params_.pin_cpu >= 0) {
                cpu_set_t set;
                CPU_ZERO(&set);
                CPU_SET(params_.pin_cpu, &set);
                if (sched_setaffinity(0, sizeof set, &set) != 0)
                    fail(Status::invalid_argument, "cannot run on CPU " + std::to_string(params_.pin_cpu) + ": " +
                                                       std::strerror(errno));
            }
        } else {
            host_ = make_inprocess_host(device_dir, enclave_threads);
        }
    }

    {
        Encoder e(MsgType::configure);
        const std::vector<int32_t> ints = {cfg_.dim, cfg_.hidden_dim, cfg_.n_layers, cfg_.n_heads, cfg_.n_kv_heads,
                                           cfg_.vocab_size, cfg_.seq_len, n_ctx_};
        e.add(Tag::cfg_ints, ints);
        std::vector<float> floats{cfg_.rope_theta, cfg_.norm_eps};
        floats.insert(floats.end(), cfg_.rope_freq_factors.begin(), cfg_.rope_freq_factors.end());
        e.add(Tag::cfg_floats, floats);
        e.scalar<uint8_t>(Tag::offload, params_.mode == SecureMode::secureinfer ? 1 : 0);
        e.scalar<uint8_t>(Tag::tied, cfg_tied_ ? 1 : 0);
        // In secureinfer mode with the CPU backend the accelerator's threads run on the same cores between the
        // core's steps and spin briefly after each product: two pools would fight over single-token products
        // (measured: online decode 2.8x slower on 16 cores, 1.6x on 2), so the core keeps those to one thread.
        // Its multi-token products (prefill, precompute) still use every thread.
        const bool shares_cores = params_.mode == SecureMode::secureinfer && !params_.accelerator &&
                                  params_.accelerator_backend == "cpu";
        e.scalar<uint8_t>(Tag::serial_decode, shares_cores ? 1 : 0);
        if (params_.slots > 1) e.scalar<int32_t>(Tag::slot_count, params_.slots);
        call(e.finish(), load_);
    }
    if (params_.package) {
        obtain_package_key();
        // The core authenticates the header, manifest and secret table before anything is uploaded.
        Encoder e(MsgType::manifest);
        e.add(Tag::manifest, params_.package->authenticated_prefix());
        call(e.finish(), load_);
    }
    // Every tensor goes in by chunks; `first` adds the fields the first chunk of some kinds carries.
    auto upload = [&](TensorKind kind, int layer, int proj, const void* data, size_t n, bool is_i8,
                      const std::function<void(Encoder&)>& first) {
        const size_t es = is_i8 ? 1 : 4;
        const size_t per = kChunkBytes / es;
        for (size_t off = 0; off < n || (n == 0 && off == 0); off += per) {
            const size_t cnt = std::min(per, n - off);
            Encoder e(MsgType::upload);
            e.scalar<uint32_t>(Tag::kind, uint32_t(kind));
            e.scalar<int32_t>(Tag::layer, layer);
            e.scalar<int32_t>(Tag::proj, proj);
            e.scalar<uint64_t>(Tag::offset, off);
            e.scalar<uint64_t>(Tag::total, n);
            if (is_i8)
                e.add(Tag::data_i8, std::span<const int8_t>(static_cast<const int8_t*>(data) + off, cnt));
            else
                e.add(Tag::data_f32, std::span<const float>(static_cast<const float*>(data) + off, cnt));
            if (off == 0 && first) first(e);
            call(e.finish(), load_);
            if (n == 0) break;
        }
    };
    // f32 tensors from the source, a chunk at a time (the same chunks as a whole tensor in memory would give).
    auto upload_f32 = [&](TensorKind kind, int layer, const std::string& name) {
        const int64_t cols = src.tensor_cols(name);
        const size_t n = size_t(src.tensor_rows(name) * cols);
        const size_t per = kChunkBytes / 4;
        std::vector<float> buf;
        for (size_t off = 0; off < n; off += per) {
            const size_t cnt = std::min(per, n - off);
            const int64_t r0 = int64_t(off) / cols, r1 = (int64_t(off + cnt) + cols - 1) / cols;
            buf.resize(size_t((r1 - r0) * cols));
            src.read_rows(name, r0, r1 - r0, buf.data());
            Encoder e(MsgType::upload);
            e.scalar<uint32_t>(Tag::kind, uint32_t(kind));
            e.scalar<int32_t>(Tag::layer, layer);
            e.scalar<int32_t>(Tag::proj, 0);
            e.scalar<uint64_t>(Tag::offset, off);
            e.scalar<uint64_t>(Tag::total, n);
            e.add(Tag::data_f32, std::span<const float>(buf.data() + (off - size_t(r0 * cols)), cnt));
            call(e.finish(), load_);
        }
        src.release(name);
    };
    if (!package_secret(uint32_t(TensorKind::tok_embeddings), 0, 0))
        upload_f32(TensorKind::tok_embeddings, 0, "token_embd.weight");
    if (!package_secret(uint32_t(TensorKind::final_norm), 0, 0))
        upload_f32(TensorKind::final_norm, 0, "output_norm.weight");
    // The classifier first, as in gpu-only (its transient copies before the layers' weights are resident). (A
    // secret classifier, or a secret tied embedding, reaches the core only encrypted.)
    const bool classifier_public = !package_secret(uint32_t(TensorKind::classifier), 0, 0) &&
                                   !(cfg_tied_ && package_secret(uint32_t(TensorKind::tok_embeddings), 0, 0));
    stream_projections(
        src, cfg_.n_layers, load_,
        [&](Proj, const int8_t* q, const HostProj& hp) {
            const uint8_t secret = classifier_secret() ? 1 : 0;
            upload(TensorKind::classifier_i8, 0, 0, q, size_t(hp.rows * hp.cols), true,
                   [&](Encoder& e) { e.scalar<uint8_t>(Tag::secret, secret); });
            upload(TensorKind::classifier_scale, 0, 0, hp.scale.data(), hp.scale.size(), false, nullptr);
        },
        [&](Proj) { return classifier_public; });
    // Layer by layer, each projection quantised once, sent to the core and (offloaded ones) to the accelerator.
    for (int l = 0; l < cfg_.n_layers; ++l) {
        if (!package_secret(uint32_t(TensorKind::attn_norm), l, 0))
            upload_f32(TensorKind::attn_norm, l, "blk." + std::to_string(l) + ".attn_norm.weight");
        if (!package_secret(uint32_t(TensorKind::ffn_norm), l, 0))
            upload_f32(TensorKind::ffn_norm, l, "blk." + std::to_string(l) + ".ffn_norm.weight");
        stream_projections(
            src, l, load_,
            [&](Proj p, const int8_t* q, const HostProj& hp) {
                const uint8_t secret = is_secret(proj_tensor_name(l, p)) ? 1 : 0;
                upload(TensorKind::proj_weight, l, int(p), q, size_t(hp.rows * hp.cols), true,
                       [&](Encoder& e) { e.scalar<uint8_t>(Tag::secret, secret); });
                upload(TensorKind::proj_scale, l, int(p), hp.scale.data(), hp.scale.size(), false, nullptr);
            },
            [&](Proj p) { return !package_secret(uint32_t(TensorKind::proj_weight), l, int(p)); });
        if (params_.load_progress) params_.load_progress(l + 1, cfg_.n_layers + 1);
    }
    if (params_.lora)
        for (const auto& t : params_.lora->tensors) {
            const float scale = params_.lora->tensor_scale(t, params_.lora_scale);
            upload(TensorKind::lora_a, t.layer, int(t.proj), t.a.data(), t.a.size(), false, [&](Encoder& e) {
                e.scalar<int32_t>(Tag::rank, t.rank);
                e.scalar<float>(Tag::scale, scale);
            });
            upload(TensorKind::lora_b, t.layer, int(t.proj), t.b.data(), t.b.size(), false, nullptr);
        }
    if (params_.package)
        // The secret tensors: ciphertext only, chunk by chunk; the core opens each into its place.
        for (const auto& st : params_.package->secrets())
            for (size_t c = 0; c < st.chunks.size(); ++c) {
                Encoder e(MsgType::upload_secret);
                e.scalar<uint32_t>(Tag::kind, st.entry.kind);
                e.scalar<int32_t>(Tag::layer, st.entry.layer);
                e.scalar<int32_t>(Tag::proj, st.entry.proj);
                e.scalar<uint64_t>(Tag::offset, uint64_t(c));
                e.add(Tag::ciphertext, st.chunks[c]);
                call(e.finish(), load_);
            }
    const std::vector<uint8_t> resp = call(wire::Encoder(MsgType::finalize).finish(), load_);
    const Message m = wire::decode(resp);
    if (m.type() != MsgType::plan) fail(Status::internal, "the trusted core did not answer finalize with a plan");
    const std::vector<uint8_t> core_plan = m.array<uint8_t>(Tag::plan, int64_t(projs_.size()));
    for (int l = 0; l < cfg_.n_layers; ++l)
        for (Proj p : kAllProj) {
            const bool off = core_plan[size_t(l) * 7 + size_t(p)] != 0;
            const bool secret = is_secret(proj_tensor_name(l, p));
            if (off && (secret || params_.mode != SecureMode::secureinfer))
                fail(Status::security, "the trusted core's plan offloads " + proj_tensor_name(l, p) +
                                           ", which must stay inside");
        }
    if (core_plan.back() != 0 && (classifier_secret() || params_.mode != SecureMode::secureinfer))
        fail(Status::security, "the trusted core's plan offloads the classifier, which must stay inside");
    // The accelerator already holds what this session planned to offload; the core must offload exactly that.
    if (core_plan != plan_) fail(Status::internal, "the trusted core's offload plan differs from the session's");
    set_sampler(SamplerParams{0.0f, 0, 1.0f, 0});
    if (params_.load_progress) params_.load_progress(cfg_.n_layers + 1, cfg_.n_layers + 1);
}

bool SecureSession::package_secret(uint32_t kind, int layer, int proj) const {
    if (!params_.package) return false;
    for (const auto& st : params_.package->secrets())
        if (st.entry.kind == kind && st.entry.layer == layer && st.entry.proj == proj) return true;
    return false;
}

// The model key reaches the core wrapped to a fresh ephemeral key of its own (release) or sealed to its measurement
// (unseal); this process never sees it, except on the development path with the owner key file.
void SecureSession::obtain_package_key() {
    const PackageKeySource& k = params_.key;
    const pkg::ModelId& id = params_.package->model_id();
    if (!k.sealed_key_path.empty() && std::filesystem::exists(k.sealed_key_path)) {
        std::ifstream f(k.sealed_key_path, std::ios::binary);
        const std::vector<uint8_t> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        Encoder e(MsgType::unseal);
        e.add(Tag::sealed_key, blob);
        try {
            call(e.finish(), load_);
            return;
        } catch (const Error& err) {
            if (k.keyserver_url.empty() && k.owner_key_file.empty()) throw;
            warnings_.push_back(std::string(err.what()) + "; asking for the key again");
        }
    }
    if (k.keyserver_url.empty() && k.owner_key_file.empty())
        fail(Status::invalid_argument, "a protected package needs its model key: give a keyserver URL, a sealed key "
                                       "file that exists, or (development only) the owner key file");
    pkg::Nonce nonce{};
    if (!k.keyserver_url.empty())
        nonce = keyserver_nonce(k.keyserver_url);
    else
        pkg::random_bytes(nonce);
    Encoder a(MsgType::attest);
    a.add(Tag::nonce, std::span<const uint8_t>(nonce));
    const std::vector<uint8_t> qresp = call(a.finish(), load_);
    const Message qm = wire::decode(qresp);
    if (qm.type() != MsgType::quote) fail(Status::internal, "the trusted core did not answer attest with a quote");
    const wire::Field& qf = qm.field(Tag::quote, WireType::u8);
    const std::span<const uint8_t> quote(qf.data, qf.count);
    std::array<uint8_t, pkg::kWrappedBytes> wrapped{};
    if (!k.keyserver_url.empty()) {
        wrapped = keyserver_release(k.keyserver_url, quote, id);
    } else {
        // Development path: this process plays the keyserver without verifying anything.
        warnings_.push_back("the owner key was read by this process (owner key file): the model key is not "
                            "protected from the host; use a keyserver outside development");
        pkg::Key owner = read_owner_key(k.owner_key_file);
        SecretVector<uint8_t> model_key(pkg::kKeyBytes);
        pkg::derive_model_key(owner, id, model_key.data());
        secure_zero(owner.data(), owner.size());
        wrapped = pkg::wrap_model_key(model_key.data(), pkg::decode_quote(quote).report, id);
    }
    Encoder r(MsgType::release);
    r.add(Tag::wrapped_key, std::span<const uint8_t>(wrapped));
    r.add(Tag::model_id, std::span<const uint8_t>(id));
    const std::vector<uint8_t> rresp = call(r.finish(), load_);
    const Message rm = wire::decode(rresp);
    if (!k.sealed_key_path.empty() && rm.has(Tag::sealed_key)) {
        const wire::Field& sf = rm.field(Tag::sealed_key, WireType::u8);
        const std::string tmp = k.sealed_key_path + ".tmp";
        {
            std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
            f.write(reinterpret_cast<const char*>(sf.data), std::streamsize(sf.count));
            if (!f) fail(Status::io, tmp + ": cannot write the sealed key");
        }
        if (std::rename(tmp.c_str(), k.sealed_key_path.c_str()) != 0)
            fail(Status::io, k.sealed_key_path + ": cannot write the sealed key");
    }
}

void SecureSession::trace_tokens_in(std::span<const int32_t> tokens) {
    if (trace_) trace_->write(-1, "tokens", "input", TraceDType::i32, {int64_t(tokens.size())}, tokens.data());
}

std::vector<uint8_t> SecureSession::run_enclave_pass(std::span<const int32_t> tokens, int output,
                                                     std::span<const int32_t> targets) {
    Encoder e(MsgType::eval);
    e.add(Tag::tokens, tokens);
    e.scalar<uint8_t>(Tag::output, uint8_t(output));
    if (output == int(wire::OutputKind::nll)) e.add(Tag::targets, targets);
    trace_tokens_in(tokens);
    std::vector<uint8_t> resp = drive_crossings(call(e.finish(), stats_));
    slot_pos_[0] = pos_;
    return resp;
}

std::vector<uint8_t> SecureSession::drive_crossings(std::vector<uint8_t> resp) {
    std::vector<uint32_t> x, y;
    std::vector<uint8_t> units;
    for (;;) {
        const Message m = wire::decode(resp);
        if (m.type() != MsgType::offload) {
            pos_ = m.scalar<int32_t>(Tag::pos);
            return resp;
        }
        // Everything in an offload request is checked against the plan before the accelerator sees it.
        const int32_t layer = m.scalar<int32_t>(Tag::layer), T = m.scalar<int32_t>(Tag::count_t),
                      K = m.scalar<int32_t>(Tag::count_k);
        const uint8_t stage = m.scalar<uint8_t>(Tag::stage);
        const uint64_t crossing = m.scalar<uint64_t>(Tag::crossing);
        const auto projs = m.array<uint8_t>(Tag::projs);
        if (layer < 0 || layer > cfg_.n_layers || stage >= kStages || T < 1 || T > n_batch_ || projs.empty())
            fail(Status::internal, "the trusted core sent a malformed offload request");
        size_t total = 0;
        for (uint8_t p : projs) {
            if (p > 6 || !slot_has(layer, cfg_.n_layers, Stage(stage), Proj(p)) || !plan_[size_t(layer) * 7 + p] ||
                projs_[size_t(layer) * 7 + p].cols != K)
                fail(Status::internal, "the trusted core sent an offload request outside its plan");
            total += size_t(T) * size_t(projs_[size_t(layer) * 7 + p].rows);
        }
        x.resize(size_t(T) * size_t(K));
        m.copy(Tag::activations, x.data(), x.size());
        // Offline unblinding: the sealed unit of each row the core asks for (the core authenticates them), in row
        // order. With a concurrent enclave host they go ahead of the products, and the core opens them while the
        // accelerator computes.
        std::span<const uint8_t> unit;
        units.clear();
        if (m.has(Tag::batch)) {
            const auto seqs = m.array<uint64_t>(Tag::batch, T);
            const auto idx = m.array<uint32_t>(Tag::batch_index, T);
            const auto keep = m.has(Tag::keep) ? m.array<uint8_t>(Tag::keep, T) : std::vector<uint8_t>(size_t(T), 0);
            for (int32_t t = 0; t < T; ++t) {
                const auto u = take_unit(layer, stage, seqs[size_t(t)], idx[size_t(t)]);
                if (!keep[size_t(t)]) units.insert(units.end(), u.begin(), u.end());  // kept: the host keeps count
            }
            unit = units;
        }
        else if (precomputed_ && !exhausted_said_ && precomputed_available() == 0) {
            exhausted_said_ = true;
            const char* msg = "precomputed unblinding factors exhausted: falling back to online unblinding";
            std::fprintf(stderr, "%s\n", msg);
            warnings_.push_back(msg);
        }
        // A started call is always finished, also when the accelerator throws: the host allows one at a time.
        struct UnitAhead {
            EnclaveHost* host = nullptr;
            size_t bytes = 0;
            ~UnitAhead() {
                if (!host) return;
                std::vector<uint8_t> ignored;
                try {
                    host->finish_call(ignored);
                } catch (...) {
                }
            }
        } ahead;
        if (!unit.empty() && host_->concurrent()) {
            Encoder ue(MsgType::unit, unit.size() + 128);
            ue.scalar<int32_t>(Tag::layer, layer);
            ue.scalar<uint8_t>(Tag::stage, stage);
            ue.scalar<uint64_t>(Tag::crossing, crossing);
            ue.add(Tag::sealed, unit);
            const std::vector<uint8_t> req = ue.finish();
            start_call(req, stats_);
            ahead.host = host_.get();
            ahead.bytes = req.size();
            unit = {};
        }
        // products, then (offline unblinding, unless sent ahead) the sealed unit: reserved at once
        Encoder pe(MsgType::products, total * 4 + (unit.empty() ? 0 : unit.size() + 64) + 256);
        pe.scalar<int32_t>(Tag::layer, layer);
        pe.scalar<uint8_t>(Tag::stage, stage);
        pe.scalar<uint64_t>(Tag::crossing, crossing);
        uint8_t* out = pe.reserve(Tag::products, WireType::u32, total);
        const SlotWeights& sw = slot_weights(layer, stage, projs);
        y.resize(size_t(T) * size_t(sw.rows));
        {
            ScopedTime t{stats_.accelerator.seconds};
            accel_->mul_mat_masked(sw.handle, x.data(), T, y.data());
        }
        ++stats_.accelerator_calls;
        stats_.accelerator.flops += 2.0 * double(T) * double(sw.rows * K);
        stats_.bytes_to_accelerator += x.size() * 4;
        stats_.bytes_from_accelerator += y.size() * 4;
        unstack(y.data(), T, sw.rows, sw.proj_rows, out);
        if (trace_) {
            std::string in_file;
            for (uint8_t p : projs) {
                const int64_t r = projs_[size_t(layer) * 7 + p].rows;
                if (in_file.empty())
                    in_file = trace_->write(layer, op_name(layer, p), "input", TraceDType::u32, {T, K}, x.data());
                else
                    trace_->index(layer, op_name(layer, p), "input", TraceDType::u32, {T, K}, in_file);
                trace_->write(layer, op_name(layer, p), "output", TraceDType::u32, {T, r}, out);
                out += T * r * 4;
            }
        }
        if (ahead.host) {
            ahead.host = nullptr;
            const std::vector<uint8_t> ack = finish_call(ahead.bytes, stats_);
            if (wire::decode(ack).type() != MsgType::ok)
                fail(Status::internal, "the trusted core did not answer a sealed unit with ok");
        }
        if (!unit.empty()) pe.add(Tag::sealed, unit);
        spent_.clear();
        ++stats_.crossings;
        resp = call(pe.finish(), stats_);
    }
}

// ---- the public calls -------------------------------------------------------------------------------------------

void SecureSession::set_sampler(const SamplerParams& p) { set_sampler(0, p); }

void SecureSession::check_slot(int slot, const char* what) const {
    if (slot < 0 || slot >= params_.slots)
        fail(Status::invalid_argument, std::string(what) + ": slot " + std::to_string(slot) + " out of range [0, " +
                                           std::to_string(params_.slots) + ")");
}

void SecureSession::set_sampler(int slot, const SamplerParams& p) {
    check_slot(slot, "set_sampler");
    if (gpu_) {
        gpu_->sampler_params[size_t(slot)] = p;
        gpu_->samplers[size_t(slot)] = std::make_unique<Sampler>(p);
        return;
    }
    Encoder e(MsgType::sampler);
    if (slot != 0) e.scalar<int32_t>(Tag::slot, slot);
    e.scalar<float>(Tag::temperature, std::max(0.0f, p.temperature));
    e.scalar<int32_t>(Tag::top_k, std::max(0, p.top_k));
    e.scalar<float>(Tag::top_p, std::clamp(p.top_p, 0.0f, 1.0f));
    e.scalar<uint64_t>(Tag::seed, p.seed);
    e.scalar<int32_t>(Tag::logprobs, params_.logprobs);
    e.scalar<float>(Tag::logprob_noise, params_.logprob_noise);
    call(e.finish(), stats_);
}

namespace {
void check_fits(int pos, size_t n, int n_ctx) {
    if (n == 0) fail(Status::invalid_argument, "no tokens to evaluate");
    if (int64_t(pos) + int64_t(n) > n_ctx)
        fail(Status::invalid_argument, "context overflow: " + std::to_string(pos) + " + " + std::to_string(n) +
                                           " tokens exceed the context of " + std::to_string(n_ctx));
}
}  // namespace

int32_t SecureSession::eval_sample(std::span<const int32_t> tokens, std::vector<TokenLogprob>* logprobs) {
    Timer timer(stats_);
    check_fits(pos_, tokens.size(), n_ctx_);
    if (logprobs) logprobs->clear();
    const size_t n = tokens.size();
    int32_t token = -1;
    for (size_t b = 0; b < n; b += size_t(n_batch_)) {
        const auto chunk = tokens.subspan(b, std::min(size_t(n_batch_), n - b));
        const bool last = b + chunk.size() == n;
        if (gpu_) {
            trace_tokens_in(chunk);
            run_gpu_pass(chunk);
            if (!last) continue;
            const int V = cfg_.vocab_size;
            gpu_->logits.resize(size_t(V));
            gpu_logits(int(chunk.size()) - 1, 1, gpu_->logits.data());
            token = gpu_->samplers[0]->sample(gpu_->logits.data(), V);
            gpu_->fw->end_pass();
            if (params_.logprobs > 0 && logprobs) {
                const float* lg = gpu_->logits.data();
                double mx = lg[0];
                for (int i = 1; i < V; ++i) mx = std::max(mx, double(lg[i]));
                double sum = 0.0;
                for (int i = 0; i < V; ++i) sum += std::exp(double(lg[i]) - mx);
                const double lse = mx + std::log(sum);
                std::vector<int32_t> ids(static_cast<size_t>(V));
                for (int i = 0; i < V; ++i) ids[size_t(i)] = i;
                const int K = params_.logprobs;
                std::partial_sort(ids.begin(), ids.begin() + K, ids.end(), [&](int32_t a, int32_t b) {
                    return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
                });
                std::normal_distribution<double> noise(0.0, params_.logprob_noise);
                for (int i = 0; i < K; ++i) {
                    double lp = double(lg[ids[size_t(i)]]) - lse;
                    if (params_.logprob_noise > 0.0f) lp += noise(gpu_->noise);
                    logprobs->push_back({ids[size_t(i)], float(lp)});
                }
            }
        } else {
            const auto resp = run_enclave_pass(chunk, int(last ? wire::OutputKind::sample : wire::OutputKind::none), {});
            if (!last) continue;
            const Message m = wire::decode(resp);
            token = m.scalar<int32_t>(Tag::token);
            if (token < 0 || token >= cfg_.vocab_size) fail(Status::internal, "the trusted core sampled a bad token");
            if (m.has(Tag::logprob_ids)) {
                const auto ids = m.array<int32_t>(Tag::logprob_ids);
                const auto values = m.array<float>(Tag::logprob_values, int64_t(ids.size()));
                if (trace_) {
                    trace_->write(-1, "logprob_ids", "output", TraceDType::i32, {int64_t(ids.size())}, ids.data());
                    trace_->write(-1, "logprob_values", "output", TraceDType::f32, {int64_t(ids.size())}, values.data());
                }
                if (logprobs)
                    for (size_t i = 0; i < ids.size(); ++i) logprobs->push_back({ids[i], values[i]});
            }
        }
        if (trace_) trace_->write(-1, "sample", "output", TraceDType::i32, {1}, &token);
    }
    return token;
}

void SecureSession::eval(std::span<const int32_t> tokens) {
    Timer timer(stats_);
    check_fits(pos_, tokens.size(), n_ctx_);
    for (size_t b = 0; b < tokens.size(); b += size_t(n_batch_)) {
        const auto chunk = tokens.subspan(b, std::min(size_t(n_batch_), tokens.size() - b));
        if (gpu_) {
            trace_tokens_in(chunk);
            run_gpu_pass(chunk);
            gpu_->fw->end_pass();
        } else {
            run_enclave_pass(chunk, int(wire::OutputKind::none), {});
        }
    }
}

std::pair<double, uint64_t> SecureSession::eval_nll(std::span<const int32_t> tokens, std::span<const int32_t> targets) {
    Timer timer(stats_);
    check_fits(pos_, tokens.size(), n_ctx_);
    if (targets.size() != tokens.size())
        fail(Status::invalid_argument, "eval_nll: " + std::to_string(targets.size()) + " targets for " +
                                           std::to_string(tokens.size()) + " tokens");
    for (int32_t t : targets)
        if (t < -1 || t >= cfg_.vocab_size) fail(Status::invalid_argument, "NLL target " + std::to_string(t) + " out of range");
    double sum = 0.0;
    uint64_t count = 0;
    for (size_t b = 0; b < tokens.size(); b += size_t(n_batch_)) {
        const size_t n = std::min(size_t(n_batch_), tokens.size() - b);
        const auto chunk = tokens.subspan(b, n);
        const auto tchunk = targets.subspan(b, n);
        if (gpu_) {
            trace_tokens_in(chunk);
            run_gpu_pass(chunk);
            const int V = cfg_.vocab_size;
            gpu_->logits.resize(size_t(V));
            double part = 0.0;
            for (size_t i = 0; i < n; ++i) {
                if (tchunk[i] < 0) continue;
                gpu_logits(int(i), 1, gpu_->logits.data());
                part += token_nll(gpu_->logits.data(), V, tchunk[i]);
                ++count;
            }
            gpu_->fw->end_pass();
            sum += part;
            if (trace_) trace_->write(-1, "nll", "output", TraceDType::f64, {1}, &part);
        } else {
            const auto resp = run_enclave_pass(chunk, int(wire::OutputKind::nll), tchunk);
            const Message m = wire::decode(resp);
            const double part = m.scalar<double>(Tag::nll_sum);
            count += m.scalar<uint64_t>(Tag::nll_count);
            sum += part;
            if (trace_) trace_->write(-1, "nll", "output", TraceDType::f64, {1}, &part);
        }
    }
    return {sum, count};
}

const float* SecureSession::eval_logits(std::span<const int32_t> tokens, bool all_logits) {
    if (!gpu_)
        fail(Status::security, std::string("logits never leave the enclave in the ") + secure_mode_name(params_.mode) +
                                   " preset (use sampling, log-probabilities or the NLL evaluation)");
    Timer timer(stats_);
    check_fits(pos_, tokens.size(), n_ctx_);
    const int V = cfg_.vocab_size;
    const size_t n = tokens.size();
    gpu_->logits.resize((all_logits ? n : 1) * size_t(V));
    for (size_t b = 0; b < n; b += size_t(n_batch_)) {
        const size_t cn = std::min(size_t(n_batch_), n - b);
        const auto chunk = tokens.subspan(b, cn);
        trace_tokens_in(chunk);
        run_gpu_pass(chunk);
        if (all_logits)
            gpu_logits(0, int(cn), gpu_->logits.data() + b * size_t(V));
        else if (b + cn == n)
            gpu_logits(int(cn) - 1, 1, gpu_->logits.data());
        gpu_->fw->end_pass();
    }
    return gpu_->logits.data();
}

void SecureSession::precompute(int tokens, const std::function<void(int, int)>& progress) {
    if (params_.mode != SecureMode::secureinfer)
        fail(Status::unsupported, std::string("precomputed unblinding factors need the secureinfer preset, not ") +
                                      secure_mode_name(params_.mode));
    if (tokens < 1) fail(Status::invalid_argument, "precompute: the token count must be positive");
    if (sealed_.empty()) sealed_.resize(size_t(cfg_.n_layers + 1) * kStages);
    const auto t0 = std::chrono::steady_clock::now();
    // the (layer, stage) slots with offloaded projections, and how many positions one message can carry
    struct Slot {
        int layer;
        Stage stage;
        int per_call;
        int64_t rows;
    };
    std::vector<Slot> slots;
    int total = 0;
    for (int l = 0; l <= cfg_.n_layers; ++l)  // the blocks, then the classifier
        for (int st = 0; st < kStages; ++st) {
            int64_t rows = 0;
            for (Proj p : slot_projs(l, cfg_.n_layers, Stage(st)))
                if (plan_[size_t(l) * 7 + size_t(p)]) rows += projs_[size_t(l) * 7 + size_t(p)].rows;
            if (rows == 0) continue;
            const int per_call = int(std::max<int64_t>(
                1, std::min<int64_t>(1 << 16, int64_t(SI_ENCLAVE_MAX_MESSAGE - kMessageSlack) / (4 * rows + 16))));
            slots.push_back({l, Stage(st), per_call, rows});
            total += (tokens + per_call - 1) / per_call;
        }
    SessionStats off;
    int done = 0;
    for (const Slot& sl : slots)
        for (int left = tokens; left > 0;) {
            const int n = std::min(left, sl.per_call);
            Encoder e(MsgType::precompute);
            e.scalar<int32_t>(Tag::layer, sl.layer);
            e.scalar<uint8_t>(Tag::stage, uint8_t(sl.stage));
            e.scalar<int32_t>(Tag::count_t, n);
            const uint64_t bytes = uint64_t(n) * uint64_t(sl.rows) * 4;
            const bool keep = int64_t(kept_bytes_ + bytes) <= params_.precompute_inside_bytes;
            if (keep) e.scalar<uint8_t>(Tag::keep, 1);
            const std::vector<uint8_t> resp = call(e.finish(), off);
            const Message m = wire::decode(resp);
            if (m.type() != MsgType::sealed || m.scalar<int32_t>(Tag::layer) != sl.layer ||
                m.scalar<uint8_t>(Tag::stage) != uint8_t(sl.stage) || m.scalar<int32_t>(Tag::count_t) != n ||
                m.has(Tag::keep) != keep || m.has(Tag::sealed) == keep)
                fail(Status::internal, "the trusted core did not answer precompute with the requested batch");
            SealedBatch b;
            b.seq = m.scalar<uint64_t>(Tag::batch);
            b.count = uint32_t(n);
            if (keep) {
                b.kept = bytes;
                kept_bytes_ += bytes;
            } else {
                const wire::Field& f = m.field(Tag::sealed, WireType::u8);
                if (f.count % uint32_t(n) != 0) fail(Status::internal, "the trusted core sent a malformed sealed batch");
                b.unit = f.count / uint32_t(n);
                b.blob.assign(f.data, f.data + f.count);
            }
            sealed_[size_t(sl.layer) * kStages + size_t(sl.stage)].push_back(std::move(b));
            left -= n;
            if (progress) progress(++done, total);
        }
    precomputed_ = true;
    exhausted_said_ = false;
    stats_.offline.seconds += seconds_since(t0);
    stats_.offline.flops += off.enclave.flops;
    stats_.precomputed_tokens += uint64_t(tokens);
}

int SecureSession::precomputed_available() const {
    if (sealed_.empty()) return 0;
    int64_t best = -1;
    for (int l = 0; l <= cfg_.n_layers; ++l)
        for (int st = 0; st < kStages; ++st) {
            bool used = false;
            for (Proj p : slot_projs(l, cfg_.n_layers, Stage(st))) used |= plan_[size_t(l) * 7 + size_t(p)] != 0;
            if (!used) continue;
            int64_t n = 0;
            for (const SealedBatch& b : sealed_[size_t(l) * kStages + size_t(st)]) n += b.count - b.next;
            best = best < 0 ? n : std::min(best, n);
        }
    return int(std::max<int64_t>(0, best));
}

uint64_t SecureSession::sealed_factor_bytes() const {
    uint64_t n = 0;
    for (const auto& q : sealed_)
        for (const SealedBatch& b : q) n += uint64_t(b.count - b.next) * b.unit;
    return n;
}

void SecureSession::reset() {
    Timer timer(stats_);
    if (gpu_) {
        gpu_->fw->abort_pass();
        gpu_->caches[0].clear();
    } else {
        call(wire::Encoder(MsgType::reset).finish(), stats_);
    }
    pos_ = 0;
    slot_pos_[0] = 0;
}

// ---- sequence slots ---------------------------------------------------------------------------------------------

int SecureSession::slot_pos(int slot) const {
    check_slot(slot, "slot_pos");
    return slot_pos_[size_t(slot)];
}

uint64_t SecureSession::kv_bytes() const {
    uint64_t n = 0;
    if (gpu_) {
        for (const KvCache& c : gpu_->caches) n += c.bytes();
        return n;
    }
    // the core's caches grow by whole chunks, as StagedForward::kv_bytes counts them
    const uint64_t per_pos = 2 * uint64_t(cfg_.n_layers) * uint64_t(cfg_.kv_dim()) * 4;
    for (int p : slot_pos_)
        n += per_pos * uint64_t(std::min<int64_t>(n_ctx_, (int64_t(p) + KvCache::kChunk - 1) / KvCache::kChunk * KvCache::kChunk));
    return n;
}

void SecureSession::reset_slot(int slot) {
    check_slot(slot, "reset_slot");
    Timer timer(stats_);
    if (gpu_) {
        gpu_->fw->abort_pass();
        gpu_->caches[size_t(slot)].clear();
        gpu_->samplers[size_t(slot)] = std::make_unique<Sampler>(gpu_->sampler_params[size_t(slot)]);
    } else {
        Encoder e(MsgType::reset);
        e.scalar<int32_t>(Tag::slot, slot);
        call(e.finish(), stats_);
    }
    slot_pos_[size_t(slot)] = 0;
    if (slot == 0) pos_ = 0;
}

std::vector<int32_t> SecureSession::step(std::span<const SlotStep> batch,
                                         std::vector<std::vector<TokenLogprob>>* logprobs) {
    Timer timer(stats_);
    if (batch.empty()) fail(Status::invalid_argument, "step: no slots");
    size_t total = 0;
    std::vector<uint8_t> seen(size_t(params_.slots), 0);
    for (const SlotStep& b : batch) {
        check_slot(b.slot, "step");
        if (seen[size_t(b.slot)]++) fail(Status::invalid_argument, "step: slot " + std::to_string(b.slot) + " named twice");
        if (b.tokens.empty()) fail(Status::invalid_argument, "step: no tokens for slot " + std::to_string(b.slot));
        if (int64_t(slot_pos_[size_t(b.slot)]) + int64_t(b.tokens.size()) > n_ctx_)
            fail(Status::invalid_argument, "context overflow: slot " + std::to_string(b.slot) + " holds " +
                                               std::to_string(slot_pos_[size_t(b.slot)]) + " tokens; " +
                                               std::to_string(b.tokens.size()) + " more exceed the context of " +
                                               std::to_string(n_ctx_));
        total += b.tokens.size();
    }
    if (total > size_t(n_batch_))
        fail(Status::invalid_argument, "step: " + std::to_string(total) + " tokens exceed the batch of " +
                                           std::to_string(n_batch_) + " (split prompts into chunks)");
    if (logprobs) logprobs->assign(batch.size(), {});
    std::vector<int32_t> out(batch.size(), -1);
    const int V = cfg_.vocab_size;
    if (gpu_) {
        std::vector<int32_t> all;
        for (const SlotStep& b : batch) all.insert(all.end(), b.tokens.begin(), b.tokens.end());
        trace_tokens_in(all);
        run_gpu_pass(batch);
        // the classifier once over the last row of every sampling slot, as the trusted core does
        std::vector<int> rows;
        int row = 0;
        for (const SlotStep& b : batch) {
            row += int(b.tokens.size());
            if (b.sample) rows.push_back(row - 1);
        }
        if (!rows.empty()) {
            gpu_->logits.resize(rows.size() * size_t(V));
            gpu_logits(rows, gpu_->logits.data());
        }
        size_t at = 0;
        for (size_t i = 0; i < batch.size(); ++i) {
            if (!batch[i].sample) continue;
            out[i] = gpu_->samplers[size_t(batch[i].slot)]->sample(gpu_->logits.data() + at++ * size_t(V), V);
        }
        gpu_->fw->end_pass();
        return out;
    }
    Encoder e(MsgType::step);
    std::vector<int32_t> slots, counts, all;
    std::vector<uint8_t> sample;
    for (const SlotStep& b : batch) {
        slots.push_back(b.slot);
        counts.push_back(int32_t(b.tokens.size()));
        sample.push_back(b.sample ? 1 : 0);
        all.insert(all.end(), b.tokens.begin(), b.tokens.end());
    }
    e.add(Tag::slots, slots);
    e.add(Tag::counts, counts);
    e.add(Tag::sample, sample);
    e.add(Tag::tokens, all);
    trace_tokens_in(all);
    const std::vector<uint8_t> resp = drive_crossings(call(e.finish(), stats_));
    const Message m = wire::decode(resp);
    if (m.type() != MsgType::result) fail(Status::internal, "the trusted core did not answer a step with a result");
    const auto rs = m.array<int32_t>(Tag::slots, int64_t(batch.size()));
    const auto rt = m.array<int32_t>(Tag::tokens, int64_t(batch.size()));
    const auto rp = m.array<int32_t>(Tag::counts, int64_t(batch.size()));
    std::vector<int32_t> ids;
    std::vector<float> values;
    if (m.has(Tag::logprob_ids)) {
        ids = m.array<int32_t>(Tag::logprob_ids);
        values = m.array<float>(Tag::logprob_values, int64_t(ids.size()));
    }
    size_t sampled = 0;
    for (size_t i = 0; i < batch.size(); ++i) sampled += batch[i].sample ? 1 : 0;
    const size_t k = sampled && !ids.empty() ? ids.size() / sampled : 0;
    size_t at = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
        if (rs[i] != batch[i].slot || (batch[i].sample ? rt[i] < 0 || rt[i] >= V : rt[i] != -1))
            fail(Status::internal, "the trusted core answered a step with a malformed result");
        out[i] = rt[i];
        slot_pos_[size_t(rs[i])] = rp[i];
        if (batch[i].sample && k) {
            if (logprobs)
                for (size_t j = 0; j < k; ++j) (*logprobs)[i].push_back({ids[at + j], values[at + j]});
            at += k;
        }
    }
    pos_ = slot_pos_[0];
    if (trace_) trace_->write(-1, "sample", "output", TraceDType::i32, {int64_t(out.size())}, out.data());
    return out;
}

}  // namespace si
