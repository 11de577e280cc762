// Old (simple) vs new (flash) attention kernels on the bench preset's attention shape (B 8, T 2048,
// 16 component heads = 8 differential heads, d_qk 96, d_v 64, f32): median device time of forward
// and backward, and the flash results against the simple ones (‖flash − simple‖ / ‖simple‖; both
// are checked against the CPU at small sizes in cuda_vs_cpu.cpp). Then the tensor-core kernels
// (GemmPrecision::kBF16, tc_attention.cuh; checked against the CPU in cuda_tc_attention.cpp) at the
// same shape, against the flash results: once with f32 q, k, v (the op rounds them to bf16 first,
// 3 conversions per call) and once with bf16 q, k, v (as the model saves them in the bf16 mode:
// no conversions; bitwise the same results). Disabled by default (seconds of GPU time); run with
//   test_cuda_ops --gtest_also_run_disabled_tests --gtest_filter='CudaAttentionTiming.*'
#include <cuda_runtime_api.h>
#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "cuda_dual.h"
#include "cuda_timing.h"

namespace diffmoe::cudatest {
namespace {

using AttnKernel = CudaBackend::AttentionKernel;

double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::isnan(num) ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}

TEST(CudaAttentionTiming, DISABLED_BenchShape) {
  auto& be = dynamic_cast<CudaBackend&>(gpu());
  const AttnKernel saved = be.attention_kernel();
  const int64_t B = 8, T = 2048, H = 16, dqk = 96, dv = 64;
  const Shape out_shape{B, T, H / 2, 2 * dv};
  Dual q(Shape{B, T, H, dqk}), k(Shape{B, T, H, dqk}), v(Shape{B, T, H, dv}), lambda(Shape{1});
  Dual out(out_shape), o2(out_shape), lse(Shape{B, H, T}), dout(out_shape);
  Dual dq(Shape{B, T, H, dqk}), dk(Shape{B, T, H, dqk}), dvv(Shape{B, T, H, dv}), dlambda(Shape{1});
  q.normal(80);
  k.normal(81);
  v.normal(82);
  dout.normal(83);
  lambda.set({0.3});
  const Dual q16 = bf16_copy(q, q.host().shape), k16 = bf16_copy(k, k.host().shape), v16 = bf16_copy(v, v.host().shape);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dqk));
  const Side g = Side::kGpu;
  bool bf16_inputs = false;  // which q, k, v the calls read
  auto qkv = [&](const Dual& d32, const Dual& d16) { return bf16_inputs ? d16[g] : d32[g]; };
  auto fwd = [&] {
    gpu().attention_fwd({}, {.out = out[g], .o2 = o2[g], .lse = lse[g], .q = qkv(q, q16), .k = qkv(k, k16),
                             .v = qkv(v, v16), .lambda = lambda[g], .scale = scale});
  };
  auto bwd = [&] {
    gpu().attention_bwd({}, {.dq = dq[g], .dk = dk[g], .dv = dvv[g], .dlambda = dlambda[g], .dout = dout[g],
                             .q = qkv(q, q16), .k = qkv(k, k16), .v = qkv(v, v16), .out = out[g], .o2 = o2[g],
                             .lse = lse[g], .lambda = lambda[g], .scale = scale});
  };
  struct Result {
    double fwd_ms, bwd_ms;
    std::vector<std::vector<double>> values;  // out, o2, lse, dq, dk, dv, dlambda
  };
  auto run = [&](AttnKernel kernel, int reps, GemmPrecision precision = GemmPrecision::kF32, bool bf16_qkv = false) {
    be.set_attention_kernel(kernel);
    be.set_gemm_precision(precision);
    bf16_inputs = bf16_qkv;
    Result r{};
    r.fwd_ms = median_ms(reps, fwd);
    r.bwd_ms = median_ms(reps, bwd);  // reads this kernel's forward outputs
    r.values = {out.device_values(), o2.device_values(), lse.device_values(), dq.device_values(),
                dk.device_values(), dvv.device_values(), dlambda.device_values()};
    return r;
  };
  const Result simple = run(AttnKernel::kSimple, 3);
  const Result flash = run(AttnKernel::kFlash, 10);
  const Result tc = run(AttnKernel::kFlash, 10, GemmPrecision::kBF16);
  const Result tc16 = run(AttnKernel::kFlash, 10, GemmPrecision::kBF16, true);
  be.set_attention_kernel(saved);
  be.set_gemm_precision(GemmPrecision::kF32);
  const char* names[] = {"out", "o2", "lse", "dq", "dk", "dv", "dlambda"};
  for (size_t i = 0; i < flash.values.size(); ++i) {
    const double e = rel_err(flash.values[i], simple.values[i]);
    fmt::print("  flash vs simple {:<8} rel. error {:.3e}\n", names[i], e);
    // f32 sums in another order over up to 2048 terms: far under the 1e-4 element budget.
    EXPECT_LT(e, 1e-5) << names[i];
  }
  for (size_t i = 0; i + 1 < tc.values.size(); ++i) {  // dλ: a sum of random-sign terms (cuda_tc_attention.cpp)
    const double e = rel_err(tc.values[i], flash.values[i]);
    fmt::print("  tc vs flash     {:<8} rel. error {:.3e}\n", names[i], e);
    // bf16 operands, f32 accumulation: the policy's bf16 bound (cuda_tc_attention.cpp says why).
    EXPECT_LT(e, 1e-2) << names[i];
  }
  for (size_t i = 0; i < tc.values.size(); ++i)  // the kernels saw the same bf16 operands
    EXPECT_TRUE(tc16.values[i] == tc.values[i]) << "tc, bf16 q/k/v vs tc: " << names[i] << " is not bitwise the same";
  // The table last: tools/gpu-check.sh shows the log's last lines.
  fmt::print("[attention timing] B {} T {} H {} d_qk {} d_v {} differential (median ms)\n", B, T, H, dqk, dv);
  fmt::print("  {:<16} {:>10} {:>10} {:>10}\n", "kernel", "forward", "backward", "sum");
  const auto row = [](const char* name, const Result& r, const char* note) {
    fmt::print("  {:<16} {:>10.3f} {:>10.3f} {:>10.3f}{}\n", name, r.fwd_ms, r.bwd_ms, r.fwd_ms + r.bwd_ms, note);
  };
  row("simple", simple, "");
  row("flash", flash, "");
  row("tc", tc, "   (bf16 tensor cores, f32 q/k/v: incl. the f32->bf16 copies)");
  row("tc, bf16 q/k/v", tc16, "   (q, k, v bf16 as the model saves them: no copies)");
}

}  // namespace
}  // namespace diffmoe::cudatest
