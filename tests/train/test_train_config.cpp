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
  EXPECT_EQ(rc.train.seq_len, 32);           // = model.max_seq_len
  EXPECT_DOUBLE_EQ(rc.optim.min_lr, 0.001);  // = lr / 10
  EXPECT_EQ(rc.checkpoint.dir, "runs/default/checkpoints");
  EXPECT_EQ(rc.tokenizer.vocab_size, 64);
  EXPECT_EQ(rc.resolved["optim"]["beta2"], 0.95);
  EXPECT_EQ(rc.resolved["train"]["grad_accum"], 1);
  EXPECT_EQ(rc.resolved["model"]["embed_scale"], 4.0);  // √dim
  EXPECT_EQ(rc.resolved["train"]["recompute"], "none");
  EXPECT_EQ(rc.optim.moment_dtype, "f32");
  EXPECT_EQ(rc.resolved["optim"]["moment_dtype"], "f32");
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
  EXPECT_NE(error_of(d).find("train.seq_len: must be in [1, model.max_seq_len = 32]"), std::string::npos)
      << error_of(d);
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
  d["train"]["recompute"] = "experts";
  EXPECT_NE(error_of(d).find("run.yaml: train.recompute: expected none, attention, moe or full, got 'experts'"),
            std::string::npos)
      << error_of(d);
  d = doc();
  d["train"]["recompute"] = "full";
  EXPECT_EQ(run_config_from_json(d, "run.yaml").train.recompute, "full");
  // Every mode with expert parallelism (the experts' buffers follow it, model/expert_buffers.h).
  d["parallel"]["expert"] = 2;
  for (const char* mode : {"none", "attention", "moe", "full"}) {
    d["train"]["recompute"] = mode;
    EXPECT_EQ(run_config_from_json(d, "run.yaml").train.recompute, mode);
  }
  d["train"]["recompute"] = "rows";
  EXPECT_NE(error_of(d).find("run.yaml: train.recompute: expected none, attention, moe or full, got 'rows'"),
            std::string::npos)
      << error_of(d);
  d = doc();
  d["optim"]["moment_dtype"] = "f16";
  EXPECT_NE(error_of(d).find("run.yaml: optim.moment_dtype: expected f32 or bf16, got 'f16'"), std::string::npos)
      << error_of(d);
  d = doc();
  d["optim"]["moment_dtype"] = "bf16";
  EXPECT_EQ(run_config_from_json(d, "run.yaml").optim.moment_dtype, "bf16");
  d = doc();
  d["model"]["dimm"] = 3;
  EXPECT_NE(error_of(d).find("model.dimm: unknown key"), std::string::npos) << error_of(d);
}

// A float that is integral but outside int64 would be undefined behaviour to cast.
TEST(RunConfig, HugeIntegralFloatIsNotAnInteger) {
  auto d = doc();
  d["train"]["max_steps"] = 1e30;
  EXPECT_NE(error_of(d).find("run.yaml: train.max_steps: expected an integer, got 1e+30"), std::string::npos)
      << error_of(d);
  d = doc();
  d["train"]["seed"] = 1e30;  // unsigned
  EXPECT_NE(error_of(d).find("run.yaml: train.seed: expected an integer, got 1e+30"), std::string::npos) << error_of(d);
  d = doc();
  d["train"]["seed"] = -1e30;
  EXPECT_NE(error_of(d).find("run.yaml: train.seed: expected an integer, got -1e+30"), std::string::npos)
      << error_of(d);
  d = doc();
  d["train"]["seed"] = -3.0;  // integral and in int64, but negative for an unsigned key
  EXPECT_NE(error_of(d).find("run.yaml: train.seed: must be >= 0"), std::string::npos) << error_of(d);
  d = doc();
  d["checkpoint"]["every"] = -9223372036854775808.0;  // -2^63 is the one in-range edge
  EXPECT_NE(error_of(d).find("run.yaml: checkpoint: every, keep_last and keep_every must be >= 0"), std::string::npos)
      << error_of(d);
  d = doc();
  d["train"]["max_steps"] = 20.0;  // integral and in range: fine
  EXPECT_EQ(run_config_from_json(d, "run.yaml").train.max_steps, 20);
}

TEST(RunConfig, EachRangeErrorNamesItsOwnKey) {
  auto d = doc();
  d["optim"]["lr"] = -1;
  EXPECT_NE(error_of(d).find("run.yaml: optim.lr: must be positive, got -1"), std::string::npos) << error_of(d);
  d = doc();
  d["optim"]["lr"] = 0;
  d["optim"]["min_lr"] = 0;
  EXPECT_NE(error_of(d).find("run.yaml: optim.lr: must be positive"), std::string::npos) << error_of(d);

  // keep_last becomes an int when saving.
  d = doc();
  d["checkpoint"]["keep_last"] = 2147483648LL;
  EXPECT_NE(error_of(d).find("run.yaml: checkpoint.keep_last: must be at most 2147483647"), std::string::npos)
      << error_of(d);
  d["checkpoint"]["keep_last"] = 2147483647LL;
  EXPECT_EQ(error_of(d), "");
}

// train.precision: f32, bf16_gemm or fp8; fp8 not with expert parallelism (docs/model.md §7).
TEST(RunConfig, PrecisionTakesFp8ButNotWithExpertParallelism) {
  auto d = doc();
  for (const char* p : {"f32", "bf16_gemm", "fp8"}) {
    d["train"]["precision"] = p;
    EXPECT_EQ(error_of(d), "") << p;
    EXPECT_EQ(run_config_from_json(d, "run.yaml").train.precision, p);
  }
  d["train"]["precision"] = "fp16";
  EXPECT_NE(error_of(d).find("run.yaml: train.precision: expected f32, bf16_gemm or fp8, got 'fp16'"),
            std::string::npos)
      << error_of(d);
  d["train"]["precision"] = "fp8";
  d["parallel"]["expert"] = 2;
  EXPECT_NE(
      error_of(d).find("run.yaml: train.precision: fp8 is not available with expert parallelism (parallel.expert = 2)"),
      std::string::npos)
      << error_of(d);
  d["train"]["precision"] = "bf16_gemm";
  EXPECT_EQ(error_of(d), "");
}

// The BPE trainer needs the 256 byte tokens and <|endoftext|>; say so under the key, with the file.
TEST(RunConfig, TokenizerVocabSizeToTrainHasAMinimum) {
  auto d = doc();
  d["tokenizer"]["train_inputs"] = "corpus.txt";
  d["tokenizer"]["vocab_size"] = 256;
  EXPECT_NE(error_of(d).find(
                "run.yaml: tokenizer.vocab_size: must be at least 257 (256 byte tokens + <|endoftext|>), got 256"),
            std::string::npos)
      << error_of(d);
  d.erase("tokenizer");
  d["tokenizer"]["train_inputs"] = "corpus.txt";  // the default is model.vocab_size = 64
  EXPECT_NE(error_of(d).find("run.yaml: tokenizer.vocab_size: must be at least 257"), std::string::npos) << error_of(d);
  d["tokenizer"]["vocab_size"] = 4294967296LL;  // would be truncated to int32 for the trainer
  EXPECT_NE(error_of(d).find("run.yaml: tokenizer.vocab_size: must be at most 4194304"), std::string::npos)
      << error_of(d);
  d["tokenizer"]["vocab_size"] = 257;
  EXPECT_EQ(error_of(d), "");
}

TEST(LrSchedule, WarmupThenCosineToMin) {
  EXPECT_DOUBLE_EQ(learning_rate(0, 10, 100, 1.0, 0.1), 0.1);  // (0+1)/10
  EXPECT_DOUBLE_EQ(learning_rate(9, 10, 100, 1.0, 0.1), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(10, 10, 100, 1.0, 0.1), 1.0);     // cosine starts at lr
  EXPECT_NEAR(learning_rate(55, 10, 100, 1.0, 0.1), 0.55, 1e-12);  // halfway: (lr + min)/2
  EXPECT_NEAR(learning_rate(100, 10, 100, 1.0, 0.1), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(500, 10, 100, 1.0, 0.1), 0.1, 1e-12);  // clamped after max_steps
  EXPECT_DOUBLE_EQ(learning_rate(0, 0, 100, 1.0, 0.0), 1.0);       // no warmup
  for (int64_t s = 10; s < 100; ++s)
    EXPECT_GE(learning_rate(s, 10, 100, 1.0, 0.1), learning_rate(s + 1, 10, 100, 1.0, 0.1));
}

}  // namespace
}  // namespace diffmoe
