// What the memory-bound element-wise kernels share (MoE dispatch, SwiGLU, cross-entropy, the MLA
// split, RoPE): 16-byte vector access and a (row, item) loop without 64-bit divisions.
//
// Why: these kernels move bytes and do little arithmetic, so what limits them is the number of
// memory instructions and index operations per byte. One thread per element with a 64-bit
// `i / width, i % width` spends ~100 instructions per 4 bytes moved; a float4 load or store moves
// 16 bytes in one instruction (a bf16 output: four values, 8 bytes).
// - A kernel takes its vector path only where the host checked (vec_sizes, vec_aligned) that every
//   vector starts on its own alignment: row widths and column offsets multiples of kVec, base
//   pointers aligned. Everything else takes a scalar path with the same formulas (double sums may
//   run in another order), so the path does not change results beyond the last bit of a double
//   (tests run both: odd widths and unaligned views).
// - bf16 stores round each f32 value to nearest even (__float2bfloat16_rn), the same rounding as
//   store_as (cuda_common.cuh); bf16 loads widen to f32 exactly (load4, load1), so a kernel
//   templated on its input type computes the same formulas on bf16 inputs (the bf16 GEMM mode's
//   activations that a GEMM wrote in bf16: docs/model.md §7).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string_view>

#include "backend/cuda/cuda_common.cuh"

namespace diffmoe::cuda {

constexpr int kVec = 4;  // values per vector access: one float4

// ---------------------------------------------------------------- host-side checks

// p is aligned for kVec values of T at a time (16 bytes for f32, 8 for bf16).
template <class T>
inline bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) == 0;
}
// Every size (widths, strides, column offsets) is a multiple of kVec.
inline bool vec_sizes(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes)
    if (s % kVec != 0) return false;
  return true;
}

// ---------------------------------------------------------------- device access

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
// Four bf16 values, 8 bytes, in one load, widened to f32 (exact).
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 bits = *reinterpret_cast<const uint2*>(p);
  __nv_bfloat162 lo, hi;
  memcpy(&lo, &bits.x, sizeof lo);
  memcpy(&hi, &bits.y, sizeof hi);
  const float2 l = __bfloat1622float2(lo), h = __bfloat1622float2(hi);
  return make_float4(l.x, l.y, h.x, h.y);
}
// Scalar load as f32: as it is, or a bf16 value widened (exact).
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Two f32 values rounded to bf16 and packed (the lower address in the low half).
__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
// Four bf16 values, 8 bytes, in one store (a struct of two bf16x2 was split into two 4-byte stores).
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bf16x2_bits(v.x, v.y), bf16x2_bits(v.z, v.w));
}

// Scalar store of an f32 value: as it is, or rounded to bf16.
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Component i (0…3) of a float4, for loops over its values (unrolled: i is a constant there).
__device__ __forceinline__ float& at(float4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float at(const float4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// ---------------------------------------------------------------- (row, item) loops

// Work of `per_row` items on each of `rows` rows, handed out `rows_per_block` rows per block
// (grid-stride over row groups): the block's items are numbered in 32 bits, so row and item come
// from one 32-bit division instead of a 64-bit one per element.
struct RowItems {
  int64_t rows = 0;
  int32_t per_row = 1, rows_per_block = 1;
};

constexpr int kItemsPerBlock = 2048;  // items one block takes per row group (8 per thread at 256)

// Host: rows_per_block so that a block gets about kItemsPerBlock items (at least one row).
inline RowItems row_items(int64_t rows, int64_t per_row, std::string_view op) {
  DIFFMOE_CHECK(per_row >= 1 && per_row <= (int64_t{1} << 30), "[{}] {} items per row are outside [1, 2^30]", op,
                per_row);
  const int64_t rpb = std::max<int64_t>(1, kItemsPerBlock / per_row);
  return RowItems{.rows = rows, .per_row = static_cast<int32_t>(per_row), .rows_per_block = static_cast<int32_t>(rpb)};
}
inline unsigned row_items_grid(const RowItems& ri) { return grid_for(ri.rows, ri.rows_per_block); }

// Calls f(row, item) for every item of every row (one thread per item).
template <class F>
__device__ __forceinline__ void for_each_row_item(const RowItems& ri, F&& f) {
  const int32_t block_items = ri.rows_per_block * ri.per_row;
  for (int64_t row0 = blockIdx.x * int64_t{ri.rows_per_block}; row0 < ri.rows;
       row0 += int64_t{gridDim.x} * ri.rows_per_block) {
    for (int32_t j = threadIdx.x; j < block_items; j += blockDim.x) {
      const int32_t local = j / ri.per_row;
      const int64_t row = row0 + local;
      if (row >= ri.rows) break;  // j only grows: every later item is past the end too
      f(row, j - local * ri.per_row);
    }
  }
}

// a mod m for 0 ≤ a, 0 < m, in 32 bits where both fit (the usual case), else in 64.
__device__ __forceinline__ int64_t mod_nonneg(int64_t a, int64_t m) {
  if (((a | m) >> 31) == 0) return static_cast<uint32_t>(a) % static_cast<uint32_t>(m);
  return a % m;
}

}  // namespace diffmoe::cuda
