#include "attack/api_attacks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <set>

#include "common/error.h"
#include "host/package.h"
#include "common/threadpool.h"
#include "host/secure_session.h"
#include "host/trace.h"
#include "train/params.h"
#include "train/transformer.h"

namespace si::attack {

// ---- evaluation of windows -----------------------------------------------------------------------------------------

WindowEval eval_windows(const ModelWeights& w, const std::vector<std::vector<int32_t>>& windows, int tail, int threads) {
    const ModelConfig& cfg = w.cfg;
    const train::ParamLayout layout = train::model_layout(cfg, w.tied());
    const std::vector<float> packed = train::pack_model<float>(w, layout);
    const train::ModelRef<const float> ref = train::bind_model<const float>(cfg, layout, packed.data());
    WindowEval out;
    const size_t n = windows.size();
    out.nll.assign(n, 0.0);
    out.tail_nll.assign(n, 0.0);
    out.tail_greedy.assign(n, 0.0);
    if (n == 0) return out;
    ThreadPool pool(std::max(1, threads));
    const int W = pool.size();
    std::vector<std::unique_ptr<ThreadPool>> inline_pools;
    std::vector<std::unique_ptr<train::Transformer<float>>> nets;
    for (int i = 0; i < W; ++i) {
        inline_pools.push_back(std::make_unique<ThreadPool>(1));
        nets.push_back(std::make_unique<train::Transformer<float>>(cfg, *inline_pools.back()));
    }
    const int V = cfg.vocab_size;
    for (const auto& ids : windows)
        if (ids.size() < 2 || int64_t(ids.size()) - 1 > cfg.seq_len)
            fail(Status::invalid_argument, "eval_windows: window length out of range");
    pool.parallel_for(W, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k)
            for (size_t i = size_t(k); i < n; i += size_t(W)) {
                const std::vector<int32_t>& ids = windows[i];
                const int L = int(ids.size()) - 1;
                const std::vector<int32_t> tokens(ids.begin(), ids.end() - 1), targets(ids.begin() + 1, ids.end());
                train::Transformer<float>& net = *nets[size_t(k)];
                const double sum = net.forward(ref, 0.0f, tokens.data(), targets.data(), 1, L);
                out.nll[i] = sum / double(L);
                const std::vector<float>& lg = net.logits();
                const int t0 = std::max(0, L - tail);
                double tn = 0.0, tg = 0.0;
                for (int t = t0; t < L; ++t) {
                    const float* row = lg.data() + size_t(t) * size_t(V);
                    double mx = row[0];
                    int arg = 0;
                    for (int v = 1; v < V; ++v)
                        if (row[v] > mx) {
                            mx = row[v];
                            arg = v;
                        }
                    double s = 0.0;
                    for (int v = 0; v < V; ++v) s += std::exp(double(row[v]) - mx);
                    tn += mx + std::log(s) - double(row[targets[size_t(t)]]);
                    tg += arg == targets[size_t(t)] ? 1.0 : 0.0;
                }
                out.tail_nll[i] = L > t0 ? tn / double(L - t0) : 0.0;
                out.tail_greedy[i] = L > t0 ? tg / double(L - t0) : 0.0;
            }
    });
    return out;
}

double perplexity(const WindowEval& e) {
    if (e.nll.empty()) return 0.0;
    return std::exp(std::accumulate(e.nll.begin(), e.nll.end(), 0.0) / double(e.nll.size()));
}

ModelWeights merged_model(const ModelWeights& base, const train::LoraAdapter& adapter) {
    ModelWeights w = base;
    train::merge_lora(w, adapter, 1.0f);
    return w;
}

std::vector<std::vector<int32_t>> even_windows(const std::vector<int32_t>& text, int count, int len, int32_t bos) {
    const size_t avail = text.size() / size_t(len);
    if (avail == 0 || count <= 0) fail(Status::invalid_argument, "even_windows: text shorter than one window");
    const size_t n = std::min(avail, size_t(count));
    std::vector<std::vector<int32_t>> out;
    for (size_t i = 0; i < n; ++i) {
        const size_t start = (i * avail / n) * size_t(len);
        std::vector<int32_t> win = {bos};
        win.insert(win.end(), text.begin() + int64_t(start), text.begin() + int64_t(start) + len);
        out.push_back(std::move(win));
    }
    return out;
}

// ---- the private corpus -----------------------------------------------------------------------------------------

std::vector<std::string> private_corpus_files(const std::string& shared_dir) {
    std::vector<std::string> f;
    for (const char* n : {"austen_emma", "austen_mansfield_park", "austen_northanger_abbey", "austen_pride_and_prejudice",
                          "austen_sense_and_sensibility"})
        f.push_back(shared_dir + "/data/" + n + ".txt");
    return f;
}

train::TrainOptions reference_recipe() {
    train::TrainOptions o;
    o.lora_rank = 8;
    o.lora_alpha = 16.0f;
    o.steps = 1000;
    o.batch = 8;
    o.ctx = 256;
    o.lr = 5e-3f;
    o.warmup = 50;
    o.min_lr_ratio = 0.1f;
    o.grad_clip = 1.0f;
    o.seed = 1;
    o.threads = 1;
    return o;
}

// ---- A5 ---------------------------------------------------------------------------------------------------------

std::map<ProjKey, Mat> leaked_weights(const TraceReader& trace, const ModelWeights& base) {
    std::map<ProjKey, Mat> out;
    for (const TraceEntry& e : trace.entries()) {
        if (e.role != "weight" || e.layer < 0 || e.layer >= base.cfg.n_layers) continue;
        const auto p = trace_op_proj(e.op);
        if (!p) continue;
        const Mat W0 = base_projection(base, e.layer, *p);
        Mat Wp(e.rows(), e.cols());
        Wp.a = trace.load(e);
        if (e.dtype == "float32" && Wp.rows == W0.rows && Wp.cols == W0.cols)
            out[{e.layer, *p}] = std::move(Wp);  // plaintext offload: the fine-tuned weights as they are
        else
            out[{e.layer, *p}] = align_to_base(Wp, W0);
    }
    return out;
}

ModelWeights apply_estimates(const ModelWeights& base, const std::map<ProjKey, Mat>& estimates) {
    ModelWeights w = base;
    for (const auto& [key, m] : estimates) {
        std::vector<float>& t = proj_weights(w.layers[size_t(key.first)], key.second);
        if (t.size() != m.a.size()) fail(Status::invalid_argument, "apply_estimates: estimate does not fit the base");
        for (size_t i = 0; i < t.size(); ++i) t[i] = float(m.a[i]);
    }
    return w;
}

train::TextCorpus budget_corpus(const train::TextCorpus& priv, double fraction, uint64_t seed) {
    train::TextCorpus c;
    c.bos = priv.bos;
    SplitMix rng(seed * 0x9e3779b97f4a7c15ULL + 0xA5);
    for (const auto& s : priv.train) {
        const size_t n = std::max<size_t>(2, size_t(std::llround(double(s.size()) * fraction)));
        if (n >= s.size()) fail(Status::invalid_argument, "budget_corpus: fraction too large");
        const size_t pos = size_t(rng.below(s.size() - n));
        c.train.emplace_back(s.begin() + int64_t(pos), s.begin() + int64_t(pos + n));
    }
    return c;
}

ModelWeights fine_tune(const ModelWeights& start, const train::TextCorpus& budget, const train::TrainOptions& options) {
    train::Trainer tr(start, options, budget);
    while (!tr.done()) tr.train_step();
    return tr.weights();
}

double leakage_ratio(double ppl_blackbox, double ppl_surrogate, double ppl_victim) {
    const double den = ppl_blackbox - ppl_victim;
    if (!(std::abs(den) > 0.0)) return 0.0;
    return (ppl_blackbox - ppl_surrogate) / den;
}

// ---- A6 ---------------------------------------------------------------------------------------------------------

LastLayerExtraction analyse_logprob_matrix(const Mat& Q, const std::vector<int>& cols, const ModelWeights& base) {
    LastLayerExtraction r;
    r.rows = Q.rows;
    r.columns = Q.cols;
    const int dim = base.cfg.dim;
    if (Q.rows < 2 || Q.cols < 2) return r;
    // centre each row over the known entries, which removes log Z (a multiple of the all-ones vector), then each
    // column, which removes the mean log-probability profile (it would dominate the spectrum and hide the gap); both
    // keep the rows inside the span of the centred classifier columns
    Mat C = Q;
    for (int64_t i = 0; i < C.rows; ++i) {
        double m = 0.0;
        for (int64_t j = 0; j < C.cols; ++j) m += C(i, j);
        m /= double(C.cols);
        for (int64_t j = 0; j < C.cols; ++j) C(i, j) -= m;
    }
    for (int64_t j = 0; j < C.cols; ++j) {
        double m = 0.0;
        for (int64_t i = 0; i < C.rows; ++i) m += C(i, j);
        m /= double(C.rows);
        for (int64_t i = 0; i < C.rows; ++i) C(i, j) -= m;
    }
    const Svd s = svd(C);
    const size_t k = s.S.size();
    for (size_t i = 0; i < std::min<size_t>(k, 96); ++i) r.singular_values.push_back(s.S[i]);
    // the hidden dimension: where consecutive singular values drop the most (the last ones cannot be a gap: the
    // centred matrix has rank at most min(n, c) - 1)
    const double floor = std::max(s.S.empty() ? 0.0 : s.S[0] * 1e-12, std::numeric_limits<double>::min());
    double best = 0.0;
    int d = 0;
    for (size_t i = 0; i + 1 < k && i + 1 < size_t(std::min(C.cols, C.rows) - 1); ++i) {
        const double ratio = std::max(s.S[i], floor) / std::max(s.S[i + 1], floor);
        if (ratio > best) {
            best = ratio;
            d = int(i + 1);
        }
    }
    r.hidden_dim = d;
    r.gap = best;
    // the recovered subspace of R^c: the top `dim` right singular vectors (the architecture, hence the hidden size,
    // is public); the truth: the centred classifier rows
    const int take = int(std::min<size_t>(k, size_t(dim)));
    if (take == 0) return r;
    Mat Vd(C.cols, take);
    for (int64_t j = 0; j < C.cols; ++j)
        for (int i = 0; i < take; ++i) Vd(j, i) = s.V(j, i);
    const std::vector<float>& Wc = base.output();
    Mat T(C.cols, dim);
    for (int64_t j = 0; j < C.cols; ++j)
        for (int c = 0; c < dim; ++c) T(j, c) = double(Wc[size_t(cols[size_t(j)]) * size_t(dim) + size_t(c)]);
    for (int c = 0; c < dim; ++c) {
        double m = 0.0;
        for (int64_t j = 0; j < T.rows; ++j) m += T(j, c);
        m /= double(T.rows);
        for (int64_t j = 0; j < T.rows; ++j) T(j, c) -= m;
    }
    const std::vector<double> pc = principal_cosines(Vd, T);
    double sum = 0.0;
    for (size_t i = 0; i < pc.size() && i < size_t(dim); ++i) sum += pc[i];
    r.subspace_cos = sum / double(dim);
    r.min_cos = pc.size() >= size_t(dim) ? pc[size_t(dim) - 1] : 0.0;
    return r;
}

namespace {

SecureSessionParams api_params(const train::LoraAdapter* adapter, int logprobs, float noise, const SchemeOptions& o) {
    SecureSessionParams p;
    if (o.package && adapter) {
        // S5 as deployed: the adapter from its package, under the package's release policy, unblinded as the
        // options say
        o.package->package(*adapter, o.policy);
        p = o.package->params(*adapter, o.unblinding, o.policy);
    } else {
        p.mode = SecureMode::secureinfer;
        p.lora = adapter;
        p.n_threads = o.threads;
        p.host = o.host;
    }
    p.logprobs = logprobs;
    p.logprob_noise = noise;
    return p;
}

// The public model a session of these options loads: the package's when S5 runs on the package path.
const ModelWeights& api_weights(const ModelWeights& base, const train::LoraAdapter* adapter, const SchemeOptions& o) {
    return o.package && adapter ? o.package->public_weights(*adapter, o.policy) : base;
}

}  // namespace

LastLayerExtraction a6_logprob_queries(const ModelWeights& base, const train::LoraAdapter* adapter,
                                       const std::vector<std::vector<int32_t>>& prompts, int gen, int logprobs,
                                       float logprob_noise, const SchemeOptions& options, std::string* isolation) {
    const int V = base.cfg.vocab_size;
    SecureSession s(api_weights(base, adapter, options), api_params(adapter, logprobs, logprob_noise, options));
    if (isolation) *isolation = s.isolation();
    std::vector<std::vector<double>> rows;  // dense rows over the vocabulary, NaN where not released
    int64_t queries = 0;
    std::vector<TokenLogprob> lp;
    auto collect = [&]() {
        if (lp.empty()) return;
        std::vector<double> row(static_cast<size_t>(V), std::numeric_limits<double>::quiet_NaN());
        for (const TokenLogprob& t : lp)
            if (t.token >= 0 && t.token < V) row[size_t(t.token)] = double(t.logprob);
        rows.push_back(std::move(row));
    };
    for (const auto& pr : prompts) {
        s.reset();
        precompute_steps(s, options, int(pr.size()) + gen);  // the prompt pass and the decode steps after it
        int32_t tok = s.eval_sample(pr, &lp);
        ++queries;
        collect();
        for (int g = 0; g < gen && s.pos() < s.n_ctx(); ++g) {
            const int32_t in[1] = {tok};
            tok = s.eval_sample(in, &lp);
            ++queries;
            collect();
        }
    }
    // the columns known in every row (all of them when K = vocabulary size)
    std::vector<int> cols;
    for (int v = 0; v < V; ++v) {
        bool all = !rows.empty();
        for (const auto& r : rows)
            if (std::isnan(r[size_t(v)])) {
                all = false;
                break;
            }
        if (all) cols.push_back(v);
    }
    Mat Q(int64_t(rows.size()), int64_t(cols.size()));
    for (size_t i = 0; i < rows.size(); ++i)
        for (size_t j = 0; j < cols.size(); ++j) Q(int64_t(i), int64_t(j)) = rows[i][size_t(cols[j])];
    LastLayerExtraction r = analyse_logprob_matrix(Q, cols, base);
    r.queries = queries;
    r.rows = int64_t(rows.size());
    return r;
}

LastLayerExtraction a6_nll_oracle(const ModelWeights& base, const train::LoraAdapter* adapter,
                                  const std::vector<std::vector<int32_t>>& prompts, int cols, uint64_t seed,
                                  const SchemeOptions& options, std::string* isolation) {
    const int V = base.cfg.vocab_size;
    SecureSession s(api_weights(base, adapter, options), api_params(adapter, 0, 0.0f, options));
    if (isolation) *isolation = s.isolation();
    SplitMix rng(seed * 0x2545F4914F6CDD1DULL + 0xA6);
    std::vector<int> perm = random_permutation(V, rng);
    std::vector<int> colset(perm.begin(), perm.begin() + std::min(cols, V));
    std::sort(colset.begin(), colset.end());
    Mat Q(int64_t(prompts.size()), int64_t(colset.size()));
    int64_t queries = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
        const std::vector<int32_t>& prompt = prompts[i];
        std::vector<int32_t> targets(prompt.size(), -1);
        for (size_t j = 0; j < colset.size(); ++j) {
            targets.back() = colset[j];
            s.reset();
            precompute_steps(s, options, int(prompt.size()));
            const auto [sum, count] = s.eval_nll(prompt, targets);
            ++queries;
            Q(int64_t(i), int64_t(j)) = count == 1 ? -sum : std::numeric_limits<double>::quiet_NaN();
        }
    }
    LastLayerExtraction r = analyse_logprob_matrix(Q, colset, base);
    r.queries = queries;
    return r;
}

// ---- A7 ---------------------------------------------------------------------------------------------------------

MembershipSet membership_set(const ModelWeights& base, const train::TextCorpus& priv, const train::TrainOptions& recipe,
                             int per_class, int len, uint64_t seed) {
    if (len < 1 || len > recipe.ctx) fail(Status::invalid_argument, "membership_set: window length out of range");
    train::TrainOptions o = recipe;
    o.threads = 1;
    const train::Trainer tr(base, o, priv);
    // coverage of every training stream by the whole run's windows
    std::vector<std::vector<int32_t>> diff(priv.train.size());
    for (size_t f = 0; f < priv.train.size(); ++f) diff[f].assign(priv.train[f].size() + 1, 0);
    std::vector<std::pair<int, int>> drawn;
    for (int st = 0; st < o.steps; ++st)
        for (int b = 0; b < o.batch; ++b) {
            const auto w = tr.window_origin(st, b);
            diff[w.stream][size_t(w.offset)] += 1;
            diff[w.stream][size_t(w.offset) + size_t(o.ctx)] -= 1;
            drawn.emplace_back(st, b);
        }
    // non-member candidates: non-overlapping windows of len tokens inside uncovered stretches
    std::vector<std::pair<size_t, size_t>> free_windows;
    for (size_t f = 0; f < priv.train.size(); ++f) {
        int32_t cover = 0;
        size_t run = 0;
        for (size_t i = 0; i < priv.train[f].size(); ++i) {
            cover += diff[f][i];
            run = cover == 0 ? run + 1 : 0;
            if (run == size_t(len)) {
                free_windows.emplace_back(f, i + 1 - size_t(len));
                run = 0;
            }
        }
    }
    SplitMix rng(seed * 0xD1B54A32D192ED03ULL + 0xA7);
    const int nm = std::min<int>(per_class, int(free_windows.size()));
    if (nm < per_class) fail(Status::invalid_argument, "membership_set: too few never-trained windows");
    MembershipSet out;
    auto add = [&](size_t f, size_t off, int label) {
        std::vector<int32_t> w = {priv.bos};
        w.insert(w.end(), priv.train[f].begin() + int64_t(off), priv.train[f].begin() + int64_t(off + size_t(len)));
        out.windows.push_back(std::move(w));
        out.labels.push_back(label);
        out.origins.emplace_back(f, off);
    };
    // members: distinct draws of the run, chosen at random
    std::vector<int> pm = random_permutation(int(drawn.size()), rng);
    for (int i = 0; i < per_class; ++i) {
        const auto [st, b] = drawn[size_t(pm[size_t(i)])];
        const auto w = tr.window_origin(st, b);
        add(w.stream, size_t(w.offset), 1);
    }
    std::vector<int> pf = random_permutation(int(free_windows.size()), rng);
    for (int i = 0; i < per_class; ++i) {
        const auto [f, off] = free_windows[size_t(pf[size_t(i)])];
        add(f, off, 0);
    }
    return out;
}

ApiWindowScores api_window_scores(const ModelWeights& base, const train::LoraAdapter* adapter,
                                  const std::vector<std::vector<int32_t>>& windows, int tail, int logprobs,
                                  float logprob_noise, bool nll_oracle, const SchemeOptions& options,
                                  std::string* isolation) {
    SecureSession s(api_weights(base, adapter, options), api_params(adapter, logprobs, logprob_noise, options));
    if (isolation) *isolation = s.isolation();
    ApiWindowScores out;
    std::vector<TokenLogprob> lp;
    for (const auto& ids : windows) {
        const int L = int(ids.size()) - 1;
        if (nll_oracle) {
            s.reset();
            precompute_steps(s, options, L);
            const std::span<const int32_t> all(ids);
            const auto [sum, count] = s.eval_nll(all.first(size_t(L)), all.subspan(1));
            ++out.queries;
            out.nll_oracle.push_back(count ? sum / double(count) : 0.0);
        }
        if (tail <= 0) continue;
        // teacher-forced decoding of the last `tail` targets: feed the true text, read the released token (and
        // log-probabilities) predicted for each next position
        s.reset();
        const int t0 = std::max(0, L - tail);
        precompute_steps(s, options, L);  // the first pass (t0 + 1 positions) and the single-token steps after it
        double agree = 0.0, nll = 0.0;
        for (int t = t0; t < L; ++t) {
            const std::span<const int32_t> in = t == t0 ? std::span<const int32_t>(ids.data(), size_t(t0) + 1)
                                                        : std::span<const int32_t>(ids.data() + t, 1);
            const int32_t tok = s.eval_sample(in, logprobs > 0 ? &lp : nullptr);
            ++out.queries;
            const int32_t target = ids[size_t(t) + 1];
            agree += tok == target ? 1.0 : 0.0;
            if (logprobs > 0) {
                double v = std::numeric_limits<double>::quiet_NaN(), mn = 0.0;
                for (const TokenLogprob& e : lp) {
                    if (e.token == target) v = e.logprob;
                    mn = std::min(mn, double(e.logprob));
                }
                nll += std::isnan(v) ? -mn : -v;
            }
        }
        out.tail_greedy.push_back(agree / double(L - t0));
        if (logprobs > 0) out.tail_nll.push_back(nll / double(L - t0));
    }
    return out;
}

MembershipMetrics membership_metrics(const std::vector<double>& scores, const std::vector<int>& labels) {
    MembershipMetrics m;
    m.auc = roc_auc(scores, labels);
    m.tpr_at_1pct = tpr_at_fpr(scores, labels, 0.01);
    return m;
}

train::TextCorpus corpus_without(const train::TextCorpus& priv, const MembershipSet& set) {
    std::vector<std::vector<std::pair<size_t, size_t>>> cuts(priv.train.size());
    for (size_t i = 0; i < set.origins.size(); ++i)
        cuts[set.origins[i].first].emplace_back(set.origins[i].second, set.origins[i].second + set.windows[i].size() - 1);
    train::TextCorpus out;
    out.bos = priv.bos;
    out.eval = priv.eval;
    for (size_t f = 0; f < priv.train.size(); ++f) {
        auto& c = cuts[f];
        std::sort(c.begin(), c.end());
        size_t at = 0;
        auto keep = [&](size_t from, size_t to) {
            if (to > from + 1) out.train.emplace_back(priv.train[f].begin() + int64_t(from), priv.train[f].begin() + int64_t(to));
        };
        for (const auto& [b, e] : c) {
            if (b > at) keep(at, b);
            at = std::max(at, e);
        }
        keep(at, priv.train[f].size());
    }
    return out;
}

}  // namespace si::attack
