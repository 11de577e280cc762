// AdamW over a whole model: which parameters decay, clipping by the GLOBAL norm, the bias update,
// and an exact save/load round trip of the optimizer state; bf16 moments (optim.moment_dtype):
// stored and saved in bf16, round-tripped bitwise, and converted from and to f32 checkpoints.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/micro_config.h"
#include "train/optimizer.h"
#include "train/sharded_state.h"

namespace diffmoe {
namespace {

// The optimizer's piece of parameter `name` (one rank owns all of every parameter).
const AdamW::Piece& piece_of(const AdamW& opt, const std::string& name) {
  const ParamLayout& l = opt.model().layout();
  for (const AdamW::Piece& p : opt.pieces())
    if (l.entries()[p.entry].spec.name == name) return p;
  throw std::runtime_error("no piece for " + name);
}

TEST(AdamW, DecayOnlyOnMatricesAndGlobalClip) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF64);
  m.set_batch_shape(1, 4);  // the expert counts live with the activations
  test::randomize_for_test(m, 3);
  // Zero gradients: only weight decay moves parameters.
  m.zero_grads({});
  m.zero_expert_counts({});
  OptimConfig oc;
  oc.weight_decay = 0.5;
  oc.grad_clip = 0.0;
  AdamW opt(m, oc);
  std::map<std::string, std::vector<double>> before;
  for (const ParamSpec& p : m.specs()) before[p.name] = test::to_vector(m.params().get(p.name));
  opt.step({}, 0.1);
  for (const ParamSpec& p : m.specs()) {
    if (p.kind == ParamKind::kBias) continue;  // moved by the bias rule, tested below
    const auto after = test::to_vector(m.params().get(p.name));
    const double factor = p.decayed() ? 1.0 - 0.1 * 0.5 : 1.0;
    for (size_t i = 0; i < after.size(); ++i) ASSERT_NEAR(after[i], before[p.name][i] * factor, 1e-15) << p.name;
  }
  // Decay classes (docs/training.md): never norms, λ vectors, biases or embeddings.
  for (const ParamSpec& p : m.specs()) {
    if (p.kind == ParamKind::kNorm || p.kind == ParamKind::kLambda || p.kind == ParamKind::kBias ||
        p.kind == ParamKind::kEmbedding) {
      EXPECT_FALSE(p.decayed()) << p.name;
    }
  }
}

TEST(AdamW, ClipUsesTheGlobalNormAcrossAllTensors) {
  CpuBackend be;
  Model m(test::micro_plain_config(), be, DType::kF64);
  test::randomize_for_test(m, 5);
  m.zero_grads({});
  double total = 0;
  uint64_t seed = 100;
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const Tensor g = m.grads().get(p.name);
    test::fill_normal(g, seed++, 0.3);
    for (double v : test::to_vector(g)) total += v * v;
  }
  OptimConfig oc;
  oc.grad_clip = 0.25;
  AdamW opt(m, oc);
  opt.compute_grad_sq({});
  EXPECT_NEAR(opt.grad_norm(), std::sqrt(total), 1e-9 * std::sqrt(total));
  // First AdamW step with β1: m = (1−β1)·c·g, v = (1−β2)·(c·g)²  →  the update is lr·sign(g)
  // regardless of c, so check the moment instead: m / ((1−β1)·g) = c = max_norm / (norm + 1e-6).
  const Tensor g0 = m.grads().get("layers.0.attn.wq.weight");
  const double g = test::get(g0, 3);
  opt.apply({}, 1e-3);
  const double mom = test::get(opt.moment1(piece_of(opt, "layers.0.attn.wq.weight")), 3);
  EXPECT_NEAR(mom / ((1 - oc.beta1) * g), 0.25 / (std::sqrt(total) + 1e-6), 1e-12);
}

// After a backward the optimizer takes the expert stacks' Σg² from their weight-gradient GEMMs
// (Model::grad_sq_parts) and sums only the rest: the norm must still cover every gradient, with
// gradient accumulation too, and a gradient changed through grads() afterwards must count.
TEST(AdamW, NormAfterBackwardCoversEveryGradient) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF64);
  m.set_batch_shape(2, 4);
  test::randomize_for_test(m, 7);
  const auto host_norm = [&] {  // grads() drops the fused part; call it after the optimizer's norm
    double s = 0.0;
    for (const ParamSpec& p : m.specs())
      if (p.trainable())
        for (double v : test::to_vector(m.grads().get(p.name))) s += v * v;
    return std::sqrt(s);
  };
  AdamW opt(m, OptimConfig{});
  m.zero_grads({});
  EXPECT_FALSE(m.grad_sq_parts().experts_sq.defined());
  for (uint64_t micro = 0; micro < 2; ++micro) {
    const test::Batch b = test::make_batch(m.config(), 2, 4, 40 + 2 * micro, {3});
    m.forward({}, b.tokens, b.targets);
    m.backward({}, 0.5);
    ASSERT_TRUE(m.grad_sq_parts().experts_sq.defined()) << "micro-batch " << micro;
    opt.compute_grad_sq({});
    const double fused = opt.grad_norm(), want = host_norm();
    EXPECT_GT(want, 0.0);
    EXPECT_NEAR(fused, want, 1e-12 * want) << "micro-batch " << micro;
  }
  const Tensor e = m.grads().get(fmt::format("layers.{}.ffn.experts.w1", m.config().n_dense_layers));
  test::set(e, 0, test::get(e, 0) + 3.0);
  EXPECT_FALSE(m.grad_sq_parts().experts_sq.defined());
  opt.compute_grad_sq({});
  const double after = opt.grad_norm(), want = host_norm();
  EXPECT_NEAR(after, want, 1e-12 * want);
  m.zero_grads({});
  EXPECT_FALSE(m.grad_sq_parts().experts_sq.defined());
  // A new batch shape plans the activations (and the expert Σg² with them) anew.
  const test::Batch b = test::make_batch(m.config(), 2, 4, 50, {3});
  m.forward({}, b.tokens, b.targets);
  m.backward({}, 1.0);
  ASSERT_TRUE(m.grad_sq_parts().experts_sq.defined());
  m.set_batch_shape(1, 4);
  EXPECT_FALSE(m.grad_sq_parts().experts_sq.defined());
}

TEST(AdamW, BiasUpdateFollowsTheCountsAndStateRoundTrips) {
  CpuBackend be;
  Model m(test::micro_diff_config(), be, DType::kF32);
  m.init_weights(1);
  m.set_batch_shape(1, 4);
  m.zero_grads({});
  const int64_t l = m.config().n_dense_layers;
  const Tensor counts = m.expert_counts(l);
  for (int64_t e = 0; e < counts.numel(); ++e) counts.ptr<int32_t>()[e] = static_cast<int32_t>(e);  // mean 3.5
  AdamW opt(m, OptimConfig{});
  opt.step({}, 1e-3);
  const Tensor b = m.params().get(fmt::format("layers.{}.ffn.gate.bias", l));
  const float rate = static_cast<float>(m.config().bias_update_rate);
  EXPECT_FLOAT_EQ(b.ptr<float>()[0], rate);   // under-loaded: up
  EXPECT_FLOAT_EQ(b.ptr<float>()[7], -rate);  // over-loaded: down
  // The state round trip through a checkpoint shard: masters, moments and buffers, bitwise.
  const auto dir = std::filesystem::temp_directory_path() / "diffmoe_opt_state";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  write_state_shard(opt, (dir / shard_file_name(0, 1)).string(), 0, 1, /*with_buffers=*/true);
  Model m2(test::micro_diff_config(), be, DType::kF32);
  m2.set_batch_shape(1, 4);
  AdamW back(m2, OptimConfig{});
  load_state(back, StateReader(dir.string()), {});
  for (const AdamW::Piece& p : opt.pieces()) {
    const std::string& name = m.layout().entries()[p.entry].spec.name;
    const AdamW::Piece& q = piece_of(back, name);
    for (auto view : {&AdamW::master, &AdamW::moment1, &AdamW::moment2}) {
      const Tensor a1 = (opt.*view)(p), a2 = (back.*view)(q);
      ASSERT_EQ(a1.nbytes(), a2.nbytes()) << name;
      EXPECT_EQ(std::memcmp(a1.data, a2.data, a1.nbytes()), 0) << name;
    }
  }
  const Tensor b2 = m2.params().get(fmt::format("layers.{}.ffn.gate.bias", l));
  EXPECT_EQ(std::memcmp(b.data, b2.data, b.nbytes()), 0);
  std::filesystem::remove_all(dir);
}

// Random gradients for every trainable parameter, then one step.
void step_with_random_grads(Model& m, AdamW& opt, uint64_t seed) {
  m.zero_grads({});
  m.zero_expert_counts({});
  for (const ParamSpec& p : m.specs())
    if (p.trainable()) test::fill_normal(m.grads().get(p.name), seed++, 0.3);
  opt.step({}, 1e-2);
}

// Every moment element of `opt` as a double (f32, f64 or bf16 storage), by parameter name.
std::map<std::string, std::vector<double>> moments_of(const AdamW& opt) {
  std::map<std::string, std::vector<double>> out;
  for (const AdamW::Piece& p : opt.pieces()) {
    const std::string& name = opt.model().layout().entries()[p.entry].spec.name;
    for (const auto& [view, tag] : {std::pair{&AdamW::moment1, "m."}, std::pair{&AdamW::moment2, "v."}}) {
      const Tensor t = (opt.*view)(p);
      std::vector<double>& v = out[tag + name];
      for (int64_t i = 0; i < t.numel(); ++i)
        v.push_back(t.dtype == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]) : test::get(t, i));
    }
  }
  return out;
}

TEST(AdamW, Bf16MomentsSaveLoadAndConvert) {
  namespace fs = std::filesystem;
  CpuBackend be;
  const auto make_model = [&] {
    auto m = std::make_unique<Model>(test::micro_diff_config(), be, DType::kF32);
    m->init_weights(1);
    m->set_batch_shape(1, 4);
    return m;
  };
  OptimConfig c32, c16;
  c16.moment_dtype = "bf16";
  const auto m32 = make_model(), m16 = make_model();
  AdamW o32(*m32, c32), o16(*m16, c16);
  EXPECT_EQ(o16.moment_dtype(), DType::kBF16);
  EXPECT_EQ(o32.moment_dtype(), DType::kF32);
  EXPECT_EQ(o16.moment1(o16.pieces().front()).dtype, DType::kBF16);
  EXPECT_LT(o16.state_bytes(), o32.state_bytes());
  for (uint64_t s = 0; s < 2; ++s) {
    step_with_random_grads(*m32, o32, 10 + 100 * s);
    step_with_random_grads(*m16, o16, 10 + 100 * s);
  }
  const auto v32 = moments_of(o32), v16 = moments_of(o16);
  int64_t nonzero = 0, differ = 0;
  for (const auto& [name, v] : v32)
    for (size_t i = 0; i < v.size(); ++i) {
      nonzero += v[i] != 0.0 ? 1 : 0;
      differ += v[i] != v16.at(name)[i] ? 1 : 0;  // the bf16 run's moments are rounded
    }
  EXPECT_GT(nonzero, 1000);
  EXPECT_GT(differ, 0);

  const fs::path root = fs::temp_directory_path() / "diffmoe_bf16_moments";
  fs::remove_all(root);
  const auto save = [&](const AdamW& o, const std::string& name) {
    fs::create_directories(root / name);
    write_state_shard(o, (root / name / shard_file_name(0, 1)).string(), 0, 1, /*with_buffers=*/true);
    return (root / name).string();
  };
  const std::string dir32 = save(o32, "f32"), dir16 = save(o16, "bf16");
  // The shard keeps the moments' dtype: bf16 "m/..." and "v/..." tensors, f32 masters.
  const SafetensorsFile f = SafetensorsFile::open((fs::path(dir16) / shard_file_name(0, 1)).string());
  int64_t bf16_moments = 0;
  for (const std::string& n : f.names()) {
    if (n.rfind("m/", 0) == 0 || n.rfind("v/", 0) == 0) {
      EXPECT_EQ(f.get(n).dtype, DType::kBF16) << n;
      ++bf16_moments;
    } else if (n.rfind("master/", 0) == 0) {
      EXPECT_EQ(f.get(n).dtype, DType::kF32) << n;
    }
  }
  EXPECT_EQ(bf16_moments, 2 * static_cast<int64_t>(o16.pieces().size()));
  EXPECT_EQ(StateReader(dir16).moment_dtype(), DType::kBF16);
  EXPECT_EQ(StateReader(dir32).moment_dtype(), DType::kF32);

  // Into fresh optimizers: bf16 -> bf16 bitwise, f32 -> bf16 rounded to nearest even, bf16 -> f32 exact.
  const auto load = [&](const std::string& dir, const OptimConfig& c, std::optional<std::string>* notice) {
    auto m = make_model();
    auto o = std::make_unique<AdamW>(*m, c);
    const StateReader reader(dir);
    *notice = moment_dtype_change(*o, reader);
    load_state(*o, reader, {});
    return std::pair{std::move(m), std::move(o)};
  };
  std::optional<std::string> notice;
  {
    const auto [m, o] = load(dir16, c16, &notice);
    EXPECT_FALSE(notice.has_value());
    for (const AdamW::Piece& p : o16.pieces()) {
      const AdamW::Piece& q = piece_of(*o, m16->layout().entries()[p.entry].spec.name);
      for (auto view : {&AdamW::master, &AdamW::moment1, &AdamW::moment2}) {
        const Tensor a = (o16.*view)(p), b = ((*o).*view)(q);
        ASSERT_EQ(a.nbytes(), b.nbytes());
        EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0) << m16->layout().entries()[p.entry].spec.name;
      }
    }
  }
  {
    const auto [m, o] = load(dir32, c16, &notice);
    ASSERT_TRUE(notice.has_value());
    for (const char* part : {"f32", "bf16", "optim.moment_dtype", "rounded to nearest even"})
      EXPECT_NE(notice->find(part), std::string::npos) << *notice;
    const auto got = moments_of(*o);
    for (const auto& [name, v] : v32)
      for (size_t i = 0; i < v.size(); ++i)
        ASSERT_EQ(got.at(name)[i], bf16_to_f32(f32_to_bf16(static_cast<float>(v[i])))) << name << "[" << i << "]";
  }
  {
    const auto [m, o] = load(dir16, c32, &notice);
    ASSERT_TRUE(notice.has_value());
    EXPECT_NE(notice->find("exact"), std::string::npos) << *notice;
    EXPECT_EQ(moments_of(*o), v16);
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace diffmoe
