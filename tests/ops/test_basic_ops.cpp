// CPU basic ops and the embedding: fill, copy (dtype conversions), axpy, scale, sum_squares,
// embedding forward, and the embedding backward against central finite differences in f64.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::expect_grad;
using test::Owned;

class BasicOps : public test::CpuOpsTest {};

TEST_F(BasicOps, FillEveryDtype) {
  Owned f32({3, 5}, DType::kF32), f64({7}, DType::kF64), bf({13}, DType::kBF16), f8({5}, DType::kF8E4M3),
      i32({3}, DType::kI32);
  be.fill(ctx, {.out = f32, .value = 1.25});
  be.fill(ctx, {.out = f64, .value = -0.1});
  be.fill(ctx, {.out = bf, .value = 3.14159});
  be.fill(ctx, {.out = f8, .value = 1000.0});  // saturates to 448
  be.fill(ctx, {.out = i32, .value = -7});
  for (int64_t i = 0; i < f32.numel(); ++i) EXPECT_EQ(f32.at<float>(i), 1.25f);
  for (int64_t i = 0; i < f64.numel(); ++i) EXPECT_EQ(f64.at<double>(i), -0.1);
  for (int64_t i = 0; i < bf.numel(); ++i) EXPECT_EQ(static_cast<uint16_t*>(bf.t().data)[i], f32_to_bf16(3.14159f));
  for (int64_t i = 0; i < f8.numel(); ++i) EXPECT_EQ(e4m3_to_f32(static_cast<uint8_t*>(f8.t().data)[i]), kE4M3Max);
  for (int64_t i = 0; i < i32.numel(); ++i) EXPECT_EQ(i32.at<int32_t>(i), -7);
  expect_error([&] { be.fill(ctx, {.out = i32, .value = 2.5}); }, {"[fill]", "2.5"});
}

TEST_F(BasicOps, CopyBf16RoundTripMatchesScalarRounding) {
  Owned src({7, 13}, DType::kF32), bf({91}, DType::kBF16), back({7, 13}, DType::kF32);
  test::fill_normal(src, 11, 3.0);
  be.copy(ctx, {.dst = bf, .src = src});
  be.copy(ctx, {.dst = back, .src = bf});
  int changed = 0;
  for (int64_t i = 0; i < src.numel(); ++i) {
    const float x = src.at<float>(i);
    EXPECT_EQ(back.at<float>(i), bf16_to_f32(f32_to_bf16(x))) << i;
    changed += back.at<float>(i) != x;
  }
  EXPECT_GT(changed, 0) << "random f32 values should not all be representable in bf16";
}

TEST_F(BasicOps, CopyE4m3RoundTripAndF64) {
  Owned src({5, 7}, DType::kF32), f8({35}, DType::kF8E4M3), back({35}, DType::kF32), f64({35}, DType::kF64);
  test::fill_normal(src, 12, 60.0);
  src.at<float>(0) = 1000.0f;  // beyond the largest finite e4m3: saturates
  src.at<float>(1) = -1000.0f;
  be.copy(ctx, {.dst = f8, .src = src});
  be.copy(ctx, {.dst = back, .src = f8});
  for (int64_t i = 0; i < src.numel(); ++i)
    EXPECT_EQ(back.at<float>(i), e4m3_to_f32(f32_to_e4m3(src.at<float>(i)))) << i;
  EXPECT_EQ(back.at<float>(0), kE4M3Max);
  EXPECT_EQ(back.at<float>(1), -kE4M3Max);

  // f32 -> f64 is exact; f64 -> f32 rounds like a cast.
  be.copy(ctx, {.dst = f64, .src = src});
  for (int64_t i = 0; i < src.numel(); ++i) EXPECT_EQ(f64.at<double>(i), static_cast<double>(src.at<float>(i)));
  test::fill_normal(f64, 13);
  be.copy(ctx, {.dst = back, .src = f64});
  for (int64_t i = 0; i < src.numel(); ++i) EXPECT_EQ(back.at<float>(i), static_cast<float>(f64.at<double>(i)));
}

TEST_F(BasicOps, CopyIntegersAndErrors) {
  Owned a({5}, DType::kI32), b({5}, DType::kI32), f({5}, DType::kF32), g({6}, DType::kF32);
  test::fill_int(a, 3, -100, 100);
  be.copy(ctx, {.dst = b, .src = a});
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(b.at<int32_t>(i), a.at<int32_t>(i));
  expect_error([&] { be.copy(ctx, {.dst = f, .src = a}); }, {"[copy]", "i32"});
  expect_error([&] { be.copy(ctx, {.dst = g, .src = f}); }, {"[copy]", "element count"});
}

template <class T>
void check_axpy_scale(Backend& be, double tol) {
  const DType dt = dtype_of<T>();
  Owned y({3, 7}, dt), x({3, 7}, dt), y0({3, 7}, dt);
  test::fill_normal(y, 21);
  test::fill_normal(x, 22);
  test::fill_normal(y0, 21);
  be.axpy({}, {.y = y, .x = x, .alpha = -0.75});
  for (int64_t i = 0; i < y.numel(); ++i)
    EXPECT_NEAR(test::get(y, i), test::get(y0, i) - 0.75 * test::get(x, i), tol) << i;
  be.scale({}, {.y = y, .alpha = 1.5});
  for (int64_t i = 0; i < y.numel(); ++i)
    EXPECT_NEAR(test::get(y, i), 1.5 * (test::get(y0, i) - 0.75 * test::get(x, i)), tol) << i;
}

TEST_F(BasicOps, AxpyAndScale) {
  check_axpy_scale<float>(be, 1e-5);
  check_axpy_scale<double>(be, 1e-14);
  Owned y({3, 7}, DType::kF32), x({7, 3}, DType::kF32);
  expect_error([&] { be.axpy(ctx, {.y = y, .x = x}); }, {"[axpy]", "x"});
}

TEST_F(BasicOps, SumSquaresAccumulatesOverChunks) {
  // 40 013 elements: several of the op's 16 384-element chunks plus a ragged tail.
  for (DType dt : {DType::kF32, DType::kF64}) {
    Owned x({40013}, dt), out({1}, dt);
    test::fill_normal(x, 31);
    test::set(out, 0, 2.5);
    long double ref = 2.5L;
    for (int64_t i = 0; i < x.numel(); ++i) ref += static_cast<long double>(test::get(x, i)) * test::get(x, i);
    be.sum_squares(ctx, {.out = out, .x = x});
    // f32: the result is rounded once to f32 (relative 6e-8); f64: only double summation error.
    const double tol = dt == DType::kF32 ? 1e-7 : 1e-13;
    EXPECT_NEAR(test::get(out, 0), static_cast<double>(ref), tol * static_cast<double>(ref));
  }
  Owned out2({2}, DType::kF32), x({3}, DType::kF32);
  expect_error([&] { be.sum_squares(ctx, {.out = out2, .x = x}); }, {"[sum_squares]", "out"});
}

TEST_F(BasicOps, CountNonfiniteCountsNanAndInfinities) {
  // 40 013 elements (the parallel path) with NaN, +inf, -inf planted, and the largest finite values
  // and denormals beside them (which are finite and must not count); the count is overwritten.
  for (DType dt : {DType::kF32, DType::kF64}) {
    SCOPED_TRACE(dtype_name(dt));
    Owned x({40013}, dt), count({1}, DType::kI64);
    test::fill_normal(x, 33);
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    int64_t planted = 0;
    for (int64_t i = 0; i < x.numel(); i += 997, ++planted) test::set(x, i, i % 3 == 0 ? nan : i % 3 == 1 ? inf : -inf);
    test::set(x, 1, dt == DType::kF32 ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max());
    test::set(x, 2,
              dt == DType::kF32 ? std::numeric_limits<float>::denorm_min() : std::numeric_limits<double>::denorm_min());
    count.at<int64_t>(0) = 11;
    be.count_nonfinite(ctx, {.count = count, .x = x});
    EXPECT_EQ(count.at<int64_t>(0), planted);
  }
  Owned bf({9}, DType::kBF16), count({1}, DType::kI64);
  for (int64_t i = 0; i < bf.numel(); ++i)
    static_cast<uint16_t*>(bf.t().data)[i] = f32_to_bf16(0.5f * static_cast<float>(i + 1));
  static_cast<uint16_t*>(bf.t().data)[4] = f32_to_bf16(std::numeric_limits<float>::infinity());
  be.count_nonfinite(ctx, {.count = count, .x = bf});
  EXPECT_EQ(count.at<int64_t>(0), 1);
  Owned wrong({1}, DType::kI32), x({3}, DType::kF32), ints({3}, DType::kI32);
  expect_error([&] { be.count_nonfinite(ctx, {.count = wrong, .x = x}); }, {"[count_nonfinite]", "count"});
  expect_error([&] { be.count_nonfinite(ctx, {.count = count, .x = ints}); }, {"[count_nonfinite]", "x"});
}

TEST_F(BasicOps, EmbeddingForwardF32) {
  constexpr int64_t kVocab = 7, kDim = 5, kRows = 13;
  Owned table({kVocab, kDim}, DType::kF32), tokens({kRows}, DType::kI32), out({kRows, kDim}, DType::kF32);
  test::fill_normal(table, 41);
  test::fill_int(tokens, 42, 0, kVocab);
  be.embedding_fwd(ctx, {.out = out, .tokens = tokens, .table = table, .scale = 1.7});
  for (int64_t n = 0; n < kRows; ++n)
    for (int64_t d = 0; d < kDim; ++d)
      EXPECT_FLOAT_EQ(out.at<float>(n * kDim + d), 1.7f * table.at<float>(tokens.at<int32_t>(n) * kDim + d));
}

// Large enough for the op's parallel path (threads own 64-column blocks): against a naive loop.
TEST_F(BasicOps, EmbeddingBackwardLargeAgainstNaive) {
  constexpr int64_t kVocab = 37, kDim = 131, kRows = 613;
  Owned tokens({kRows}, DType::kI32), dout({kRows, kDim}, DType::kF64), dtable({kVocab, kDim}, DType::kF64);
  test::fill_int(tokens, 55, 0, kVocab);
  test::fill_normal(dout, 56);
  test::fill_normal(dtable, 57);
  std::vector<double> want = test::to_vector(dtable);
  for (int64_t n = 0; n < kRows; ++n)
    for (int64_t d = 0; d < kDim; ++d)
      want[static_cast<size_t>(tokens.at<int32_t>(n) * kDim + d)] += -1.3 * dout.at<double>(n * kDim + d);
  be.embedding_bwd(ctx, {.dtable = dtable, .tokens = tokens, .dout = dout, .scale = -1.3});
  EXPECT_LE(test::rel_error(test::to_vector(dtable), want), 1e-14);
}

TEST_F(BasicOps, EmbeddingErrors) {
  Owned table({5, 3}, DType::kF32), tokens({4}, DType::kI32), out({4, 3}, DType::kF32), bad_out({4, 2}, DType::kF32);
  test::fill_int(tokens, 61, 0, 5);
  tokens.at<int32_t>(3) = 9;
  expect_error([&] { be.embedding_fwd(ctx, {.out = out, .tokens = tokens, .table = table}); },
               {"[embedding_fwd]", "tokens[3] = 9"});
  tokens.at<int32_t>(3) = 1;
  expect_error([&] { be.embedding_fwd(ctx, {.out = bad_out, .tokens = tokens, .table = table}); },
               {"[embedding_fwd]", "out"});
  expect_error([&] { be.embedding_bwd(ctx, {.dtable = table, .tokens = tokens, .dout = bad_out}); },
               {"[embedding_bwd]", "dout"});
}

}  // namespace
}  // namespace diffmoe
