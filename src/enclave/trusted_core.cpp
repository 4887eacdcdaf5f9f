// The trusted core's forward driver (after llama2.c's run.c, stage by stage): eval runs the stages of each layer,
// keeping secret projections inside and handing public ones to core_crossings.cpp; after the last block the
// classifier, then only a sampled token (or a summed NLL) leaves. Also the request dispatch and the integrity latch.
#include "enclave/core_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace si {

using core::bad;
using core::wipe;

void TrustedCore::Impl::abandon() {
    if (pending.active) {
        uint64_t total = 0;
        for (Proj p : pending.projs) total += uint64_t(pending.T) * uint64_t(proj(pending.layer, p).rows);
        erase_kept_units(total);
    }
    pending = Pending{};
    pass.clear();
    stepping = false;
    if (fw) fw->abort_pass();
    wipe(r);
    wipe(xq);
    wipe(pre_plain);
}

std::vector<uint8_t> TrustedCore::Impl::eval(const Message& m) {
    if (phase != Phase::ready) bad("eval: the model is not loaded (finalize first)");
    if (pending.active || fw->in_pass()) bad("eval: a forward pass is already in progress");
    const wire::Field& tf = m.field(Tag::tokens, WireType::i32);
    if (tf.count < 1 || int64_t(tf.count) > n_ctx)
        bad("eval: token count " + std::to_string(tf.count) + " out of range [1, " + std::to_string(n_ctx) + "]");
    const auto tokens = m.array<int32_t>(Tag::tokens);
    const uint8_t out = m.scalar<uint8_t>(Tag::output);
    if (out > 2) bad("eval: unknown output kind " + std::to_string(out));
    output = wire::OutputKind(out);
    // A package's owner decides what may leave besides sampled tokens: both are oracles on the outputs.
    if (package && output == wire::OutputKind::nll && !(release_policy & pkg::kReleaseNll))
        fail(Status::security, "the package's owner does not allow log-likelihood evaluation (perplexity); it "
                               "must be packed with --release-nll");
    if (package && output == wire::OutputKind::sample && logprobs_k > int(release_policy & pkg::kReleaseLogprobsMask))
        fail(Status::security, "the package's owner allows at most " +
                                   std::to_string(release_policy & pkg::kReleaseLogprobsMask) +
                                   " log-probabilities per token; " + std::to_string(logprobs_k) + " were asked");
    if (output == wire::OutputKind::sample) check_sampling_policy(seqs[0].params, logprobs_k, logprob_noise);
    targets.clear();
    if (output == wire::OutputKind::nll) {
        targets = m.array<int32_t>(Tag::targets, tf.count);
        for (int32_t t : targets)
            if (t < -1 || t >= cfg.vocab_size) bad("eval: NLL target " + std::to_string(t) + " out of range");
    }
    // an eval is a pass of slot 0 alone
    pass.assign(1, PassSeg{0, 0, int(tokens.size()), output == wire::OutputKind::sample, {}});
    stepping = false;
    begin_pass(tokens);
    return run();
}

// Runs stages until a crossing must leave the core or the pass is complete.
std::vector<uint8_t> TrustedCore::Impl::run() {
    while (!fw->done()) {
        const int l = fw->layer(), T = fw->T();
        const Stage st = fw->stage();
        const int64_t K = fw->stage_cols();
        const int bits = activation_bits(K);
        xq.resize(size_t(T * K));
        xs.resize(size_t(T));
        quantize_activations(fw->stage_input(), T, K, bits, xq.data(), xs.data());
        std::vector<Proj> off;
        for (Proj p : stage_projs(st)) {
            ProjState& s = proj(l, p);
            if (s.offload) {
                off.push_back(p);
                continue;
            }
            acc.resize(size_t(T * s.rows));
            gemm_i16(loop_pool(T), s.packed, xq.data(), T, acc.data());
            dequantize_product(acc.data(), T, s.rows, s.scale.data(), xs.data(), fw->proj_output(p));
            flops += 2 * uint64_t(T) * uint64_t(s.rows * s.cols);
        }
        if (!off.empty()) return send_offload(l, st, std::move(off), T, K, false);
        fw->finish_stage();
    }
    return classify();
}

// After the last block: the classifier on the final-normed states of the tokens whose logits are needed, as
// one more base projection (offloaded on masked inputs unless secret), dequantised into `logits` [n][vocab].
std::vector<uint8_t> TrustedCore::Impl::classify() {
    const int T = fw->T(), d = cfg.dim, V = cfg.vocab_size;
    cls_rows.clear();
    if (output == wire::OutputKind::sample) {
        // the last row of each sequence that samples
        for (const PassSeg& g : pass)
            if (g.sample) cls_rows.push_back(g.row0 + g.n - 1);
    } else if (output == wire::OutputKind::nll) {
        for (int t = 0; t < T; ++t)
            if (targets[size_t(t)] >= 0) cls_rows.push_back(t);
    }
    if (cls_rows.empty()) return finish_pass();
    const int n = int(cls_rows.size());
    cls_in.resize(size_t(n) * size_t(d));
    for (int i = 0; i < n; ++i) fw->final_hidden(cls_rows[size_t(i)], cls_in.data() + size_t(i) * d);
    xq.resize(size_t(n) * size_t(d));
    xs.resize(size_t(n));
    quantize_activations(cls_in.data(), n, d, activation_bits(d), xq.data(), xs.data());
    wipe(cls_in);
    logits.resize(size_t(n) * size_t(V));
    ProjState& s = proj(cfg.n_layers, kClassifierSlot);
    if (s.offload) return send_offload(cfg.n_layers, Stage::qkv, {kClassifierSlot}, n, d, true);
    acc.resize(size_t(n) * size_t(V));
    gemm_i16(loop_pool(n), s.packed, xq.data(), n, acc.data());
    dequantize_product(acc.data(), n, s.rows, s.scale.data(), xs.data(), logits.data());
    flops += 2 * uint64_t(n) * uint64_t(s.rows * s.cols);
    return finish_pass();
}

std::vector<uint8_t> TrustedCore::Impl::finish_pass() {
    if (stepping) return finish_step();
    const int V = cfg.vocab_size;
    Encoder e(output == wire::OutputKind::none ? MsgType::ok : MsgType::result);
    SeqSlot& q = seqs[0];
    // logits [cls_rows.size()][V], computed by classify() (and products() when offloaded)
    if (output == wire::OutputKind::sample) {
        if (package) q.sampler->reseed(draw_seed(q.params, pass[0].context_hash));
        const int32_t tok = q.sampler->sample(logits.data(), V);
        e.scalar<int32_t>(Tag::token, tok);
        if (logprobs_k > 0) {
            std::vector<int32_t> ids;
            std::vector<float> values;
            release_logprobs(logits.data(), ids, values);
            e.add(Tag::logprob_ids, ids);
            e.add(Tag::logprob_values, values);
        }
    } else if (output == wire::OutputKind::nll) {
        double sum = 0.0;
        uint64_t count = 0;
        for (size_t i = 0; i < cls_rows.size(); ++i) {
            sum += token_nll(&logits[i * size_t(V)], V, targets[size_t(cls_rows[i])]);
            ++count;
        }
        e.scalar<double>(Tag::nll_sum, sum);
        e.scalar<uint64_t>(Tag::nll_count, count);
    }
    fw->end_pass();
    q.context_hash = pass[0].context_hash;
    pass.clear();
    wipe(logits);
    wipe(xq);
    e.scalar<int32_t>(Tag::pos, q.kv.pos());
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

// Top-K log-probabilities (temperature 1) of one row of logits, with Gaussian noise of the configured deviation
// added before release.
void TrustedCore::Impl::release_logprobs(const float* lg, std::vector<int32_t>& ids_out, std::vector<float>& values) {
    const int V = cfg.vocab_size, K = std::min(logprobs_k, V);
    double mx = lg[0];
    for (int i = 1; i < V; ++i) mx = std::max(mx, double(lg[i]));
    double sum = 0.0;
    for (int i = 0; i < V; ++i) sum += std::exp(double(lg[i]) - mx);
    const double lse = mx + std::log(sum);
    // the ranking of the whole vocabulary is secret; only its first K entries are released
    SecretVector<int32_t> order(static_cast<size_t>(V));
    for (int i = 0; i < V; ++i) order[size_t(i)] = i;
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
        return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
    });
    for (int i = 0; i < K; ++i) {
        const int32_t id = order[size_t(i)];
        double lp = double(lg[id]) - lse;
        if (logprob_noise > 0.0f) lp += double(logprob_noise) * gaussian();
        ids_out.push_back(id);
        values.push_back(float(lp));
    }
}

// A standard normal variate (Box-Muller) from the core's own AES-CTR stream, keyed from the OS CSPRNG.
// The seed of a package's draw: a PRF, under a key only this enclave on this device derives, of the request's seed
// and sampler settings and of the whole context. The host cannot predict a draw (it does not know the key), and
// whatever it changes (seed, temperature, top-k, top-p, any token) gives an independent draw; only the very same
// request repeats, and then with the same token, which teaches it nothing new.
uint64_t TrustedCore::Impl::draw_seed(const SamplerParams& p, const pkg::Hash& context) const {
    std::vector<uint8_t> in = {'S', 'I', 'D', 'R', 'A', 'W', '1', 0};
    auto put = [&](const void* b, size_t n) { in.insert(in.end(), static_cast<const uint8_t*>(b), static_cast<const uint8_t*>(b) + n); };
    put(&p.seed, 8);
    put(&p.temperature, 4);
    put(&p.top_k, 4);
    put(&p.top_p, 4);
    put(context.data(), context.size());
    pkg::Hash h = pkg::hmac_sha256(draw_key, in);
    uint64_t seed = 0;
    std::memcpy(&seed, h.data(), 8);
    OPENSSL_cleanse(h.data(), h.size());
    return seed;
}

double TrustedCore::Impl::gaussian() {
    uint32_t u[4];
    noise->fill(u, 4);
    const double a = (double((uint64_t(u[0]) << 21) ^ u[1]) + 1.0) / 9007199254740993.0;  // (0, 1]
    const double b = double((uint64_t(u[2]) << 21) ^ u[3]) / 9007199254740992.0;
    OPENSSL_cleanse(u, sizeof u);
    return std::sqrt(-2.0 * std::log(a)) * std::cos(6.283185307179586 * b);
}

std::vector<uint8_t> TrustedCore::Impl::reset() {
    if (phase != Phase::ready) bad("reset: the model is not loaded");
    abandon();
    seqs[0].kv.clear();
    seqs[0].context_hash = pkg::Hash{};
    Encoder e(MsgType::ok);
    e.scalar<int32_t>(Tag::pos, 0);
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

void TrustedCore::Impl::wipe_all() {
    abandon();
    wipe(acc);
    wipe(xs);
    wipe(wr);
    wipe(pre_r);
    wipe(pre_wr);
    wipe(pre_plain);
    wipe(seal_key);
    seal_key.clear();
    SecretVector<uint8_t>().swap(model_key);
    SecretVector<uint8_t>().swap(draw_key);
    bound.clear();
    eph.reset();
    table.clear();
    table_next.clear();
    package = false;
    pre.clear();
    kept_bytes = 0;
    projs.clear();
    seqs.clear();
    fw.reset();
    masks.reset();
    noise.reset();
    phase = Phase::fresh;
}

TrustedCore::TrustedCore(const si_ocall_table* ocalls, const si_platform* platform) : impl_(std::make_unique<Impl>()) {
    if (ocalls) ocalls_ = *ocalls;
    if (ocalls && ocalls->parallel_for) impl_->pool = std::make_unique<ThreadPool>(ocalls->parallel_for, ocalls->ctx);
    if (platform) {
        Impl& c = *impl_;
        c.has_platform = true;
        c.quote_type = platform->quote_type ? platform->quote_type : "";
        std::memcpy(c.measurement.data(), platform->measurement, c.measurement.size());
        c.sealing_key.assign(platform->sealing_key, platform->sealing_key + sizeof platform->sealing_key);
        c.quote_fn = platform->quote;
        c.quote_ctx = platform->ctx;
    }
}

TrustedCore::~TrustedCore() { impl_->wipe_all(); }

std::vector<uint8_t> TrustedCore::process(std::span<const uint8_t> request) {
    if (failed_)
        fail(Status::integrity, "the session was stopped after an integrity failure; no further output is released");
    Impl& c = *impl_;
    try {
        const wire::Message m = wire::decode(request);
        switch (m.type()) {
            case wire::MsgType::configure: c.configure(m); return c.ok();
            case wire::MsgType::upload: c.upload(m); return c.ok();
            case wire::MsgType::finalize: return c.finalize();
            case wire::MsgType::sampler: c.set_sampler(m); return c.ok();
            case wire::MsgType::eval: return c.eval(m);
            case wire::MsgType::products: return c.products(m);
            case wire::MsgType::unit: return c.unit(m);
            case wire::MsgType::precompute: return c.precompute(m);
            case wire::MsgType::reset: return m.has(wire::Tag::slot) ? c.reset_slot(m) : c.reset();
            case wire::MsgType::step: return c.step(m);
            case wire::MsgType::attest: return c.attest(m);
            case wire::MsgType::release: return c.release(m);
            case wire::MsgType::unseal: c.unseal(m); return c.ok();
            case wire::MsgType::manifest: c.manifest(m); return c.ok();
            case wire::MsgType::upload_secret: c.upload_secret(m); return c.ok();
            default: bad(std::string("unexpected message type ") + wire::msg_type_name(m.type()) + " in a request");
        }
    } catch (const Error& e) {
        if (e.status() == Status::integrity) {
            // Latch: wipe every secret and refuse everything from now on.
            failed_ = true;
            c.wipe_all();
            if (ocalls_.log) ocalls_.log(ocalls_.ctx, 2, e.what());
        } else if (c.pending.active || (c.fw && c.fw->in_pass())) {
            // A malformed request in the middle of a pass abandons the pass (its pads are never reused).
            c.abandon();
        }
        throw;
    } catch (...) {
        c.abandon();
        throw;
    }
}

}  // namespace si
