// The eval scorer and the benchmark on the CUDA backend: per-row log-likelihoods of the same rows
// with the same weights as the CPU backend's, in f32 and in the bf16 GEMM mode; the benchmark's
// train step, prefill and decode run and report positive throughput. Skipped without a device.
#include <gtest/gtest.h>

#include "backend/backend_registry.h"
#include "cuda_test_util.h"
#include "eval/batch_scorer.h"
#include "eval/multiple_choice.h"
#include "eval_test_util.h"
#include "train/benchmark.h"

namespace diffmoe {
namespace {

// Rows of mixed lengths with a context part (targets −1) and a scored part, as multiple-choice
// requests are.
std::vector<eval::ScoreRow> request_rows(int64_t seq) {
  std::vector<eval::ScoreRow> rows;
  for (uint64_t r = 0; r < 11; ++r) {
    eval::EncodedPair p;
    const int64_t n_ctx = 1 + static_cast<int64_t>(r * 5 % 17), n_cont = 1 + static_cast<int64_t>(r % 4);
    for (int64_t i = 0; i < n_ctx; ++i)
      p.context.push_back(static_cast<int32_t>(uniform_at(21, r, static_cast<uint64_t>(i)) * 256));
    for (int64_t i = 0; i < n_cont; ++i)
      p.continuation.push_back(static_cast<int32_t>(uniform_at(22, r, static_cast<uint64_t>(i)) * 256));
    rows.push_back(eval::loglikelihood_row(p, seq, "row"));
  }
  return rows;
}

std::vector<eval::RowScore> score_on(Backend& be, Precision precision, const std::vector<eval::ScoreRow>& rows,
                                     int64_t seq) {
  auto m = test::eval_test_model_on(be, ModelOptions{.precision = precision});
  m->set_batch_shape(4, seq);
  eval::BatchScorer s(*m, 0);
  return s.score(rows);
}

// f32: both backends compute the same f32 forward with different summation orders (cuBLAS SGEMM,
// the flash attention kernel) — ~1e-6 relative on logits of O(10), ~1e-5 per token's
// log-probability; 2e-4 per scored token bounds it. bf16 GEMM mode: the logits are stored in bf16
// (8-bit mantissa); the two backends round the same f32 values, which differ by ~1e-6, so a logit
// may land one bf16 ulp apart (≤ 2^-8·|z|, 0.03 at |z| < 8) and move a token's log-probability by
// about that: 0.06 per scored token. A wrong row slice, target or mask shifts a row by O(1).
TEST(CudaEval, ScorerMatchesCpu) {
  DIFFMOE_REQUIRE_CUDA();
  auto cuda = make_backend("cuda");
  const int64_t seq = 16;
  const std::vector<eval::ScoreRow> rows = request_rows(seq);
  for (const auto& [precision, tol] :
       std::vector<std::pair<Precision, double>>{{Precision::kF32, 2e-4}, {Precision::kBF16, 0.06}}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    CpuBackend cpu;
    const auto want = score_on(cpu, precision, rows, seq);
    const auto got = score_on(*cuda, precision, rows, seq);
    ASSERT_EQ(got.size(), want.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      EXPECT_EQ(got[r].tokens, want[r].tokens) << "row " << r;
      EXPECT_NEAR(got[r].logprob, want[r].logprob, tol * static_cast<double>(want[r].tokens)) << "row " << r;
      EXPECT_LT(want[r].logprob, 0.0);
    }
  }
}

TEST(CudaEval, BenchmarkRuns) {
  DIFFMOE_REQUIRE_CUDA();
  auto cuda = make_backend("cuda");
  auto m = test::eval_test_model_on(*cuda, ModelOptions{}, 5, 32);
  BenchOptions o;
  o.train_batch = 2;
  o.train_seq = 16;
  o.train_steps = 2;
  o.warmup_steps = 1;
  o.decode_batches = {1, 4};
  o.prompt_len = 8;
  o.new_tokens = 4;
  o.repeats = 2;
  o.peak_tflops = 989;
  const BenchReport r = run_benchmark(*m, o);
  ASSERT_TRUE(r.train.has_value());
  EXPECT_GT(r.train->tokens_per_s, 0);
  EXPECT_TRUE(std::isfinite(r.train->loss));
  ASSERT_EQ(r.decode.size(), 2u);
  for (const DecodeBench& d : r.decode) {
    EXPECT_GT(d.prefill_tokens_per_s, 0);
    EXPECT_GT(d.decode_tokens_per_s, 0);
  }
}

}  // namespace
}  // namespace diffmoe
