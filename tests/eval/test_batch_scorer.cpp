// BatchScorer: rows packed into right-padded micro-batches give, per row, the log-likelihood of a
// forward of that row alone (eval_test_util.h reference), in f64 and in f32.
#include <gtest/gtest.h>

#include "eval_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using eval::BatchScorer;
using eval::RowScore;
using eval::ScoreRow;

// Rows of mixed lengths (1 .. seq) with random tokens, some targets −1 (a context), one row with
// none scored.
std::vector<ScoreRow> mixed_rows(int64_t seq, int64_t vocab) {
  std::vector<ScoreRow> rows;
  const std::vector<int64_t> lengths = {seq, 3, 1, seq - 1, 7, 5, seq, 2};
  uint64_t k = 0;
  for (size_t r = 0; r < lengths.size(); ++r) {
    ScoreRow row;
    for (int64_t t = 0; t < lengths[r]; ++t) {
      row.inputs.push_back(
          static_cast<int32_t>(uniform_at(3, r, static_cast<uint64_t>(t)) * static_cast<double>(vocab - 1)));
      const int32_t y =
          static_cast<int32_t>(uniform_at(4, r, static_cast<uint64_t>(t)) * static_cast<double>(vocab - 1));
      row.targets.push_back((++k % 3 == 0 || r == 5) ? -1 : y);
    }
    rows.push_back(row);
  }
  return rows;
}

// f64 against the per-row f64 forward: the same arithmetic up to the order of a few sums (the
// padded batch's GEMMs have more rows; each output element is the same dot product), so the
// difference is f64 rounding of sums of ~10 terms of O(10) values: 1e-10 leaves a wide margin,
// while a shifted target, a padded position that leaked into a row or a wrong row slice of the
// logits changes a row's sum by O(1).
TEST(BatchScorer, EqualsOneForwardPerRowF64) {
  CpuBackend be;
  const int64_t seq = 12, batch = 3;
  auto model = test::eval_test_model(be, DType::kF64);
  auto ref = test::eval_test_model(be, DType::kF64);
  model->set_batch_shape(batch, seq);
  BatchScorer scorer(*model, 0);
  const std::vector<ScoreRow> rows = mixed_rows(seq, 257);
  int64_t calls = 0;
  const std::vector<RowScore> got = scorer.score(rows, [&](int64_t done, int64_t total) {
    ++calls;
    EXPECT_EQ(total, static_cast<int64_t>(rows.size()));
    EXPECT_EQ(done, std::min<int64_t>(calls * batch, total));
  });
  ASSERT_EQ(got.size(), rows.size());
  EXPECT_EQ(scorer.forwards(), 3) << "8 rows in micro-batches of 3";
  EXPECT_EQ(calls, 3);
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t scored = 0;
    for (const int32_t y : rows[r].targets) scored += y >= 0 ? 1 : 0;
    EXPECT_EQ(got[r].tokens, scored) << "row " << r;
    const double want = test::reference_logprob(*ref, rows[r]);
    EXPECT_NEAR(got[r].logprob, want, 1e-10 * (1 + std::abs(want))) << "row " << r;
    if (scored > 0) {
      EXPECT_LT(got[r].logprob, -0.1 * static_cast<double>(scored)) << "a log-likelihood must be negative";
    }
  }
  EXPECT_EQ(got[5].tokens, 0);
  EXPECT_EQ(got[5].logprob, 0.0);
}

// f32 against the f64 reference: f32 forwards carry ~1e-6 relative error into logits of O(10), so
// each token's log-probability is off by ~1e-5; 1e-4 per scored token bounds that with margin.
// The padding id must not matter either (a padded position is never read by an earlier one).
TEST(BatchScorer, F32WithinRoundingOfF64AndPaddingIrrelevant) {
  CpuBackend be;
  const int64_t seq = 12;
  auto model = test::eval_test_model(be, DType::kF32);
  auto ref = test::eval_test_model(be, DType::kF64);
  const std::vector<ScoreRow> rows = mixed_rows(seq, 257);
  model->set_batch_shape(4, seq);
  BatchScorer a(*model, 0);
  const std::vector<RowScore> pad0 = a.score(rows);
  BatchScorer b(*model, 200);
  const std::vector<RowScore> pad200 = b.score(rows);
  for (size_t r = 0; r < rows.size(); ++r) {
    const double want = test::reference_logprob(*ref, rows[r]);
    EXPECT_NEAR(pad0[r].logprob, want, 1e-4 * static_cast<double>(std::max<int64_t>(1, pad0[r].tokens))) << "row " << r;
    EXPECT_NEAR(pad200[r].logprob, pad0[r].logprob, 1e-4 * static_cast<double>(std::max<int64_t>(1, pad0[r].tokens)))
        << "row " << r;
  }
}

// The bf16 GEMM mode (bf16 logits; f32 loss sums) against the f32 reference: every GEMM operand
// and the logits are rounded to 8-bit mantissas (relative 2^-9 each), which moves a token's
// log-probability by ~0.005 here (measured: worst_error_per_token); 0.05 per scored token leaves 10x,
// while a wrong slice or a leaked padding position moves a row by O(1) per token.
TEST(BatchScorer, Bf16ModeWithinRoundingOfF32) {
  CpuBackend be;
  const int64_t seq = 12;
  auto model = test::eval_test_model_on(be, ModelOptions{.precision = Precision::kBF16});
  auto ref = test::eval_test_model(be, DType::kF64);
  model->set_batch_shape(3, seq);
  ASSERT_EQ(model->logits().dtype, DType::kBF16);
  BatchScorer s(*model, 0);
  const std::vector<ScoreRow> rows = mixed_rows(seq, 257);
  const std::vector<RowScore> got = s.score(rows);
  double worst = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const double want = test::reference_logprob(*ref, rows[r]);
    EXPECT_NEAR(got[r].logprob, want, 0.05 * static_cast<double>(std::max<int64_t>(1, got[r].tokens))) << "row " << r;
    if (got[r].tokens > 0)
      worst = std::max(worst, std::abs(got[r].logprob - want) / static_cast<double>(got[r].tokens));
  }
  RecordProperty("worst_error_per_token", std::to_string(worst));
  EXPECT_GT(worst, 0.0) << "bf16 rounding must show: the mode is not in effect";
}

TEST(BatchScorer, BadRowsAreErrors) {
  CpuBackend be;
  auto model = test::eval_test_model(be, DType::kF32);
  model->set_batch_shape(2, 6);
  BatchScorer s(*model, 0);
  const auto fails = [&](const ScoreRow& row, const std::string& needle) {
    try {
      s.score(std::vector<ScoreRow>{ScoreRow{{1}, {2}}, row});
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  fails(ScoreRow{{1, 2, 3, 4, 5, 6, 7}, {1, 2, 3, 4, 5, 6, 7}}, "row 1: 7 tokens do not fit the sequence length 6");
  fails(ScoreRow{{1, 2}, {1}}, "row 1: 2 inputs and 1 targets");
  fails(ScoreRow{{1, 300}, {1, 2}}, "row 1 position 1");
  fails(ScoreRow{{1, 2}, {1, -2}}, "row 1 position 1");
  EXPECT_THROW(BatchScorer(*model, 260), Error) << "a padding id outside the vocabulary";
}

}  // namespace
}  // namespace diffmoe
