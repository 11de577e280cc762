// Whole-model gradient checks (FP64, central finite differences) on micro configs covering every
// branch: differential and plain attention, q compression on/off, YaRN on/off, sigmoid and softmax
// routers with and without groups and bias, shared experts on/off, tied and untied embeddings.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

using test::Batch;

Batch make_batch(const ModelConfig& c, int64_t B, int64_t T, uint64_t seed) {
  return test::make_batch(c, B, T, seed, {3, B * T - 1});  // ignored targets must not contribute
}

double total_loss(Model& m, const Batch& b) {
  m.forward({}, b.tokens, b.targets);
  const LossValues l = m.losses();
  return l.lm_loss + l.aux_loss;
}

// Checks ∂(lm + aux)/∂θ for sampled elements of every trainable parameter. Per tensor:
// ‖num − ana‖ ≤ kGradTol·max(‖num‖, ‖ana‖) + 1e-8. The absolute 1e-8 covers the rounding noise of
// central differences (≈ ε·|L|/h ≈ 1e-9 per element), which matters only for tensors whose true
// gradient is zero at the samples (an expert no token was routed to).
void check_model_gradients(const ModelConfig& cfg, uint64_t seed) {
  CpuBackend be;
  Model m(cfg, be, DType::kF64);
  m.set_batch_shape(2, 5);
  test::randomize_for_test(m, seed);
  const Batch b = make_batch(cfg, 2, 5, seed + 100);

  m.zero_grads({});
  total_loss(m, b);
  m.backward({}, 1.0);
  int checked = 0;
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const Tensor w = m.params().get(p.name), g = m.grads().get(p.name);
    const int64_t n = w.numel();
    const int64_t stride = std::max<int64_t>(1, n / 24);
    std::vector<double> num, ana;
    for (int64_t i = (n > 24 ? 1 : 0); i < n; i += stride) {
      const double w0 = test::get(w, i), h = 1e-6;
      test::set(w, i, w0 + h);
      const double lp = total_loss(m, b);
      test::set(w, i, w0 - h);
      const double lm = total_loss(m, b);
      test::set(w, i, w0);
      num.push_back((lp - lm) / (2 * h));
      ana.push_back(test::get(g, i));
    }
    double diff = 0, nn = 0, na = 0;
    for (size_t i = 0; i < num.size(); ++i) {
      diff += (num[i] - ana[i]) * (num[i] - ana[i]);
      nn += num[i] * num[i];
      na += ana[i] * ana[i];
    }
    diff = std::sqrt(diff);
    const double scale = std::max(std::sqrt(nn), std::sqrt(na));
    EXPECT_LE(diff, test::kGradTol * scale + 1e-8) << p.name << ": |num-ana| = " << diff << ", |grad| = " << scale;
    ++checked;
  }
  EXPECT_GT(checked, 20);
}

TEST(ModelGrad, DifferentialQLoraYarnSigmoidGroupsBias) { check_model_gradients(test::micro_diff_config(), 11); }

TEST(ModelGrad, PlainNoQLoraSoftmaxTiedNoShared) { check_model_gradients(test::micro_plain_config(), 23); }

TEST(ModelGrad, DifferentialWithoutYarnOrGroupsUntied) {
  auto j = test::micro_diff_config().to_json();
  j["original_seq_len"] = 8;
  j["rope_factor"] = 1.0;
  j["n_expert_groups"] = 1;
  j["n_limited_groups"] = 1;
  j["balance_bias"] = false;
  j["q_lora_rank"] = 0;
  check_model_gradients(ModelConfig::from_json(j, "variant"), 37);
}

// All gradients as one vector, in the specs' order.
std::vector<double> all_grads(Model& m) {
  std::vector<double> v;
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const Tensor g = m.grads().get(p.name);
    for (int64_t i = 0; i < g.numel(); ++i) v.push_back(test::get(g, i));
  }
  return v;
}

// The first backward after zero_grads overwrites the GEMM weight gradients (LayerContext::dw_beta
// = 0) instead of adding to zeros; later backwards add. Checked for both micro configs (untied and
// tied embeddings, where the head's GEMM and the embedding's scatter share one gradient):
// garbage in the gradients is gone after zero_grads; two backwards give twice one backward; without
// zero_grads a backward adds to what is there.
TEST(Model, FirstBackwardAfterZeroGradsOverwritesLaterOnesAdd) {
  for (const ModelConfig& cfg : {test::micro_diff_config(), test::micro_plain_config()}) {
    SCOPED_TRACE(cfg.tie_embeddings ? "micro_plain (tied)" : "micro_diff (untied)");
    CpuBackend be;
    Model m(cfg, be, DType::kF64);
    m.set_batch_shape(2, 5);
    test::randomize_for_test(m, 3);
    const Batch b = make_batch(cfg, 2, 5, 77);
    const auto fill_grads = [&](double v) {
      for (const ParamSpec& p : m.specs())
        if (p.trainable()) be.fill({}, {.out = m.grads().get(p.name), .value = v});
    };
    fill_grads(123.0);
    m.zero_grads({});
    total_loss(m, b);
    m.backward({}, 1.0);
    const std::vector<double> once = all_grads(m);
    total_loss(m, b);
    m.backward({}, 1.0);
    const std::vector<double> twice = all_grads(m);
    fill_grads(0.5);  // no zero_grads: the next backward adds onto 0.5
    total_loss(m, b);
    m.backward({}, 1.0);
    const std::vector<double> onto = all_grads(m);
    ASSERT_EQ(once.size(), twice.size());
    double max_abs = 0.0;
    for (size_t i = 0; i < once.size(); ++i) {
      max_abs = std::max(max_abs, std::fabs(once[i]));
      EXPECT_NEAR(twice[i], 2.0 * once[i], 1e-12 * (1.0 + std::fabs(once[i]))) << "element " << i;
      EXPECT_NEAR(onto[i], 0.5 + once[i], 1e-12 * (1.0 + std::fabs(once[i]))) << "element " << i;
    }
    EXPECT_GT(max_abs, 1e-3);  // the gradients are not all zero
  }
}

TEST(Model, F32MatchesF64AndIsDeterministic) {
  const ModelConfig cfg = test::micro_diff_config();
  CpuBackend be;
  Model m64(cfg, be, DType::kF64), m32(cfg, be, DType::kF32);
  m64.set_batch_shape(2, 5);
  m32.set_batch_shape(2, 5);
  m64.init_weights(5);
  m32.init_weights(5);
  const Batch b = make_batch(cfg, 2, 5, 9);
  const double l64 = total_loss(m64, b), l32 = total_loss(m32, b);
  EXPECT_NEAR(l32, l64, 1e-5 * std::fabs(l64));
  EXPECT_EQ(total_loss(m32, b), l32);  // bitwise repeatable
  // At the spec's initialisation the logits are near zero: loss ≈ ln(vocab).
  EXPECT_NEAR(m64.losses().lm_loss, std::log(static_cast<double>(cfg.vocab_size)), 0.05);
}

TEST(Model, InitIsSeededAndFollowsSpec6) {
  const ModelConfig cfg = test::micro_diff_config();
  CpuBackend be;
  Model a(cfg, be, DType::kF32), b(cfg, be, DType::kF32);
  a.init_weights(1);
  b.init_weights(1);
  const Tensor wa = a.params().get("layers.0.attn.wkv_b.weight"), wb = b.params().get("layers.0.attn.wkv_b.weight");
  EXPECT_EQ(std::memcmp(wa.data, wb.data, wa.nbytes()), 0);
  b.init_weights(2);
  EXPECT_NE(std::memcmp(wa.data, wb.data, wa.nbytes()), 0);
  EXPECT_EQ(a.params().get("layers.1.attn_norm.weight").ptr<float>()[0], 1.0f);
  EXPECT_EQ(a.params().get("layers.2.ffn.gate.bias").ptr<float>()[3], 0.0f);
  // wo is scaled by 1/√(2·n_layers): its spread is smaller than wq_b's.
  auto rms = [](const Tensor& t) {
    double s = 0;
    for (int64_t i = 0; i < t.numel(); ++i) s += double(t.ptr<float>()[i]) * t.ptr<float>()[i];
    return std::sqrt(s / static_cast<double>(t.numel()));
  };
  EXPECT_LT(rms(a.params().get("layers.0.attn.wo.weight")), 0.7 * rms(a.params().get("layers.0.attn.wq_b.weight")));
}

}  // namespace
}  // namespace diffmoe
