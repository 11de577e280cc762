// Failures during a run: a NaN/inf loss (stop, name the step, keep the last good checkpoint) and a
// full disk during a checkpoint (the previous one survives) each end the run with a one-line error
// naming the file and field and a non-zero exit, never a crash.
#include <sys/mount.h>

#include <regex>

#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

// (i) Divergence: an absurd learning rate without clipping or warm-up. Adam moves every weight by
// about lr on the first step, so step 2's logits overflow and the loss (or its gradient) is not
// finite. The run must stop before applying that step, naming it, with the last checkpoint intact.
TEST_F(E2E, NonFiniteLossStopsAndKeepsTheLastGoodCheckpoint) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "20");
  y.set("optim.lr", "1.0e6");
  y.set("optim.min_lr", "1.0e6");
  y.set("optim.warmup_steps", "0");
  y.set("optim.grad_clip", "0");
  y.set("checkpoint.every", "1");
  y.set("checkpoint.keep_last", "2");
  y.set("eval.every", "0");
  const RunResult r = train(write_config(y));
  const std::string err = expect_clean_error(r, {"step ", "non-finite"});
  std::smatch m;
  ASSERT_TRUE(std::regex_search(err, m, std::regex("step (\\d+): non-finite (loss|gradient norm)"))) << err;
  const int64_t k = std::stoll(m[1].str());
  ASSERT_GE(k, 2) << "diverged on the first step: no checkpoint to keep; make the test diverge later\n" << r.describe();
  ASSERT_LT(k, 20) << "the run did not diverge\n" << r.describe();

  // The last good checkpoint is step k-1; it is named in the error, `latest` points at it, it
  // verifies and its weights are finite.
  const fs::path ck = dir_ / "run" / "checkpoints";
  const std::string last = fmt::format("step_{:09d}", k - 1);
  EXPECT_NE(err.find((ck / last).string()), std::string::npos) << "the error names the last good checkpoint\n" << err;
  EXPECT_EQ(read_file(ck / "latest"), last + "\n");
  const std::vector<fs::path> dirs = list_dir(ck, "step_");
  ASSERT_FALSE(dirs.empty());
  EXPECT_EQ(dirs.back(), ck / last) << "nothing newer than the last good step";
  for (const auto& d : dirs) EXPECT_EQ(d.extension(), "") << "a temporary directory was left: " << d;
  EXPECT_NO_THROW(open_checkpoint((ck / last).string()));
  EXPECT_EQ(count_non_finite(ck / last / kShard0), 0);
  // The logs are complete up to the last good step.
  const auto rows = read_jsonl(dir_ / "run" / "metrics.jsonl");
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back().at("step").get<int64_t>(), k - 1);
  // The stopped run's checkpoint is usable: `diffmoe eval` loads it and reports a number.
  const RunResult ev = run_diffmoe({"eval", "--checkpoint", (ck / last).string(), "--data", (dir_ / "shards").string(),
                                    "--batch", "2", "--seq", "32", "--batches", "1"});
  EXPECT_TRUE(ev.exited) << ev.describe();
}

// Runs a checkpointing training whose checkpoint root lives on `root`, expecting the SECOND save
// (step 2) to fail for lack of space, and checks that step 1 survives.
void expect_second_checkpoint_fails(const RunResult& r, const fs::path& root, const std::string& why) {
  expect_clean_error(r, {root.string(), why, "step 2 not saved"});
  EXPECT_EQ(read_file(root / "latest"), "step_000000001\n");
  EXPECT_EQ(list_dir(root, "step_"), std::vector<fs::path>{root / "step_000000001"})
      << "no step_2 or *.tmp directory may remain";
  EXPECT_NO_THROW(open_checkpoint((root / "step_000000001").string()));
  EXPECT_EQ(count_non_finite(root / "step_000000001" / kShard0), 0);
}

// Bytes a file takes on tmpfs (whole pages).
uintmax_t pages(uintmax_t bytes) { return (bytes + 4095) / 4096 * 4096; }

// (j) A full disk during a checkpoint: the checkpoint root on a tmpfs that holds one checkpoint
// but not two. Needs mount(2) (root in a mount namespace); skipped otherwise.
TEST_F(E2E, FullDiskDuringCheckpointKeepsThePreviousOne) {
  // Measure one checkpoint of this model on the ordinary disk first.
  Yaml probe = micro_config(dir_, dir_ / "probe");
  probe.set("train.max_steps", "1");
  probe.set("eval.every", "0");
  E2E_EXPECT_OK(train(write_config(probe, "probe.yaml")));
  uintmax_t one = 0;
  for (const auto& f : list_dir(dir_ / "probe" / "checkpoints" / "step_000000001")) one += pages(fs::file_size(f));
  ASSERT_GT(one, 8192u);

  const fs::path root = dir_ / "ckpt_fs";
  fs::create_directories(root);
  // One checkpoint, `latest`, directories and slack, but not a second model.safetensors on top.
  const uintmax_t size = one + one / 4 + 8 * 4096;
  const std::string opts = "size=" + std::to_string(size);
  if (::mount("tmpfs", root.c_str(), "tmpfs", 0, opts.c_str()) != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno)
                 << "); the RLIMIT_FSIZE variant covers the error path";
  }
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{root};

  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "3");
  y.set("checkpoint.every", "1");
  y.set("checkpoint.keep_last", "5");
  y.set("eval.every", "0");
  y.set_path("checkpoint.dir", root);
  const RunResult r = train(write_config(y));
  expect_second_checkpoint_fails(r, root, "No space left on device");
  // The file being written is named.
  EXPECT_NE(r.err.find(".safetensors"), std::string::npos) << r.err;
  // What survived is what a resume picks up (nothing left to train at max_steps 1: read only).
  const RunResult again = train(write_config(y), {"--set", "train.max_steps=1", "--resume"});
  E2E_EXPECT_OK(again);
  EXPECT_NE(again.out.find("resumed from " + (root / "step_000000001").string()), std::string::npos) << again.out;
}

// The same error path without privileges: RLIMIT_FSIZE below the size of the state shard makes
// the very first checkpoint fail with EFBIG ("File too large"). The tokenizer and shards are made
// beforehand; the rest the run writes (config, logs, trainer state) is far below the limit.
TEST_F(E2E, FileSizeLimitDuringCheckpointFailsCleanly) {
  Yaml probe = micro_config(dir_, dir_ / "probe");
  probe.set("train.max_steps", "1");
  probe.set("eval.every", "0");
  E2E_EXPECT_OK(train(write_config(probe, "probe.yaml")));
  const uintmax_t model_bytes = fs::file_size(dir_ / "probe" / "checkpoints" / "step_000000001" / kShard0);
  ASSERT_GT(model_bytes, 64u * 1024) << "the limit must stay above the run's other files";

  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "3");
  y.set("checkpoint.every", "1");
  y.set("eval.every", "0");
  const fs::path root = dir_ / "run" / "checkpoints";
  const RunResult r = train(write_config(y), {}, with_fsize_limit(model_bytes / 2));
  const std::string err = expect_clean_error(r, {root.string(), kShard0, "File too large", "step 1 not saved"});
  EXPECT_FALSE(fs::exists(root / "latest"));
  EXPECT_TRUE(list_dir(root, "step_").empty()) << "no step_1 or step_1.tmp may remain";
  for (const auto& f : list_dir(root)) ADD_FAILURE() << "left behind: " << f;

  // With a checkpoint already there, a later failing save keeps it (limit between the sizes of
  // trainer_state.json and the state shard, applied to a resumed run).
  Yaml ok = y;
  ok.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(ok, "ok.yaml"), {"--overwrite"}));  // over the failed run's logs
  const RunResult r2 = train(write_config(y), {"--resume"}, with_fsize_limit(model_bytes / 2));
  expect_second_checkpoint_fails(r2, root, "File too large");
}

}  // namespace
}  // namespace diffmoe::e2e
