// Element types and the scalar conversions every backend shares (docs/model.md §7, docs/formats.md §1b).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace diffmoe {

enum class DType : uint8_t { kF32, kF64, kBF16, kF8E4M3, kI32, kI64, kU8 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // "f32", "f64", "bf16", "f8e4m3", "i32", "i64", "u8"
bool dtype_is_float(DType t);

// BF16 = the upper 16 bits of an f32, round to nearest even, NaN stays a quiet NaN.
uint16_t f32_to_bf16(float x);
float bf16_to_f32(uint16_t b);

// FP8 E4M3 "FN" (OCP): bias 7, no infinities, max finite 448, NaN = S.1111.111.
// Round to nearest even; values beyond the largest finite magnitude saturate to ±448 when
// `saturate`, otherwise become NaN (what a plain cast does). NaN in gives NaN out.
uint8_t f32_to_e4m3(float x, bool saturate = true);
float e4m3_to_f32(uint8_t b);

constexpr float kE4M3Max = 448.0f;

// The FP8 tile scale of docs/model.md §7 ("Exact quantisation"; docs/derivations.md §6.5): s = max(amax, 1e-4) / 448,
// one f32 division, so a tile whose largest magnitude is amax is quantised as e4m3(x · r), r = 1 / s
// (e4m3_inverse_scale), with |x · r| ≤ 448 up to one f32 rounding (saturated to 448). With `ue8m0`, s is then
// rounded UP to a power of two, 2^ceil(log2 s), exactly (an exponent-only scale: r exact, no extra rounding). amax is
// the f32 max of |x| over the tile; a NaN amax counts as the floor (fmax semantics: tiles skip NaNs when taking the
// max); +inf gives +inf.
constexpr float kE4M3AmaxFloor = 1e-4f;
float e4m3_scale(float amax, bool ue8m0);
// The factor a tile's values are multiplied by before the e4m3 rounding: r = 1 / s, one f32 division per
// tile, so each value's code is e4m3(x · r), one f32 product (a per-value IEEE division is about ten
// instructions on the GPU, in quantisers meant to run at memory speed). With ue8m0 scales r is exact and
// x · r = x / s.
inline float e4m3_inverse_scale(float s) { return 1.0f / s; }

}  // namespace diffmoe
