// GEMM, grouped GEMM and the grouped weight-gradient GEMM of the CPU reference backend, all through
// OpenBLAS (cblas_sgemm / cblas_dgemm, row-major). Grouped variants loop over groups on the host
// and make one BLAS call per non-empty group; OpenBLAS threads each call itself.
//
// BLAS semantics are kept throughout: with beta = 0 the output is not read (so stale NaNs in C do
// not propagate), and an empty inner dimension (k = 0) or an empty group gives beta·C. gemm's
// separate addend (GemmArgs::addend) is copied into C first, then added in place like C.
#include <cblas.h>

#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

// C[m,n] = beta·C without reading C when beta = 0 (BLAS convention); row stride ldc.
template <class T>
void scale_rows(T* c, int64_t m, int64_t n, int64_t ldc, double beta) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0 ? T(0) : static_cast<T>(beta * c[i * ldc + j]);
}

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C with leading dimensions (elements per stored row).
template <class T>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, double beta, T* c, int64_t ldc, std::string_view op) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // op(A)·op(B) is an empty sum; BLAS would also reject lda = 0 here
    scale_rows(c, m, n, ldc, beta);
    return;
  }
  for (int64_t v : {m, n, k, lda, ldb, ldc})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the BLAS integer range", op, v);
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  const auto i = [](int64_t v) { return static_cast<blasint>(v); };
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), static_cast<float>(alpha), a, i(lda), b, i(ldb),
                static_cast<float>(beta), c, i(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
  }
}

}  // namespace

// C = alpha·op(A)·op(B) + beta·addend (addend = C when not given);  op(A) [m,k], op(B) [k,n], C [m,n].
void CpuBackend::gemm(Context, const GemmArgs& a) {
  constexpr std::string_view kOp = "gemm";
  const DType dt = a.c.dtype;
  const auto [m, n, k] = validate_gemm(a, Device::kCPU);
  // A separate addend is copied into C, then BLAS adds the product in place with beta: the same
  // arithmetic as a copy op followed by a beta GEMM. With beta = 0 the addend is not read (BLAS rule).
  if (a.addend.defined() && a.addend.data != a.c.data && a.beta != 0.0 && a.c.numel() > 0)
    std::memcpy(a.c.data, a.addend.data, a.c.nbytes());
  dispatch_float(dt, kOp, [&]<class T>() {
    blas_gemm<T>(a.trans_a, a.trans_b, m, n, k, a.alpha, a.a.ptr<T>(), a.a.dim(1), a.b.ptr<T>(), a.b.dim(1), a.beta,
                 a.c.ptr<T>(), n, kOp);
  });
}

// C[rows_g] = alpha · (A[rows_g] · op(B[g]) + A2[rows_g] · op(B2[g])) + beta · C[rows_g];
// rows ≥ offsets[G] untouched. A [R,k]; B [G,n,k] when trans_b else [G,k,n]; C [R,n]; the optional
// second term A2 [R,k2], B2 likewise with k2. The second product is added by a second BLAS call
// with beta = 1: exactly the two one-term calls (beta, then 1) that the GPU fuses into one.
void CpuBackend::grouped_gemm(Context, const GroupedGemmArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm";
  const DType dt = a.c.dtype;
  const GroupedGemmDims d = validate_grouped_gemm(a, Device::kCPU);
  const std::vector<int64_t> off = check_group_offsets(a.offsets.ptr<int32_t>(), d.groups, d.rows, kOp);
  dispatch_float(dt, kOp, [&]<class T>() {
    T* c_ptr = a.c.ptr<T>();
    const int64_t n = d.n;
    // One term: C[rows_g] = alpha · A[rows_g] · op(B[g]) + beta · C[rows_g], A [R,k].
    const auto term = [&](const Tensor& ta, const Tensor& tb, int64_t k, double beta) {
      const T* a_ptr = ta.ptr<T>();
      const T* b_ptr = tb.ptr<T>();
      const int64_t ldb = a.trans_b ? k : n;
      for (int64_t g = 0; g < d.groups; ++g) {
        const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
        if (r1 == r0) continue;  // empty group: its (zero) rows stay as they are
        blas_gemm<T>(false, a.trans_b, r1 - r0, n, k, a.alpha, a_ptr + r0 * k, k, b_ptr + g * n * k, ldb, beta,
                     c_ptr + r0 * n, n, kOp);
      }
    };
    term(a.a, a.b, d.k, a.beta);
    if (d.two_terms) term(a.a2, a.b2, d.k2, 1.0);
  });
}

// C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g];  A [R,m], B [R,n], C [G,m,n].
void CpuBackend::grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  const DType dt = a.c.dtype;
  const auto [rows, m, n, groups] = validate_grouped_gemm_wgrad(a, Device::kCPU);
  const std::vector<int64_t> off = check_group_offsets(a.offsets.ptr<int32_t>(), groups, rows, kOp);
  dispatch_float(dt, kOp, [&]<class T>() {
    const T* a_ptr = a.a.ptr<T>();
    const T* b_ptr = a.b.ptr<T>();
    T* c_ptr = a.c.ptr<T>();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
      // An empty group is a k = 0 product: blas_gemm leaves beta·C[g].
      blas_gemm<T>(true, false, m, n, r1 - r0, a.alpha, a_ptr + r0 * m, m, b_ptr + r0 * n, n, a.beta,
                   c_ptr + g * m * n, n, kOp);
    }
  });
  if (a.sum_sq.defined()) sum_squares(ctx, {.out = a.sum_sq, .x = a.c});  // Σ C² of the values just written
}

}  // namespace diffmoe
