// RMSNorm forward and backward (sources Appendix A) of the CPU reference backend.
//
// Rows of `width` values are read at x + n·x_stride and written at y + n·y_stride (stride 0 means
// width), so a norm can cover the first columns of a wider buffer. All sums are in double; the
// saved rstd is rounded to the tensor type and the forward uses that rounded value, so forward and
// backward see the same r. The weight gradient is reduced per column over rows in row order
// (threads own column blocks), so it does not depend on the thread count.
// bf16 (f32 calls, the bf16 GEMM mode): a bf16 y is the f32 y rounded once (bf16_staging.h); y16 and
// dx16 receive the f32 y (the final dx, after accumulation) rounded once, row by row.
#include <algorithm>
#include <cmath>

#include "backend/cpu/bf16_staging.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

constexpr int64_t kColBlock = 64;  // columns per thread in the dw reduction
// Loops with less work than this run on one thread: starting an OpenMP team costs more.
constexpr int64_t kParallelMinWork = int64_t{1} << 14;

// Rows of `width` values `stride` apart, rounded into a dense bf16 copy [rows, width].
void round_rows(const Tensor& dst16, const float* src, int64_t rows, int64_t width, int64_t stride) {
  auto* dst = static_cast<uint16_t*>(dst16.data);
  for (int64_t n = 0; n < rows; ++n) round_to_bf16(dst + n * width, src + n * stride, width);
}

}  // namespace

// r = (mean(x²) + eps)^-1/2,  y = out_scale · x · r ⊙ w   (docs/derivations.md App. A)
void CpuBackend::rmsnorm_fwd(Context, const RmsNormFwdArgs& a) {
  constexpr std::string_view kOp = "rmsnorm_fwd";
  const RmsNormDims dims = validate_rmsnorm_fwd(a, Device::kCPU);
  const int64_t xs = dims.x_stride, ys = dims.y_stride;
  const DType dt = a.x.dtype;
  Bf16Staging staged(scratch_);
  const Tensor y_out = staged.output(a.y);
  dispatch_float(dt, kOp, [&]<class T>() {
    const T* x = a.x.ptr<T>();
    const T* w = a.w.ptr<T>();
    T* y = y_out.ptr<T>();
    T* rstd = a.rstd.ptr<T>();
    const int64_t width = a.width;
#pragma omp parallel for if (a.rows * width >= kParallelMinWork)
    for (int64_t n = 0; n < a.rows; ++n) {
      const T* xr = x + n * xs;
      T* yr = y + n * ys;
      double sum_sq = 0.0;
      for (int64_t j = 0; j < width; ++j) sum_sq += static_cast<double>(xr[j]) * xr[j];
      rstd[n] = static_cast<T>(1.0 / std::sqrt(sum_sq / static_cast<double>(width) + a.eps));
      const double r = rstd[n];
      for (int64_t j = 0; j < width; ++j) yr[j] = static_cast<T>(a.out_scale * (xr[j] * r) * w[j]);
    }
  });
  staged.finish();
  if (a.y16.defined()) round_rows(a.y16, a.y.ptr<float>(), a.rows, a.width, ys);  // validated: f32 y
}

// With x̂ = x·r and g = out_scale·dy ⊙ w   (docs/derivations.md App. A, out_scale folded into g):
//   dw += Σ_rows out_scale · dy ⊙ x̂
//   dx  = r · (g − x̂ · mean(g ⊙ x̂))          (overwritten, or added when dx_accumulate)
void CpuBackend::rmsnorm_bwd(Context, const RmsNormBwdArgs& a) {
  constexpr std::string_view kOp = "rmsnorm_bwd";
  const RmsNormDims dims = validate_rmsnorm_bwd(a, Device::kCPU);
  const int64_t xs = dims.x_stride, ys = dims.y_stride;
  const DType dt = a.x.dtype;
  dispatch_float(dt, kOp, [&]<class T>() {
    const T* x = a.x.ptr<T>();
    const T* w = a.w.ptr<T>();
    const T* dy = a.dy.ptr<T>();
    const T* rstd = a.rstd.ptr<T>();
    T* dx = a.dx.ptr<T>();
    T* dw = a.dw.ptr<T>();
    const int64_t width = a.width, rows = a.rows;
    const double s = a.out_scale;

    // dw first: it reads x, which an in-place dx (dx == x) would overwrite below.
    const int64_t n_blocks = (width + kColBlock - 1) / kColBlock;
#pragma omp parallel for if (rows * width >= kParallelMinWork)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t j0 = blk * kColBlock, j1 = std::min(width, j0 + kColBlock);
      double acc[kColBlock] = {};
      for (int64_t n = 0; n < rows; ++n) {
        const double r = rstd[n];
        const T* xr = x + n * xs;
        const T* dyr = dy + n * ys;
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += s * dyr[j] * (xr[j] * r);
      }
      for (int64_t j = j0; j < j1; ++j) dw[j] = static_cast<T>(dw[j] + acc[j - j0]);
    }

#pragma omp parallel for if (rows * width >= kParallelMinWork)
    for (int64_t n = 0; n < rows; ++n) {
      const double r = rstd[n];
      const T* xr = x + n * xs;
      const T* dyr = dy + n * ys;
      T* dxr = dx + n * xs;
      double mean_gx = 0.0;  // mean(g ⊙ x̂)
      for (int64_t j = 0; j < width; ++j) mean_gx += (s * dyr[j] * w[j]) * (xr[j] * r);
      mean_gx /= static_cast<double>(width);
      for (int64_t j = 0; j < width; ++j) {
        const double g = s * dyr[j] * w[j];
        const double grad = r * (g - (xr[j] * r) * mean_gx);
        dxr[j] = static_cast<T>(a.dx_accumulate ? dxr[j] + grad : grad);
      }
    }
  });
  if (a.dx16.defined()) round_rows(a.dx16, a.dx.ptr<float>(), a.rows, a.width, xs);  // validated: f32 dx
}

}  // namespace diffmoe
