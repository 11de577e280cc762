// CPU RMSNorm (docs/derivations.md App. A) and GEMMs: forward against naive double loops, backward against
// central finite differences in f64, grouped GEMMs against per-group loops, offsets validation.
#include <gtest/gtest.h>

#include <cmath>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::expect_grad;
using test::Owned;

class NormGemm : public test::CpuOpsTest {};

// ---------------------------------------------------------------- RMSNorm
// A norm over the first kWidth columns of wider buffers: x rows kXStride apart, y rows kYStride.
constexpr int64_t kRows = 5, kWidth = 7, kXStride = 11, kYStride = 9;
constexpr double kEps = 1e-5, kOutScale = 1.3;

TEST_F(NormGemm, RmsNormForwardF32AgainstNaive) {
  Owned x({kRows, kXStride}, DType::kF32), y({kRows, kYStride}, DType::kF32), w({kWidth}, DType::kF32),
      rstd({kRows}, DType::kF32);
  test::fill_normal(x, 101, 2.0);
  test::fill_normal(w, 102, 0.3, 1.0);
  be.fill(ctx, {.out = y, .value = -99.0});  // sentinel in the columns the norm must not touch
  be.rmsnorm_fwd(ctx, {.y = y,
                       .rstd = rstd,
                       .x = x,
                       .w = w,
                       .rows = kRows,
                       .width = kWidth,
                       .x_stride = kXStride,
                       .y_stride = kYStride,
                       .eps = kEps,
                       .out_scale = kOutScale});
  for (int64_t n = 0; n < kRows; ++n) {
    double ss = 0.0;
    for (int64_t j = 0; j < kWidth; ++j) ss += std::pow(test::get(x, n * kXStride + j), 2);
    const double r = 1.0 / std::sqrt(ss / kWidth + kEps);
    EXPECT_NEAR(test::get(rstd, n), r, 1e-6 * r);
    for (int64_t j = 0; j < kWidth; ++j) {
      const double ref = kOutScale * test::get(x, n * kXStride + j) * r * test::get(w, j);
      EXPECT_NEAR(test::get(y, n * kYStride + j), ref, 1e-5 * (1.0 + std::fabs(ref))) << n << "," << j;
    }
    for (int64_t j = kWidth; j < kYStride; ++j) EXPECT_EQ(test::get(y, n * kYStride + j), -99.0);
  }
}

// dx (overwrite and accumulate) and dw (accumulates) against finite differences of Σ y ⊙ R.
TEST_F(NormGemm, RmsNormBackwardFiniteDifferences) {
  const DType f64 = DType::kF64;
  Owned x({kRows, kXStride}, f64), y({kRows, kYStride}, f64), w({kWidth}, f64), rstd({kRows}, f64),
      proj({kRows, kYStride}, f64), dx({kRows, kXStride}, f64), dw({kWidth}, f64);
  test::fill_normal(x, 111, 1.5);
  test::fill_normal(w, 112, 0.3, 1.0);
  test::fill_normal(proj, 113);
  const RmsNormFwdArgs fwd{.y = y,
                           .rstd = rstd,
                           .x = x,
                           .w = w,
                           .rows = kRows,
                           .width = kWidth,
                           .x_stride = kXStride,
                           .y_stride = kYStride,
                           .eps = kEps,
                           .out_scale = kOutScale};
  const auto loss = [&] {
    be.rmsnorm_fwd(ctx, fwd);
    return test::dot(y, proj);
  };
  const std::vector<double> num_dx = test::numerical_grad(x, loss);
  const std::vector<double> num_dw = test::numerical_grad(w, loss);
  loss();  // rstd at the unperturbed point

  // Only the first kWidth columns of each x row are inputs; the rest must be left alone.
  const auto used = [](int64_t i) { return i % kXStride < kWidth; };
  for (bool accumulate : {false, true}) {
    test::fill_normal(dx, 114);  // garbage to overwrite, or content to add onto
    test::fill_normal(dw, 115);
    const std::vector<double> dx0 = test::to_vector(dx), dw0 = test::to_vector(dw);
    be.rmsnorm_bwd(ctx, {.dx = dx,
                         .dw = dw,
                         .dy = proj,
                         .x = x,
                         .w = w,
                         .rstd = rstd,
                         .rows = kRows,
                         .width = kWidth,
                         .x_stride = kXStride,
                         .y_stride = kYStride,
                         .out_scale = kOutScale,
                         .dx_accumulate = accumulate});
    std::vector<double> got_dx, want_dx;
    for (int64_t i = 0; i < dx.numel(); ++i) {
      const double v = test::get(dx, i);
      if (!used(i)) {
        EXPECT_EQ(v, dx0[static_cast<size_t>(i)]) << "column outside the norm changed at " << i;
        continue;
      }
      got_dx.push_back(accumulate ? v - dx0[static_cast<size_t>(i)] : v);
      want_dx.push_back(num_dx[static_cast<size_t>(i)]);
    }
    std::vector<double> got_dw = test::to_vector(dw);
    for (size_t j = 0; j < got_dw.size(); ++j) got_dw[j] -= dw0[j];
    expect_grad(accumulate ? "rmsnorm dx (accumulate)" : "rmsnorm dx (overwrite)", got_dx, want_dx);
    expect_grad("rmsnorm dw", got_dw, num_dw);
  }
}

// Large enough for the parallel paths (rows split across threads for dx, 64-column blocks for
// dw): the backward formula of docs/derivations.md App. A written out naively in the test.
TEST_F(NormGemm, RmsNormBackwardLargeAgainstNaive) {
  constexpr int64_t kBigRows = 257, kBigWidth = 131, kBigStride = 133;
  const DType f64 = DType::kF64;
  Owned x({kBigRows, kBigStride}, f64), w({kBigWidth}, f64), rstd({kBigRows}, f64), dy({kBigRows, kBigWidth}, f64),
      dx({kBigRows, kBigStride}, f64), dw({kBigWidth}, f64);
  test::fill_normal(x, 121);
  test::fill_normal(w, 122, 0.3, 1.0);
  test::fill_normal(dy, 123);
  test::fill_normal(dw, 124);
  for (int64_t n = 0; n < kBigRows; ++n) {
    double ss = 0.0;
    for (int64_t j = 0; j < kBigWidth; ++j) ss += std::pow(x.at<double>(n * kBigStride + j), 2);
    rstd.at<double>(n) = 1.0 / std::sqrt(ss / kBigWidth + kEps);
  }
  std::vector<double> want_dw = test::to_vector(dw), want_dx;
  for (int64_t n = 0; n < kBigRows; ++n) {
    const double r = rstd.at<double>(n);
    double mean_gx = 0.0;
    for (int64_t j = 0; j < kBigWidth; ++j) {
      const double xhat = x.at<double>(n * kBigStride + j) * r,
                   g = kOutScale * dy.at<double>(n * kBigWidth + j) * w.at<double>(j);
      mean_gx += g * xhat / kBigWidth;
      want_dw[static_cast<size_t>(j)] += kOutScale * dy.at<double>(n * kBigWidth + j) * xhat;
    }
    for (int64_t j = 0; j < kBigWidth; ++j) {
      const double xhat = x.at<double>(n * kBigStride + j) * r,
                   g = kOutScale * dy.at<double>(n * kBigWidth + j) * w.at<double>(j);
      want_dx.push_back(r * (g - xhat * mean_gx));
    }
  }
  be.rmsnorm_bwd(ctx, {.dx = dx,
                       .dw = dw,
                       .dy = dy,
                       .x = x,
                       .w = w,
                       .rstd = rstd,
                       .rows = kBigRows,
                       .width = kBigWidth,
                       .x_stride = kBigStride,
                       .out_scale = kOutScale});
  std::vector<double> got_dx;
  for (int64_t n = 0; n < kBigRows; ++n)
    for (int64_t j = 0; j < kBigWidth; ++j) got_dx.push_back(dx.at<double>(n * kBigStride + j));
  EXPECT_LE(test::rel_error(got_dx, want_dx), 1e-13);
  EXPECT_LE(test::rel_error(test::to_vector(dw), want_dw), 1e-13);
}

TEST_F(NormGemm, RmsNormErrors) {
  Owned x({3, 5}, DType::kF32), y({3, 5}, DType::kF32), w({4}, DType::kF32), rstd({3}, DType::kF32);
  expect_error([&] { be.rmsnorm_fwd(ctx, {.y = y, .rstd = rstd, .x = x, .w = w, .rows = 3, .width = 5}); },
               {"[rmsnorm_fwd]", "w"});
  expect_error(
      [&] { be.rmsnorm_fwd(ctx, {.y = y, .rstd = rstd, .x = x, .w = w, .rows = 3, .width = 4, .x_stride = 6}); },
      {"[rmsnorm_fwd]", "x"});
  expect_error(
      [&] { be.rmsnorm_bwd(ctx, {.dx = x, .dw = w, .dy = y, .x = x, .w = w, .rstd = rstd, .rows = 4, .width = 4}); },
      {"[rmsnorm_bwd]"});
}

// ---------------------------------------------------------------- GEMM
// op(X)[i, j] of a row-major stored matrix with `cols` columns.
double op_at(const Tensor& t, bool trans, int64_t i, int64_t j) {
  const int64_t cols = t.dim(1);
  return trans ? test::get(t, j * cols + i) : test::get(t, i * cols + j);
}

// Naive C = alpha·op(A)·op(B) + beta·C0 in double.
std::vector<double> naive_gemm(const Tensor& a, const Tensor& b, const std::vector<double>& c0, int64_t m, int64_t n,
                               int64_t k, bool ta, bool tb, double alpha, double beta) {
  std::vector<double> c(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < k; ++p) s += op_at(a, ta, i, p) * op_at(b, tb, p, j);
      c[static_cast<size_t>(i * n + j)] = alpha * s + beta * c0[static_cast<size_t>(i * n + j)];
    }
  return c;
}

TEST_F(NormGemm, GemmAllTransposesAgainstNaive) {
  constexpr int64_t m = 5, n = 7, k = 13;
  constexpr double kAlpha = 0.7, kBeta = -1.3;
  for (DType dt : {DType::kF32, DType::kF64}) {
    // f32: BLAS sums 13 products in f32 (error ~ k·ε ≈ 1e-6 relative); f64 the same at 1e-15.
    const double tol = dt == DType::kF32 ? 1e-5 : 1e-13;
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        Owned a(ta ? Shape{k, m} : Shape{m, k}, dt), b(tb ? Shape{n, k} : Shape{k, n}, dt), c({m, n}, dt);
        test::fill_normal(a, 201);
        test::fill_normal(b, 202);
        test::fill_normal(c, 203);
        const std::vector<double> want = naive_gemm(a, b, test::to_vector(c), m, n, k, ta, tb, kAlpha, kBeta);
        be.gemm(ctx, {.c = c, .a = a, .b = b, .trans_a = ta, .trans_b = tb, .alpha = kAlpha, .beta = kBeta});
        const double err = test::rel_error(test::to_vector(c), want);
        EXPECT_LE(err, tol) << dtype_name(dt) << " trans_a=" << ta << " trans_b=" << tb;
      }
  }
}

TEST_F(NormGemm, GemmBetaZeroIgnoresStaleOutput) {
  Owned a({3, 5}, DType::kF32), b({5, 7}, DType::kF32), c({3, 7}, DType::kF32);
  test::fill_normal(a, 211);
  test::fill_normal(b, 212);
  be.fill(ctx, {.out = c, .value = std::nan("")});
  be.gemm(ctx, {.c = c, .a = a, .b = b, .beta = 0.0});
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_TRUE(std::isfinite(c.at<float>(i))) << i;
}

// A linear layer Y = X Wᵀ built from gemm calls: dX = dY·W, dW += dYᵀ·X, against differences.
TEST_F(NormGemm, LinearBackwardFromGemmFiniteDifferences) {
  constexpr int64_t kN = 5, kIn = 13, kOut = 7;
  const DType f64 = DType::kF64;
  Owned x({kN, kIn}, f64), w({kOut, kIn}, f64), y({kN, kOut}, f64), proj({kN, kOut}, f64), dx({kN, kIn}, f64),
      dw({kOut, kIn}, f64);
  test::fill_normal(x, 221);
  test::fill_normal(w, 222);
  test::fill_normal(proj, 223);
  test::fill_normal(dw, 224);
  const std::vector<double> dw0 = test::to_vector(dw);
  const auto loss = [&] {
    be.gemm(ctx, {.c = y, .a = x, .b = w, .trans_b = true});
    return test::dot(y, proj);
  };
  const std::vector<double> num_dx = test::numerical_grad(x, loss), num_dw = test::numerical_grad(w, loss);
  be.gemm(ctx, {.c = dx, .a = proj, .b = w});                                // dX = dY·W
  be.gemm(ctx, {.c = dw, .a = proj, .b = x, .trans_a = true, .beta = 1.0});  // dW += dYᵀ·X
  std::vector<double> got_dw = test::to_vector(dw);
  for (size_t i = 0; i < got_dw.size(); ++i) got_dw[i] -= dw0[i];
  expect_grad("linear dX via gemm", test::to_vector(dx), num_dx);
  expect_grad("linear dW via gemm", got_dw, num_dw);
}

TEST_F(NormGemm, GemmShapeErrors) {
  Owned a({3, 5}, DType::kF32), b({4, 7}, DType::kF32), c({3, 7}, DType::kF32), d({3, 7}, DType::kF64);
  expect_error([&] { be.gemm(ctx, {.c = c, .a = a, .b = b}); }, {"[gemm]", "[3, 5]", "[4, 7]", "[3, 7]"});
  expect_error([&] { be.gemm(ctx, {.c = d, .a = a, .b = b}); }, {"[gemm]", "dtype"});
}

// ---------------------------------------------------------------- GEMM with a separate addend
// C = alpha·op(A)·op(B) + beta·addend is defined as a copy of the addend into C, then the GEMM with
// beta: bitwise what the model did before the addend existed (a copy op, then a beta GEMM).
TEST_F(NormGemm, GemmAddendEqualsCopyThenBeta) {
  constexpr int64_t m = 5, n = 7, k = 13;
  for (DType dt : {DType::kF32, DType::kF64})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {1.0, -0.6}) {
          Owned a(ta ? Shape{k, m} : Shape{m, k}, dt), b(tb ? Shape{n, k} : Shape{k, n}, dt);
          Owned r({m, n}, dt), want({m, n}, dt), got({m, n}, dt);
          test::fill_normal(a, 231);
          test::fill_normal(b, 232);
          test::fill_normal(r, 233);
          const std::vector<double> r0 = test::to_vector(r);
          be.copy(ctx, {.dst = want, .src = r});
          be.gemm(ctx, {.c = want, .a = a, .b = b, .trans_a = ta, .trans_b = tb, .alpha = 0.7, .beta = beta});
          be.fill(ctx, {.out = got, .value = std::nan("")});  // C is only written
          be.gemm(ctx,
                  {.c = got, .a = a, .b = b, .trans_a = ta, .trans_b = tb, .alpha = 0.7, .beta = beta, .addend = r});
          EXPECT_EQ(test::to_vector(got), test::to_vector(want))
              << dtype_name(dt) << " trans_a=" << ta << " trans_b=" << tb << " beta=" << beta;
          EXPECT_EQ(test::to_vector(r), r0) << "the addend is only read";
        }
}

// addend = C is the in-place GEMM: bitwise the call without an addend.
TEST_F(NormGemm, GemmAddendMayBeC) {
  Owned a({5, 13}, DType::kF32), b({7, 13}, DType::kF32), c1({5, 7}, DType::kF32), c2({5, 7}, DType::kF32);
  test::fill_normal(a, 241);
  test::fill_normal(b, 242);
  test::fill_normal(c1, 243);
  test::copy_values(c2, c1);
  be.gemm(ctx, {.c = c1, .a = a, .b = b, .trans_b = true, .beta = 1.5});
  be.gemm(ctx, {.c = c2, .a = a, .b = b, .trans_b = true, .beta = 1.5, .addend = c2});
  EXPECT_EQ(test::to_vector(c2), test::to_vector(c1));
}

// beta = 0 reads neither C nor the addend (BLAS rule), also for k = 0; k = 0 with beta ≠ 0 is
// beta·addend.
TEST_F(NormGemm, GemmBetaZeroDoesNotReadTheAddend) {
  Owned a({5, 13}, DType::kF32), b({13, 7}, DType::kF32), c({5, 7}, DType::kF32), r({5, 7}, DType::kF32);
  Owned ref({5, 7}, DType::kF32);
  test::fill_normal(a, 251);
  test::fill_normal(b, 252);
  be.fill(ctx, {.out = r, .value = std::nan("")});
  be.fill(ctx, {.out = c, .value = std::nan("")});
  be.gemm(ctx, {.c = c, .a = a, .b = b, .beta = 0.0, .addend = r});
  be.gemm(ctx, {.c = ref, .a = a, .b = b, .beta = 0.0});
  EXPECT_EQ(test::to_vector(c), test::to_vector(ref));
  Owned a0({5, 0}, DType::kF32), b0({0, 7}, DType::kF32);
  be.gemm(ctx, {.c = c, .a = a0, .b = b0, .beta = 0.0, .addend = r});
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_EQ(c.at<float>(i), 0.0f) << "k = 0, beta = 0: element " << i;
  test::fill_normal(r, 253);
  be.gemm(ctx, {.c = c, .a = a0, .b = b0, .beta = -2.0, .addend = r});
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_EQ(c.at<float>(i), -2.0f * r.at<float>(i)) << "k = 0: element " << i;
}

TEST_F(NormGemm, GemmAddendAndBf16OutputErrors) {
  Owned a({3, 5}, DType::kF32), b({5, 7}, DType::kF32), c({3, 7}, DType::kF32);
  Owned wide({3, 8}, DType::kF32), r64({3, 7}, DType::kF64), big({8, 7}, DType::kF32), c16({3, 7}, DType::kBF16);
  expect_error([&] { be.gemm(ctx, {.c = c, .a = a, .b = b, .beta = 1.0, .addend = wide}); },
               {"[gemm]", "addend", "expected shape [3, 7]", "[3, 8]"});
  expect_error([&] { be.gemm(ctx, {.c = c, .a = a, .b = b, .beta = 1.0, .addend = r64}); },
               {"[gemm]", "addend", "dtype"});
  Tensor on_gpu = wide.t().rows(0, 3);
  on_gpu.shape = Shape{3, 7};
  on_gpu.device = Device::kCUDA;
  expect_error([&] { be.gemm(ctx, {.c = c, .a = a, .b = b, .beta = 1.0, .addend = on_gpu}); },
               {"[gemm]", "addend", "is on cuda"});
  // C = rows 0..2 of big, the addend rows 1..3: partly the same memory.
  Tensor c_view = big.t().rows(0, 3), r_view = big.t().rows(1, 4);
  expect_error([&] { be.gemm(ctx, {.c = c_view, .a = a, .b = b, .beta = 1.0, .addend = r_view}); },
               {"[gemm]", "addend", "partly overlaps c"});
  // A bf16 output needs the bf16 GEMM mode, beta = 0 and no f32_exact.
  expect_error([&] { be.gemm(ctx, {.c = c16, .a = a, .b = b}); }, {"[gemm]", "c is bf16", "bf16 GEMM mode"});
  be.set_gemm_precision(GemmPrecision::kBF16);
  expect_error([&] { be.gemm(ctx, {.c = c16, .a = a, .b = b, .beta = 1.0}); }, {"[gemm]", "c is bf16", "beta = 0"});
  expect_error([&] { be.gemm(ctx, {.c = c16, .a = a, .b = b, .f32_exact = true}); }, {"[gemm]", "f32_exact"});
  be.set_gemm_precision(GemmPrecision::kF32);
}

// ---------------------------------------------------------------- grouped GEMMs
// 4 groups over 14 rows: group 1 is empty, rows 12 and 13 are beyond offsets[G].
constexpr int64_t kGroups = 4, kGRows = 14;
constexpr int32_t kOffsets[kGroups + 1] = {0, 3, 3, 8, 12};

Owned make_offsets(std::initializer_list<int32_t> values) {
  Owned o({static_cast<int64_t>(values.size())}, DType::kI32);
  int64_t i = 0;
  for (int32_t v : values) o.at<int32_t>(i++) = v;
  return o;
}

TEST_F(NormGemm, GroupedGemmAgainstPerGroupLoops) {
  constexpr int64_t k = 5, n = 7;
  constexpr double kAlpha = 0.9, kBeta = 0.4;
  const Owned offsets = make_offsets({kOffsets[0], kOffsets[1], kOffsets[2], kOffsets[3], kOffsets[4]});
  for (DType dt : {DType::kF32, DType::kF64}) {
    const double tol = dt == DType::kF32 ? 1e-5 : 1e-13;
    for (bool tb : {false, true}) {
      Owned a({kGRows, k}, dt), b(tb ? Shape{kGroups, n, k} : Shape{kGroups, k, n}, dt), c({kGRows, n}, dt);
      test::fill_normal(a, 301);
      test::fill_normal(b, 302);
      test::fill_normal(c, 303);
      const std::vector<double> c0 = test::to_vector(c);
      be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .trans_b = tb, .alpha = kAlpha, .beta = kBeta});
      std::vector<double> want = c0, got = test::to_vector(c);
      for (int64_t g = 0; g < kGroups; ++g)
        for (int64_t r = kOffsets[g]; r < kOffsets[g + 1]; ++r)
          for (int64_t j = 0; j < n; ++j) {
            double s = 0.0;
            for (int64_t p = 0; p < k; ++p)
              s += test::get(a, r * k + p) * test::get(b, tb ? (g * n + j) * k + p : (g * k + p) * n + j);
            want[static_cast<size_t>(r * n + j)] = kAlpha * s + kBeta * c0[static_cast<size_t>(r * n + j)];
          }
      EXPECT_LE(test::rel_error(got, want), tol) << dtype_name(dt) << " trans_b=" << tb;
      for (int64_t i = kOffsets[kGroups] * n; i < kGRows * n; ++i)  // rows beyond offsets[G]: bitwise untouched
        EXPECT_EQ(got[static_cast<size_t>(i)], c0[static_cast<size_t>(i)]);
    }
  }
}

// The two-term grouped GEMM C = alpha·(A·op(B) + A2·op(B2)) + beta·C against the two one-term calls
// it replaces (beta, then 1) and against a per-group double loop. Bitwise equal to the two calls:
// the CPU twin is defined as them (the GPU fuses them, cuda_bf16_gemm.cpp checks it against this).
// k2 ≠ k, the empty group 1, rows 12, 13 past offsets[G] untouched; beta = 0 on NaN-poisoned C.
TEST_F(NormGemm, GroupedGemmTwoTermsEqualsTwoCalls) {
  constexpr int64_t k = 5, k2 = 3, n = 7;
  constexpr double kAlpha = 0.9;
  const Owned offsets = make_offsets({kOffsets[0], kOffsets[1], kOffsets[2], kOffsets[3], kOffsets[4]});
  for (DType dt : {DType::kF32, DType::kF64}) {
    const double tol = dt == DType::kF32 ? 1e-5 : 1e-13;  // vs the double loop: f32 sums of 8 products
    for (bool tb : {false, true})
      for (double beta : {0.0, 0.4}) {
        const std::string what = fmt::format("{} trans_b={} beta={}", dtype_name(dt), tb, beta);
        Owned a({kGRows, k}, dt), b(tb ? Shape{kGroups, n, k} : Shape{kGroups, k, n}, dt);
        Owned a2({kGRows, k2}, dt), b2(tb ? Shape{kGroups, n, k2} : Shape{kGroups, k2, n}, dt);
        Owned c({kGRows, n}, dt), c_two_calls({kGRows, n}, dt);
        test::fill_normal(a, 321);
        test::fill_normal(b, 322);
        test::fill_normal(a2, 323);
        test::fill_normal(b2, 324);
        test::fill_normal(c, 325);
        if (beta == 0.0)  // beta = 0 must not read the rows in use
          for (int64_t i = 0; i < kOffsets[kGroups] * n; ++i) test::set(c, i, std::nan(""));
        test::copy_values(c_two_calls, c);
        const std::vector<double> c0 = test::to_vector(c);
        be.grouped_gemm(ctx, {.c = c,
                              .a = a,
                              .b = b,
                              .offsets = offsets,
                              .trans_b = tb,
                              .alpha = kAlpha,
                              .beta = beta,
                              .a2 = a2,
                              .b2 = b2});
        be.grouped_gemm(
            ctx, {.c = c_two_calls, .a = a, .b = b, .offsets = offsets, .trans_b = tb, .alpha = kAlpha, .beta = beta});
        be.grouped_gemm(
            ctx, {.c = c_two_calls, .a = a2, .b = b2, .offsets = offsets, .trans_b = tb, .alpha = kAlpha, .beta = 1.0});
        const std::vector<double> got = test::to_vector(c), two = test::to_vector(c_two_calls);
        for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], two[i]) << what << ", element " << i;
        std::vector<double> want = c0;
        for (int64_t g = 0; g < kGroups; ++g)
          for (int64_t r = kOffsets[g]; r < kOffsets[g + 1]; ++r)
            for (int64_t j = 0; j < n; ++j) {
              double s = 0.0;
              for (int64_t p = 0; p < k; ++p)
                s += test::get(a, r * k + p) * test::get(b, tb ? (g * n + j) * k + p : (g * k + p) * n + j);
              for (int64_t p = 0; p < k2; ++p)
                s += test::get(a2, r * k2 + p) * test::get(b2, tb ? (g * n + j) * k2 + p : (g * k2 + p) * n + j);
              const auto idx = static_cast<size_t>(r * n + j);
              want[idx] = kAlpha * s + (beta == 0.0 ? 0.0 : beta * c0[idx]);
            }
        const auto used = static_cast<size_t>(kOffsets[kGroups] * n);
        EXPECT_LE(test::rel_error(std::vector<double>(got.begin(), got.begin() + used),
                                  std::vector<double>(want.begin(), want.begin() + used)),
                  tol)
            << what;
        for (size_t i = used; i < got.size(); ++i)  // rows beyond offsets[G]: bitwise untouched
          EXPECT_EQ(got[i], c0[i]) << what << ", tail element " << i;
      }
  }
}

TEST_F(NormGemm, GroupedGemmTwoTermsShapeErrors) {
  const DType dt = DType::kF64;
  Owned a({6, 3}, dt), b({2, 3, 5}, dt), c({6, 5}, dt);  // dgrad layout: B [G, k, n]
  Owned a2({6, 4}, dt), b2({2, 4, 5}, dt);
  const Owned off = make_offsets({0, 3, 6});
  const auto run = [&](const Tensor& x2, const Tensor& w2) {
    be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = off, .trans_b = false, .a2 = x2, .b2 = w2});
  };
  run(a2, b2);  // the good call
  expect_error([&] { run(a2, Tensor{}); }, {"[grouped_gemm]", "both a2 and b2", "b2 is not given"});
  expect_error([&] { run(Tensor{}, b2); }, {"[grouped_gemm]", "both a2 and b2", "a2 is not given"});
  Owned a2_rows({5, 4}, dt), a2_f32({6, 4}, DType::kF32), a2_rank3({1, 6, 4}, dt);
  expect_error([&] { run(a2_rows, b2); }, {"[grouped_gemm]", "a2 [5, 4]", "R = 6"});
  expect_error([&] { run(a2_f32, b2); }, {"[grouped_gemm]", "a2", "dtype"});
  expect_error([&] { run(a2_rank3, b2); }, {"[grouped_gemm]", "a2", "rank 2"});
  Owned b2_k({2, 3, 5}, dt), b2_n({2, 4, 6}, dt), b2_g({3, 4, 5}, dt), b2_rank2({4, 5}, dt), b2_fwd({2, 5, 4}, dt);
  expect_error([&] { run(a2, b2_k); }, {"[grouped_gemm]", "b2 [2, 3, 5]", "must be [2, 4, 5]", "[G, k2, n]"});
  expect_error([&] { run(a2, b2_n); }, {"[grouped_gemm]", "b2 [2, 4, 6]", "must be [2, 4, 5]"});
  expect_error([&] { run(a2, b2_g); }, {"[grouped_gemm]", "b2 [3, 4, 5]", "must be [2, 4, 5]"});
  expect_error([&] { run(a2, b2_rank2); }, {"[grouped_gemm]", "b2", "rank 3"});
  expect_error([&] { run(a2, b2_fwd); }, {"[grouped_gemm]", "b2 [2, 5, 4]", "must be [2, 4, 5]"});
  // fwd layout (trans_b): B2 [G, n, k2].
  Owned bf({2, 5, 3}, dt);
  expect_error(
      [&] { be.grouped_gemm(ctx, {.c = c, .a = a, .b = bf, .offsets = off, .trans_b = true, .a2 = a2, .b2 = b2}); },
      {"[grouped_gemm]", "b2 [2, 4, 5]", "must be [2, 5, 4]", "[G, n, k2]"});
}

TEST_F(NormGemm, GroupedGemmWgradAgainstPerGroupLoops) {
  constexpr int64_t m = 5, n = 7;
  constexpr double kAlpha = 1.1, kBeta = 0.6;
  const Owned offsets = make_offsets({kOffsets[0], kOffsets[1], kOffsets[2], kOffsets[3], kOffsets[4]});
  for (DType dt : {DType::kF32, DType::kF64}) {
    const double tol = dt == DType::kF32 ? 1e-5 : 1e-13;
    Owned a({kGRows, m}, dt), b({kGRows, n}, dt), c({kGroups, m, n}, dt);
    test::fill_normal(a, 311);
    test::fill_normal(b, 312);
    test::fill_normal(c, 313);
    const std::vector<double> c0 = test::to_vector(c);
    be.grouped_gemm_wgrad(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .alpha = kAlpha, .beta = kBeta});
    std::vector<double> want(c0.size());
    for (int64_t g = 0; g < kGroups; ++g)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0.0;
          for (int64_t r = kOffsets[g]; r < kOffsets[g + 1]; ++r)
            s += test::get(a, r * m + i) * test::get(b, r * n + j);
          const auto idx = static_cast<size_t>((g * m + i) * n + j);
          want[idx] = kAlpha * s + kBeta * c0[idx];
        }
    const std::vector<double> got = test::to_vector(c);
    EXPECT_LE(test::rel_error(got, want), tol) << dtype_name(dt);
    for (int64_t i = 0; i < m * n; ++i) {  // the empty group 1 is exactly beta·C
      const auto idx = static_cast<size_t>(m * n + i);
      EXPECT_NEAR(got[idx], kBeta * c0[idx], dt == DType::kF32 ? 1e-6 : 0.0);
    }
  }
}

// sum_sq adds Σ C² of the values the call leaves (the expert part of the gradient norm), and is
// checked like every other argument.
TEST_F(NormGemm, GroupedGemmWgradAddsSumOfSquares) {
  constexpr int64_t m = 5, n = 7;
  const Owned offsets = make_offsets({kOffsets[0], kOffsets[1], kOffsets[2], kOffsets[3], kOffsets[4]});
  for (DType dt : {DType::kF32, DType::kF64}) {
    Owned a({kGRows, m}, dt), b({kGRows, n}, dt), c({kGroups, m, n}, dt), sq({1}, dt);
    test::fill_normal(a, 321);
    test::fill_normal(b, 322);
    test::fill_normal(c, 323);
    test::set(sq, 0, 1.25);
    be.grouped_gemm_wgrad(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .alpha = 0.5, .beta = 0.75, .sum_sq = sq});
    double want = 1.25;
    for (double v : test::to_vector(c)) want += v * v;
    EXPECT_NEAR(test::get(sq, 0), want, (dt == DType::kF32 ? 1e-6 : 1e-14) * want) << dtype_name(dt);
  }
  Owned a({kGRows, m}, DType::kF64), b({kGRows, n}, DType::kF64), c({kGroups, m, n}, DType::kF64);
  Owned sq2({2}, DType::kF64), sq32({1}, DType::kF32);
  expect_error([&] { be.grouped_gemm_wgrad(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .sum_sq = sq2}); },
               {"[grouped_gemm_wgrad]", "sum_sq"});
  expect_error([&] { be.grouped_gemm_wgrad(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .sum_sq = sq32}); },
               {"[grouped_gemm_wgrad]", "sum_sq"});
}

TEST_F(NormGemm, GroupedGemmRejectsBadOffsets) {
  Owned a({6, 3}, DType::kF64), b({2, 5, 3}, DType::kF64), c({6, 5}, DType::kF64), wa({6, 3}, DType::kF64),
      wb({6, 5}, DType::kF64), wc({2, 3, 5}, DType::kF64);
  const auto run = [&](const Owned& off) { be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = off}); };
  const auto run_wgrad = [&](const Owned& off) {
    be.grouped_gemm_wgrad(ctx, {.c = wc, .a = wa, .b = wb, .offsets = off});
  };
  expect_error([&] { run(make_offsets({0, 4, 2})); }, {"[grouped_gemm]", "non-decreasing", "offsets[2] = 2"});
  expect_error([&] { run(make_offsets({0, 3, 7})); }, {"[grouped_gemm]", "offsets[2] = 7", "6 rows"});
  expect_error([&] { run(make_offsets({1, 3, 4})); }, {"[grouped_gemm]", "offsets[0] = 1"});
  expect_error([&] { run(make_offsets({0, 3})); }, {"[grouped_gemm]", "offsets"});
  expect_error([&] { run_wgrad(make_offsets({0, 5, 4})); }, {"[grouped_gemm_wgrad]", "non-decreasing"});
  // max_group_rows: a bound the caller states (the decode engine: its step's tokens) holds for every group.
  const Owned two_groups = make_offsets({0, 2, 6});
  EXPECT_NO_THROW(be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = two_groups, .max_group_rows = 4}));
  expect_error([&] { be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = two_groups, .max_group_rows = 3}); },
               {"[grouped_gemm]", "group 1 has 4 rows", "max_group_rows = 3"});
  expect_error([&] { be.grouped_gemm(ctx, {.c = c, .a = a, .b = b, .offsets = two_groups, .max_group_rows = -1}); },
               {"[grouped_gemm]", "max_group_rows = -1"});
  Owned bad_c({6, 4}, DType::kF64);
  expect_error(
      [&] {
        be.grouped_gemm(ctx, {.c = bad_c, .a = a, .b = b, .offsets = make_offsets({0, 3, 6})});
      },
      {"[grouped_gemm]", "[6, 4]"});
}

}  // namespace
}  // namespace diffmoe
