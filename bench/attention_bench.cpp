// Simple vs flash attention kernels on the bench preset's attention shape (B 8, T 2048, 16
// component heads = 8 differential heads, d_qk 96, d_v 64, f32): median device time of forward and
// backward, and the flash results against the simple ones (‖flash − simple‖ / ‖simple‖; both are
// checked against the CPU at small sizes in tests/ops/cuda_vs_cpu.cpp). Then the tensor-core
// kernels (GemmPrecision::kBF16, tc_attention.cuh; checked against the CPU in
// tests/ops/cuda_tc_attention.cpp) at the same shape, against the flash results: once with f32 q, k,
// v (the op rounds them to bf16 first, 3 conversions per call) and once with bf16 q, k, v (as the
// model saves them in the bf16 mode: no conversions; bitwise the same results).
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "core/arena.h"
#include "device_timing.h"
#include "ops_bench.h"

namespace diffmoe::bench {
namespace {

using AttnKernel = CudaBackend::AttentionKernel;

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::isnan(num) ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}

struct Result {
  double fwd_ms = 0.0, bwd_ms = 0.0;
  std::vector<std::vector<float>> values;  // out, o2, lse, dq, dk, dv, dlambda
};

}  // namespace

int bench_attention(CudaBackend& be) {
  const AttnKernel saved = be.attention_kernel();
  const int64_t B = 8, T = 2048, H = 16, dqk = 96, dv = 64;
  const Shape qk_shape{B, T, H, dqk}, v_shape{B, T, H, dv}, out_shape{B, T, H / 2, 2 * dv};
  Arena a;
  for (const char* name : {"q", "k", "dq", "dk"}) a.add(name, qk_shape, DType::kF32);
  for (const char* name : {"v", "dv"}) a.add(name, v_shape, DType::kF32);
  for (const char* name : {"out", "o2", "dout"}) a.add(name, out_shape, DType::kF32);
  a.add("q16", qk_shape, DType::kBF16);
  a.add("k16", qk_shape, DType::kBF16);
  a.add("v16", v_shape, DType::kBF16);
  a.add("lse", Shape{B, H, T}, DType::kF32);
  a.add("lambda", Shape{1}, DType::kF32);
  a.add("dlambda", Shape{1}, DType::kF32);
  a.allocate(be.allocator());
  const auto t = [&](const char* name) { return a.get(name); };
  fill_normal(be, t("q"), 80);
  fill_normal(be, t("k"), 81);
  fill_normal(be, t("v"), 82);
  fill_normal(be, t("dout"), 83);
  fill_normal(be, t("q16"), 80);  // the same values rounded to bf16
  fill_normal(be, t("k16"), 81);
  fill_normal(be, t("v16"), 82);
  const float lambda = 0.3f;
  be.upload(t("lambda"), &lambda);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dqk));
  const Tensor out = t("out"), o2 = t("o2"), lse = t("lse"), dout = t("dout"), lam = t("lambda");
  const Tensor dq = t("dq"), dk = t("dk"), dvv = t("dv"), dlam = t("dlambda");
  Tensor q, k, v;  // the q, k, v the calls read: f32, or the bf16 copies
  const auto fwd = [&] {
    be.attention_fwd({}, {.out = out, .o2 = o2, .lse = lse, .q = q, .k = k, .v = v, .lambda = lam, .scale = scale});
  };
  const auto bwd = [&] {
    be.attention_bwd({}, {.dq = dq,
                          .dk = dk,
                          .dv = dvv,
                          .dlambda = dlam,
                          .dout = dout,
                          .q = q,
                          .k = k,
                          .v = v,
                          .out = out,
                          .o2 = o2,
                          .lse = lse,
                          .lambda = lam,
                          .scale = scale});
  };
  const auto run = [&](AttnKernel kernel, int reps, GemmPrecision precision, bool bf16_qkv) {
    be.set_attention_kernel(kernel);
    be.set_gemm_precision(precision);
    q = t(bf16_qkv ? "q16" : "q");
    k = t(bf16_qkv ? "k16" : "k");
    v = t(bf16_qkv ? "v16" : "v");
    Result r;
    r.fwd_ms = median_ms(reps, fwd);
    r.bwd_ms = median_ms(reps, bwd);  // reads this kernel's forward outputs
    for (const char* name : {"out", "o2", "lse", "dq", "dk", "dv", "dlambda"})
      r.values.push_back(device_values(be, t(name)));
    return r;
  };
  const Result simple = run(AttnKernel::kSimple, 3, GemmPrecision::kF32, false);
  const Result flash = run(AttnKernel::kFlash, 10, GemmPrecision::kF32, false);
  const Result tc = run(AttnKernel::kFlash, 10, GemmPrecision::kBF16, false);
  const Result tc16 = run(AttnKernel::kFlash, 10, GemmPrecision::kBF16, true);
  be.set_attention_kernel(saved);
  be.set_gemm_precision(GemmPrecision::kF32);

  int failures = 0;
  const char* names[] = {"out", "o2", "lse", "dq", "dk", "dv", "dlambda"};
  for (size_t i = 0; i < flash.values.size(); ++i) {
    const double e = rel_err(flash.values[i], simple.values[i]);
    // f32 sums in another order over up to 2048 terms: far under the 1e-4 element budget.
    const bool bad = !(e < 1e-5);
    fmt::print("  flash vs simple {:<8} rel. error {:.3e}{}\n", names[i], e, bad ? "  <-- FAIL (bound 1e-5)" : "");
    failures += bad ? 1 : 0;
  }
  for (size_t i = 0; i + 1 < tc.values.size(); ++i) {  // dλ: a sum of random-sign terms (cuda_tc_attention.cpp)
    const double e = rel_err(tc.values[i], flash.values[i]);
    // bf16 operands, f32 accumulation: the policy's bf16 bound (cuda_tc_attention.cpp says why).
    const bool bad = !(e < 1e-2);
    fmt::print("  tc vs flash     {:<8} rel. error {:.3e}{}\n", names[i], e, bad ? "  <-- FAIL (bound 1e-2)" : "");
    failures += bad ? 1 : 0;
  }
  for (size_t i = 0; i < tc.values.size(); ++i) {  // the kernels saw the same bf16 operands
    if (tc16.values[i] == tc.values[i]) continue;
    fmt::print("  tc, bf16 q/k/v vs tc: {} is not bitwise the same  <-- FAIL\n", names[i]);
    ++failures;
  }
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
  return failures;
}

}  // namespace diffmoe::bench
