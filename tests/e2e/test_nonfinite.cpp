// Non-finite values never reach a checkpoint: NaN/inf config values (and those past f32's range,
// inf on the device) are refused by key, a run
// whose weights or optimizer state went non-finite stops (exit 1) without writing a checkpoint or
// moving `latest`, and a non-finite validation loss counts as a bad step.
#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

TEST_F(E2E, NonFiniteConfigValuesAreRefusedByKey) {
  const fs::path cfg = write_config(micro_config(dir_, dir_ / "run"));
  for (const char* key : {"optim.lr",           "optim.min_lr",
                          "optim.weight_decay", "optim.beta1",
                          "optim.beta2",        "optim.eps",
                          "optim.grad_clip",    "train.peak_tflops",
                          "data.val_fraction",  "model.bias_update_rate",
                          "model.route_scale",  "model.aux_loss_alpha",
                          "model.rope_theta",   "model.rope_factor",
                          "model.init_std",     "model.norm_eps",
                          "model.mscale",       "model.beta_fast",
                          "model.beta_slow",    "model.embed_init_std",
                          "model.embed_scale"}) {
    // 1e39 and -3.5e38 are finite doubles but ±inf in f32, where the devices compute.
    for (const char* value : {".inf", "-.inf", ".nan", "1e999", "1e39", "-3.5e38"}) {
      SCOPED_TRACE(std::string(key) + "=" + value);
      expect_clean_error(train(cfg, {"--set", std::string(key) + "=" + value}), {cfg.string(), key, "finite"});
    }
  }
  // In the file itself too, and for `params`, which reads only the model section.
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("model.init_std", ".nan");
  const fs::path bad = write_config(y, "bad.yaml");
  expect_clean_error(train(bad), {bad.string(), "model.init_std", "finite"});
  expect_clean_error(run_diffmoe({"params", "--config", bad.string()}), {bad.string(), "model.init_std", "finite"});
  // Below the smallest double is zero (then "must be positive"), never inf.
  expect_clean_error(train(cfg, {"--set", "optim.lr=1e-400"}), {cfg.string(), "optim.lr", "must be positive, got 0"});
  // An empty value is a mistake, not the default.
  expect_clean_error(train(cfg, {"--set", "optim.lr="}), {cfg.string(), "optim.lr="});
  expect_clean_error(train(cfg, {"--set", "train.max_steps= "}), {cfg.string(), "train.max_steps"});
  Yaml e = micro_config(dir_, dir_ / "run");
  e.set("optim.weight_decay", "");
  const fs::path empty = write_config(e, "empty.yaml");
  expect_clean_error(train(empty), {empty.string(), "optim.weight_decay", "no value"});
  EXPECT_FALSE(fs::exists(dir_ / "run")) << "nothing may start before the config is checked";
}

// A run that makes its state non-finite after a good checkpoint: resumed from step 2 with a
// learning rate of 3.4e38 (f32's largest is 3.40e38) and a weight decay of 100, without warm-up:
// lr·λ·w overflows f32, so Adam's update makes weights inf. The step-3 save must fail: no step_3,
// `latest` stays on step 2, every checkpoint on disk is finite.
TEST_F(E2E, NonFiniteStateIsNeverCheckpointed) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "2");
  y.set("checkpoint.every", "1");
  y.set("checkpoint.keep_last", "5");
  y.set("eval.every", "0");
  E2E_EXPECT_OK(train(write_config(y)));
  const fs::path ck = dir_ / "run" / "checkpoints";
  ASSERT_EQ(read_file(ck / "latest"), "step_000000002\n");
  const RunResult r =
      train(write_config(y), {"--resume", "--set", "train.max_steps=4", "--set", "optim.lr=3.4e38", "--set",
                              "optim.weight_decay=100", "--set", "optim.min_lr=0", "--set", "optim.warmup_steps=0"});
  expect_clean_error(r, {"step 3", "non-finite value(s) in the weights", "no checkpoint written",
                         "Last good checkpoint: " + (ck / "step_000000002").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(read_file(ck / "latest"), "step_000000002\n");
  for (const auto& d : list_dir(ck, "step_")) {
    EXPECT_LE(d.filename().string(), "step_000000002") << "written after the state went bad: " << d;
    EXPECT_EQ(count_non_finite(d / kShard0), 0) << d;
  }

  // The same from the start: the first save already fails, and nothing is written at all.
  Yaml b = y;
  b.set_path("train.out_dir", dir_ / "fresh");
  for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
           {"optim.lr", "3.4e38"}, {"optim.weight_decay", "100"}, {"optim.min_lr", "0"}, {"optim.warmup_steps", "0"}})
    b.set(k, v);
  const RunResult rb = train(write_config(b, "fresh.yaml"));
  expect_clean_error(
      rb, {"step 1", "non-finite value(s) in the weights", "no checkpoint written", "Last good checkpoint: none"});
  EXPECT_FALSE(fs::exists(dir_ / "fresh" / "checkpoints" / "latest"));
  EXPECT_TRUE(list_dir(dir_ / "fresh" / "checkpoints", "step_").empty());
}

// A step whose validation loss is not finite is a bad step: with train.max_bad_steps = 1 the run
// stops there, without a checkpoint of it, naming the last good one.
TEST_F(E2E, NonFiniteValidationLossIsABadStep) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "2");
  y.set("checkpoint.every", "1");
  y.set("eval.every", "0");
  E2E_EXPECT_OK(train(write_config(y)));
  const fs::path ck = dir_ / "run" / "checkpoints";
  // lr 1e37: Adam moves every weight by about 1e37, finite in f32, but the logits overflow.
  const RunResult r =
      train(write_config(y), {"--resume", "--set", "train.max_steps=3", "--set", "optim.lr=1e37", "--set",
                              "optim.min_lr=0", "--set", "optim.warmup_steps=0", "--set", "optim.grad_clip=0"});
  expect_clean_error(r, {"step 3", "non-finite", "Last good checkpoint: " + (ck / "step_000000002").string()});
  EXPECT_EQ(read_file(ck / "latest"), "step_000000002\n");
  EXPECT_FALSE(fs::exists(ck / "step_000000003"));
}

}  // namespace
}  // namespace diffmoe::e2e
