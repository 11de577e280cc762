// fp8_gemm on the GPU (op_args.h; docs/model.md §7, docs/derivations.md §6.1, §6.3): cuBLASLt's block-scaled FP8 GEMM
// (lt_gemm.h: plans cached by shape, timed candidates), Hopper only.
//
// The row-major C[M, N] = Â·B̂ᵀ (A [M, K], B [N, K], both K-major) is the column-major
// Cᵀ[N, M] = op(B')·B'' with B' = our B read column-major as [K, N] and transposed (op T) and B'' =
// our A read column-major as [K, M] (op N): cuBLASLt's A is our B and its B our A, every leading
// dimension K, and D's is N. That is the "TN" layout, the only one Hopper's FP8 tensor cores take, so
// no operand is copied. Scales (op_args.h's layouts are cuBLASLt's): our B's go with cuBLASLt's A in
// 128×128 blocks (BLK128x128_32F) or 1×128 tiles (VEC128_32F), our A's with its B as 1×128 tiles.
// cuBLASLt's FP8 rules, checked here with messages that name them: K a multiple of 16 (rows of 16-byte
// multiples), M and N multiples of 8, every tensor 16-byte aligned; compute capability 9.x.
// An empty sum (K = 0) is C = beta·addend through fill / copy / scale.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// The current device's compute capability (major, minor), read once per process (the backend drives
// one device).
std::pair<int, int> compute_capability() {
  static const std::pair<int, int> cc = [] {
    int dev = 0, major = 0, minor = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    return std::pair{major, minor};
  }();
  return cc;
}

void check_aligned16(const Tensor& t, std::string_view name) {
  DIFFMOE_CHECK(reinterpret_cast<uintptr_t>(t.data) % 16 == 0,
                "[fp8_gemm] {} {} starts {} bytes past a 16-byte boundary: cuBLASLt's FP8 GEMM needs 16-byte aligned "
                "tensors (pass a view that starts on one)",
                name, t.describe(), reinterpret_cast<uintptr_t>(t.data) % 16);
}

}  // namespace

void CudaBackend::fp8_gemm(Context ctx, const Fp8GemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "fp8_gemm");
  const auto [m, n, k] = validate_fp8_gemm(a, Device::kCUDA);
  if (m == 0 || n == 0) return;
  const Tensor& addend = a.addend.defined() ? a.addend : a.c;
  if (k == 0) {  // an empty sum: C = beta·addend (not read when beta = 0)
    if (a.beta == 0.0) return fill(ctx, {.out = a.c, .value = 0.0});
    if (addend.data != a.c.data) copy(ctx, {.dst = a.c, .src = addend});
    if (a.beta != 1.0) scale(ctx, {.y = a.c, .alpha = a.beta});
    return;
  }
  const auto [major, minor] = compute_capability();
  DIFFMOE_CHECK(major == 9,
                "[fp8_gemm] cuBLASLt's 1×128 / 128×128 block-scaled FP8 GEMM runs on compute capability 9.x "
                "(Hopper); this device is {}.{}",
                major, minor);
  DIFFMOE_CHECK(k % 16 == 0 && m % 8 == 0 && n % 8 == 0,
                "[fp8_gemm] M = {}, N = {}, K = {}: cuBLASLt's FP8 GEMM needs K a multiple of 16 (K-major rows of "
                "16-byte multiples) and M, N multiples of 8 (pad the tensors)",
                m, n, k);
  check_aligned16(a.a, "a");
  check_aligned16(a.b, "b");
  check_aligned16(a.a_scale, "a_scale");
  check_aligned16(a.b_scale, "b_scale");
  check_aligned16(a.c, "c");
  if (a.beta != 0.0) check_aligned16(addend, "addend");
  const bool blocks = a.b_scaling == Fp8Scaling::kBlock128x128;
  lt_gemm().run(LtGemmCall{.trans_a = true,
                           .trans_b = false,
                           .m = n,
                           .n = m,
                           .k = k,
                           .lda = k,
                           .ldb = k,
                           .ldc = n,
                           .a = a.b.data,
                           .b = a.a.data,
                           .c = addend.data,
                           .d = a.c.data,
                           .ab_type = CUDA_R_8F_E4M3,
                           .cd_type = a.c.dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F,
                           .alpha = static_cast<float>(a.alpha),
                           .beta = static_cast<float>(a.beta),
                           .op = "fp8_gemm",
                           .block_scaled = true,
                           .a_scale_mode = blocks ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                  : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                           .b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                           .a_scale = a.b_scale.data,
                           .b_scale = a.a_scale.data},
                stream(ctx));
}

}  // namespace diffmoe
