#include "host/plan.h"

#include "common/error.h"

namespace si {

const char* mode_name(Mode m) {
    switch (m) {
        case Mode::plain: return "plain";
        case Mode::gpu_only: return "gpu-only";
        case Mode::enclave_only: return "enclave-only";
        case Mode::secureinfer: return "secureinfer";
    }
    return "?";
}

Mode parse_mode(const std::string& name) {
    for (Mode m : {Mode::plain, Mode::gpu_only, Mode::enclave_only, Mode::secureinfer})
        if (name == mode_name(m)) return m;
    fail(Status::invalid_argument, "unknown mode '" + name + "' (valid: secureinfer, gpu-only, enclave-only, plain)");
}

const char* domain_name(Domain d) {
    switch (d) {
        case Domain::enclave: return "enclave";
        case Domain::accelerator: return "accelerator";
        case Domain::host: return "host";
    }
    return "?";
}

double Plan::offloaded_share() const {
    const double all = flops_enclave + flops_accel + flops_host;
    return all > 0 ? flops_accel / all : 0.0;
}

Plan make_plan(const ModelConfig& cfg, const PlanParams& p) {
    cfg.validate("plan");
    if (p.n_tokens <= 0) fail(Status::invalid_argument, "plan: token count must be positive");
    Plan plan;
    plan.cfg = cfg;
    plan.params = p;
    const double T = p.n_tokens, d = cfg.dim, h = cfg.hidden_dim, kv = cfg.kv_dim(), V = cfg.vocab_size;
    const double L = cfg.n_layers, ctx = p.n_ctx > 0 ? p.n_ctx : cfg.seq_len;
    const bool plain = p.mode == Mode::plain || p.mode == Mode::gpu_only;
    const bool masked = p.mode == Mode::secureinfer;
    // Where the non-linear work and the secret tensors live.
    const Domain inner = plain ? Domain::host : Domain::enclave;
    // Where the public projections run.
    const Domain proj = p.mode == Mode::enclave_only ? Domain::enclave : (p.mode == Mode::plain ? Domain::host : Domain::accelerator);
    auto has_lora = [&](Proj t) {
        for (Proj x : p.lora_targets)
            if (x == t) return p.lora_rank > 0;
        return false;
    };
    auto lora_flops = [&](std::initializer_list<std::pair<Proj, double>> outs, double in) {
        double f = 0;
        for (auto [t, out] : outs)
            if (has_lora(t)) f += 2 * T * p.lora_rank * (in + out);
        return f;
    };

    // One projection stage: the public product (on `proj`), and in secureinfer mode the enclave's mask, unmask and
    // Freivalds check; online unblinding repeats the product inside the enclave.
    auto stage = [&](const std::string& name, double in, double out, std::initializer_list<std::pair<Proj, double>> lora,
                     bool per_layer = true) {
        const double product = 2 * T * in * out;
        const size_t first = plan.ops.size();
        PlanOp op{name, proj, product, 0, 0, 0, true};
        if (proj == Domain::accelerator) {
            op.bytes_to_accel = 4 * T * in;     // int32 (masked u32 or plain) activations
            op.bytes_from_accel = 4 * T * out;  // int32 results
            op.crossings = 1;
        }
        plan.ops.push_back(op);
        if (masked) {
            plan.ops.push_back({name + ".mask", Domain::enclave, 3 * T * in, 0, 0, 0, true});
            plan.ops.push_back({name + ".unmask+check", Domain::enclave, T * out + 2 * T * (in + out), 0, 0, 0, true});
            if (p.offline_unblinding)
                plan.flops_offline += (per_layer ? L : 1) * product;
            else
                plan.ops.push_back({name + ".unblind (W r)", Domain::enclave, product, 0, 0, 0, true});
        }
        const double lf = lora_flops(lora, in);
        if (lf > 0) plan.ops.push_back({name + ".lora", inner, lf, 0, 0, 0, true});
        for (size_t i = first; i < plan.ops.size(); ++i) plan.ops[i].per_layer = per_layer;
    };

    plan.ops.push_back({"attn_norm", inner, 4 * T * d, 0, 0, 0, true});
    stage("qkv", d, d + 2 * kv, {{Proj::q, d}, {Proj::k, kv}, {Proj::v, kv}});
    plan.ops.push_back({"rope", inner, 3 * T * (d + kv), 0, 0, 0, true});
    // causal attention over ctx positions: scores and weighted sum, 2 FLOPs per multiply-add each, plus softmax
    plan.ops.push_back({"attention", inner, T * (4 * d * ctx + 5 * cfg.n_heads * ctx), 0, 0, 0, true});
    stage("o", d, d, {{Proj::o, d}});
    plan.ops.push_back({"residual+ffn_norm", inner, 5 * T * d, 0, 0, 0, true});
    stage("w1w3", d, 2 * h, {{Proj::w1, h}, {Proj::w3, h}});
    plan.ops.push_back({"swiglu", inner, 6 * T * h, 0, 0, 0, true});
    stage("w2", h, d, {{Proj::w2, d}});
    plan.ops.push_back({"residual", inner, T * d, 0, 0, 0, true});
    // the model's ends: the classifier is a public product like the projections (tied to the embeddings)
    plan.ops.push_back({"embedding", inner, 0, 0, 0, 0, false});
    plan.ops.push_back({"final_norm", inner, 4 * T * d, 0, 0, 0, false});
    stage("classifier", d, V, {}, false);
    plan.ops.push_back({"sampling", inner, 5 * T * V, 0, 0, 0, false});

    for (const auto& op : plan.ops) {
        const double n = op.per_layer ? L : 1;
        (op.domain == Domain::enclave ? plan.flops_enclave : op.domain == Domain::accelerator ? plan.flops_accel : plan.flops_host) += n * op.flops;
        plan.bytes_to_accel += n * op.bytes_to_accel;
        plan.bytes_from_accel += n * op.bytes_from_accel;
        plan.crossings += int(n) * op.crossings;
    }

    // Enclave memory: KV cache, secret tensors (norms, embeddings, adapters), Freivalds keys, per-step scratch;
    // enclave-only (and online unblinding) also keep the int8 projection weights inside.
    if (p.mode != Mode::plain && p.mode != Mode::gpu_only) {
        double mem = 2 * L * ctx * kv * 4;                     // KV cache (f32)
        mem += V * d * 4 + (2 * L + 1) * d * 4;                // embeddings, norms
        double lora_params = 0;
        for (Proj t : p.lora_targets) {
            const double in = (t == Proj::w2) ? h : d;
            const double out = (t == Proj::k || t == Proj::v) ? kv : (t == Proj::w1 || t == Proj::w3) ? h : d;
            lora_params += p.lora_rank * (in + out);
        }
        mem += L * lora_params * 4;
        const double proj_weights = L * (d * (d + 2 * kv) + d * d + 3 * d * h) + V * d;  // int8
        mem += 8 * (L * (d + d + d + h) + d);                  // Freivalds u = s^T W (per input column, 64-bit)
        mem += T * (d + 2 * kv + 2 * h + V) * 4 * 3;           // activations, masks, products
        if (p.mode == Mode::enclave_only || (masked && !p.offline_unblinding)) mem += proj_weights;
        plan.enclave_memory = mem;
    }
    return plan;
}

}  // namespace si
