// attack and security-report: the security evaluation of DESIGN.md section 8 (src/attack). `attack` runs one attack
// against one scheme over seeds (with the decoy null on S5); `security-report` runs the suite and writes report.md,
// report.json and report.svg.
#include <cstdio>
#include <filesystem>

#include "attack/experiment.h"
#include "cli/cli.h"
#include "cli/progress.h"
#include "common/error.h"

namespace si::cli {

namespace {

struct AttackCliOptions {
    std::string model = "../shared/models/stories260K.bin", tokenizer = "../shared/models/tok512.bin";
    std::string lora = "adapters/austen-r8.gguf", shared = "../shared", work, out = "security-report", json;
    std::string scheme, attack, host = "worker", unblinding = "online";
    // 0: the defaults (seeds: 3 for attack and the quick suite, 5 for the full suite; trials: 300 quick, 1000 full)
    int seeds = 0, threads = 1, trials = 0;
    bool quick = false, keep = false, quiet = false;
    attack::AttackVariant variant;
};

void add_common(CLI::App* sub, AttackCliOptions& o) {
    sub->add_option("-m,--model", o.model, "public base model (default ../shared/models/stories260K.bin)");
    sub->add_option("--tokenizer", o.tokenizer, "tokenizer.bin for llama2.c checkpoints");
    sub->add_option("--lora", o.lora, "the victim's private LoRA adapter (default adapters/austen-r8.gguf)");
    sub->add_option("--shared", o.shared, "directory of the shared data (default ../shared)");
    sub->add_option("--seeds", o.seeds, "seeds per experiment (default 3; the full security-report 5)")
        ->check(CLI::Range(1, 100));
    sub->add_option("--trials", o.trials, "A8: tampering trials in all, split over the seeds (default 1000; --quick 300)")
        ->check(CLI::Range(1, 1000000));
    sub->add_option("-t,--threads", o.threads, "threads for the sessions and decoy training")->check(CLI::Range(0, 1024));
    sub->add_option("--work-dir", o.work, "where traces and decoys go (default: a temporary directory)");
    sub->add_option("--host", o.host, "S5 enclave host: worker (default; a missing worker is an error), auto (the "
                                       "worker, else an in-process core) or inprocess");
    sub->add_flag("--quick", o.quick, "smaller experiments (the CI suite)");
    sub->add_flag("--keep-traces", o.keep, "keep the boundary traces in the work directory");
    sub->add_flag("-q,--quiet", o.quiet, "no progress on stderr");
}

attack::EvalConfig make_config(const AttackCliOptions& o) {
    attack::EvalConfig c;
    c.model = o.model;
    c.tokenizer = o.tokenizer;
    c.victim_adapter = o.lora;
    c.shared_dir = o.shared;
    c.work_dir = o.work;
    c.quick = o.quick;
    c.seeds = o.seeds;
    c.threads = o.threads;
    c.a8_trials = o.trials > 0 ? o.trials : o.quick ? 300 : 1000;
    c.keep_traces = o.keep;
    c.verbose = !o.quiet;
    if (o.host == "auto")
        c.host = EnclaveHostKind::automatic;
    else if (o.host == "worker")
        c.host = EnclaveHostKind::worker;
    else if (o.host == "inprocess")
        c.host = EnclaveHostKind::inprocess;
    else
        throw UsageError("--host must be auto, worker or inprocess");
    return c;
}

std::string join_args(const std::string& name, const AttackCliOptions& o) {
    std::string s = "secureinfer " + name;
    if (!o.scheme.empty()) s += " --scheme " + o.scheme;
    if (!o.attack.empty()) s += " --attack " + o.attack;
    if (o.variant.logprobs != 0) s += " --logprobs " + std::to_string(o.variant.logprobs);
    if (o.variant.logprob_noise > 0.0f) s += " --logprob-noise " + std::to_string(o.variant.logprob_noise);
    if (o.variant.nll_oracle) s += " --nll-oracle";
    if (o.variant.white_box) s += " --white-box";
    if (o.quick) s += " --quick";
    s += " --seeds " + std::to_string(o.seeds);
    return s;
}

}  // namespace

Runner add_attack(CLI::App& app) {
    auto* sub = app.add_subcommand("attack", "run one model-extraction attack against one scheme (security evaluation)");
    auto o = std::make_shared<AttackCliOptions>();
    sub->add_option("--scheme", o->scheme, "S0 plaintext, S1 permutation+scaling, S2 float masks, S3 static masks, S5 secureinfer")
        ->required();
    sub->add_option("--attack", o->attack,
                    "A1 weight alignment, A2 regression, A3 mask hygiene, A4 distinguisher, A5 surrogate fine-tuning, "
                    "A6 log-probability extraction, A7 membership inference, A8 tampering, A9 chosen public weights, A10 sampler "
                    "oracle, A11 forged attestation, A12 device credentials, A13 replayed sealed data")
        ->required();
    sub->add_option("--logprobs", o->variant.logprobs,
                    "A6/A7: top-K log-probabilities the S5 session releases (0: off, the default; -1: the vocabulary)")
        ->check(CLI::Range(-1, 1 << 20));
    sub->add_option("--logprob-noise", o->variant.logprob_noise, "A6/A7: standard deviation of their Gaussian perturbation")
        ->check(CLI::Range(0.0f, 100.0f));
    sub->add_flag("--nll-oracle", o->variant.nll_oracle, "A6/A7: query the perplexity feature (eval_nll) instead");
    sub->add_flag("--white-box", o->variant.white_box, "A7: score with the weights the scheme's trace exposes");
    sub->add_flag("--control", o->variant.weak,
                  "A9-A13: attack the positive control (the weak variant the defence removes) instead of S5");
    sub->add_flag("--overfit-control", o->variant.overfit,
                  "A7 on S5: serve an adapter over-fitted on 8 member windows (the attack's positive control)");
    sub->add_option("--unblinding", o->unblinding,
                    "S5 on the package path (A1-A13): online (default), inside (precomputed, kept in the core) or "
                    "sealed (precomputed, sealed to host memory)");
    sub->add_option("--json", o->json, "also write the result as JSON to this file");
    add_common(sub, *o);
    return [o]() -> int {
        const auto scheme = attack::parse_scheme(o->scheme);
        if (!scheme) throw UsageError("unknown --scheme '" + o->scheme + "' (S0, S1, S2, S3 or S5)");
        const auto atk = attack::parse_attack(o->attack);
        if (!atk) throw UsageError("unknown --attack '" + o->attack + "' (A1 to A13)");
        if (o->variant.weak && !attack::is_active(*atk)) throw UsageError("--control applies to A9-A13 only");
        if (o->unblinding == "inside")
            o->variant.unblinding = attack::Unblinding::precomputed_inside;
        else if (o->unblinding == "sealed")
            o->variant.unblinding = attack::Unblinding::precomputed_sealed;
        else if (o->unblinding != "online")
            throw UsageError("--unblinding must be online, inside or sealed");
        if (o->seeds == 0) o->seeds = 3;
        attack::EvalContext ctx(make_config(*o));
        const attack::ExperimentResult r = attack::run_experiment(ctx, *scheme, *atk, o->variant);
        std::printf("%s on %s%s (%s)\n", attack::attack_name(r.attack), attack::scheme_name(r.scheme),
                    r.variant.empty() ? "" : (" [" + r.variant + "]").c_str(), attack::scheme_description(r.scheme));
        std::printf("  enclave host: %s\n", r.isolation.c_str());
        std::printf("  %s per seed:", r.metric.c_str());
        for (double v : r.values) std::printf(" %.4f", v);
        std::printf("\n  mean %.4f, 95%% CI [%.4f, %.4f]\n", r.interval.mean, r.interval.lo, r.interval.hi);
        if (r.has_null) {
            std::printf("  decoy null per seed:");
            for (double v : r.null_values) std::printf(" %.4f", v);
            std::printf("\n  null mean %.4f, 95%% prediction interval [%.4f, %.4f]\n", r.null_interval.mean,
                        r.null_interval.predict_lo, r.null_interval.predict_hi);
        }
        std::printf("  observed: %s\n", r.obs.json().dump().c_str());
        if (r.has_null)
            std::printf("  paired (victim leaks more than decoy): mean difference %.4g, t %.3g, one-sided p %.4g (level %.4g)\n",
                        r.paired.mean_diff, r.paired.t, r.paired.p, r.level);
        std::printf("  details: %s\n  verdict: %s (%.1f s)\n", r.extra.dump().c_str(), r.verdict().c_str(), r.seconds);
        if (!o->json.empty()) {
            std::FILE* f = std::fopen(o->json.c_str(), "w");
            if (!f) throw si::Error(Status::io, o->json + ": cannot open for writing");
            const std::string s = attack::result_json(r).dump(2) + "\n";
            std::fwrite(s.data(), 1, s.size(), f);
            std::fclose(f);
        }
        if (!r.ran) {
            std::fprintf(stderr, "secureinfer: error: the attack observed nothing (did not run)\n");
            return kExitFailure;
        }
        return 0;
    };
}

Runner add_security_report(CLI::App& app) {
    auto* sub = app.add_subcommand("security-report", "run the security evaluation suite; write report.md, report.json, report.svg");
    auto o = std::make_shared<AttackCliOptions>();
    sub->add_option("-o,--output", o->out, "output directory (default security-report)");
    add_common(sub, *o);
    return [o]() -> int {
        if (o->seeds == 0) o->seeds = o->quick ? 3 : 5;
        attack::EvalConfig cfg = make_config(*o);
        Progress bar("security-report", 0, "experiments", o->quiet ? ProgressStyle::quiet : progress_style());
        cfg.progress = [&](int done, int total, const std::string& next) {
            bar.set_total(total);
            if (done < total) bar.update(done, next);
            else bar.finish();
        };
        attack::EvalContext ctx(cfg);
        const auto rs = attack::security_report(ctx, o->out, join_args("security-report", *o));
        int broken_s5 = 0, not_run = 0;
        bool control_failed = false;
        for (const auto& r : rs) {
            std::printf("%-3s %-3s %-18s %.4f [%.4f, %.4f]  %s%s%s\n", attack::scheme_name(r.scheme),
                        attack::attack_name(r.attack), r.metric.c_str(), r.interval.mean, r.interval.lo, r.interval.hi,
                        r.verdict().c_str(), r.control ? " (positive control)" : r.informative ? " (informative)" : "",
                        r.variant.empty() ? "" : ("  [" + r.variant + "]").c_str());
            // S5 counts in its default configuration (tokens only); a control on S5 (A6 with exact log-probabilities
            // released) must be broken, and informative entries count for neither.
            if (r.scheme == attack::Scheme::s5 && r.broken && !r.control && !r.informative) ++broken_s5;
            if (r.control && !r.broken) control_failed = true;
            if (!r.ran) ++not_run;
        }
        std::printf("wrote %s/report.md, report.json, report.svg\n", o->out.c_str());
        // Exit status 1 when an attack broke S5, or failed its positive control (the evaluation then does not
        // establish what it claims).
        if (not_run > 0) {
            std::fprintf(stderr, "secureinfer: error: %d experiment(s) observed nothing (did not run)\n", not_run);
            return kExitFailure;
        }
        if (broken_s5 > 0) {
            std::fprintf(stderr, "secureinfer: error: %d attack(s) broke S5\n", broken_s5);
            return kExitFailure;
        }
        if (control_failed) {
            std::fprintf(stderr, "secureinfer: error: a positive control was not broken\n");
            return kExitFailure;
        }
        return 0;
    };
}

}  // namespace si::cli
