// Every bf16 field of op_args.h on the CPU backend (the reference the CUDA backend is checked
// against), and GemmPrecision::kBF16:
// - a bf16 output is bitwise bf16(the f32 result): the same call with an f32 output, rounded to
//   nearest even once (the CPU computes that f32 value the same way in both calls, so equality is
//   exact, never within a tolerance); elements the op does not write keep their bits;
// - a bf16 input is read exactly: the call gives bitwise the results of the same call on an f32
//   tensor holding the widened values;
// - the bf16 GEMM mode equals an f64 GEMM of the bf16-rounded operands within the f32 accumulation
//   bound: each product of two bf16 values is exact in f32 (8 + 8 significant bits), so the only
//   errors are the f32 sums of k terms (any order, FMA or not: ≤ γ_k·Σ|a_i·b_i| with γ_k ≈ k·2^-24),
//   alpha and beta converted to f32 and the roundings of alpha·s and + beta·c (four more units):
//   per element |c − ref| ≤ (k + 4)·2^-24·(|alpha|·Σ|a_i·b_i| + |beta·c0|);
//   and the mode must round: the distance to the f64 GEMM of the unrounded operands is far larger.
// bf16 tensors pair with f32 calls only: the dtype rules are in test_rope_attention.cpp and
// test_moe_ops.cpp.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::Owned;

// ---------------------------------------------------------------- helpers

Owned normal(const Shape& s, uint64_t seed, double std = 1.0, double mean = 0.0) {
  Owned t(s, DType::kF32);
  test::fill_normal(t, seed, std, mean);
  return t;
}

// A bf16 tensor holding t's values rounded to nearest even (t: f32).
Owned to_bf16(const Tensor& t) {
  Owned r(t.shape, DType::kBF16);
  for (int64_t i = 0; i < t.numel(); ++i) static_cast<uint16_t*>(r.t().data)[i] = f32_to_bf16(t.ptr<float>()[i]);
  return r;
}

// An f32 tensor holding a bf16 tensor's values (exact).
Owned widened(const Tensor& t16) {
  Owned r(t16.shape, DType::kF32);
  for (int64_t i = 0; i < t16.numel(); ++i) r.at<float>(i) = bf16_to_f32(static_cast<const uint16_t*>(t16.data)[i]);
  return r;
}

// t's values rounded to bf16 and widened back, as f32 (what the bf16 GEMM mode multiplies).
Owned rounded(const Tensor& t) { return widened(to_bf16(t)); }

uint16_t bits16(const Tensor& t, int64_t i) { return static_cast<const uint16_t*>(t.data)[i]; }

// got16 [i] == bf16(ref32[i]) for every element.
void expect_bf16_of(const Tensor& got16, const Tensor& ref32, const std::string& what) {
  ASSERT_EQ(got16.numel(), ref32.numel()) << what;
  int64_t bad = 0;
  for (int64_t i = 0; i < got16.numel(); ++i) bad += bits16(got16, i) == f32_to_bf16(ref32.ptr<float>()[i]) ? 0 : 1;
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got16.numel() << " elements are not the f32 result rounded";
}

// The same bytes (two tensors of one dtype and size).
void expect_same(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.nbytes(), want.nbytes()) << what;
  EXPECT_EQ(std::memcmp(got.data, want.data, got.nbytes()), 0) << what << ": not bitwise equal";
}

// Fills a bf16 tensor with values that must survive where the op does not write.
void fill_bf16(const Tensor& t, uint64_t seed) {
  for (int64_t i = 0; i < t.numel(); ++i)
    static_cast<uint16_t*>(t.data)[i] = f32_to_bf16(static_cast<float>(normal_at(seed, 3, static_cast<uint64_t>(i))));
}

class Bf16Fields : public test::CpuOpsTest {};

// ---------------------------------------------------------------- RMSNorm

// y in bf16 (strided rows into a wider buffer, out_scale): bf16 of the f32 y; the columns between the
// rows keep their bits. y16 beside an f32 y: bf16 of that y, and y unchanged by writing it.
TEST_F(Bf16Fields, RmsNormForwardBf16OutputAndCopy) {
  const int64_t rows = 9, width = 20, xs = 23, ys = 26;
  const Owned x = normal(Shape{rows, xs}, 1, 1.3), w = normal(Shape{width}, 2, 0.5, 1.0);
  Owned y32(Shape{rows, ys}, DType::kF32), y16(Shape{rows, ys}, DType::kBF16), rstd(Shape{rows}, DType::kF32);
  fill_bf16(y16, 3);
  const Owned y16_before = widened(y16);
  const auto args = [&](const Tensor& y) {
    return RmsNormFwdArgs{.y = y,
                          .rstd = rstd,
                          .x = x,
                          .w = w,
                          .rows = rows,
                          .width = width,
                          .x_stride = xs,
                          .y_stride = ys,
                          .eps = 1e-6,
                          .out_scale = 0.7};
  };
  be.rmsnorm_fwd(ctx, args(y32));
  be.rmsnorm_fwd(ctx, args(y16));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ys; ++j) {
      const int64_t i = r * ys + j;
      const uint16_t want = j < width ? f32_to_bf16(y32.at<float>(i)) : f32_to_bf16(y16_before.at<float>(i));
      ASSERT_EQ(bits16(y16, i), want) << "row " << r << " column " << j;
    }

  // y16: [rows, width] dense beside the strided f32 y.
  Owned y(Shape{rows, ys}, DType::kF32), copy(Shape{rows, width}, DType::kBF16);
  RmsNormFwdArgs a = args(y);
  a.y16 = copy;
  be.rmsnorm_fwd(ctx, a);
  expect_same(y, y32, "rmsnorm_fwd y beside y16");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j)
      ASSERT_EQ(bits16(copy, r * width + j), f32_to_bf16(y.at<float>(r * ys + j)))
          << "y16 row " << r << " column " << j;
}

// dx16: the final dx (after accumulation) rounded once, dense [rows, width]; dx as without it.
TEST_F(Bf16Fields, RmsNormBackwardBf16Copy) {
  const int64_t rows = 11, width = 24, xs = 27;
  for (const bool accumulate : {false, true}) {
    const Owned x = normal(Shape{rows, xs}, 10, 1.2), dy = normal(Shape{rows, xs}, 11),
                w = normal(Shape{width}, 12, 0.5, 1.0);
    Owned rstd(Shape{rows}, DType::kF32), y(Shape{rows, xs}, DType::kF32);
    be.rmsnorm_fwd(
        ctx, {.y = y, .rstd = rstd, .x = x, .w = w, .rows = rows, .width = width, .x_stride = xs, .y_stride = xs});
    const Owned dx_plain = normal(Shape{rows, xs}, 13), dx = normal(Shape{rows, xs}, 13);
    Owned dw1(Shape{width}, DType::kF32), dw2(Shape{width}, DType::kF32), dx16(Shape{rows, width}, DType::kBF16);
    const auto args = [&](const Tensor& out, const Tensor& dw, const Tensor& out16) {
      return RmsNormBwdArgs{.dx = out,
                            .dw = dw,
                            .dy = dy,
                            .x = x,
                            .w = w,
                            .rstd = rstd,
                            .rows = rows,
                            .width = width,
                            .x_stride = xs,
                            .y_stride = xs,
                            .dx_accumulate = accumulate,
                            .dx16 = out16};
    };
    be.rmsnorm_bwd(ctx, args(dx_plain, dw1, Tensor{}));
    be.rmsnorm_bwd(ctx, args(dx, dw2, dx16));
    expect_same(dx, dx_plain, "rmsnorm_bwd dx beside dx16");
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; ++j)
        ASSERT_EQ(bits16(dx16, r * width + j), f32_to_bf16(dx.at<float>(r * xs + j)))
            << "accumulate " << accumulate << " row " << r << " column " << j;
  }
}

// ---------------------------------------------------------------- GEMMs in the bf16 mode

// The reference: f64 sums of the products of `a_vals`, `b_vals` (row-major, op() applied), and the
// per-element bound Σ|a·b| (file comment).
struct GemmRef {
  std::vector<double> value, abs_sum;
};
GemmRef f64_gemm(const Tensor& a, const Tensor& b, bool ta, bool tb, int64_t m, int64_t n, int64_t k) {
  GemmRef r{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0, abs_s = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double x = a.ptr<float>()[ta ? p * m + i : i * k + p], y = b.ptr<float>()[tb ? j * k + p : p * n + j];
        s += x * y;
        abs_s += std::fabs(x * y);
      }
      r.value[static_cast<size_t>(i * n + j)] = s;
      r.abs_sum[static_cast<size_t>(i * n + j)] = abs_s;
    }
  return r;
}

// |c − (alpha·ref + beta·c0)| ≤ (k + 4)·2^-24·(|alpha|·Σ|ab| + |beta·c0|) for every element.
void expect_f32_accumulation(const std::vector<double>& c, const GemmRef& ref, const std::vector<double>& c0,
                             double alpha, double beta, int64_t k, const std::string& what) {
  int64_t bad = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    const double want = alpha * ref.value[i] + beta * c0[i];
    const double bound = (static_cast<double>(k) + 4.0) * std::ldexp(1.0, -24) *
                         (std::fabs(alpha) * ref.abs_sum[i] + std::fabs(beta * c0[i]));
    if (!(std::fabs(c[i] - want) <= bound)) ++bad;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements outside the f32 accumulation bound";
}

// Distance of c to the GEMM of the unrounded operands, relative: bf16 inputs put it near 2^-9.
double rel_to_unrounded(const std::vector<double>& c, const GemmRef& exact, const std::vector<double>& c0, double alpha,
                        double beta) {
  double e2 = 0.0, r2 = 0.0;
  for (size_t i = 0; i < c.size(); ++i) {
    const double want = alpha * exact.value[i] + beta * c0[i];
    e2 += (c[i] - want) * (c[i] - want);
    r2 += want * want;
  }
  return std::sqrt(e2 / r2);
}

// gemm in the bf16 mode: every transpose, beta 0 and ≠ 0, a separate addend; f32 and bf16 operands
// (bitwise the same result: bf16 operands are the rounded values); a bf16 C is bf16 of the f32 C.
TEST_F(Bf16Fields, GemmBf16Mode) {
  be.set_gemm_precision(GemmPrecision::kBF16);
  ASSERT_EQ(be.gemm_precision(), GemmPrecision::kBF16);
  const int64_t m = 13, n = 11, k = 37;
  uint64_t seed = 100;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const double beta : {0.0, 0.6}) {
        const Owned a = normal(ta ? Shape{k, m} : Shape{m, k}, seed++),
                    b = normal(tb ? Shape{n, k} : Shape{k, n}, seed++);
        const Owned c0 = normal(Shape{m, n}, seed++), addend = normal(Shape{m, n}, seed++);
        const std::string what = fmt::format("gemm ta={} tb={} beta={}", ta, tb, beta);
        Owned c(Shape{m, n}, DType::kF32), c_sep(Shape{m, n}, DType::kF32);
        test::copy_values(c, c0);
        be.gemm(ctx, {.c = c, .a = a, .b = b, .trans_a = ta, .trans_b = tb, .alpha = -0.8, .beta = beta});
        const Owned ar = rounded(a), br = rounded(b);
        const std::vector<double> base = test::to_vector(c0);
        expect_f32_accumulation(test::to_vector(c), f64_gemm(ar, br, ta, tb, m, n, k), base, -0.8, beta, k, what);
        const double rel = rel_to_unrounded(test::to_vector(c), f64_gemm(a, b, ta, tb, m, n, k), base, -0.8, beta);
        EXPECT_GT(rel, 1e-4) << what << ": f32-like distance to the unrounded GEMM: were A and B rounded?";
        EXPECT_LT(rel, 1e-2) << what;
        // A separate addend gives what C = addend first would.
        be.gemm(ctx,
                {.c = c_sep, .a = a, .b = b, .trans_a = ta, .trans_b = tb, .alpha = -0.8, .beta = beta, .addend = c0});
        expect_same(c_sep, c, what + " with a separate addend");
        // bf16 operands: the rounded values, read exactly.
        const Owned a16 = to_bf16(a), b16 = to_bf16(b);
        for (int which = 1; which <= 3; ++which) {
          Owned c2(Shape{m, n}, DType::kF32);
          test::copy_values(c2, c0);
          be.gemm(ctx, {.c = c2,
                        .a = which & 1 ? a16.t() : a.t(),
                        .b = which & 2 ? b16.t() : b.t(),
                        .trans_a = ta,
                        .trans_b = tb,
                        .alpha = -0.8,
                        .beta = beta});
          expect_same(c2, c, fmt::format("{} bf16 operands {}", what, which));
        }
        if (beta == 0.0) {  // a bf16 C: the f32 result rounded once
          Owned c16(Shape{m, n}, DType::kBF16);
          be.gemm(ctx, {.c = c16, .a = a16, .b = b, .trans_a = ta, .trans_b = tb, .alpha = -0.8});
          expect_bf16_of(c16, c, what + " into a bf16 C");
        }
      }
  // f32_exact: the f32 arithmetic on the f32 operands, as in the f32 mode.
  const Owned a = normal(Shape{m, k}, 150), b = normal(Shape{n, k}, 151);
  Owned exact(Shape{m, n}, DType::kF32), f32_mode(Shape{m, n}, DType::kF32);
  be.gemm(ctx, {.c = exact, .a = a, .b = b, .trans_b = true, .f32_exact = true});
  be.set_gemm_precision(GemmPrecision::kF32);
  be.gemm(ctx, {.c = f32_mode, .a = a, .b = b, .trans_b = true});
  expect_same(exact, f32_mode, "f32_exact in the bf16 mode vs the f32 mode");
  // The f32 mode refuses bf16 operands: the model plans them only in the bf16 mode.
  const Owned b16 = to_bf16(b);
  test::expect_error([&] { be.gemm(ctx, {.c = exact, .a = a, .b = b16, .trans_b = true}); },
                     {"[gemm] b is bf16", "bf16 GEMM mode"});
  be.set_gemm_precision(GemmPrecision::kBF16);
  test::expect_error([&] { be.gemm(ctx, {.c = exact, .a = a, .b = b16, .trans_b = true, .f32_exact = true}); },
                     {"[gemm] b is bf16", "f32_exact = false"});
}

// f64 calls (finite-difference checks) compute in f64 whatever the mode.
TEST_F(Bf16Fields, GemmBf16ModeLeavesF64Alone) {
  Owned a(Shape{5, 9}, DType::kF64), b(Shape{9, 4}, DType::kF64), c1(Shape{5, 4}, DType::kF64),
      c2(Shape{5, 4}, DType::kF64);
  test::fill_normal(a, 160);
  test::fill_normal(b, 161);
  be.gemm(ctx, {.c = c1, .a = a, .b = b});
  be.set_gemm_precision(GemmPrecision::kBF16);
  be.gemm(ctx, {.c = c2, .a = a, .b = b});
  expect_same(c2, c1, "f64 gemm in the bf16 mode");
}

// grouped_gemm in the bf16 mode, both layouts, one and two terms, beta 0 and 1: the f32 accumulation
// bound against the f64 GEMM of the rounded operands per group; bf16 operands give bitwise the same
// C; a bf16 C (beta = 0) is bf16 of the f32 C — both terms summed first — and rows past
// offsets[G] keep their bits.
TEST_F(Bf16Fields, GroupedGemmBf16Mode) {
  be.set_gemm_precision(GemmPrecision::kBF16);
  const int64_t R = 17, G = 4, n = 9, k = 13, k2 = 6;
  const std::vector<int32_t> off = {0, 5, 5, 12, 15};  // group 1 empty; rows 15, 16 past offsets[G]
  Owned offsets(Shape{G + 1}, DType::kI32);
  for (int64_t g = 0; g <= G; ++g) offsets.at<int32_t>(g) = off[static_cast<size_t>(g)];
  uint64_t seed = 200;
  for (const bool trans_b : {true, false})
    for (const bool two : {false, true})
      for (const double beta : {0.0, 1.0}) {
        const auto b_shape = [&](int64_t kk) { return trans_b ? Shape{G, n, kk} : Shape{G, kk, n}; };
        const Owned a = normal(Shape{R, k}, seed++), b = normal(b_shape(k), seed++);
        const Owned a2 = normal(Shape{R, k2}, seed++), b2 = normal(b_shape(k2), seed++),
                    c0 = normal(Shape{R, n}, seed++);
        const std::string what = fmt::format("grouped_gemm trans_b={} two terms={} beta={}", trans_b, two, beta);
        const auto call = [&](const Tensor& c, const Tensor& ta, const Tensor& tb, const Tensor& ta2,
                              const Tensor& tb2) {
          GroupedGemmArgs g{
              .c = c, .a = ta, .b = tb, .offsets = offsets, .trans_b = trans_b, .alpha = 1.3, .beta = beta};
          if (two) {
            g.a2 = ta2;
            g.b2 = tb2;
          }
          be.grouped_gemm(ctx, g);
        };
        Owned c(Shape{R, n}, DType::kF32);
        test::copy_values(c, c0);
        call(c, a, b, a2, b2);
        // Per group: C[rows_g] = 1.3·(A_g·op(B_g) + A2_g·op(B2_g)) + beta·C0 against f64 sums of the rounded values.
        const Owned ar = rounded(a), br = rounded(b), a2r = rounded(a2), b2r = rounded(b2);
        const std::vector<double> got = test::to_vector(c), base = test::to_vector(c0);
        int64_t bad = 0;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = off[static_cast<size_t>(g)]; r < off[static_cast<size_t>(g + 1)]; ++r)
            for (int64_t j = 0; j < n; ++j) {
              double s = 0.0, abs_s = 0.0;
              const auto add = [&](const Tensor& ta, const Tensor& tb, int64_t kk) {
                for (int64_t p = 0; p < kk; ++p) {
                  const double x = ta.ptr<float>()[r * kk + p];
                  const double y = tb.ptr<float>()[trans_b ? (g * n + j) * kk + p : (g * kk + p) * n + j];
                  s += x * y;
                  abs_s += std::fabs(x * y);
                }
              };
              add(ar, br, k);
              if (two) add(a2r, b2r, k2);
              const size_t i = static_cast<size_t>(r * n + j);
              const double want = 1.3 * s + beta * base[i];
              // Two terms are two f32 passes (beta, then 1): the second pass adds its own k2 + 4 units
              // of the same magnitude.
              const double bound = (static_cast<double>(two ? k + k2 + 4 : k) + 4.0) * std::ldexp(1.0, -24) *
                                   (1.3 * abs_s + std::fabs(beta * base[i]));
              if (!(std::fabs(got[i] - want) <= bound)) ++bad;
            }
        EXPECT_EQ(bad, 0) << what << ": elements outside the f32 accumulation bound";
        for (int64_t i = off.back() * n; i < R * n; ++i)
          ASSERT_EQ(got[static_cast<size_t>(i)], base[static_cast<size_t>(i)]) << what;
        // bf16 operands: bitwise the same C.
        Owned c2(Shape{R, n}, DType::kF32);
        test::copy_values(c2, c0);
        const Owned a16 = to_bf16(a), b16 = to_bf16(b), a2_16 = to_bf16(a2), b2_16 = to_bf16(b2);
        call(c2, a16, b16, a2_16, b2_16);
        expect_same(c2, c, what + " with bf16 operands");
        if (beta == 0.0) {  // a bf16 C: rows in use rounded once from the f32 C, the rest keep their bits
          Owned c16(Shape{R, n}, DType::kBF16);
          fill_bf16(c16, seed++);
          const Owned before = widened(c16);
          call(c16, a16, b, a2, b2_16);
          for (int64_t i = 0; i < R * n; ++i) {
            const uint16_t want = i < off.back() * n ? f32_to_bf16(c.at<float>(i)) : f32_to_bf16(before.at<float>(i));
            ASSERT_EQ(bits16(c16, i), want) << what << " into a bf16 C, element " << i;
          }
        }
      }
}

// grouped_gemm_wgrad in the bf16 mode: the bound per group, bf16 operands bitwise the same C, and
// sum_sq = Σ C² as sum_squares adds it (bitwise: the same op on the same values).
TEST_F(Bf16Fields, GroupedGemmWgradBf16Mode) {
  be.set_gemm_precision(GemmPrecision::kBF16);
  const int64_t R = 17, G = 4, m = 7, n = 5;
  const std::vector<int32_t> off = {0, 5, 5, 12, 15};
  Owned offsets(Shape{G + 1}, DType::kI32);
  for (int64_t g = 0; g <= G; ++g) offsets.at<int32_t>(g) = off[static_cast<size_t>(g)];
  const Owned a = normal(Shape{R, m}, 300), b = normal(Shape{R, n}, 301), c0 = normal(Shape{G, m, n}, 302);
  Owned c(Shape{G, m, n}, DType::kF32), sq(Shape{1}, DType::kF32);
  test::copy_values(c, c0);
  sq.at<float>(0) = 0.5f;
  be.grouped_gemm_wgrad(ctx, {.c = c, .a = a, .b = b, .offsets = offsets, .alpha = 0.75, .beta = 1.0, .sum_sq = sq});
  const Owned ar = rounded(a), br = rounded(b);
  const std::vector<double> got = test::to_vector(c), base = test::to_vector(c0);
  int64_t bad = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0.0, abs_s = 0.0;
        for (int64_t r = r0; r < r1; ++r) {
          const double x = ar.at<float>(r * m + i), y = br.at<float>(r * n + j);
          s += x * y;
          abs_s += std::fabs(x * y);
        }
        const size_t e = static_cast<size_t>((g * m + i) * n + j);
        const double bound =
            (static_cast<double>(r1 - r0) + 4.0) * std::ldexp(1.0, -24) * (0.75 * abs_s + std::fabs(base[e]));
        if (!(std::fabs(got[e] - (0.75 * s + base[e])) <= bound)) ++bad;
      }
  }
  EXPECT_EQ(bad, 0) << "grouped_gemm_wgrad: elements outside the f32 accumulation bound";
  Owned want_sq(Shape{1}, DType::kF32);
  want_sq.at<float>(0) = 0.5f;
  be.sum_squares(ctx, {.out = want_sq, .x = c});
  expect_same(sq, want_sq, "grouped_gemm_wgrad sum_sq");
  Owned c2(Shape{G, m, n}, DType::kF32);
  test::copy_values(c2, c0);
  const Owned a16 = to_bf16(a), b16 = to_bf16(b);
  be.grouped_gemm_wgrad(ctx, {.c = c2, .a = a16, .b = b16, .offsets = offsets, .alpha = 0.75, .beta = 1.0});
  expect_same(c2, c, "grouped_gemm_wgrad with bf16 operands");
  Owned c16(Shape{G, m, n}, DType::kBF16);
  test::expect_error([&] { be.grouped_gemm_wgrad(ctx, {.c = c16, .a = a16, .b = b16, .offsets = offsets}); },
                     {"[grouped_gemm_wgrad] c is bf16"});
}

// ---------------------------------------------------------------- RoPE, the MLA split, attention

// RoPE on a bf16 x in place, forward and inverse: bf16 of the f32 rotation of the widened values;
// columns outside the rope range keep their bits.
TEST_F(Bf16Fields, RopeOnBf16) {
  const int64_t rows = 10, width = 30, heads = 3, head_stride = 9, col_offset = 3, rope_dim = 4;
  const Owned cos = normal(Shape{12, rope_dim / 2}, 400), sin = normal(Shape{12, rope_dim / 2}, 401);
  for (const bool inverse : {false, true}) {
    const Owned x16 = to_bf16(normal(Shape{rows, width}, 402)), x32 = widened(x16), before = widened(x16);
    const auto rope = [&](const Tensor& x) {
      be.rope(ctx, {.x = x,
                    .cos = cos,
                    .sin = sin,
                    .n_heads = heads,
                    .head_stride = head_stride,
                    .col_offset = col_offset,
                    .rope_dim = rope_dim,
                    .seq_len = 5,
                    .pos_offset = 2,
                    .inverse = inverse});
    };
    rope(x32);
    rope(x16);
    expect_bf16_of(x16, x32, fmt::format("rope on bf16, inverse {}", inverse));
    int64_t changed = 0;
    for (int64_t i = 0; i < rows * width; ++i) changed += x32.at<float>(i) != before.at<float>(i) ? 1 : 0;
    EXPECT_GT(changed, rows * heads * rope_dim / 2) << "the rotation moved too few values to be a test";
  }
}

TEST_F(Bf16Fields, MlaKvSplitBf16) {
  const int64_t N = 7, H = 3, dn = 4, dr = 2, dv = 5, kr_stride = 9, kr_offset = 6, dqk = dn + dr;
  const Shape kv_shape{N, H * (dn + dv)}, k_shape{N, H, dqk}, v_shape{N, H, dv};
  const Owned kv = normal(kv_shape, 500), kr = normal(Shape{N, kr_stride}, 501);
  const auto fwd = [&](const Tensor& k, const Tensor& v, const Tensor& kvt) {
    be.mla_kv_split_fwd(ctx, {.k = k,
                              .v = v,
                              .kv = kvt,
                              .kr = kr,
                              .n_heads = H,
                              .d_nope = dn,
                              .d_rope = dr,
                              .d_v = dv,
                              .kr_stride = kr_stride,
                              .kr_offset = kr_offset});
  };
  // bf16 k, v from an f32 kv: bf16 of the f32 split; from a bf16 kv: the f32 split of the widened kv.
  Owned k(k_shape, DType::kF32), v(v_shape, DType::kF32), k16(k_shape, DType::kBF16), v16(v_shape, DType::kBF16);
  fwd(k, v, kv);
  fwd(k16, v16, kv);
  expect_bf16_of(k16, k, "mla_kv_split_fwd k into bf16");
  expect_bf16_of(v16, v, "mla_kv_split_fwd v into bf16");
  const Owned kv16 = to_bf16(kv), kv_w = widened(kv16);
  Owned kw(k_shape, DType::kF32), vw(v_shape, DType::kF32), k_from16(k_shape, DType::kF32),
      v_from16(v_shape, DType::kF32);
  fwd(kw, vw, kv_w);
  fwd(k_from16, v_from16, kv16);
  expect_same(k_from16, kw, "mla_kv_split_fwd k from a bf16 kv");
  expect_same(v_from16, vw, "mla_kv_split_fwd v from a bf16 kv");

  // Backward: bf16 dk, dv read exactly (dkv, and dkr's f32 sums over heads); a bf16 dkv rounded once.
  const Owned dk16 = to_bf16(normal(k_shape, 502)), dv16 = to_bf16(normal(v_shape, 503));
  const Owned dk_w = widened(dk16), dv_w = widened(dv16);
  const auto bwd = [&](const Tensor& dkv, const Tensor& dkr, const Tensor& dk, const Tensor& dvt) {
    be.mla_kv_split_bwd(ctx, {.dkv = dkv,
                              .dkr = dkr,
                              .dk = dk,
                              .dv = dvt,
                              .n_heads = H,
                              .d_nope = dn,
                              .d_rope = dr,
                              .d_v = dv,
                              .kr_stride = kr_stride,
                              .kr_offset = kr_offset});
  };
  const Owned dkr0 = normal(Shape{N, kr_stride}, 504);
  Owned dkv_ref(kv_shape, DType::kF32), dkv(kv_shape, DType::kF32), dkv16(kv_shape, DType::kBF16);
  Owned dkr_ref(Shape{N, kr_stride}, DType::kF32), dkr(Shape{N, kr_stride}, DType::kF32),
      dkr2(Shape{N, kr_stride}, DType::kF32);
  for (Owned* t : {&dkr_ref, &dkr, &dkr2}) test::copy_values(*t, dkr0);
  bwd(dkv_ref, dkr_ref, dk_w, dv_w);
  bwd(dkv, dkr, dk16, dv16);
  expect_same(dkv, dkv_ref, "mla_kv_split_bwd dkv from bf16 dk, dv");
  expect_same(dkr, dkr_ref, "mla_kv_split_bwd dkr from bf16 dk");
  bwd(dkv16, dkr2, dk16, dv16);
  expect_bf16_of(dkv16, dkv_ref, "mla_kv_split_bwd into a bf16 dkv");
  expect_same(dkr2, dkr_ref, "mla_kv_split_bwd dkr beside a bf16 dkv");
}

// attention_fwd / attention_bwd with bf16 q, k, v (any shape: these head sizes are ones no tensor-core
// kernel covers): bitwise the f32 op on the widened values; bf16 dq, dk, dv the f32 gradients rounded.
TEST_F(Bf16Fields, AttentionBf16) {
  for (const bool diff : {true, false}) {
    const int64_t B = 2, T = 6, H = 4, dqk = 7, dv = 3, C = diff ? 2 : 1;
    const Shape qs{B, T, H, dqk}, vs{B, T, H, dv}, os{B, T, H / C, C * dv};
    const Owned q16 = to_bf16(normal(qs, 600)), k16 = to_bf16(normal(qs, 601)), v16 = to_bf16(normal(vs, 602));
    const Owned q = widened(q16), k = widened(k16), v = widened(v16), lambda = normal(Shape{1}, 603, 0.1, 0.3);
    const Owned dout = normal(os, 604);
    struct Out {
      Owned out, o2, lse;
    };
    const auto forward = [&](const Tensor& tq, const Tensor& tk, const Tensor& tv) {
      Out o{Owned(os, DType::kF32), Owned(os, DType::kF32), Owned(Shape{B, H, T}, DType::kF32)};
      be.attention_fwd(ctx, {.out = o.out,
                             .o2 = diff ? o.o2.t() : Tensor{},
                             .lse = o.lse,
                             .q = tq,
                             .k = tk,
                             .v = tv,
                             .lambda = diff ? lambda.t() : Tensor{},
                             .scale = 0.4,
                             .differential = diff});
      return o;
    };
    const Out ref = forward(q, k, v), got = forward(q16, k16, v16);
    const std::string tag = diff ? "differential" : "plain";
    expect_same(got.out, ref.out, "attention_fwd out from bf16 q, k, v, " + tag);
    if (diff) expect_same(got.o2, ref.o2, "attention_fwd o2 from bf16 q, k, v");
    expect_same(got.lse, ref.lse, "attention_fwd lse from bf16 q, k, v, " + tag);

    const auto backward = [&](const Tensor& tq, const Tensor& tk, const Tensor& tv, const Tensor& dq, const Tensor& dk,
                              const Tensor& dvt, const Tensor& dl) {
      be.attention_bwd(ctx, {.dq = dq,
                             .dk = dk,
                             .dv = dvt,
                             .dlambda = diff ? dl : Tensor{},
                             .dout = dout,
                             .q = tq,
                             .k = tk,
                             .v = tv,
                             .out = ref.out,
                             .o2 = diff ? ref.o2.t() : Tensor{},
                             .lse = ref.lse,
                             .lambda = diff ? lambda.t() : Tensor{},
                             .scale = 0.4,
                             .differential = diff});
    };
    Owned dq(qs, DType::kF32), dk(qs, DType::kF32), dvv(vs, DType::kF32), dl(Shape{1}, DType::kF32);
    Owned dq2(qs, DType::kF32), dk2(qs, DType::kF32), dv2(vs, DType::kF32), dl2(Shape{1}, DType::kF32);
    Owned dq16(qs, DType::kBF16), dk16(qs, DType::kBF16), dv16(vs, DType::kBF16), dl3(Shape{1}, DType::kF32);
    backward(q, k, v, dq, dk, dvv, dl);
    backward(q16, k16, v16, dq2, dk2, dv2, dl2);
    backward(q16, k16, v16, dq16, dk16, dv16, dl3);
    expect_same(dq2, dq, "attention_bwd dq from bf16 q, k, v, " + tag);
    expect_same(dk2, dk, "attention_bwd dk from bf16 q, k, v, " + tag);
    expect_same(dv2, dvv, "attention_bwd dv from bf16 q, k, v, " + tag);
    expect_bf16_of(dq16, dq, "attention_bwd bf16 dq, " + tag);
    expect_bf16_of(dk16, dk, "attention_bwd bf16 dk, " + tag);
    expect_bf16_of(dv16, dvv, "attention_bwd bf16 dv, " + tag);
    if (diff) {
      expect_same(dl2, dl, "attention_bwd dlambda from bf16 q, k, v");
      expect_same(dl3, dl, "attention_bwd dlambda beside bf16 gradients");
    }
  }
}

// ---------------------------------------------------------------- SwiGLU, MoE rows, the loss

// f32 inputs into bf16 outputs (h; da, db) and bf16 inputs (a, b, dh; then bf16 outputs).
TEST_F(Bf16Fields, SwigluBf16) {
  const Shape s{9, 14};
  const Owned a = normal(s, 700, 2.0), b = normal(s, 701), dh = normal(s, 702);
  Owned h(s, DType::kF32), da(s, DType::kF32), db(s, DType::kF32);
  Owned h16(s, DType::kBF16), da16(s, DType::kBF16), db16(s, DType::kBF16);
  be.swiglu_fwd(ctx, {.h = h, .a = a, .b = b});
  be.swiglu_bwd(ctx, {.da = da, .db = db, .dh = dh, .a = a, .b = b});
  be.swiglu_fwd(ctx, {.h = h16, .a = a, .b = b});
  be.swiglu_bwd(ctx, {.da = da16, .db = db16, .dh = dh, .a = a, .b = b});
  expect_bf16_of(h16, h, "swiglu_fwd h into bf16");
  expect_bf16_of(da16, da, "swiglu_bwd da into bf16");
  expect_bf16_of(db16, db, "swiglu_bwd db into bf16");

  const Owned a16 = to_bf16(a), b16 = to_bf16(b), dh16 = to_bf16(dh), aw = widened(a16), bw = widened(b16),
              dhw = widened(dh16);
  be.swiglu_fwd(ctx, {.h = h, .a = aw, .b = bw});
  be.swiglu_bwd(ctx, {.da = da, .db = db, .dh = dhw, .a = aw, .b = bw});
  be.swiglu_fwd(ctx, {.h = h16, .a = a16, .b = b16});
  be.swiglu_bwd(ctx, {.da = da16, .db = db16, .dh = dh16, .a = a16, .b = b16});
  expect_bf16_of(h16, h, "swiglu_fwd from bf16 a, b");
  expect_bf16_of(da16, da, "swiglu_bwd da from bf16 a, b, dh");
  expect_bf16_of(db16, db, "swiglu_bwd db from bf16 a, b, dh");
  // In place (da over a, db over b, the CUDA model's aliasing): the same values.
  const Owned a16b = to_bf16(a), b16b = to_bf16(b);
  be.swiglu_bwd(ctx, {.da = a16b, .db = b16b, .dh = dh16, .a = a16b, .b = b16b});
  expect_same(a16b, da16, "swiglu_bwd da in place over a");
  expect_same(b16b, db16, "swiglu_bwd db in place over b");
}

TEST_F(Bf16Fields, MoeRowsBf16) {
  const int64_t N = 7, K = 2, D = 6, NK = N * K;
  Owned src(Shape{NK}, DType::kI32), slot(Shape{N, K}, DType::kI32);
  for (int64_t i = 0; i < NK; ++i) {
    src.at<int32_t>(i) = static_cast<int32_t>((5 * i) % N);
    slot.at<int32_t>(i) = static_cast<int32_t>((3 * i) % NK);  // a permutation: gcd(3, 14) = 1
  }
  const Owned w = normal(Shape{N, K}, 800);

  // gather: bf16 x (moved exactly, into f32 or bf16 rows), bf16 rows from an f32 x (rounded once).
  const Owned x = normal(Shape{N, D}, 801), x16 = to_bf16(x), xw = widened(x16);
  Owned xp_ref(Shape{NK, D}, DType::kF32), xp(Shape{NK, D}, DType::kF32), xp16(Shape{NK, D}, DType::kBF16);
  be.moe_gather(ctx, {.x_perm = xp_ref, .x = xw, .src_row = src});
  be.moe_gather(ctx, {.x_perm = xp, .x = x16, .src_row = src});
  expect_same(xp, xp_ref, "moe_gather from a bf16 x");
  be.moe_gather(ctx, {.x_perm = xp16, .x = x16, .src_row = src});
  expect_bf16_of(xp16, xp_ref, "moe_gather bf16 x into bf16 rows");
  Owned xp32(Shape{NK, D}, DType::kF32);
  be.moe_gather(ctx, {.x_perm = xp32, .x = x, .src_row = src});
  be.moe_gather(ctx, {.x_perm = xp16, .x = x, .src_row = src});
  expect_bf16_of(xp16, xp32, "moe_gather f32 x into bf16 rows");

  // gather_bwd and combine_fwd from bf16 rows: the f32 op on the widened rows (dx, y accumulate).
  const Owned rows16 = to_bf16(normal(Shape{NK, D}, 802)), rows_w = widened(rows16), base = normal(Shape{N, D}, 803);
  Owned dx1(Shape{N, D}, DType::kF32), dx2(Shape{N, D}, DType::kF32), y1(Shape{N, D}, DType::kF32),
      y2(Shape{N, D}, DType::kF32);
  for (Owned* t : {&dx1, &dx2, &y1, &y2}) test::copy_values(*t, base);
  be.moe_gather_bwd(ctx, {.dx = dx1, .dx_perm = rows_w, .slot_pos = slot});
  be.moe_gather_bwd(ctx, {.dx = dx2, .dx_perm = rows16, .slot_pos = slot});
  expect_same(dx2, dx1, "moe_gather_bwd from a bf16 dx_perm");
  be.moe_combine_fwd(ctx, {.y = y1, .y_perm = rows_w, .topk_w = w, .slot_pos = slot});
  be.moe_combine_fwd(ctx, {.y = y2, .y_perm = rows16, .topk_w = w, .slot_pos = slot});
  expect_same(y2, y1, "moe_combine_fwd from a bf16 y_perm");

  // combine_bwd: bf16 dy and y_perm read exactly; a bf16 dy_perm rounded once.
  const Owned dy16 = to_bf16(normal(Shape{N, D}, 804)), dy_w = widened(dy16);
  Owned dyp_ref(Shape{NK, D}, DType::kF32), dtw_ref(Shape{N, K}, DType::kF32);
  Owned dyp(Shape{NK, D}, DType::kF32), dtw(Shape{N, K}, DType::kF32), dyp16(Shape{NK, D}, DType::kBF16),
      dtw2(Shape{N, K}, DType::kF32);
  be.moe_combine_bwd(
      ctx, {.dy_perm = dyp_ref, .dtopk_w = dtw_ref, .dy = dy_w, .y_perm = rows_w, .topk_w = w, .slot_pos = slot});
  be.moe_combine_bwd(ctx,
                     {.dy_perm = dyp, .dtopk_w = dtw, .dy = dy16, .y_perm = rows16, .topk_w = w, .slot_pos = slot});
  expect_same(dyp, dyp_ref, "moe_combine_bwd dy_perm from bf16 dy, y_perm");
  expect_same(dtw, dtw_ref, "moe_combine_bwd dtopk_w from bf16 dy, y_perm");
  be.moe_combine_bwd(ctx,
                     {.dy_perm = dyp16, .dtopk_w = dtw2, .dy = dy16, .y_perm = rows16, .topk_w = w, .slot_pos = slot});
  expect_bf16_of(dyp16, dyp_ref, "moe_combine_bwd into a bf16 dy_perm");
  expect_same(dtw2, dtw_ref, "moe_combine_bwd dtopk_w beside a bf16 dy_perm");
}

// Cross-entropy on bf16 logits (loss_sum, valid and dlogits of the widened values), and into a bf16
// dlogits (rounded once), with ignored targets.
TEST_F(Bf16Fields, CrossEntropyBf16) {
  const int64_t N = 6, V = 29;
  const Owned l16 = to_bf16(normal(Shape{N, V}, 900, 3.0)), lw = widened(l16);
  Owned targets(Shape{N}, DType::kI32);
  for (int64_t n = 0; n < N; ++n) targets.at<int32_t>(n) = n == 2 ? -1 : static_cast<int32_t>((7 * n + 3) % V);
  Owned loss1(Shape{1}, DType::kF32), valid1(Shape{1}, DType::kF32), loss2(Shape{1}, DType::kF32),
      valid2(Shape{1}, DType::kF32);
  loss1.at<float>(0) = loss2.at<float>(0) = 0.25f;
  be.cross_entropy_fwd(ctx, {.loss_sum = loss1, .valid = valid1, .logits = lw, .targets = targets});
  be.cross_entropy_fwd(ctx, {.loss_sum = loss2, .valid = valid2, .logits = l16, .targets = targets});
  expect_same(loss2, loss1, "cross_entropy_fwd loss_sum from bf16 logits");
  expect_same(valid2, valid1, "cross_entropy_fwd valid from bf16 logits");
  Owned dl_ref(Shape{N, V}, DType::kF32), dl(Shape{N, V}, DType::kF32), dl16(Shape{N, V}, DType::kBF16);
  be.cross_entropy_bwd(ctx, {.dlogits = dl_ref, .logits = lw, .targets = targets, .valid = valid1, .grad_scale = 0.6});
  be.cross_entropy_bwd(ctx, {.dlogits = dl, .logits = l16, .targets = targets, .valid = valid1, .grad_scale = 0.6});
  expect_same(dl, dl_ref, "cross_entropy_bwd from bf16 logits");
  be.cross_entropy_bwd(ctx, {.dlogits = dl16, .logits = l16, .targets = targets, .valid = valid1, .grad_scale = 0.6});
  expect_bf16_of(dl16, dl_ref, "cross_entropy_bwd into a bf16 dlogits");
  // f32 logits into a bf16 dlogits.
  const Owned l32 = normal(Shape{N, V}, 901, 3.0);
  be.cross_entropy_bwd(ctx, {.dlogits = dl_ref, .logits = l32, .targets = targets, .valid = valid1, .grad_scale = 0.6});
  be.cross_entropy_bwd(ctx, {.dlogits = dl16, .logits = l32, .targets = targets, .valid = valid1, .grad_scale = 0.6});
  expect_bf16_of(dl16, dl_ref, "cross_entropy_bwd f32 logits into a bf16 dlogits");
}

// adamw_multi's per-entry bf16 copies: bf16 of each updated param (adamw's is in
// test_swiglu_loss_optim.cpp).
TEST_F(Bf16Fields, AdamWMultiBf16Copies) {
  const Owned p1 = normal(Shape{5, 3}, 950), p2 = normal(Shape{8}, 951), g1 = normal(Shape{5, 3}, 952),
              g2 = normal(Shape{8}, 953);
  Owned m1(Shape{5, 3}, DType::kF32), v1(Shape{5, 3}, DType::kF32), m2(Shape{8}, DType::kF32),
      v2(Shape{8}, DType::kF32);
  Owned c1(Shape{5, 3}, DType::kBF16), c2(Shape{8}, DType::kBF16);
  be.adamw_multi(ctx, {.entries = {{.param = p1, .m = m1, .v = v1, .grad = g1, .param_bf16 = c1, .weight_decay = 0.1},
                                   {.param = p2, .m = m2, .v = v2, .grad = g2, .param_bf16 = c2}},
                       .lr = 0.05});
  expect_bf16_of(c1, p1, "adamw_multi entries[0].param_bf16");
  expect_bf16_of(c2, p2, "adamw_multi entries[1].param_bf16");
}

}  // namespace
}  // namespace diffmoe
