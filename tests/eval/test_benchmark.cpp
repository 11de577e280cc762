// The throughput benchmark (src/train/benchmark.h) on a small model: every measurement is present
// and consistent with its own times, the decode engine is the function the options name, and the
// Generator decode engine runs the cases it is given.
#include <gtest/gtest.h>

#include "eval_test_util.h"
#include "train/benchmark.h"

namespace diffmoe {
namespace {

TEST(Benchmark, ReportsEveryMeasurement) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 32);
  BenchOptions o;
  o.train_batch = 2;
  o.train_seq = 8;
  o.train_steps = 2;
  o.warmup_steps = 1;
  o.decode_batches = {1, 3};
  o.prompt_len = 5;
  o.new_tokens = 3;
  o.peak_tflops = 1.0;
  std::vector<std::string> lines;
  const BenchReport r = run_benchmark(*model, o, [&](std::string_view s) { lines.emplace_back(s); });
  ASSERT_TRUE(r.train.has_value());
  const TrainStepBench& t = *r.train;
  EXPECT_EQ(t.batch, 2);
  EXPECT_EQ(t.seq, 8);
  EXPECT_EQ(t.steps, 2);
  EXPECT_EQ(t.warmup_steps, 1);
  EXPECT_GT(t.median_s, 0);
  EXPECT_LE(t.min_s, t.median_s);
  EXPECT_GE(t.max_s, t.median_s);
  EXPECT_DOUBLE_EQ(t.tokens_per_s, 16.0 / t.median_s);
  ASSERT_TRUE(t.mfu.has_value());
  EXPECT_DOUBLE_EQ(*t.mfu, t.tokens_per_s * t.flops_per_token / 1e12);
  EXPECT_TRUE(std::isfinite(t.loss));
  EXPECT_GT(t.loss, 0.0);
  ASSERT_EQ(r.decode.size(), 2u);
  for (const DecodeBench& d : r.decode) {
    EXPECT_GT(d.prefill_s, 0);
    EXPECT_GT(d.decode_s, 0);
    EXPECT_DOUBLE_EQ(d.prefill_tokens_per_s, static_cast<double>(d.c.batch * 5) / d.prefill_s);
    EXPECT_DOUBLE_EQ(d.decode_tokens_per_s, static_cast<double>(d.c.batch * 3) / d.decode_s);
    EXPECT_DOUBLE_EQ(d.ms_per_step, d.decode_s / 3 * 1000);
  }
  EXPECT_EQ(r.decode[1].c.batch, 3);
  EXPECT_EQ(lines.size(), 3u) << "one line per decode batch and one for the train step";
  const nlohmann::ordered_json j = bench_json(r);
  EXPECT_EQ(j["train_step"]["batch"], 2);
  EXPECT_EQ(j["decode"].size(), 2u);
  EXPECT_EQ(j["decode"][1]["batch"], 3);
  EXPECT_TRUE(j["decode"][0].contains("decode_tokens_per_s"));
}

TEST(Benchmark, DecodeGoesThroughTheEngineGiven) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 32);
  BenchOptions o;
  o.train = false;
  o.decode_batches = {2, 4};
  o.prompt_len = 4;
  o.new_tokens = 2;
  o.repeats = 3;
  std::vector<DecodeCase> seen;
  o.decode_engine = [&](Model& m, const DecodeCase& c) {
    seen.push_back(c);
    return DecodeTiming{.prefill_s = 0.5 * static_cast<double>(seen.size()), .decode_s = 0.25};
  };
  const BenchReport r = run_benchmark(*model, o);
  EXPECT_FALSE(r.train.has_value());
  ASSERT_EQ(seen.size(), 8u) << "per batch: one untimed run, then 3 timed";
  EXPECT_EQ(seen[0].batch, 2);
  EXPECT_EQ(seen[4].batch, 4);
  EXPECT_EQ(seen[0].prompt_len, 4);
  ASSERT_EQ(r.decode.size(), 2u);
  EXPECT_DOUBLE_EQ(r.decode[0].prefill_s, 1.5) << "the median of the timed runs 2..4 (1.0, 1.5, 2.0)";
  EXPECT_DOUBLE_EQ(r.decode[1].prefill_s, 3.5);
  EXPECT_DOUBLE_EQ(r.decode[0].decode_tokens_per_s, 2 * 2 / 0.25);
}

TEST(Benchmark, GeneratorEngineChecksItsCase) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32, 5, 16);
  const DecodeTiming t = time_generator_decode(*model, DecodeCase{.batch = 2, .prompt_len = 6, .new_tokens = 4});
  EXPECT_GT(t.prefill_s, 0);
  EXPECT_GT(t.decode_s, 0);
  EXPECT_THROW(time_generator_decode(*model, DecodeCase{.batch = 1, .prompt_len = 12, .new_tokens = 5}), Error)
      << "past max_seq_len";
  EXPECT_THROW(time_generator_decode(*model, DecodeCase{.batch = 0, .prompt_len = 2, .new_tokens = 1}), Error);
}

}  // namespace
}  // namespace diffmoe
