// Helpers of the FP8 op tests (test_fp8_*.cpp; the CUDA checks cuda_fp8_*.cpp use the value
// builders too): sources in f32 or bf16 from float values, e4m3 codes and scales read back, and an
// independent reference of the quantisation rule of docs/model.md §7 (the test's own loops; only the scalar
// e4m3 rounding is core/dtype.h's, which test_dtype.cpp checks against a brute-force oracle).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backend/op_args.h"
#include "core/dtype.h"

namespace diffmoe::test {

// The e4m3 codes that are numbers: all but 0x7f and 0xff (NaN). 254 of them, ±0 included.
inline std::vector<uint8_t> finite_e4m3_codes() {
  std::vector<uint8_t> c;
  for (int i = 0; i < 256; ++i)
    if ((i & 0x7f) != 0x7f) c.push_back(static_cast<uint8_t>(i));
  return c;
}

// The scale rule written out again (docs/model.md §7), for the references: ue8m0 through log2 in double.
inline float ref_scale(float amax, bool ue8m0) {
  const float s = std::max(amax, 1e-4f) / 448.0f;
  return ue8m0 ? static_cast<float>(std::exp2(std::ceil(std::log2(static_cast<double>(s))))) : s;
}

// Row-wise reference of a [rows, cols] source (values v, row-major): codes [rows, cols] and scales
// [ceil(cols/128), rows] (op_args.h's 1×128 layout).
struct RefQuant {
  std::vector<uint8_t> q;
  std::vector<float> scale;
};
inline RefQuant ref_quant_rows(const std::vector<float>& v, int64_t rows, int64_t cols, bool ue8m0) {
  RefQuant r{std::vector<uint8_t>(static_cast<size_t>(rows * cols)),
             std::vector<float>(static_cast<size_t>(fp8_tiles(cols) * rows))};
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t kb = 0; kb < fp8_tiles(cols); ++kb) {
      const int64_t k0 = kb * kFp8Tile, k1 = std::min(cols, k0 + kFp8Tile);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(v[static_cast<size_t>(i * cols + k)]));
      const float s = ref_scale(amax, ue8m0);
      r.scale[static_cast<size_t>(kb * rows + i)] = s;
      for (int64_t k = k0; k < k1; ++k)
        r.q[static_cast<size_t>(i * cols + k)] = f32_to_e4m3(v[static_cast<size_t>(i * cols + k)] * (1.0f / s));
    }
  return r;
}

// vᵀ of a [rows, cols] row-major matrix.
template <class T>
std::vector<T> transposed(const std::vector<T>& v, int64_t rows, int64_t cols) {
  std::vector<T> t(v.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[static_cast<size_t>(j * rows + i)] = v[static_cast<size_t>(i * cols + j)];
  return t;
}

// 128×128 block reference of w [n, k]: codes [n, k], scales [ceil(n/128), fp8_block_scale_cols(k)]
// (padding 0).
inline RefQuant ref_quant_blocks(const std::vector<float>& w, int64_t n, int64_t k, bool ue8m0) {
  const int64_t ld = fp8_block_scale_cols(k);
  RefQuant r{std::vector<uint8_t>(static_cast<size_t>(n * k)),
             std::vector<float>(static_cast<size_t>(fp8_tiles(n) * ld), 0.0f)};
  for (int64_t nb = 0; nb < fp8_tiles(n); ++nb)
    for (int64_t kb = 0; kb < fp8_tiles(k); ++kb) {
      const int64_t n0 = nb * kFp8Tile, n1 = std::min(n, n0 + kFp8Tile), k0 = kb * kFp8Tile,
                    k1 = std::min(k, k0 + kFp8Tile);
      float amax = 0.0f;
      for (int64_t i = n0; i < n1; ++i)
        for (int64_t j = k0; j < k1; ++j) amax = std::max(amax, std::fabs(w[static_cast<size_t>(i * k + j)]));
      const float s = ref_scale(amax, ue8m0);
      r.scale[static_cast<size_t>(nb * ld + kb)] = s;
      for (int64_t i = n0; i < n1; ++i)
        for (int64_t j = k0; j < k1; ++j)
          r.q[static_cast<size_t>(i * k + j)] = f32_to_e4m3(w[static_cast<size_t>(i * k + j)] * (1.0f / s));
    }
  return r;
}

// Test values that exercise every part of the rule along rows (the 1×128 tiles of a row-wise
// copy; pass the transpose to aim them at the column-wise copy). Each 128-wide tile of a row is one
// of these kinds, by (row, tile):
// - exact (8 of 13): magnitude 2^e, e from -16 to 12, holding 448·2^e once (its amax, so s = 2^e
//   exactly and x · r = x / s is exact): every finite code's value, exact ties between neighbouring codes
//   (subnormal ones too), values one f32 step beside a tie, and f32 subnormals (→ ±0);
// - generic (3 of 13): uniform in ±[0, 10^p) for p = -1, 0, 1: arbitrary scales and quotients;
// - below the amax floor (1 of 13): |x| < 1e-5, so s = 1e-4/448;
// - mixed (1 of 13): mostly tiny values beside one large one (most quotients subnormal in e4m3).
// Deterministic in (seed, index). bf16 = true rounds each value to bf16 once (the source is bf16).
inline std::vector<float> fp8_test_values(int64_t rows, int64_t cols, uint64_t seed, bool bf16 = false) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  const std::vector<uint8_t> codes = finite_e4m3_codes();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      uint64_t h = (seed + 1) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i * cols + j) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
      h *= 0x94D049BB133111EBull;
      h ^= h >> 29;
      const int64_t kind = (i * 7 + (j / kFp8Tile) * 3) % 13;
      const bool negative = (h >> 63) != 0;
      float x = 0.0f;
      if (kind < 8) {
        const int e = static_cast<int>(4 * kind) - 16;
        const uint64_t pick = (h >> 8) % 16;
        if (j % kFp8Tile == i % std::min<int64_t>(kFp8Tile, cols)) {
          x = 448.0f;  // the tile's amax: s = 2^e
        } else if (pick < 8) {
          x = e4m3_to_f32(codes[(h >> 16) % codes.size()]);
        } else if (pick < 13) {  // a tie between codes c and c + 1 (c < 0x7e), or one f32 step beside it
          const auto c = static_cast<uint8_t>((h >> 16) % 0x7e);
          x = (e4m3_to_f32(c) + e4m3_to_f32(static_cast<uint8_t>(c + 1))) / 2.0f;
          if (pick == 11) x = std::nextafter(x, 1000.0f);
          if (pick == 12) x = std::nextafter(x, 0.0f);
        } else if (pick < 15) {
          x = static_cast<float>((h >> 16) % 1000) / 999.0f * 448.0f;
        } else {
          x = std::ldexp(1.0f, -130 - e);  // an f32 subnormal once scaled by 2^e below
        }
        x = std::ldexp(x, e);
      } else if (kind < 11) {
        x = static_cast<float>(static_cast<double>((h >> 12) % 1000001) / 1e6 *
                               std::pow(10.0, static_cast<double>(kind - 9)));
      } else if (kind == 11) {
        x = static_cast<float>(static_cast<double>((h >> 12) % 1000001) * 1e-11);
      } else {
        x = j % kFp8Tile == 5 ? 300.0f : static_cast<float>(static_cast<double>((h >> 12) % 1000001) * 1e-9);
      }
      x = negative ? -x : x;
      v[static_cast<size_t>(i * cols + j)] = bf16 ? bf16_to_f32(f32_to_bf16(x)) : x;
    }
  return v;
}

}  // namespace diffmoe::test
