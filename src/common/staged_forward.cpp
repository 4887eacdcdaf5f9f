#include "common/staged_forward.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "common/error.h"
#include "common/matmul.h"
#include "common/ops.h"
#include "common/threadpool.h"

namespace si {

namespace {

constexpr Proj kQkv[] = {Proj::q, Proj::k, Proj::v};
constexpr Proj kO[] = {Proj::o};
constexpr Proj kFfnIn[] = {Proj::w1, Proj::w3};
constexpr Proj kFfnOut[] = {Proj::w2};

void run(ThreadPool* pool, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (pool)
        pool->parallel_for(n, 1, fn);
    else
        fn(0, n);
}

}  // namespace

std::span<const Proj> stage_projs(Stage s) {
    switch (s) {
        case Stage::qkv: return kQkv;
        case Stage::attn_out: return kO;
        case Stage::ffn_in: return kFfnIn;
        case Stage::ffn_out: return kFfnOut;
    }
    return {};
}

const char* stage_name(Stage s) {
    switch (s) {
        case Stage::qkv: return "qkv";
        case Stage::attn_out: return "attn_out";
        case Stage::ffn_in: return "ffn_in";
        case Stage::ffn_out: return "ffn_out";
    }
    return "?";
}

double token_nll(const float* logits, int n, int target) {
    double mx = logits[0];
    for (int v = 1; v < n; ++v) mx = std::max(mx, double(logits[v]));
    double sum = 0.0;
    for (int v = 0; v < n; ++v) sum += std::exp(double(logits[v]) - mx);
    return std::log(sum) + mx - double(logits[target]);
}

StagedForward::StagedForward(const ModelConfig& cfg, int n_ctx, bool tied_classifier, ThreadPool* pool,
                             EmbeddingRows embedding_rows)
    : cfg_(cfg), n_ctx_(n_ctx), tied_(tied_classifier), pool_(pool), embedding_rows_(std::move(embedding_rows)) {
    cfg_.validate("model configuration");
    if (n_ctx < 1 || n_ctx > cfg_.seq_len)
        fail(Status::invalid_argument, "context length " + std::to_string(n_ctx) + " out of range [1, " +
                                           std::to_string(cfg_.seq_len) + "]");
    const size_t d = size_t(cfg_.dim), v = size_t(cfg_.vocab_size);
    if (!embedding_rows_) tok_embeddings_.resize(v * d);
    if (!tied_) classifier_.resize(v * d);
    final_norm_.resize(d);
    attn_norm_.resize(size_t(cfg_.n_layers));
    ffn_norm_.resize(size_t(cfg_.n_layers));
    for (int l = 0; l < cfg_.n_layers; ++l) {
        attn_norm_[size_t(l)].resize(d);
        ffn_norm_[size_t(l)].resize(d);
    }
    lora_.resize(size_t(cfg_.n_layers) * 7);
}

size_t KvCache::bytes() const {
    size_t n = 0;
    for (const auto& b : k_) n += b.size() * sizeof(float);
    for (const auto& b : v_) n += b.size() * sizeof(float);
    return n;
}

void KvCache::clear() {
    std::vector<SecretVector<float>>().swap(k_);  // freed, so zeroed
    std::vector<SecretVector<float>>().swap(v_);
    pos_ = cap_ = 0;
}

size_t StagedForward::kv_bytes(int positions) const {
    if (positions <= 0) return 0;
    const int64_t cap = std::min<int64_t>(n_ctx_, (int64_t(positions) + KvCache::kChunk - 1) / KvCache::kChunk * KvCache::kChunk);
    return size_t(2 * int64_t(cfg_.n_layers) * cap * cfg_.kv_dim()) * sizeof(float);
}

// Grows a cache (whole chunks, at most n_ctx positions) to hold `positions` positions, keeping its contents.
void StagedForward::grow(KvCache& c, int positions) {
    if (positions <= c.cap_) return;
    const int cap = int(std::min<int64_t>(n_ctx_, (int64_t(positions) + KvCache::kChunk - 1) / KvCache::kChunk * KvCache::kChunk));
    const size_t kv = size_t(cfg_.kv_dim()), L = size_t(cfg_.n_layers);
    std::vector<SecretVector<float>> nk(L), nv(L);
    for (size_t l = 0; l < L; ++l) {
        nk[l].resize(size_t(cap) * kv);
        nv[l].resize(size_t(cap) * kv);
        if (c.cap_ > 0) {
            std::copy_n(c.k_[l].data(), size_t(c.pos_) * kv, nk[l].data());
            std::copy_n(c.v_[l].data(), size_t(c.pos_) * kv, nv[l].data());
        }
    }
    c.k_.swap(nk);  // the old chunks are freed (zeroed) with nk, nv
    c.v_.swap(nv);
    c.cap_ = cap;
}

StagedForward::~StagedForward() = default;

SecretVector<float>& StagedForward::attn_norm(int layer) {
    if (layer < 0 || layer >= cfg_.n_layers) fail(Status::invalid_argument, "layer index out of range");
    return attn_norm_[size_t(layer)];
}

SecretVector<float>& StagedForward::ffn_norm(int layer) {
    if (layer < 0 || layer >= cfg_.n_layers) fail(Status::invalid_argument, "layer index out of range");
    return ffn_norm_[size_t(layer)];
}

LoraUpdate& StagedForward::set_lora(int layer, Proj p, int rank, float scale) {
    if (layer < 0 || layer >= cfg_.n_layers) fail(Status::invalid_argument, "LoRA: layer index out of range");
    const ProjShape s = proj_shape(cfg_, p);
    if (rank < 1 || rank > std::min<int64_t>(s.rows, s.cols))
        fail(Status::invalid_argument, "LoRA: rank " + std::to_string(rank) + " out of range for " +
                                           proj_tensor_name(layer, p));
    if (!std::isfinite(scale)) fail(Status::invalid_argument, "LoRA: non-finite scale");
    LoraUpdate& u = lora_[size_t(layer) * 7 + size_t(p)];
    u.rank = rank;
    u.scale = scale;
    u.a.assign(size_t(rank) * size_t(s.cols), 0.0f);
    u.b.assign(size_t(s.rows) * size_t(rank), 0.0f);
    return u;
}

const LoraUpdate* StagedForward::lora(int layer, Proj p) const {
    if (layer < 0 || layer >= cfg_.n_layers) return nullptr;
    const LoraUpdate& u = lora_[size_t(layer) * 7 + size_t(p)];
    return u.rank > 0 ? &u : nullptr;
}

void StagedForward::reset() {
    own_.clear();
    in_pass_ = false;
    input_ = nullptr;
}

void StagedForward::ensure_scratch(int T) {
    int max_rank = 0;
    for (const auto& u : lora_) max_rank = std::max(max_rank, u.rank);
    const size_t lt = size_t(T) * size_t(max_rank);
    if (T <= scratch_T_ && lora_tmp_.size() >= lt) return;
    const size_t d = size_t(cfg_.dim), h = size_t(cfg_.hidden_dim), kv = size_t(cfg_.kv_dim());
    const size_t n = size_t(T);
    for (auto* b : {&x_, &xb_, &xb2_, &ob_, &q_}) b->resize(n * d);
    k_.resize(n * kv);
    v_.resize(n * kv);
    for (auto* b : {&h1_, &h3_, &hb_}) b->resize(n * h);
    lora_tmp_.resize(lt);
    lora_out_.resize(n * std::max(d, h));
    scratch_T_ = std::max(scratch_T_, T);
}

void StagedForward::begin(const int32_t* tokens, int T) {
    const PassSegment seg{&own_, tokens, T};
    begin(std::span<const PassSegment>(&seg, 1));
}

void StagedForward::begin(std::span<const PassSegment> segments) {
    if (in_pass_ && !done()) fail(Status::invalid_argument, "a forward pass is already in progress");
    if (segments.empty()) fail(Status::invalid_argument, "no tokens to evaluate");
    int64_t total = 0;
    for (size_t i = 0; i < segments.size(); ++i) {
        const PassSegment& s = segments[i];
        if (!s.cache || s.n < 1) fail(Status::invalid_argument, "no tokens to evaluate");
        for (size_t j = 0; j < i; ++j)
            if (segments[j].cache == s.cache)
                fail(Status::invalid_argument, "a batched pass names one sequence twice");
        if (int64_t(s.cache->pos_) + s.n > n_ctx_)
            fail(Status::invalid_argument, "context overflow: " + std::to_string(s.cache->pos_) + " + " +
                                               std::to_string(s.n) + " tokens exceed the context of " +
                                               std::to_string(n_ctx_));
        for (int t = 0; t < s.n; ++t)
            if (s.tokens[t] < 0 || s.tokens[t] >= cfg_.vocab_size)
                fail(Status::invalid_argument, "token id " + std::to_string(s.tokens[t]) + " out of range [0, " +
                                                   std::to_string(cfg_.vocab_size) + ")");
        total += s.n;
    }
    if (total > n_ctx_)
        fail(Status::invalid_argument, "a pass of " + std::to_string(total) + " tokens exceeds the context of " +
                                           std::to_string(n_ctx_));
    const int T = int(total);
    for (const PassSegment& s : segments) grow(*s.cache, s.cache->pos_ + s.n);
    ensure_scratch(T);
    const int d = cfg_.dim;
    segs_.clear();
    row_pos_.resize(size_t(T));
    int row = 0;
    for (const PassSegment& s : segments) {
        segs_.push_back(Seg{s.cache, row, s.n, s.cache->pos_});
        for (int t = 0; t < s.n; ++t, ++row) {
            if (embedding_rows_)
                embedding_rows_(s.tokens[t], x_.data() + size_t(row) * d);
            else
                std::copy_n(&tok_embeddings_[size_t(s.tokens[t]) * d], d, x_.data() + size_t(row) * d);
            row_pos_[size_t(row)] = s.cache->pos_ + t;
        }
    }
    T_ = T;
    pass_pos_ = segs_[0].pos0;
    layer_ = 0;
    stage_ = Stage::qkv;
    in_pass_ = true;
    for (int t = 0; t < T; ++t)
        rmsnorm(&xb_[size_t(t) * d], &x_[size_t(t) * d], attn_norm_[0].data(), d, cfg_.norm_eps);
    input_ = xb_.data();
    flops_ += uint64_t(T) * d * 4;
}

int64_t StagedForward::stage_cols() const { return stage_ == Stage::ffn_out ? cfg_.hidden_dim : cfg_.dim; }

float* StagedForward::proj_output(Proj p) {
    if (!in_pass_ || done()) fail(Status::internal, "no stage in progress");
    switch (p) {
        case Proj::q: return q_.data();
        case Proj::k: return k_.data();
        case Proj::v: return v_.data();
        case Proj::o: return ob_.data();
        case Proj::w1: return h1_.data();
        case Proj::w3: return h3_.data();
        case Proj::w2: return ob_.data();
    }
    return nullptr;
}

void StagedForward::add_lora(Proj p, const float* x, float* y) {
    const LoraUpdate* u = lora(layer_, p);
    if (!u) return;
    const ProjShape s = proj_shape(cfg_, p);
    // tmp = A x [T][rank]; out = B tmp [T][rows]; y += scale * out
    matmul_f32(pool_, u->a.data(), u->rank, s.cols, x, T_, lora_tmp_.data());
    matmul_f32(pool_, u->b.data(), s.rows, u->rank, lora_tmp_.data(), T_, lora_out_.data());
    const size_t n = size_t(T_) * size_t(s.rows);
    for (size_t i = 0; i < n; ++i) y[i] += u->scale * lora_out_[i];
    flops_ += 2 * uint64_t(T_) * uint64_t(u->rank) * uint64_t(s.rows + s.cols) + 2 * n;
}

// Causal grouped-query attention of every row over its own sequence's cache (after RoPE and the cache append)
// -> xb2 [T][dim].
void StagedForward::attention() {
    const int d = cfg_.dim, hd = cfg_.head_dim(), kv = cfg_.kv_dim();
    const int n_heads = cfg_.n_heads, group = cfg_.n_heads / cfg_.n_kv_heads;
    int longest = 0;
    for (const Seg& s : segs_) longest = std::max(longest, s.pos0 + s.n);
    // one (row, head) pair per work item, over all segments; each range is cut at segment boundaries
    run(pool_, int64_t(T_) * n_heads, [&](int64_t begin, int64_t end) {
        SecretVector<float> att(attend_scratch(begin, end, n_heads, 0, longest));
        size_t si = 0;
        for (int64_t i = begin; i < end;) {
            const int64_t row = i / n_heads;
            while (int64_t(segs_[si].row0) + segs_[si].n <= row) ++si;
            const Seg& s = segs_[si];
            const int64_t base = int64_t(s.row0) * n_heads, stop = std::min<int64_t>(end, base + int64_t(s.n) * n_heads);
            attend_items(i - base, stop - base, n_heads, s.pos0, xb2_.data() + size_t(s.row0) * d, size_t(d),
                         q_.data() + size_t(s.row0) * d, size_t(d), s.cache->k_[size_t(layer_)].data(),
                         s.cache->v_[size_t(layer_)].data(), size_t(kv), hd, group, att.data());
            i = stop;
        }
    });
    for (int t = 0; t < T_; ++t) flops_ += uint64_t(n_heads) * uint64_t(row_pos_[size_t(t)] + 1) * uint64_t(hd) * 4;
}

void StagedForward::finish_stage() {
    if (!in_pass_ || done()) fail(Status::internal, "no stage in progress");
    const int d = cfg_.dim, hd = cfg_.head_dim(), kv = cfg_.kv_dim(), hidden = cfg_.hidden_dim;
    const float eps = cfg_.norm_eps;
    const size_t Td = size_t(T_) * d;
    switch (stage_) {
        case Stage::qkv: {
            add_lora(Proj::q, xb_.data(), q_.data());
            add_lora(Proj::k, xb_.data(), k_.data());
            add_lora(Proj::v, xb_.data(), v_.data());
            for (const Seg& s : segs_) {
                float* kc = s.cache->k_[size_t(layer_)].data();
                float* vc = s.cache->v_[size_t(layer_)].data();
                for (int t = s.row0; t < s.row0 + s.n; ++t) {
                    const int p = row_pos_[size_t(t)];
                    rope(&q_[size_t(t) * d], cfg_.n_heads, hd, p, cfg_.rope_theta, cfg_.rope_factors());
                    rope(&k_[size_t(t) * kv], cfg_.n_kv_heads, hd, p, cfg_.rope_theta, cfg_.rope_factors());
                    std::copy_n(&k_[size_t(t) * kv], kv, kc + size_t(p) * kv);
                    std::copy_n(&v_[size_t(t) * kv], kv, vc + size_t(p) * kv);
                }
            }
            attention();
            input_ = xb2_.data();
            stage_ = Stage::attn_out;
            break;
        }
        case Stage::attn_out: {
            add_lora(Proj::o, xb2_.data(), ob_.data());
            for (size_t i = 0; i < Td; ++i) x_[i] += ob_[i];
            for (int t = 0; t < T_; ++t)
                rmsnorm(&xb_[size_t(t) * d], &x_[size_t(t) * d], ffn_norm_[size_t(layer_)].data(), d, eps);
            flops_ += Td * 5;
            input_ = xb_.data();
            stage_ = Stage::ffn_in;
            break;
        }
        case Stage::ffn_in: {
            add_lora(Proj::w1, xb_.data(), h1_.data());
            add_lora(Proj::w3, xb_.data(), h3_.data());
            for (int t = 0; t < T_; ++t)
                swiglu(&hb_[size_t(t) * hidden], &h1_[size_t(t) * hidden], &h3_[size_t(t) * hidden], hidden);
            flops_ += uint64_t(T_) * hidden * 5;
            input_ = hb_.data();
            stage_ = Stage::ffn_out;
            break;
        }
        case Stage::ffn_out: {
            add_lora(Proj::w2, hb_.data(), ob_.data());
            for (size_t i = 0; i < Td; ++i) x_[i] += ob_[i];
            ++layer_;
            stage_ = Stage::qkv;
            if (layer_ < cfg_.n_layers) {
                for (int t = 0; t < T_; ++t)
                    rmsnorm(&xb_[size_t(t) * d], &x_[size_t(t) * d], attn_norm_[size_t(layer_)].data(), d, eps);
                input_ = xb_.data();
            } else {
                input_ = nullptr;
                for (const Seg& s : segs_) s.cache->pos_ = s.pos0 + s.n;
            }
            flops_ += Td * 5;
            break;
        }
    }
}

void StagedForward::logits(int t0, int n, float* out) {
    if (!done()) fail(Status::internal, "logits requested before the pass is complete");
    if (t0 < 0 || n < 1 || t0 + n > T_) fail(Status::invalid_argument, "logits: token range out of the pass");
    const int d = cfg_.dim;
    // xb is free once the pass is done; it holds T rows, enough for n <= T.
    for (int t = 0; t < n; ++t)
        rmsnorm(&xb_[size_t(t) * d], &x_[size_t(t0 + t) * d], final_norm_.data(), d, cfg_.norm_eps);
    const SecretVector<float>& W = tied_ ? tok_embeddings_ : classifier_;
    if (W.empty()) fail(Status::internal, "logits: the classifier's weights are not held here");
    matmul_f32(pool_, W.data(), cfg_.vocab_size, d, xb_.data(), n, out);
    flops_ += 2 * uint64_t(n) * uint64_t(cfg_.vocab_size) * uint64_t(d);
}

void StagedForward::final_hidden(int t, float* out) {
    if (!done()) fail(Status::internal, "classifier input requested before the pass is complete");
    if (t < 0 || t >= T_) fail(Status::invalid_argument, "classifier input: token out of the pass");
    const int d = cfg_.dim;
    rmsnorm(out, &x_[size_t(t) * d], final_norm_.data(), d, cfg_.norm_eps);
    flops_ += uint64_t(d) * 4;
}

}  // namespace si
