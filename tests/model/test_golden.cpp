// Golden test against the independent PyTorch reference (tools/reference/): the fixture holds a
// config (safetensors metadata), weights, a batch, and the reference's float64 logits, losses and
// gradients. C++ must match logits and losses to 1e-5 relative and gradients to 1e-4 (f32
// against float64); the f64 run is held to much tighter bounds since both sides then compute in double.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "test_util.h"

namespace diffmoe {
namespace {

std::string fixture(const std::string& name) {
  const char* f = std::getenv("DIFFMOE_FIXTURES");
  return (std::filesystem::path(f ? f : "tests/fixtures") / name).string();
}

// Reads a float tensor of any shape as a flat vector of doubles.
std::vector<double> read_f64(const SafetensorsFile& f, const std::string& name) {
  const SafetensorsEntry& e = f.get(name);
  Shape s;
  switch (e.shape.size()) {
    case 0: s = Shape{}; break;
    case 1: s = Shape{e.shape[0]}; break;
    case 2: s = Shape{e.shape[0], e.shape[1]}; break;
    case 3: s = Shape{e.shape[0], e.shape[1], e.shape[2]}; break;
    default: ADD_FAILURE() << name << ": unexpected rank " << e.shape.size(); return {};
  }
  test::Owned t(s, DType::kF64);
  f.read_into(name, t);
  return test::to_vector(t);
}

void run_golden(const std::string& file, DType dtype, double out_tol, double grad_tol) {
  const SafetensorsFile f = SafetensorsFile::open(fixture(file));
  const ModelConfig cfg = ModelConfig::from_json(nlohmann::ordered_json::parse(f.metadata().at("config")), file);
  const int64_t B = std::stoll(f.metadata().at("batch")), T = std::stoll(f.metadata().at("seq_len"));
  CpuBackend be;
  Model m(cfg, be, dtype);
  m.set_batch_shape(B, T);
  for (const ParamSpec& p : m.specs()) f.read_into(p.name, m.params().get(p.name));
  test::Owned tokens(Shape{B, T}, DType::kI32), targets(Shape{B, T}, DType::kI32);
  f.read_into("input.tokens", tokens);
  f.read_into("input.targets", targets);

  m.zero_grads({});
  m.forward({}, tokens, targets);
  m.backward({}, 1.0);
  const LossValues l = m.losses();
  const double lm = read_f64(f, "expected.lm_loss")[0], aux = read_f64(f, "expected.aux_loss")[0];
  EXPECT_NEAR(l.lm_loss, lm, out_tol * std::fabs(lm)) << file;
  EXPECT_NEAR(l.aux_loss, aux, out_tol * std::fabs(aux) + 1e-12) << file;
  EXPECT_LE(test::rel_error(test::to_vector(m.logits()), read_f64(f, "expected.logits")), out_tol) << file;
  int grads = 0;
  for (const ParamSpec& p : m.specs()) {
    if (!p.trainable()) continue;
    const double err = test::rel_error(test::to_vector(m.grads().get(p.name)), read_f64(f, "expected.grad." + p.name));
    EXPECT_LE(err, grad_tol) << file << ": gradient of " << p.name;
    ++grads;
  }
  EXPECT_GT(grads, 10);
  for (int64_t layer = 0; layer < cfg.n_layers; ++layer) {
    if (cfg.is_moe_layer(layer)) {
      const std::string name = "expected.counts.layers." + std::to_string(layer);
      const SafetensorsEntry& e = f.get(name);
      const Tensor got = m.expert_counts(layer);
      ASSERT_EQ(e.nbytes, got.nbytes());
      EXPECT_EQ(std::memcmp(e.data, got.data, e.nbytes), 0) << file << ": expert counts of layer " << layer;
    }
    if (cfg.differential) {
      const double want = read_f64(f, "expected.lambda.layers." + std::to_string(layer))[0];
      EXPECT_NEAR(test::get(m.lambda(layer), 0), want, 1e-6 * std::fabs(want)) << file << ": λ of layer " << layer;
    }
  }
}

TEST(Golden, DifferentialF64) { run_golden("golden_diff.safetensors", DType::kF64, 1e-9, 1e-8); }
TEST(Golden, DifferentialF32) { run_golden("golden_diff.safetensors", DType::kF32, 1e-5, 1e-4); }
TEST(Golden, PlainF64) { run_golden("golden_plain.safetensors", DType::kF64, 1e-9, 1e-8); }
TEST(Golden, PlainF32) { run_golden("golden_plain.safetensors", DType::kF32, 1e-5, 1e-4); }

}  // namespace
}  // namespace diffmoe
