#include <gtest/gtest.h>

#include <array>
#include <cmath>

#include "core/rng.h"

namespace diffmoe {
namespace {

TEST(Rng, PhiloxKnownAnswer) {
  // Random123's published known-answer vectors for philox4x32-10.
  auto z = Philox4x32::block(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(z[0], 0x6627e8d5u);
  EXPECT_EQ(z[1], 0xe169c58du);
  EXPECT_EQ(z[2], 0xbc57ac4cu);
  EXPECT_EQ(z[3], 0x9b00dbd8u);
  auto p = Philox4x32::block(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(p[0], 0xd16cfe09u);
  EXPECT_EQ(p[1], 0x94fdccebu);
  EXPECT_EQ(p[2], 0x5001e420u);
  EXPECT_EQ(p[3], 0x24126ea1u);
}

TEST(Rng, NormalMomentsAndDeterminism) {
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double v = normal_at(42, 7, static_cast<uint64_t>(i));
    s += v;
    s2 += v * v;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
  EXPECT_EQ(normal_at(42, 7, 123), normal_at(42, 7, 123));
  EXPECT_NE(normal_at(42, 7, 123), normal_at(43, 7, 123));
  EXPECT_NE(normal_at(42, 7, 123), normal_at(42, 8, 123));
  EXPECT_NE(stream_id("a"), stream_id("b"));
}

// normal_pair_at is the two normal_at values of its block, bit for bit (the compiler may merge its
// cos and sin into one sincos call: that must not move a bit), over a million pairs.
TEST(Rng, NormalPairIsNormalAtBitwise) {
  int64_t differ = 0;
  for (uint64_t q = 0; q < 1000000; ++q) {
    const std::array<double, 2> z = normal_pair_at(1234, 0x9e3779b97f4a7c15ull, q * 7919);
    differ += z[0] != normal_at(1234, 0x9e3779b97f4a7c15ull, 2 * q * 7919) ? 1 : 0;
    differ += z[1] != normal_at(1234, 0x9e3779b97f4a7c15ull, 2 * q * 7919 + 1) ? 1 : 0;
  }
  EXPECT_EQ(differ, 0);
}

}  // namespace
}  // namespace diffmoe
