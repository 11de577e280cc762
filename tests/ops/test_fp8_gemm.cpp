// The CPU fp8_gemm (op_args.h; docs/model.md §7, docs/derivations.md §6.1) against a naive f64 sum of the dequantised
// operands, and the recipe's three GEMMs (Fprop, Dgrad, Wgrad) composed with the quantisers against
// the exact f64 product of the unquantised matrices.
//
// Bounds. Op vs naive reference: both sum exact f64 products (e4m3 times f32 scale fits in 28 bits)
// in f64, in different orders: |Δ| ≤ 2·K·2^-53·|alpha|·Σ_k|â_k·b̂_k| + 2^-52·|beta·addend|, plus the
// output's rounding (f32: 2^-24·|ref|; bf16 through f32: 2^-8·|ref|). Recipe vs exact product: each
// operand element is its e4m3 code times its scale, within half a step of the source value: relative
// δ = 2^-4 (+2^-20 for the f32 quotient) in e4m3's normal range, absolute ε = 2^-10·s in its
// subnormal range; so each term x_k·w_k is off by at most |x||w|(2δ+δ²) + |x|ε_w + |w|ε_x + ε_xε_w.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fp8_test_util.h"
#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::Owned;

class Fp8Gemm : public test::CpuOpsTest {};

// An e4m3 tensor of random finite codes and an f32 scale tensor of random positive scales (not
// powers of two, spread over 0.01 .. 10, so a scale taken from the wrong tile shows).
Owned random_codes(Shape shape, uint64_t seed) {
  Owned q(shape, DType::kF8E4M3);
  const std::vector<uint8_t> codes = test::finite_e4m3_codes();
  for (int64_t i = 0; i < q.numel(); ++i)
    static_cast<uint8_t*>(q.t().data)[i] =
        codes[static_cast<size_t>(uniform_at(seed, 1, static_cast<uint64_t>(i)) * 254) % 254];
  return q;
}
Owned random_scales(Shape shape, uint64_t seed) {
  Owned s(shape, DType::kF32);
  for (int64_t i = 0; i < s.numel(); ++i)
    s.at<float>(i) = static_cast<float>(0.01 * std::pow(1000.0, uniform_at(seed, 2, static_cast<uint64_t>(i))));
  return s;
}

double code_value(const Owned& q, int64_t i) { return e4m3_to_f32(static_cast<const uint8_t*>(q.t().data)[i]); }
double value(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::kF64: return t.ptr<double>()[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    default: return t.ptr<float>()[i];
  }
}
double rounding_of(DType d) {
  return d == DType::kF64 ? 0.0 : d == DType::kF32 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8);
}

struct GemmCase {
  int64_t m, n, k;
  Fp8Scaling b_scaling;
  DType c_dtype;
  double alpha, beta;
  bool separate_addend;
};

// One fp8_gemm against the naive f64 sum (the file comment's first bound).
void check_against_naive(Backend& be, const GemmCase& g, uint64_t seed) {
  const auto [m, n, k, b_scaling, c_dtype, alpha, beta, separate_addend] = g;
  const Owned a = random_codes({m, k}, seed), b = random_codes({n, k}, seed + 1);
  const Owned sa = random_scales({fp8_tiles(k), m}, seed + 2);
  const Owned sb = random_scales(
      b_scaling == Fp8Scaling::kBlock128x128 ? Shape{fp8_tiles(n), fp8_block_scale_cols(k)} : Shape{fp8_tiles(k), n},
      seed + 3);
  Owned c({m, n}, c_dtype), addend({m, n}, c_dtype);
  Owned init({m, n}, DType::kF64);
  test::fill_normal(init, seed + 4, 3.0);
  for (int64_t i = 0; i < m * n; ++i) {  // C (or the addend) starts at init; an unread C is NaN
    const double v = test::get(init, i);
    for (const Owned* t : {&c, &addend}) {
      const bool unread = t == &c && separate_addend;
      const double x = unread ? std::numeric_limits<double>::quiet_NaN() : v;
      if (c_dtype == DType::kF64) t->at<double>(i) = x;
      else if (c_dtype == DType::kF32) t->at<float>(i) = static_cast<float>(x);
      else static_cast<uint16_t*>(t->t().data)[i] = f32_to_bf16(static_cast<float>(x));
    }
  }
  std::vector<double> add(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m * n; ++i) add[static_cast<size_t>(i)] = value(addend, i);  // as stored
  be.fp8_gemm({}, {.c = c,
                   .a = a,
                   .a_scale = sa,
                   .b = b,
                   .b_scale = sb,
                   .b_scaling = b_scaling,
                   .alpha = alpha,
                   .beta = beta,
                   .addend = separate_addend ? addend.t() : Tensor{}});
  // The dequantised operands, written out from the layouts of op_args.h.
  const int64_t ld = fp8_block_scale_cols(k);
  std::vector<double> ah(static_cast<size_t>(m * k)), bh(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t kk = 0; kk < k; ++kk)
      ah[static_cast<size_t>(i * k + kk)] = code_value(a, i * k + kk) * sa.at<float>((kk / 128) * m + i);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t kk = 0; kk < k; ++kk)
      bh[static_cast<size_t>(j * k + kk)] =
          code_value(b, j * k + kk) * (b_scaling == Fp8Scaling::kBlock128x128 ? sb.at<float>((j / 128) * ld + kk / 128)
                                                                              : sb.at<float>((kk / 128) * n + j));
  int64_t bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0.0, mag = 0.0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double p = ah[static_cast<size_t>(i * k + kk)] * bh[static_cast<size_t>(j * k + kk)];
        sum += p;
        mag += std::fabs(p);
      }
      const double extra = beta == 0.0 ? 0.0 : beta * add[static_cast<size_t>(i * n + j)];
      const double ref = alpha * sum + extra;
      const double tol = 2.0 * static_cast<double>(k) * std::ldexp(1.0, -53) * std::fabs(alpha) * mag +
                         std::ldexp(std::fabs(extra), -52) + rounding_of(c_dtype) * std::fabs(ref);
      const double got = value(c, i * n + j);
      if (!(std::fabs(got - ref) <= tol)) {
        if (bad++ < 5) ADD_FAILURE() << "(" << i << "," << j << "): got " << got << ", want " << ref << " ± " << tol;
      }
    }
  EXPECT_EQ(bad, 0) << m << "x" << n << "x" << k << " " << dtype_name(c_dtype);
}

// Sizes that are not multiples of 128 (edge tiles and blocks) and one that is; every output dtype;
// alpha, beta, a separate addend (C poisoned: only written) and C in place; both B scalings.
TEST_F(Fp8Gemm, MatchesNaiveF64Sum) {
  uint64_t seed = 100;
  for (Fp8Scaling bs : {Fp8Scaling::kBlock128x128, Fp8Scaling::kTile1x128}) {
    for (DType dt : {DType::kF64, DType::kF32, DType::kBF16})
      check_against_naive(be, {130, 200, 300, bs, dt, 1.0, 0.0, false}, seed += 10);
    check_against_naive(be, {128, 256, 256, bs, DType::kF32, 0.5, 1.0, false}, seed += 10);
    check_against_naive(be, {67, 45, 140, bs, DType::kF32, -1.5, 0.75, true}, seed += 10);
    check_against_naive(be, {67, 45, 140, bs, DType::kF64, 2.0, -1.0, false}, seed += 10);
    check_against_naive(be, {33, 17, 19, bs, DType::kF64, 1.0, 0.0, true}, seed += 10);  // NaN C and addend unread
  }
}

// beta = 0 reads neither C nor the addend: NaNs in both stay out of the result.
TEST_F(Fp8Gemm, BetaZeroReadsNeither) {
  const int64_t m = 16, n = 24, k = 32;
  const Owned a = random_codes({m, k}, 1), b = random_codes({n, k}, 2);
  const Owned sa = random_scales({1, m}, 3), sb = random_scales({1, 4}, 4);
  Owned c({m, n}, DType::kF32), addend({m, n}, DType::kF32);
  for (int64_t i = 0; i < m * n; ++i) c.at<float>(i) = addend.at<float>(i) = std::nanf("");
  be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .addend = addend});
  for (int64_t i = 0; i < m * n; ++i) ASSERT_FALSE(std::isnan(c.at<float>(i))) << i;
  be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb});  // addend = C: NaN-free now
}

// K = 0: an empty sum, C = beta·C.
TEST_F(Fp8Gemm, EmptyInnerDimension) {
  const Owned a({3, 0}, DType::kF8E4M3), b({5, 0}, DType::kF8E4M3), sa({0, 3}, DType::kF32), sb({1, 0}, DType::kF32);
  Owned c({3, 5}, DType::kF32);
  for (int64_t i = 0; i < 15; ++i) c.at<float>(i) = static_cast<float>(i + 1);
  be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .alpha = 2.0, .beta = 0.5});
  for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(c.at<float>(i), 0.5f * static_cast<float>(i + 1));
}

// The recipe's GEMMs of a Linear y = x Wᵀ, x [T, D], W [O, D], dy [T, O] (op_args.h's table), each
// against the exact f64 product of the unquantised matrices within the file comment's second bound.
class Fp8Recipe : public Fp8Gemm {
 protected:
  static constexpr int64_t kT = 264, kD = 200, kO = 136;  // tokens, in and out features: edge tiles
  std::vector<float> x = test::fp8_test_values(kT, kD, 71), w = test::fp8_test_values(kO, kD, 72),
                     dy = test::fp8_test_values(kT, kO, 73);

  // A source tensor holding v.
  static Owned source(const std::vector<float>& v, int64_t r, int64_t c) {
    Owned t({r, c}, DType::kF32);
    std::memcpy(t.t().data, v.data(), v.size() * sizeof(float));
    return t;
  }
  struct Act {
    Owned q, s, q_t, s_t;
  };
  Act quantise_act(const std::vector<float>& v, int64_t r, int64_t c) {
    Act o{Owned({r, c}, DType::kF8E4M3), Owned({fp8_tiles(c), r}, DType::kF32), Owned({c, r}, DType::kF8E4M3),
          Owned({fp8_tiles(r), c}, DType::kF32)};
    be.act_quant(ctx, {.q = o.q, .scale = o.s, .q_t = o.q_t, .scale_t = o.s_t, .x = source(v, r, c)});
    return o;
  }

  // C [m, n] against Σ_k lhs(i, k)·rhs(j, k) (exact values) with per-term error bounds from the
  // operands' quantisation steps: lhs_step(i, k), rhs_step(j, k) return (δ-relative, ε-absolute) pairs.
  template <class L, class R, class LE, class RE>
  void expect_near_exact(const Owned& c, int64_t m, int64_t n, int64_t k, L lhs, R rhs, LE lhs_eps, RE rhs_eps,
                         const char* what, double start = 0.0) {
    const double delta = 0.0625 + std::ldexp(1.0, -20);
    int64_t bad = 0;
    double worst = 0.0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double exact = 0.0, tol = 0.0;
        for (int64_t kk = 0; kk < k; ++kk) {
          const double l = lhs(i, kk), r = rhs(j, kk), el = lhs_eps(i, kk), er = rhs_eps(j, kk);
          exact += l * r;
          tol += std::fabs(l * r) * (2 * delta + delta * delta) + std::fabs(l) * er + std::fabs(r) * el + el * er;
        }
        // The f32 output (of start + the sum, for an accumulating GEMM) and the op's f64 sum.
        tol += std::ldexp(std::fabs(exact) + std::fabs(start), -22) + 1e-300;
        const double err = std::fabs(c.at<float>(i * n + j) - start - exact);
        worst = std::max(worst, err / tol);
        if (!(err <= tol)) ++bad;
      }
    EXPECT_EQ(bad, 0) << what << ": worst error/bound " << worst;
  }
};

TEST_F(Fp8Recipe, FpropDgradWgrad) {
  const Act xq = quantise_act(x, kT, kD), dyq = quantise_act(dy, kT, kO);
  Owned wq({kO, kD}, DType::kF8E4M3), ws({fp8_tiles(kO), fp8_block_scale_cols(kD)}, DType::kF32),
      wq_t({kD, kO}, DType::kF8E4M3), ws_t({fp8_tiles(kD), fp8_block_scale_cols(kO)}, DType::kF32);
  be.weight_quant(ctx, {.q = wq, .scale = ws, .q_t = wq_t, .scale_t = ws_t, .w = source(w, kO, kD)});
  const auto eps = [](float s) { return std::ldexp(static_cast<double>(s), -10); };
  const auto X = [&](int64_t t, int64_t d) { return static_cast<double>(x[static_cast<size_t>(t * kD + d)]); };
  const auto W = [&](int64_t o, int64_t d) { return static_cast<double>(w[static_cast<size_t>(o * kD + d)]); };
  const auto DY = [&](int64_t t, int64_t o) { return static_cast<double>(dy[static_cast<size_t>(t * kO + o)]); };
  const auto x_eps = [&](int64_t t, int64_t d) { return eps(xq.s.at<float>((d / 128) * kT + t)); };
  const auto xt_eps = [&](int64_t t, int64_t d) { return eps(xq.s_t.at<float>((t / 128) * kD + d)); };
  const auto dy_eps = [&](int64_t t, int64_t o) { return eps(dyq.s.at<float>((o / 128) * kT + t)); };
  const auto dyt_eps = [&](int64_t t, int64_t o) { return eps(dyq.s_t.at<float>((t / 128) * kO + o)); };
  const auto w_eps = [&](int64_t o, int64_t d) {
    return eps(ws.at<float>((o / 128) * fp8_block_scale_cols(kD) + d / 128));
  };

  Owned y({kT, kO}, DType::kF32), dx({kT, kD}, DType::kF32), dw({kO, kD}, DType::kF32);
  be.fp8_gemm(ctx, {.c = y, .a = xq.q, .a_scale = xq.s, .b = wq, .b_scale = ws});  // Fprop
  expect_near_exact(y, kT, kO, kD, X, W, x_eps, w_eps, "Fprop y = x Wᵀ");
  be.fp8_gemm(ctx, {.c = dx, .a = dyq.q, .a_scale = dyq.s, .b = wq_t, .b_scale = ws_t});  // Dgrad
  expect_near_exact(
      dx, kT, kD, kO, DY, [&](int64_t d, int64_t o) { return W(o, d); }, dy_eps,
      [&](int64_t d, int64_t o) { return w_eps(o, d); }, "Dgrad dx = dy W");
  // Wgrad accumulates: dW = 1·dW + dyᵀx from a known start.
  for (int64_t i = 0; i < kO * kD; ++i) dw.at<float>(i) = 0.25f;
  be.fp8_gemm(ctx, {.c = dw,
                    .a = dyq.q_t,
                    .a_scale = dyq.s_t,
                    .b = xq.q_t,
                    .b_scale = xq.s_t,
                    .b_scaling = Fp8Scaling::kTile1x128,
                    .beta = 1.0});
  expect_near_exact(
      dw, kO, kD, kT, [&](int64_t o, int64_t t) { return DY(t, o); }, [&](int64_t d, int64_t t) { return X(t, d); },
      [&](int64_t o, int64_t t) { return dyt_eps(t, o); }, [&](int64_t d, int64_t t) { return xt_eps(t, d); },
      "Wgrad dW += dyᵀ x", 0.25);
}

TEST_F(Fp8Gemm, ErrorsNameTheField) {
  const int64_t m = 16, n = 24, k = 32;
  const Owned a = random_codes({m, k}, 1), b = random_codes({n, k}, 2), a32({m, k}, DType::kF32);
  const Owned sa = random_scales({1, m}, 3), sb_block = random_scales({1, 4}, 4), sb_tile = random_scales({1, n}, 5);
  const Owned c({m, n}, DType::kF32), c16({m, n}, DType::kBF16), ci({m, n}, DType::kI32),
      bad_b({n, k + 1}, DType::kF8E4M3);
  expect_error([&] { be.fp8_gemm(ctx, {.c = c, .a = a32, .a_scale = sa, .b = b, .b_scale = sb_block}); },
               {"[fp8_gemm]", "a: expected dtype f8e4m3"});
  expect_error([&] { be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = bad_b, .b_scale = sb_block}); },
               {"[fp8_gemm]", "shapes do not match"});
  expect_error([&] { be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sb_tile, .b = b, .b_scale = sb_block}); },
               {"[fp8_gemm]", "a_scale: expected shape [1, 16], got [1, 24]"});
  expect_error([&] { be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb_tile}); },
               {"[fp8_gemm]", "b_scale (128×128 blocks): expected shape [1, 4]"});
  expect_error(
      [&] {
        be.fp8_gemm(ctx,
                    {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb_block, .b_scaling = Fp8Scaling::kTile1x128});
      },
      {"[fp8_gemm]", "b_scale (1×128 tiles): expected shape [1, 24]"});
  expect_error([&] { be.fp8_gemm(ctx, {.c = c16, .a = a, .a_scale = sa, .b = b, .b_scale = sb_block, .beta = 1.0}); },
               {"[fp8_gemm]", "c is bf16: needs beta = 0"});
  expect_error([&] { be.fp8_gemm(ctx, {.c = ci, .a = a, .a_scale = sa, .b = b, .b_scale = sb_block}); },
               {"[fp8_gemm]", "c must be f32 or bf16"});
  expect_error(
      [&] {
        be.fp8_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb_block, .beta = 1.0, .addend = c16});
      },
      {"[fp8_gemm]", "addend: expected dtype f32"});
}

// fp8_grouped_gemm: each group's rows against the naive f64 sum with that group's B (and B2), in f64 so
// the bound is the sums' order alone (f32 and bf16 C: plus their rounding); empty groups, rows past
// offsets[G] untouched, a second term with its own K2, and bad offsets named.
TEST_F(Fp8Gemm, GroupedMatchesEachGroupsNaiveSum) {
  const int64_t n = 136, k = 320, k2 = 96;
  const std::vector<int32_t> off = {0, 40, 40, 41, 170};
  const int64_t G = static_cast<int64_t>(off.size()) - 1, R = 173;
  Owned offsets({G + 1}, DType::kI32);
  for (int64_t g = 0; g <= G; ++g) offsets.at<int32_t>(g) = off[static_cast<size_t>(g)];
  const Owned a = random_codes({R, k}, 11), b = random_codes({G, n, k}, 12), a2 = random_codes({R, k2}, 13),
              b2 = random_codes({G, n, k2}, 14);
  const Owned sa = random_scales({fp8_tiles(k), R}, 15), sb = random_scales({G, fp8_tiles(n), 4}, 16),
              sa2 = random_scales({1, R}, 17), sb2 = random_scales({G, fp8_tiles(n), 4}, 18);
  // Σ over one term of â[r]·b̂[g] for row r of group g: the sum and Σ|·|.
  const auto term = [&](const Owned& ta, const Owned& tsa, const Owned& tb, const Owned& tsb, int64_t kk_n, int64_t g,
                        int64_t r, int64_t j, double& sum, double& mag) {
    const int64_t ld = fp8_block_scale_cols(kk_n);
    for (int64_t kk = 0; kk < kk_n; ++kk) {
      const double p = code_value(ta, r * kk_n + kk) * tsa.at<float>((kk / 128) * R + r) *
                       code_value(tb, (g * n + j) * kk_n + kk) *
                       tsb.at<float>((g * fp8_tiles(n) + j / 128) * ld + kk / 128);
      sum += p;
      mag += std::fabs(p);
    }
  };
  for (const bool two : {false, true})
    for (const DType dt : {DType::kF64, DType::kF32, DType::kBF16}) {
      Owned c({R, n}, dt);
      for (int64_t i = 0; i < R * n; ++i) {  // sentinels: the rows past offsets[G] keep them
        if (dt == DType::kF64) c.at<double>(i) = 7.0;
        else if (dt == DType::kF32) c.at<float>(i) = 7.0f;
        else static_cast<uint16_t*>(c.t().data)[i] = f32_to_bf16(7.0f);
      }
      Fp8GroupedGemmArgs args{.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .offsets = offsets};
      if (two) {
        args.a2 = a2;
        args.a2_scale = sa2;
        args.b2 = b2;
        args.b2_scale = sb2;
      }
      be.fp8_grouped_gemm(ctx, args);
      int64_t bad = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = off[static_cast<size_t>(g)]; r < off[static_cast<size_t>(g) + 1]; ++r)
          for (int64_t j = 0; j < n; ++j) {
            double sum = 0.0, mag = 0.0;
            term(a, sa, b, sb, k, g, r, j, sum, mag);
            if (two) term(a2, sa2, b2, sb2, k2, g, r, j, sum, mag);
            const double tol =
                2.0 * static_cast<double>(k + k2) * std::ldexp(mag, -53) + rounding_of(dt) * std::fabs(sum);
            if (!(std::fabs(value(c, r * n + j) - sum) <= tol) && bad++ < 5)
              ADD_FAILURE() << "group " << g << " (" << r << "," << j << "): " << value(c, r * n + j) << " vs " << sum;
          }
      EXPECT_EQ(bad, 0) << dtype_name(dt) << (two ? " two terms" : " one term");
      for (int64_t i = off.back() * n; i < R * n; ++i) ASSERT_EQ(value(c, i), 7.0) << "row past offsets[G]";
    }
  // Bad offsets and shapes get the op's and the field's name.
  Owned c({R, n}, DType::kF32);
  offsets.at<int32_t>(2) = 30;
  expect_error(
      [&] { be.fp8_grouped_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .offsets = offsets}); },
      {"[fp8_grouped_gemm]", "non-decreasing"});
  offsets.at<int32_t>(2) = 40;
  expect_error(
      [&] { be.fp8_grouped_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sa, .offsets = offsets}); },
      {"[fp8_grouped_gemm]", "b_scale: expected shape [4, 2, 4]"});
  expect_error(
      [&] {
        be.fp8_grouped_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .offsets = offsets, .a2 = a2});
      },
      {"[fp8_grouped_gemm]", "the second term needs a2, a2_scale, b2 and b2_scale together"});
  expect_error(
      [&] { be.fp8_grouped_gemm(ctx, {.c = c, .a = a, .a_scale = sa, .b = a, .b_scale = sb, .offsets = offsets}); },
      {"[fp8_grouped_gemm]", "b must be a 3-D stack"});
}

// fp8_grouped_gemm_wgrad on act_quant's grouped transposed copies: each C[g] against the naive f64 sum over its
// group's rows (each row's values with its own tile's scales), beta·C[g] kept for an empty group, and Σ C².
TEST_F(Fp8Gemm, GroupedWgradMatchesEachGroupsNaiveSum) {
  const int64_t m = 136, n = 72;
  const std::vector<int32_t> off = {0, 130, 130, 131, 290};
  const int64_t G = static_cast<int64_t>(off.size()) - 1, R = 300, slots = fp8_group_tiles(R, G);
  Owned offsets({G + 1}, DType::kI32);
  for (int64_t g = 0; g <= G; ++g) offsets.at<int32_t>(g) = off[static_cast<size_t>(g)];
  const Owned a = random_codes({m, kFp8Tile * slots}, 21), b = random_codes({n, kFp8Tile * slots}, 22);
  const Owned sa = random_scales({slots, m}, 23), sb = random_scales({slots, n}, 24);
  for (const double beta : {0.0, 1.0})
    for (const DType dt : {DType::kF64, DType::kF32}) {
      Owned c({G, m, n}, dt), c0({G, m, n}, DType::kF64), sum_sq({1}, dt);
      test::fill_normal(c0, 25, 2.0);
      for (int64_t i = 0; i < c.numel(); ++i) {
        if (dt == DType::kF64) c.at<double>(i) = c0.at<double>(i);
        else c.at<float>(i) = static_cast<float>(c0.at<double>(i));
      }
      if (dt == DType::kF64) sum_sq.at<double>(0) = 0.5;
      else sum_sq.at<float>(0) = 0.5f;
      be.fp8_grouped_gemm_wgrad(
          ctx,
          {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .offsets = offsets, .beta = beta, .sum_sq = sum_sq});
      int64_t bad = 0, slot = 0;
      double sq = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t kk_n = fp8_tiles(off[static_cast<size_t>(g) + 1] - off[static_cast<size_t>(g)]) * kFp8Tile;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double sum = 0.0, mag = 0.0;
            for (int64_t kk = 0; kk < kk_n; ++kk) {
              const int64_t col = slot * kFp8Tile + kk, t = slot + kk / kFp8Tile;
              const double p = code_value(a, i * kFp8Tile * slots + col) * sa.at<float>(t * m + i) *
                               code_value(b, j * kFp8Tile * slots + col) * sb.at<float>(t * n + j);
              sum += p;
              mag += std::fabs(p);
            }
            const int64_t at = (g * m + i) * n + j;
            const double old = beta * (dt == DType::kF64 ? c0.at<double>(at) : static_cast<float>(c0.at<double>(at)));
            const double want = sum + old;
            const double tol = 2.0 * static_cast<double>(kk_n + 1) * std::ldexp(mag + std::fabs(old), -53) +
                               rounding_of(dt) * std::fabs(want);
            if (!(std::fabs(value(c, at) - want) <= tol) && bad++ < 5)
              ADD_FAILURE() << "group " << g << " (" << i << "," << j << "): " << value(c, at) << " vs " << want;
            sq += value(c, at) * value(c, at);
          }
        slot += kk_n / kFp8Tile;
      }
      EXPECT_EQ(bad, 0) << dtype_name(dt) << " beta " << beta;
      EXPECT_NEAR(value(sum_sq, 0), 0.5 + sq, 1e-6 * sq) << "Σ C² added to sum_sq";
    }
  Owned c({G, m, n}, DType::kF32);
  expect_error(
      [&] {
        be.fp8_grouped_gemm_wgrad(ctx, {.c = c, .a = a, .a_scale = sa, .b = a, .b_scale = sb, .offsets = offsets});
      },
      {"[fp8_grouped_gemm_wgrad]", "shapes do not match"});
  offsets.at<int32_t>(4) = 1000;  // more rows than the copies' slots hold
  expect_error(
      [&] {
        be.fp8_grouped_gemm_wgrad(ctx, {.c = c, .a = a, .a_scale = sa, .b = b, .b_scale = sb, .offsets = offsets});
      },
      {"[fp8_grouped_gemm_wgrad]", "tile slots"});
}

}  // namespace
}  // namespace diffmoe
