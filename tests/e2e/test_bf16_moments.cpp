// optim.moment_dtype: bf16 end to end on the CPU: the tiny preset's model trains like f32 moments
// (the loss falls as far, within a stated margin); stopping and resuming with bf16 moments repeats
// the straight run bit for bit; resuming an f32-moment checkpoint with bf16 moments converts them
// and says so.
#include <map>

#include "e2e_util.h"
#include "io/config_file.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace diffmoe::e2e {
namespace {

// kind == "train" rows of a metrics.jsonl by step (a step logged twice keeps the later row).
std::map<int64_t, nlohmann::json> train_rows(const fs::path& metrics) {
  std::map<int64_t, nlohmann::json> m;
  for (const auto& r : read_jsonl(metrics))
    if (r.at("kind") == "train") m[r.at("step").get<int64_t>()] = r;
  return m;
}

double mean_loss(const std::map<int64_t, nlohmann::json>& rows, int64_t first, int64_t last) {
  double s = 0.0;
  for (int64_t k = first; k <= last; ++k) s += rows.at(k).at("loss").get<double>();
  return s / static_cast<double>(last - first + 1);
}

TEST_F(E2E, Bf16MomentsTrainTheTinyModelLikeF32Moments) {
  // configs/tiny.yaml's model on the micro run's data and tokenizer (as test_recompute_train.cpp).
  const nlohmann::ordered_json tiny = load_yaml_file(test::repo_path("configs/tiny.yaml"));
  constexpr int64_t kSteps = 12;
  auto config = [&](const std::string& moments) {
    Yaml y = micro_config(dir_, dir_ / moments);
    for (const auto& [k, v] : tiny.at("model").items()) y.set("model." + k, v.dump());
    y.set("train.micro_batch", "2");
    y.set("train.seq_len", "32");
    y.set("train.max_steps", std::to_string(kSteps));
    y.set("eval.every", "0");
    y.set("checkpoint.every", std::to_string(kSteps));
    y.set("log.tensorboard", "false");
    return write_config(y, moments + ".yaml");
  };
  const RunResult f = train(config("f32"));
  E2E_EXPECT_OK(f);
  // The same config file, the key given on the command line.
  const RunResult b = train(config("bf16"), {"--set", "optim.moment_dtype=bf16"});
  E2E_EXPECT_OK(b);
  const auto rf = train_rows(dir_ / "f32" / "metrics.jsonl"), rb = train_rows(dir_ / "bf16" / "metrics.jsonl");
  ASSERT_EQ(rf.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(rb.size(), static_cast<size_t>(kSteps));
  // Step 1 sees the same weights and batch: the same loss, bit for bit.
  EXPECT_EQ(rf.at(1).at("loss"), rb.at(1).at("loss"));
  const double f_start = mean_loss(rf, 1, 3), f_end = mean_loss(rf, kSteps - 2, kSteps);
  const double b_start = mean_loss(rb, 1, 3), b_end = mean_loss(rb, kSteps - 2, kSteps);
  std::printf("mean loss of steps 1-3 -> %lld-%lld: f32 moments %.4f -> %.4f, bf16 moments %.4f -> %.4f\n",
              static_cast<long long>(kSteps - 2), static_cast<long long>(kSteps), f_start, f_end, b_start, b_end);
  EXPECT_LT(f_end, f_start - 0.5) << "f32 moments: the loss falls";
  EXPECT_LT(b_end, b_start - 0.5) << "bf16 moments: the loss falls";
  // As far as with f32 moments: bf16 keeps 8 bits of each moment, a relative error of at most
  // 2^-9 per element per step, which moves the update m̂/√v̂ by about as much; over this short run
  // the loss curves stay within a few hundredths of a nat of each other (0.05 allows for the
  // routing decisions that such changes can flip).
  EXPECT_NEAR(b_end, f_end, 0.05);
  EXPECT_NE(rf.at(kSteps).at("loss"), rb.at(kSteps).at("loss")) << "the bf16 run really stored bf16 moments";
  // The checkpoint's moments are bf16 tensors.
  const SafetensorsFile shard =
      SafetensorsFile::open((dir_ / "bf16" / "checkpoints" / "step_000000012" / kShard0).string());
  int64_t moments = 0;
  for (const std::string& n : shard.names())
    if (n.rfind("m/", 0) == 0 || n.rfind("v/", 0) == 0) {
      EXPECT_EQ(shard.get(n).dtype, DType::kBF16) << n;
      ++moments;
    }
  EXPECT_GT(moments, 0);
}

TEST_F(E2E, Bf16MomentsResumeIsBitwiseIdenticalToNeverStopping) {
  constexpr int kN = 4;
  auto config = [&](const std::string& name, int64_t stop_after) {
    Yaml y = micro_config(dir_, dir_ / name);
    y.set("train.max_steps", std::to_string(2 * kN));
    y.set("train.stop_after", std::to_string(stop_after));
    y.set("checkpoint.every", std::to_string(kN));
    y.set("eval.every", "0");
    y.set("log.tensorboard", "false");
    y.set("optim.moment_dtype", "bf16");
    return write_config(y, name + ".yaml");
  };
  const RunResult a = train(config("a", 0));
  E2E_EXPECT_OK(a);
  const fs::path b_cfg = config("b", kN);
  const RunResult b1 = train(b_cfg);
  E2E_EXPECT_OK(b1);
  const RunResult b2 = train(b_cfg, {"--set", "train.stop_after=0", "--resume"});
  E2E_EXPECT_OK(b2);
  EXPECT_EQ(b2.out.find("converting"), std::string::npos) << "same moment dtype: no conversion\n" << b2.out;
  const auto ra = train_rows(dir_ / "a" / "metrics.jsonl"), rb = train_rows(dir_ / "b" / "metrics.jsonl");
  ASSERT_EQ(ra.size(), static_cast<size_t>(2 * kN));
  ASSERT_EQ(rb.size(), static_cast<size_t>(2 * kN));
  for (int64_t step = 1; step <= 2 * kN; ++step)
    for (const char* key : {"loss", "grad_norm", "lr"})
      EXPECT_EQ(ra.at(step).at(key), rb.at(step).at(key)) << key << " at step " << step;
  EXPECT_NE(ra.at(1).at("loss"), ra.at(2 * kN).at("loss"));
  const std::string end = "step_000000008";
  const std::string a_shard = read_file(dir_ / "a" / "checkpoints" / end / kShard0);
  EXPECT_TRUE(a_shard == read_file(dir_ / "b" / "checkpoints" / end / kShard0)) << "the final state shards differ";
}

TEST_F(E2E, ResumingAnotherMomentDtypeConvertsWithANotice) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "8");
  y.set("train.stop_after", "4");
  y.set("checkpoint.every", "2");
  y.set("eval.every", "0");
  y.set("log.tensorboard", "false");
  const fs::path cfg = write_config(y);
  const RunResult first = train(cfg);  // f32 moments, stopped at step 4
  E2E_EXPECT_OK(first);
  const RunResult r = train(cfg, {"--set", "train.stop_after=2", "--set", "optim.moment_dtype=bf16", "--resume"});
  E2E_EXPECT_OK(r);
  EXPECT_NE(r.out.find("resume: the checkpoint's Adam moments are f32, this run's optim.moment_dtype makes them bf16: "
                       "converting (rounded to nearest even)"),
            std::string::npos)
      << r.out;
  // Stopped at step 6 with its checkpoint; and back: its bf16 moments into f32 moments, exactly.
  const RunResult back = train(cfg, {"--set", "train.stop_after=0", "--resume"});
  E2E_EXPECT_OK(back);
  EXPECT_NE(back.out.find("the checkpoint's Adam moments are bf16, this run's optim.moment_dtype makes them f32: "
                          "converting (exact)"),
            std::string::npos)
      << back.out;
  EXPECT_EQ(train_rows(dir_ / "run" / "metrics.jsonl").rbegin()->first, 8);
}

}  // namespace
}  // namespace diffmoe::e2e
