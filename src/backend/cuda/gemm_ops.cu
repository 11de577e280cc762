// GEMM, grouped GEMM and the grouped weight-gradient GEMM on the GPU, through cuBLAS SGEMM in plain
// f32 (the backend's handle uses CUBLAS_DEFAULT_MATH: no TF32), or, under GemmPrecision::kBF16,
// with bf16 inputs on tensor cores: each op first rounds (to nearest even) the part of A and of B
// it reads to bf16 in the backend's bf16 buffer, keeping their layout and leading dimensions (bf16
// operand tensors are read as they are), then multiplies with f32 products and sums, alpha and
// beta in f32, so only the inputs lose precision (8-bit mantissa: relative 2^-9 each). One
// conversion per op and operand, also for the grouped ops, whose per-group calls index into it.
//
// Dense gemm under kBF16: cuBLASLt (lt_gemm.h; bf16 A and B, CUBLAS_COMPUTE_32F), with its C
// descriptor on the addend (GemmArgs::addend, or C itself) and its D descriptor on the output, so
// a residual is added by the GEMM instead of a copy into the output first; the output may be bf16
// (beta = 0), rounded once to nearest even when cuBLASLt stores D. Under kF32, or with f32_exact,
// SGEMM, which adds in place: a separate addend is first copied into C (the CPU backend's order).
// The grouped ops' per-group fallback (below) keeps cublasGemmEx (bf16 A and B, f32 C): its group
// sizes change every step, which cuBLASLt's plans, cached by shape, would not serve.
//
// Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix read as
// column-major is its transpose, so one cuBLAS call with the operands swapped computes it, with no
// copies: cublasSgemm(op_b, op_a, n, m, k, B, ldb, A, lda, C, ldc), and the same swap for
// cuBLASLt (its A is our B, its B our A, its D[n, m] column-major is our C[m, n] row-major).
// BLAS semantics as on the CPU: beta = 0 reads neither C nor the addend (stale NaNs do not
// propagate), and an empty inner dimension (k = 0, or an empty group of the weight gradient) gives
// beta·C (beta·addend), done by a small kernel because cuBLAS rejects lda = 0.
//
// Grouped GEMMs. Under kBF16: no host sync. All R rows of A (the rows in use are known only on the
// device) and all of B are used as bf16 with rows padded to a multiple of 8 elements (bf16 tensors
// that need no padding in place, others rounded into the bf16 buffer), then one launch of a grouped
// tensor-core kernel reads the offsets on the device, checks them (a bad one is skipped and
// reported at synchronize(), device_issue.h) and computes every group: on Hopper (sm_90a code) the
// TMA + wgmma kernel (grouped_gemm_tma.cuh) in every layout, else the mma.sync kernel
// (grouped_gemm.cuh). Under kF32 (the f32 reference mode): the i32 offsets are read to the
// host with one cudaMemcpyAsync + stream sync, checked like the CPU does, then one SGEMM per
// non-empty group.
// Two-term grouped GEMMs (GroupedGemmArgs::a2, b2: C = alpha·(A·op(B) + A2·op(B2)) + beta·C): the
// TMA kernel runs both products' k-tiles into one accumulator and writes C once; the mma.sync kernel
// and the per-group path run the second term as a second pass with beta = 1 (correctness only).
// bf16 C (grouped_gemm, the bf16 GEMM mode, beta = 0): the expert activations that only element-wise
// ops read (a, b, y_perm, dh, dx_perm; docs/model.md §7) are written rounded once by the kernels' epilogue,
// halving their bytes; the fallbacks' second pass re-reads the rounded first term.
#include <cuda_bf16.h>
#include <fmt/format.h>

#include <array>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm_tma.cuh"
#include "backend/cuda/grouped_gemv.cuh"
#include "backend/cuda/sum_squares.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

// D[m, n] = beta·C (both with row stride ld; C may be D), without reading C when beta = 0: a GEMM
// with k = 0. D is f32, or bf16 (then beta = 0: zeros).
template <class T>
__global__ void scale_matrix_kernel(T* d, const float* c, int64_t m, int64_t n, int64_t ld, double beta) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < m * n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t at = (i / n) * ld + i % n;
    store_as(d + at, beta == 0.0 ? 0.0 : beta * static_cast<double>(c[at]));
  }
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

// Operands a and b of one GEMM (the first na elements of a and nb of b are read) as cuBLAS reads
// them. kF32: the f32 tensors themselves. kBF16: a bf16 tensor as it is (a weight copy or an
// activation rounded once for several GEMMs), an f32 tensor rounded to bf16 into the backend's bf16
// buffer (grown to the largest call seen, never shrunk). bf16 tensors need kBF16.
// f32_exact: f32 operands as they are, also under kBF16 (GemmArgs::f32_exact).
std::pair<Operand, Operand> gemm_operands(CudaBackend& be, cudaStream_t s, const Tensor& a, int64_t na, const Tensor& b,
                                          int64_t nb, std::string_view op, bool f32_exact = false) {
  const bool a16_given = a.dtype == DType::kBF16, b16_given = b.dtype == DType::kBF16;
  if (be.gemm_precision() != GemmPrecision::kBF16 || f32_exact) {
    DIFFMOE_CHECK(!a16_given && !b16_given,
                  "[{}] bf16 operands need the bf16 GEMM mode (train.precision: bf16_gemm)"
                  "{}",
                  op, f32_exact ? " and f32_exact = false" : "");
    return {Operand{a.data, false}, Operand{b.data, false}};
  }
  const size_t a_bytes = a16_given ? 0 : align256(static_cast<size_t>(na) * sizeof(__nv_bfloat16));
  const size_t b_bytes = b16_given ? 0 : static_cast<size_t>(nb) * sizeof(__nv_bfloat16);
  char* buf = a_bytes + b_bytes == 0 ? nullptr : static_cast<char*>(be.gemm_bf16_scratch(a_bytes + b_bytes));
  const auto convert = [&](const Tensor& t, int64_t n, char* dst_bytes) -> Operand {
    if (t.dtype == DType::kBF16) return Operand{t.data, true};
    const DetailScope detail(be, s, [&] { return fmt::format("{} f32->bf16 operand", op); });
    f32_to_bf16(dst_bytes, f32(t), n, s, op);
    return Operand{dst_bytes, true};
  };
  return {convert(a, na, buf), convert(b, nb, buf + a_bytes)};
}

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C with leading dimensions (elements per stored row);
// A and B both f32 (SGEMM) or both bf16 (GemmEx, f32 accumulation).
void gemm_row_major(CudaBackend& be, cudaStream_t s, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    double alpha, Operand a, int64_t lda, Operand b, int64_t ldb, double beta, float* c, int64_t ldc,
                    std::string_view op) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta·C
    if (beta == 1.0) return;
    scale_matrix_kernel<<<grid_for(m * n), kThreads, 0, s>>>(c, c, m, n, ldc, beta);
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
                            CUDA_R_16BF, i(lda), &beta32, c, CUDA_R_32F, i(ldc), CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

// gemm_row_major into a bf16 C [m, n] (row stride ldc): bf16 A and B, f32 products and sums, C read
// (beta ≠ 0) and written in bf16. The grouped ops' per-group path for a bf16 output (GroupedGemmArgs:
// the bf16 GEMM mode's expert activations) where the device-scheduled kernels do not fit.
void gemm_row_major_bf16_c(CudaBackend& be, cudaStream_t s, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                           Operand a, int64_t lda, Operand b, int64_t ldb, double beta, __nv_bfloat16* c, int64_t ldc,
                           std::string_view op) {
  if (m == 0 || n == 0) return;
  DIFFMOE_CHECK(a.bf16 && b.bf16, "[{}] a bf16 output needs bf16 operands (the bf16 GEMM mode)", op);
  if (k == 0) {  // an empty sum: C = beta·C; beta is 0 or 1 here (grouped_gemm's bf16 rule, two-term pass)
    DIFFMOE_CHECK(beta == 0.0 || beta == 1.0, "[{}] k = 0 into a bf16 C takes beta 0 or 1, got {}", op, beta);
    if (beta == 0.0)
      CUDA_CHECK(cudaMemset2DAsync(c, static_cast<size_t>(ldc) * sizeof(__nv_bfloat16), 0,
                                   static_cast<size_t>(n) * sizeof(__nv_bfloat16), static_cast<size_t>(m), s));
    return;
  }
  for (int64_t v : {m, n, k, lda, ldb, ldc})
    DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds cuBLAS's int range", op, v);
  const float alpha32 = static_cast<float>(alpha), beta32 = static_cast<float>(beta);
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  CUBLAS_CHECK(cublasGemmEx(be.cublas(s), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, i(n), i(m), i(k), &alpha32,
                            b.p, CUDA_R_16BF, i(ldb), a.p, CUDA_R_16BF, i(lda), &beta32, c, CUDA_R_16BF, i(ldc),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The kernel records bad offsets in the backend's DeviceIssue through its own mirror of the struct.
static_assert(sizeof(gg::GroupedGemmIssue) == sizeof(DeviceIssue) &&
                  offsetof(gg::GroupedGemmIssue, flag) == offsetof(DeviceIssue, flag) &&
                  offsetof(gg::GroupedGemmIssue, site) == offsetof(DeviceIssue, site) &&
                  offsetof(gg::GroupedGemmIssue, index) == offsetof(DeviceIssue, index) &&
                  offsetof(gg::GroupedGemmIssue, value) == offsetof(DeviceIssue, value) &&
                  offsetof(gg::GroupedGemmIssue, limit) == offsetof(DeviceIssue, limit),
              "grouped_gemm.cuh's GroupedGemmIssue must mirror DeviceIssue");

// Room in the bf16 buffer for the grouped kernels' operand copies (padded, possibly f32-rounded) of
// elems[i] elements each; 0 where an operand is read in place (grouped_in_place). Each copy starts
// 256-byte aligned. Up to four: A, B and a second term's A2, B2.
template <size_t N>
std::array<gg::bf16*, N> bf16_scratch_parts(CudaBackend& be, const std::array<int64_t, N>& elems) {
  std::array<size_t, N> start{};
  size_t total = 0;
  for (size_t i = 0; i < N; ++i) {
    start[i] = total;
    total += align256(static_cast<size_t>(elems[i]) * sizeof(gg::bf16));
  }
  char* buf = total == 0 ? nullptr : static_cast<char*>(be.gemm_bf16_scratch(total));
  std::array<gg::bf16*, N> parts{};
  for (size_t i = 0; i < N; ++i) parts[i] = elems[i] == 0 ? nullptr : reinterpret_cast<gg::bf16*>(buf + start[i]);
  return parts;
}

// Whether a grouped operand [rows, cols] is read in place: a bf16 tensor whose rows need no padding
// (cols a multiple of 8) and that starts 16-byte aligned (TMA and cp.async read 16-byte chunks).
bool grouped_in_place(const Tensor& t, int64_t cols) {
  return t.dtype == DType::kBF16 && gg::pad8(cols) == cols && reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
}

// The bf16 copy's elements a grouped operand [rows, cols] needs: 0 when read in place.
int64_t grouped_copy_elems(const Tensor& t, int64_t rows, int64_t cols) {
  return grouped_in_place(t, cols) ? 0 : rows * gg::pad8(cols);
}

// A grouped operand [rows, cols] as the kernels read it: bf16 with rows padded to pad8(cols). A
// bf16 tensor that needs no padding is read in place; anything else is copied into dst (f32 rounded,
// bf16 copied exactly; dst holds grouped_copy_elems).
const gg::bf16* grouped_operand(CudaBackend& be, const Tensor& t, int64_t rows, int64_t cols, gg::bf16* dst,
                                cudaStream_t s) {
  if (grouped_in_place(t, cols)) return static_cast<const gg::bf16*>(t.data);
  if (t.dtype == DType::kBF16) {
    const DetailScope detail(be, s, [] { return "grouped operand bf16 padded copy"; });
    CUDA_CHECK(gg::launch_to_bf16_padded(dst, static_cast<const gg::bf16*>(t.data), rows, cols, s));
  } else {
    const DetailScope detail(be, s, [] { return "grouped operand f32->bf16"; });
    CUDA_CHECK(gg::launch_to_bf16_padded(dst, f32(t), rows, cols, s));
  }
  return dst;
}

// One grouped kernel launch: the Hopper kernel where it runs and takes the params, else mma.sync.
// Under DIFFMOE_CUDA_PROFILE the first launch of each layout says which kernel runs, and why.
// sq_partial (wgrad only): the TMA kernel's per-warp Σ C² slots (gg::wgrad_sq_slots); the caller
// asks only where that kernel runs.
void launch_grouped(CudaBackend& be, const gg::GroupedGemmParams& p, gg::GroupedLayout layout, cudaStream_t s,
                    double* sq_partial = nullptr) {
  const bool verbose = be.profiling();
  const char* why_not =
      grouped_hopper_usable() ? gg::grouped_gemm_tma_unusable(p, layout) : "no sm_90a code on this device";
  static bool said[3] = {false, false, false};
  bool& once = said[static_cast<int>(layout)];
  if (verbose && !once) {
    static const char* const kNames[3] = {"fwd", "dgrad", "wgrad"};
    fmt::print(stderr, "[cuda] grouped GEMM {}: {}{}\n", kNames[static_cast<int>(layout)],
               why_not == nullptr ? "TMA + wgmma kernel" : "mma.sync kernel: ", why_not == nullptr ? "" : why_not);
    once = true;
  }
  const DetailScope detail(be, s, [&] {
    return fmt::format("grouped kernel {} m{} n{} k{}{} beta{}", static_cast<int>(layout), p.m, p.n, p.k,
                       p.k2 > 0 ? fmt::format("+{}", p.k2) : "", p.beta);
  });
  if (why_not == nullptr) {
    switch (layout) {
      case gg::GroupedLayout::kFwd: CUDA_CHECK(gg::launch_grouped_gemm_tma<gg::GroupedLayout::kFwd>(p, s)); return;
      case gg::GroupedLayout::kDgrad: CUDA_CHECK(gg::launch_grouped_gemm_tma<gg::GroupedLayout::kDgrad>(p, s)); return;
      case gg::GroupedLayout::kWgrad:
        CUDA_CHECK(gg::launch_grouped_gemm_tma<gg::GroupedLayout::kWgrad>(p, s, sq_partial));
        return;
    }
  }
  DIFFMOE_CHECK(sq_partial == nullptr, "[grouped_gemm_wgrad] Σ C² slots asked of the mma.sync kernel");
  CUDA_CHECK(gg::launch_grouped_gemm(p, layout, s));
}

// Whether the device-scheduled grouped kernels fit this device's shared memory per block (else the
// grouped ops take the per-group cuBLAS path, with its host read of the offsets).
bool grouped_kernels_fit(const CudaBackend& be) { return be.max_shared_bytes() >= gg::grouped_gemm_max_smem_bytes(); }

// The grouped kernel's int dimensions.
int to_int(int64_t v, std::string_view op) {
  DIFFMOE_CHECK(v <= INT_MAX, "[{}] dimension {} exceeds the grouped kernel's int range", op, v);
  return static_cast<int>(v);
}

template <class TA, class TB>
void launch_grouped_gemv_typed(const GroupedGemvParams& p, bool trans_b, bool vec, cudaStream_t s) {
  if (trans_b) {
    const dim3 grid((p.n + kGemvFwdCols - 1) / kGemvFwdCols, p.groups);
    if (vec) grouped_gemv_fwd_kernel<true, TA, TB><<<grid, kGemvThreads, 0, s>>>(p);
    else grouped_gemv_fwd_kernel<false, TA, TB><<<grid, kGemvThreads, 0, s>>>(p);
  } else {
    const dim3 grid((p.n + kGemvDgradCols - 1) / kGemvDgradCols, p.groups);
    grouped_gemv_dgrad_kernel<TA, TB><<<grid, kGemvThreads, 0, s>>>(p);
  }
}

// The few-rows grouped kernel (grouped_gemv.cuh) on p, the operand dtypes of a and b, and B's layout.
void launch_grouped_gemv(const GroupedGemvParams& p, DType a_dtype, DType b_dtype, bool trans_b, cudaStream_t s) {
  const auto aligned16 = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  const bool vec = p.k % kGemvVec == 0 && aligned16(p.a) && aligned16(p.b);
  const bool a16 = a_dtype == DType::kBF16, b16 = b_dtype == DType::kBF16;
  if (a16 && b16) launch_grouped_gemv_typed<__nv_bfloat16, __nv_bfloat16>(p, trans_b, vec, s);
  else if (a16) launch_grouped_gemv_typed<__nv_bfloat16, float>(p, trans_b, vec, s);
  else if (b16) launch_grouped_gemv_typed<float, __nv_bfloat16>(p, trans_b, vec, s);
  else launch_grouped_gemv_typed<float, float>(p, trans_b, vec, s);
  CUDA_CHECK_LAUNCH("grouped_gemm (few rows)");
}

}  // namespace

bool cuda::grouped_hopper_usable() {
  static const bool usable = [] {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    return cuda::gg::wgmma_supported(dev);
  }();
  return usable;
}

bool CudaBackend::grouped_gemm_reads_offsets() const {
  return gemm_precision() != GemmPrecision::kBF16 || !grouped_kernels_fit(*this);
}

// C = alpha·op(A)·op(B) + beta·addend (addend = C when not given);  op(A) [m,k], op(B) [k,n], C [m,n].
void CudaBackend::gemm(Context ctx, const GemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "gemm");
  constexpr std::string_view kOp = "gemm";
  const GemmDims d = validate_gemm(a, Device::kCUDA);
  check_gemm_bf16_mode(kOp, gemm_precision() == GemmPrecision::kBF16, a.f32_exact,
                       {{&a.c, "c"}, {&a.a, "a"}, {&a.b, "b"}});
  const bool c16 = a.c.dtype == DType::kBF16;  // validated: beta = 0, not f32_exact, the bf16 mode
  if (!c16) require_f32(a.c, kOp);
  const cudaStream_t s = stream(ctx);
  const Tensor& addend = a.addend.defined() ? a.addend : a.c;
  const bool separate = addend.data != a.c.data;  // an addend apart from C
  if (d.m == 0 || d.n == 0) return;
  if (d.k == 0) {  // an empty sum: C = beta·addend, no operand read
    if (a.beta == 1.0 && !separate) return;
    const float* from = a.beta == 0.0 ? nullptr : f32(addend);  // not read when beta = 0 (bf16 C: always)
    if (c16)
      scale_matrix_kernel<<<grid_for(d.m * d.n), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(a.c.data), from, d.m,
                                                                   d.n, d.n, a.beta);
    else scale_matrix_kernel<<<grid_for(d.m * d.n), kThreads, 0, s>>>(f32(a.c), from, d.m, d.n, d.n, a.beta);
    CUDA_CHECK_LAUNCH(kOp);
    return;
  }
  const auto [op_a, op_b] = gemm_operands(*this, s, a.a, a.a.numel(), a.b, a.b.numel(), kOp, a.f32_exact);
  const DetailScope detail(*this, s, [&] {
    return fmt::format("gemm {}x{}x{} {}{} beta{}{}{}", d.m, d.n, d.k, a.trans_a ? "T" : "N", a.trans_b ? "T" : "N",
                       a.beta, separate && a.beta != 0.0 ? " +addend" : "", c16 ? " ->bf16" : "");
  });
  if (!op_a.bf16) {  // kF32 or f32_exact: SGEMM adds in place, so a separate addend goes into C first
    if (separate && a.beta != 0.0)
      CUDA_CHECK(cudaMemcpyAsync(a.c.data, addend.data, a.c.nbytes(), cudaMemcpyDeviceToDevice, s));
    gemm_row_major(*this, s, a.trans_a, a.trans_b, d.m, d.n, d.k, a.alpha, op_a, a.a.dim(1), op_b, a.b.dim(1), a.beta,
                   f32(a.c), d.n, kOp);
    return;
  }
  // cuBLASLt with the operands swapped (file comment): its A is our B, its B our A, its D [n, m]
  // column-major our C [m, n]. Its C is the addend; with beta = 0 it is not read and D stands in.
  lt_gemm().run(LtGemmCall{.trans_a = a.trans_b,
                           .trans_b = a.trans_a,
                           .m = d.n,
                           .n = d.m,
                           .k = d.k,
                           .lda = a.b.dim(1),
                           .ldb = a.a.dim(1),
                           .ldc = d.n,
                           .a = op_b.p,
                           .b = op_a.p,
                           .c = a.beta == 0.0 ? a.c.data : addend.data,
                           .d = a.c.data,
                           .ab_type = CUDA_R_16BF,
                           .cd_type = c16 ? CUDA_R_16BF : CUDA_R_32F,
                           .alpha = static_cast<float>(a.alpha),
                           .beta = static_cast<float>(a.beta),
                           .op = kOp},
                s);
}

// C[rows_g] = alpha · (A[rows_g] · op(B[g]) + A2[rows_g] · op(B2[g])) + beta · C[rows_g] (the
// second term optional);  rows ≥ offsets[G] untouched.
void CudaBackend::grouped_gemm(Context ctx, const GroupedGemmArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "grouped_gemm");
  constexpr std::string_view kOp = "grouped_gemm";
  const GroupedGemmDims d = validate_grouped_gemm(a, Device::kCUDA);
  check_gemm_bf16_mode(kOp, gemm_precision() == GemmPrecision::kBF16, false,
                       {{&a.c, "c"}, {&a.a, "a"}, {&a.b, "b"}, {&a.a2, "a2"}, {&a.b2, "b2"}});
  // C: f32, or bf16 in the bf16 GEMM mode (beta = 0, validate_grouped_gemm).
  const bool c_bf16 = a.c.dtype == DType::kBF16;
  if (!c_bf16) require_f32(a.c, kOp);
  float* const c32 = c_bf16 ? nullptr : f32(a.c);
  __nv_bfloat16* const c16 = c_bf16 ? static_cast<__nv_bfloat16*>(a.c.data) : nullptr;
  const cudaStream_t s = stream(ctx);
  // B (and B2) as stored: [G, n, k] (trans_b, fwd) or [G, k, n] (dgrad).
  const auto b_cols = [&](int64_t k) { return a.trans_b ? k : d.n; };
  const auto b_rows = [&](int64_t k) { return d.groups * (a.trans_b ? d.n : k); };
  // Groups of at most kGemvMaxRows rows (the caller's bound): every SM streams B (grouped_gemv.cuh), one launch.
  static_assert(kGemvMaxRows == 8, "DIFFMOE_GROUPED_FEW_ROWS's range (cuda_backend.cpp)");
  if (gemm_precision() == GemmPrecision::kBF16 && a.max_group_rows > 0 && a.max_group_rows <= few_rows_max() &&
      !d.two_terms && d.k > 0 && d.n > 0 && d.groups > 0) {
    DIFFMOE_CHECK(d.groups <= 65535, "[{}] {} groups exceed the few-rows kernel's grid (65535)", kOp, d.groups);
    launch_grouped_gemv({.a = a.a.data,
                         .b = a.b.data,
                         .c = c32,
                         .c16 = c16,
                         .offsets = i32(a.offsets),
                         .rows = to_int(d.rows, kOp),
                         .groups = to_int(d.groups, kOp),
                         .n = to_int(d.n, kOp),
                         .k = to_int(d.k, kOp),
                         .max_rows = static_cast<int>(a.max_group_rows),
                         .alpha = static_cast<float>(a.alpha),
                         .beta = static_cast<float>(a.beta),
                         .issue = issue()},
                        a.a.dtype, a.b.dtype, a.trans_b, s);
    return;
  }
  if (gemm_precision() == GemmPrecision::kBF16 && grouped_kernels_fit(*this)) {  // on the device, no sync
    // All R rows of A (and A2): the rows in use (offsets[G]) are known only on the device.
    const std::array<int64_t, 4> copy_elems = {grouped_copy_elems(a.a, d.rows, d.k),
                                               grouped_copy_elems(a.b, b_rows(d.k), b_cols(d.k)),
                                               d.two_terms ? grouped_copy_elems(a.a2, d.rows, d.k2) : 0,
                                               d.two_terms ? grouped_copy_elems(a.b2, b_rows(d.k2), b_cols(d.k2)) : 0};
    const auto [a16, b16, a2_16, b2_16] = bf16_scratch_parts(*this, copy_elems);
    gg::GroupedGemmParams p{.a = grouped_operand(*this, a.a, d.rows, d.k, a16, s),
                            .b = grouped_operand(*this, a.b, b_rows(d.k), b_cols(d.k), b16, s),
                            .c = c32,
                            .offsets = i32(a.offsets),
                            .rows = to_int(d.rows, kOp),
                            .groups = to_int(d.groups, kOp),
                            .m = 0,
                            .n = to_int(d.n, kOp),
                            .k = to_int(d.k, kOp),
                            .lda = to_int(gg::pad8(d.k), kOp),
                            .ldb = to_int(gg::pad8(b_cols(d.k)), kOp),
                            .alpha = static_cast<float>(a.alpha),
                            .beta = static_cast<float>(a.beta),
                            .issue = reinterpret_cast<gg::GroupedGemmIssue*>(issue()),
                            .issue_site = static_cast<int32_t>(IssueSite::kGroupedGemmOffsets),
                            .c16 = c16};
    if (d.two_terms && d.k2 > 0) {  // k2 = 0 adds nothing
      p.a2 = grouped_operand(*this, a.a2, d.rows, d.k2, a2_16, s);
      p.b2 = grouped_operand(*this, a.b2, b_rows(d.k2), b_cols(d.k2), b2_16, s);
      p.k2 = to_int(d.k2, kOp);
      p.lda2 = to_int(gg::pad8(d.k2), kOp);
      p.ldb2 = to_int(gg::pad8(b_cols(d.k2)), kOp);
    }
    launch_grouped(*this, p, a.trans_b ? gg::GroupedLayout::kFwd : gg::GroupedLayout::kDgrad, s);
    return;
  }
  const std::vector<int64_t> off =
      check_group_offsets(read_to_host(a.offsets, s), d.groups, d.rows, kOp, a.max_group_rows);
  // Only the rows in use (< offsets[G]) of A are read.
  const int64_t used = off[static_cast<size_t>(d.groups)];
  // One term, one SGEMM (or GemmEx) per non-empty group: C[rows_g] = alpha·A[rows_g]·op(B[g]) + beta·C.
  // A second term is a second pass with beta = 1 (its operands converted after the first pass's
  // GEMMs on the same stream, so the shared bf16 buffer is free again).
  const auto per_group = [&](const Tensor& ta, const Tensor& tb, int64_t k, double beta) {
    const auto [op_a, op_b] =
        gemm_operands(*this, s, ta, used == 0 ? 0 : used * k, tb, used == 0 ? 0 : d.groups * d.n * k, kOp);
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
      if (r1 == r0) continue;  // empty group: its (zero) rows stay as they are
      if (c_bf16)
        gemm_row_major_bf16_c(*this, s, a.trans_b, r1 - r0, d.n, k, a.alpha, op_a.at(r0 * k), k, op_b.at(g * d.n * k),
                              b_cols(k), beta, c16 + r0 * d.n, d.n, kOp);
      else
        gemm_row_major(*this, s, false, a.trans_b, r1 - r0, d.n, k, a.alpha, op_a.at(r0 * k), k, op_b.at(g * d.n * k),
                       b_cols(k), beta, c32 + r0 * d.n, d.n, kOp);
    }
  };
  per_group(a.a, a.b, d.k, a.beta);
  if (d.two_terms) per_group(a.a2, a.b2, d.k2, 1.0);
}

// C[g] = alpha · A[rows_g]ᵀ · B[rows_g] + beta · C[g];  A [R,m], B [R,n], C [G,m,n].
void CudaBackend::grouped_gemm_wgrad(Context ctx, const GroupedGemmWgradArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "grouped_gemm_wgrad");
  constexpr std::string_view kOp = "grouped_gemm_wgrad";
  const GroupedGemmWgradDims d = validate_grouped_gemm_wgrad(a, Device::kCUDA);
  check_gemm_bf16_mode(kOp, gemm_precision() == GemmPrecision::kBF16, false, {{&a.a, "a"}, {&a.b, "b"}});
  require_f32(a.c, kOp);
  const cudaStream_t s = stream(ctx);
  // sum_sq[0] += Σ C², read back from C after the GEMM (where the kernel does not square its stores).
  const auto sum_sq_from_c = [&] {
    const int64_t n = a.c.numel();
    auto* partial = static_cast<double*>(scratch(static_cast<size_t>(cuda::sum_squares_partials(n)) * sizeof(double)));
    cuda::launch_sum_squares(f32(a.sum_sq), f32(a.c), n, partial, s);
  };
  if (gemm_precision() == GemmPrecision::kBF16 && grouped_kernels_fit(*this)) {  // on the device, no sync
    const auto [a16, b16] =
        bf16_scratch_parts<2>(*this, {grouped_copy_elems(a.a, d.rows, d.m), grouped_copy_elems(a.b, d.rows, d.n)});
    // All R rows (see grouped_gemm).
    const gg::bf16* a_op = grouped_operand(*this, a.a, d.rows, d.m, a16, s);
    const gg::bf16* b_op = grouped_operand(*this, a.b, d.rows, d.n, b16, s);
    const gg::GroupedGemmParams p{.a = a_op,
                                  .b = b_op,
                                  .c = f32(a.c),
                                  .offsets = i32(a.offsets),
                                  .rows = to_int(d.rows, kOp),
                                  .groups = to_int(d.groups, kOp),
                                  .m = to_int(d.m, kOp),
                                  .n = to_int(d.n, kOp),
                                  .k = 0,
                                  .lda = to_int(gg::pad8(d.m), kOp),
                                  .ldb = to_int(gg::pad8(d.n), kOp),
                                  .alpha = static_cast<float>(a.alpha),
                                  .beta = static_cast<float>(a.beta),
                                  .issue = reinterpret_cast<gg::GroupedGemmIssue*>(issue()),
                                  .issue_site = static_cast<int32_t>(IssueSite::kGroupedGemmWgradOffsets)};
    DIFFMOE_CHECK(d.groups <= 65535, "[{}] {} groups exceed the kernel's grid.y limit 65535", kOp, d.groups);
    // Σ C² (sum_sq) from the TMA kernel's epilogue where it runs: per-warp slots in the scratch,
    // added in a fixed order after the launch. Elsewhere C is read again below.
    const bool fused_sq = a.sum_sq.defined() && grouped_hopper_usable() &&
                          gg::grouped_gemm_tma_unusable(p, gg::GroupedLayout::kWgrad) == nullptr;
    double* sq_partial =
        fused_sq ? static_cast<double*>(scratch(static_cast<size_t>(gg::wgrad_sq_slots(p)) * sizeof(double))) : nullptr;
    launch_grouped(*this, p, gg::GroupedLayout::kWgrad, s, sq_partial);
    if (fused_sq) {
      cuda::launch_add_partial_sums(f32(a.sum_sq), sq_partial, gg::wgrad_sq_slots(p), s);
    } else if (a.sum_sq.defined()) {
      sum_sq_from_c();
    }
    return;
  }
  const std::vector<int64_t> off = check_group_offsets(read_to_host(a.offsets, s), d.groups, d.rows, kOp);
  // Only the rows in use (< offsets[G]) of A and B are read.
  const int64_t used = off[static_cast<size_t>(d.groups)];
  const auto [op_a, op_b] = gemm_operands(*this, s, a.a, used * d.m, a.b, used * d.n, kOp);
  for (int64_t g = 0; g < d.groups; ++g) {
    const int64_t r0 = off[static_cast<size_t>(g)], r1 = off[static_cast<size_t>(g + 1)];
    // An empty group is a k = 0 product: beta·C[g].
    gemm_row_major(*this, s, true, false, d.m, d.n, r1 - r0, a.alpha, op_a.at(r0 * d.m), d.m, op_b.at(r0 * d.n), d.n,
                   a.beta, f32(a.c) + g * d.m * d.n, d.n, kOp);
  }
  if (a.sum_sq.defined()) sum_sq_from_c();
}

}  // namespace diffmoe
