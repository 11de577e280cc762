// train.precision: fp8 end to end on the CPU: a short run of the tiny preset's model (its attention output
// projection, dense FFN, shared and routed experts are 128-wide multiples, so they run the FP8 recipe;
// docs/model.md §7) learns as the bf16_gemm run of the same config does, and the config key is checked.
//
// Bounds (the run: 24 steps of 2 × 32 tokens from the same seed and data, the tiny model with a
// 512-token head). Both runs start from the same weights and see the same batches; FP8's coarser
// GEMMs (3 mantissa bits against bf16's 8: test_fp8_model.cpp measures ~4% gradient noise) perturb
// each update a little, not the descent. The loss must fall by at least one nat from the first step
// to the mean of the last five (a run that does not learn stays near ln(512) ≈ 6.2; measured: both
// fall by 2.4), by at least 80% of the bf16 run's fall, and end within 2% of the bf16 run's mean of
// the last five steps (measured 0.2%).
#include <map>
#include <numeric>

#include "e2e_util.h"
#include "io/config_file.h"
#include "test_util.h"

namespace diffmoe::e2e {
namespace {

constexpr int kSteps = 24;

TEST_F(E2E, Fp8TrainingLearnsAsBf16Does) {
  const nlohmann::ordered_json tiny = load_yaml_file(test::repo_path("configs/tiny.yaml"));
  auto config = [&](const std::string& precision) {
    Yaml y = micro_config(dir_, dir_ / precision);
    for (const auto& [k, v] : tiny.at("model").items()) y.set("model." + k, v.dump());
    y.set("model.vocab_size", "512");  // the 300-token tokenizer fits; a smaller head keeps the CPU run short
    y.set("train.micro_batch", "2");
    y.set("train.seq_len", "32");
    y.set("train.max_steps", std::to_string(kSteps));
    y.set("optim.warmup_steps", "5");
    y.set("eval.every", std::to_string(kSteps));
    y.set("checkpoint.every", std::to_string(kSteps));
    y.set("log.tensorboard", "false");
    y.set("train.precision", precision);
    return write_config(y, precision + ".yaml");
  };
  std::map<std::string, std::vector<double>> losses;
  for (const char* precision : {"bf16_gemm", "fp8"}) {
    RunOptions slow;
    slow.timeout_s = 900;  // 24 CPU steps of the tiny model: ~1 s each, more on a loaded machine
    const RunResult r = train(config(precision), {}, slow);
    E2E_EXPECT_OK(r);
    for (const nlohmann::json& row : read_jsonl(dir_ / precision / "metrics.jsonl"))
      if (row.contains("loss") && !row.contains("val_loss")) losses[precision].push_back(row.at("loss").get<double>());
    ASSERT_EQ(losses[precision].size(), static_cast<size_t>(kSteps)) << precision;
  }
  auto last5 = [](const std::vector<double>& v) { return std::accumulate(v.end() - 5, v.end(), 0.0) / 5.0; };
  const std::vector<double>& l16 = losses["bf16_gemm"];
  const std::vector<double>& l8 = losses["fp8"];
  const double fall16 = l16.front() - last5(l16), fall8 = l8.front() - last5(l8);
  std::printf("[fp8-train] first loss %.4f / %.4f, mean of the last five %.4f (fp8) vs %.4f (bf16)\n", l8.front(),
              l16.front(), last5(l8), last5(l16));
  EXPECT_GE(fall8, 1.0);
  EXPECT_GE(fall8, 0.8 * fall16);
  EXPECT_LE(std::fabs(last5(l8) - last5(l16)), 0.02 * last5(l16));
  for (const double l : l8) EXPECT_TRUE(std::isfinite(l));
}

TEST_F(E2E, AnUnknownPrecisionIsAnErrorNamingTheKey) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.precision", "fp4");
  const RunResult r = train(write_config(y));
  expect_clean_error(r, {"train.precision", "expected f32, bf16_gemm or fp8, got 'fp4'"});
}

}  // namespace
}  // namespace diffmoe::e2e
