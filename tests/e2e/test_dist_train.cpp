// `diffmoe train` on several CPU ranks, real processes (mpirun and the torchrun-style launch):
// N ranks equal one rank with N-way gradient accumulation (docs/model.md §12), per step and in the
// final optimizer state; a checkpoint written on N ranks resumes on N ranks bitwise, and on M ≠ N
// ranks (another DP × EP grid) with the same loss curve (docs/parallelism.md §5).
//
// Bound: the trainer computes in f32 (train.precision: f32). N ranks and one rank with accumulation
// add the same gradients in another order (the ZeRO-1 reduce-scatter over ranks, the gradient norm
// as a sum of per-rank chunk sums, the all-to-all of expert rows), so each step's results differ by
// f32 rounding (~6e-8 relative per operation); AdamW's m/√v step magnifies the rounding of elements
// whose gradients are tiny, so the differences grow over the steps. Measured over these runs: losses
// (and gradient norms, validation losses) within 6e-8 relative, states within 5e-5 norm-relative
// (the worst: the first Adam moment of a λ scalar, whose gradient sums every token). kLossTol = 1e-5
// and kStateTol = 1e-3 leave a margin of 20x or more; a real fault moves far more: a global batch
// with micro-batches missing changes the step's loss by ~1e-3 relative, which each test checks its
// comparison would see.
#include "dist_util.h"

namespace diffmoe::e2e {
namespace {

constexpr double kLossTol = 1e-5;
constexpr double kStateTol = 1e-3;

class DistE2E : public E2E {
 protected:
  // The micro model, `steps` steps, a checkpoint every `ckpt_every`, validation at the checkpoints.
  Yaml config(const std::string& name, int steps, int ckpt_every) {
    Yaml y = micro_config(dir_, dir_ / name);
    y.set("train.max_steps", std::to_string(steps));
    y.set("checkpoint.every", std::to_string(ckpt_every));
    y.set("checkpoint.keep_last", "0");
    y.set("eval.every", std::to_string(ckpt_every));
    y.set("log.tensorboard", "false");
    return y;
  }
  // The tokenizer and shards made once, by a one-rank run, before the multi-rank runs share them.
  void prepare_data() {
    Yaml y = config("prep", 1, 1);
    E2E_EXPECT_OK(train(write_config(y, "prep.yaml")));
  }
  std::vector<std::string> args(const fs::path& cfg, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"train", "--config", cfg.string()};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  void run_mpirun(int np, const fs::path& cfg, std::vector<std::string> extra = {}) {
    const RunResult r = run_diffmoe(args(cfg, std::move(extra)), mpirun_options(np, dir_));
    E2E_EXPECT_OK(r);
  }
  void run_torchrun(int np, const fs::path& cfg, std::vector<std::string> extra = {}) {
    std::vector<Child> ranks = spawn_torchrun(np, args(cfg, std::move(extra)), dir_);
    const std::vector<RunResult> rs = wait_all(ranks);
    for (const RunResult& r : rs) ASSERT_TRUE(r.exited && r.code == 0) << describe_all(rs);
  }
  // Steps [from, to] of two runs' metrics: loss, aux_loss, grad_norm within `tol`; lr and
  // tokens_seen exactly; validation losses within `tol`.
  void expect_same_curve(const std::string& a, const std::string& b, int64_t from, int64_t to, double tol) {
    const auto ta = metric_rows(dir_ / a / "metrics.jsonl", "train"),
               tb = metric_rows(dir_ / b / "metrics.jsonl", "train");
    double worst = 0;
    for (int64_t s = from; s <= to; ++s) {
      ASSERT_TRUE(ta.contains(s) && tb.contains(s)) << "step " << s << " missing in " << a << " or " << b;
      for (const char* key : {"loss", "aux_loss", "grad_norm"}) {
        const double x = ta.at(s).at(key).get<double>(), y = tb.at(s).at(key).get<double>();
        worst = std::max(worst, rel_diff(x, y));
        EXPECT_LE(rel_diff(x, y), tol) << key << " at step " << s << ": " << a << " " << x << " vs " << b << " " << y;
      }
      for (const char* key : {"lr", "tokens_seen"})
        EXPECT_EQ(ta.at(s).at(key).get<double>(), tb.at(s).at(key).get<double>()) << key << " at step " << s;
    }
    const auto va = metric_rows(dir_ / a / "metrics.jsonl", "val"), vb = metric_rows(dir_ / b / "metrics.jsonl", "val");
    for (const auto& [s, row] : va) {
      if (s < from || s > to) continue;
      ASSERT_TRUE(vb.contains(s)) << "validation at step " << s << " missing in " << b;
      const double x = row.at("val_loss").get<double>(), y = vb.at(s).at("val_loss").get<double>();
      worst = std::max(worst, rel_diff(x, y));
      EXPECT_LE(rel_diff(x, y), tol) << "val_loss at step " << s << ": " << x << " vs " << y;
    }
    if (std::getenv("DIFFMOE_E2E_VERBOSE"))
      std::fprintf(stderr, "[e2e] %s vs %s, steps %ld..%ld: %.3g\n", a.c_str(), b.c_str(), from, to, worst);
  }
  fs::path step_dir(const std::string& run, int64_t step) {
    return dir_ / run / "checkpoints" / fmt::format("step_{:09d}", step);
  }
  void expect_same_state(const std::string& a, const std::string& b, int64_t step, double tol) {
    const StateDiff d = compare_states(step_dir(a, step), step_dir(b, step));
    EXPECT_LE(d.worst, tol) << "step " << step << " checkpoints of " << a << " and " << b << " differ by " << d.worst
                            << " at " << d.where;
    if (std::getenv("DIFFMOE_E2E_VERBOSE"))
      std::fprintf(stderr, "[e2e] state %s vs %s at %ld: %.3g (%s)\n", a.c_str(), b.c_str(), step, d.worst,
                   d.where.c_str());
  }
  // The comparison can fail: a run whose global batch lacks micro-batches differs beyond the bound.
  void expect_distinguishable(const std::string& a, const std::string& b) {
    const double x = metric_rows(dir_ / a / "metrics.jsonl", "train").at(1).at("loss").get<double>();
    const double y = metric_rows(dir_ / b / "metrics.jsonl", "train").at(1).at("loss").get<double>();
    EXPECT_GT(rel_diff(x, y), 100 * kLossTol) << a << " and " << b << " should differ at step 1";
  }
};

// DP 2 (mpirun and the torchrun launch) against one rank with 2-way accumulation; the exports agree.
TEST_F(DistE2E, TwoRanksEqualOneRankWithTwoWayAccumulation) {
  prepare_data();
  const fs::path one = write_config(config("one", 6, 3), "one.yaml");
  E2E_EXPECT_OK(train(one, {"--set", "train.grad_accum=2"}));
  const fs::path single = write_config(config("single", 6, 3), "single.yaml");
  E2E_EXPECT_OK(train(single));
  run_mpirun(2, write_config(config("mpi", 6, 3), "mpi.yaml"));
  run_torchrun(2, write_config(config("gloo", 6, 3), "gloo.yaml"));
  expect_distinguishable("single", "one");
  for (const char* run : {"mpi", "gloo"}) {
    SCOPED_TRACE(run);
    expect_same_curve(run, "one", 1, 6, kLossTol);
    for (int64_t s : {3, 6}) expect_same_state(run, "one", s, kStateTol);
    // Each rank wrote its own state shard; the world size is recorded.
    EXPECT_TRUE(fs::exists(step_dir(run, 6) / "shard-00000-of-00002.safetensors"));
    EXPECT_TRUE(fs::exists(step_dir(run, 6) / "shard-00001-of-00002.safetensors"));
    EXPECT_EQ(open_checkpoint(step_dir(run, 6).string()).state.at("world_size"), 2);
  }
  // The whole model exported from the 2-rank checkpoint equals the one-rank export.
  for (const char* run : {"one", "mpi"})
    E2E_EXPECT_OK(run_diffmoe({"checkpoint", "export", "--checkpoint", (dir_ / run / "checkpoints").string(), "--out",
                               (dir_ / (std::string(run) + ".safetensors")).string()}));
  const SafetensorsFile a = SafetensorsFile::open((dir_ / "mpi.safetensors").string());
  const SafetensorsFile b = SafetensorsFile::open((dir_ / "one.safetensors").string());
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : b.names()) {
    const SafetensorsEntry &ea = a.get(name), &eb = b.get(name);
    ASSERT_EQ(ea.shape, eb.shape) << name;
    ASSERT_EQ(eb.dtype, DType::kF32) << name;
    const auto *x = static_cast<const float*>(ea.data), *y = static_cast<const float*>(eb.data);
    double err2 = 0, ref2 = 0;
    for (size_t i = 0; i < eb.nbytes / sizeof(float); ++i) {
      err2 += (static_cast<double>(x[i]) - y[i]) * (static_cast<double>(x[i]) - y[i]);
      ref2 += static_cast<double>(y[i]) * y[i];
    }
    EXPECT_LE(std::sqrt(err2 / std::max(ref2, 1e-300)), kStateTol) << name << " differs in the exports";
  }
}

// DP 2 × EP 2 (4 ranks, mpirun and the torchrun launch) against one rank with 4-way accumulation.
TEST_F(DistE2E, DataTimesExpertParallelEqualsOneRankWithFourWayAccumulation) {
  prepare_data();
  const fs::path one = write_config(config("one", 6, 3), "one.yaml");
  E2E_EXPECT_OK(train(one, {"--set", "train.grad_accum=4"}));
  const fs::path single = write_config(config("single", 6, 3), "single.yaml");
  E2E_EXPECT_OK(train(single));
  run_mpirun(4, write_config(config("mpi", 6, 3), "mpi.yaml"), {"--set", "parallel.expert=2"});
  run_torchrun(4, write_config(config("gloo", 6, 3), "gloo.yaml"), {"--set", "parallel.expert=2"});
  expect_distinguishable("single", "one");
  for (const char* run : {"mpi", "gloo"}) {
    SCOPED_TRACE(run);
    expect_same_curve(run, "one", 1, 6, kLossTol);
    for (int64_t s : {3, 6}) expect_same_state(run, "one", s, kStateTol);
    const auto state = open_checkpoint(step_dir(run, 6).string()).state;
    EXPECT_EQ(state.at("world_size"), 4);
    EXPECT_EQ(state.at("expert_parallel"), 2);
  }
}

// train.recompute with expert parallelism (2 ranks, parallel.expert 2): `moe` and `full` give the
// loss curve and the final state of `none` bit for bit: the CPU recomputes every tensor by the
// forward's own ops on the same inputs (under `full` the MoE dispatch again, by the recorded counts).
// Also in the bf16 GEMM mode (bf16 rows sent, bf16 x_perm and h). Three MoE layers, so that the
// shared recomputed rows hold another layer's when a backward starts.
TEST_F(DistE2E, RecomputeWithExpertParallelismTrainsExactlyAsNone) {
  prepare_data();
  for (const std::string precision : {"f32", "bf16_gemm"}) {
    for (const std::string mode : {"none", "moe", "full"}) {
      const std::string name = precision + "_" + mode;
      Yaml y = config(name, 6, 3);
      y.set("model.n_layers", "4");
      y.set("train.recompute", mode);
      y.set("train.precision", precision);
      const RunResult r =
          run_diffmoe(args(write_config(y, name + ".yaml"), {"--set", "parallel.expert=2"}), mpirun_options(2, dir_));
      E2E_EXPECT_OK(r);
      EXPECT_NE(r.out.find("(train.recompute: " + mode + ","), std::string::npos) << r.out;
    }
    for (const std::string mode : {"moe", "full"}) {
      expect_same_curve(precision + "_" + mode, precision + "_none", 1, 6, 0.0);
      expect_same_state(precision + "_" + mode, precision + "_none", 6, 0.0);
    }
  }
  // Not vacuous: the two precisions' curves differ.
  EXPECT_NE(metric_rows(dir_ / "f32_none" / "metrics.jsonl", "train").at(6).at("loss").get<double>(),
            metric_rows(dir_ / "bf16_gemm_none" / "metrics.jsonl", "train").at(6).at("loss").get<double>());
}

// Saved on 4 ranks (DP 2 × EP 2) and resumed on 4: the same steps as never stopping, bit for bit
// (the same grid sums in the same order).
TEST_F(DistE2E, CheckpointOnFourRanksResumesOnFourRanksBitwise) {
  prepare_data();
  run_mpirun(4, write_config(config("straight", 8, 4), "straight.yaml"), {"--set", "parallel.expert=2"});
  const fs::path cfg = write_config(config("stopped", 8, 4), "stopped.yaml");
  run_mpirun(4, cfg, {"--set", "parallel.expert=2", "--set", "train.stop_after=4"});
  EXPECT_EQ(read_file(dir_ / "stopped" / "checkpoints" / "latest"), "step_000000004\n");
  EXPECT_EQ(last_logged_step(dir_ / "stopped" / "metrics.jsonl"), 4);
  run_mpirun(4, cfg, {"--set", "parallel.expert=2", "--resume"});
  expect_same_curve("stopped", "straight", 1, 8, 0.0);
  expect_same_state("stopped", "straight", 8, 0.0);
  EXPECT_EQ(read_file(step_dir("stopped", 8) / "shard-00003-of-00004.safetensors"),
            read_file(step_dir("straight", 8) / "shard-00003-of-00004.safetensors"));
}

// A checkpoint resumes on another grid with the same global batch: saved on 4 ranks (DP 2 × EP 2),
// resumed on 2 (EP 2, 2-way accumulation) and on 1 (4-way accumulation); saved on 1 (2-way
// accumulation), resumed on 2 (DP 2, torchrun launch). Each continues the saving run's curve.
TEST_F(DistE2E, CheckpointResumesOnAnotherNumberOfRanks) {
  prepare_data();
  run_mpirun(4, write_config(config("four", 8, 4), "four.yaml"), {"--set", "parallel.expert=2"});
  const std::string from_four = step_dir("four", 4).string();
  run_mpirun(2, write_config(config("four_to_two", 8, 4), "four_to_two.yaml"),
             {"--set", "parallel.expert=2", "--set", "train.grad_accum=2", "--resume", from_four});
  E2E_EXPECT_OK(train(write_config(config("four_to_one", 8, 4), "four_to_one.yaml"),
                      {"--set", "train.grad_accum=4", "--resume", from_four}));
  for (const char* run : {"four_to_two", "four_to_one"}) {
    SCOPED_TRACE(run);
    EXPECT_EQ(metric_rows(dir_ / run / "metrics.jsonl", "train").begin()->first, 5) << "resumed after step 4";
    expect_same_curve(run, "four", 5, 8, kLossTol);
    expect_same_state(run, "four", 8, kStateTol);
  }
  E2E_EXPECT_OK(train(write_config(config("one", 8, 4), "one.yaml"), {"--set", "train.grad_accum=2"}));
  run_torchrun(2, write_config(config("one_to_two", 8, 4), "one_to_two.yaml"),
               {"--resume", step_dir("one", 4).string()});
  expect_same_curve("one_to_two", "one", 5, 8, kLossTol);
  expect_same_state("one_to_two", "one", 8, kStateTol);
  // The comparison would see a different global batch: one rank with 2-way accumulation from the
  // 4-rank checkpoint leaves half of each step's micro-batches out.
  E2E_EXPECT_OK(train(write_config(config("four_to_half", 8, 4), "four_to_half.yaml"),
                      {"--set", "train.grad_accum=2", "--resume", from_four}));
  const double x = metric_rows(dir_ / "four_to_half" / "metrics.jsonl", "train").at(5).at("loss").get<double>();
  const double y = metric_rows(dir_ / "four" / "metrics.jsonl", "train").at(5).at("loss").get<double>();
  EXPECT_GT(rel_diff(x, y), 100 * kLossTol);
}

// ZeRO-2 (parallel.zero_stage 2: the gradients of the data-parallel groups in reused bucket slots,
// reduce-scattered in every micro-batch's backward) on DP 2 × EP 2 with 2-way accumulation and
// small buckets (several per group, slots reused) against ZeRO-1 on the same grid: the same loss
// curve and state within the f32 bounds above (the reduced chunks add the micro-batches in another
// order). Checkpoints cross between the stages: ZeRO-1's resumes under ZeRO-2 and ZeRO-2's under
// ZeRO-1, each continuing the curve.
TEST_F(DistE2E, ZeroStage2EqualsStage1AndCheckpointsCrossBetweenThem) {
  prepare_data();
  const std::vector<std::string> grid = {"--set", "parallel.expert=2", "--set", "train.grad_accum=2",
                                         "--set", "parallel.bucket_size=3000"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = grid;
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  run_mpirun(4, write_config(config("z1", 8, 4), "z1.yaml"), grid);
  run_mpirun(4, write_config(config("z2", 8, 4), "z2.yaml"), with({"--set", "parallel.zero_stage=2"}));
  expect_same_curve("z2", "z1", 1, 8, kLossTol);
  for (int64_t s : {4, 8}) expect_same_state("z2", "z1", s, kStateTol);
  run_mpirun(4, write_config(config("z1_to_z2", 8, 4), "z1_to_z2.yaml"),
             with({"--set", "parallel.zero_stage=2", "--resume", step_dir("z1", 4).string()}));
  run_mpirun(4, write_config(config("z2_to_z1", 8, 4), "z2_to_z1.yaml"),
             with({"--resume", step_dir("z2", 4).string()}));
  for (const char* run : {"z1_to_z2", "z2_to_z1"}) {
    SCOPED_TRACE(run);
    EXPECT_EQ(metric_rows(dir_ / run / "metrics.jsonl", "train").begin()->first, 5) << "resumed after step 4";
    expect_same_curve(run, run == std::string("z1_to_z2") ? "z1" : "z2", 5, 8, kLossTol);
    expect_same_state(run, "z1", 8, kStateTol);
  }
  // The resolved config records the stage.
  EXPECT_NE(read_file(dir_ / "z2" / "config.yaml").find("zero_stage: 2"), std::string::npos);
}

}  // namespace
}  // namespace diffmoe::e2e
