#include <gtest/gtest.h>

#include <cmath>

#include "train/lr_schedule.h"
#include "train/train_config.h"

namespace diffmoe {
namespace {

nlohmann::ordered_json doc() {
  return nlohmann::ordered_json::parse(R"({
    "model": {"vocab_size": 64, "dim": 16, "n_layers": 2, "n_dense_layers": 1, "n_heads": 2, "q_lora_rank": 0,
              "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4, "inter_dim": 32,
              "moe_inter_dim": 8, "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "max_seq_len": 32},
    "train": {"micro_batch": 4, "max_steps": 10},
    "optim": {"lr": 0.01}
  })");
}

std::string error_of(nlohmann::ordered_json d) {
  try {
    run_config_from_json(std::move(d), "run.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(RunConfig, DefaultsAreResolvedAndRecorded) {
  const RunConfig rc = run_config_from_json(doc(), "run.yaml");
  EXPECT_EQ(rc.train.seq_len, 32);             // = model.max_seq_len
  EXPECT_DOUBLE_EQ(rc.optim.min_lr, 0.001);     // = lr / 10
  EXPECT_EQ(rc.checkpoint.dir, "runs/default/checkpoints");
  EXPECT_EQ(rc.tokenizer.vocab_size, 64);
  EXPECT_EQ(rc.resolved["optim"]["beta2"], 0.95);
  EXPECT_EQ(rc.resolved["train"]["grad_accum"], 1);
  EXPECT_EQ(rc.resolved["model"]["embed_scale"], 4.0);  // √dim
}

TEST(RunConfig, ErrorsNameFileAndDottedKey) {
  auto d = doc();
  d["train"]["bogus"] = 1;
  EXPECT_NE(error_of(d).find("run.yaml: train.bogus: unknown key"), std::string::npos) << error_of(d);
  d = doc();
  d["optim"]["lr"] = "fast";
  EXPECT_NE(error_of(d).find("run.yaml: optim.lr: expected a number"), std::string::npos) << error_of(d);
  d = doc();
  d["train"]["micro_batch"] = 1.5;
  EXPECT_NE(error_of(d).find("train.micro_batch: expected an integer"), std::string::npos) << error_of(d);
  d = doc();
  d["train"]["seq_len"] = 64;
  EXPECT_NE(error_of(d).find("train.seq_len: must be in [1, model.max_seq_len = 32]"), std::string::npos) << error_of(d);
  d = doc();
  d["optim"]["min_lr"] = 1.0;
  EXPECT_NE(error_of(d).find("optim.min_lr"), std::string::npos) << error_of(d);
  d = doc();
  d["log"]["tensorboard"] = "yes";
  EXPECT_NE(error_of(d).find("log.tensorboard: expected true or false"), std::string::npos) << error_of(d);
  d = doc();
  d["extras"] = nlohmann::ordered_json::object();
  EXPECT_NE(error_of(d).find("run.yaml: extras: unknown top-level section"), std::string::npos) << error_of(d);
  d = doc();
  d["model"]["dimm"] = 3;
  EXPECT_NE(error_of(d).find("model.dimm: unknown key"), std::string::npos) << error_of(d);
}

TEST(LrSchedule, WarmupThenCosineToMin) {
  EXPECT_DOUBLE_EQ(learning_rate(0, 10, 100, 1.0, 0.1), 0.1);   // (0+1)/10
  EXPECT_DOUBLE_EQ(learning_rate(9, 10, 100, 1.0, 0.1), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(10, 10, 100, 1.0, 0.1), 1.0);  // cosine starts at lr
  EXPECT_NEAR(learning_rate(55, 10, 100, 1.0, 0.1), 0.55, 1e-12);  // halfway: (lr + min)/2
  EXPECT_NEAR(learning_rate(100, 10, 100, 1.0, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(500, 10, 100, 1.0, 0.1), 0.1, 1e-12);  // clamped after max_steps
  EXPECT_DOUBLE_EQ(learning_rate(0, 0, 100, 1.0, 0.0), 1.0);        // no warmup
  for (int64_t s = 10; s < 100; ++s) EXPECT_GE(learning_rate(s, 10, 100, 1.0, 0.1), learning_rate(s + 1, 10, 100, 1.0, 0.1));
}

}  // namespace
}  // namespace diffmoe
