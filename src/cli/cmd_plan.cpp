// plan: the partition of one block (and the model's ends) for a mode: domain, FLOPs, bytes crossing the boundary,
// enclave memory; optionally projected onto SGX hardware with the cost model.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "common/error.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/llama2c.h"
#include "host/plan.h"
#include "host/sgx_cost.h"

namespace si::cli {

namespace {

std::vector<Proj> parse_targets(const std::string& list) {
    std::vector<Proj> out;
    size_t b = 0;
    while (b <= list.size()) {
        const size_t e = std::min(list.find(',', b), list.size());
        const std::string name = list.substr(b, e - b);
        bool found = false;
        for (Proj p : kAllProj)
            if (name == proj_name(p)) out.push_back(p), found = true;
        if (!found) throw UsageError("unknown LoRA target '" + name + "' (valid: q,k,v,o,w1,w2,w3)");
        b = e + 1;
    }
    return out;
}

ModelConfig config_of(const std::string& model) {
    if (looks_like_gguf(model)) return read_gguf_config(gguf::Reader::open(model));
    return load_llama2c(model).cfg;
}

std::string human(double v, const char* unit) {
    const char* prefixes[] = {"", "K", "M", "G", "T"};
    int i = 0;
    while (v >= 1000 && i < 4) v /= 1000, ++i;
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.2f %s%s", v, prefixes[i], unit);
    return buf;
}

}  // namespace

Runner add_plan(CLI::App& app) {
    auto* sub = app.add_subcommand("plan", "show where each op of a block runs: domain, FLOPs, bytes crossing the boundary, enclave memory");
    struct Opts {
        std::string model, shape, mode = "secureinfer", targets = "q,k,v,o,w1,w2,w3", cost_model;
        int tokens = 1, ctx = 0, rank = 0;
        bool offline = false, json = false;
        double enclave_gflops = 20, accel_gflops = 200, host_gflops = 20;
    };
    auto o = std::make_shared<Opts>();
    sub->add_option("-m,--model", o->model, "model file (GGUF or llama2.c)");
    sub->add_option("--shape", o->shape, "or a named shape: stories260k, stories15m, stories110m, tinyllama");
    sub->add_option("--mode", o->mode, "partition preset")->check(CLI::IsMember({"secureinfer", "gpu-only", "enclave-only", "plain"}));
    sub->add_option("-n,--tokens", o->tokens, "tokens per step (1: decode; N: a prefill of N tokens)")->check(CLI::Range(1, 1 << 20));
    sub->add_option("-c,--ctx", o->ctx, "attended positions (0: the model's context)")->check(CLI::Range(0, 1 << 20));
    sub->add_option("--lora-rank", o->rank, "rank of a LoRA adapter held in the enclave (0: none)")->check(CLI::Range(0, 4096));
    sub->add_option("--lora-targets", o->targets, "projections the adapter covers");
    sub->add_flag("--offline", o->offline, "unblinding factors W r precomputed (reported apart)");
    sub->add_option("--cost-model", o->cost_model, "project latency on SGX hardware")->check(CLI::IsMember({"sgx1", "sgx2"}));
    sub->add_option("--enclave-gflops", o->enclave_gflops, "cost model: enclave compute throughput assumed")->check(CLI::PositiveNumber);
    sub->add_option("--accel-gflops", o->accel_gflops, "cost model: accelerator throughput assumed")->check(CLI::PositiveNumber);
    sub->add_flag("--json", o->json, "print JSON instead of a table");
    return [o]() -> int {
        if (o->model.empty() == o->shape.empty()) throw UsageError("give exactly one of --model and --shape");
        const ModelConfig cfg = o->model.empty() ? shape_preset(o->shape) : config_of(o->model);
        PlanParams p;
        p.mode = parse_mode(o->mode);
        p.n_tokens = o->tokens;
        p.n_ctx = o->ctx;
        p.lora_rank = o->rank;
        if (o->rank > 0) p.lora_targets = parse_targets(o->targets);
        p.offline_unblinding = o->offline;
        const Plan plan = make_plan(cfg, p);

        nlohmann::json cost;
        if (!o->cost_model.empty()) {
            const SgxParams sgx = sgx_params(o->cost_model);
            const StepTimes t = estimate_times(plan, o->enclave_gflops, o->accel_gflops, o->host_gflops);
            const SgxProjection pr = project_sgx(plan, t, sgx);
            cost = {{"model", sgx.name}, {"assumed_enclave_gflops", o->enclave_gflops}, {"assumed_accel_gflops", o->accel_gflops},
                    {"compute_s", pr.compute_s}, {"transitions_s", pr.transitions_s}, {"paging_s", pr.paging_s},
                    {"total_s", pr.total_s()}, {"epc_bytes", sgx.epc_bytes}};
        }
        if (o->json) {
            nlohmann::json j;
            j["mode"] = mode_name(p.mode);
            j["tokens"] = p.n_tokens;
            j["ops"] = nlohmann::json::array();
            for (const auto& op : plan.ops)
                j["ops"].push_back({{"op", op.name}, {"domain", domain_name(op.domain)}, {"flops", op.flops},
                                    {"bytes_to_accel", op.bytes_to_accel}, {"bytes_from_accel", op.bytes_from_accel},
                                    {"crossings", op.crossings}, {"per_layer", op.per_layer}});
            j["totals"] = {{"flops_enclave", plan.flops_enclave}, {"flops_accelerator", plan.flops_accel},
                           {"flops_host", plan.flops_host}, {"flops_offline", plan.flops_offline},
                           {"offloaded_share", plan.offloaded_share()}, {"bytes_to_accel", plan.bytes_to_accel},
                           {"bytes_from_accel", plan.bytes_from_accel}, {"crossings", plan.crossings},
                           {"enclave_memory_bytes", plan.enclave_memory}};
            if (!cost.is_null()) j["sgx_projection"] = cost;
            std::printf("%s\n", j.dump(2).c_str());
            return 0;
        }
        std::printf("mode %s, %d token(s) per step, %d attended positions, %d layers%s\n", mode_name(p.mode), p.n_tokens,
                    p.n_ctx > 0 ? p.n_ctx : cfg.seq_len, cfg.n_layers, p.offline_unblinding ? ", offline unblinding" : "");
        std::printf("\n%-26s %-12s %14s %14s %14s\n", "op (per block, then ends)", "domain", "FLOPs", "bytes to acc", "bytes back");
        for (const auto& op : plan.ops)
            std::printf("%-26s %-12s %14s %14s %14s\n", (op.per_layer ? op.name : "[end] " + op.name).c_str(), domain_name(op.domain),
                        human(op.flops, "").c_str(), human(op.bytes_to_accel, "B").c_str(), human(op.bytes_from_accel, "B").c_str());
        std::printf("\ntotal per step: enclave %s, accelerator %s, host %s FLOPs; offloaded %.1f%%\n", human(plan.flops_enclave, "").c_str(),
                    human(plan.flops_accel, "").c_str(), human(plan.flops_host, "").c_str(), 100.0 * plan.offloaded_share());
        if (plan.flops_offline > 0) std::printf("offline (precomputed unblinding) %s FLOPs per step\n", human(plan.flops_offline, "").c_str());
        std::printf("boundary: %d crossings, %s to the accelerator, %s back\n", plan.crossings, human(plan.bytes_to_accel, "B").c_str(),
                    human(plan.bytes_from_accel, "B").c_str());
        std::printf("enclave memory: %s\n", human(plan.enclave_memory, "B").c_str());
        if (!cost.is_null())
            std::printf("\nSGX projection (%s; a model, not a measurement; compute assumed at %.0f / %.0f GFLOP/s enclave / accelerator):\n"
                        "  compute %.3f ms + transitions %.3f ms + EPC paging %.3f ms = %.3f ms per step\n",
                        o->cost_model.c_str(), o->enclave_gflops, o->accel_gflops, cost["compute_s"].get<double>() * 1e3,
                        cost["transitions_s"].get<double>() * 1e3, cost["paging_s"].get<double>() * 1e3, cost["total_s"].get<double>() * 1e3);
        return 0;
    };
}

}  // namespace si::cli
