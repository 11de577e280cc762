// Activation recompute (ModelOptions::recompute, model/recompute.h) on the CPU:
// - Exact: with every mode the losses, the logits, every gradient (after one backward and after a
//   second, accumulating one), the expert counts and λ are BITWISE those of `none`, in f32, f64 and
//   the bf16 GEMM mode, on the micro configs, their corner cases and the tiny preset. The backward
//   recomputes by the forward's own ops on the same inputs, and the CPU ops are deterministic.
// - Smaller: each mode's arena is `none`'s minus, for every activation the mode recomputes, all
//   but one layer's copy of it (the shared view), to the byte; which activations those are is
//   restated here from the modes' definitions. And so none > attention > full, none ≥ moe > full
//   (none > moe with two or more MoE layers).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "micro_config.h"

namespace diffmoe {
namespace {

constexpr Recompute kModes[] = {Recompute::kNone, Recompute::kAttention, Recompute::kMoe, Recompute::kFull};

struct Case {
  std::string name;
  ModelConfig cfg;
  DType dtype = DType::kF32;
  Precision precision = Precision::kF32;
  int64_t batch = 2, seq = 5;
  bool spec_init = false;  // spec initialisation (presets, the bf16 mode) instead of randomize_for_test
};

std::unique_ptr<Model> make_model(CpuBackend& be, const Case& c, Recompute r) {
  auto m = std::make_unique<Model>(c.cfg, be, c.dtype, ModelOptions{.precision = c.precision, .recompute = r});
  m->set_batch_shape(c.batch, c.seq);
  if (c.spec_init) m->init_weights(7);
  else test::randomize_for_test(*m, 7);
  return m;
}

std::string bytes_of(const Tensor& t) { return std::string(static_cast<const char*>(t.data), t.nbytes()); }

// Everything a step produces, as raw bytes by name.
using Outputs = std::map<std::string, std::string>;

void collect(Model& m, const std::string& when, Outputs& out) {
  const LossValues l = m.losses();
  for (const auto& [k, v] : {std::pair{"lm_loss", l.lm_loss}, std::pair{"aux_loss", l.aux_loss}})
    out[when + k] = std::string(reinterpret_cast<const char*>(&v), sizeof v);
  out[when + "valid"] = std::to_string(l.valid);
  out[when + "logits"] = bytes_of(m.logits());
  const ModelConfig& c = m.config();
  for (int64_t l = c.n_dense_layers; l < c.n_layers; ++l)
    out[when + fmt::format("counts.{}", l)] = bytes_of(m.expert_counts(l));
  for (int64_t l = 0; l < c.n_layers && c.differential; ++l)
    out[when + fmt::format("lambda.{}", l)] = bytes_of(m.lambda(l));
  for (const ParamSpec& p : m.specs())
    if (p.trainable()) out[when + "grad " + p.name] = bytes_of(m.grads().get(p.name));
}

// Two micro-batches into one gradient (the second backward accumulates at dw_beta = 1).
Outputs run(const Case& c, Recompute r) {
  CpuBackend be;
  const auto m = make_model(be, c, r);
  const test::Batch b1 = test::make_batch(c.cfg, c.batch, c.seq, 101, {1}),
                    b2 = test::make_batch(c.cfg, c.batch, c.seq, 202, {});
  Outputs out;
  m->zero_grads({});
  m->zero_expert_counts({});
  m->forward({}, b1.tokens, b1.targets);
  m->backward({}, 0.5);
  collect(*m, "first ", out);
  m->forward({}, b2.tokens, b2.targets);
  m->backward({}, 0.5);
  collect(*m, "accumulated ", out);
  return out;
}

void check_exact(const Case& c) {
  SCOPED_TRACE(c.name);
  const Outputs want = run(c, Recompute::kNone);
  for (const Recompute r : kModes) {
    if (r == Recompute::kNone) continue;
    const Outputs got = run(c, r);
    ASSERT_EQ(got.size(), want.size()) << recompute_name(r);
    int differ = 0;
    for (const auto& [name, bytes] : want) {
      ASSERT_TRUE(got.contains(name)) << name;
      if (got.at(name) == bytes) continue;
      ++differ;
      ADD_FAILURE() << c.name << ", recompute " << recompute_name(r) << ": " << name << " is not bitwise that of none";
    }
    EXPECT_EQ(differ, 0);
  }
}

ModelConfig variant(const ModelConfig& base, const nlohmann::ordered_json& changes) {
  auto j = base.to_json();
  for (const auto& [k, v] : changes.items()) j[k] = v;
  return ModelConfig::from_json(j, "variant");
}

TEST(Recompute, MicroDiffIsBitwiseNone) {
  check_exact({.name = "micro_diff f32", .cfg = test::micro_diff_config()});
  check_exact({.name = "micro_diff f64", .cfg = test::micro_diff_config(), .dtype = DType::kF64});
}

TEST(Recompute, MicroPlainIsBitwiseNone) {
  check_exact({.name = "micro_plain f32", .cfg = test::micro_plain_config()});
  check_exact({.name = "micro_plain f64", .cfg = test::micro_plain_config(), .dtype = DType::kF64});
}

TEST(Recompute, CornerCasesAreBitwiseNone) {
  const ModelConfig d = test::micro_diff_config();
  check_exact({.name = "no shared experts", .cfg = variant(d, {{"n_shared_experts", 0}})});
  check_exact({.name = "dense only", .cfg = variant(d, {{"n_dense_layers", d.n_layers}})});
  check_exact({.name = "MoE only, no q compression", .cfg = variant(d, {{"n_dense_layers", 0}, {"q_lora_rank", 0}})});
  check_exact({.name = "aux loss off, no bias", .cfg = variant(d, {{"aux_loss_alpha", 0.0}, {"balance_bias", false}})});
}

TEST(Recompute, Bf16GemmModeIsBitwiseNone) {
  check_exact(
      {.name = "micro_diff bf16", .cfg = test::micro_diff_config(), .precision = Precision::kBF16, .spec_init = true});
  check_exact({.name = "micro_plain bf16",
               .cfg = test::micro_plain_config(),
               .precision = Precision::kBF16,
               .spec_init = true});
}

TEST(Recompute, TinyPresetIsBitwiseNone) {
  check_exact({.name = "tiny",
               .cfg = load_model_config(test::repo_path("configs/tiny.yaml")),
               .batch = 2,
               .seq = 16,
               .spec_init = true});
}

// ---- Memory ----------------------------------------------------------------------------------

// Whether `mode` recomputes activation `name` of `block` (attn, ffn): the modes' definitions.
bool recomputed(Recompute mode, const std::string& block, const std::string& name) {
  const bool attention = mode == Recompute::kAttention || mode == Recompute::kFull;
  if (block == "attn") return attention && name != "lambda";
  if (mode == Recompute::kMoe) return name == "experts.a" || name == "experts.b" || name == "experts.h";
  if (mode == Recompute::kFull)
    return name != "scores" && name != "topk_idx" && name != "topk_w" && name != "offsets" && name != "src_row" &&
           name != "slot_pos";
  return false;
}

// "act.{l}.{block}.{name}" -> (block, name); false for anything else.
bool split_layer_act(const std::string& s, std::string& block, std::string& name) {
  if (s.rfind("act.", 0) != 0) return false;
  size_t i = 4;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  if (i == 4 || i >= s.size() || s[i] != '.') return false;
  const size_t dot = s.find('.', i + 1);
  if (dot == std::string::npos) return false;
  block = s.substr(i + 1, dot - i - 1);
  name = s.substr(dot + 1);
  return true;
}

size_t aligned(size_t bytes) { return (bytes + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign; }

// The arena of each mode against `none`'s; returns the four sizes in kModes' order.
std::vector<size_t> check_arena(const Case& c) {
  SCOPED_TRACE(c.name);
  CpuBackend be;
  std::vector<size_t> sizes;
  const auto none = make_model(be, c, Recompute::kNone);
  for (const Recompute r : kModes) {
    const auto m = r == Recompute::kNone ? nullptr : make_model(be, c, r);
    const Arena& acts = m ? m->acts() : none->acts();
    sizes.push_back(acts.bytes());
    // Per (block, name) recomputed: the layers' copies in `none`, one shared view in this mode.
    std::map<std::string, std::pair<int, size_t>> copies;
    for (const Arena::Entry& e : none->acts().entries()) {
      std::string block, name;
      if (!split_layer_act(e.name, block, name) || !recomputed(r, block, name)) continue;
      auto& [n, bytes] = copies[fmt::format("act.recomputed.{}.{}", block, name)];
      ++n;
      bytes = aligned(e.shape.numel() * static_cast<int64_t>(dtype_size(e.dtype)));
      EXPECT_FALSE(acts.has(e.name)) << recompute_name(r) << " keeps " << e.name;
    }
    size_t saved = 0;
    for (const auto& [shared, nb] : copies) {
      EXPECT_TRUE(acts.has(shared)) << recompute_name(r) << ": no shared view " << shared;
      saved += static_cast<size_t>(nb.first - 1) * nb.second;
    }
    EXPECT_EQ(none->acts().bytes() - acts.bytes(), saved) << recompute_name(r);
    // The views it does keep are those of none.
    for (const Arena::Entry& e : acts.entries()) {
      if (e.name.rfind("act.recomputed.", 0) == 0) continue;
      EXPECT_TRUE(none->acts().has(e.name)) << recompute_name(r) << " plans " << e.name << ", which none does not";
    }
  }
  const size_t n = sizes[0], attn = sizes[1], moe = sizes[2], full = sizes[3];
  std::printf(
      "[recompute] %-28s activation arena bytes: none %zu, attention %zu (%.0f%%), moe %zu (%.0f%%), full %zu "
      "(%.0f%%)\n",
      c.name.c_str(), n, attn, 100.0 * static_cast<double>(attn) / static_cast<double>(n), moe,
      100.0 * static_cast<double>(moe) / static_cast<double>(n), full,
      100.0 * static_cast<double>(full) / static_cast<double>(n));
  const int64_t moe_layers = c.cfg.n_layers - c.cfg.n_dense_layers;
  EXPECT_GT(n, attn);
  EXPECT_GT(attn, full);
  EXPECT_GT(moe, full);
  EXPECT_GE(n, moe);
  if (moe_layers >= 2) {
    EXPECT_GT(n, moe);
  }
  return sizes;
}

TEST(Recompute, ArenaShrinksByTheSharedViews) {
  check_arena({.name = "micro_diff", .cfg = test::micro_diff_config()});
  check_arena(
      {.name = "micro_diff bf16", .cfg = test::micro_diff_config(), .precision = Precision::kBF16, .spec_init = true});
  const ModelConfig d = test::micro_diff_config();
  check_arena({.name = "MoE only, no q compression", .cfg = variant(d, {{"n_dense_layers", 0}, {"q_lora_rank", 0}})});
  // One MoE layer: `moe` shares nothing (its one layer's copy is the shared view).
  const std::vector<size_t> plain = check_arena({.name = "micro_plain", .cfg = test::micro_plain_config()});
  EXPECT_EQ(plain[0], plain[2]);
  // The tiny preset (a micro-batch of 4 × 256; every activation scales with the tokens), and what
  // recompute is for: the bytes each further layer costs. With `full` an MoE layer adds its two
  // residuals (the sub-blocks' inputs) and its routing, no more: here under an eighth of what it
  // adds with `none` (measured 1/12: tiny's small vocabulary and four layers leave most of the
  // arena to the logits and the backward scratch, which no mode changes).
  const ModelConfig tiny = load_model_config(test::repo_path("configs/tiny.yaml"));
  const std::vector<size_t> base =
      check_arena({.name = "tiny 4x256", .cfg = tiny, .batch = 4, .seq = 256, .spec_init = true});
  const std::vector<size_t> more = check_arena({.name = "tiny 4x256, one more layer",
                                                .cfg = variant(tiny, {{"n_layers", tiny.n_layers + 1}}),
                                                .batch = 4,
                                                .seq = 256,
                                                .spec_init = true});
  std::vector<size_t> per_layer;
  for (size_t i = 0; i < base.size(); ++i) per_layer.push_back(more[i] - base[i]);
  std::printf("[recompute] tiny 4x256: bytes per MoE layer: none %zu, attention %zu, moe %zu, full %zu\n", per_layer[0],
              per_layer[1], per_layer[2], per_layer[3]);
  EXPECT_LT(8 * per_layer[3], per_layer[0]);
  EXPECT_LT(per_layer[1], per_layer[0]);
  EXPECT_LT(per_layer[2], per_layer[0]);
}

TEST(Recompute, ModeNamesParse) {
  for (const Recompute r : kModes) EXPECT_EQ(parse_recompute(recompute_name(r), "k"), r);
  try {
    parse_recompute("some", "train.recompute");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.recompute: expected none, attention, moe or full, got 'some'"),
              std::string::npos)
        << e.what();
  }
}

// A shared view asked for with another shape by a later layer is an error, not a silent overlap.
TEST(Recompute, SharedViewShapesMustAgree) {
  PrecisionPlan pl(Precision::kF32, DType::kF32);
  Arena acts;
  ActNames(0, "ffn").plan(pl, acts, "a", Shape{4, 3}, ActRole::kGemmOutput, true);
  ActNames(1, "ffn").plan(pl, acts, "a", Shape{4, 3}, ActRole::kGemmOutput, true);  // the same: planned once
  EXPECT_EQ(acts.entries().size(), 1u);
  EXPECT_EQ(acts.entries()[0].name, "act.recomputed.ffn.a");
  EXPECT_THROW(ActNames(2, "ffn").plan(pl, acts, "a", Shape{4, 5}, ActRole::kGemmOutput, true), Error);
  ActNames(1, "ffn").plan(pl, acts, "a", Shape{4, 5}, ActRole::kGemmOutput, false);
  EXPECT_TRUE(acts.has("act.1.ffn.a"));
}

}  // namespace
}  // namespace diffmoe
