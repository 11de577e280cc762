// GEMM, grouped GEMM and the grouped weight-gradient GEMM on the GPU, through cuBLAS SGEMM in plain
// f32 (the backend's handle uses CUBLAS_DEFAULT_MATH: no TF32).
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
#include <climits>

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

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C with leading dimensions (elements per stored row).
void sgemm_row_major(CudaBackend& be, cudaStream_t s, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                     double alpha, const float* a, int64_t lda, const float* b, int64_t ldb, double beta, float* c,
                     int64_t ldc, std::string_view op) {
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
  CUBLAS_CHECK(cublasSgemm(be.cublas(s), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                           i(n), i(m), i(k), &alpha32, b, i(ldb), a, i(lda), &beta32, c, i(ldc)));
}

}  // namespace

// C = alpha·op(A)·op(B) + beta·C;  op(A) [m,k], op(B) [k,n], C [m,n].
void CudaBackend::gemm(Context ctx, const GemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "gemm");
  const GemmDims d = validate_gemm(a, Device::kCUDA);
  require_f32(a.c, "gemm");
  sgemm_row_major(*this, stream(ctx), a.trans_a, a.trans_b, d.m, d.n, d.k, a.alpha, f32(a.a), a.a.dim(1), f32(a.b),
                  a.b.dim(1), a.beta, f32(a.c), d.n, "gemm");
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
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    if (r1 == r0) continue;  // empty group: its (zero) rows stay as they are
    sgemm_row_major(*this, s, false, a.trans_b, r1 - r0, d.n, d.k, a.alpha, f32(a.a) + r0 * d.k, d.k,
                    f32(a.b) + g * d.n * d.k, ldb, a.beta, f32(a.c) + r0 * d.n, d.n, kOp);
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
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    // An empty group is a k = 0 product: beta·C[g].
    sgemm_row_major(*this, s, true, false, d.m, d.n, r1 - r0, a.alpha, f32(a.a) + r0 * d.m, d.m, f32(a.b) + r0 * d.n,
                    d.n, a.beta, f32(a.c) + g * d.m * d.n, d.n, kOp);
  }
}

}  // namespace diffmoe
