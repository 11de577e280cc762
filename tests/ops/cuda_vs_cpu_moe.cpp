// CUDA vs CPU, second half (see cuda_vs_cpu.cpp for the method): the bias update, AdamW; then the
// device-side index checks, the shared validation, and embedding_bwd's run-to-run determinism.
// SwiGLU, the router and its aux loss, the routing plan, gather/combine and cross-entropy are cases
// of the op case table (op_cases/op_case.h), run here by op_cases_cuda.cpp.
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};

// ================================================================ plan and data movement

struct Plan {
  Plan(int64_t N, int64_t K, int64_t E)
      : offsets(Shape{E + 1}, DType::kI32), src_row(Shape{N * K}, DType::kI32), slot_pos(Shape{N, K}, DType::kI32) {}
  MoePermuteArgs args(const Dual& idx, int64_t E, Side s) const {
    return MoePermuteArgs{
        .offsets = offsets[s], .src_row = src_row[s], .slot_pos = slot_pos[s], .topk_idx = idx[s], .n_experts = E};
  }
  Dual offsets, src_row, slot_pos;
};

TEST(CudaMoe, BiasUpdate) {
  DIFFMOE_REQUIRE_CUDA();
  // Mean 3: experts at the mean keep their bias (sign 0).
  const std::vector<double> counts = {3, 0, 6, 3, 1, 5, 2, 4, 3, 3, 7, -1};
  for (DType ct : {DType::kI32, DType::kF32}) {
    Dual bias(Shape{12}), c(Shape{12}, ct);
    bias.normal(97, 0.1);
    c.set(counts);
    run_both([&](Backend& be, Side s) { be.moe_bias_update({}, {.bias = bias[s], .counts = c[s], .rate = 1e-3}); });
    expect_close(bias, kExact, fmt::format("moe_bias_update counts {}", dtype_name(ct)));
  }
}

// ================================================================ AdamW

TEST(CudaOptim, AdamW) {
  DIFFMOE_REQUIRE_CUDA();
  for (double max_norm : {0.0, 1.0}) {
    const Shape shape{1003};
    Dual p(shape), m(shape), v(shape), g(shape), gsq(Shape{1});
    p.normal(110);
    m.normal(111, 0.1);
    std::vector<double> vv(1003);
    for (size_t i = 0; i < vv.size(); ++i) vv[i] = 0.01 * (1.0 + std::pow(normal_at(112, 0, i), 2));
    v.set(vv);
    g.normal(113);
    gsq.set({7.3});                  // clip = 1 / (√7.3 + 1e-6) < 1
    Dual copy(shape, DType::kBF16);  // the bf16 weight copy written in the same pass
    copy.poison();
    run_both([&](Backend& be, Side s) {
      be.adamw({}, {.param = p[s],
                    .m = m[s],
                    .v = v[s],
                    .grad = g[s],
                    .grad_sq = max_norm > 0 ? gsq[s] : Tensor{},
                    .lr = 1e-2,
                    .beta1 = 0.9,
                    .beta2 = 0.95,
                    .eps = 1e-8,
                    .weight_decay = 0.1,
                    .max_norm = max_norm,
                    .step = 3,
                    .param_bf16 = copy[s]});
    });
    for (const auto& [d, name] : {std::pair{&p, "param"}, {&m, "m"}, {&v, "v"}})
      expect_close(*d, kRoundOnce, fmt::format("adamw {} max_norm={}", name, max_norm));
    // The copy is bf16 of the GPU's own updated param, exactly (float4 body and scalar tail).
    const std::vector<double> got = copy.device_values(), param = p.device_values();
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], bf16_to_f32(f32_to_bf16(static_cast<float>(param[i])))) << "adamw bf16 copy element " << i;
    EXPECT_TRUE(copy.guard_intact()) << "adamw bf16 copy";
  }
}

// ================================================================ device-side index checks

TEST(CudaChecks, BadIndicesAreReportedAtSynchronize) {
  DIFFMOE_REQUIRE_CUDA();
  Dual table(Shape{5, 3}), tokens(Shape{4}, DType::kI32), out(Shape{4, 3});
  table.normal(120);
  tokens.set({0, 4, 99, 1});
  expect_error(
      [&] {
        gpu().embedding_fwd({}, {.out = out[Side::kGpu], .tokens = tokens[Side::kGpu], .table = table[Side::kGpu]});
        gpu().synchronize({});
      },
      {"[embedding_fwd]", "tokens[2] = 99", "[0, 5)"});
  gpu().synchronize({});  // reported once; the backend stays usable

  Dual logits(Shape{3, 7}), targets(Shape{3}, DType::kI32), loss(Shape{1}), valid(Shape{1});
  logits.normal(121);
  targets.set({1, -1, 7});
  expect_error(
      [&] {
        gpu().cross_entropy_fwd({}, {.loss_sum = loss[Side::kGpu],
                                     .valid = valid[Side::kGpu],
                                     .logits = logits[Side::kGpu],
                                     .targets = targets[Side::kGpu]});
        std::vector<float> host(1);
        gpu().download(host.data(), loss[Side::kGpu]);  // download reports too
      },
      {"[cross_entropy_fwd]", "targets[2] = 7", "neither"});

  Dual idx(Shape{2, 2}, DType::kI32);
  idx.set({0, 1, 5, 2});
  Plan p(2, 2, 4);
  expect_error(
      [&] {
        gpu().moe_permute({}, p.args(idx, 4, Side::kGpu));
        gpu().synchronize({});
      },
      {"[moe_permute]", "topk_idx[2] = 5"});
}

// ================================================================ validation (shared with the CPU)

TEST(CudaChecks, ValidationNamesOpAndField) {
  DIFFMOE_REQUIRE_CUDA();
  Dual y64(Shape{4}, DType::kF64), x64(Shape{4}, DType::kF64);
  expect_error([&] { gpu().axpy({}, {.y = y64[Side::kGpu], .x = x64[Side::kGpu]}); }, {"[axpy]", "f32", "f64"});
  Dual a(Shape{3, 5}), b(Shape{4, 7}), c(Shape{3, 7});
  expect_error([&] { gpu().gemm({}, {.c = c[Side::kGpu], .a = a[Side::kGpu], .b = b[Side::kGpu]}); },
               {"[gemm]", "[3, 5]", "[4, 7]"});
  Dual h(Shape{6});
  expect_error([&] { gpu().swiglu_fwd({}, {.h = h[Side::kGpu], .a = h[Side::kCpu], .b = h[Side::kGpu]}); },
               {"[swiglu_fwd]", "a is on cpu"});
  Dual lg(Shape{2, 300}), sc(Shape{2, 300}), ix(Shape{2, 1}, DType::kI32), w(Shape{2, 1}), cnt(Shape{300}, DType::kI32);
  expect_error(
      [&] {
        gpu().router_fwd({}, {.scores = sc[Side::kGpu],
                              .topk_idx = ix[Side::kGpu],
                              .topk_w = w[Side::kGpu],
                              .counts = cnt[Side::kGpu],
                              .logits = lg[Side::kGpu],
                              .bias = {},
                              .opt = {.top_k = 1, .use_bias = false}});
      },
      {"[router_fwd]", "at most 256"});
}

// ================================================================ determinism

TEST(CudaChecks, DeterministicOpsAreBitwiseReproducible) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t V = 17, N = 513, D = 70;
  Dual tokens(Shape{N}, DType::kI32), dout(Shape{N, D}), dtable(Shape{V, D});
  tokens.ints(130, 0, static_cast<int32_t>(V));
  dout.normal(131);
  std::vector<double> first_table;
  for (int run = 0; run < 2; ++run) {
    dtable.set(std::vector<double>(static_cast<size_t>(V * D), 0.5));
    gpu().embedding_bwd({}, {.dtable = dtable[Side::kGpu], .tokens = tokens[Side::kGpu], .dout = dout[Side::kGpu]});
    if (run == 0) first_table = dtable.device_values();
    else EXPECT_EQ(dtable.device_values(), first_table) << "embedding_bwd differs between two runs";
  }
}

}  // namespace
}  // namespace diffmoe::cudatest
