#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "core/dtype.h"

namespace diffmoe {
namespace {

// Brute-force oracle for e4m3 rounding: the nearest of all finite codes, ties to the code whose
// mantissa is even (its lowest bit 0), saturating at ±448. Independent of the bit-level encoder.
uint8_t e4m3_oracle(float x) {
  int best = -1;
  double best_d = 0;
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN codes
    const float v = e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::signbit(v) != std::signbit(x)) continue;
    const double d = std::fabs(static_cast<double>(v) - static_cast<double>(x));
    if (best < 0 || d < best_d || (d == best_d && (c & 1) == 0 && (best & 1) == 1)) {
      best = c;
      best_d = d;
    }
  }
  return static_cast<uint8_t>(best);
}

TEST(DType, Sizes) {
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF8E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::kF64), 8u);
  EXPECT_EQ(dtype_name(DType::kBF16), "bf16");
}

TEST(DType, E4M3KnownValues) {
  EXPECT_EQ(e4m3_to_f32(0x38), 1.0f);  // docs/formats.md §1b: 0x38, 0x40, 0xB8, 0x00 = 1, 2, -1, 0
  EXPECT_EQ(e4m3_to_f32(0x40), 2.0f);
  EXPECT_EQ(e4m3_to_f32(0xB8), -1.0f);
  EXPECT_EQ(e4m3_to_f32(0x00), 0.0f);
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xff)));
}

TEST(DType, E4M3AllCodesRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(v)) {
      EXPECT_EQ(f32_to_e4m3(v) & 0x7f, 0x7f) << c;
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(v), c) << "code " << c << " value " << v;
  }
}

TEST(DType, E4M3RoundsToNearestEvenBetweenAllCodes) {
  // Every midpoint between neighbouring codes, and points just beside it, against the oracle.
  for (int c = 0; c < 0x7e; ++c) {
    for (float sign : {1.0f, -1.0f}) {
      const float lo = sign * e4m3_to_f32(static_cast<uint8_t>(c));
      const float hi = sign * e4m3_to_f32(static_cast<uint8_t>(c + 1));
      const float mid = 0.5f * (lo + hi);
      for (float x : {mid, std::nextafter(mid, lo), std::nextafter(mid, hi), 0.75f * lo + 0.25f * hi}) {
        EXPECT_EQ(f32_to_e4m3(x), e4m3_oracle(x)) << "x=" << x << " between codes " << c << "," << c + 1;
      }
    }
  }
}

TEST(DType, E4M3Overflow) {
  EXPECT_EQ(f32_to_e4m3(1000.0f), 0x7e);  // saturate
  EXPECT_EQ(f32_to_e4m3(-1000.0f), 0xfe);
  EXPECT_EQ(f32_to_e4m3(463.0f), 0x7e);          // below the 448/480 midpoint: 448
  EXPECT_EQ(f32_to_e4m3(1000.0f, false), 0x7f);  // plain cast: NaN
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::infinity(), false), 0x7f);
  EXPECT_EQ(f32_to_e4m3(1e-10f), 0x00);   // underflow to zero
  EXPECT_EQ(f32_to_e4m3(-1e-10f), 0x80);  // keeps the sign
}

// The FP8 tile scale (docs/model.md §7): max(amax, 1e-4)/448 in f32, or with ue8m0 the next power of two up.
TEST(DType, E4M3TileScale) {
  EXPECT_EQ(e4m3_scale(448.0f, false), 1.0f);
  EXPECT_EQ(e4m3_scale(3.0f, false), 3.0f / 448.0f);    // one f32 division
  EXPECT_EQ(e4m3_scale(2e-5f, false), 1e-4f / 448.0f);  // the amax floor
  EXPECT_EQ(e4m3_scale(0.0f, false), 1e-4f / 448.0f);
  EXPECT_EQ(e4m3_scale(std::nanf(""), false), 1e-4f / 448.0f);  // fmax: a NaN amax is the floor
  // docs/derivations.md §6.5's checked values: amax 0.3 -> 6.696e-4 -> 2^-10; amax 500 -> 1.116 -> 2.
  EXPECT_NEAR(e4m3_scale(0.3f, false), 6.696e-4, 1e-7);
  EXPECT_EQ(e4m3_scale(0.3f, true), std::ldexp(1.0f, -10));
  EXPECT_EQ(e4m3_scale(500.0f, true), 2.0f);
  EXPECT_EQ(e4m3_scale(448.0f, true), 1.0f);  // already a power of two: kept
  EXPECT_EQ(e4m3_scale(std::nextafter(448.0f, 1e9f), true), 2.0f);
  EXPECT_EQ(e4m3_scale(0.0f, true), std::ldexp(1.0f, -22));  // 1e-4/448 = 2.23e-7 in (2^-23, 2^-22]
  EXPECT_EQ(e4m3_scale(std::numeric_limits<float>::infinity(), true), std::numeric_limits<float>::infinity());
  // ue8m0 over many magnitudes: a power of two s2 with s2/2 < s <= s2.
  for (int e = -30; e <= 30; ++e)
    for (float f : {1.0f, 1.1f, 1.5f, 1.999f}) {
      const float amax = std::ldexp(f, e), s = e4m3_scale(amax, false), s2 = e4m3_scale(amax, true);
      int ex = 0;
      ASSERT_EQ(std::frexp(s2, &ex), 0.5f) << amax;
      ASSERT_TRUE(s2 / 2 < s && s <= s2) << amax;
    }
}

TEST(DType, Bf16RoundNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly between bf16 1.0 (even) and 1 + 2^-7: ties to even -> 1.0
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3·2^-8 is between 1+2^-7 (odd mantissa) and 1+2^-6 (even): -> 1+2^-6
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(f32_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3f81);
  EXPECT_EQ(bf16_to_f32(0x3f81), 1.0f + std::ldexp(1.0f, -7));
  const uint16_t nan = f32_to_bf16(std::nanf(""));
  EXPECT_TRUE(std::isnan(bf16_to_f32(nan)));
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  // Every bf16 value survives a round trip.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float v = bf16_to_f32(static_cast<uint16_t>(b));
    if (std::isnan(v)) continue;
    ASSERT_EQ(f32_to_bf16(v), b);
  }
}

}  // namespace
}  // namespace diffmoe
