// RMSNorm forward and backward (sources Appendix A) on the GPU.
//
// Design: one warp per row for everything that is per row (the row's sum of squares, y, and dx with
// its mean(g ⊙ x̂)); rows are `width` values at x + n·x_stride, so a norm can cover the first columns
// of a wider buffer. Per-element arithmetic and the row sums run in double, like the CPU reference
// (memory-bound here), and rstd is rounded to f32 before the forward uses it, as on the CPU.
// The weight gradient dw[j] = Σ_rows … is a column reduction, made deterministic without atomics
// in two passes: blocks of 32 columns × a fixed chunk of rows write double partial sums to the
// backend's scratch, then one thread per column adds the chunks in order into dw.
#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

constexpr int kRowsPerWarpBlock = kWarpsPerBlock;  // rows per block in the per-row kernels
constexpr int kColTile = 32;                       // dw: columns per block (one per lane)
constexpr int kRowLanes = kThreads / kColTile;     // dw: rows walked in parallel per block
constexpr int64_t kMaxRowChunks = 128;             // dw: at most this many partial sums per column
static_assert(kThreads % kColTile == 0, "dw blocks are kColTile columns × kRowLanes rows");

// Row chunks of the dw reduction: a function of `rows` only, so the result does not depend on the
// device. Each chunk has at least 64 rows, so a block does useful work.
int64_t dw_chunks(int64_t rows) { return std::clamp<int64_t>((rows + 63) / 64, 1, kMaxRowChunks); }

// Out: float, or bf16 in the bf16 GEMM mode where only GEMMs read y (rounded through f32).
template <class Out>
__global__ void rmsnorm_fwd_kernel(Out* y, float* rstd, const float* x, const float* w, int64_t rows, int64_t width,
                                   int64_t xs, int64_t ys, double eps, double out_scale) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = blockIdx.x * int64_t{kRowsPerWarpBlock} + threadIdx.x / kWarp; row < rows;
       row += int64_t{gridDim.x} * kRowsPerWarpBlock) {
    const float* xr = x + row * xs;
    Out* yr = y + row * ys;
    double sum_sq = 0.0;
    for (int64_t j = lane; j < width; j += kWarp) sum_sq += static_cast<double>(xr[j]) * xr[j];
    sum_sq = warp_sum(sum_sq);
    const float r32 = static_cast<float>(1.0 / sqrt(sum_sq / static_cast<double>(width) + eps));
    if (lane == 0) rstd[row] = r32;
    const double r = r32;  // the rounded value, as saved (the backward sees the same r)
    for (int64_t j = lane; j < width; j += kWarp) store_as(yr + j, out_scale * (xr[j] * r) * w[j]);
  }
}

// dx = r·(g − x̂·mean(g ⊙ x̂)),  g = out_scale·dy ⊙ w,  x̂ = x·r   (overwritten or accumulated)
__global__ void rmsnorm_bwd_dx_kernel(float* dx, const float* dy, const float* x, const float* w, const float* rstd,
                                      int64_t rows, int64_t width, int64_t xs, int64_t ys, double s,
                                      bool accumulate) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = blockIdx.x * int64_t{kRowsPerWarpBlock} + threadIdx.x / kWarp; row < rows;
       row += int64_t{gridDim.x} * kRowsPerWarpBlock) {
    const double r = rstd[row];
    const float* xr = x + row * xs;
    const float* dyr = dy + row * ys;
    float* dxr = dx + row * xs;
    double mean_gx = 0.0;
    for (int64_t j = lane; j < width; j += kWarp) mean_gx += (s * dyr[j] * w[j]) * (xr[j] * r);
    mean_gx = warp_sum(mean_gx) / static_cast<double>(width);
    // Each lane reads x[j] and dy[j] before it writes dx[j] at the same j: dx may alias x in place.
    for (int64_t j = lane; j < width; j += kWarp) {
      const double g = s * dyr[j] * w[j];
      const double grad = r * (g - (xr[j] * r) * mean_gx);
      dxr[j] = static_cast<float>(accumulate ? dxr[j] + grad : grad);
    }
  }
}

// Pass 1 of dw: partial[c][j] = Σ_{rows n of chunk c} out_scale·dy[n,j]·x̂[n,j], for a tile of 32
// columns (one per lane) with kRowLanes rows walked in parallel and summed in a fixed order.
__global__ void rmsnorm_dw_partial_kernel(double* partial, const float* dy, const float* x, const float* rstd,
                                          int64_t rows, int64_t width, int64_t xs, int64_t ys, double s,
                                          int64_t rows_per_chunk) {
  __shared__ double acc[kRowLanes][kColTile];
  const int col_lane = threadIdx.x % kColTile, row_lane = threadIdx.x / kColTile;
  const int64_t j = blockIdx.x * int64_t{kColTile} + col_lane;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
  double sum = 0.0;
  if (j < width) {
    for (int64_t n = r0 + row_lane; n < r1; n += kRowLanes) {
      const double r = rstd[n];
      sum += s * dy[n * ys + j] * (x[n * xs + j] * r);
    }
  }
  acc[row_lane][col_lane] = sum;
  __syncthreads();
  if (row_lane == 0 && j < width) {
    double total = 0.0;
    for (int k = 0; k < kRowLanes; ++k) total += acc[k][col_lane];
    partial[chunk * width + j] = total;
  }
}

// Pass 2 of dw: dw[j] += Σ_c partial[c][j] in chunk order.
__global__ void rmsnorm_dw_finish_kernel(float* dw, const double* partial, int64_t width, int64_t chunks) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < width; j += int64_t{gridDim.x} * blockDim.x) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * width + j];
    dw[j] = static_cast<float>(dw[j] + total);
  }
}

}  // namespace

void CudaBackend::rmsnorm_fwd(Context ctx, const RmsNormFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rmsnorm_fwd");
  const RmsNormDims d = validate_rmsnorm_fwd(a, Device::kCUDA);
  require_f32(a.x, "rmsnorm_fwd");
  if (a.rows == 0) return;
  const auto launch = [&](auto* y) {
    rmsnorm_fwd_kernel<<<grid_for(a.rows, kRowsPerWarpBlock), kThreads, 0, stream(ctx)>>>(
        y, f32(a.rstd), f32(a.x), f32(a.w), a.rows, a.width, d.x_stride, d.y_stride, a.eps, a.out_scale);
  };
  if (a.y.dtype == DType::kBF16) launch(static_cast<__nv_bfloat16*>(a.y.data));
  else launch(f32(a.y));
  CUDA_CHECK_LAUNCH("rmsnorm_fwd");
}

void CudaBackend::rmsnorm_bwd(Context ctx, const RmsNormBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rmsnorm_bwd");
  const RmsNormDims d = validate_rmsnorm_bwd(a, Device::kCUDA);
  require_f32(a.x, "rmsnorm_bwd");
  if (a.rows == 0) return;
  const cudaStream_t s = stream(ctx);
  // dw first: it reads x, which an in-place dx (dx == x) overwrites next.
  const int64_t chunks = dw_chunks(a.rows);
  const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
  auto* partial = static_cast<double*>(scratch(static_cast<size_t>(chunks * a.width) * sizeof(double)));
  const dim3 grid(static_cast<unsigned>((a.width + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  rmsnorm_dw_partial_kernel<<<grid, kThreads, 0, s>>>(partial, f32(a.dy), f32(a.x), f32(a.rstd), a.rows, a.width,
                                                      d.x_stride, d.y_stride, a.out_scale, rows_per_chunk);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
  rmsnorm_dw_finish_kernel<<<grid_for(a.width), kThreads, 0, s>>>(f32(a.dw), partial, a.width, chunks);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
  rmsnorm_bwd_dx_kernel<<<grid_for(a.rows, kRowsPerWarpBlock), kThreads, 0, s>>>(
      f32(a.dx), f32(a.dy), f32(a.x), f32(a.w), f32(a.rstd), a.rows, a.width, d.x_stride, d.y_stride, a.out_scale,
      a.dx_accumulate);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
}

}  // namespace diffmoe
