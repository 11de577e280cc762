// GEMM, grouped GEMM and the grouped weight-gradient GEMM of the CPU reference backend, all through
// OpenBLAS (cblas_sgemm / cblas_dgemm, row-major). Grouped variants loop over groups on the host
// and make one BLAS call per non-empty group; OpenBLAS threads each call itself.
//
// BLAS semantics are kept throughout: with beta = 0 the output is not read (so stale NaNs in C do
// not propagate), and an empty inner dimension (k = 0) or an empty group gives beta·C.
#include <cblas.h>

#include <climits>
#include <type_traits>
#include <vector>

#include "backend/cpu/cpu_backend.h"

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

// Group boundaries offsets [G+1] (i32): offsets[0] = 0, non-decreasing, offsets[G] ≤ rows.
// Returned as int64 so callers index without further checks.
std::vector<int64_t> read_offsets(const Tensor& offsets, int64_t groups, int64_t rows, std::string_view op) {
  check_cpu(offsets, op, "offsets");
  check_shape(offsets, Shape{groups + 1}, op, "offsets");
  check_dtype(offsets, DType::kI32, op, "offsets");
  const int32_t* o = offsets.ptr<int32_t>();
  std::vector<int64_t> out(static_cast<size_t>(groups + 1));
  DIFFMOE_CHECK(o[0] == 0, "[{}] offsets[0] = {}, must be 0", op, o[0]);
  for (int64_t g = 0; g <= groups; ++g) {
    if (g > 0)
      DIFFMOE_CHECK(o[g] >= o[g - 1], "[{}] offsets must be non-decreasing: offsets[{}] = {} < offsets[{}] = {}", op,
                    g, o[g], g - 1, o[g - 1]);
    out[static_cast<size_t>(g)] = o[g];
  }
  DIFFMOE_CHECK(out.back() <= rows, "[{}] offsets[{}] = {} exceeds the {} rows of A", op, groups, out.back(), rows);
  return out;
}

void check_matrix(const Tensor& t, DType dtype, int rank, std::string_view op, std::string_view name) {
  check_cpu(t, op, name);
  check_dtype(t, dtype, op, name);
  DIFFMOE_CHECK(t.rank() == rank, "[{}] {} must have rank {}, got {}", op, name, rank, t.describe());
}

}  // namespace

// C = alpha·op(A)·op(B) + beta·C;  op(A) [m,k], op(B) [k,n], C [m,n].
void CpuBackend::gemm(Context, const GemmArgs& a) {
  constexpr std::string_view kOp = "gemm";
  const DType dt = a.c.dtype;
  check_matrix(a.c, dt, 2, kOp, "c");
  check_matrix(a.a, dt, 2, kOp, "a");
  check_matrix(a.b, dt, 2, kOp, "b");
  const int64_t m = a.trans_a ? a.a.dim(1) : a.a.dim(0);
  const int64_t k = a.trans_a ? a.a.dim(0) : a.a.dim(1);
  const int64_t kb = a.trans_b ? a.b.dim(1) : a.b.dim(0);
  const int64_t n = a.trans_b ? a.b.dim(0) : a.b.dim(1);
  DIFFMOE_CHECK(k == kb && a.c.dim(0) == m && a.c.dim(1) == n,
                "[gemm] shapes do not match: op(A) is [{}, {}] (A {}{}), op(B) is [{}, {}] (B {}{}), C is {}; "
                "need op(A) [m, k], op(B) [k, n], C [m, n]",
                m, k, a.a.shape.str(), a.trans_a ? " transposed" : "", kb, n, a.b.shape.str(),
                a.trans_b ? " transposed" : "", a.c.shape.str());
  dispatch_float(dt, kOp, [&]<class T>() {
    blas_gemm<T>(a.trans_a, a.trans_b, m, n, k, a.alpha, a.a.ptr<T>(), a.a.dim(1), a.b.ptr<T>(), a.b.dim(1), a.beta,
                 a.c.ptr<T>(), n, kOp);
  });
}

// C[rows_g] = alpha · A[rows_g] · op(B[g]) + beta · C[rows_g];  rows ≥ offsets[G] untouched.
// A [R,k]; B [G,n,k] when trans_b else [G,k,n]; C [R,n].
void CpuBackend::grouped_gemm(Context, const GroupedGemmArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm";
  const DType dt = a.c.dtype;
  check_matrix(a.c, dt, 2, kOp, "c");
  check_matrix(a.a, dt, 2, kOp, "a");
  check_matrix(a.b, dt, 3, kOp, "b");
  const int64_t rows = a.a.dim(0), k = a.a.dim(1), groups = a.b.dim(0);
  const int64_t n = a.trans_b ? a.b.dim(1) : a.b.dim(2);
  const int64_t kb = a.trans_b ? a.b.dim(2) : a.b.dim(1);
  DIFFMOE_CHECK(kb == k && a.c.dim(0) == rows && a.c.dim(1) == n,
                "[grouped_gemm] shapes do not match: A {} is [R={}, k={}], B {} ({}) gives k={}, n={}, C is {} "
                "(need C [R, n])",
                a.a.shape.str(), rows, k, a.b.shape.str(), a.trans_b ? "[G, n, k]" : "[G, k, n]", kb, n,
                a.c.shape.str());
  const std::vector<int64_t> off = read_offsets(a.offsets, groups, rows, kOp);
  dispatch_float(dt, kOp, [&]<class T>() {
    const T* a_ptr = a.a.ptr<T>();
    const T* b_ptr = a.b.ptr<T>();
    T* c_ptr = a.c.ptr<T>();
    const int64_t ldb = a.trans_b ? k : n;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
      if (r1 == r0) continue;  // empty group: its (zero) rows stay as they are
      blas_gemm<T>(false, a.trans_b, r1 - r0, n, k, a.alpha, a_ptr + r0 * k, k, b_ptr + g * n * k, ldb, a.beta,
                   c_ptr + r0 * n, n, kOp);
    }
  });
}

// C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g];  A [R,m], B [R,n], C [G,m,n].
void CpuBackend::grouped_gemm_wgrad(Context, const GroupedGemmWgradArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  const DType dt = a.c.dtype;
  check_matrix(a.c, dt, 3, kOp, "c");
  check_matrix(a.a, dt, 2, kOp, "a");
  check_matrix(a.b, dt, 2, kOp, "b");
  const int64_t rows = a.a.dim(0), m = a.a.dim(1), n = a.b.dim(1), groups = a.c.dim(0);
  DIFFMOE_CHECK(a.b.dim(0) == rows && a.c.dim(1) == m && a.c.dim(2) == n,
                "[grouped_gemm_wgrad] shapes do not match: A {} is [R, m], B {} is [R, n], C is {} "
                "(need C [G, {}, {}] and equal R)",
                a.a.shape.str(), a.b.shape.str(), a.c.shape.str(), m, n);
  const std::vector<int64_t> off = read_offsets(a.offsets, groups, rows, kOp);
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
}

}  // namespace diffmoe
