// Continuing from a checkpoint is bitwise identical to never stopping, on the CPU: 2N straight
// steps vs N, resume, N give identical losses and weights.
#include <map>

#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

constexpr int kN = 6;  // steps before the interruption; the runs are 2N long

// kind == "train" / "val" rows of a metrics.jsonl, by step (a step logged twice keeps the later row).
std::map<int64_t, nlohmann::json> rows_by_step(const std::vector<nlohmann::json>& rows, const std::string& kind) {
  std::map<int64_t, nlohmann::json> m;
  for (const auto& r : rows)
    if (r.at("kind") == kind) m[r.at("step").get<int64_t>()] = r;
  return m;
}

// The same double, bit for bit (NaN never expected here).
void expect_same(const nlohmann::json& a, const nlohmann::json& b, const std::string& key, int64_t step) {
  ASSERT_TRUE(a.contains(key) && b.contains(key)) << key << " missing at step " << step;
  ASSERT_TRUE(a.at(key).is_number() && b.at(key).is_number())
      << key << " at step " << step << ": " << a.at(key) << " / " << b.at(key);
  const double x = a.at(key).get<double>(), y = b.at(key).get<double>();
  EXPECT_EQ(std::memcmp(&x, &y, sizeof x), 0) << key << " differs at step " << step << ": " << a.at(key).dump()
                                              << " (straight) vs " << b.at(key).dump() << " (resumed)";
}

TEST_F(E2E, ResumeIsBitwiseIdenticalToNeverStopping) {
  // A: 2N steps straight. B: the same config (same max_steps, so the same LR schedule) stopped
  // after N steps of its first invocation, then resumed from the step-N checkpoint to 2N.
  auto config = [&](const std::string& name) {
    Yaml y = micro_config(dir_, dir_ / name);
    y.set("train.max_steps", std::to_string(2 * kN));
    y.set("checkpoint.every", std::to_string(kN));
    y.set("checkpoint.keep_last", "5");
    y.set("eval.every", "3");
    y.set("log.tensorboard", "false");
    return y;
  };
  const fs::path a_cfg = write_config(config("a"), "a.yaml");
  Yaml b = config("b");
  b.set("train.stop_after", std::to_string(kN));
  const fs::path b_cfg = write_config(b, "b.yaml");

  const RunResult a = train(a_cfg);
  E2E_EXPECT_OK(a);
  const RunResult b1 = train(b_cfg);
  E2E_EXPECT_OK(b1);
  EXPECT_NE(b1.out.find("train.stop_after"), std::string::npos) << b1.describe();
  // Interrupted at N: the step-N checkpoint and nothing later.
  const fs::path a_ck = dir_ / "a" / "checkpoints", b_ck = dir_ / "b" / "checkpoints";
  ASSERT_EQ(list_dir(b_ck, "step_").size(), 1u) << b1.describe();
  EXPECT_EQ(read_file(b_ck / "latest"), "step_000000006\n");
  EXPECT_EQ(rows_by_step(read_jsonl(dir_ / "b" / "metrics.jsonl"), "train").rbegin()->first, kN);

  const RunResult b2 = train(b_cfg, {"--set", "train.stop_after=0", "--resume"});
  E2E_EXPECT_OK(b2);
  EXPECT_NE(b2.out.find("resumed from " + (b_ck / "step_000000006").string() + " at step 6"), std::string::npos)
      << b2.out;

  // Per-step metrics, steps 1..2N: the resumed half must repeat the straight run exactly.
  const auto a_rows = read_jsonl(dir_ / "a" / "metrics.jsonl"), b_rows = read_jsonl(dir_ / "b" / "metrics.jsonl");
  const auto a_train = rows_by_step(a_rows, "train"), b_train = rows_by_step(b_rows, "train");
  ASSERT_EQ(a_train.size(), static_cast<size_t>(2 * kN));
  ASSERT_EQ(b_train.size(), static_cast<size_t>(2 * kN));
  // Each of B's steps was logged exactly once (resume at N repeats nothing).
  EXPECT_EQ(std::count_if(b_rows.begin(), b_rows.end(), [](const auto& r) { return r.at("kind") == "train"; }), 2 * kN);
  for (int64_t step = 1; step <= 2 * kN; ++step) {
    ASSERT_TRUE(a_train.contains(step) && b_train.contains(step)) << "step " << step;
    for (const char* key : {"loss", "aux_loss", "grad_norm", "lr", "tokens_seen", "imbalance_l1", "bias_range_l1",
                            "lambda_l0", "lambda_l1"})
      expect_same(a_train.at(step), b_train.at(step), key, step);
  }
  // Training really moved: the losses are not all the same number.
  EXPECT_NE(a_train.at(1).at("loss"), a_train.at(2 * kN).at("loss"));
  const auto a_val = rows_by_step(a_rows, "val"), b_val = rows_by_step(b_rows, "val");
  ASSERT_EQ(a_val.size(), 4u) << "validation at 3, 6, 9, 12";
  ASSERT_EQ(b_val.size(), a_val.size());
  for (const auto& [step, row] : a_val) {
    ASSERT_TRUE(b_val.contains(step)) << "val step " << step;
    expect_same(row, b_val.at(step), "val_loss", step);
  }

  // The checkpoints at N and 2N: same weights and optimizer state, byte for byte.
  for (const char* step_dir : {"step_000000006", "step_000000012"}) {
    const CheckpointInfo ia = open_checkpoint((a_ck / step_dir).string());
    const CheckpointInfo ib = open_checkpoint((b_ck / step_dir).string());
    for (const char* f : {kShard0}) {
      const std::string fa = read_file(a_ck / step_dir / f), fb = read_file(b_ck / step_dir / f);
      EXPECT_GT(fa.size(), 1000u);
      EXPECT_TRUE(fa == fb) << step_dir << "/" << f << " differs between the straight and the resumed run";
    }
    for (const char* key : {"step", "tokens_seen", "loader", "seed"})
      EXPECT_EQ(ia.state.at(key), ib.state.at(key)) << key;
  }
  EXPECT_EQ(read_file(a_ck / "latest"), "step_000000012\n");
  EXPECT_EQ(read_file(b_ck / "latest"), "step_000000012\n");
}

// train.stop_after counts the steps of one invocation and writes no checkpoint of its own: a
// stop between checkpoints leaves the last periodic one, and the resume redoes the lost steps
// with the same results.
TEST_F(E2E, StopAfterBetweenCheckpointsResumesFromTheLastOne) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "8");
  y.set("train.stop_after", "3");
  y.set("checkpoint.every", "2");
  y.set("log.tensorboard", "false");
  const fs::path cfg = write_config(y);
  // The train loss of every step in metrics.jsonl as it stands now.
  auto losses_now = [&] {
    std::map<int64_t, std::vector<double>> losses;
    for (const auto& row : read_jsonl(dir_ / "run" / "metrics.jsonl"))
      if (row.at("kind") == "train") losses[row.at("step").get<int64_t>()].push_back(row.at("loss").get<double>());
    return losses;
  };
  const RunResult r1 = train(cfg);
  E2E_EXPECT_OK(r1);
  const auto after_r1 = losses_now();  // steps 1..3; step 3 is redone after the resume from step 2
  const fs::path ck = dir_ / "run" / "checkpoints";
  EXPECT_EQ(list_dir(ck, "step_"), std::vector<fs::path>{ck / "step_000000002"});
  const RunResult r2 = train(cfg, {"--resume"});  // stops again 3 steps later, at 5
  E2E_EXPECT_OK(r2);
  EXPECT_NE(r2.out.find("at step 2"), std::string::npos) << r2.out;
  EXPECT_EQ(read_file(ck / "latest"), "step_000000004\n");
  const auto after_r2 = losses_now();  // step 3 once (the interrupted run's row was dropped), up to 5
  const RunResult r3 = train(cfg, {"--set", "train.stop_after=0", "--resume"});
  E2E_EXPECT_OK(r3);
  EXPECT_EQ(read_file(ck / "latest"), "step_000000008\n");

  // A resumed run drops the rows the interrupted run logged after its checkpoint, so every step
  // appears once; steps 3 and 5 ran twice and gave the same loss both times.
  const auto final_losses = losses_now();
  ASSERT_EQ(final_losses.size(), 8u);
  for (const auto& [step, v] : final_losses) EXPECT_EQ(v.size(), 1u) << "step " << step;
  ASSERT_EQ(after_r1.at(3).size(), 1u);
  ASSERT_EQ(after_r2.at(3).size(), 1u);
  EXPECT_EQ(after_r1.at(3).front(), final_losses.at(3).front());
  EXPECT_EQ(after_r2.at(5).front(), final_losses.at(5).front());
}

}  // namespace
}  // namespace diffmoe::e2e
