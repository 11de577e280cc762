// The tensor-core attention (tc_attention.cuh, used under GemmPrecision::kBF16) against the CPU's f32
// attention: forward (out, o2, lse) and backward (dq, dk, dv, dλ), differential and plain, at every
// covered d_qk ∈ {32, 48, 64, 96, 128} and value-group width ∈ {32, 64, 128}, with T = 1, T shorter
// than a tile, exactly one tile, odd T over several 64-row tiles, B > 1; outputs poisoned (NaN)
// first, guard bytes checked; and the backward bitwise reproducible; the same against the CPU given
// the same bf16 q, k, v. Then bf16 q, k, v (the bf16 mode's saved activations): bitwise the results
// of the f32 tensors they were rounded from; and on every other path (the f32 mode's flash and
// simple kernels, kSimple, shapes the tensor-core kernels do not cover): widened, so bitwise the
// f32 tensors' results there and the CPU's within the f32 attention tolerance.
//
// Tolerance (docs/style.md numerics policy, BF16): ‖cuda − cpu‖/‖cpu‖ ≤ 1e-2 per output. Why: q, k, v
// and dout are rounded to bf16 (≤ 2^-9 relative each) and P, dS are rounded to bf16 before their
// products, all sums in f32; each product is then off by ~1.6e-3 relative (rms) and sums of random
// signs keep that relative size (measured ~3e-3 for out, ~4e-3 for dq/dk, ~3e-3 for dv; lse ~2e-4).
// out must also be off by ≥ 1e-4: the f32 flash kernels match the CPU to ~1e-6, so a smaller error
// means the bf16 kernels did not run. Two outputs need another denominator, written where used:
// dλ (a sum of random-sign terms) and dq, dk at T = 1 (exactly zero).
#include <fmt/core.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

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

// bf16_qkv: both sides read bf16 q, k, v (the values q, k, v round to); the GPU's error is then only
// its rounding of P, dS and dout (no minimum is asked: the f32 cases show the bf16 kernels run).
void check_tc_attention(const TcCase& c, bool bf16_qkv = false) {
  const Bf16Mode mode;
  const int64_t B = c.B, T = c.T, H = c.H, C = c.differential ? 2 : 1, G = H / C, W = C * c.dv;
  const Shape out_shape{B, T, G, W};
  Dual q32(Shape{B, T, H, c.dqk}), k32(Shape{B, T, H, c.dqk}), v32(Shape{B, T, H, c.dv});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), lambda(Shape{1});
  q32.normal(90);
  k32.normal(91);
  v32.normal(92);
  const Dual q = bf16_qkv ? bf16_copy(q32, q32.host().shape) : std::move(q32);
  const Dual k = bf16_qkv ? bf16_copy(k32, k32.host().shape) : std::move(k32);
  const Dual v = bf16_qkv ? bf16_copy(v32, v32.host().shape) : std::move(v32);
  lambda.set({0.35});
  out.poison();
  o2.poison();
  lse.poison();
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dqk));
  const std::string tag = fmt::format("B={} T={} H={} dqk={} W={} {}{}", B, T, H, c.dqk, W,
                                      c.differential ? "diff" : "plain", bf16_qkv ? " bf16 q,k,v" : "");
  run_both([&](Backend& be, Side s) {
    be.attention_fwd({}, {.out = out[s],
                          .o2 = c.differential ? o2[s] : Tensor{},
                          .lse = lse[s],
                          .q = q[s],
                          .k = k[s],
                          .v = v[s],
                          .lambda = c.differential ? lambda[s] : Tensor{},
                          .scale = scale,
                          .differential = c.differential});
  });
  expect_rel(out, "fwd out " + tag, 0.0, bf16_qkv ? 0.0 : kMinRel);
  if (c.differential) expect_rel(o2, "fwd o2 " + tag);
  expect_rel(lse, "fwd lse " + tag);

  // The backward reads the forward's saved tensors: give both sides the CPU's.
  out.to_gpu();
  o2.to_gpu();
  lse.to_gpu();
  Dual dout(out_shape), dq(Shape{B, T, H, c.dqk}), dk(Shape{B, T, H, c.dqk}), dv(Shape{B, T, H, c.dv}),
      dlambda(Shape{1});
  dout.normal(93);
  dq.poison();
  dk.poison();
  dv.poison();
  dlambda.poison();
  run_both([&](Backend& be, Side s) {
    be.attention_bwd({}, {.dq = dq[s],
                          .dk = dk[s],
                          .dv = dv[s],
                          .dlambda = c.differential ? dlambda[s] : Tensor{},
                          .dout = dout[s],
                          .q = q[s],
                          .k = k[s],
                          .v = v[s],
                          .out = out[s],
                          .o2 = c.differential ? o2[s] : Tensor{},
                          .lse = lse[s],
                          .lambda = c.differential ? lambda[s] : Tensor{},
                          .scale = scale,
                          .differential = c.differential});
  });
  // At T = 1 each query sees one key: P = 1 and dS = P·(dP − D) = 0 exactly, so dq = dk = 0 and
  // ‖cpu‖ is no scale. The GPU's dP (bf16 operands) and D (f32) then differ by bf16 rounding; the
  // error is taken relative to the terms that cancel, ‖scale·(|dP| + |D|)·|k|‖ (|q| for dk), with
  // |dP| = |D| = |coef·dout·V|: ≤ 1e-2 of them.
  double dq_floor = 0.0, dk_floor = 0.0;
  if (T == 1) {
    const std::vector<double> vh = v.host_values(), dh = dout.host_values(), qh = q.host_values(), kh = k.host_values();
    const double lam = c.differential ? 0.35 : 0.0;
    double sq = 0.0, sk = 0.0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / C;
        double dp = 0.0;
        for (int64_t i = 0; i < W; ++i)
          dp += static_cast<double>(dh[(b * G + g) * W + i]) * vh[(b * H + C * g) * c.dv + i];
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
  gpu().attention_fwd(
      {},
      {.out = out[g], .o2 = o2[g], .lse = lse[g], .q = q[g], .k = k[g], .v = v[g], .lambda = lambda[g], .scale = 0.1});
  std::vector<std::vector<double>> first;
  for (int run = 0; run < 2; ++run) {
    gpu().attention_bwd({}, {.dq = dq[g],
                             .dk = dk[g],
                             .dv = dvv[g],
                             .dlambda = dlambda[g],
                             .dout = dout[g],
                             .q = q[g],
                             .k = k[g],
                             .v = v[g],
                             .out = out[g],
                             .o2 = o2[g],
                             .lse = lse[g],
                             .lambda = lambda[g],
                             .scale = 0.1});
    std::vector<std::vector<double>> now{dq.device_values(), dk.device_values(), dvv.device_values(),
                                         dlambda.device_values()};
    if (run == 0) first = now;
    else
      for (size_t t = 0; t < now.size(); ++t) EXPECT_EQ(now[t], first[t]) << "output " << t;
  }
}

// ---------------------------------------------------------------- bf16 q, k, v

// got and want agree bitwise (as doubles: NaN never passes), guard bytes intact.
void expect_same(const Dual& got, const Dual& want, const std::string& what) {
  const std::vector<double> g = got.device_values(), w = want.device_values();
  ASSERT_EQ(g.size(), w.size());
  int64_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) bad += g[i] == w[i] ? 0 : 1;
  std::printf("[cuda-tc-attn] %-52s n=%-7zu %lld elements differ\n", what.c_str(), g.size(),
              static_cast<long long>(bad));
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
  const Dual q16 = bf16_copy(q, qk_shape, offset), k16 = bf16_copy(k, qk_shape, offset),
             v16 = bf16_copy(v, v_shape, offset);
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
    gpu().attention_fwd({}, {.out = o.out[g],
                             .o2 = o2,
                             .lse = o.lse[g],
                             .q = qt,
                             .k = kt,
                             .v = vt,
                             .lambda = lam,
                             .scale = 0.1,
                             .differential = c.differential});
    gpu().attention_bwd({}, {.dq = o.dq[g],
                             .dk = o.dk[g],
                             .dv = o.dv[g],
                             .dlambda = c.differential ? o.dlambda[g] : Tensor{},
                             .dout = dout[g],
                             .q = qt,
                             .k = kt,
                             .v = vt,
                             .out = o.out[g],
                             .o2 = o2,
                             .lse = o.lse[g],
                             .lambda = lam,
                             .scale = 0.1,
                             .differential = c.differential});
    gpu().synchronize({});
  };
  const auto outputs = [&] {
    return Outputs{Dual(out_shape), Dual(out_shape), Dual(Shape{B, H, T}), Dual(qk_shape),
                   Dual(qk_shape),  Dual(v_shape),   Dual(Shape{1})};
  };
  Outputs f32_in = outputs(), bf16_in = outputs();
  run(q[g], k[g], v[g], f32_in);
  run(q16v, k16v, v16v, bf16_in);
  const std::pair<const Dual Outputs::*, const char*> fields[] = {
      {&Outputs::out, "out"}, {&Outputs::o2, "o2"}, {&Outputs::lse, "lse"},        {&Outputs::dq, "dq"},
      {&Outputs::dk, "dk"},   {&Outputs::dv, "dv"}, {&Outputs::dlambda, "dlambda"}};
  for (const auto& [field, name] : fields) {
    if (!c.differential && (std::string(name) == "o2" || std::string(name) == "dlambda"))
      continue;  // unused when plain
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
    gpu().attention_fwd({}, {.out = out[g],
                             .o2 = o2t,
                             .lse = lse[g],
                             .q = q16[g],
                             .k = k16[g],
                             .v = v16[g],
                             .lambda = lam,
                             .scale = 0.1,
                             .differential = diff});
    // qkv16: the bf16 q, k, v (else the f32 ones, which the kernels round themselves).
    const auto bwd = [&](const Dual& dq_t, const Dual& dk_t, const Dual& dv_t, const Dual& dl_t, bool qkv16) {
      gpu().attention_bwd({}, {.dq = dq_t[g],
                               .dk = dk_t[g],
                               .dv = dv_t[g],
                               .dlambda = diff ? dl_t[g] : Tensor{},
                               .dout = dout[g],
                               .q = qkv16 ? q16[g] : q[g],
                               .k = qkv16 ? k16[g] : k[g],
                               .v = qkv16 ? v16[g] : v[g],
                               .out = out[g],
                               .o2 = o2t,
                               .lse = lse[g],
                               .lambda = lam,
                               .scale = 0.1,
                               .differential = diff});
    };
    for (Dual* d16 : {&dq16, &dk16, &dv16}) d16->poison();
    bwd(dq, dk, dv, dlambda, true);
    bwd(dq16, dk16, dv16, dlambda2, true);
    gpu().synchronize({});
    const std::string tag = diff ? "differential" : "plain";
    for (const auto& [f32_grad, bf16_grad, name] :
         {std::tuple{&dq, &dq16, "dq"}, std::tuple{&dk, &dk16, "dk"}, std::tuple{&dv, &dv16, "dv"}}) {
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

// ---------------------------------------------------------------- bf16 q, k, v on every path

// The tensor-core path against the CPU given the same bf16 q, k, v (both widen them exactly; the
// GPU rounds P, dS, dout only): the file comment's bound.
TEST(CudaTcAttention, Bf16InputsAgainstTheCpu) {
  DIFFMOE_REQUIRE_CUDA();
  for (bool diff : {true, false}) {
    check_tc_attention({2, 131, 4, 96, diff ? 64 : 128, diff}, true);
    check_tc_attention({3, 17, 4, 32, diff ? 16 : 32, diff}, true);
  }
}

using AttnKernel = CudaBackend::AttentionKernel;

// Selects the GPU's attention kernels for one scope, restoring the default after.
class KernelScope {
 public:
  explicit KernelScope(AttnKernel k) : be_(dynamic_cast<CudaBackend&>(gpu())) { be_.set_attention_kernel(k); }
  ~KernelScope() { be_.set_attention_kernel(AttnKernel::kFlash); }
  KernelScope(const KernelScope&) = delete;
  KernelScope& operator=(const KernelScope&) = delete;

 private:
  CudaBackend& be_;
};

// One path that is not the tensor-core kernels: the f32 mode, or kSimple, or a shape they do not
// cover (d_qk 7, d_v 5: only the simple kernels).
struct PathCase {
  TcCase c;
  bool bf16_mode;
  AttnKernel kernel;
  bool deterministic;  // the flash kernels (no atomics); the simple backward adds dk, dv atomically
  const char* path;
};

// bf16 q, k, v (and bf16 dq, dk, dv) on such a path: the f32 kernels read q, k, v widened exactly
// (the backend's operand buffer), so
// - forward outputs, dq and dλ (and dk, dv on the deterministic flash kernels) are bitwise the same
//   call's on f32 tensors holding the widened values;
// - against the CPU on the same bf16 tensors: cuda_vs_cpu.cpp's kAttnTol (f32 softmax and sums in
//   another order), dλ its f64 sum of the same products;
// - bf16 dq, dk, dv: the CPU's bf16 gradients within kAttnTol plus one bf16 step; dq (one writer)
//   and, on the flash kernels, dk and dv are bitwise the f32 gradients of the same call rounded.
void check_bf16_path(const PathCase& pc) {
  constexpr Tol kAttnTol{1e-4, 1e-5, "f32 softmax and sums in another order (cuda_vs_cpu.cpp)"};
  const Tol kDlambdaTol{1e-6, 1e-7, "f64 sum of the same products"};
  std::optional<Bf16Mode> mode;
  if (pc.bf16_mode) mode.emplace();
  const KernelScope kernel(pc.kernel);
  const TcCase& c = pc.c;
  const bool diff = c.differential;
  const int64_t C = diff ? 2 : 1;
  const Shape qk_shape{c.B, c.T, c.H, c.dqk}, v_shape{c.B, c.T, c.H, c.dv}, out_shape{c.B, c.T, c.H / C, C * c.dv};
  Dual q(qk_shape), k(qk_shape), v(v_shape), lambda(Shape{1}), dout(out_shape);
  q.normal(140);
  k.normal(141);
  v.normal(142);
  dout.normal(143);
  lambda.set({0.3});
  const Dual q16 = bf16_copy(q, qk_shape), k16 = bf16_copy(k, qk_shape), v16 = bf16_copy(v, v_shape);
  const auto widened = [](const Dual& d16, const Shape& shape) {
    Dual r(shape);
    r.set(d16.host_values());
    return r;
  };
  const Dual qw = widened(q16, qk_shape), kw = widened(k16, qk_shape), vw = widened(v16, v_shape);
  const std::string tag =
      fmt::format("{}: B={} T={} H={} dqk={} dv={} {}", pc.path, c.B, c.T, c.H, c.dqk, c.dv, diff ? "diff" : "plain");
  const Side g = Side::kGpu;

  // Forward: bf16 inputs on both sides; the widened f32 inputs on the GPU.
  Dual out(out_shape), o2(out_shape), lse(Shape{c.B, c.H, c.T}), out_w(out_shape), o2_w(out_shape),
      lse_w(Shape{c.B, c.H, c.T});
  for (Dual* d : {&out, &o2, &lse, &out_w, &o2_w, &lse_w}) d->poison();
  const auto fwd = [&](Backend& be, Side s, const Dual& tq, const Dual& tk, const Dual& tv, const Dual& o,
                       const Dual& o2t, const Dual& l) {
    be.attention_fwd({}, {.out = o[s],
                          .o2 = diff ? o2t[s] : Tensor{},
                          .lse = l[s],
                          .q = tq[s],
                          .k = tk[s],
                          .v = tv[s],
                          .lambda = diff ? lambda[s] : Tensor{},
                          .scale = 0.2,
                          .differential = diff});
  };
  run_both([&](Backend& be, Side s) { fwd(be, s, q16, k16, v16, out, o2, lse); });
  fwd(gpu(), g, qw, kw, vw, out_w, o2_w, lse_w);
  gpu().synchronize({});
  expect_close(out, kAttnTol, "bf16 q,k,v fwd out, " + tag);
  expect_close(lse, kAttnTol, "bf16 q,k,v fwd lse, " + tag);
  if (diff) expect_close(o2, kAttnTol, "bf16 q,k,v fwd o2, " + tag);
  EXPECT_TRUE(out.device_values() == out_w.device_values()) << tag << ": out is not the widened f32 call's";
  EXPECT_TRUE(lse.device_values() == lse_w.device_values()) << tag << ": lse is not the widened f32 call's";
  if (diff) {
    EXPECT_TRUE(o2.device_values() == o2_w.device_values()) << tag << ": o2 is not the widened f32 call's";
  }
  for (const Dual* in : {&q16, &k16, &v16}) {
    EXPECT_TRUE(in->device_values() == in->host_values()) << tag << ": an input was written";
  }

  // Backward from the CPU's forward outputs on both sides.
  out.to_gpu();
  o2.to_gpu();
  lse.to_gpu();
  const auto bwd = [&](Backend& be, Side s, const Dual& tq, const Dual& tk, const Dual& tv, const Dual& dq,
                       const Dual& dk, const Dual& dv, const Dual& dl) {
    be.attention_bwd({}, {.dq = dq[s],
                          .dk = dk[s],
                          .dv = dv[s],
                          .dlambda = diff ? dl[s] : Tensor{},
                          .dout = dout[s],
                          .q = tq[s],
                          .k = tk[s],
                          .v = tv[s],
                          .out = out[s],
                          .o2 = diff ? o2[s] : Tensor{},
                          .lse = lse[s],
                          .lambda = diff ? lambda[s] : Tensor{},
                          .scale = 0.2,
                          .differential = diff});
  };
  Dual dq(qk_shape), dk(qk_shape), dv(v_shape), dl(Shape{1}), dq_w(qk_shape), dk_w(qk_shape), dv_w(v_shape),
      dl_w(Shape{1});
  Dual dq16(qk_shape, DType::kBF16), dk16(qk_shape, DType::kBF16), dv16(v_shape, DType::kBF16), dl16(Shape{1});
  for (Dual* d : {&dq, &dk, &dv, &dl, &dq_w, &dk_w, &dv_w, &dl_w, &dq16, &dk16, &dv16, &dl16}) d->poison();
  run_both([&](Backend& be, Side s) {
    bwd(be, s, q16, k16, v16, dq, dk, dv, dl);
    bwd(be, s, q16, k16, v16, dq16, dk16, dv16, dl16);
  });
  bwd(gpu(), g, qw, kw, vw, dq_w, dk_w, dv_w, dl_w);
  gpu().synchronize({});
  expect_close(dq, kAttnTol, "bf16 q,k,v bwd dq, " + tag);
  expect_close(dk, kAttnTol, "bf16 q,k,v bwd dk, " + tag);
  expect_close(dv, kAttnTol, "bf16 q,k,v bwd dv, " + tag);
  expect_bf16_close(dq16, kAttnTol, "bf16 dq, " + tag);
  expect_bf16_close(dk16, kAttnTol, "bf16 dk, " + tag);
  expect_bf16_close(dv16, kAttnTol, "bf16 dv, " + tag);
  if (diff) {
    expect_close(dl, kDlambdaTol, "bf16 q,k,v bwd dlambda, " + tag);
    expect_close(dl16, kDlambdaTol, "bf16 q,k,v bwd dlambda beside bf16 gradients, " + tag);
    EXPECT_TRUE(dl.device_values() == dl_w.device_values()) << tag << ": dlambda is not the widened f32 call's";
  }
  EXPECT_TRUE(dq.device_values() == dq_w.device_values()) << tag << ": dq is not the widened f32 call's";
  const auto rounded_equal = [](const Dual& d16, const Dual& d32) {
    const std::vector<double> h = d16.device_values(), f = d32.device_values();
    int64_t bad = 0;
    for (size_t i = 0; i < f.size(); ++i) bad += h[i] == bf16_to_f32(f32_to_bf16(static_cast<float>(f[i]))) ? 0 : 1;
    return bad;
  };
  EXPECT_EQ(rounded_equal(dq16, dq), 0) << tag << ": the bf16 dq is not the f32 dq rounded";
  if (pc.deterministic) {
    EXPECT_TRUE(dk.device_values() == dk_w.device_values()) << tag << ": dk is not the widened f32 call's";
    EXPECT_TRUE(dv.device_values() == dv_w.device_values()) << tag << ": dv is not the widened f32 call's";
    EXPECT_EQ(rounded_equal(dk16, dk), 0) << tag << ": the bf16 dk is not the f32 dk rounded";
    EXPECT_EQ(rounded_equal(dv16, dv), 0) << tag << ": the bf16 dv is not the f32 dv rounded";
  }
}

TEST(CudaTcAttention, Bf16InputsOnEveryOtherPath) {
  DIFFMOE_REQUIRE_CUDA();
  const PathCase cases[] = {
      {{2, 37, 4, 96, 64, true}, false, AttnKernel::kFlash, true, "f32 mode, flash kernels"},
      {{2, 37, 3, 96, 64, false}, false, AttnKernel::kFlash, true, "f32 mode, flash kernels"},
      {{2, 37, 4, 7, 5, true}, false, AttnKernel::kFlash, false, "f32 mode, an uncovered shape: simple kernels"},
      // T = 19 as cuda_vs_cpu.cpp's WideHeadsSimpleKernel (where kAttnTol was measured for these heads).
      {{1, 19, 2, 96, 64, true}, true, AttnKernel::kSimple, false, "bf16 mode, kSimple"},
      {{2, 37, 4, 7, 5, true}, true, AttnKernel::kFlash, false, "bf16 mode, uncovered by the tensor cores: simple"},
      {{2, 37, 3, 7, 5, false}, true, AttnKernel::kFlash, false, "bf16 mode, uncovered by the tensor cores: simple"},
  };
  for (const PathCase& pc : cases) check_bf16_path(pc);
}

}  // namespace
}  // namespace diffmoe::cudatest
