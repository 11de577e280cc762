// GEMM, grouped GEMM and the grouped weight-gradient GEMM on the GPU, through cuBLAS SGEMM in plain
// f32 (the backend's handle uses CUBLAS_DEFAULT_MATH: no TF32), or, under GemmPrecision::kBF16,
// with bf16 inputs on tensor cores: each op first rounds (to nearest even) the part of A and of B
// it reads to bf16 in the backend's bf16 buffer, keeping their layout and leading dimensions, then
// calls cublasGemmEx(bf16 A, bf16 B, f32 C, CUBLAS_COMPUTE_32F): products and sums in f32, alpha,
// beta and C in f32, so only the inputs lose precision (8-bit mantissa: relative 2^-9 each). One
// conversion per op and operand, also for the grouped ops, whose per-group calls index into it.
//
// Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix read as
// column-major is its transpose, so one cuBLAS call with the operands swapped computes it, with no
// copies: cublasSgemm(op_b, op_a, n, m, k, B, ldb, A, lda, C, ldc).
// BLAS semantics as on the CPU: beta = 0 does not read C (stale NaNs do not propagate), and an empty
// inner dimension (k = 0, or an empty group of the weight gradient) gives beta·C, done by a small
// kernel because cuBLAS rejects lda = 0.
//
// Grouped GEMMs (temporary, issue #4 milestone 1): the i32 offsets are read to the host with one
// cudaMemcpyAsync + stream sync, checked like the CPU does, then one SGEMM per non-empty group.
// That host sync is the one place this backend blocks inside an op; the grouped-GEMM milestone
// replaces it with a kernel that reads the offsets on the device.
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>
#include <tuple>
#include <utility>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

// C[m, n] (row stride ldc) = beta·C, without reading C when beta = 0.
__global__ void scale_matrix_kernel(float* c, int64_t m, int64_t n, int64_t ldc, double beta) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < m * n; i += int64_t{gridDim.x} * blockDim.x) {
    float* p = c + (i / n) * ldc + i % n;
    *p = beta == 0.0 ? 0.0f : static_cast<float>(beta * static_cast<double>(*p));
  }
}

// dst[i] = bf16(src[i]) for i < n, round to nearest even. 16-byte loads when src is 16-byte aligned
// (dst, carved from the bf16 buffer at 256-byte offsets, always is).
__global__ void f32_to_bf16_kernel(__nv_bfloat16* __restrict__ dst, const float* __restrict__ src, int64_t n,
                                   bool vec4) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t start = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i] = lo;
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i + 1] = hi;
    }
    start = n4 * 4;
  }
  for (int64_t i = start + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride)
    dst[i] = __float2bfloat16_rn(src[i]);
}

// An operand as cuBLAS reads it: f32 (the tensor itself) or bf16 (its converted copy).
struct Operand {
  const void* p;
  bool bf16;
  Operand at(int64_t offset) const {  // the same operand, `offset` elements in
    return {bf16 ? static_cast<const void*>(static_cast<const __nv_bfloat16*>(p) + offset)
                 : static_cast<const void*>(static_cast<const float*>(p) + offset),
            bf16};
  }
};

// The first na elements of a and nb of b as the op's operands: themselves under kF32; under kBF16
// their bf16 copies in the backend's bf16 buffer (grown to the largest call seen, never shrunk).
std::pair<Operand, Operand> gemm_operands(CudaBackend& be, cudaStream_t s, const float* a, int64_t na, const float* b,
                                          int64_t nb, std::string_view op) {
  if (be.gemm_precision() != GemmPrecision::kBF16) return {Operand{a, false}, Operand{b, false}};
  const size_t a_bytes = align256(static_cast<size_t>(na) * sizeof(__nv_bfloat16));
  char* buf = static_cast<char*>(be.gemm_bf16_scratch(a_bytes + static_cast<size_t>(nb) * sizeof(__nv_bfloat16)));
  auto* a16 = reinterpret_cast<__nv_bfloat16*>(buf);
  auto* b16 = reinterpret_cast<__nv_bfloat16*>(buf + a_bytes);
  for (const auto& [dst, src, n] : {std::tuple{a16, a, na}, std::tuple{b16, b, nb}}) {
    if (n == 0) continue;
    const bool vec4 = reinterpret_cast<uintptr_t>(src) % 16 == 0;
    f32_to_bf16_kernel<<<grid_for((n + 3) / 4), kThreads, 0, s>>>(dst, src, n, vec4);
    CUDA_CHECK_LAUNCH(op);
  }
  return {Operand{a16, true}, Operand{b16, true}};
}

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C with leading dimensions (elements per stored row);
// A and B both f32 (SGEMM) or both bf16 (GemmEx, f32 accumulation).
void gemm_row_major(CudaBackend& be, cudaStream_t s, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    double alpha, Operand a, int64_t lda, Operand b, int64_t ldb, double beta, float* c, int64_t ldc,
                    std::string_view op) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta·C
    if (beta == 1.0) return;
    scale_matrix_kernel<<<grid_for(m * n), kThreads, 0, s>>>(c, m, n, ldc, beta);
    CUDA_CHECK_LAUNCH(op);
    return;
  }
  for (int64_t v : {m, n, k, lda, ldb, ldc})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds cuBLAS's int range", op, v);
  const float alpha32 = static_cast<float>(alpha), beta32 = static_cast<float>(beta);
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (!a.bf16) {
    CUBLAS_CHECK(cublasSgemm(be.cublas(s), op_b, op_a, i(n), i(m), i(k), &alpha32, static_cast<const float*>(b.p),
                             i(ldb), static_cast<const float*>(a.p), i(lda), &beta32, c, i(ldc)));
    return;
  }
  CUBLAS_CHECK(cublasGemmEx(be.cublas(s), op_b, op_a, i(n), i(m), i(k), &alpha32, b.p, CUDA_R_16BF, i(ldb), a.p,
                            CUDA_R_16BF, i(lda), &beta32, c, CUDA_R_32F, i(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

// C = alpha·op(A)·op(B) + beta·C;  op(A) [m,k], op(B) [k,n], C [m,n].
void CudaBackend::gemm(Context ctx, const GemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "gemm");
  const GemmDims d = validate_gemm(a, Device::kCUDA);
  require_f32(a.c, "gemm");
  const cudaStream_t s = stream(ctx);
  const bool reads = d.m > 0 && d.n > 0 && d.k > 0;  // else C = beta·C (or nothing): no operand read
  const auto [op_a, op_b] = gemm_operands(*this, s, f32(a.a), reads ? a.a.numel() : 0, f32(a.b),
                                          reads ? a.b.numel() : 0, "gemm");
  gemm_row_major(*this, s, a.trans_a, a.trans_b, d.m, d.n, d.k, a.alpha, op_a, a.a.dim(1), op_b, a.b.dim(1), a.beta,
                 f32(a.c), d.n, "gemm");
}

// C[rows_g] = alpha · A[rows_g] · op(B[g]) + beta · C[rows_g];  rows ≥ offsets[G] untouched.
void CudaBackend::grouped_gemm(Context ctx, const GroupedGemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "grouped_gemm");
  constexpr std::string_view kOp = "grouped_gemm";
  const GroupedGemmDims d = validate_grouped_gemm(a, Device::kCUDA);
  require_f32(a.c, kOp);
  const cudaStream_t s = stream(ctx);
  const std::vector<int64_t> off = check_group_offsets(read_to_host(a.offsets, s), d.groups, d.rows, kOp);
  const int64_t ldb = a.trans_b ? d.k : d.n;
  // Only the rows in use (< offsets[G]) of A are read.
  const int64_t used = off[static_cast<size_t>(d.groups)];
  const auto [op_a, op_b] = gemm_operands(*this, s, f32(a.a), used == 0 ? 0 : used * d.k, f32(a.b),
                                          used == 0 ? 0 : d.groups * d.n * d.k, kOp);
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    if (r1 == r0) continue;  // empty group: its (zero) rows stay as they are
    gemm_row_major(*this, s, false, a.trans_b, r1 - r0, d.n, d.k, a.alpha, op_a.at(r0 * d.k), d.k,
                   op_b.at(g * d.n * d.k), ldb, a.beta, f32(a.c) + r0 * d.n, d.n, kOp);
  }
}

// C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g];  A [R,m], B [R,n], C [G,m,n].
void CudaBackend::grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "grouped_gemm_wgrad");
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  const GroupedGemmWgradDims d = validate_grouped_gemm_wgrad(a, Device::kCUDA);
  require_f32(a.c, kOp);
  const cudaStream_t s = stream(ctx);
  const std::vector<int64_t> off = check_group_offsets(read_to_host(a.offsets, s), d.groups, d.rows, kOp);
  // Only the rows in use (< offsets[G]) of A and B are read.
  const int64_t used = off[static_cast<size_t>(d.groups)];
  const auto [op_a, op_b] = gemm_operands(*this, s, f32(a.a), used * d.m, f32(a.b), used * d.n, kOp);
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    // An empty group is a k = 0 product: beta·C[g].
    gemm_row_major(*this, s, true, false, d.m, d.n, r1 - r0, a.alpha, op_a.at(r0 * d.m), d.m, op_b.at(r0 * d.n), d.n,
                   a.beta, f32(a.c) + g * d.m * d.n, d.n, kOp);
  }
}

}  // namespace diffmoe
