// Device side of the FP8 quantisers (fp8_quant_ops.cu; op_args.h's FP8 section, docs/model.md §7): the tile
// sizes, the scale rule and the e4m3 rounding, each written once so that every kernel computes the
// CPU's bits (core/dtype.cpp: e4m3_scale, f32_to_e4m3).
// - A value's code is e4m3(x · r) with r = 1 / s per tile (core/dtype.h e4m3_inverse_scale): r is one IEEE
//   reciprocal (__frcp_rn, the CPU's f32 1 / s) and x · r one IEEE product (__fmul_rn, never contracted);
//   the scale is one IEEE division (__fdiv_rn, whatever the compiler's flags), as the CPU's f32 `/`.
// - e4m3: cvt.rn.satfinite.e4m3x2.f32 (sm_89+): round to nearest even, ±448 for anything larger
//   (also ±inf), as f32_to_e4m3(x, saturate = true); a NaN becomes 0x7f whatever its sign, as on the
//   CPU (the instruction's NaN code is not specified to that bit).
// - amax is a max of |x| through fmaxf, which skips NaNs, as the CPU's std::fmax: the order of a
//   max does not matter, so warp and block reductions give the CPU's value exactly.
#pragma once
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace diffmoe::fp8 {

constexpr int kTile = 128;               // values per quantisation tile (op_args.h kFp8Tile)
constexpr float kE4M3MaxValue = 448.0f;  // the largest e4m3 value (core/dtype.h kE4M3Max)
constexpr float kAmaxFloor = 1e-4f;      // core/dtype.h kE4M3AmaxFloor
constexpr uint32_t kE4M3NaN = 0x7f;

// s = max(amax, 1e-4) / 448; with ue8m0, 2^ceil(log2 s) from the bits (s is a normal f32: the
// exponent field, plus one unless the mantissa is zero; +inf stays).
__device__ __forceinline__ float tile_scale(float amax, bool ue8m0) {
  const float s = __fdiv_rn(fmaxf(amax, kAmaxFloor), kE4M3MaxValue);
  if (!ue8m0) return s;
  const uint32_t u = __float_as_uint(s);
  const uint32_t exp = u >> 23, man = u & 0x7fffffu;
  return exp == 0xffu ? s : __uint_as_float((exp + (man != 0u ? 1u : 0u)) << 23);
}

// r = 1 / s, the factor of a tile with scale s.
__device__ __forceinline__ float inverse_scale(float s) { return __frcp_rn(s); }

// The e4m3 codes of a · r and b · r, a's in the low byte.
__device__ __forceinline__ uint32_t e4m3x2(float a, float b, float r) {
  const float qa = __fmul_rn(a, r), qb = __fmul_rn(b, r);
  uint32_t v = __nv_cvt_float2_to_fp8x2(make_float2(qa, qb), __NV_SATFINITE, __NV_E4M3);
  if (isnan(qa)) v = (v & 0xff00u) | kE4M3NaN;
  if (isnan(qb)) v = (v & 0x00ffu) | (kE4M3NaN << 8);
  return v;
}
// Four values' codes, v.x's in the lowest byte: one 32-bit store of four consecutive codes.
__device__ __forceinline__ uint32_t e4m3x4(float4 v, float r) {
  return e4m3x2(v.x, v.y, r) | (e4m3x2(v.z, v.w, r) << 16);
}
__device__ __forceinline__ uint8_t e4m3x1(float a, float r) {
  const float q = __fmul_rn(a, r);
  return isnan(q) ? static_cast<uint8_t>(kE4M3NaN)
                  : static_cast<uint8_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float abs_max4(float4 v) {
  return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}

// The value of an e4m3 code (exact in half, then in f32).
__device__ __forceinline__ float e4m3_value(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

}  // namespace diffmoe::fp8
