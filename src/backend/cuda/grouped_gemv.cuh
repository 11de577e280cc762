// Grouped GEMM for groups of few rows (GroupedGemmArgs::max_group_rows ≤ kGemvMaxRows, op_args.h): the decode
// engine's expert GEMMs and per-head absorptions, where every group has at most the step's tokens as rows (one at
// batch 1). The tiled kernels (grouped_gemm_tma.cuh) give such a group one 128 × 256 tile per 256 columns, so a
// decode step streams each expert's weights through a handful of CTAs (~17 µs per call on the H100 for the bench
// preset's 4 experts of 512 × 1536). Here the weights are streamed by every SM at once:
//   fwd   (trans_b, B[g] [n, k]): a warp per kGemvColsPerWarp columns, its lanes over k in 8-element runs (16-byte
//         loads of bf16 B where k % 8 == 0 and the tensors are 16-byte aligned), a row accumulator per column, summed
//         over the warp at the end;
//   dgrad (B[g] [k, n]): a thread per (column, k slice), B read coalesced along n, the slices' sums added in order.
// A group's rows of A are read through L1 by every warp (at most 8 × k values). Operands are rounded to bf16 (round
// to nearest even) as the bf16 GEMM mode does (backend.h GemmPrecision::kBF16) and multiplied exactly in f32; the
// sums run in a fixed order, so results are reproducible. C = alpha·A·op(B) + beta·C, or a bf16 C with beta = 0.
// A group with more rows than max_group_rows (kGroupedGemmMaxRows), or offsets out of order, is reported and skipped
// (device_issue.h).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/device_issue.h"

namespace diffmoe::cuda {

constexpr int kGemvMaxRows = 8;      // the most rows per group this kernel takes (the accumulators per thread)
constexpr int kGemvThreads = 256;    // threads per block
constexpr int kGemvColsPerWarp = 2;  // fwd: columns a warp sums together (each A value loaded once for both)
constexpr int kGemvFwdCols = kGemvThreads / kWarp * kGemvColsPerWarp;  // fwd columns per block
constexpr int kGemvVec = 8;                                            // elements per vector load (16 bytes of bf16)
constexpr int kGemvDgradCols = 64;                                     // dgrad: columns per block
constexpr int kGemvDgradSlices = kGemvThreads / kGemvDgradCols;        // dgrad: threads per column (k slices)
static_assert(kGemvThreads % kWarp == 0, "whole warps");
static_assert(kGemvDgradCols % kWarp == 0 && kGemvThreads % kGemvDgradCols == 0, "dgrad slices of whole warps");

struct GroupedGemvParams {
  const void* a = nullptr;  // [R, k], f32 or bf16
  const void* b = nullptr;  // fwd [G, n, k], dgrad [G, k, n]; f32 or bf16
  float* c = nullptr;       // [R, n] f32, or null with c16
  __nv_bfloat16* c16 = nullptr;
  const int32_t* offsets = nullptr;  // [G + 1]
  int rows = 0, groups = 0, n = 0, k = 0, max_rows = 0;
  float alpha = 1.0f, beta = 0.0f;
  DeviceIssue* issue = nullptr;
};

// A value as the bf16 GEMM mode multiplies it: bf16 as stored, f32 rounded to bf16 (nearest even).
__device__ __forceinline__ float gemv_operand(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float gemv_operand(__nv_bfloat16 v) { return __bfloat162float(v); }

// kGemvVec consecutive operands at p (16-byte aligned when kVec; any alignment otherwise).
template <bool kVec, class T>
__device__ __forceinline__ void gemv_load(const T* p, float (&out)[kGemvVec]) {
  if constexpr (kVec && sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int i = 0; i < kGemvVec; ++i) out[i] = __bfloat162float(h[i]);
  } else if constexpr (kVec) {
    const float4 x = reinterpret_cast<const float4*>(p)[0], y = reinterpret_cast<const float4*>(p)[1];
    const float v[kGemvVec] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
#pragma unroll
    for (int i = 0; i < kGemvVec; ++i) out[i] = gemv_operand(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kGemvVec; ++i) out[i] = gemv_operand(p[i]);
  }
}

// Group g's first row and row count, or −1 rows after reporting a bad bound (the block then returns).
__device__ __forceinline__ int gemv_group(const GroupedGemvParams& p, int g, int* lo) {
  *lo = __ldg(p.offsets + g);
  const int hi = __ldg(p.offsets + g + 1), rows = hi - *lo;
  const bool in_order = *lo >= 0 && rows >= 0 && hi <= p.rows && (g != 0 || *lo == 0);
  if (!in_order || rows > p.max_rows) {
    if (threadIdx.x == 0) {
      if (!in_order) report_bad_index(p.issue, IssueSite::kGroupedGemmOffsets, g + 1, hi, p.rows);
      else report_bad_index(p.issue, IssueSite::kGroupedGemmMaxRows, g + 1, rows, p.max_rows);
    }
    return -1;
  }
  return rows;
}

__device__ __forceinline__ void gemv_store(const GroupedGemvParams& p, int64_t i, float sum) {
  const float v = p.alpha * sum;
  if (p.c16 != nullptr) p.c16[i] = __float2bfloat16_rn(v);
  else p.c[i] = p.beta == 0.0f ? v : v + p.beta * p.c[i];  // beta = 0 never reads C
}

// fwd: C[lo + r, j] = alpha·Σ_k A[lo + r, k]·B[g, j, k] (+ beta·C). Grid (⌈n / kGemvFwdCols⌉, G). kVec: k % 8 == 0
// and 16-byte aligned A and B.
template <bool kVec, class TA, class TB>
__global__ void __launch_bounds__(kGemvThreads) grouped_gemv_fwd_kernel(GroupedGemvParams p) {
  int lo = 0;
  const int g = blockIdx.y, rows = gemv_group(p, g, &lo);
  if (rows <= 0) return;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int j0 = (blockIdx.x * (kGemvThreads / kWarp) + warp) * kGemvColsPerWarp;
  if (j0 >= p.n) return;
  const TA* a = static_cast<const TA*>(p.a) + int64_t{lo} * p.k;
  const TB* b = static_cast<const TB*>(p.b) + int64_t{g} * p.n * p.k;
  float acc[kGemvColsPerWarp][kGemvMaxRows] = {};
  for (int k0 = lane * kGemvVec; k0 < p.k; k0 += kWarp * kGemvVec) {
    const int len = min(kGemvVec, p.k - k0);  // < kGemvVec only without kVec (k % 8 ≠ 0)
    float bv[kGemvColsPerWarp][kGemvVec];
#pragma unroll
    for (int c = 0; c < kGemvColsPerWarp; ++c) {
      const int j = min(j0 + c, p.n - 1);  // a column past n repeats the last one and is not stored
      if (len == kGemvVec) gemv_load<kVec>(b + int64_t{j} * p.k + k0, bv[c]);
      else
        for (int i = 0; i < kGemvVec; ++i) bv[c][i] = i < len ? gemv_operand(b[int64_t{j} * p.k + k0 + i]) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
      if (r >= rows) break;
      float av[kGemvVec];
      if (len == kGemvVec) gemv_load<kVec>(a + int64_t{r} * p.k + k0, av);
      else
        for (int i = 0; i < kGemvVec; ++i) av[i] = i < len ? gemv_operand(a[int64_t{r} * p.k + k0 + i]) : 0.0f;
#pragma unroll
      for (int c = 0; c < kGemvColsPerWarp; ++c)
#pragma unroll
        for (int i = 0; i < kGemvVec; ++i) acc[c][r] = fmaf(av[i], bv[c][i], acc[c][r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int c = 0; c < kGemvColsPerWarp; ++c) {
      const float sum = warp_sum(acc[c][r]);
      if (lane == 0 && j0 + c < p.n) gemv_store(p, int64_t{lo + r} * p.n + j0 + c, sum);
    }
  }
}

// dgrad: C[lo + r, j] = alpha·Σ_k A[lo + r, k]·B[g, k, j] (+ beta·C). Grid (⌈n / kGemvDgradCols⌉, G). A block is
// kGemvDgradSlices slices of kGemvDgradCols threads: slice t sums k = t, t + slices, … for its column (B read
// coalesced along n), then slice 0 adds the slices' partial sums in slice order (a fixed order: reproducible).
// Slicing k keeps every SM busy where n is narrow (the absorption's W^UK: n = r_kv, one block per head without it).
template <class TA, class TB>
__global__ void __launch_bounds__(kGemvThreads) grouped_gemv_dgrad_kernel(GroupedGemvParams p) {
  __shared__ float part[kGemvDgradSlices - 1][kGemvMaxRows][kGemvDgradCols];
  int lo = 0;
  const int g = blockIdx.y, rows = gemv_group(p, g, &lo);
  if (rows <= 0) return;
  const int col = threadIdx.x % kGemvDgradCols, slice = threadIdx.x / kGemvDgradCols;
  const int j = blockIdx.x * kGemvDgradCols + col;
  const TA* a = static_cast<const TA*>(p.a) + int64_t{lo} * p.k;
  const TB* b = static_cast<const TB*>(p.b) + int64_t{g} * p.k * p.n + min(j, p.n - 1);
  float acc[kGemvMaxRows] = {};
  for (int kk = slice; kk < p.k; kk += kGemvDgradSlices) {
    const float bv = gemv_operand(b[int64_t{kk} * p.n]);
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
      if (r >= rows) break;
      acc[r] = fmaf(gemv_operand(a[int64_t{r} * p.k + kk]), bv, acc[r]);
    }
  }
  if (slice > 0) {
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r)
      if (r < rows) part[slice - 1][r][col] = acc[r];
  }
  __syncthreads();
  if (slice > 0 || j >= p.n) return;
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
    if (r >= rows) break;
    float sum = acc[r];
    for (int t = 0; t < kGemvDgradSlices - 1; ++t) sum += part[t][r][col];
    gemv_store(p, int64_t{lo + r} * p.n + j, sum);
  }
}

}  // namespace diffmoe::cuda
