// The tensor-core attention (tc_attention.cuh, used under GemmPrecision::kBF16) against the CPU's f32
// attention: forward (out, o2, lse) and backward (dq, dk, dv, dλ), differential and plain, at every
// covered d_qk ∈ {32, 48, 64, 96, 128} and value-group width ∈ {32, 64, 128}, with T = 1, T shorter
// than a tile, exactly one tile, odd T over several 64-row tiles, B > 1; outputs poisoned (NaN)
// first, guard bytes checked; and the backward bitwise reproducible. Then bf16 q, k, v (the bf16
// mode's saved activations): bitwise the results of the f32 tensors they were rounded from, and
// refused, saying why, where the tensor-core kernels do not run.
//
// Tolerance (STYLE.md numerics policy, BF16): ‖cuda − cpu‖/‖cpu‖ ≤ 1e-2 per output. Why: q, k, v
// and dout are rounded to bf16 (≤ 2^-9 relative each) and P, dS are rounded to bf16 before their
// products, all sums in f32; each product is then off by ~1.6e-3 relative (rms) and sums of random
// signs keep that relative size (measured ~3e-3 for out, ~4e-3 for dq/dk, ~3e-3 for dv; lse ~2e-4).
// out must also be off by ≥ 1e-4: the f32 flash kernels match the CPU to ~1e-6, so a smaller error
// means the bf16 kernels did not run. Two outputs need another denominator, written where used:
// dλ (a sum of random-sign terms) and dq, dk at T = 1 (exactly zero).
#include <fmt/core.h>

#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

constexpr double kMaxRel = 1e-2;  // the policy bound (see the file comment)
constexpr double kMinRel = 1e-4;  // out: below this the bf16 kernels did not run

// ‖cuda − cpu‖ / max(‖cpu‖, floor) ≤ kMaxRel (NaN fails), guard bytes intact; returns the error.
double expect_rel(const Dual& d, const std::string& what, double floor = 0.0, double min_rel = 0.0) {
  const std::vector<double> got = d.device_values(), want = d.host_values();
  double err2 = 0.0, ref2 = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    err2 += (got[i] - want[i]) * (got[i] - want[i]);
    ref2 += want[i] * want[i];
  }
  const double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), floor);
  std::printf("[cuda-tc-attn] %-52s n=%-7zu rel. error %.3e  (bound %.0e)\n", what.c_str(), got.size(), rel, kMaxRel);
  EXPECT_TRUE(std::isfinite(rel) && rel <= kMaxRel) << what << ": relative error " << rel << " > " << kMaxRel;
  EXPECT_GE(rel, min_rel) << what << ": relative error " << rel << " is f32-like: did the bf16 kernels run?";
  EXPECT_TRUE(d.guard_intact()) << what << ": the guard bytes after the device tensor were overwritten";
  return rel;
}

struct TcCase {
  int64_t B, T, H, dqk, dv;
  bool differential;
};

void check_tc_attention(const TcCase& c) {
  const Bf16Mode mode;
  const int64_t B = c.B, T = c.T, H = c.H, C = c.differential ? 2 : 1, G = H / C, W = C * c.dv;
  const Shape out_shape{B, T, G, W};
  Dual q(Shape{B, T, H, c.dqk}), k(Shape{B, T, H, c.dqk}), v(Shape{B, T, H, c.dv});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), lambda(Shape{1});
  q.normal(90);
  k.normal(91);
  v.normal(92);
  lambda.set({0.35});
  out.poison();
  o2.poison();
  lse.poison();
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dqk));
  const std::string tag = fmt::format("B={} T={} H={} dqk={} W={} {}", B, T, H, c.dqk, W, c.differential ? "diff" : "plain");
  run_both([&](Backend& be, Side s) {
    be.attention_fwd({}, {.out = out[s], .o2 = c.differential ? o2[s] : Tensor{}, .lse = lse[s], .q = q[s], .k = k[s],
                          .v = v[s], .lambda = c.differential ? lambda[s] : Tensor{}, .scale = scale,
                          .differential = c.differential});
  });
  expect_rel(out, "fwd out " + tag, 0.0, kMinRel);
  if (c.differential) expect_rel(o2, "fwd o2 " + tag);
  expect_rel(lse, "fwd lse " + tag);

  // The backward reads the forward's saved tensors: give both sides the CPU's.
  out.to_gpu();
  o2.to_gpu();
  lse.to_gpu();
  Dual dout(out_shape), dq(Shape{B, T, H, c.dqk}), dk(Shape{B, T, H, c.dqk}), dv(Shape{B, T, H, c.dv}), dlambda(Shape{1});
  dout.normal(93);
  dq.poison();
  dk.poison();
  dv.poison();
  dlambda.poison();
  run_both([&](Backend& be, Side s) {
    be.attention_bwd({}, {.dq = dq[s], .dk = dk[s], .dv = dv[s], .dlambda = c.differential ? dlambda[s] : Tensor{},
                          .dout = dout[s], .q = q[s], .k = k[s], .v = v[s], .out = out[s],
                          .o2 = c.differential ? o2[s] : Tensor{}, .lse = lse[s],
                          .lambda = c.differential ? lambda[s] : Tensor{}, .scale = scale,
                          .differential = c.differential});
  });
  // At T = 1 each query sees one key: P = 1 and dS = P·(dP − D) = 0 exactly, so dq = dk = 0 and
  // ‖cpu‖ is no scale. The GPU's dP (bf16 operands) and D (f32) then differ by bf16 rounding; the
  // error is taken relative to the terms that cancel, ‖scale·(|dP| + |D|)·|k|‖ (|q| for dk), with
  // |dP| = |D| = |coef·dout·V|: ≤ 1e-2 of them.
  double dq_floor = 0.0, dk_floor = 0.0;
  if (T == 1) {
    const float* vh = v.host().ptr<float>();
    const float* dh = dout.host().ptr<float>();
    const float* qh = q.host().ptr<float>();
    const float* kh = k.host().ptr<float>();
    const double lam = c.differential ? 0.35 : 0.0;
    double sq = 0.0, sk = 0.0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / C;
        double dp = 0.0;
        for (int64_t i = 0; i < W; ++i) dp += static_cast<double>(dh[(b * G + g) * W + i]) * vh[(b * H + C * g) * c.dv + i];
        const double m = scale * 2.0 * std::fabs(h % C == 0 ? dp : -lam * dp);
        for (int64_t i = 0; i < c.dqk; ++i) {
          sq += m * m * kh[(b * H + h) * c.dqk + i] * kh[(b * H + h) * c.dqk + i];
          sk += m * m * qh[(b * H + h) * c.dqk + i] * qh[(b * H + h) * c.dqk + i];
        }
      }
    dq_floor = std::sqrt(sq);
    dk_floor = std::sqrt(sk);
  }
  expect_rel(dq, "bwd dq " + tag, dq_floor);
  expect_rel(dk, "bwd dk " + tag, dk_floor);
  expect_rel(dv, "bwd dv " + tag);
  if (c.differential) {
    // dλ = −Σ dout ⊙ o2 over B·T·W random-sign terms: the sum itself can be arbitrarily small, so
    // its error is relative to Σ|dout ⊙ o2| (the sum's condition); o2 is the CPU's on both sides,
    // so this is dout ⊙ o2 in f32 vs f64 order, far below the bound.
    const std::vector<double> dh = dout.host_values(), o2h = o2.host_values();
    double abs_sum = 0.0;
    for (size_t i = 0; i < dh.size(); ++i) abs_sum += std::fabs(dh[i] * o2h[i]);
    const double got = dlambda.device_values()[0], want = dlambda.host_values()[0];
    const double rel = std::fabs(got - want) / abs_sum;
    std::printf("[cuda-tc-attn] %-52s |diff|/sum|terms| %.3e\n", ("bwd dlambda " + tag).c_str(), rel);
    EXPECT_TRUE(std::isfinite(rel) && rel <= kMaxRel) << "dlambda " << tag << ": " << got << " vs " << want;
  }
}

// Every covered head size, T = 131 (odd: two full 64-row tiles and a partial one), B = 2.
TEST(CudaTcAttention, EveryCoveredHeadSize) {
  DIFFMOE_REQUIRE_CUDA();
  for (bool diff : {true, false})
    for (int64_t dqk : {32, 48, 64, 96, 128})
      for (int64_t w : {32, 64, 128}) check_tc_attention({2, 131, 4, dqk, diff ? w / 2 : w, diff});
}

// The bench preset's head shape (d_qk 96, d_v 64) at T = 1, shorter than a tile, one tile, and odd
// T over several tiles; B = 3.
TEST(CudaTcAttention, SequenceLengths) {
  DIFFMOE_REQUIRE_CUDA();
  for (bool diff : {true, false})
    for (int64_t T : {1, 17, 64, 200}) check_tc_attention({3, T, 4, 96, 64, diff});
}

// No atomics: two backward runs on the same inputs agree bitwise.
TEST(CudaTcAttention, BackwardDeterministic) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  const int64_t B = 2, T = 99, H = 4, dqk = 96, dv = 64;
  const Shape out_shape{B, T, H / 2, 2 * dv};
  Dual q(Shape{B, T, H, dqk}), k(Shape{B, T, H, dqk}), v(Shape{B, T, H, dv}), lambda(Shape{1});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), dout(out_shape);
  Dual dq(Shape{B, T, H, dqk}), dk(Shape{B, T, H, dqk}), dvv(Shape{B, T, H, dv}), dlambda(Shape{1});
  q.normal(94);
  k.normal(95);
  v.normal(96);
  dout.normal(97);
  lambda.set({0.25});
  const Side g = Side::kGpu;
  gpu().attention_fwd({}, {.out = out[g], .o2 = o2[g], .lse = lse[g], .q = q[g], .k = k[g], .v = v[g],
                           .lambda = lambda[g], .scale = 0.1});
  std::vector<std::vector<double>> first;
  for (int run = 0; run < 2; ++run) {
    gpu().attention_bwd({}, {.dq = dq[g], .dk = dk[g], .dv = dvv[g], .dlambda = dlambda[g], .dout = dout[g], .q = q[g],
                             .k = k[g], .v = v[g], .out = out[g], .o2 = o2[g], .lse = lse[g], .lambda = lambda[g],
                             .scale = 0.1});
    std::vector<std::vector<double>> now{dq.device_values(), dk.device_values(), dvv.device_values(),
                                         dlambda.device_values()};
    if (run == 0) first = now;
    else for (size_t t = 0; t < now.size(); ++t) EXPECT_EQ(now[t], first[t]) << "output " << t;
  }
}

// ---------------------------------------------------------------- bf16 q, k, v

// got and want agree bitwise (as doubles: NaN never passes), guard bytes intact.
void expect_same(const Dual& got, const Dual& want, const std::string& what) {
  const std::vector<double> g = got.device_values(), w = want.device_values();
  ASSERT_EQ(g.size(), w.size());
  int64_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) bad += g[i] == w[i] ? 0 : 1;
  std::printf("[cuda-tc-attn] %-52s n=%-7zu %lld elements differ\n", what.c_str(), g.size(), static_cast<long long>(bad));
  EXPECT_EQ(bad, 0) << what << ": bf16 q, k, v must give bitwise the results of the f32 ones";
  EXPECT_TRUE(got.guard_intact()) << what;
}

// bf16 q, k, v hold the values the op rounds f32 q, k, v to (nearest even, the host's rounding is
// the device's), so the kernels see the same operands: every output bitwise equal. offset 0: read
// in place; offset 1: views 2 bytes off a 16-byte boundary, copied into the scratch as they are.
void check_bf16_inputs(const TcCase& c, int64_t offset) {
  const Bf16Mode mode;
  const int64_t B = c.B, T = c.T, H = c.H, C = c.differential ? 2 : 1, W = C * c.dv;
  const Shape qk_shape{B, T, H, c.dqk}, v_shape{B, T, H, c.dv}, out_shape{B, T, H / C, W};
  Dual q(qk_shape), k(qk_shape), v(v_shape), lambda(Shape{1}), dout(out_shape);
  q.normal(110);
  k.normal(111);
  v.normal(112);
  dout.normal(113);
  lambda.set({0.3});
  const Dual q16 = bf16_copy(q, qk_shape, offset), k16 = bf16_copy(k, qk_shape, offset), v16 = bf16_copy(v, v_shape, offset);
  const Side g = Side::kGpu;
  const Tensor q16v = offset_view(q16, g, qk_shape, offset), k16v = offset_view(k16, g, qk_shape, offset);
  const Tensor v16v = offset_view(v16, g, v_shape, offset);
  const std::string tag = fmt::format("B={} T={} H={} dqk={} W={} {} offset {}", B, T, H, c.dqk, W,
                                      c.differential ? "diff" : "plain", offset);
  struct Outputs {
    Dual out, o2, lse, dq, dk, dv, dlambda;
  };
  const auto run = [&](const Tensor& qt, const Tensor& kt, const Tensor& vt, Outputs& o) {
    for (Dual* d : {&o.out, &o.o2, &o.lse, &o.dq, &o.dk, &o.dv, &o.dlambda}) d->poison();
    const Tensor o2 = c.differential ? o.o2[g] : Tensor{}, lam = c.differential ? lambda[g] : Tensor{};
    gpu().attention_fwd({}, {.out = o.out[g], .o2 = o2, .lse = o.lse[g], .q = qt, .k = kt, .v = vt, .lambda = lam,
                             .scale = 0.1, .differential = c.differential});
    gpu().attention_bwd({}, {.dq = o.dq[g], .dk = o.dk[g], .dv = o.dv[g], .dlambda = c.differential ? o.dlambda[g] : Tensor{},
                             .dout = dout[g], .q = qt, .k = kt, .v = vt, .out = o.out[g], .o2 = o2, .lse = o.lse[g],
                             .lambda = lam, .scale = 0.1, .differential = c.differential});
    gpu().synchronize({});
  };
  const auto outputs = [&] {
    return Outputs{Dual(out_shape), Dual(out_shape), Dual(Shape{B, H, T}), Dual(qk_shape), Dual(qk_shape), Dual(v_shape),
                   Dual(Shape{1})};
  };
  Outputs f32_in = outputs(), bf16_in = outputs();
  run(q[g], k[g], v[g], f32_in);
  run(q16v, k16v, v16v, bf16_in);
  const std::pair<const Dual Outputs::*, const char*> fields[] = {
      {&Outputs::out, "out"}, {&Outputs::o2, "o2"}, {&Outputs::lse, "lse"}, {&Outputs::dq, "dq"},
      {&Outputs::dk, "dk"},   {&Outputs::dv, "dv"}, {&Outputs::dlambda, "dlambda"}};
  for (const auto& [field, name] : fields) {
    if (!c.differential && (std::string(name) == "o2" || std::string(name) == "dlambda")) continue;  // unused when plain
    expect_same(bf16_in.*field, f32_in.*field, fmt::format("bf16 q,k,v {} {}", name, tag));
  }
  // The inputs are read, never written.
  EXPECT_TRUE(q16.device_values() == q16.host_values()) << tag << ": q was written";
  EXPECT_TRUE(k16.device_values() == k16.host_values()) << tag << ": k was written";
  EXPECT_TRUE(v16.device_values() == v16.host_values()) << tag << ": v was written";
}

// The bench head shape (d_qk 96, d_v 64) and the smallest covered one, differential and plain, T odd
// over several tiles; and one unaligned case.
TEST(CudaTcAttention, Bf16InputsMatchRoundedF32) {
  DIFFMOE_REQUIRE_CUDA();
  for (bool diff : {true, false}) {
    check_bf16_inputs({2, 131, 4, 96, 64, diff}, 0);
    check_bf16_inputs({3, 17, 4, 32, diff ? 16 : 32, diff}, 0);
  }
  check_bf16_inputs({2, 131, 4, 96, 64, true}, 1);
}

// dq, dk, dv into bf16 (the bf16 GEMM mode with bf16 q, k, v: dq only feeds W_q's backward GEMMs,
// dk and dv the MLA split): each value is the f32 gradient of the same call rounded once, bitwise.
// A bf16 dq with f32 q, k, v is refused.
TEST(CudaTcAttention, Bf16GradientsAreTheF32Rounded) {
  DIFFMOE_REQUIRE_CUDA();
  const Bf16Mode mode;
  for (const bool diff : {true, false}) {
    const TcCase c{2, 131, 4, 96, 64, diff};
    const int64_t C = diff ? 2 : 1;
    const Shape qk_shape{c.B, c.T, c.H, c.dqk}, v_shape{c.B, c.T, c.H, c.dv}, out_shape{c.B, c.T, c.H / C, C * c.dv};
    Dual q(qk_shape), k(qk_shape), v(v_shape), lambda(Shape{1}), dout(out_shape), out(out_shape), o2(out_shape);
    Dual lse(Shape{c.B, c.H, c.T}), dq(qk_shape), dk(qk_shape), dv(v_shape), dlambda(Shape{1});
    Dual dq16(qk_shape, DType::kBF16), dk16(qk_shape, DType::kBF16), dv16(v_shape, DType::kBF16), dlambda2(Shape{1});
    q.normal(130);
    k.normal(131);
    v.normal(132);
    dout.normal(133);
    lambda.set({0.3});
    const Dual q16 = bf16_copy(q, qk_shape), k16 = bf16_copy(k, qk_shape), v16 = bf16_copy(v, v_shape);
    const Side g = Side::kGpu;
    const Tensor o2t = diff ? o2[g] : Tensor{}, lam = diff ? lambda[g] : Tensor{};
    gpu().attention_fwd({}, {.out = out[g], .o2 = o2t, .lse = lse[g], .q = q16[g], .k = k16[g], .v = v16[g], .lambda = lam,
                             .scale = 0.1, .differential = diff});
    // qkv16: the bf16 q, k, v (else the f32 ones, which the kernels round themselves).
    const auto bwd = [&](const Dual& dq_t, const Dual& dk_t, const Dual& dv_t, const Dual& dl_t, bool qkv16) {
      gpu().attention_bwd({}, {.dq = dq_t[g], .dk = dk_t[g], .dv = dv_t[g], .dlambda = diff ? dl_t[g] : Tensor{},
                               .dout = dout[g], .q = qkv16 ? q16[g] : q[g], .k = qkv16 ? k16[g] : k[g],
                               .v = qkv16 ? v16[g] : v[g], .out = out[g], .o2 = o2t, .lse = lse[g], .lambda = lam,
                               .scale = 0.1, .differential = diff});
    };
    for (Dual* d16 : {&dq16, &dk16, &dv16}) d16->poison();
    bwd(dq, dk, dv, dlambda, true);
    bwd(dq16, dk16, dv16, dlambda2, true);
    gpu().synchronize({});
    const std::string tag = diff ? "differential" : "plain";
    for (const auto& [f32_grad, bf16_grad, name] : {std::tuple{&dq, &dq16, "dq"}, std::tuple{&dk, &dk16, "dk"},
                                                     std::tuple{&dv, &dv16, "dv"}}) {
      const std::vector<double> f = f32_grad->device_values(), h = bf16_grad->device_values();
      int64_t bad = 0;
      for (size_t i = 0; i < f.size(); ++i) bad += h[i] == bf16_to_f32(f32_to_bf16(static_cast<float>(f[i]))) ? 0 : 1;
      EXPECT_EQ(bad, 0) << tag << ": the bf16 " << name << " is not the f32 one rounded";
      EXPECT_TRUE(bf16_grad->guard_intact()) << tag << " " << name;
    }
    if (diff) {
      EXPECT_EQ(dlambda2.device_values(), dlambda.device_values()) << tag << ": dlambda";
    }
    expect_error([&] { bwd(dq16, dk, dv, dlambda2, false); }, {"[attention_bwd] dq", "expected dtype f32, got bf16"});
  }
}

// What the model asks before planning bf16 q, k, v: yes in the bf16 mode for covered shapes (this
// file runs on Hopper), no in the f32 mode, for uncovered shapes, under kSimple, and on the CPU.
TEST(CudaTcAttention, AttentionTakesBf16) {
  DIFFMOE_REQUIRE_CUDA();
  auto& be = dynamic_cast<CudaBackend&>(gpu());
  const AttentionShape bench{.batch = 8, .seq = 2048, .heads = 16, .d_qk = 96, .d_v = 64, .differential = true};
  const AttentionShape odd{.batch = 2, .seq = 37, .heads = 4, .d_qk = 7, .d_v = 5, .differential = true};
  EXPECT_FALSE(be.attention_takes_bf16(bench)) << "f32 mode";
  {
    const Bf16Mode mode;
    EXPECT_TRUE(be.attention_takes_bf16(bench));
    EXPECT_TRUE(be.attention_takes_bf16({.batch = 1, .seq = 5, .heads = 3, .d_qk = 64, .d_v = 64, .differential = false}));
    EXPECT_FALSE(be.attention_takes_bf16(odd));
    EXPECT_FALSE(be.attention_takes_bf16({.batch = 1, .seq = 5, .heads = 3, .d_qk = 96, .d_v = 64, .differential = true}))
        << "odd heads cannot pair";
    be.set_attention_kernel(CudaBackend::AttentionKernel::kSimple);
    EXPECT_FALSE(be.attention_takes_bf16(bench)) << "kSimple";
    be.set_attention_kernel(CudaBackend::AttentionKernel::kFlash);
  }
  cpu().set_gemm_precision(GemmPrecision::kBF16);
  EXPECT_FALSE(cpu().attention_takes_bf16(bench)) << "the CPU backend";
  cpu().set_gemm_precision(GemmPrecision::kF32);
}

// bf16 q, k, v where the tensor-core kernels would not run: refused with the reason (the f32 flash
// and simple kernels read f32 only), forward and backward; outputs untouched.
TEST(CudaTcAttention, Bf16InputsRefusedWhereNotCovered) {
  DIFFMOE_REQUIRE_CUDA();
  auto& be = dynamic_cast<CudaBackend&>(gpu());
  const auto check = [&](const TcCase& c, std::initializer_list<std::string> parts) {
    const int64_t C = c.differential ? 2 : 1;
    const Shape qk_shape{c.B, c.T, c.H, c.dqk}, v_shape{c.B, c.T, c.H, c.dv}, out_shape{c.B, c.T, c.H / C, C * c.dv};
    Dual q(qk_shape), k(qk_shape), v(v_shape), lambda(Shape{1}), out(out_shape), o2(out_shape), lse(Shape{c.B, c.H, c.T});
    Dual dout(out_shape), dq(qk_shape), dk(qk_shape), dv(v_shape), dlambda(Shape{1});
    for (Dual* d : {&q, &k, &v, &dout}) d->normal(120);
    lambda.set({0.3});
    out.poison();
    const Dual q16 = bf16_copy(q, qk_shape), k16 = bf16_copy(k, qk_shape), v16 = bf16_copy(v, v_shape);
    const Side g = Side::kGpu;
    expect_error([&] {
      gpu().attention_fwd({}, {.out = out[g], .o2 = o2[g], .lse = lse[g], .q = q16[g], .k = k16[g], .v = v16[g],
                               .lambda = lambda[g], .scale = 0.1});
    }, parts);
    std::vector<std::string> bwd_parts(parts);
    bwd_parts[0] = "[attention_bwd]";
    expect_error([&] {
      gpu().attention_bwd({}, {.dq = dq[g], .dk = dk[g], .dv = dv[g], .dlambda = dlambda[g], .dout = dout[g], .q = q16[g],
                               .k = k16[g], .v = v16[g], .out = out[g], .o2 = o2[g], .lse = lse[g], .lambda = lambda[g],
                               .scale = 0.1});
    }, {bwd_parts[0], bwd_parts[1], bwd_parts.back()});
    gpu().synchronize({});
    for (double x : out.device_values()) ASSERT_TRUE(std::isnan(x)) << "a refused call wrote its output";
  };
  // The f32 GEMM mode: no tensor-core attention at all.
  check({2, 37, 4, 96, 64, true}, {"[attention_fwd]", "bf16 q, k, v need the bf16 GEMM mode", "train.precision"});
  const Bf16Mode mode;
  // d_qk 7, d_v 5: only the f32 simple kernels cover it.
  check({2, 37, 4, 7, 5, true}, {"[attention_fwd]", "bf16 q, k, v are read only by the tensor-core attention",
                                 "not d_qk = 7 and comps·d_v = 10"});
  be.set_attention_kernel(CudaBackend::AttentionKernel::kSimple);
  check({2, 37, 4, 96, 64, true}, {"[attention_fwd]", "AttentionKernel::kSimple reads f32 q, k, v only", "kSimple"});
  be.set_attention_kernel(CudaBackend::AttentionKernel::kFlash);
}

}  // namespace
}  // namespace diffmoe::cudatest
