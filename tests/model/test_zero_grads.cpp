// zero_grads fills only the gradients that the backward adds into (norms, λ vectors, an untied
// embedding table); the first backward after it overwrites every GEMM weight's gradient (matrices,
// expert stacks, router gates, the head or a tied table: LayerContext::dw_beta = 0). Checked with
// every gradient poisoned with NaN before zero_grads, against a model whose arena is zero-filled
// and whose backwards all add (beta = 1): every gradient value must come out exactly equal (f32 and
// f64 CPU), for the micro configs, their corner cases (no shared experts, aux loss off, dense-only,
// MoE-only, tied embeddings, experts no token chooses) and the tiny preset.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Whether the backward only adds into p's gradient (so zero_grads must zero it): the rule the model
// implements (Model::grads_), stated independently here.
bool added_into(const ParamSpec& p, bool tied) {
  return p.kind == ParamKind::kNorm || p.kind == ParamKind::kLambda || (p.kind == ParamKind::kEmbedding && !tied);
}

using test::Batch;

Batch make_batch(const ModelConfig& c, int64_t B, int64_t T, uint64_t seed) {
  return test::make_batch(c, B, T, seed, {1});  // an ignored target
}

struct Case {
  std::string name;
  ModelConfig cfg;
  DType dtype = DType::kF32;
  int64_t batch = 2, seq = 5;
  bool spec_init = false;       // spec initialisation (presets) instead of randomize_for_test
  int64_t starved_experts = 0;  // the first n experts of every MoE layer get bias −100: no token picks them
};

// A model with the case's weights; the same for the same case.
std::unique_ptr<Model> make_model(CpuBackend& be, const Case& c) {
  auto m = std::make_unique<Model>(c.cfg, be, c.dtype);
  m->set_batch_shape(c.batch, c.seq);
  if (c.spec_init) m->init_weights(7);
  else test::randomize_for_test(*m, 7);
  for (int64_t l = c.cfg.n_dense_layers; l < c.cfg.n_layers && c.starved_experts > 0; ++l) {
    const Tensor bias = m->params().get(fmt::format("layers.{}.ffn.gate.bias", l));
    for (int64_t e = 0; e < c.starved_experts; ++e) test::set(bias, e, -100.0);
  }
  return m;
}

void forward_backward(Model& m, const Batch& b) {
  m.zero_expert_counts({});
  m.forward({}, b.tokens, b.targets);
  m.backward({}, 1.0);
}

// Every trainable parameter's gradient, in the specs' order.
std::vector<std::vector<double>> grads_of(Model& m) {
  std::vector<std::vector<double>> g;
  for (const ParamSpec& p : m.specs())
    if (p.trainable()) g.push_back(test::to_vector(m.grads().get(p.name)));
  return g;
}

// Every gradient view (not the padding between them: no gradient, nothing writes it) set to v.
void fill_every_gradient(Model& m, double v) {
  for (const ParamSpec& p : m.specs())
    if (p.trainable()) m.backend().fill({}, {.out = m.grads().get(p.name), .value = v});
}

// Exactly equal values, and no NaN. (Values, not bits: a GEMM at beta = 0 may give −0 where one at
// beta = 1 onto +0 gives +0.)
void expect_same(const Model& m, const std::vector<std::vector<double>>& got,
                 const std::vector<std::vector<double>>& want) {
  ASSERT_EQ(got.size(), want.size());
  size_t i = 0;
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const std::vector<double>& a = got[i];
    const std::vector<double>& b = want[i++];
    ASSERT_EQ(a.size(), b.size()) << p.name;
    int64_t bad = 0, first = -1;
    for (size_t j = 0; j < a.size(); ++j) {
      if (!(a[j] == b[j])) {  // NaN compares unequal
        if (first < 0) first = static_cast<int64_t>(j);
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0) << p.name << ": " << bad << " of " << a.size() << " differ, first at " << first << ": "
                      << (first >= 0 ? a[static_cast<size_t>(first)] : 0.0) << " vs "
                      << (first >= 0 ? b[static_cast<size_t>(first)] : 0.0);
  }
}

// NaN everywhere, zero_grads, one backward (and a second one, which adds) vs the zero-filled arena
// and plain accumulating backwards.
void check_case(const Case& c) {
  SCOPED_TRACE(c.name);
  CpuBackend be;
  const Batch b1 = make_batch(c.cfg, c.batch, c.seq, 101), b2 = make_batch(c.cfg, c.batch, c.seq, 202);

  const auto ref = make_model(be, c);  // never zero_grads: every backward adds onto a zeroed arena
  for (size_t g = 0; g < ref->layout().groups().size(); ++g)
    be.fill({}, {.out = ref->grads().buffers().group(g), .value = 0.0});
  forward_backward(*ref, b1);
  const auto want_once = grads_of(*ref);
  forward_backward(*ref, b2);
  const auto want_twice = grads_of(*ref);

  const auto m = make_model(be, c);
  fill_every_gradient(*m, kNaN);
  m->zero_grads({});
  forward_backward(*m, b1);
  expect_same(*m, grads_of(*m), want_once);
  forward_backward(*m, b2);  // gradient accumulation: the second backward adds (dw_beta = 1)
  expect_same(*m, grads_of(*m), want_twice);
  // The next step: stale gradients (not NaN now) are overwritten again.
  m->zero_grads({});
  forward_backward(*m, b1);
  expect_same(*m, grads_of(*m), want_once);

  if (c.starved_experts > 0) {  // the empty groups' slices of the expert gradients: zeros, written
    const int64_t I = c.cfg.moe_inter_dim, D = c.cfg.dim;
    for (int64_t l = c.cfg.n_dense_layers; l < c.cfg.n_layers; ++l) {
      for (int64_t e = 0; e < c.starved_experts; ++e)
        ASSERT_EQ(m->expert_counts(l).ptr<int32_t>()[e], 0) << "layer " << l;
      for (const char* w : {"w1", "w2", "w3"}) {
        const Tensor g = m->grads().get(fmt::format("layers.{}.ffn.experts.{}", l, w));
        for (int64_t i = 0; i < c.starved_experts * I * D; ++i) ASSERT_EQ(test::get(g, i), 0.0) << w << " layer " << l;
      }
    }
  }
}

ModelConfig variant(const ModelConfig& base, const nlohmann::ordered_json& changes) {
  auto j = base.to_json();
  for (const auto& [k, v] : changes.items()) j[k] = v;
  return ModelConfig::from_json(j, "variant");
}

TEST(ZeroGrads, MicroDiffUntiedSharedAux) {
  check_case({.name = "micro_diff f32", .cfg = test::micro_diff_config()});
  check_case({.name = "micro_diff f64", .cfg = test::micro_diff_config(), .dtype = DType::kF64});
}

TEST(ZeroGrads, MicroPlainTiedNoShared) {
  check_case({.name = "micro_plain f32", .cfg = test::micro_plain_config()});
  check_case({.name = "micro_plain f64", .cfg = test::micro_plain_config(), .dtype = DType::kF64});
}

TEST(ZeroGrads, CornerCaseConfigs) {
  const ModelConfig d = test::micro_diff_config();
  check_case({.name = "aux loss off", .cfg = variant(d, {{"aux_loss_alpha", 0.0}})});
  check_case({.name = "no shared experts", .cfg = variant(d, {{"n_shared_experts", 0}})});
  check_case({.name = "dense only", .cfg = variant(d, {{"n_dense_layers", d.n_layers}})});
  check_case(
      {.name = "MoE only, untied, no q compression", .cfg = variant(d, {{"n_dense_layers", 0}, {"q_lora_rank", 0}})});
  check_case({.name = "differential, tied", .cfg = variant(d, {{"tie_embeddings", true}})});
  check_case({.name = "plain, untied, aux off",
              .cfg = variant(test::micro_plain_config(), {{"tie_embeddings", false}, {"aux_loss_alpha", 0.0}})});
}

// Experts no token picks: their groups in grouped_gemm_wgrad are empty, and at beta = 0 their
// gradient slices must be written as zeros (op_args.h), not left as they were.
TEST(ZeroGrads, ExpertsNoTokenPicksGetZeroGradients) {
  check_case({.name = "starved experts", .cfg = test::micro_diff_config(), .starved_experts = 2});
  check_case(
      {.name = "starved experts, f64", .cfg = test::micro_diff_config(), .dtype = DType::kF64, .starved_experts = 2});
}

TEST(ZeroGrads, TinyPreset) {
  check_case({.name = "tiny",
              .cfg = load_model_config(test::repo_path("configs/tiny.yaml")),
              .batch = 2,
              .seq = 16,
              .spec_init = true});
}

// zero_grads writes only the added-into gradients (the GEMM weights' ones keep their NaN until the
// backward overwrites them): fails if it reverts to filling the whole arena. grads() in that window
// zeroes the rest first, and the backward then adds to what is written through it.
TEST(ZeroGrads, FillsOnlyTheAddedIntoGradientsAndGradsZeroesTheRest) {
  for (const ModelConfig& cfg : {test::micro_diff_config(), test::micro_plain_config()}) {
    SCOPED_TRACE(cfg.tie_embeddings ? "tied" : "untied");
    CpuBackend be;
    const Case c{.name = "", .cfg = cfg, .dtype = DType::kF64};
    const auto m = make_model(be, c);
    fill_every_gradient(*m, kNaN);
    const GradBuffer& arena = m->grads();  // taken before zero_grads, like the views below: reading
    std::vector<Tensor> views;             // them later does not go through grads()
    size_t added_bytes = 0, total_bytes = 0;
    for (const ParamSpec& p : m->specs()) {
      if (!p.trainable()) continue;
      views.push_back(arena.get(p.name));
      if (added_into(p, cfg.tie_embeddings)) added_bytes += views.back().nbytes();
    }
    for (size_t g = 0; g < m->layout().groups().size(); ++g) total_bytes += arena.buffers().group(g).nbytes();
    m->zero_grads({});
    size_t i = 0;
    for (const ParamSpec& p : m->specs()) {
      if (!p.trainable()) continue;
      const std::vector<double> v = test::to_vector(views[i++]);
      // A small GEMM-written gradient between added-into ones (in these micro models every matrix)
      // may be zeroed in the same fill (GradBuffer): allowed, the backward overwrites it. The expert
      // stacks live in a group of their own with nothing added into: never filled.
      const bool big_gemm = p.kind == ParamKind::kExpert;
      for (double x : v) {
        if (added_into(p, cfg.tie_embeddings)) {
          ASSERT_EQ(x, 0.0) << p.name;
        } else if (big_gemm) {
          ASSERT_TRUE(std::isnan(x)) << p.name << " was written by zero_grads";
        }
      }
    }
    EXPECT_GE(m->zero_grads_bytes(), added_bytes);
    EXPECT_LT(m->zero_grads_bytes(), total_bytes);

    // grads() now zeroes the GEMM weights' gradients; writes through it are then added onto.
    (void)m->grads();
    for (const Tensor& t : views)
      for (double x : test::to_vector(t)) ASSERT_EQ(x, 0.0);
    for (const Tensor& t : views) be.fill({}, {.out = t, .value = 0.25});
    const Batch b = make_batch(cfg, c.batch, c.seq, 303);
    forward_backward(*m, b);
    const auto ref = make_model(be, c);
    forward_backward(*ref, b);  // onto the zeros of a fresh arena
    const auto got = grads_of(*m), want = grads_of(*ref);
    for (size_t k = 0; k < got.size(); ++k)
      for (size_t j = 0; j < got[k].size(); ++j)
        ASSERT_NEAR(got[k][j], 0.25 + want[k][j], 1e-12 * (1.0 + std::fabs(want[k][j])))
            << "tensor " << k << " element " << j;
  }
}

// zero_grads and no backward (an optimizer step on zero gradients, tests/train/test_optimizer.cpp):
// every gradient still reads as zero through grads(), as AdamW reads them.
TEST(ZeroGrads, GradientsReadAsZeroWithoutABackward) {
  CpuBackend be;
  const auto m = make_model(be, {.name = "", .cfg = test::micro_diff_config()});
  fill_every_gradient(*m, kNaN);
  m->zero_grads({});
  for (const auto& g : grads_of(*m))
    for (double x : g) ASSERT_EQ(x, 0.0);
}

// A backward that throws (here: its forward had no targets) leaves the GEMM weights' gradients
// stale: the next backward still overwrites them.
TEST(ZeroGrads, ABackwardThatThrowsLeavesTheOverwriteToTheNextOne) {
  CpuBackend be;
  const Case c{.name = "", .cfg = test::micro_diff_config()};
  const Batch b = make_batch(c.cfg, c.batch, c.seq, 404);
  const auto ref = make_model(be, c);
  forward_backward(*ref, b);
  const auto m = make_model(be, c);
  fill_every_gradient(*m, kNaN);
  m->zero_grads({});
  m->forward({}, b.tokens, Tensor{});  // logits only
  EXPECT_THROW(m->backward({}, 1.0), Error);
  forward_backward(*m, b);
  expect_same(*m, grads_of(*m), grads_of(*ref));
}

}  // namespace
}  // namespace diffmoe
