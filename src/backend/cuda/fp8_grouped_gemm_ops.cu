// fp8_grouped_gemm and fp8_grouped_gemm_wgrad on the GPU (op_args.h; docs/model.md §7,
// docs/derivations.md §6.3): the routed experts' FP8 Fprop, Dgrad and Wgrad, every group in one launch
// of the Hopper kernels in grouped_gemm_fp8.cuh (TMA + wgmma, partial sums promoted to f32 per
// 128-wide k-tile). The kernels read the offsets on the device: no host synchronisation, so the ops
// can be captured in a graph. Bad offsets are recorded in the backend's DeviceIssue and their groups
// skipped, as the bf16 grouped kernels do.
#include <fmt/format.h>

#include <climits>
#include <cstdint>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "backend/cuda/sum_squares.h"
#include "backend/op_validation.h"

namespace diffmoe {

void CudaBackend::fp8_grouped_gemm(Context ctx, const Fp8GroupedGemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "fp8_grouped_gemm");
  constexpr std::string_view kOp = "fp8_grouped_gemm";
  const Fp8GroupedGemmDims d = validate_fp8_grouped_gemm(a, Device::kCUDA);
  if (d.rows == 0 || d.n == 0 || d.groups == 0) return;
  for (const int64_t v : {d.rows, d.n, d.k, d.k2, d.groups})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the kernel's 32-bit index range", kOp, v);
  DIFFMOE_CHECK(cuda::grouped_hopper_usable(),
                "[{}] the FP8 grouped kernel runs on Hopper (compute capability 9.x, code built for sm_90a); this "
                "device or build has neither",
                kOp);
  const bool c_bf16 = a.c.dtype == DType::kBF16;
  const auto b_scale_ld = [](int64_t k) { return static_cast<int>(fp8_block_scale_cols(k)); };
  cuda::gg::Fp8GroupedParams p{.sched = {.c = c_bf16 ? nullptr : cuda::f32(a.c),
                                         .offsets = cuda::i32(a.offsets),
                                         .rows = static_cast<int>(d.rows),
                                         .groups = static_cast<int>(d.groups),
                                         .n = static_cast<int>(d.n),
                                         .k = static_cast<int>(d.k),
                                         .issue = reinterpret_cast<cuda::gg::GroupedGemmIssue*>(issue()),
                                         .issue_site = static_cast<int32_t>(IssueSite::kFp8GroupedGemmOffsets),
                                         .k2 = static_cast<int>(d.k2),
                                         .c16 = c_bf16 ? static_cast<__nv_bfloat16*>(a.c.data) : nullptr},
                               .a = static_cast<const uint8_t*>(a.a.data),
                               .b = static_cast<const uint8_t*>(a.b.data),
                               .a2 = d.two_terms ? static_cast<const uint8_t*>(a.a2.data) : nullptr,
                               .b2 = d.two_terms ? static_cast<const uint8_t*>(a.b2.data) : nullptr,
                               .a_scale = cuda::f32(a.a_scale),
                               .b_scale = cuda::f32(a.b_scale),
                               .a2_scale = d.two_terms ? cuda::f32(a.a2_scale) : nullptr,
                               .b2_scale = d.two_terms ? cuda::f32(a.b2_scale) : nullptr,
                               .b_scale_ld = b_scale_ld(d.k),
                               .b2_scale_ld = d.two_terms ? b_scale_ld(d.k2) : 0};
  const char* why_not = cuda::gg::grouped_gemm_fp8_unusable(p);
  DIFFMOE_CHECK(why_not == nullptr,
                "[{}] a {} × {} (K {}{}) over {} groups, c {}: {} (the FP8 grouped kernel needs K, K2 positive "
                "multiples of 16, N a multiple of 8, 16-byte aligned tensors)",
                kOp, d.rows, d.n, d.k, d.two_terms ? fmt::format(" + {}", d.k2) : "", d.groups, a.c.describe(),
                why_not);
  const cudaStream_t s = stream(ctx);
  const DetailScope detail(*this, s, [&] {
    return fmt::format("fp8 grouped kernel n{} k{}{}", d.n, d.k, d.two_terms ? fmt::format("+{}", d.k2) : "");
  });
  CUDA_CHECK(cuda::gg::launch_grouped_gemm_fp8(p, s));
}

void CudaBackend::fp8_grouped_gemm_wgrad(Context ctx, const Fp8GroupedGemmWgradArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "fp8_grouped_gemm_wgrad");
  constexpr std::string_view kOp = "fp8_grouped_gemm_wgrad";
  const Fp8GroupedWgradDims d = validate_fp8_grouped_gemm_wgrad(a, Device::kCUDA);
  if (d.groups == 0 || d.m == 0 || d.n == 0) return;
  for (const int64_t v : {d.m, d.n, d.groups, d.slots * kFp8Tile})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the kernel's 32-bit index range", kOp, v);
  DIFFMOE_CHECK(cuda::grouped_hopper_usable(),
                "[{}] the FP8 grouped kernel runs on Hopper (compute capability 9.x, code built for sm_90a); this "
                "device or build has neither",
                kOp);
  const int width = static_cast<int>(d.slots * kFp8Tile);
  const cuda::gg::Fp8WgradParams p{
      .sched = {.c = cuda::f32(a.c),
                .offsets = cuda::i32(a.offsets),
                .rows = width,  // a bound on offsets[G]: the copies hold at most 128·T rows
                .groups = static_cast<int>(d.groups),
                .m = static_cast<int>(d.m),
                .n = static_cast<int>(d.n),
                .beta = static_cast<float>(a.beta),
                .issue = reinterpret_cast<cuda::gg::GroupedGemmIssue*>(issue()),
                .issue_site = static_cast<int32_t>(IssueSite::kFp8GroupedGemmWgradOffsets)},
      .a = static_cast<const uint8_t*>(a.a.data),
      .b = static_cast<const uint8_t*>(a.b.data),
      .a_scale = cuda::f32(a.a_scale),
      .b_scale = cuda::f32(a.b_scale),
      .width = width,
      .slots = static_cast<int>(d.slots)};
  const char* why_not = cuda::gg::grouped_gemm_fp8_wgrad_unusable(p);
  DIFFMOE_CHECK(why_not == nullptr,
                "[{}] c {} from a {} and b {}: {} (the FP8 grouped weight-gradient kernel needs M, N multiples of 8 "
                "and 16-byte aligned tensors)",
                kOp, a.c.describe(), a.a.describe(), a.b.describe(), why_not);
  const cudaStream_t s = stream(ctx);
  // Σ C² (sum_sq): per-warp slots from the kernel's epilogue, added in a fixed order after it.
  const int64_t slots = cuda::gg::fp8_wgrad_sq_slots(p);
  double* sq_partial =
      a.sum_sq.defined() ? static_cast<double*>(scratch(static_cast<size_t>(slots) * sizeof(double))) : nullptr;
  {
    const DetailScope detail(*this, s, [&] { return fmt::format("fp8 grouped wgrad m{} n{} T{}", d.m, d.n, d.slots); });
    CUDA_CHECK(cuda::gg::launch_grouped_gemm_fp8_wgrad(p, s, sq_partial));
  }
  if (sq_partial != nullptr) cuda::launch_add_partial_sums(cuda::f32(a.sum_sq), sq_partial, slots, s);
}

}  // namespace diffmoe
