// GEMM, grouped GEMM and the grouped weight-gradient GEMM of the CPU reference backend, all through
// OpenBLAS (cblas_sgemm / cblas_dgemm, row-major). Grouped variants loop over groups on the host
// and make one BLAS call per non-empty group; OpenBLAS threads each call itself.
//
// BLAS semantics are kept throughout: with beta = 0 the output is not read (so stale NaNs in C do
// not propagate), and an empty inner dimension (k = 0) or an empty group gives beta·C. gemm's
// separate addend (GemmArgs::addend) is copied into C first, then added in place like C.
//
// GemmPrecision::kBF16 (f32 calls; f64 calls, the finite-difference checks, stay f64): A and B are
// copied with every value rounded to bf16 (bf16 operands widened, exactly) into the backend's
// buffers (bf16_staging.h), then cblas_sgemm multiplies the copies: a product of two bf16 values is
// exact in f32 (8 + 8 significant bits), and the sums, alpha and beta are f32, as on tensor cores
// with f32 accumulation. f32_exact keeps f32 operands as they are (the router's logits, docs/model.md §5).
// A bf16 C (beta = 0) is the f32 result rounded once: a grouped GEMM's two terms are both summed
// into the f32 buffer first, then rounded.
#include <cblas.h>

#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/bf16_staging.h"
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
  const auto [m, n, k] = validate_gemm(a, Device::kCPU);
  const bool bf16_mode = gemm_precision_ == GemmPrecision::kBF16;
  check_gemm_bf16_mode(kOp, bf16_mode, a.f32_exact, {{&a.c, "c"}, {&a.a, "a"}, {&a.b, "b"}});
  Bf16Staging staged(scratch_);
  const bool round_operands = bf16_mode && !a.f32_exact;
  const Tensor op_a = round_operands ? staged.rounded(a.a) : a.a;
  const Tensor op_b = round_operands ? staged.rounded(a.b) : a.b;
  const Tensor c = staged.output(a.c);  // a bf16 C: beta = 0, so the addend is not read
  // A separate addend is copied into C, then BLAS adds the product in place with beta: the same
  // arithmetic as a copy op followed by a beta GEMM. With beta = 0 the addend is not read (BLAS rule).
  if (a.addend.defined() && a.addend.data != a.c.data && a.beta != 0.0 && c.numel() > 0)
    std::memcpy(c.data, a.addend.data, c.nbytes());
  dispatch_float(c.dtype, kOp, [&]<class T>() {
    blas_gemm<T>(a.trans_a, a.trans_b, m, n, k, a.alpha, op_a.ptr<T>(), op_a.dim(1), op_b.ptr<T>(), op_b.dim(1), a.beta,
                 c.ptr<T>(), n, kOp);
  });
  staged.finish();
}

// C[rows_g] = alpha · (A[rows_g] · op(B[g]) + A2[rows_g] · op(B2[g])) + beta · C[rows_g];
// rows ≥ offsets[G] untouched. A [R,k]; B [G,n,k] when trans_b else [G,k,n]; C [R,n]; the optional
// second term A2 [R,k2], B2 likewise with k2. The second product is added by a second BLAS call
// with beta = 1: exactly the two one-term calls (beta, then 1) that the GPU fuses into one.
void CpuBackend::grouped_gemm(Context, const GroupedGemmArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm";
  const GroupedGemmDims d = validate_grouped_gemm(a, Device::kCPU);
  const bool bf16_mode = gemm_precision_ == GemmPrecision::kBF16;
  check_gemm_bf16_mode(kOp, bf16_mode, false, {{&a.c, "c"}, {&a.a, "a"}, {&a.b, "b"}, {&a.a2, "a2"}, {&a.b2, "b2"}});
  const std::vector<int64_t> off =
      check_group_offsets(a.offsets.ptr<int32_t>(), d.groups, d.rows, kOp, a.max_group_rows);
  Bf16Staging staged(scratch_);
  const auto operand = [&](const Tensor& t) { return bf16_mode ? staged.rounded(t) : t; };
  const Tensor c = staged.output(a.c);  // a bf16 C: both terms summed in f32, then rounded once
  dispatch_float(c.dtype, kOp, [&]<class T>() {
    T* c_ptr = c.ptr<T>();
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
    term(operand(a.a), operand(a.b), d.k, a.beta);
    if (d.two_terms) term(operand(a.a2), operand(a.b2), d.k2, 1.0);
  });
  staged.finish();
}

// C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g];  A [R,m], B [R,n], C [G,m,n].
void CpuBackend::grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) {
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  const DType dt = a.c.dtype;
  const auto [rows, m, n, groups] = validate_grouped_gemm_wgrad(a, Device::kCPU);
  const bool bf16_mode = gemm_precision_ == GemmPrecision::kBF16;
  check_gemm_bf16_mode(kOp, bf16_mode, false, {{&a.a, "a"}, {&a.b, "b"}});
  const std::vector<int64_t> off = check_group_offsets(a.offsets.ptr<int32_t>(), groups, rows, kOp);
  {
    Bf16Staging staged(scratch_);
    const Tensor op_a = bf16_mode ? staged.rounded(a.a) : a.a, op_b = bf16_mode ? staged.rounded(a.b) : a.b;
    dispatch_float(dt, kOp, [&]<class T>() {
      const T* a_ptr = op_a.ptr<T>();
      const T* b_ptr = op_b.ptr<T>();
      T* c_ptr = a.c.ptr<T>();
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
        // An empty group is a k = 0 product: blas_gemm leaves beta·C[g].
        blas_gemm<T>(true, false, m, n, r1 - r0, a.alpha, a_ptr + r0 * m, m, b_ptr + r0 * n, n, a.beta,
                     c_ptr + g * m * n, n, kOp);
      }
    });
  }
  if (a.sum_sq.defined()) sum_squares(ctx, {.out = a.sum_sq, .x = a.c});  // Σ C² of the values just written
}

}  // namespace diffmoe
