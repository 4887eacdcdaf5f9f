// A9-A13 in the suite: one run against S5 on the package path (its keyserver, registered device and the owner's
// default policy), or against the attack's positive control (attack/active.h). What each observed goes into the
// entry like the passive attacks' counts; an entry that observed nothing did not run.
#include <chrono>
#include <cstdio>

#include "attack/active.h"
#include "attack/eval_internal.h"
#include "attack/experiment.h"
#include "common/error.h"

namespace si::attack {

using namespace detail;

ExperimentResult run_active_experiment(EvalContext& ctx, Attack attack, const AttackVariant& variant) {
    const auto t0 = std::chrono::steady_clock::now();
    ExperimentResult r;
    r.scheme = Scheme::s5;
    r.attack = attack;
    r.variant = variant.label();
    r.control = variant.weak;
    attack_metric(attack, r);
    const auto pk = ctx.package_path();
    PackagePath* target = variant.weak ? nullptr : pk.get();
    const EnclaveHostKind host = ctx.config().host;
    const int threads = ctx.config().threads;
    // S5's sessions unblind as the variant says (the controls have no package: online)
    const Unblinding u = variant.unblinding;
    ActiveResult a;
    double value = 0.0;
    switch (attack) {
        case Attack::a9:
            a = a9_chosen_weights(ctx.base(), ctx.victim(), target, host, threads, u);
            value = a.update_cosine;
            // S5: any altered tensor the core takes breaks the defence, whatever the read-out then gives
            r.broken = a.broken || (!variant.weak && a.accepted > 0);
            break;
        case Attack::a10:
            a = a10_sampler_oracle(ctx.base(), ctx.victim(), target, host, threads, u);
            value = a.gap_error;
            r.broken = a.broken;
            break;
        case Attack::a11:
            a = a11_forged_quote(*pk, ctx.victim(), variant.weak, u);
            value = a.key_recovered ? 1.0 : 0.0;
            r.broken = a.key_recovered || (!variant.weak && a.accepted > 0);
            break;
        case Attack::a12:
            a = a12_read_credentials(*pk, ctx.victim(), variant.weak, u);
            value = a.key_recovered ? 1.0 : 0.0;
            r.broken = a.key_recovered || (!variant.weak && a.details.value("read_device_secret", false));
            break;
        case Attack::a13:
            a = a13_replay_sealed(*pk, ctx.victim(), ctx.decoy(0), variant.weak, u);
            value = a.attempts ? double(a.accepted) / double(a.attempts) : 0.0;
            r.broken = a.accepted > 0;
            break;
        default: fail(Status::invalid_argument, "not an active attack");
    }
    r.values = {value};
    r.interval = t_interval(r.values);
    r.obs.queries = a.attempts + a.queries;
    r.obs.rows = a.attempts;
    r.obs.required = {"queries", "rows"};
    r.ran = r.obs.ran();
    r.policy = variant.weak ? "-" : release_policy_name(ReleasePolicy::owner_default);
    r.isolation = variant.weak ? "control: " + std::string(attack_name(attack)) + "'s weak variant (attack/active.h)"
                               : ctx.package_path()->host() == EnclaveHostKind::inprocess
                                   ? "in-process core (package path)"
                                   : "worker process (package path)";
    nlohmann::json d = a.details;
    d["attempts_made"] = a.attempts;
    d["attempts_accepted"] = a.accepted;
    d["model_queries"] = a.queries;
    d["update_cosine"] = a.update_cosine;
    d["gap_error_nats"] = a.gap_error;
    d["key_recovered"] = a.key_recovered;
    d["observations"] = r.obs.json();
    r.extra = {{"victim", nlohmann::json::array({d})}};
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

}  // namespace si::attack
