// Partition plans and the SGX cost model: the counts follow from the design (four crossings per block plus the
// classifier, what each preset keeps where) and the projections respond to the published parameters.
#include <gtest/gtest.h>

#include "common/error.h"
#include "engine/random_model.h"
#include "host/plan.h"
#include "host/sgx_cost.h"

using namespace si;

TEST(Plan, SecureinferDecodeOnStories110m) {
    const ModelConfig c = shape_preset("stories110m");
    PlanParams p;
    p.offline_unblinding = true;
    p.n_ctx = 128;  // the decode benchmark's context; attention (in the enclave) grows with it
    const Plan plan = make_plan(c, p);
    EXPECT_EQ(plan.crossings, 4 * c.n_layers + 1);  // qkv, o, w1w3, w2 per block + classifier
    // every byte crossing is an int32 activation or result of one token
    const double d = c.dim, h = c.hidden_dim, V = c.vocab_size, L = c.n_layers;
    EXPECT_DOUBLE_EQ(plan.bytes_to_accel, 4 * (L * (d + d + d + h) + d));
    EXPECT_DOUBLE_EQ(plan.bytes_from_accel, 4 * (L * (3 * d + d + 2 * h + d) + V));
    EXPECT_GE(plan.offloaded_share(), 0.95) << plan.offloaded_share();
    EXPECT_GT(plan.flops_offline, 0.0);
    // online unblinding repeats every product inside the enclave: about half the work stays in
    p.offline_unblinding = false;
    const Plan online = make_plan(c, p);
    EXPECT_NEAR(online.offloaded_share(), 0.5, 0.05);
    EXPECT_GT(online.enclave_memory, plan.enclave_memory);  // it keeps the int8 weights inside
}

TEST(Plan, PresetsPlaceWorkWhereTheDesignSays) {
    const ModelConfig c = shape_preset("stories260k");
    PlanParams p;
    p.mode = Mode::gpu_only;
    const Plan gpu = make_plan(c, p);
    EXPECT_EQ(gpu.flops_enclave, 0.0);
    EXPECT_EQ(gpu.enclave_memory, 0.0);
    p.mode = Mode::enclave_only;
    const Plan encl = make_plan(c, p);
    EXPECT_EQ(encl.flops_accel, 0.0);
    EXPECT_EQ(encl.crossings, 0);
    EXPECT_DOUBLE_EQ(encl.flops_enclave, gpu.flops_accel + gpu.flops_host);  // same work, all inside
    p.mode = Mode::secureinfer;
    p.lora_rank = 8;
    p.lora_targets = {Proj::q, Proj::v};
    const Plan lora = make_plan(c, p);
    bool has_lora_op = false;
    for (const auto& op : lora.ops)
        if (op.name.find(".lora") != std::string::npos) {
            has_lora_op = true;
            EXPECT_EQ(op.domain, Domain::enclave) << op.name;
        }
    EXPECT_TRUE(has_lora_op);
    EXPECT_THROW(parse_mode("cloud"), Error);
}

TEST(SgxCost, TransitionsAndPaging) {
    const ModelConfig c = shape_preset("tinyllama");
    PlanParams p;
    p.mode = Mode::enclave_only;
    const Plan encl = make_plan(c, p);
    p.mode = Mode::secureinfer;
    p.offline_unblinding = true;
    const Plan sec = make_plan(c, p);
    const StepTimes zero{};
    const auto sgx1_encl = project_sgx(encl, zero, sgx_params("sgx1"));
    const auto sgx2_encl = project_sgx(encl, zero, sgx_params("sgx2"));
    EXPECT_GT(sgx1_encl.paging_s, 0.0);   // 1.1B int8 weights do not fit 93 MiB of EPC
    EXPECT_EQ(sgx2_encl.paging_s, 0.0);   // they fit SGX2's EPC
    const auto sgx1_sec = project_sgx(sec, zero, sgx_params("sgx1"));
    EXPECT_NEAR(sgx1_sec.transitions_s, sec.crossings * 13000 / 3e9, 1e-12);
    EXPECT_THROW(sgx_params("tdx"), Error);
}

// Factors kept inside the enclave: only what of the store does not fit the EPC beside the rest is paged, one step's
// share (one unit per crossing) at a time.
TEST(SgxCost, KeptFactorsPageTheirStepShareWhenTheStoreOverflows) {
    PlanParams p;
    p.mode = Mode::secureinfer;
    p.offline_unblinding = true;
    Plan plan = make_plan(shape_preset("stories15m"), p);
    const StepTimes zero{};
    const SgxParams sgx1 = sgx_params("sgx1");
    ASSERT_LT(plan.enclave_memory, sgx1.epc_bytes);
    EXPECT_EQ(project_sgx(plan, zero, sgx1).paging_s, 0.0);
    const double step = 100 * 4096.0;
    plan.kept_step_bytes = step;
    plan.kept_factor_bytes = sgx1.epc_bytes - plan.enclave_memory;  // fits exactly
    EXPECT_EQ(project_sgx(plan, zero, sgx1).paging_s, 0.0);
    plan.kept_factor_bytes = 2 * (sgx1.epc_bytes - plan.enclave_memory);  // half of it outside
    const double page = sgx1.page_fault_cycles / (sgx1.cpu_ghz * 1e9);
    EXPECT_NEAR(project_sgx(plan, zero, sgx1).paging_s, 50 * page, 1e-12);
    plan.kept_factor_bytes = 1e11;  // nearly all of it outside SGX1's EPC, all of it inside SGX2's 512 GiB
    EXPECT_NEAR(project_sgx(plan, zero, sgx1).paging_s, 100 * page, page);
    EXPECT_EQ(project_sgx(plan, zero, sgx_params("sgx2")).paging_s, 0.0);
}
