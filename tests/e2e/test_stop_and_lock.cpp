// Runs that end early or meet each other: SIGINT/SIGTERM/SIGUSR1 stop a run after its step with a
// checkpoint and exit code 75 (a second signal ends it at once); kill -9 at random points never
// leaves a checkpoint a resume would trust wrongly; two trainers on one directory: the second is
// refused naming the first; a fresh run over an earlier one needs --resume or --overwrite.
#include <random>

#include "e2e_util.h"
#include "io/checkpoint.h"

namespace diffmoe::e2e {
namespace {

constexpr int kExitStopped = 75;  // train/stop_signal.h

// The largest "train" step in a metrics.jsonl that another process may be writing (a torn last
// line is skipped); 0 when none.
int64_t last_train_step(const fs::path& metrics) {
  int64_t last = 0;
  for (const auto& line : split_lines(read_file(metrics))) {
    const auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (row.is_object() && row.value("kind", "") == "train" && row.contains("step") && row["step"].is_number_integer())
      last = std::max(last, row["step"].get<int64_t>());
  }
  return last;
}

// A run long enough to be stopped by hand: many steps, no checkpoint or validation of its own.
Yaml long_run(const fs::path& dir, const fs::path& out) {
  Yaml y = micro_config(dir, out);
  y.set("train.max_steps", "100000");
  y.set("checkpoint.every", "0");
  y.set("eval.every", "0");
  y.set("log.tensorboard", "false");
  return y;
}

// Every stderr line of a run that did not fail is a warning.
void expect_only_warnings(const RunResult& r) {
  for (const auto& line : split_lines(r.err))
    if (!line.empty()) {
      EXPECT_EQ(line.rfind("warning: ", 0), 0u) << "unexpected stderr line: " << line << "\n" << r.describe();
    }
}

// The run has a first step logged: it is inside the training loop.
void wait_for_step(const Child& c, const fs::path& metrics, int64_t step) {
  ASSERT_TRUE(wait_until([&] { return last_train_step(metrics) >= step || ::kill(c.pid, 0) != 0; }, 120))
      << "no step " << step << " logged\n"
      << c.out() << c.err();
  ASSERT_GE(last_train_step(metrics), step) << "the trainer ended early\n" << c.out() << c.err();
}

TEST_F(E2E, StopSignalsFinishTheStepWriteACheckpointAndExit75) {
  for (const int sig : {SIGTERM, SIGINT, SIGUSR1}) {
    const std::string name = sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : "SIGUSR1";
    SCOPED_TRACE(name);
    const fs::path out = dir_ / ("run_" + name);
    const fs::path cfg = write_config(long_run(dir_, out), name + ".yaml");
    Child c = spawn_diffmoe({"train", "--config", cfg.string()}, in_dir(dir_));
    wait_for_step(c, out / "metrics.jsonl", 2);
    ::kill(c.pid, sig);
    const RunResult r = wait_diffmoe(c);
    ASSERT_TRUE(r.exited) << r.describe();
    EXPECT_EQ(r.code, kExitStopped) << r.describe();
    expect_only_warnings(r);
    // It stopped after a whole step, saved it, and said where.
    const int64_t k = last_train_step(out / "metrics.jsonl");
    const std::string step_dir = fmt::format("step_{:09d}", k);
    const fs::path ck = out / "checkpoints";
    EXPECT_NE(r.out.find(fmt::format("stopped by {} at step {}", name, k)), std::string::npos) << r.out;
    EXPECT_NE(r.out.find((ck / step_dir).string()), std::string::npos) << r.out;
    EXPECT_EQ(read_file(ck / "latest"), step_dir + "\n");
    EXPECT_NO_THROW(open_checkpoint((ck / step_dir).string()));
    EXPECT_EQ(count_non_finite(ck / step_dir / kShard0), 0);
    // And it continues from there.
    Yaml more = long_run(dir_, out);
    more.set("train.max_steps", std::to_string(k + 2));
    const RunResult again = train(write_config(more, name + "_more.yaml"), {"--resume"});
    E2E_EXPECT_OK(again);
    EXPECT_NE(again.out.find(fmt::format("resumed from {} at step {}", (ck / step_dir).string(), k)), std::string::npos)
        << again.out;
    EXPECT_EQ(read_file(ck / "latest"), fmt::format("step_{:09d}\n", k + 2));
  }
}

// A signal while the run is being set up (here: once the tokenizer is trained, while the shards are
// made) lets that work finish and stops the run before it trains on: exit 75 with the same message,
// and no checkpoint when no step ran. (Should set-up win the race, the run stops after its first
// step instead: exit 75 all the same.)
TEST_F(E2E, AStopSignalDuringSetUpExits75) {
  const fs::path out = dir_ / "run_setup";
  Yaml y = long_run(dir_, out);
  y.set_path("tokenizer.path", dir_ / "setup_tok" / "tokenizer.json");
  y.set_path("data.shards", dir_ / "setup_shards");
  const fs::path cfg = write_config(y, "setup.yaml");
  Child c = spawn_diffmoe({"train", "--config", cfg.string()}, in_dir(dir_));
  ASSERT_TRUE(
      wait_until([&] { return c.out().find("tokenizer: trained") != std::string::npos || ::kill(c.pid, 0) != 0; }, 120))
      << c.out() << c.err();
  ::kill(c.pid, SIGTERM);
  const RunResult r = wait_diffmoe(c);
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_EQ(r.code, kExitStopped) << r.describe();
  expect_only_warnings(r);
  const int64_t k = fs::exists(out / "metrics.jsonl") ? last_train_step(out / "metrics.jsonl") : 0;
  EXPECT_NE(r.out.find(fmt::format("stopped by SIGTERM at step {}", std::max<int64_t>(k, 0))), std::string::npos)
      << r.out;
  if (k <= 0) {
    EXPECT_FALSE(fs::exists(out / "checkpoints" / "latest")) << "no step ran: nothing to checkpoint";
  }
  // The tokenizer and shards it made are complete: a resumed run uses them.
  y.set("train.max_steps", "2");
  E2E_EXPECT_OK(train(write_config(y, "setup_more.yaml"), {k > 0 ? "--resume" : "--overwrite"}));
}

TEST_F(E2E, ASecondSignalEndsTheRunAtOnce) {
  const fs::path out = dir_ / "run";
  const fs::path cfg = write_config(long_run(dir_, out));
  Child c = spawn_diffmoe({"train", "--config", cfg.string()}, in_dir(dir_));
  wait_for_step(c, out / "metrics.jsonl", 1);
  ::kill(c.pid, SIGINT);
  ::kill(c.pid, SIGTERM);  // another signal: two of one kind could merge while pending
  const RunResult r = wait_diffmoe(c);
  ASSERT_FALSE(r.exited) << "the second signal must end the process by its default action\n" << r.describe();
  EXPECT_TRUE(r.signal == SIGTERM || r.signal == SIGINT) << r.describe();
  EXPECT_FALSE(fs::exists(out / "checkpoints" / "latest")) << "no checkpoint after a second signal";
  // The kernel dropped the run lock with the process: the directory is usable at once.
  Yaml y = long_run(dir_, out);
  y.set("train.max_steps", "1");
  E2E_EXPECT_OK(train(write_config(y, "short.yaml"), {"--overwrite"}));
}

TEST_F(E2E, ASecondTrainerOnTheSameDirectoriesIsRefused) {
  const fs::path out = dir_ / "run";
  const fs::path cfg = write_config(long_run(dir_, out));
  Child a = spawn_diffmoe({"train", "--config", cfg.string()}, in_dir(dir_));
  wait_for_step(a, out / "metrics.jsonl", 1);
  const std::string holder = fmt::format("pid {}", a.pid);
  // Same out_dir, fresh or resumed.
  expect_clean_error(train(cfg), {out.string(), "in use by another diffmoe process", holder, "train.lock"});
  expect_clean_error(train(cfg, {"--resume"}), {out.string(), "in use by another diffmoe process", holder});
  // Another out_dir, but the same checkpoint directory.
  Yaml other = long_run(dir_, dir_ / "other");
  other.set_path("checkpoint.dir", out / "checkpoints");
  expect_clean_error(train(write_config(other, "other.yaml")),
                     {(out / "checkpoints").string(), "in use by another diffmoe process", holder});
  ::kill(a.pid, SIGTERM);
  const RunResult r = wait_diffmoe(a);
  EXPECT_TRUE(r.exited && r.code == kExitStopped) << r.describe();
  // The refused trainers wrote nothing: the config is the holder's and its metrics are whole lines.
  const std::string metrics = read_file(out / "metrics.jsonl");
  EXPECT_EQ(metrics.find('\0'), std::string::npos) << "NUL bytes in metrics.jsonl";
  read_jsonl(out / "metrics.jsonl");  // every line parses
  EXPECT_NE(read_file(out / "config.yaml").find("max_steps: 100000"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_ / "other" / "metrics.jsonl"));
}

TEST_F(E2E, AFreshRunOverAnEarlierRunNeedsResumeOrOverwrite) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "4");
  y.set("checkpoint.every", "2");
  const fs::path cfg = write_config(y);
  E2E_EXPECT_OK(train(cfg));
  const fs::path ck = dir_ / "run" / "checkpoints", metrics = dir_ / "run" / "metrics.jsonl";
  const std::string metrics_before = read_file(metrics);
  // A fresh run here would truncate the metrics and move `latest` back to step 2: refused.
  Yaml shorter = y;
  shorter.set("train.max_steps", "2");
  const fs::path short_cfg = write_config(shorter, "short.yaml");
  expect_clean_error(train(short_cfg),
                     {(dir_ / "run").string(), "earlier run", "--resume", "--overwrite", metrics.string()});
  EXPECT_EQ(read_file(ck / "latest"), "step_000000004\n");
  EXPECT_EQ(read_file(metrics), metrics_before);
  const RunResult both = train(short_cfg, {"--resume", "--overwrite"});
  EXPECT_TRUE(both.exited && both.code != 0) << both.describe();
  // --overwrite: the earlier checkpoints and logs go, the new run's are all that is left.
  const RunResult fresh = train(short_cfg, {"--overwrite"});
  E2E_EXPECT_OK(fresh);
  EXPECT_EQ(read_file(ck / "latest"), "step_000000002\n");
  EXPECT_EQ(list_dir(ck, "step_"), std::vector<fs::path>{ck / "step_000000002"});
  std::vector<int64_t> steps;
  for (const auto& row : read_jsonl(metrics))
    if (row.at("kind") == "train") steps.push_back(row.at("step").get<int64_t>());
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(list_dir(dir_ / "run" / "tb", "events.out.tfevents.").size(), 1u);
}

// kill -9 at random moments (start-up, mid-step, mid-checkpoint), each run continuing the last:
// every step_* directory is complete, `latest` names one that verifies, and the run finishes.
TEST_F(E2E, KillNineAtRandomPointsNeverLeavesABadCheckpoint) {
  Yaml y = micro_config(dir_, dir_ / "run");
  y.set("train.max_steps", "12");
  y.set("checkpoint.every", "1");
  y.set("checkpoint.keep_last", "2");
  y.set("eval.every", "0");
  const fs::path cfg = write_config(y);
  const fs::path ck = dir_ / "run" / "checkpoints";
  // The tokenizer and shards first, so that the kills land in training rather than data preparation.
  Yaml prep = y;
  prep.set("train.max_steps", "1");
  prep.set_path("train.out_dir", dir_ / "prep");
  E2E_EXPECT_OK(train(write_config(prep, "prep.yaml")));
  std::mt19937 rng(20240607);
  std::uniform_int_distribution<int> delay_ms(50, 1500);
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE(round);
    std::vector<std::string> args = {"train", "--config", cfg.string()};
    if (find_latest_checkpoint(ck.string())) args.push_back("--resume");
    else if (fs::exists(dir_ / "run" / "metrics.jsonl")) args.push_back("--overwrite");
    Child c = spawn_diffmoe(args, in_dir(dir_));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    ::kill(c.pid, SIGKILL);
    const RunResult r = wait_diffmoe(c);
    if (r.exited) E2E_EXPECT_OK(r);  // it may have finished before the kill
    for (const auto& d : list_dir(ck, "step_")) {
      if (d.string().find(".tmp") != std::string::npos) continue;  // an unfinished save: never used
      EXPECT_NO_THROW(open_checkpoint(d.string())) << d;
    }
    std::vector<std::string> warnings;
    const auto latest = find_latest_checkpoint(ck.string(), &warnings);
    if (fs::exists(ck / "latest")) {
      ASSERT_TRUE(latest.has_value());
      EXPECT_EQ(count_non_finite(fs::path(latest->dir) / kShard0), 0);
    }
  }
  const RunResult last = train(cfg, {find_latest_checkpoint(ck.string()) ? "--resume" : "--overwrite"});
  E2E_EXPECT_OK(last);
  EXPECT_EQ(read_file(ck / "latest"), "step_000000012\n");
  for (const auto& d : list_dir(ck, "step_"))
    EXPECT_EQ(d.string().find(".tmp"), std::string::npos) << "left behind: " << d;
  EXPECT_NO_THROW(open_checkpoint((ck / "step_000000012").string()));
}

}  // namespace
}  // namespace diffmoe::e2e
