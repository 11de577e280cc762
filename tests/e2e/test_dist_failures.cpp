// Failures of a multi-rank `diffmoe train` (docs/parallelism.md §6), real processes on CPU ranks: a
// rank killed with SIGKILL ends every rank (and mpirun) with a non-zero status within the collective
// timeout, leaving `latest` on a complete checkpoint that resumes; a corrupt state shard is named by
// every rank's error on resume; SIGTERM to one rank stops every rank after the same step with a
// checkpoint and exit code 75.
#include <random>
#include <regex>

#include "dist_util.h"

namespace diffmoe::e2e {
namespace {

constexpr int kExitStopped = 75;  // train/stop_signal.h
constexpr int kTimeoutS = 10;     // DIFFMOE_DIST_TIMEOUT_S of the killed runs: a dead peer is noticed within it

class DistFailures : public E2E {
 protected:
  // A run long enough to be stopped by hand: a checkpoint every step, no validation.
  Yaml long_run(const std::string& name) {
    Yaml y = micro_config(dir_, dir_ / name);
    y.set("train.max_steps", "100000");
    y.set("checkpoint.every", "1");
    y.set("checkpoint.keep_last", "2");
    y.set("eval.every", "0");
    y.set("log.tensorboard", "false");
    return y;
  }
  void prepare_data() {
    Yaml y = long_run("prep");
    y.set("train.max_steps", "1");
    E2E_EXPECT_OK(train(write_config(y, "prep.yaml")));
  }
  static std::vector<std::string> args(const fs::path& cfg, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"train", "--config", cfg.string()};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  // Waits until `metrics` logs step `step` while `alive` holds.
  template <class Alive>
  void wait_for_step(const fs::path& metrics, int64_t step, Alive alive) {
    ASSERT_TRUE(wait_until([&] { return last_logged_step(metrics) >= step || !alive(); }, 120))
        << "no step " << step << " logged";
    ASSERT_GE(last_logged_step(metrics), step) << "the run ended early";
  }
  // `latest` names a checkpoint that verifies, whose state reads whole, and that resumes on 2 ranks.
  void expect_latest_resumes(const std::string& name) {
    const fs::path ck = dir_ / name / "checkpoints";
    const auto latest = find_latest_checkpoint(ck.string());
    ASSERT_TRUE(latest.has_value()) << "no valid checkpoint in " << ck;
    EXPECT_EQ(read_file(ck / "latest"), fs::path(latest->dir).filename().string() + "\n")
        << "latest is not the newest valid one";
    EXPECT_NO_THROW(compare_states(latest->dir, latest->dir));  // every element of every tensor present
    Yaml y = long_run(name);
    y.set("train.max_steps", std::to_string(latest->step + 2));
    std::vector<Child> ranks = spawn_torchrun(2, args(write_config(y, name + "_more.yaml"), {"--resume"}), dir_);
    const std::vector<RunResult> rs = wait_all(ranks);
    for (const RunResult& r : rs) ASSERT_TRUE(r.exited && r.code == 0) << describe_all(rs);
    EXPECT_NE(rs[0].out.find(fmt::format("resumed from {} at step {}", latest->dir, latest->step)), std::string::npos)
        << rs[0].out;
    EXPECT_EQ(read_file(ck / "latest"), fmt::format("step_{:09d}\n", latest->step + 2));
  }
  double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }
};

// torchrun launch: rank 1 killed at a random moment of a step; rank 0 fails at once naming the peer.
TEST_F(DistFailures, AKilledRankEndsEveryRankAndLeavesAResumableCheckpoint) {
  prepare_data();
  std::mt19937 rng(20240611);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    const std::string name = fmt::format("run{}", round);
    std::vector<Child> ranks = spawn_torchrun(2, args(write_config(long_run(name), name + ".yaml")), dir_, kTimeoutS);
    wait_for_step(dir_ / name / "metrics.jsonl", 2, [&] { return ::kill(ranks[1].pid, 0) == 0; });
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 150)(rng)));
    const auto killed_at = std::chrono::steady_clock::now();
    ::kill(ranks[1].pid, SIGKILL);
    const std::vector<RunResult> rs = wait_all(ranks);
    EXPECT_LT(seconds_since(killed_at), 2.0 * kTimeoutS) << "rank 0 took too long to notice\n" << describe_all(rs);
    EXPECT_TRUE(!rs[1].exited && rs[1].signal == SIGKILL) << describe_all(rs);
    const std::string err = expect_clean_error(rs[0], {"rank 0"});
    EXPECT_TRUE(std::regex_search(err, std::regex("peer rank 1 .*closed the connection|timed out after"))) << err;
    expect_latest_resumes(name);
  }
}

// mpirun: a rank killed mid-step ends the job with a non-zero status naming the killed rank.
TEST_F(DistFailures, AKilledRankUnderMpirunEndsTheJob) {
  prepare_data();
  Child job = spawn_diffmoe(args(write_config(long_run("run"), "run.yaml")), mpirun_options(2, dir_, kTimeoutS));
  wait_for_step(dir_ / "run" / "metrics.jsonl", 2, [&] { return ::kill(job.pid, 0) == 0; });
  pid_t rank1 = -1;
  ASSERT_TRUE(wait_until([&] { return (rank1 = mpirun_rank_pid(job.pid, 1)) > 0; }, 10))
      << "rank 1 of mpirun not found";
  const auto killed_at = std::chrono::steady_clock::now();
  ::kill(rank1, SIGKILL);
  const RunResult r = wait_diffmoe(job);
  EXPECT_LT(seconds_since(killed_at), 2.0 * kTimeoutS) << r.describe();
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_NE(r.code, 0) << r.describe();
  EXPECT_NE((r.out + r.err).find("exited on signal 9"), std::string::npos) << r.describe();
  EXPECT_EQ(::kill(rank1, 0), -1) << "rank 1 still alive";
  expect_latest_resumes("run");
}

// A truncated or altered state shard of rank 1: every rank's resume fails naming the file.
TEST_F(DistFailures, ACorruptStateShardIsNamedOnEveryRank) {
  prepare_data();
  Yaml y = long_run("run");
  y.set("train.max_steps", "2");
  y.set("checkpoint.every", "2");
  const fs::path cfg = write_config(y);
  std::vector<Child> first = spawn_torchrun(2, args(cfg), dir_);
  for (const RunResult& r : wait_all(first)) ASSERT_TRUE(r.exited && r.code == 0) << r.describe();
  const fs::path ck = dir_ / "run" / "checkpoints", step = ck / "step_000000002";
  const fs::path shard = step / "shard-00001-of-00002.safetensors";
  const std::string good = read_file(shard);
  ASSERT_GT(good.size(), 1000u);
  y.set("train.max_steps", "4");
  const fs::path more = write_config(y, "more.yaml");
  for (const std::string corruption : {"truncated", "flipped"}) {
    SCOPED_TRACE(corruption);
    std::string bad = good;
    if (corruption == "truncated") bad.resize(good.size() / 2);
    else bad[good.size() - 100] ^= 0x5a;  // inside the tensor data: the header still parses
    write_file(shard, bad);
    // --resume (latest) and --resume <the directory>: both must fail, every rank naming the shard.
    for (const std::string& resume : std::vector<std::string>{"latest", step.string()}) {
      SCOPED_TRACE(resume);
      std::vector<Child> ranks = spawn_torchrun(2, args(more, {"--resume", resume}), dir_);
      const std::vector<RunResult> rs = wait_all(ranks);
      for (const RunResult& r : rs) expect_clean_error(r, {"shard-00001-of-00002.safetensors"});
      const RunResult mpi = run_diffmoe(args(more, {"--resume", resume}), mpirun_options(2, dir_));
      ASSERT_TRUE(mpi.exited) << mpi.describe();
      EXPECT_NE(mpi.code, 0) << mpi.describe();
      EXPECT_NE(mpi.err.find("shard-00001-of-00002.safetensors"), std::string::npos) << mpi.describe();
    }
    EXPECT_EQ(read_file(ck / "latest"), "step_000000002\n") << "a failed resume moved latest";
  }
  write_file(shard, good);
  std::vector<Child> ranks = spawn_torchrun(2, args(more, {"--resume"}), dir_);
  for (const RunResult& r : wait_all(ranks)) ASSERT_TRUE(r.exited && r.code == 0) << r.describe();
  EXPECT_EQ(read_file(ck / "latest"), "step_000000004\n");
}

// SIGTERM to rank 1 only (torchrun launch, then mpirun): every rank stops after the same step,
// the checkpoint of that step is written, every rank (and mpirun) exits with 75.
TEST_F(DistFailures, SigtermToOneRankStopsEveryRankAfterTheSameStep) {
  prepare_data();
  for (const std::string launch : {"torchrun", "mpirun"}) {
    SCOPED_TRACE(launch);
    const std::string name = "run_" + launch;
    Yaml y = long_run(name);
    y.set("checkpoint.every", "0");  // the stop writes the only checkpoint
    const fs::path cfg = write_config(y, name + ".yaml");
    std::vector<RunResult> rs;
    if (launch == "torchrun") {
      std::vector<Child> ranks = spawn_torchrun(2, args(cfg), dir_);
      wait_for_step(dir_ / name / "metrics.jsonl", 2, [&] { return ::kill(ranks[1].pid, 0) == 0; });
      ::kill(ranks[1].pid, SIGTERM);
      rs = wait_all(ranks);
      for (const RunResult& r : rs) ASSERT_TRUE(r.exited && r.code == kExitStopped) << describe_all(rs);
    } else {
      Child job = spawn_diffmoe(args(cfg), mpirun_options(2, dir_));
      wait_for_step(dir_ / name / "metrics.jsonl", 2, [&] { return ::kill(job.pid, 0) == 0; });
      pid_t rank1 = -1;
      ASSERT_TRUE(wait_until([&] { return (rank1 = mpirun_rank_pid(job.pid, 1)) > 0; }, 10))
          << "rank 1 of mpirun not found";
      ::kill(rank1, SIGTERM);
      rs.push_back(wait_diffmoe(job));
      ASSERT_TRUE(rs[0].exited && rs[0].code == kExitStopped) << rs[0].describe();
    }
    // No errors: the ranks print warnings only (mpirun adds its notice that a rank exited with 75).
    for (const RunResult& r : rs) {
      for (const auto& line : split_lines(r.err)) {
        if (launch == "torchrun" && !line.empty()) {
          EXPECT_EQ(line.rfind("warning: ", 0), 0u) << "unexpected stderr line: " << line << "\n" << r.describe();
        }
        EXPECT_EQ(line.find("error"), std::string::npos) << "unexpected stderr line: " << line << "\n" << r.describe();
      }
    }
    // Stopped after a whole step k (the last logged), saved it with both shards, and said so.
    const int64_t k = last_logged_step(dir_ / name / "metrics.jsonl");
    const std::string step_name = fmt::format("step_{:09d}", k);
    const fs::path ck = dir_ / name / "checkpoints";
    EXPECT_NE(rs[0].out.find(fmt::format("stopped by SIGTERM at step {}", k)), std::string::npos) << rs[0].out;
    EXPECT_EQ(read_file(ck / "latest"), step_name + "\n");
    const CheckpointInfo info = open_checkpoint((ck / step_name).string());
    EXPECT_EQ(info.state.at("step"), k);
    // Each rank wrote its shard after the same number of optimizer steps.
    for (const char* f : {"shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"}) {
      EXPECT_EQ(SafetensorsFile::open((ck / step_name / f).string()).metadata().at("step"), std::to_string(k)) << f;
      EXPECT_EQ(count_non_finite(ck / step_name / f), 0) << f;
    }
    expect_latest_resumes(name);
  }
}

}  // namespace
}  // namespace diffmoe::e2e
