// RMSNorm forward and backward (sources Appendix A) on the GPU.
//
// Rows are `width` values at x + n·x_stride, so a norm can cover the first columns of a wider
// buffer (kv_norm). The op is memory-bound: the forward must move x in and y out once, the backward
// x, dy in and dx out (plus dx in when it accumulates). Two paths:
//
// Vector path (width, strides multiples of 4, pointers 16-byte aligned, width ≤ 8192: every shape
// the model uses). A row belongs to a team of kTeam threads: one warp for rows of ≤ 512 columns
// (eight rows per block at a time), else the whole block of 128 or 512 threads. Each thread holds
// kVec ≤ 4 packs of 4 columns in registers (pack k of thread t: columns 4·(t + k·kTeam) … +3), so
// x and dy are read once with 16-byte loads, and all loads of a row are in flight together.
// Arithmetic: r = rsqrt(Σx²/width + eps) in f64 (exact squares, a fixed tree; rsqrt ≤ 1 ulp there),
// rounded to f32 and saved; the forward then computes y = out_scale·(x·r)·w in f64 with that r and
// rounds once, like the CPU (a few f64 ops per element cost nothing at this arithmetic intensity).
// The backward reads the saved rstd and computes in f32 (more work per byte; a few roundings per
// element, bounded in tests/ops/cuda_vs_cpu.cpp), with Σg·x̂ added in f64 per row.
// The backward fuses the weight gradient into the dx pass: block b owns the fixed row chunk
// [b·C, (b+1)·C), each thread adds its columns' dy·x̂ over the chunk's rows it handles (f32), the
// block's teams add those in team order (f64) into partial[b][j] (f32), and a second kernel adds
// the chunks in a fixed order (f64) into dw. C depends on `rows` only (chunk_rows), never on the
// device, and there are no atomics: the result is bitwise reproducible.
//
// General path (anything else: odd widths or strides, unaligned views, wider rows): one warp per
// row with scalar loads and f64 arithmetic, and dw in a separate column pass over dy and x.
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/op_validation.h"

namespace diffmoe {
namespace {

using namespace cuda;

template <int N>
using Int = std::integral_constant<int, N>;

// ================================================================ vector path

constexpr int kPack = 4;                        // columns per 16-byte access
constexpr int kMaxVec = 4;                      // packs per thread per row
constexpr int kWarpTeamBlock = 256;             // block of the warp-team kernels: 8 rows at a time
constexpr int kMidTeam = 128, kWideTeam = 512;  // block teams for wider rows (≤ 512·4·4 = 8192)
constexpr int64_t kMinChunkRows = 32;           // dw: rows per block at least …
constexpr int64_t kMaxChunks = 1024;            // … and at most this many partial rows per call

__host__ __device__ constexpr int block_threads(int team) { return team == kWarp ? kWarpTeamBlock : team; }
static_assert(kWarpTeamBlock % kWarp == 0 && kMidTeam % kWarp == 0 && kWideTeam % kWarp == 0,
              "block_sum needs whole warps");

// Which team and how many packs per thread cover a row of `width` columns; team 0: too wide.
struct VecTiling {
  int team = 0, vec = 0;
};

VecTiling vec_tiling(int64_t width) {
  const int64_t packs = width / kPack;
  for (const int team : {kWarp, kMidTeam, kWideTeam})
    if (packs <= int64_t{team} * kMaxVec) return {team, static_cast<int>((packs + team - 1) / team)};
  return {};
}

// Calls f(Int<team>, Int<vec>) for the tiling; block teams only ever need vec ≥ 2 (a row that fits
// one pack per thread of a block fits a warp's four).
template <int kTeam, class F>
void with_vec(int vec, F&& f) {
  switch (vec) {
    case 1:
      if constexpr (kTeam == kWarp) return f(Int<kTeam>{}, Int<1>{});
      break;
    case 2: return f(Int<kTeam>{}, Int<2>{});
    case 3: return f(Int<kTeam>{}, Int<3>{});
    case 4: return f(Int<kTeam>{}, Int<4>{});
    default: break;
  }
  DIFFMOE_FAIL("[rmsnorm] no kernel for team {} with {} packs per thread", kTeam, vec);
}

template <class F>
void with_tiling(const VecTiling& t, F&& f) {
  switch (t.team) {
    case kWarp: return with_vec<kWarp>(t.vec, f);
    case kMidTeam: return with_vec<kMidTeam>(t.vec, f);
    case kWideTeam: return with_vec<kWideTeam>(t.vec, f);
    default: DIFFMOE_FAIL("[rmsnorm] no vector kernel for team {}", t.team);
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Sum over the row's team; every thread of the team gets it. Block teams: all threads of the
// block must call (the row loops are uniform over a team).
template <int kTeam>
__device__ __forceinline__ double team_sum(double v, double* smem) {
  if constexpr (kTeam == kWarp) return warp_sum(v);
  else return block_sum(v, smem);
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  uint2 bits;
  bits.x = *reinterpret_cast<const uint32_t*>(&lo);
  bits.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = bits;
}
// Σx² of a pack in f64 (each square is exact there).
__device__ __forceinline__ double sum_sq(float4 v) {
  const double a = v.x, b = v.y, c = v.z, d = v.w;
  return a * a + b * b + c * c + d * d;
}

// y = out_scale · x·r ⊙ w,  r = (Σx²/width + eps)^-1/2 (f64, rounded to f32 and saved in rstd).
// y is computed in f64 and rounded once, like the CPU: given the same r, the same f32 (and so the
// same bf16). Out: float, or bf16 in the bf16 GEMM mode where only GEMMs read y.
// y16 (not null): y rounded to bf16 as well, rows of `width`.
template <int kTeam, int kVec, class Out>
__global__ void __launch_bounds__(block_threads(kTeam))
    rmsnorm_fwd_vec_kernel(Out* y, __nv_bfloat16* y16, float* rstd, const float* x, const float* w, int64_t rows,
                           int width, int64_t xs, int64_t ys, double eps, double out_scale) {
  constexpr int kTeams = block_threads(kTeam) / kTeam;
  constexpr int kStride = kTeam * kPack;  // columns between a thread's packs
  __shared__ double smem[kWarp];
  const int c0 = static_cast<int>(threadIdx.x) % kTeam * kPack;  // the thread's first column
  double wd[kVec][kPack];                                        // w of this thread's columns, the same for every row
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const float4 v = c0 + k * kStride < width ? load4(w + c0 + k * kStride) : make_float4(0.f, 0.f, 0.f, 0.f);
    wd[k][0] = v.x;
    wd[k][1] = v.y;
    wd[k][2] = v.z;
    wd[k][3] = v.w;
  }
  for (int64_t row = blockIdx.x * int64_t{kTeams} + threadIdx.x / kTeam; row < rows;
       row += int64_t{gridDim.x} * kTeams) {
    const float* xr = x + row * xs + c0;
    float4 xv[kVec];
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      xv[k] = c0 + k * kStride < width ? load4(xr + k * kStride) : make_float4(0.f, 0.f, 0.f, 0.f);
      ss += sum_sq(xv[k]);
    }
    ss = team_sum<kTeam>(ss, smem);
    const float r32 = static_cast<float>(rsqrt(ss / static_cast<double>(width) + eps));
    if (c0 == 0) rstd[row] = r32;
    const double r = r32;  // the rounded value, as saved (the backward sees the same r)
    Out* yr = y + row * ys + c0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (c0 + k * kStride < width) {
        const float4 v = xv[k];
        const auto out = [&](float xj, int e) {
          return static_cast<float>(out_scale * (static_cast<double>(xj) * r) * wd[k][e]);
        };
        const float4 yv = make_float4(out(v.x, 0), out(v.y, 1), out(v.z, 2), out(v.w, 3));
        store4(yr + k * kStride, yv);
        if (y16 != nullptr) store4(y16 + row * width + c0 + k * kStride, yv);
      }
    }
  }
}

// Rows per dw chunk: a function of `rows` alone, so the reduction's shape (and its result) does
// not depend on the device.
int64_t chunk_rows(int64_t rows) { return std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks); }

// With x̂ = x·r, g = out_scale·dy ⊙ w, m = mean(g ⊙ x̂):
//   dx = r·(g − x̂·m)   (overwritten, or added when accumulate; dx may be x: each thread reads its
//                       columns of a row, all of them, before it writes them)
//   dx16 = bf16(dx)     (when dx16 is not null: rows of `width`, the final dx rounded once)
//   partial[b][j] = out_scale · Σ_{rows n of chunk b} dy[n,j]·x̂[n,j]
template <int kTeam, int kVec>
__global__ void __launch_bounds__(block_threads(kTeam))
    rmsnorm_bwd_vec_kernel(float* dx, __nv_bfloat16* dx16, float* partial, const float* dy, const float* x,
                           const float* w, const float* rstd, int64_t rows, int width, int64_t xs, int64_t ys,
                           float out_scale, int64_t rows_per_chunk, bool accumulate) {
  constexpr int kBlock = block_threads(kTeam), kTeams = kBlock / kTeam;
  constexpr int kStride = kTeam * kPack;     // columns between a thread's packs
  constexpr int kTeamCols = kStride * kVec;  // the columns one team covers
  __shared__ double smem[kWarp];
  __shared__ double dw_sum[kTeams > 1 ? kTeamCols : 1];  // the teams' sums, added in team order
  const int team = static_cast<int>(threadIdx.x) / kTeam;
  const int c0 = static_cast<int>(threadIdx.x) % kTeam * kPack;  // the thread's first column
  const int64_t r0 = blockIdx.x * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);

  float4 acc[kVec];  // Σ dy·x̂ over this thread's rows, its columns
#pragma unroll
  for (int k = 0; k < kVec; ++k) acc[k] = zero;
  for (int64_t row = r0 + team; row < r1; row += kTeams) {
    const float r = rstd[row];
    const float* xr = x + row * xs + c0;
    const float* dyr = dy + row * ys + c0;
    float* dxr = dx + row * xs + c0;
    float4 xh[kVec], g[kVec], old[kVec];  // x̂, g, and dx before the call when accumulating
    double gx = 0.0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const bool in = c0 + k * kStride < width;
      const float4 xv = in ? load4(xr + k * kStride) : zero;
      const float4 dv = in ? load4(dyr + k * kStride) : zero;
      const float4 wv = in ? __ldg(reinterpret_cast<const float4*>(w + c0 + k * kStride)) : zero;
      old[k] = accumulate && in ? load4(dxr + k * kStride) : zero;
      xh[k] = make_float4(xv.x * r, xv.y * r, xv.z * r, xv.w * r);
      g[k] = make_float4(out_scale * dv.x * wv.x, out_scale * dv.y * wv.y, out_scale * dv.z * wv.z,
                         out_scale * dv.w * wv.w);
      acc[k].x = fmaf(dv.x, xh[k].x, acc[k].x);
      acc[k].y = fmaf(dv.y, xh[k].y, acc[k].y);
      acc[k].z = fmaf(dv.z, xh[k].z, acc[k].z);
      acc[k].w = fmaf(dv.w, xh[k].w, acc[k].w);
      gx += static_cast<double>(fmaf(g[k].w, xh[k].w, fmaf(g[k].z, xh[k].z, fmaf(g[k].y, xh[k].y, g[k].x * xh[k].x))));
    }
    gx = team_sum<kTeam>(gx, smem);
    const float m = static_cast<float>(gx / static_cast<double>(width));
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (c0 + k * kStride < width) {
        const float4 a = xh[k], b = g[k], o = old[k];
        const float4 v = make_float4(o.x + r * fmaf(-a.x, m, b.x), o.y + r * fmaf(-a.y, m, b.y),
                                     o.z + r * fmaf(-a.z, m, b.z), o.w + r * fmaf(-a.w, m, b.w));
        store4(dxr + k * kStride, v);
        if (dx16 != nullptr) store4(dx16 + row * width + c0 + k * kStride, v);
      }
    }
  }

  // This chunk's dw partial: out_scale · Σ_teams (in team order) of the threads' sums.
  float* out = partial + blockIdx.x * int64_t{width};
  if constexpr (kTeams == 1) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float4 a = acc[k];
      if (c0 + k * kStride < width)
        store4(out + c0 + k * kStride, make_float4(out_scale * a.x, out_scale * a.y, out_scale * a.z, out_scale * a.w));
    }
  } else {
    for (int k_team = 0; k_team < kTeams; ++k_team) {
      if (team == k_team) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          double* d = dw_sum + c0 + k * kStride;  // < kTeamCols; columns ≥ width add zeros
          const float4 a = acc[k];
          const bool first = k_team == 0;
          d[0] = (first ? 0.0 : d[0]) + a.x;
          d[1] = (first ? 0.0 : d[1]) + a.y;
          d[2] = (first ? 0.0 : d[2]) + a.z;
          d[3] = (first ? 0.0 : d[3]) + a.w;
        }
      }
      __syncthreads();
    }
    for (int j = static_cast<int>(threadIdx.x); j < width; j += kBlock)
      out[j] = static_cast<float>(out_scale * dw_sum[j]);
  }
}

// ================================================================ general path

constexpr int kRowsPerWarpBlock = kWarpsPerBlock;  // rows per block in the per-row kernels
constexpr int kColTile = 32;                       // dw: columns per block (one per lane)
constexpr int kRowLanes = kThreads / kColTile;     // dw: rows walked in parallel per block
constexpr int64_t kMaxRowChunks = 128;             // dw: at most this many partial sums per column
static_assert(kThreads % kColTile == 0, "dw blocks are kColTile columns × kRowLanes rows");

// Row chunks of the general path's dw reduction: a function of `rows` only. Each chunk has at
// least 64 rows, so a block does useful work.
int64_t dw_chunks(int64_t rows) { return std::clamp<int64_t>((rows + 63) / 64, 1, kMaxRowChunks); }

template <class Out>
__global__ void rmsnorm_fwd_kernel(Out* y, __nv_bfloat16* y16, float* rstd, const float* x, const float* w,
                                   int64_t rows, int64_t width, int64_t xs, int64_t ys, double eps, double out_scale) {
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
    for (int64_t j = lane; j < width; j += kWarp) {
      const double v = out_scale * (xr[j] * r) * w[j];
      store_as(yr + j, v);
      if (y16 != nullptr) y16[row * width + j] = __float2bfloat16_rn(static_cast<float>(v));  // via f32: y's value
    }
  }
}

// dx = r·(g − x̂·mean(g ⊙ x̂)),  g = out_scale·dy ⊙ w,  x̂ = x·r   (overwritten or accumulated)
__global__ void rmsnorm_bwd_dx_kernel(float* dx, __nv_bfloat16* dx16, const float* dy, const float* x, const float* w,
                                      const float* rstd, int64_t rows, int64_t width, int64_t xs, int64_t ys, double s,
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
      const float v = static_cast<float>(accumulate ? dxr[j] + grad : grad);
      dxr[j] = v;
      if (dx16 != nullptr) dx16[row * width + j] = __float2bfloat16_rn(v);
    }
  }
}

// Pass 1 of the general path's dw: partial[c][j] = Σ_{rows n of chunk c} out_scale·dy[n,j]·x̂[n,j],
// for a tile of 32 columns (one per lane) with kRowLanes rows walked in parallel and summed in a
// fixed order.
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

// ================================================================ dw: the chunks in order

constexpr int kFinishLanes = 32;  // chunk lanes per column in the finishing block
constexpr int kFinishThreads = kColTile * kFinishLanes;

// dw[j] += Σ_c partial[c][j] (f64): lane l of column j adds chunks l, l + 32, … in order, then
// lane 0 adds the 32 lane sums in order. T: the partials' type (f32 vector path, f64 general).
template <class T>
__global__ void __launch_bounds__(kFinishThreads)
    rmsnorm_dw_finish_kernel(float* dw, const T* partial, int64_t width, int64_t chunks) {
  __shared__ double sums[kFinishLanes][kColTile + 1];
  const int col = threadIdx.x % kColTile, lane = threadIdx.x / kColTile;
  const int64_t j = blockIdx.x * int64_t{kColTile} + col;
  double s = 0.0;
  if (j < width)
    for (int64_t c = lane; c < chunks; c += kFinishLanes) s += static_cast<double>(partial[c * width + j]);
  sums[lane][col] = s;
  __syncthreads();
  if (lane == 0 && j < width) {
    double total = 0.0;
    for (int k = 0; k < kFinishLanes; ++k) total += sums[k][col];
    dw[j] = static_cast<float>(dw[j] + total);
  }
}

template <class T>
void launch_dw_finish(float* dw, const T* partial, int64_t width, int64_t chunks, cudaStream_t s) {
  rmsnorm_dw_finish_kernel<T><<<grid_for(width, kColTile), kFinishThreads, 0, s>>>(dw, partial, width, chunks);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
}

}  // namespace

void CudaBackend::rmsnorm_fwd(Context ctx, const RmsNormFwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rmsnorm_fwd");
  const RmsNormDims d = validate_rmsnorm_fwd(a, Device::kCUDA);
  require_f32(a.x, "rmsnorm_fwd");
  if (a.rows == 0) return;
  const cudaStream_t s = stream(ctx);
  const bool bf16 = a.y.dtype == DType::kBF16;
  const VecTiling tiling = vec_tiling(a.width);
  auto* y16 = a.y16.defined() ? static_cast<__nv_bfloat16*>(a.y16.data) : nullptr;  // f32 y's bf16 copy
  const bool vec = tiling.team != 0 && a.width % kPack == 0 && d.x_stride % kPack == 0 && d.y_stride % kPack == 0 &&
                   aligned(a.x.data, 16) && aligned(a.w.data, 16) && aligned(a.y.data, bf16 ? 8 : 16) &&
                   (y16 == nullptr || aligned(y16, 8));
  if (vec) {
    with_tiling(tiling, [&](auto team, auto vec_packs) {
      constexpr int kTeam = decltype(team)::value, kVec = decltype(vec_packs)::value;
      constexpr int kBlock = block_threads(kTeam), kTeams = kBlock / kTeam;
      // Rows are independent here: the grid only has to fill the GPU (a few waves), and a block
      // that loops over rows loads w once.
      const unsigned blocks =
          std::min<unsigned>(grid_for(a.rows, kTeams), static_cast<unsigned>(multiprocessors() * (4 * 2048 / kBlock)));
      const auto launch = [&](auto* y) {
        rmsnorm_fwd_vec_kernel<kTeam, kVec><<<blocks, kBlock, 0, s>>>(y, y16, f32(a.rstd), f32(a.x), f32(a.w), a.rows,
                                                                      static_cast<int>(a.width), d.x_stride, d.y_stride,
                                                                      a.eps, a.out_scale);
      };
      if (bf16) launch(static_cast<__nv_bfloat16*>(a.y.data));
      else launch(f32(a.y));
    });
    CUDA_CHECK_LAUNCH("rmsnorm_fwd");
    return;
  }
  const auto launch = [&](auto* y) {
    rmsnorm_fwd_kernel<<<grid_for(a.rows, kRowsPerWarpBlock), kThreads, 0, s>>>(
        y, y16, f32(a.rstd), f32(a.x), f32(a.w), a.rows, a.width, d.x_stride, d.y_stride, a.eps, a.out_scale);
  };
  if (bf16) launch(static_cast<__nv_bfloat16*>(a.y.data));
  else launch(f32(a.y));
  CUDA_CHECK_LAUNCH("rmsnorm_fwd");
}

void CudaBackend::rmsnorm_bwd(Context ctx, const RmsNormBwdArgs& a) {
  const OpScope profile_scope(*this, stream(ctx), "rmsnorm_bwd");
  const RmsNormDims d = validate_rmsnorm_bwd(a, Device::kCUDA);
  require_f32(a.x, "rmsnorm_bwd");
  if (a.rows == 0) return;
  const cudaStream_t s = stream(ctx);
  const VecTiling tiling = vec_tiling(a.width);
  // dx16: the final dx rounded to bf16 (the bf16 GEMM mode's copy of the residual gradient for the
  // next backward GEMMs), else null.
  auto* dx16 = a.dx16.defined() ? static_cast<__nv_bfloat16*>(a.dx16.data) : nullptr;
  const bool vec = tiling.team != 0 && a.width % kPack == 0 && d.x_stride % kPack == 0 && d.y_stride % kPack == 0 &&
                   aligned(a.x.data, 16) && aligned(a.dx.data, 16) && aligned(a.dy.data, 16) && aligned(a.w.data, 16) &&
                   (dx16 == nullptr || aligned(dx16, 8));
  if (vec) {
    const int64_t rows_per_chunk = chunk_rows(a.rows);
    const int64_t chunks = (a.rows + rows_per_chunk - 1) / rows_per_chunk;
    auto* partial = static_cast<float*>(scratch(static_cast<size_t>(chunks * a.width) * sizeof(float)));
    with_tiling(tiling, [&](auto team, auto vec_packs) {
      constexpr int kTeam = decltype(team)::value, kVec = decltype(vec_packs)::value;
      rmsnorm_bwd_vec_kernel<kTeam, kVec><<<static_cast<unsigned>(chunks), block_threads(kTeam), 0, s>>>(
          f32(a.dx), dx16, partial, f32(a.dy), f32(a.x), f32(a.w), f32(a.rstd), a.rows, static_cast<int>(a.width),
          d.x_stride, d.y_stride, static_cast<float>(a.out_scale), rows_per_chunk, a.dx_accumulate);
    });
    CUDA_CHECK_LAUNCH("rmsnorm_bwd");
    launch_dw_finish(f32(a.dw), partial, a.width, chunks, s);
    return;
  }
  // dw first: it reads x, which an in-place dx (dx == x) overwrites next.
  const int64_t chunks = dw_chunks(a.rows);
  const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
  auto* partial = static_cast<double*>(scratch(static_cast<size_t>(chunks * a.width) * sizeof(double)));
  const dim3 grid(static_cast<unsigned>((a.width + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  rmsnorm_dw_partial_kernel<<<grid, kThreads, 0, s>>>(partial, f32(a.dy), f32(a.x), f32(a.rstd), a.rows, a.width,
                                                      d.x_stride, d.y_stride, a.out_scale, rows_per_chunk);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
  launch_dw_finish(f32(a.dw), partial, a.width, chunks, s);
  rmsnorm_bwd_dx_kernel<<<grid_for(a.rows, kRowsPerWarpBlock), kThreads, 0, s>>>(
      f32(a.dx), dx16, f32(a.dy), f32(a.x), f32(a.w), f32(a.rstd), a.rows, a.width, d.x_stride, d.y_stride, a.out_scale,
      a.dx_accumulate);
  CUDA_CHECK_LAUNCH("rmsnorm_bwd");
}

}  // namespace diffmoe
