// Device helpers shared by the CUDA op files: launch sizes, warp and block reductions (fixed
// shapes, so results are bitwise reproducible), the device-side index check, and the f32 rule.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_issue.h"

namespace diffmoe::cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // default block for element-wise kernels
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // grid-stride loops cover the rest
constexpr unsigned kFullMask = 0xffffffffu;

// Bytes rounded up to 256, to carve several arrays out of one scratch or shared-memory block.
__host__ __device__ constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Blocks for n items at `per_block` items per block, capped (kernels loop grid-stride).
inline unsigned grid_for(int64_t n, int64_t per_block = kThreads) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, kMaxGrid));
}

// A float tensor that this op reads or writes in f32 only (the bf16 GEMM mode's bf16 tensors are
// the ones op_args.h names; everything else stays f32 on CUDA, f32 or f64 on the CPU).
inline void require_f32(const Tensor& t, std::string_view op) {
  DIFFMOE_CHECK(t.dtype == DType::kF32, "[{}] the CUDA backend computes this tensor in f32, got {}", op,
                dtype_name(t.dtype));
}

// An input the bf16 GEMM mode may hold in bf16 (op_validation's output_dtype, op_args.h): f32 or bf16.
inline void require_f32_or_bf16(const Tensor& t, std::string_view op, std::string_view name) {
  DIFFMOE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16,
                "[{}] {}: the CUDA backend reads f32 or (in the bf16 GEMM mode) bf16, got {}", op, name,
                dtype_name(t.dtype));
}

inline float* f32(const Tensor& t) { return static_cast<float*>(t.data); }

// dst[i] = bf16(src[i]) (round to nearest even) for i < n, on stream s (basic_ops.cu); `op` names
// the calling op in a launch error.
void f32_to_bf16(void* dst, const float* src, int64_t n, cudaStream_t s, std::string_view op);
// dst[i] = src[i] widened exactly to f32 for i < n, on stream s (basic_ops.cu).
void bf16_to_f32(float* dst, const void* src, int64_t n, cudaStream_t s, std::string_view op);
inline int32_t* i32(const Tensor& t) { return static_cast<int32_t*>(t.data); }

// Whether the Hopper GEMM kernels (TMA + wgmma: the bf16 and FP8 grouped ones) can run: sm_90a code
// on a 9.x device. Asked once per process (gemm_ops.cu; the backend drives one device).
bool grouped_hopper_usable();

// Stores v as an f32 or, for outputs that only bf16 GEMMs read (the bf16 GEMM mode plans those in
// bf16), rounded to bf16 through f32 as the CPU narrows.
__device__ __forceinline__ void store_as(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, double v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}

// ---------------------------------------------------------------- reductions

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `smem` holds blockDim.x/32 values. The shape
// of the reduction depends only on blockDim, so the result is reproducible.
template <class T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = lane < n_warps ? smem[lane] : T(0);
  return warp_sum(total);
}

__device__ inline float block_max(float v, float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const float m = lane < n_warps ? smem[lane] : -INFINITY;
  return warp_max(m);
}

// ---------------------------------------------------------------- index checks (device_issue.h)

// Records a bad index unless one was recorded before (the first one wins). Kept out of line: the
// callers' hot loops only carry the comparison (an inlined atomic path cost registers and spills).
__device__ __noinline__ inline void report_bad_index(DeviceIssue* issue, IssueSite site, int64_t i, int32_t v,
                                                     int64_t limit) {
  if (atomicCAS(&issue->flag, 0, 1) == 0) {
    issue->site = static_cast<int32_t>(site);
    issue->index = i;
    issue->value = v;
    issue->limit = limit;
  }
}

// True when 0 <= v < limit (or v == −1 where allowed); otherwise records the first bad index.
__device__ __forceinline__ bool index_ok(DeviceIssue* issue, IssueSite site, int64_t i, int32_t v, int64_t limit,
                                         bool allow_ignore = false) {
  if ((v >= 0 && v < limit) || (allow_ignore && v == -1)) return true;
  report_bad_index(issue, site, i, v, limit);
  return false;
}

}  // namespace diffmoe::cuda
