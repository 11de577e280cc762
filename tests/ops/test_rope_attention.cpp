// CPU tests of RoPE/YaRN tables, the RoPE op, the MLA key/value split, the differential λ and the
// causal attention core (docs/model.md §2-3; docs/derivations.md §1.3-1.4, §2.3-2.5, §3.2, §5). Forward values are
// checked against independent straightforward code here; backwards by central finite differences
// in f64 (docs/style.md numerics policy). Sizes are odd on purpose (T = 5 or 7, d_v = 5, 3 plain heads).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "backend/op_validation.h"
#include "model/rope_tables.h"
#include "ops_test_util.h"
#include "test_util.h"

namespace diffmoe {
namespace {

using test::copy_values;
using test::cpu;
using test::expect_error;
using test::Owned;

// t labelled as a CUDA tensor, for the shared validation (op_validation.h), which reads no data:
// the CUDA backend's dtype rules (bf16 tensors of the bf16 GEMM mode) checked without a GPU.
Tensor as_cuda(Tensor t) {
  t.device = Device::kCUDA;
  return t;
}

double norm(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// Checks a finite-difference gradient (test::expect_grad); it must not be trivially 0 either.
void check_grad(const std::string& what, const std::vector<double>& analytic, const std::vector<double>& numeric) {
  test::expect_grad(what, analytic, numeric);
  EXPECT_GT(norm(analytic), 1e-3) << what << ": gradient is (nearly) zero, the check would be vacuous";
}

// ================================================================ YaRN tables (docs/derivations.md §5.3)
RopeParams v3_params(double mscale = 1.0) {
  return RopeParams{.rope_dim = 64,
                    .theta = 1e4,
                    .max_seq_len = 16384,
                    .original_seq_len = 4096,
                    .factor = 40.0,
                    .beta_fast = 32.0,
                    .beta_slow = 1.0,
                    .mscale = mscale};
}

TEST(Yarn, FrequencyRatiosMatchSourcesNumbers) {
  const RopeParams p = v3_params();
  const std::vector<double> f = rope_frequencies(p);
  ASSERT_EQ(f.size(), 32u);
  auto ratio = [&](int i) { return f[static_cast<size_t>(i)] / std::pow(1e4, -2.0 * i / 64.0); };
  for (int i = 0; i <= 10; ++i) EXPECT_NEAR(ratio(i), 1.0, 1e-12) << i;  // extrapolated
  EXPECT_NEAR(ratio(11), 0.925, 1e-12);
  EXPECT_NEAR(ratio(12), 0.85, 1e-12);
  EXPECT_NEAR(ratio(16), 0.55, 1e-12);
  EXPECT_NEAR(ratio(20), 0.25, 1e-12);
  EXPECT_NEAR(ratio(22), 0.10, 1e-12);
  for (int i = 23; i < 32; ++i) EXPECT_NEAR(ratio(i), 1.0 / 40.0, 1e-12) << i;  // interpolated
  // Everywhere on the ramp low = 10, high = 23: θ'/θ = smooth + (1 − smooth)/40.
  for (int i = 10; i <= 23; ++i) {
    const double ramp = (i - 10) / 13.0;
    EXPECT_NEAR(ratio(i), (1.0 - ramp) + ramp / 40.0, 1e-12) << i;
  }
}

TEST(Yarn, SoftmaxScaleFactor) {
  // Sources §5.3 quote 6 decimals, hence the 5e-7 tolerance.
  const double m2 = yarn_softmax_scale_factor(v3_params());
  EXPECT_NEAR(m2, 1.873854, 5e-7);
  EXPECT_NEAR(std::sqrt(m2), 1.368888, 5e-7);
  EXPECT_NEAR(yarn_softmax_scale_factor(v3_params(0.707)), 1.589626, 5e-7);
}

TEST(Yarn, OffWhenMaxSeqLenEqualsOriginal) {
  RopeParams p = v3_params();
  p.max_seq_len = p.original_seq_len;
  const std::vector<double> f = rope_frequencies(p);
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(f[static_cast<size_t>(i)] / std::pow(1e4, -2.0 * i / 64.0), 1.0, 1e-14) << i;
  EXPECT_EQ(yarn_softmax_scale_factor(p), 1.0);
}

TEST(Yarn, EqualCorrectionBoundsGetTheSmallShift) {
  // fcd(11) = 8·ln(64/(2π·11))/(2 ln 1e4) ≈ −0.033: low = max(−1, 0) = 0, high = ceil(−0.033) = 0, so
  // high += 0.001 (DeepSeek linear_ramp_factor); without it the ramp is 0/0 at i = 0.
  const RopeParams p{.rope_dim = 8,
                     .theta = 1e4,
                     .max_seq_len = 128,
                     .original_seq_len = 64,
                     .factor = 4.0,
                     .beta_fast = 11.0,
                     .beta_slow = 11.0};
  const std::vector<double> f = rope_frequencies(p);
  EXPECT_NEAR(f[0], 1.0, 1e-15);
  for (int i = 1; i < 4; ++i) EXPECT_NEAR(f[static_cast<size_t>(i)] / std::pow(1e4, -2.0 * i / 8.0), 0.25, 1e-14) << i;
}

TEST(Yarn, TablesAreCosSinOfPositionTimesFrequency) {
  const RopeParams p = v3_params();
  std::vector<double> c, s;
  rope_tables(p, 9, c, s);
  ASSERT_EQ(c.size(), 9u * 32u);
  const std::vector<double> f = rope_frequencies(p);
  for (int pos = 0; pos < 9; ++pos)
    for (int i = 0; i < 32; ++i) {
      EXPECT_NEAR(c[static_cast<size_t>(pos * 32 + i)], std::cos(pos * f[static_cast<size_t>(i)]), 1e-15);
      EXPECT_NEAR(s[static_cast<size_t>(pos * 32 + i)], std::sin(pos * f[static_cast<size_t>(i)]), 1e-15);
    }
}

// ================================================================ RoPE op
// x: [N = 2 sequences × 5, W = 31]; 3 heads of stride 9, rope pairs at columns h·9 + 2 … h·9 + 5.
struct RopeCase {
  static constexpr int64_t kRows = 10, kWidth = 31, kHeads = 3, kStride = 9, kOffset = 2, kRopeDim = 4;
  static constexpr int64_t kSeqLen = 5, kPosOffset = 3, kMaxPos = 8;
  std::vector<double> cos_d, sin_d;
  Owned cos, sin;
  explicit RopeCase(DType dt) {
    // YaRN on with a small theta so that the angles are large and both halves differ.
    const RopeParams p{.rope_dim = kRopeDim, .theta = 50.0, .max_seq_len = 32, .original_seq_len = 8, .factor = 3.0};
    rope_tables(p, kMaxPos, cos_d, sin_d);
    cos = Owned({kMaxPos, kRopeDim / 2}, dt);
    sin = Owned({kMaxPos, kRopeDim / 2}, dt);
    for (int64_t i = 0; i < cos.numel(); ++i) {
      test::set(cos, i, cos_d[static_cast<size_t>(i)]);
      test::set(sin, i, sin_d[static_cast<size_t>(i)]);
    }
  }
  RopeArgs args(const Tensor& x, bool inverse = false) const {
    return RopeArgs{.x = x,
                    .cos = cos,
                    .sin = sin,
                    .n_heads = kHeads,
                    .head_stride = kStride,
                    .col_offset = kOffset,
                    .rope_dim = kRopeDim,
                    .seq_len = kSeqLen,
                    .pos_offset = kPosOffset,
                    .inverse = inverse};
  }
  // Column col of the row is a rope column: pair index i (col = h·stride + offset + 2i + r), else −1.
  static int64_t pair_of(int64_t col) {
    for (int64_t h = 0; h < kHeads; ++h) {
      const int64_t rel = col - h * kStride - kOffset;
      if (rel >= 0 && rel < kRopeDim) return rel / 2;
    }
    return -1;
  }
};

TEST(Rope, RotatesAddressedPairsOnly) {
  for (DType dt : {DType::kF64, DType::kF32}) {
    const RopeCase rc(dt);
    Owned x({RopeCase::kRows, RopeCase::kWidth}, dt), x0({RopeCase::kRows, RopeCase::kWidth}, dt);
    test::fill_normal(x, 11);
    copy_values(x0, x);
    cpu().rope({}, rc.args(x));
    const double tol = dt == DType::kF64 ? 1e-14 : 1e-6;  // a 2×2 rotation: a few ulps
    for (int64_t n = 0; n < RopeCase::kRows; ++n) {
      const int64_t pos = RopeCase::kPosOffset + n % RopeCase::kSeqLen;  // pos_offset + n % seq_len
      for (int64_t col = 0; col < RopeCase::kWidth; ++col) {
        const int64_t e = n * RopeCase::kWidth + col;
        const int64_t i = RopeCase::pair_of(col);
        if (i < 0) {
          EXPECT_EQ(test::get(x, e), test::get(x0, e)) << "untouched column " << col;
          continue;
        }
        const double c = rc.cos_d[static_cast<size_t>(pos * 2 + i)], s = rc.sin_d[static_cast<size_t>(pos * 2 + i)];
        const bool first = (col - RopeCase::kOffset) % RopeCase::kStride % 2 == 0;
        const int64_t e0 = first ? e : e - 1;
        const double a = test::get(x0, e0), b = test::get(x0, e0 + 1);
        const double want = first ? a * c - b * s : a * s + b * c;
        EXPECT_NEAR(test::get(x, e), want, tol) << "row " << n << " col " << col;
        if (first) {  // the pair's norm is preserved
          const double after = test::get(x, e) * test::get(x, e) + test::get(x, e + 1) * test::get(x, e + 1);
          EXPECT_NEAR(after, a * a + b * b, tol * (a * a + b * b + 1.0));
        }
      }
    }
  }
}

TEST(Rope, InverseUndoesForward) {
  const RopeCase rc(DType::kF64);
  Owned x({RopeCase::kRows, RopeCase::kWidth}, DType::kF64), x0({RopeCase::kRows, RopeCase::kWidth}, DType::kF64);
  test::fill_normal(x, 12);
  copy_values(x0, x);
  cpu().rope({}, rc.args(x));
  EXPECT_GT(test::rel_error(test::to_vector(x), test::to_vector(x0)), 1e-2);  // it did rotate
  cpu().rope({}, rc.args(x, /*inverse=*/true));
  EXPECT_LE(test::rel_error(test::to_vector(x), test::to_vector(x0)), 1e-15);
}

TEST(Rope, Errors) {
  const RopeCase rc(DType::kF64);
  Owned x({RopeCase::kRows, RopeCase::kWidth}, DType::kF64);
  test::fill_normal(x, 15);
  RopeArgs a = rc.args(x);
  a.pos_offset = 4;  // uses position 8 of an 8-row table
  expect_error([&] { cpu().rope({}, a); }, {"[rope] position 8"});
  a = rc.args(x);
  a.head_stride = 10;  // the last head would reach column 2·10 + 8 + 4 = 32 > 31
  a.col_offset = 8;
  expect_error([&] { cpu().rope({}, a); }, {"[rope]"});
  Owned bad_cos({RopeCase::kMaxPos, 3}, DType::kF64);
  a = rc.args(x);
  a.cos = bad_cos;
  expect_error([&] { cpu().rope({}, a); }, {"[rope] cos"});
}

// ================================================================ MLA key/value split (§2.3, §2.5)
// N = 7 rows, 3 heads, d_nope 3, d_rope 4, d_v 5; kr lives at columns 6..9 of a [7, 10] buffer.
constexpr int64_t kN = 7, kH = 3, kNope = 3, kRope = 4, kDv = 5, kKrStride = 10, kKrOffset = 6;

MlaKvSplitFwdArgs split_args(const Tensor& k, const Tensor& v, const Tensor& kv, const Tensor& kr) {
  return {.k = k,
          .v = v,
          .kv = kv,
          .kr = kr,
          .n_heads = kH,
          .d_nope = kNope,
          .d_rope = kRope,
          .d_v = kDv,
          .kr_stride = kKrStride,
          .kr_offset = kKrOffset};
}

TEST(MlaKvSplit, ForwardAssemblesKeysAndValues) {
  Owned kv({kN, kH * (kNope + kDv)}, DType::kF64), kr({kN, kKrStride}, DType::kF64);
  Owned k({kN, kH, kNope + kRope}, DType::kF64), v({kN, kH, kDv}, DType::kF64);
  test::fill_normal(kv, 21);
  test::fill_normal(kr, 22);
  cpu().mla_kv_split_fwd({}, split_args(k, v, kv, kr));
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t h = 0; h < kH; ++h) {
      for (int64_t i = 0; i < kNope; ++i)
        EXPECT_EQ(k.at<double>((n * kH + h) * 7 + i), kv.at<double>(n * kH * 8 + h * 8 + i));
      for (int64_t i = 0; i < kRope; ++i)
        EXPECT_EQ(k.at<double>((n * kH + h) * 7 + kNope + i), kr.at<double>(n * kKrStride + kKrOffset + i));
      for (int64_t i = 0; i < kDv; ++i)
        EXPECT_EQ(v.at<double>((n * kH + h) * kDv + i), kv.at<double>(n * kH * 8 + h * 8 + kNope + i));
    }
}

TEST(MlaKvSplit, BackwardByFiniteDifferences) {
  Owned kv({kN, kH * (kNope + kDv)}, DType::kF64), kr({kN, kKrStride}, DType::kF64);
  Owned k({kN, kH, kNope + kRope}, DType::kF64), v({kN, kH, kDv}, DType::kF64);
  Owned gk({kN, kH, kNope + kRope}, DType::kF64), gv({kN, kH, kDv}, DType::kF64);
  Owned dkv({kN, kH * (kNope + kDv)}, DType::kF64), dkr({kN, kKrStride}, DType::kF64);
  test::fill_normal(kv, 23);
  test::fill_normal(kr, 24);
  test::fill_normal(gk, 25);
  test::fill_normal(gv, 26);
  test::fill_normal(dkr, 27);  // junk: the rope columns must be overwritten, the others kept
  Owned dkr0({kN, kKrStride}, DType::kF64);
  copy_values(dkr0, dkr);
  auto loss = [&] {  // L = ⟨k, gk⟩ + ⟨v, gv⟩
    cpu().mla_kv_split_fwd({}, split_args(k, v, kv, kr));
    return test::dot(k, gk) + test::dot(v, gv);
  };
  cpu().mla_kv_split_bwd({}, {.dkv = dkv,
                              .dkr = dkr,
                              .dk = gk,
                              .dv = gv,
                              .n_heads = kH,
                              .d_nope = kNope,
                              .d_rope = kRope,
                              .d_v = kDv,
                              .kr_stride = kKrStride,
                              .kr_offset = kKrOffset});
  check_grad("mla_kv_split dkv", test::to_vector(dkv), test::numerical_grad(kv, loss));
  const std::vector<double> num_kr = test::numerical_grad(kr, loss);
  std::vector<double> ana_rope, num_rope;
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t col = 0; col < kKrStride; ++col) {
      const int64_t e = n * kKrStride + col;
      if (col >= kKrOffset) {
        ana_rope.push_back(dkr.at<double>(e));
        num_rope.push_back(num_kr[static_cast<size_t>(e)]);
      } else {
        EXPECT_EQ(dkr.at<double>(e), dkr0.at<double>(e)) << "column " << col << " outside kr must stay untouched";
        EXPECT_EQ(num_kr[static_cast<size_t>(e)], 0.0);
      }
    }
  check_grad("mla_kv_split dkr (sum heads)", ana_rope, num_rope);
}

TEST(MlaKvSplit, Errors) {
  Owned kv({kN, kH * (kNope + kDv) + 1}, DType::kF64), kr({kN, kKrStride}, DType::kF64);
  Owned k({kN, kH, kNope + kRope}, DType::kF64), v({kN, kH, kDv}, DType::kF64);
  expect_error([&] { cpu().mla_kv_split_fwd({}, split_args(k, v, kv, kr)); }, {"[mla_kv_split_fwd] kv"});
  Owned kv_ok({kN, kH * (kNope + kDv)}, DType::kF64), v_bad({kN, kH, kDv + 1}, DType::kF64);
  expect_error([&] { cpu().mla_kv_split_fwd({}, split_args(k, v_bad, kv_ok, kr)); }, {"[mla_kv_split_fwd] v"});
}

// The dtype rules of bf16 k, v (the bf16 GEMM mode's attention operands, op_args.h), shared by every
// backend: with an f32 kr, k and v may be bf16 (both or neither) and kv too; the backward takes bf16
// dk, dv (both or neither) and a bf16 dkv, never a bf16 dkr; f64 calls take no bf16.
// (The values: test_bf16_fields.cpp.)
TEST(MlaKvSplit, Bf16DtypeRules) {
  Owned kv({kN, kH * (kNope + kDv)}, DType::kF32), kr({kN, kKrStride}, DType::kF32), kr64({kN, kKrStride}, DType::kF64);
  Owned k16({kN, kH, kNope + kRope}, DType::kBF16), v16({kN, kH, kDv}, DType::kBF16), v32({kN, kH, kDv}, DType::kF32);
  Owned kv16({kN, kH * (kNope + kDv)}, DType::kBF16), kr16({kN, kKrStride}, DType::kBF16);
  for (const Device dev : {Device::kCPU, Device::kCUDA}) {
    const auto on = [&](const Tensor& t) { return dev == Device::kCPU ? t : as_cuda(t); };
    EXPECT_NO_THROW(validate_mla_kv_split_fwd(split_args(on(k16), on(v16), on(kv), on(kr)), dev));
    EXPECT_NO_THROW(validate_mla_kv_split_fwd(split_args(on(k16), on(v16), on(kv16), on(kr)), dev));
    expect_error([&] { validate_mla_kv_split_fwd(split_args(on(k16), on(v32), on(kv), on(kr)), dev); },
                 {"[mla_kv_split_fwd] k and v must have one dtype, got bf16 and f32"});
    expect_error([&] { validate_mla_kv_split_fwd(split_args(on(k16), on(v16), on(kv), on(kr64)), dev); },
                 {"[mla_kv_split_fwd] k", "expected dtype f64, got bf16"});
    const auto bwd = [&](const Tensor& dkv, const Tensor& dkr, const Tensor& dk, const Tensor& dv) {
      return MlaKvSplitBwdArgs{.dkv = on(dkv),
                               .dkr = on(dkr),
                               .dk = on(dk),
                               .dv = on(dv),
                               .n_heads = kH,
                               .d_nope = kNope,
                               .d_rope = kRope,
                               .d_v = kDv,
                               .kr_stride = kKrStride,
                               .kr_offset = kKrOffset};
    };
    EXPECT_NO_THROW(validate_mla_kv_split_bwd(bwd(kv16, kr, k16, v16), dev));
    expect_error([&] { validate_mla_kv_split_bwd(bwd(kv, kr16, k16, v16), dev); }, {"[mla_kv_split_bwd] dkr is bf16"});
    expect_error([&] { validate_mla_kv_split_bwd(bwd(kv, kr, k16, v32), dev); },
                 {"[mla_kv_split_bwd] dk and dv must have one dtype, got bf16 and f32"});
  }
}

// ================================================================ differential λ (§1.2, §1.4)
constexpr int64_t kDqk = kNope + kRope;                       // 7
const double kLambdaInit = 0.8 - 0.6 * std::exp(-0.3 * 1.0);  // layer 1

struct LambdaVecs {
  Owned q1, k1, q2, k2;
  explicit LambdaVecs(DType dt, uint64_t seed) : q1({kDqk}, dt), k1({kDqk}, dt), q2({kDqk}, dt), k2({kDqk}, dt) {
    test::fill_normal(q1, seed, 0.4);
    test::fill_normal(k1, seed + 1, 0.4);
    test::fill_normal(q2, seed + 2, 0.4);
    test::fill_normal(k2, seed + 3, 0.4);
  }
  void forward(const Tensor& lambda) const {
    cpu().diff_lambda_fwd({},
                          {.lambda = lambda, .lq1 = q1, .lk1 = k1, .lq2 = q2, .lk2 = k2, .lambda_init = kLambdaInit});
  }
};

TEST(DiffLambda, ForwardValueAndBackwardByFiniteDifferences) {
  const LambdaVecs lv(DType::kF64, 31);
  Owned lambda({1}, DType::kF64), dlambda({1}, DType::kF64);
  lv.forward(lambda);
  double d1 = 0.0, d2 = 0.0;
  for (int64_t i = 0; i < kDqk; ++i) {
    d1 += lv.q1.at<double>(i) * lv.k1.at<double>(i);
    d2 += lv.q2.at<double>(i) * lv.k2.at<double>(i);
  }
  EXPECT_NEAR(lambda.at<double>(0), std::exp(d1) - std::exp(d2) + kLambdaInit, 1e-15);

  // Weight gradients accumulate: start from random values and compare the increments.
  const LambdaVecs grads(DType::kF64, 41), before(DType::kF64, 41);
  dlambda.at<double>(0) = 1.3;
  cpu().diff_lambda_bwd({}, {.dlq1 = grads.q1,
                             .dlk1 = grads.k1,
                             .dlq2 = grads.q2,
                             .dlk2 = grads.k2,
                             .dlambda = dlambda,
                             .lq1 = lv.q1,
                             .lk1 = lv.k1,
                             .lq2 = lv.q2,
                             .lk2 = lv.k2});
  auto loss = [&] {  // L = 1.3·λ
    lv.forward(lambda);
    return 1.3 * lambda.at<double>(0);
  };
  const char* names[] = {"diff_lambda dlq1", "diff_lambda dlk1", "diff_lambda dlq2", "diff_lambda dlk2"};
  const Owned* vecs[] = {&lv.q1, &lv.k1, &lv.q2, &lv.k2};
  const Owned* got[] = {&grads.q1, &grads.k1, &grads.q2, &grads.k2};
  const Owned* base[] = {&before.q1, &before.k1, &before.q2, &before.k2};
  for (int w = 0; w < 4; ++w) {
    std::vector<double> inc = test::to_vector(*got[w]);
    for (int64_t i = 0; i < kDqk; ++i) inc[static_cast<size_t>(i)] -= base[w]->at<double>(i);
    check_grad(names[w], inc, test::numerical_grad(*vecs[w], loss));
  }
  Owned short_vec({kDqk - 1}, DType::kF64);
  expect_error(
      [&] {
        cpu().diff_lambda_fwd({}, {.lambda = lambda, .lq1 = lv.q1, .lk1 = short_vec, .lq2 = lv.q2, .lk2 = lv.k2});
      },
      {"[diff_lambda_fwd] lk1"});
}

// ================================================================ causal attention (§1.3-1.4, §3.2)
struct AttnCase {
  int64_t batch, seq, heads, d_qk, d_v;
  bool differential;
  double scale = 0.45;  // large enough that the softmax is far from uniform
};

// Inputs and saved outputs of one attention call; λ comes from diff_lambda_fwd of random vectors.
struct AttnData {
  AttnCase c;
  DType dt;
  Owned q, k, v, out, o2, lse, lambda, dout;
  LambdaVecs lv;
  AttnData(const AttnCase& c_, DType dt_, uint64_t seed)
      : c(c_),
        dt(dt_),
        q({c.batch, c.seq, c.heads, c.d_qk}, dt),
        k({c.batch, c.seq, c.heads, c.d_qk}, dt),
        v({c.batch, c.seq, c.heads, c.d_v}, dt),
        out({c.batch, c.seq, c.heads, c.d_v}, dt),
        o2({c.batch, c.seq, c.heads, c.d_v}, dt),
        lse({c.batch, c.heads, c.seq}, dt),
        lambda({1}, dt),
        dout({c.batch, c.seq, c.heads, c.d_v}, dt),
        lv(dt, seed + 10) {
    test::fill_normal(q, seed);
    test::fill_normal(k, seed + 1);
    test::fill_normal(v, seed + 2);
    test::fill_normal(dout, seed + 3);
    lv.forward(lambda);
  }
  Tensor o2_arg() const { return c.differential ? o2.t() : Tensor{}; }  // unused (empty) when plain
  Tensor lambda_arg() const { return c.differential ? lambda.t() : Tensor{}; }
  AttentionFwdArgs fwd_args() const {
    return {.out = out,
            .o2 = o2_arg(),
            .lse = lse,
            .q = q,
            .k = k,
            .v = v,
            .lambda = lambda_arg(),
            .scale = c.scale,
            .differential = c.differential};
  }
  void forward() const { cpu().attention_fwd({}, fwd_args()); }
};

// Independent reference: full score matrices, −inf mask, row softmax, and for the differential
// case the subtraction on the maps (docs/derivations.md §1.3 step 6): O_g = (A_{g,0} − λ·A_{g,1}) V_g.
struct Reference {
  std::vector<double> out, o2, lse;
};

Reference reference_attention(const AttnData& d) {
  const AttnCase& c = d.c;
  const int64_t T = c.seq, H = c.heads;
  auto q = [&](int64_t b, int64_t t, int64_t h, int64_t i) {
    return test::get(d.q, ((b * T + t) * H + h) * c.d_qk + i);
  };
  auto k = [&](int64_t b, int64_t t, int64_t h, int64_t i) {
    return test::get(d.k, ((b * T + t) * H + h) * c.d_qk + i);
  };
  auto v = [&](int64_t b, int64_t t, int64_t h, int64_t i) {
    return test::get(d.v, ((b * T + t) * H + h) * c.d_v + i);
  };
  const double lambda = c.differential ? test::get(d.lambda, 0) : 0.0;
  Reference r;
  r.out.assign(static_cast<size_t>(d.out.numel()), 0.0);
  r.o2.assign(r.out.size(), 0.0);
  r.lse.assign(static_cast<size_t>(d.lse.numel()), 0.0);
  // probs[j][t][s] of one batch
  std::vector<std::vector<std::vector<double>>> probs(static_cast<size_t>(H),
                                                      std::vector<std::vector<double>>(T, std::vector<double>(T, 0.0)));
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t j = 0; j < H; ++j)
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> row(static_cast<size_t>(T));
        for (int64_t s = 0; s < T; ++s) {
          double z = 0.0;
          for (int64_t i = 0; i < c.d_qk; ++i) z += q(b, t, j, i) * k(b, s, j, i);
          row[static_cast<size_t>(s)] = s > t ? -INFINITY : c.scale * z;
        }
        double mx = -INFINITY, sum = 0.0;
        for (double z : row) mx = std::max(mx, z);
        for (double z : row) sum += std::exp(z - mx);
        for (int64_t s = 0; s < T; ++s) probs[j][t][s] = std::exp(row[static_cast<size_t>(s)] - mx) / sum;
        r.lse[static_cast<size_t>((b * H + j) * T + t)] = mx + std::log(sum);
      }
    for (int64_t t = 0; t < T; ++t) {
      if (c.differential) {
        for (int64_t g = 0; g < H / 2; ++g)
          for (int64_t col = 0; col < 2 * c.d_v; ++col) {  // V_g[s, col] = v[s, 2g + col / d_v, col % d_v]
            double acc = 0.0, acc2 = 0.0;
            for (int64_t s = 0; s < T; ++s) {
              const double vs = v(b, s, 2 * g + col / c.d_v, col % c.d_v);
              acc += (probs[2 * g][t][s] - lambda * probs[2 * g + 1][t][s]) * vs;
              acc2 += probs[2 * g + 1][t][s] * vs;
            }
            const size_t e = static_cast<size_t>(((b * T + t) * H / 2 + g) * 2 * c.d_v + col);
            r.out[e] = acc;
            r.o2[e] = acc2;
          }
      } else {
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < c.d_v; ++i) {
            double acc = 0.0;
            for (int64_t s = 0; s < T; ++s) acc += probs[h][t][s] * v(b, s, h, i);
            r.out[static_cast<size_t>(((b * T + t) * H + h) * c.d_v + i)] = acc;
          }
      }
    }
  }
  return r;
}

const AttnCase kDiffCase{.batch = 2, .seq = 5, .heads = 4, .d_qk = kDqk, .d_v = kDv, .differential = true};
const AttnCase kPlainCase{.batch = 2, .seq = 7, .heads = 3, .d_qk = kDqk, .d_v = kDv, .differential = false};

TEST(Attention, ForwardMatchesReference) {
  for (const AttnCase& c : {kDiffCase, kPlainCase}) {
    SCOPED_TRACE(c.differential ? "differential" : "plain");
    const AttnData d(c, DType::kF64, 51);
    d.forward();
    const Reference r = reference_attention(d);
    // f64, same math in a different order: agreement to a few ulps.
    EXPECT_LE(test::rel_error(test::to_vector(d.out), r.out), 1e-13);
    EXPECT_LE(test::rel_error(test::to_vector(d.lse), r.lse), 1e-13);
    if (c.differential) {
      EXPECT_LE(test::rel_error(test::to_vector(d.o2), r.o2), 1e-13);
    }
    EXPECT_GT(norm(r.out), 1.0);
  }
}

TEST(Attention, LargeScoresStayFinite) {
  // scale 300 puts scores near ±2000, beyond exp's f64 range (709): only the max-subtracted exp
  // stays finite. The 1e-10 budget covers the rounding of scores that large (≈2000·1e-16 absolute).
  for (AttnCase c : {kDiffCase, kPlainCase}) {
    SCOPED_TRACE(c.differential ? "differential" : "plain");
    c.scale = 300.0;
    const AttnData d(c, DType::kF64, 54);
    d.forward();
    const Reference r = reference_attention(d);
    for (double x : test::to_vector(d.out)) ASSERT_TRUE(std::isfinite(x));
    EXPECT_LE(test::rel_error(test::to_vector(d.out), r.out), 1e-10);
    EXPECT_LE(test::rel_error(test::to_vector(d.lse), r.lse), 1e-10);
  }
}

TEST(Attention, OutAcceptsDiffHeadViewAndIsDeterministic) {
  const AttnData d(kDiffCase, DType::kF64, 52);
  d.forward();
  const std::vector<double> first = test::to_vector(d.out);
  AttentionFwdArgs a = d.fwd_args();
  a.out = d.out.t().reshape({kDiffCase.batch, kDiffCase.seq, kDiffCase.heads / 2, 2 * kDiffCase.d_v});
  a.o2 = d.o2.t().reshape(a.out.shape);
  cpu().attention_fwd({}, a);
  EXPECT_EQ(test::to_vector(d.out), first);  // bitwise: same bytes, same loops, no races
}

TEST(Attention, F32MatchesF64) {
  for (const AttnCase& c : {kDiffCase, kPlainCase}) {
    SCOPED_TRACE(c.differential ? "differential" : "plain");
    const AttnData d64(c, DType::kF64, 53), d32(c, DType::kF32, 53);  // same seeds → same values
    d64.forward();
    d32.forward();
    // f32 rounding (≈6e-8) through short dot products, exp and sums of ≤ 7 terms stays well below 1e-5.
    const double err = test::rel_error(test::to_vector(d32.out), test::to_vector(d64.out));
    std::printf("[f32] attention %s out rel error vs f64 %.3e\n", c.differential ? "diff " : "plain", err);
    EXPECT_LE(err, 1e-5);
    EXPECT_LE(test::rel_error(test::to_vector(d32.lse), test::to_vector(d64.lse)), 1e-5);
  }
}

TEST(Attention, BackwardByFiniteDifferences) {
  for (const AttnCase& c : {kDiffCase, kPlainCase}) {
    const std::string mode = c.differential ? "diff" : "plain";
    SCOPED_TRACE(mode);
    AttnData d(c, DType::kF64, 61);
    const Tensor dout = d.dout;
    Owned dq(d.q.t().shape, DType::kF64), dk(d.k.t().shape, DType::kF64), dv(d.v.t().shape, DType::kF64);
    Owned dlambda({1}, DType::kF64);
    test::fill_normal(dq, 62);  // junk: activation gradients must be overwritten
    test::fill_normal(dk, 63);
    test::fill_normal(dv, 64);
    d.forward();
    cpu().attention_bwd({}, {.dq = dq,
                             .dk = dk,
                             .dv = dv,
                             .dlambda = c.differential ? dlambda.t() : Tensor{},
                             .dout = dout,
                             .q = d.q,
                             .k = d.k,
                             .v = d.v,
                             .out = d.out,
                             .o2 = d.o2_arg(),
                             .lse = d.lse,
                             .lambda = d.lambda_arg(),
                             .scale = c.scale,
                             .differential = c.differential});
    // L = ⟨out, dout⟩ with λ = diff_lambda(λ vectors), so the chain reaches the λ vectors.
    auto loss = [&] {
      if (c.differential) d.lv.forward(d.lambda);
      d.forward();
      return test::dot(d.out, dout);
    };
    check_grad((mode + " attention dq").c_str(), test::to_vector(dq), test::numerical_grad(d.q, loss));
    check_grad((mode + " attention dk").c_str(), test::to_vector(dk), test::numerical_grad(d.k, loss));
    check_grad((mode + " attention dv").c_str(), test::to_vector(dv), test::numerical_grad(d.v, loss));
    if (!c.differential) continue;
    auto loss_fixed_lambda = [&] {  // λ itself as the variable
      d.forward();
      return test::dot(d.out, dout);
    };
    check_grad("diff attention dlambda", test::to_vector(dlambda), test::numerical_grad(d.lambda, loss_fixed_lambda));
    d.lv.forward(d.lambda);  // restore λ from the vectors
    const LambdaVecs g(DType::kF64, 0);
    for (const Owned* t : {&g.q1, &g.k1, &g.q2, &g.k2})
      for (int64_t i = 0; i < t->numel(); ++i) t->at<double>(i) = 0.0;
    cpu().diff_lambda_bwd({}, {.dlq1 = g.q1,
                               .dlk1 = g.k1,
                               .dlq2 = g.q2,
                               .dlk2 = g.k2,
                               .dlambda = dlambda,
                               .lq1 = d.lv.q1,
                               .lk1 = d.lv.k1,
                               .lq2 = d.lv.q2,
                               .lk2 = d.lv.k2});
    check_grad("diff attention -> dlq1", test::to_vector(g.q1), test::numerical_grad(d.lv.q1, loss));
    check_grad("diff attention -> dlk1", test::to_vector(g.k1), test::numerical_grad(d.lv.k1, loss));
    check_grad("diff attention -> dlq2", test::to_vector(g.q2), test::numerical_grad(d.lv.q2, loss));
    check_grad("diff attention -> dlk2", test::to_vector(g.k2), test::numerical_grad(d.lv.k2, loss));
  }
}

TEST(Attention, Errors) {
  // Odd component heads cannot be paired.
  const AttnData odd({.batch = 2, .seq = 5, .heads = 3, .d_qk = kDqk, .d_v = kDv, .differential = true}, DType::kF64,
                     71);
  expect_error([&] { odd.forward(); }, {"[attention_fwd] differential attention pairs"});
  expect_error(
      [&] {
        cpu().attention_bwd({}, {.dq = odd.q,
                                 .dk = odd.k,
                                 .dv = odd.v,
                                 .dlambda = odd.lambda,
                                 .dout = odd.dout,
                                 .q = odd.q,
                                 .k = odd.k,
                                 .v = odd.v,
                                 .out = odd.out,
                                 .o2 = odd.o2,
                                 .lse = odd.lse,
                                 .lambda = odd.lambda,
                                 .scale = 0.5,
                                 .differential = true});
      },
      {"[attention_bwd] differential attention pairs"});

  const AttnData d(kDiffCase, DType::kF64, 72);
  Owned k_short({2, 4, 4, kDqk}, DType::kF64), lse_bad({2, 5, 4}, DType::kF64),
      out_bad({2, 5, 4, kDv + 1}, DType::kF64);
  Owned v_f32({2, 5, 4, kDv}, DType::kF32);
  AttentionFwdArgs a = d.fwd_args();
  a.k = k_short;
  expect_error([&] { cpu().attention_fwd({}, a); }, {"[attention_fwd] k"});
  a = d.fwd_args();
  a.lse = lse_bad;  // [B, T, H] instead of [B, H, T]
  expect_error([&] { cpu().attention_fwd({}, a); }, {"[attention_fwd] lse"});
  a = d.fwd_args();
  a.out = out_bad;
  expect_error([&] { cpu().attention_fwd({}, a); }, {"[attention_fwd] out"});
  a = d.fwd_args();
  a.v = v_f32;
  expect_error([&] { cpu().attention_fwd({}, a); }, {"[attention_fwd] v"});
  a = d.fwd_args();
  a.lambda = Tensor{};
  expect_error([&] { cpu().attention_fwd({}, a); }, {"[attention_fwd] lambda"});
}

// The dtype rules of bf16 q, k, v (the bf16 GEMM mode's saved activations, op_args.h), shared by
// every backend: all three bf16 with f32 outputs (gradients f32, except dq, dk, dv, which may be bf16
// where q, k, v are); q, k, v of mixed dtypes refused naming the odd one; no bf16 with f64 outputs.
// (The values: test_bf16_fields.cpp.)
TEST(Attention, Bf16DtypeRules) {
  const AttnData d(kDiffCase, DType::kF32, 73);
  const AttnData d64(kDiffCase, DType::kF64, 74);
  const Shape qs = d.q.t().shape, vs = d.v.t().shape;
  Owned q16(qs, DType::kBF16), k16(qs, DType::kBF16), v16(vs, DType::kBF16);
  Owned dq(qs, DType::kF32), dk(qs, DType::kF32), dv(vs, DType::kF32), dlambda({1}, DType::kF32);
  for (const Device dev : {Device::kCPU, Device::kCUDA}) {
    const auto on = [&](const Tensor& t) { return dev == Device::kCPU ? t : as_cuda(t); };
    AttentionFwdArgs g{.out = on(d.out),
                       .o2 = on(d.o2),
                       .lse = on(d.lse),
                       .q = on(q16),
                       .k = on(k16),
                       .v = on(v16),
                       .lambda = on(d.lambda),
                       .scale = 0.5};
    EXPECT_NO_THROW(validate_attention_fwd(g, dev));
    g.k = on(d.k);
    expect_error([&] { validate_attention_fwd(g, dev); },
                 {"[attention_fwd] k: q, k, v must have one dtype, got q bf16 and k f32"});
    g.k = on(k16);
    g.v = on(d.v);
    expect_error([&] { validate_attention_fwd(g, dev); },
                 {"[attention_fwd] v: q, k, v must have one dtype, got q bf16 and v f32"});
    g.q = on(d.q);
    expect_error([&] { validate_attention_fwd(g, dev); },
                 {"[attention_fwd] k: q, k, v must have one dtype, got q f32 and k bf16"});
    const AttentionFwdArgs g64{.out = on(d64.out),
                               .o2 = on(d64.o2),
                               .lse = on(d64.lse),
                               .q = on(q16),
                               .k = on(k16),
                               .v = on(v16),
                               .lambda = on(d64.lambda),
                               .scale = 0.5};
    expect_error([&] { validate_attention_fwd(g64, dev); }, {"[attention_fwd] q is bf16", "with f32 outputs", "f64"});

    AttentionBwdArgs gb{.dq = on(dq),
                        .dk = on(dk),
                        .dv = on(dv),
                        .dlambda = on(dlambda),
                        .dout = on(d.dout),
                        .q = on(q16),
                        .k = on(k16),
                        .v = on(v16),
                        .out = on(d.out),
                        .o2 = on(d.o2),
                        .lse = on(d.lse),
                        .lambda = on(d.lambda),
                        .scale = 0.5};
    EXPECT_NO_THROW(validate_attention_bwd(gb, dev));
    gb.dq = on(q16);  // with bf16 q, dq may be bf16 too (W_q's GEMM operand in the bf16 GEMM mode)
    EXPECT_NO_THROW(validate_attention_bwd(gb, dev));
    gb.dk = on(k16), gb.dv = on(v16);  // and dk, dv (read by the MLA split's backward)
    EXPECT_NO_THROW(validate_attention_bwd(gb, dev));
    const Owned dl16({1}, DType::kBF16);
    gb.dlambda = on(dl16);  // dλ keeps the outputs' f32
    expect_error([&] { validate_attention_bwd(gb, dev); }, {"[attention_bwd] dlambda", "expected dtype f32, got bf16"});
    gb.dlambda = on(dlambda);
    gb.q = on(d.q), gb.k = on(d.k), gb.v = on(d.v);  // f32 q: bf16 gradients are refused
    expect_error([&] { validate_attention_bwd(gb, dev); }, {"[attention_bwd] dq", "expected dtype f32, got bf16"});
    gb.dq = on(dq);
    expect_error([&] { validate_attention_bwd(gb, dev); }, {"[attention_bwd] dk", "expected dtype f32, got bf16"});
  }
}

}  // namespace
}  // namespace diffmoe
