// security_report: the suite, and its report.md, report.json and report.svg.
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "attack/eval_internal.h"
#include "attack/experiment.h"

namespace si::attack {

namespace fs = std::filesystem;
using namespace detail;

namespace {

const char* kAttackerModel =
    "The attacker controls everything outside the enclave (DESIGN.md section 1): the host program, the accelerator "
    "and its memory, the disk, and every byte that crosses the enclave boundary, which it records as the boundary "
    "trace (DESIGN.md section 7: the weights uploaded to the accelerator, every masked input and every returned "
    "product). It knows the architecture, the tokenizer and the public base weights (stories260K), may hold public "
    "text, chooses the prompts, and may alter any product the accelerator returns (A8). It does not see inside the "
    "enclave: the adapter, the masks, the unmasked activations. Secrets are used only to score the attacks.";

std::string fmt(double v, int prec = 4) {
    char b[64];
    std::snprintf(b, sizeof b, "%.*f", prec, v);
    return b;
}

// "logprobs=512, noise=0.5" -> "lp512 n0.5": a bar label that fits.
std::string short_variant(const std::string& v) {
    std::string o;
    size_t i = 0;
    while (i < v.size()) {
        size_t j = v.find(", ", i);
        if (j == std::string::npos) j = v.size();
        std::string part = v.substr(i, j - i);
        if (part.rfind("logprobs=", 0) == 0) part = "lp" + part.substr(9);
        else if (part.rfind("noise=", 0) == 0) part = "n" + part.substr(6);
        else if (part == "eval_nll oracle") part = "nll";
        else if (part == "white-box") part = "wb";
        o += (o.empty() ? "" : " ") + part;
        i = j + 2;
    }
    return o;
}

std::string svg_escape(const std::string& s) {
    std::string o;
    for (char c : s) {
        if (c == '<') o += "&lt;";
        else if (c == '>') o += "&gt;";
        else if (c == '&') o += "&amp;";
        else o += c;
    }
    return o;
}

// One panel per attack: a bar per scheme (mean, 95% interval whiskers), the decoy null's prediction band on S5,
// and the attack's threshold as a dashed line. All metrics lie in [0, 1].
std::string render_svg(const std::vector<ExperimentResult>& rs) {
    std::vector<Attack> attacks;
    for (const auto& r : rs)
        if (std::find(attacks.begin(), attacks.end(), r.attack) == attacks.end()) attacks.push_back(r.attack);
    const int pw = 230, ph = 220, left = 40, top = 40, plot_h = 140;
    const int W = int(attacks.size()) * pw + 20, H = ph + 50;
    std::ostringstream o;
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
      << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    o << "<text x=\"10\" y=\"16\" font-size=\"13\" font-weight=\"bold\">secureinfer security evaluation: metric per "
         "scheme (mean, 95% CI; grey band: decoy null on S5; dashed: attack threshold; red: broken)</text>\n";
    for (size_t a = 0; a < attacks.size(); ++a) {
        const int x0 = int(a) * pw + 10;
        std::vector<const ExperimentResult*> col;
        for (const auto& r : rs)
            if (r.attack == attacks[a]) col.push_back(&r);
        const auto y_of = [&](double v) { return top + plot_h - int(std::lround(std::clamp(v, 0.0, 1.0) * plot_h)); };
        o << "<g>\n<text x=\"" << x0 + left << "\" y=\"" << top - 8 << "\" font-weight=\"bold\">" << attack_name(attacks[a])
          << ": " << svg_escape(col.front()->metric) << "</text>\n";
        o << "<line x1=\"" << x0 + left << "\" y1=\"" << top << "\" x2=\"" << x0 + left << "\" y2=\"" << top + plot_h
          << "\" stroke=\"black\"/>\n<line x1=\"" << x0 + left << "\" y1=\"" << top + plot_h << "\" x2=\"" << x0 + pw - 10
          << "\" y2=\"" << top + plot_h << "\" stroke=\"black\"/>\n";
        for (double t : {0.0, 0.5, 1.0})
            o << "<text x=\"" << x0 + left - 4 << "\" y=\"" << y_of(t) + 4 << "\" text-anchor=\"end\">" << fmt(t, 1) << "</text>\n";
        const double thr = col.front()->threshold;
        o << "<line x1=\"" << x0 + left << "\" y1=\"" << y_of(thr) << "\" x2=\"" << x0 + pw - 10 << "\" y2=\"" << y_of(thr)
          << "\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n";
        const int slot = (pw - left - 20) / int(std::max<size_t>(col.size(), 1));
        for (size_t i = 0; i < col.size(); ++i) {
            const ExperimentResult& r = *col[i];
            const int bx = x0 + left + 6 + int(i) * slot, bw = std::max(8, slot - 12);
            if (r.has_null) {
                const int y1 = y_of(r.null_interval.predict_hi), y2 = y_of(r.null_interval.predict_lo);
                o << "<rect x=\"" << bx - 3 << "\" y=\"" << y1 << "\" width=\"" << bw + 6 << "\" height=\"" << std::max(2, y2 - y1)
                  << "\" fill=\"#ccc\"/>\n";
            }
            const int yb = y_of(r.interval.mean);
            o << "<rect x=\"" << bx << "\" y=\"" << yb << "\" width=\"" << bw << "\" height=\"" << top + plot_h - yb
              << "\" fill=\"" << (r.broken ? "#d62728" : "#2ca02c") << "\" fill-opacity=\"0.8\"/>\n";
            const int yl = y_of(r.interval.lo), yh = y_of(r.interval.hi), cx = bx + bw / 2;
            o << "<line x1=\"" << cx << "\" y1=\"" << yl << "\" x2=\"" << cx << "\" y2=\"" << yh << "\" stroke=\"black\"/>\n";
            o << "<text x=\"" << cx << "\" y=\"" << top + plot_h + 14 << "\" text-anchor=\"middle\">" << scheme_name(r.scheme)
              << "</text>\n<text x=\"" << cx << "\" y=\"" << top + plot_h + 28 << "\" text-anchor=\"middle\" font-size=\"9\">"
              << fmt(r.interval.mean, 3) << "</text>\n";
            if (!r.variant.empty())
                o << "<text x=\"" << cx << "\" y=\"" << top + plot_h + 40 << "\" text-anchor=\"middle\" font-size=\"7\">"
                  << svg_escape(short_variant(r.variant)) << "</text>\n";
        }
        o << "</g>\n";
    }
    o << "</svg>\n";
    return o.str();
}

}  // namespace

std::vector<ExperimentResult> security_report(EvalContext& ctx, const std::string& out_dir, const std::string& command) {
    const auto t0 = std::chrono::steady_clock::now();
    fs::create_directories(out_dir);
    // (scheme, attack, positive control: the attack must break the scheme, variant, informative). A2 on S2 is
    // informative: float masks keep the adapter out of the products (A4 is what breaks S2). A6's control is an API
    // releasing exact log-probabilities; its noisy and perplexity-oracle variants, and A7's variants other than S5's
    // default API, are informative.
    struct Planned {
        Scheme s;
        Attack a;
        bool control;
        AttackVariant v = {};
        bool informative = false;
    };
    AttackVariant lp, lp_noise, oracle, white, inside, sealed, overfit, weak;
    weak.weak = true;
    inside.unblinding = Unblinding::precomputed_inside;
    sealed.unblinding = Unblinding::precomputed_sealed;
    overfit.overfit = true;
    lp.logprobs = -1;
    lp_noise.logprobs = -1;
    lp_noise.logprob_noise = kA6Noise;
    oracle.nll_oracle = true;
    white.white_box = true;
    // S5 runs every attack on the package path in both unblinding modes: online and precomputed (factors kept
    // inside the core, or sealed outside); its controls and informative variants run once, online.
    const std::vector<Planned> plan = {
        {Scheme::s1, Attack::a1, true},  {Scheme::s0, Attack::a1, true},  {Scheme::s5, Attack::a1, false},
        {Scheme::s0, Attack::a2, true},  {Scheme::s1, Attack::a2, true},  {Scheme::s2, Attack::a2, false, {}, true},
        {Scheme::s5, Attack::a1, false, inside}, {Scheme::s5, Attack::a1, false, sealed},
        {Scheme::s5, Attack::a2, false}, {Scheme::s5, Attack::a2, false, inside}, {Scheme::s5, Attack::a2, false, sealed},
        {Scheme::s3, Attack::a3, true},  {Scheme::s5, Attack::a3, false},
        {Scheme::s5, Attack::a3, false, inside}, {Scheme::s5, Attack::a3, false, sealed},
        {Scheme::s2, Attack::a4, true},  {Scheme::s5, Attack::a4, false},
        {Scheme::s5, Attack::a4, false, inside}, {Scheme::s5, Attack::a4, false, sealed},
        {Scheme::s0, Attack::a5, true},  {Scheme::s1, Attack::a5, true},  {Scheme::s5, Attack::a5, false},
        {Scheme::s5, Attack::a5, false, inside}, {Scheme::s5, Attack::a5, false, sealed},
        {Scheme::s5, Attack::a6, true, lp},
        {Scheme::s5, Attack::a6, false, lp_noise, true}, {Scheme::s5, Attack::a6, false, oracle, true},
        {Scheme::s5, Attack::a6, false}, {Scheme::s5, Attack::a6, false, inside}, {Scheme::s5, Attack::a6, false, sealed},
        {Scheme::s0, Attack::a7, false, white, true},
        {Scheme::s5, Attack::a7, false, oracle, true}, {Scheme::s5, Attack::a7, false, lp, true},
        {Scheme::s5, Attack::a7, true, overfit}, {Scheme::s5, Attack::a7, false},
        {Scheme::s5, Attack::a7, false, inside}, {Scheme::s5, Attack::a7, false, sealed},
        {Scheme::s3, Attack::a8, true},  {Scheme::s5, Attack::a8, false},
        {Scheme::s5, Attack::a8, false, inside}, {Scheme::s5, Attack::a8, false, sealed},
        {Scheme::s5, Attack::a9, true, weak},  {Scheme::s5, Attack::a9, false},
        {Scheme::s5, Attack::a9, false, inside}, {Scheme::s5, Attack::a9, false, sealed},
        {Scheme::s5, Attack::a10, true, weak}, {Scheme::s5, Attack::a10, false},
        {Scheme::s5, Attack::a10, false, inside}, {Scheme::s5, Attack::a10, false, sealed},
        {Scheme::s5, Attack::a11, true, weak}, {Scheme::s5, Attack::a11, false},
        {Scheme::s5, Attack::a11, false, inside}, {Scheme::s5, Attack::a11, false, sealed},
        {Scheme::s5, Attack::a12, true, weak}, {Scheme::s5, Attack::a12, false},
        {Scheme::s5, Attack::a12, false, inside}, {Scheme::s5, Attack::a12, false, sealed},
        {Scheme::s5, Attack::a13, true, weak}, {Scheme::s5, Attack::a13, false},
        {Scheme::s5, Attack::a13, false, inside}, {Scheme::s5, Attack::a13, false, sealed},
    };
    // The claims about S5 compared with a decoy null share one level (Bonferroni).
    int family = 0;
    for (const auto& p : plan)
        family += p.s == Scheme::s5 && !p.control && !p.informative && p.a != Attack::a8 && !is_active(p.a);
    ctx.set_family(family);
    std::vector<ExperimentResult> rs;
    for (const auto& p : plan) {
        if (ctx.config().progress)
            ctx.config().progress(int(rs.size()), int(plan.size()),
                                  std::string(attack_name(p.a)) + " on " + scheme_name(p.s));
        rs.push_back(run_experiment(ctx, p.s, p.a, p.v));
        rs.back().control = p.control;
        rs.back().informative = p.informative;
        const auto& r = rs.back();
        if (ctx.config().verbose)
            std::fprintf(stderr, "attack: %s on %s%s: %s %.4f [%.4f, %.4f] -> %s (%.1f s)\n", attack_name(p.a),
                         scheme_name(p.s), r.variant.empty() ? "" : (" [" + r.variant + "]").c_str(), r.metric.c_str(),
                         r.interval.mean, r.interval.lo, r.interval.hi, r.verdict().c_str(), r.seconds);
    }
    if (ctx.config().progress) ctx.config().progress(int(rs.size()), int(plan.size()), "");
    const double total = seconds_since(t0);
    std::string isolation;
    for (const auto& r : rs)
        if (r.scheme == Scheme::s5 && !r.isolation.empty() && !is_active(r.attack)) isolation = r.isolation;
    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));

    nlohmann::json j;
    j["command"] = command;
    j["date"] = date;
    j["quick"] = ctx.config().quick;
    j["seeds"] = ctx.config().seeds;
    j["build"] = {{"enclave_host", isolation},
                  {"compiler", __VERSION__},
                  {"schemes_S0_S3", "simulated on the trusted core's staged forward pass (src/attack/schemes.cpp)"}};
    j["attacker_model"] = kAttackerModel;
    j["model"] = ctx.config().model;
    j["victim_adapter"] = ctx.config().victim_adapter;
    j["decoys"] = "LoRA adapters of the victim's rank, trained on TinyStories with the project's trainer, one per seed";
    j["seconds"] = total;
    j["entries"] = nlohmann::json::array();
    for (const auto& r : rs) j["entries"].push_back(result_json(r));
    {
        std::ofstream f(out_dir + "/report.json");
        f << j.dump(2) << "\n";
    }
    {
        std::ofstream f(out_dir + "/report.svg");
        f << render_svg(rs);
    }
    std::ostringstream md;
    md << "# secureinfer security report\n\n";
    md << "- command: `" << command << "`\n- date: " << date << "\n- build: enclave host for S5: **" << isolation
       << "**; S0-S3 simulated on the trusted core's staged forward pass\n- model: `" << ctx.config().model
       << "`; victim adapter: `" << ctx.config().victim_adapter << "`\n- seeds: " << ctx.config().seeds
       << (ctx.config().quick ? " (quick)" : "") << "; total time " << fmt(total, 1) << " s (decoy training "
       << fmt(ctx.decoy_seconds(), 1) << " s)\n\n";
    md << "## Attacker model\n\n" << kAttackerModel << "\n\n";
    md << "## Results\n\nThe null is the same attack on S5 (A7: on the same scheme) serving a decoy adapter (trained "
          "separately, on TinyStories), scored against the victim's secret; its 95% prediction interval is shown. Weak "
          "schemes are positive controls: the attack must break them (A6: an API releasing exact log-probabilities). "
          "Informative entries (other API settings, the perplexity feature as an oracle, white-box membership) are "
          "reported but are no claim about S5's default API. A5: L = (PPL_blackbox - PPL_surrogate) / (PPL_blackbox - "
          "PPL_victim) on Persuasion, surrogate and black-box fine-tuned on the same 1% of the private corpus. "
          "S5 is the production package path (package, keyserver, registered device, worker) in every attack, with "
          "online and with precomputed unblinding (factors kept inside the core, or sealed outside), under the "
          "release policy in its column: the owner's default (tokens only), or a permissive package (log-probabilities "
          "of the whole vocabulary, NLL) for the variants that query those outputs. Paired: the one-sided paired t "
          "test that the victim leaks more than the decoy, seed by seed (A1, A2: seed by seed and crossing slot by "
          "crossing slot), at the shared level alpha / family = "
       << fmt(ctx.config().alpha, 2) << " / " << ctx.config().family << ". Observed: matrices / rows / features / "
          "queries summed over the seeds; an entry that observed nothing did not run, which fails the suite.\n\n";
    md << "| scheme | attack | metric | mean | 95% CI | decoy null (95% PI) | paired p | observed | verdict | control | "
          "release policy | time |\n";
    md << "|---|---|---|---:|---|---|---:|---|---|---|---|---:|\n";
    for (const auto& r : rs) {
        md << "| " << scheme_name(r.scheme) << (r.variant.empty() ? "" : " (" + r.variant + ")") << " | "
           << attack_name(r.attack) << " | " << r.metric << " | " << fmt(r.interval.mean) << " | [" << fmt(r.interval.lo)
           << ", " << fmt(r.interval.hi) << "] | "
           << (r.has_null ? "[" + fmt(r.null_interval.predict_lo) + ", " + fmt(r.null_interval.predict_hi) + "]" : "–")
           << " | " << (r.has_null ? fmt(r.paired.p, 4) : "–") << " | " << r.obs.matrices << " / " << r.obs.rows << " / "
           << r.obs.features << " / " << r.obs.queries << " | **" << r.verdict() << "** | " << (r.control ? "yes" : r.informative ? "no (informative)" : "no") << " | "
           << r.policy << " | " << fmt(r.seconds, 1) << " s |\n";
    }
    // The research's fidelity metrics beside ours: A5's surrogates and the black-box baseline against the victim.
    {
        nlohmann::json rm = nlohmann::json::array();
        md << "\n## Surrogate fidelity (the research's metrics)\n\nGreedy token match (teacher-forced on the victim's "
              "greedy continuation) and corpus BLEU-4 (token ids) of free-running greedy continuations against the "
              "victim's, 32 tokens after held-out Persuasion prompts of 32 tokens; mean over seeds. The research reports "
              "surrogate BLEU below 0.12 and token match at most 56.4% for its scheme.\n\n";
        md << "| surrogate | token match | BLEU | prompts |\n|---|---:|---:|---:|\n";
        bool baseline = false;
        for (const auto& r : rs) {
            if (r.attack != Attack::a5 || !r.extra.contains("victim")) continue;
            double tm = 0, bl = 0, tmb = 0, blb = 0;
            int n = 0;
            int64_t prompts = 0;
            for (const auto& e : r.extra["victim"]) {
                if (!e.contains("token_match_surrogate")) continue;
                tm += e["token_match_surrogate"].get<double>();
                bl += e["bleu_surrogate"].get<double>();
                tmb += e["token_match_blackbox"].get<double>();
                blb += e["bleu_blackbox"].get<double>();
                prompts = e["fidelity_prompts"].get<int64_t>();
                ++n;
            }
            if (n == 0) continue;
            if (!baseline) {
                md << "| black-box baseline (public base + the same budget) | " << fmt(100.0 * tmb / n, 1) << "% | "
                   << fmt(blb / n, 3) << " | " << prompts << " |\n";
                rm.push_back({{"surrogate", "black-box"}, {"token_match", tmb / n}, {"bleu", blb / n}});
                baseline = true;
            }
            md << "| " << scheme_name(r.scheme) << " (" << scheme_description(r.scheme) << ") | " << fmt(100.0 * tm / n, 1)
               << "% | " << fmt(bl / n, 3) << " | " << prompts << " |\n";
            rm.push_back({{"surrogate", scheme_name(r.scheme)}, {"token_match", tm / n}, {"bleu", bl / n}});
        }
        j["research_metrics"] = rm;
        std::ofstream f(out_dir + "/report.json");
        f << j.dump(2) << "\n";
    }
    md << "\n## Details per experiment\n\n";
    for (const auto& r : rs) {
        md << "- **" << attack_name(r.attack) << " on " << scheme_name(r.scheme)
           << (r.variant.empty() ? "" : " (" + r.variant + ")") << "** (" << scheme_description(r.scheme)
           << "; " << attack_description(r.attack) << "): per seed `" << r.extra.dump() << "`\n";
    }
    md << "\nPlot: report.svg. Machine-readable: report.json.\n";
    {
        std::ofstream f(out_dir + "/report.md");
        f << md.str();
    }
    return rs;
}

}  // namespace si::attack
