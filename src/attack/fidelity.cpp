#include "attack/fidelity.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "common/error.h"
#include "engine/engine.h"

namespace si::attack {

namespace {

int32_t argmax(const float* row, int n) {
    int32_t a = 0;
    for (int v = 1; v < n; ++v)
        if (row[v] > row[a]) a = v;
    return a;
}

EngineParams engine_params(int threads) {
    EngineParams p;
    p.n_threads = std::max(1, threads);
    p.weights = WeightFormat::f32;
    return p;
}

}  // namespace

std::vector<std::vector<int32_t>> greedy_continuations(const ModelWeights& w, const std::vector<std::vector<int32_t>>& prompts,
                                                       int gen, int threads) {
    Engine e(w, engine_params(threads));
    std::vector<std::vector<int32_t>> out;
    for (const auto& p : prompts) {
        e.reset();
        std::vector<int32_t> c;
        int32_t t = argmax(e.eval(p), w.cfg.vocab_size);
        for (int i = 0; i < gen; ++i) {
            c.push_back(t);
            if (i + 1 < gen) t = argmax(e.eval(std::span<const int32_t>(&t, 1)), w.cfg.vocab_size);
        }
        out.push_back(std::move(c));
    }
    return out;
}

double corpus_bleu(const std::vector<std::vector<int32_t>>& cand, const std::vector<std::vector<int32_t>>& ref) {
    if (cand.size() != ref.size()) fail(Status::invalid_argument, "BLEU: one reference per candidate");
    double log_p = 0.0;
    int64_t c_len = 0, r_len = 0;
    for (int n = 1; n <= 4; ++n) {
        int64_t match = 0, total = 0;
        for (size_t i = 0; i < cand.size(); ++i) {
            std::map<std::vector<int32_t>, int64_t> rc;
            for (size_t k = 0; k + size_t(n) <= ref[i].size(); ++k)
                ++rc[std::vector<int32_t>(ref[i].begin() + int64_t(k), ref[i].begin() + int64_t(k) + n)];
            for (size_t k = 0; k + size_t(n) <= cand[i].size(); ++k) {
                ++total;
                auto it = rc.find(std::vector<int32_t>(cand[i].begin() + int64_t(k), cand[i].begin() + int64_t(k) + n));
                if (it != rc.end() && it->second > 0) {
                    ++match;
                    --it->second;
                }
            }
        }
        if (total == 0) return 0.0;
        // smoothing method 1 of Chen and Cherry (2014): an order without matches counts 0.1 of a match
        log_p += 0.25 * std::log((match > 0 ? double(match) : 0.1) / double(total));
    }
    for (size_t i = 0; i < cand.size(); ++i) {
        c_len += int64_t(cand[i].size());
        r_len += int64_t(ref[i].size());
    }
    const double bp = c_len >= r_len ? 1.0 : std::exp(1.0 - double(r_len) / double(std::max<int64_t>(c_len, 1)));
    return bp * std::exp(log_p);
}

Fidelity fidelity(const ModelWeights& s, const std::vector<std::vector<int32_t>>& prompts,
                  const std::vector<std::vector<int32_t>>& victim, int threads) {
    if (prompts.size() != victim.size()) fail(Status::invalid_argument, "fidelity: one continuation per prompt");
    Fidelity f;
    Engine e(s, engine_params(threads));
    const int V = s.cfg.vocab_size;
    int64_t agree = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
        e.reset();
        std::vector<int32_t> ids = prompts[i];
        ids.insert(ids.end(), victim[i].begin(), victim[i].end() - 1);
        const float* lg = e.eval(ids, true);
        const size_t p0 = prompts[i].size() - 1;  // the logits after the prompt's last token
        for (size_t k = 0; k < victim[i].size(); ++k) agree += argmax(lg + (p0 + k) * size_t(V), V) == victim[i][k];
        f.tokens += int64_t(victim[i].size());
    }
    f.prompts = int64_t(prompts.size());
    f.token_match = f.tokens ? double(agree) / double(f.tokens) : 0.0;
    int gen = victim.empty() ? 0 : int(victim[0].size());
    f.bleu = corpus_bleu(greedy_continuations(s, prompts, gen, threads), victim);
    return f;
}

}  // namespace si::attack
