#include "core/rng.h"

#include <cmath>
#include <numbers>

namespace diffmoe {

namespace {
std::array<uint32_t, 4> block_for(uint64_t seed, uint64_t stream, uint64_t counter) {
  return Philox4x32::block(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                           static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                           static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}
}  // namespace

double normal_at(uint64_t seed, uint64_t stream, uint64_t index) {
  const auto b = block_for(seed, stream, index / 2);
  const double u1 = u32_to_unit(b[0]), u2 = u32_to_unit(b[1]);
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  return (index % 2 == 0) ? r * std::cos(a) : r * std::sin(a);
}

std::array<double, 2> normal_pair_at(uint64_t seed, uint64_t stream, uint64_t pair) {
  // normal_at's expressions exactly (std::cos and std::sin, not a sincos that could round apart).
  const auto b = block_for(seed, stream, pair);
  const double u1 = u32_to_unit(b[0]), u2 = u32_to_unit(b[1]);
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  return {r * std::cos(a), r * std::sin(a)};
}

double uniform_at(uint64_t seed, uint64_t stream, uint64_t index) {
  const auto b = block_for(seed, stream, index / 4);
  return u32_to_unit(b[index % 4]);
}

uint64_t stream_id(std::string_view name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace diffmoe
