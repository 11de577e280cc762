// CPU SwiGLU (docs/model.md §4), cross-entropy and AdamW: forwards against naive double formulas, backwards
// against central finite differences in f64, AdamW against a scalar long-double reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::expect_error;
using test::expect_grad;
using test::Owned;

class SwigluLossOptim : public test::CpuOpsTest {};

// ---------------------------------------------------------------- SwiGLU
TEST_F(SwigluLossOptim, SwigluForwardF32AgainstFormula) {
  Owned a({7, 13}, DType::kF32), b({7, 13}, DType::kF32), h({7, 13}, DType::kF32);
  test::fill_normal(a, 401, 3.0);
  test::fill_normal(b, 402);
  a.at<float>(0) = -120.0f;  // e^120 overflows f32 but σ must still come out as 0, not NaN
  be.swiglu_fwd(ctx, {.h = h, .a = a, .b = b});
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double ai = a.at<float>(i);
    const double want = ai / (1.0 + std::exp(-ai)) * b.at<float>(i);
    EXPECT_NEAR(h.at<float>(i), want, 1e-6 * (1.0 + std::fabs(want))) << i;
  }
}

TEST_F(SwigluLossOptim, SwigluErrors) {
  Owned a({3, 5}, DType::kF32), b({5, 3}, DType::kF32), h({3, 5}, DType::kF32);
  expect_error([&] { be.swiglu_fwd(ctx, {.h = h, .a = a, .b = b}); }, {"[swiglu_fwd]", "b"});
  expect_error([&] { be.swiglu_bwd(ctx, {.da = h, .db = b, .dh = h, .a = a, .b = h}); }, {"[swiglu_bwd]", "db"});
}

// ---------------------------------------------------------------- cross-entropy
constexpr int64_t kCeRows = 7, kVocab = 13;

// Targets in [0, V) with rows 2 and 5 ignored.
Owned make_targets() {
  Owned t({kCeRows}, DType::kI32);
  test::fill_int(t, 501, 0, kVocab);
  t.at<int32_t>(2) = -1;
  t.at<int32_t>(5) = -1;
  return t;
}

TEST_F(SwigluLossOptim, CrossEntropyForwardF32AgainstNaive) {
  Owned logits({kCeRows, kVocab}, DType::kF32), loss_sum({1}, DType::kF32), valid({1}, DType::kF32);
  test::fill_normal(logits, 502, 4.0, 30.0);  // large offset: a naive exp-sum in f32 would lose digits
  const Owned targets = make_targets();
  loss_sum.at<float>(0) = 1.5f;  // both accumulate
  valid.at<float>(0) = 2.0f;
  be.cross_entropy_fwd(ctx, {.loss_sum = loss_sum, .valid = valid, .logits = logits, .targets = targets});
  double want = 1.5;
  for (int64_t n = 0; n < kCeRows; ++n) {
    const int32_t t = targets.at<int32_t>(n);
    if (t < 0) continue;
    long double mx = -1e300L, sum = 0.0L;
    for (int64_t j = 0; j < kVocab; ++j) mx = std::max<long double>(mx, logits.at<float>(n * kVocab + j));
    for (int64_t j = 0; j < kVocab; ++j) sum += std::exp(logits.at<float>(n * kVocab + j) - mx);
    want += static_cast<double>(mx + std::log(sum) - logits.at<float>(n * kVocab + t));
  }
  EXPECT_NEAR(loss_sum.at<float>(0), want, 1e-6 * want);
  EXPECT_EQ(valid.at<float>(0), 2.0f + 5.0f);
}

// dlogits against differences of grad_scale · loss_sum / valid, the mean loss it differentiates.
TEST_F(SwigluLossOptim, CrossEntropyBackwardFiniteDifferences) {
  constexpr double kGradScale = 0.8;
  const DType f64 = DType::kF64;
  Owned logits({kCeRows, kVocab}, f64), loss_sum({1}, f64), valid({1}, f64), dlogits({kCeRows, kVocab}, f64),
      valid_i32({1}, DType::kI32);
  test::fill_normal(logits, 511, 2.0);
  const Owned targets = make_targets();
  const auto loss = [&] {
    be.fill(ctx, {.out = loss_sum, .value = 0.0});
    be.fill(ctx, {.out = valid, .value = 0.0});
    be.cross_entropy_fwd(ctx, {.loss_sum = loss_sum, .valid = valid, .logits = logits, .targets = targets});
    return kGradScale * loss_sum.at<double>(0) / valid.at<double>(0);
  };
  const std::vector<double> numeric = test::numerical_grad(logits, loss);
  loss();
  test::fill_normal(dlogits, 512);  // overwritten, ignored rows included
  be.cross_entropy_bwd(
      ctx, {.dlogits = dlogits, .logits = logits, .targets = targets, .valid = valid, .grad_scale = kGradScale});
  expect_grad("cross_entropy dlogits", test::to_vector(dlogits), numeric);
  for (int64_t j = 0; j < kVocab; ++j) {
    EXPECT_EQ(dlogits.at<double>(2 * kVocab + j), 0.0);
    EXPECT_EQ(dlogits.at<double>(5 * kVocab + j), 0.0);
  }
  // An i32 valid count gives the same gradient.
  const std::vector<double> with_f64 = test::to_vector(dlogits);
  valid_i32.at<int32_t>(0) = 5;
  be.cross_entropy_bwd(
      ctx, {.dlogits = dlogits, .logits = logits, .targets = targets, .valid = valid_i32, .grad_scale = kGradScale});
  EXPECT_EQ(test::to_vector(dlogits), with_f64);
}

TEST_F(SwigluLossOptim, CrossEntropyErrors) {
  Owned logits({4, 5}, DType::kF32), loss_sum({1}, DType::kF32), valid({1}, DType::kF32), targets({4}, DType::kI32),
      dlogits({4, 6}, DType::kF32);
  test::fill_int(targets, 521, 0, 5);
  targets.at<int32_t>(2) = 5;
  expect_error(
      [&] { be.cross_entropy_fwd(ctx, {.loss_sum = loss_sum, .valid = valid, .logits = logits, .targets = targets}); },
      {"[cross_entropy_fwd]", "targets[2] = 5"});
  targets.at<int32_t>(2) = -3;
  expect_error(
      [&] { be.cross_entropy_bwd(ctx, {.dlogits = logits, .logits = logits, .targets = targets, .valid = valid}); },
      {"[cross_entropy_bwd]", "targets[2] = -3"});
  targets.at<int32_t>(2) = 1;
  expect_error(
      [&] { be.cross_entropy_bwd(ctx, {.dlogits = dlogits, .logits = logits, .targets = targets, .valid = valid}); },
      {"[cross_entropy_bwd]", "dlogits"});
}

// ---------------------------------------------------------------- AdamW
struct AdamWCase {
  double lr, beta1, beta2, eps, weight_decay, max_norm;
};

// The AdamW update of op_args.h written out per element in long double; grad_sq is Σg² of each step.
void adamw_reference(std::vector<long double>& p, std::vector<long double>& m, std::vector<long double>& v,
                     const std::vector<double>& g, const AdamWCase& c, int64_t step) {
  long double gsq = 0.0L;
  for (double gi : g) gsq += static_cast<long double>(gi) * gi;
  const long double clip = c.max_norm > 0 ? std::min(1.0L, c.max_norm / (std::sqrt(gsq) + 1e-6L)) : 1.0L;
  const long double bc1 = 1.0L - std::pow(static_cast<long double>(c.beta1), step);
  const long double bc2 = 1.0L - std::pow(static_cast<long double>(c.beta2), step);
  for (size_t i = 0; i < p.size(); ++i) {
    const long double gi = g[i] * clip;
    m[i] = c.beta1 * m[i] + (1.0L - c.beta1) * gi;
    v[i] = c.beta2 * v[i] + (1.0L - c.beta2) * gi * gi;
    p[i] -= c.lr * ((m[i] / bc1) / (std::sqrt(v[i] / bc2) + c.eps) + c.weight_decay * p[i]);
  }
}

void run_adamw_two_steps(Backend& be, DType dt, const AdamWCase& c, double tol, const char* what) {
  Owned p({3, 5}, dt), m({3, 5}, dt), v({3, 5}, dt), g({3, 5}, dt), gsq({1}, dt);
  test::fill_normal(p, 601);
  std::vector<long double> rp(15), rm(15, 0.0L), rv(15, 0.0L);
  for (size_t i = 0; i < 15; ++i) rp[i] = test::get(p, static_cast<int64_t>(i));
  for (int64_t step = 1; step <= 2; ++step) {
    test::fill_normal(g, 610 + static_cast<uint64_t>(step), 0.5);
    const std::vector<double> gv = test::to_vector(g);
    be.fill({}, {.out = gsq, .value = 0.0});
    be.sum_squares({}, {.out = gsq, .x = g});
    be.adamw({}, {.param = p,
                  .m = m,
                  .v = v,
                  .grad = g,
                  .grad_sq = gsq,
                  .lr = c.lr,
                  .beta1 = c.beta1,
                  .beta2 = c.beta2,
                  .eps = c.eps,
                  .weight_decay = c.weight_decay,
                  .max_norm = c.max_norm,
                  .step = step});
    adamw_reference(rp, rm, rv, gv, c, step);
  }
  std::vector<double> want_p(15), want_m(15), want_v(15);
  for (size_t i = 0; i < 15; ++i) {
    want_p[i] = static_cast<double>(rp[i]);
    want_m[i] = static_cast<double>(rm[i]);
    want_v[i] = static_cast<double>(rv[i]);
  }
  EXPECT_LE(test::rel_error(test::to_vector(p), want_p), tol) << what;
  EXPECT_LE(test::rel_error(test::to_vector(m), want_m), tol) << what;
  EXPECT_LE(test::rel_error(test::to_vector(v), want_v), tol) << what;
}

TEST_F(SwigluLossOptim, AdamWTwoStepsAgainstLongDouble) {
  // ‖g‖ ≈ 0.5·√15 ≈ 1.9: max_norm 0.3 clips (factor ≈ 0.15), max_norm 100 is enabled but inactive.
  const AdamWCase no_clip{.lr = 0.01, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1, .max_norm = 0.0};
  const AdamWCase clipped{.lr = 0.02, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05, .max_norm = 0.3};
  const AdamWCase loose{.lr = 0.02, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05, .max_norm = 100};
  // f64 differs from long double by double rounding only; f32 stores p, m, v in f32 each step.
  for (const auto& [c, name] : {std::pair{no_clip, "no clip"}, std::pair{clipped, "clip"}, std::pair{loose, "loose"}}) {
    run_adamw_two_steps(be, DType::kF64, c, 1e-14, name);
    run_adamw_two_steps(be, DType::kF32, c, 1e-6, name);
  }
}

// With beta1 = 0 the new m is exactly the clipped gradient, exposing the clip factor bit for bit.
TEST_F(SwigluLossOptim, AdamWClipFactorExact) {
  Owned p({13}, DType::kF64), m({13}, DType::kF64), v({13}, DType::kF64), g({13}, DType::kF64), gsq({1}, DType::kF64);
  test::fill_normal(p, 701);
  test::fill_normal(m, 702);  // must be wiped by beta1 = 0
  test::fill_normal(g, 703);
  be.sum_squares(ctx, {.out = gsq, .x = g});
  constexpr double kMaxNorm = 0.7;
  const double clip = std::min(1.0, kMaxNorm / (std::sqrt(gsq.at<double>(0)) + 1e-6));
  ASSERT_LT(clip, 0.5);
  be.adamw(ctx, {.param = p, .m = m, .v = v, .grad = g, .grad_sq = gsq, .beta1 = 0.0, .max_norm = kMaxNorm});
  for (int64_t i = 0; i < 13; ++i) EXPECT_EQ(m.at<double>(i), g.at<double>(i) * clip) << i;
}

// The optional bf16 copy (the bf16 GEMM mode's weight copy) is bf16 of the stored updated param,
// exactly, in f32 and f64; the param itself is unchanged by asking for it.
TEST_F(SwigluLossOptim, AdamWWritesTheBf16Copy) {
  for (DType dt : {DType::kF32, DType::kF64}) {
    Owned p({7, 9}, dt), p2({7, 9}, dt), m({7, 9}, dt), m2({7, 9}, dt), v({7, 9}, dt), v2({7, 9}, dt), g({7, 9}, dt);
    Owned gsq({1}, dt), copy({7, 9}, DType::kBF16);
    for (Owned* t : {&p, &p2}) test::fill_normal(*t, 801);
    test::fill_normal(g, 802);
    be.sum_squares(ctx, {.out = gsq, .x = g});
    be.adamw(ctx, {.param = p,
                   .m = m,
                   .v = v,
                   .grad = g,
                   .grad_sq = gsq,
                   .lr = 0.05,
                   .max_norm = 1.0,
                   .step = 1,
                   .param_bf16 = copy});
    be.adamw(ctx, {.param = p2, .m = m2, .v = v2, .grad = g, .grad_sq = gsq, .lr = 0.05, .max_norm = 1.0, .step = 1});
    const std::vector<double> got = test::to_vector(p), plain = test::to_vector(p2);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i], plain[i]) << dtype_name(dt) << " element " << i;
      const uint16_t want = f32_to_bf16(static_cast<float>(got[i]));
      ASSERT_EQ(static_cast<const uint16_t*>(copy.t().data)[i], want) << dtype_name(dt) << " element " << i;
    }
  }
}

TEST_F(SwigluLossOptim, AdamWErrors) {
  Owned p({3, 5}, DType::kF32), m({5, 3}, DType::kF32), v({3, 5}, DType::kF32), g({3, 5}, DType::kF32),
      gsq({1}, DType::kF32);
  expect_error([&] { be.adamw(ctx, {.param = p, .m = m, .v = v, .grad = g, .grad_sq = gsq}); }, {"[adamw]", "m"});
  expect_error([&] { be.adamw(ctx, {.param = p, .m = v, .v = v, .grad = g, .grad_sq = gsq, .step = 0}); },
               {"[adamw]", "step"});
  Owned copy32({3, 5}, DType::kF32), copy_shape({5, 3}, DType::kBF16);
  expect_error([&] { be.adamw(ctx, {.param = p, .m = v, .v = v, .grad = g, .grad_sq = gsq, .param_bf16 = copy32}); },
               {"[adamw]", "param_bf16"});
  expect_error(
      [&] { be.adamw(ctx, {.param = p, .m = v, .v = v, .grad = g, .grad_sq = gsq, .param_bf16 = copy_shape}); },
      {"[adamw]", "param_bf16"});
}

}  // namespace
}  // namespace diffmoe
