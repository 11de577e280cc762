// The whole model on the CPU in the bf16 mode (ModelOptions::precision, PrecisionPlan, docs/model.md §7):
// forward + backward on the micro configs, against the same model in the f32 mode.
// - The activations the mode plans in bf16 are bf16 tensors (q, k, v and their gradients for these
//   head sizes too, which no tensor-core kernel covers: the attention takes bf16 for every shape),
//   hold finite values that are not all zero, and are f32 in the f32 run.
// - The loss and every gradient stay within the bf16 error budget of the f32 run:
//   ‖g16 − g32‖ ≤ 1e-2·‖g32‖ over all gradients and |loss16 − loss32| ≤ 1e-3·|loss32|. Why: the mode
//   rounds every GEMM input to bf16 (≤ 2^-9 ≈ 2e-3 relative per value, ≈ 1.6e-3 rms per product,
//   cuda_bf16_gemm.cpp) and stores the GEMM-only activations in bf16 (one more 2^-9 each); a
//   gradient's path through the micro models crosses ~10 such roundings (per layer: q, kv, the
//   attention's q/k/v, the output projection, two or three FFN GEMMs; forward and backward), whose
//   independent errors add in quadrature to ~5e-3 (measured 2.4e-3 and 3.9e-3); the loss, a mean
//   over tokens whose logits' errors have random signs, moves far less (measured ~5e-5). The mode
//   must also move the gradients by more than the f32 run's own rounding (~1e-6): ≥ 1e-5.
//   The models start from the spec initialisation (Model::init_weights), where training starts:
//   randomize_for_test's O(1) activations (made for finite differences) leave the differential
//   model so ill-conditioned that rounding only its weights to bf16 in an f32 run already moves
//   the gradients by ~7%, which no bf16 budget could bound.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

struct Run {
  double loss = 0.0;
  std::vector<double> grads;  // every trainable gradient, in spec order
};

Run forward_backward(Model& m, const test::Batch& b) {
  m.zero_grads({});
  m.forward({}, b.tokens, b.targets);
  m.backward({}, 1.0);
  const LossValues l = m.losses();
  Run r{.loss = l.lm_loss + l.aux_loss, .grads = {}};
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const std::vector<double> g = test::to_vector(m.grads().get(p.name));
    r.grads.insert(r.grads.end(), g.begin(), g.end());
  }
  return r;
}

// Activations every bf16-mode plan holds in bf16 (for attention layer l and MoE layer moe_l).
std::vector<std::string> expected_bf16(const ModelConfig& c) {
  std::vector<std::string> names = {"act.final.x_norm", "act.final.logits", "scratch.dlogits", "scratch.dresidual16",
                                    "scratch.attn.kv",  "scratch.attn.dq",  "scratch.attn.dk", "scratch.attn.dv"};
  for (int64_t l = 0; l < c.n_layers; ++l)
    for (const char* n : {"q", "k", "v", "x_norm", "ckv"}) names.push_back(fmt::format("act.{}.attn.{}", l, n));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    names.push_back(fmt::format("act.{}.ffn.x_norm16", l));
    if (l >= c.n_dense_layers)
      for (const char* n : {"x_perm", "y_perm", "experts.a", "experts.b", "experts.h"})
        names.push_back(fmt::format("act.{}.ffn.{}", l, n));
  }
  return names;
}

void check_bf16_mode(const ModelConfig& cfg, uint64_t seed, const std::string& name) {
  const int64_t B = 2, T = 5;
  const test::Batch batch = test::make_batch(cfg, B, T, seed + 100, {3});
  CpuBackend be32, be16;
  Model m32(cfg, be32, DType::kF32), m16(cfg, be16, DType::kF32, ModelOptions{.precision = Precision::kBF16});
  for (Model* m : {&m32, &m16}) {
    m->set_batch_shape(B, T);
    m->init_weights(seed);
  }
  const Run r32 = forward_backward(m32, batch), r16 = forward_backward(m16, batch);

  // The planned dtypes, and values the forward and backward really wrote.
  int64_t bf16_views = 0;
  for (const Arena::Entry& e : m16.acts().entries()) bf16_views += e.dtype == DType::kBF16 ? 1 : 0;
  for (const Arena::Entry& e : m32.acts().entries())
    EXPECT_NE(e.dtype, DType::kBF16) << name << ": " << e.name << " is bf16 in the f32 mode";
  for (const std::string& act : expected_bf16(cfg)) {
    ASSERT_TRUE(m16.acts().has(act)) << name << ": no activation " << act;
    const Tensor t = m16.acts().get(act);
    EXPECT_EQ(t.dtype, DType::kBF16) << name << ": " << act << " is not bf16 in the bf16 GEMM mode";
    if (t.dtype != DType::kBF16) continue;
    int64_t nonzero = 0, finite = 0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      const float v = bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
      nonzero += v != 0.0f ? 1 : 0;
      finite += std::isfinite(v) ? 1 : 0;
    }
    EXPECT_EQ(finite, t.numel()) << name << ": " << act;
    EXPECT_GT(nonzero, t.numel() / 4) << name << ": " << act << " holds (almost) no values";
  }
  EXPECT_GE(bf16_views, static_cast<int64_t>(expected_bf16(cfg).size()));
  // The compute weights of the GEMM matrices are bf16 (the weight copies of docs/model.md §7), the rest f32.
  for (const ParamSpec& p : m16.specs()) {
    const DType want = is_gemm_weight(p) ? DType::kBF16 : DType::kF32;
    EXPECT_EQ(m16.params().get(p.name).dtype, want) << name << ": " << p.name;
  }
  // The plan's table is the arena: every activation planned once, with the arena's dtype.
  EXPECT_EQ(m16.plan().entries().size(), m16.acts().entries().size()) << name;
  for (const PrecisionPlan::Entry& e : m16.plan().entries())
    EXPECT_EQ(m16.acts().get(e.name).dtype, e.dtype) << name << ": " << e.name;

  // The bf16 error budget (file comment), and a distance the f32 arithmetic alone would not give.
  const double loss_rel = std::fabs(r16.loss - r32.loss) / std::fabs(r32.loss);
  const double grad_rel = test::rel_error(r16.grads, r32.grads);
  std::printf("[bf16-model] %-12s loss %.6f vs %.6f (rel %.2e), gradients rel %.2e over %zu values, %lld bf16 views\n",
              name.c_str(), r16.loss, r32.loss, loss_rel, grad_rel, r32.grads.size(),
              static_cast<long long>(bf16_views));
  EXPECT_LE(loss_rel, 1e-3) << name;
  EXPECT_LE(grad_rel, 1e-2) << name;
  EXPECT_GE(grad_rel, 1e-5) << name << ": the bf16 mode gave f32-like gradients: was anything rounded?";
}

TEST(Bf16Model, DifferentialMoeStaysWithinTheBf16Budget) {
  check_bf16_mode(test::micro_diff_config(), 31, "micro_diff");
}

TEST(Bf16Model, PlainTiedMoeStaysWithinTheBf16Budget) {
  check_bf16_mode(test::micro_plain_config(), 37, "micro_plain");
}

}  // namespace
}  // namespace diffmoe
