// The engine's graph path (docs/serving.md "CUDA graphs") on the CPU, through a backend that records ops as CUDA
// graphs do (recording_backend.h: recorded ops are not run, replays run them on the arguments they were recorded
// with), over the CPU backend:
//  - replayed pure decode steps give bitwise the logits of the same padded steps run eagerly, and the logits of an
//    engine without graphs up to f32 summation order, over a run whose batch sizes cover every bucket;
//  - graphs are recorded once per bucket after one eager step, replayed after that, dropped and recorded again when
//    the backend's workspaces move, and not recorded while the backend tunes (before graph_warmup_steps);
//  - a recording that fails leaves the engine decoding eagerly, with the same results;
//  - on the plain CPU backend (no graphs) the option is accepted and every step runs eagerly.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "graph_test_util.h"
#include "recording_backend.h"
#include "serve/engine.h"
#include "serve_test_util.h"

namespace diffmoe::serve {
namespace {

namespace dt = diffmoe::test;
namespace st = diffmoe::serve::test;

// Buckets 1, 2, 4, 8; blocks of 4 rows, so sequences cross block boundaries every few steps.
EngineOptions graph_options() {
  return {.max_batch = 8, .max_step_tokens = 24, .block_size = 4, .graph_warmup_steps = 1};
}

struct Engines {
  Engine g, e, o;
  Engines(Model& m, EngineOptions opt) : g(m, opt), e(m, with_max_graphs(opt, 0)), o(m, with_graphs(opt, false)) {}
  static EngineOptions with_max_graphs(EngineOptions o, int64_t n) {
    o.max_graphs = n;
    return o;
  }
  static EngineOptions with_graphs(EngineOptions o, bool on) {
    o.cuda_graphs = on;
    return o;
  }
};

// The serving tests' model on the recording backend over the CPU backend, randomised.
struct RecordedModel {
  CpuBackend cpu;
  st::RecordingBackend be{cpu};
  Model m;
  explicit RecordedModel(uint64_t seed) : m(st::serve_config(), be, DType::kF32) { dt::randomize_for_test(m, seed); }
};

// CPU f32 GEMMs over other row counts sum in other orders: padded and unpadded rows agree to ~1e-7 relative.
constexpr double kUnpaddedTol = 1e-5;

TEST(EngineGraphs, ReplaysMatchEagerPaddedStepsBitwise) {
  RecordedModel rec(21);
  Engines x(rec.m, graph_options());
  ASSERT_TRUE(x.g.graphs_enabled());
  ASSERT_TRUE(x.e.graphs_enabled());
  ASSERT_FALSE(x.o.graphs_enabled());
  const st::GraphScenario r = st::run_graph_scenario(x.g, x.e, x.o);
  std::printf(
      "[engine-graphs] %lld steps, %lld pure decode, buckets %zu, batch up to %lld; g vs o %.3e; replays %lld\n",
      static_cast<long long>(r.steps), static_cast<long long>(r.pure_steps), r.buckets.size(),
      static_cast<long long>(r.max_batch_seen), r.worst_vs_unpadded, static_cast<long long>(x.g.graph_stats().replays));
  EXPECT_EQ(r.buckets, (std::set<int64_t>{1, 2, 4, 8})) << "the scenario covers every bucket";
  EXPECT_EQ(r.mismatched_rows, 0) << "first at " << r.first_mismatch;
  EXPECT_LE(r.worst_vs_unpadded, kUnpaddedTol);
  // One eager step per bucket, then one recording each, every later pure step a replay.
  const GraphStats& s = x.g.graph_stats();
  EXPECT_EQ(s.eager_padded, static_cast<int64_t>(r.buckets.size()));
  EXPECT_EQ(s.captures, static_cast<int64_t>(r.buckets.size()));
  EXPECT_EQ(s.replays, r.pure_steps - s.eager_padded);
  EXPECT_EQ(s.dropped, 0);
  EXPECT_TRUE(x.g.graph_error().empty());
  EXPECT_EQ(x.e.graph_stats().captures, 0);
  EXPECT_EQ(x.e.graph_stats().eager_padded, r.pure_steps);
  EXPECT_EQ(x.o.graph_stats().eager_padded + x.o.graph_stats().replays, 0);
  EXPECT_EQ(x.g.cache().free_blocks(), x.g.cache().total_blocks()) << "the reserved block is not counted";
  EXPECT_EQ(x.g.cache().total_blocks(), x.o.cache().total_blocks());
}

TEST(EngineGraphs, WorkspaceMoveDropsAndRerecords) {
  RecordedModel rec(22);
  Engines x(rec.m, graph_options());
  const st::GraphScenario r = st::run_graph_scenario(x.g, x.e, x.o, [&](int64_t step) {
    if (step == 30) rec.be.move_workspaces();
  });
  EXPECT_EQ(r.mismatched_rows, 0) << "first at " << r.first_mismatch;
  const GraphStats& s = x.g.graph_stats();
  EXPECT_GE(s.dropped, 1);
  EXPECT_EQ(s.captures, static_cast<int64_t>(r.buckets.size()) + s.dropped) << "each dropped graph recorded again";
  EXPECT_EQ(s.replays + s.eager_padded, r.pure_steps);
}

TEST(EngineGraphs, NoRecordingWhileTuningBeforeWarmup) {
  RecordedModel rec(23);
  rec.be.tuning_now = true;
  EngineOptions opt = graph_options();
  opt.graph_warmup_steps = 6;
  Engines x(rec.m, opt);
  const st::GraphScenario r = st::run_graph_scenario(x.g, x.e, x.o);
  EXPECT_EQ(r.mismatched_rows, 0) << "first at " << r.first_mismatch;
  // Each bucket runs 6 eager steps, then records at its 7th.
  int64_t eager = 0, recorded = 0;
  for (const auto& [bucket, n] : r.bucket_steps) {
    eager += std::min<int64_t>(n, 6);
    recorded += n > 6 ? 1 : 0;
  }
  const GraphStats& s = x.g.graph_stats();
  EXPECT_GE(recorded, 1) << "the scenario has a bucket of more than 6 steps";
  EXPECT_EQ(s.eager_padded, eager);
  EXPECT_EQ(s.captures, recorded);
  EXPECT_EQ(s.replays + s.eager_padded, r.pure_steps);
}

TEST(EngineGraphs, FailedRecordingFallsBackToEager) {
  RecordedModel rec(24);
  rec.be.fail_end_capture = true;
  Engines x(rec.m, graph_options());
  const st::GraphScenario r = st::run_graph_scenario(x.g, x.e, x.o);
  // After the failure g runs unpadded, like o (e keeps padding): the same values up to summation order.
  EXPECT_LE(r.worst_vs_unpadded, kUnpaddedTol);
  EXPECT_NE(x.g.graph_error().find("recording failed on purpose"), std::string::npos) << x.g.graph_error();
  EXPECT_EQ(x.g.graph_stats().captures, 0);
  EXPECT_EQ(x.g.graph_stats().replays, 0);
}

TEST(EngineGraphs, CpuBackendRunsEagerly) {
  CpuBackend be;
  Model m(st::serve_config(), be, DType::kF32);
  dt::randomize_for_test(m, 25);
  EXPECT_FALSE(be.supports_graphs());
  Engines x(m, graph_options());  // cuda_graphs on (the default) on a backend without graphs
  EXPECT_FALSE(x.g.graphs_enabled());
  const st::GraphScenario r = st::run_graph_scenario(x.g, x.e, x.o);
  EXPECT_GT(r.pure_steps, 10);
  EXPECT_EQ(r.mismatched_rows, 0);
  EXPECT_EQ(r.worst_vs_unpadded, 0.0) << "no padding on the CPU: the same steps as without graphs";
  const GraphStats& s = x.g.graph_stats();
  EXPECT_EQ(s.captures + s.replays + s.eager_padded, 0);
  EXPECT_THROW(be.begin_capture({}), Error);
}

TEST(EngineGraphs, OptionsAreChecked) {
  CpuBackend be;
  Model m(st::serve_config(), be, DType::kF32);
  EngineOptions opt = graph_options();
  opt.graph_warmup_steps = 0;
  EXPECT_THROW(Engine(m, opt), Error);
  opt = graph_options();
  opt.max_graphs = -1;
  EXPECT_THROW(Engine(m, opt), Error);
}

}  // namespace
}  // namespace diffmoe::serve
