// Counter-based RNG (Philox4x32-10, Salmon et al. 2011): a value is a pure function of
// (seed, stream, index), so the same seed gives the same weights on every backend and the whole
// RNG state of a run is (seed, step). Written with no host-only constructs so a CUDA kernel can
// include it and call the same functions.
#pragma once
#include <array>
#include <cstdint>
#include <string_view>

#ifdef __CUDACC__
#define DIFFMOE_HD __host__ __device__
#else
#define DIFFMOE_HD
#endif

namespace diffmoe {

struct Philox4x32 {
  // One block of 4 random 32-bit words for counter (c0..c3) and key (k0, k1).
  static DIFFMOE_HD std::array<uint32_t, 4> block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                  uint32_t k1) {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += kW0;
      k1 += kW1;
    }
    return {c0, c1, c2, c3};
  }
};

// Uniform in (0, 1] from 32 random bits (never 0, so log() is safe).
DIFFMOE_HD inline double u32_to_unit(uint32_t x) { return (static_cast<double>(x) + 1.0) / 4294967296.0; }

// Standard normal number `index` of stream `stream` under `seed` (Box-Muller on one Philox block;
// element 2i and 2i+1 share a block). Computed in double, so it is the same on any backend.
double normal_at(uint64_t seed, uint64_t stream, uint64_t index);
// Numbers 2·pair and 2·pair + 1 of the same stream at once (one Philox block, one log): bitwise
// normal_at(seed, stream, 2·pair) and normal_at(seed, stream, 2·pair + 1).
std::array<double, 2> normal_pair_at(uint64_t seed, uint64_t stream, uint64_t pair);
// Uniform in (0, 1], same keying.
double uniform_at(uint64_t seed, uint64_t stream, uint64_t index);

// A stable 64-bit stream id for a name (FNV-1a), e.g. a parameter's checkpoint name.
uint64_t stream_id(std::string_view name);

}  // namespace diffmoe
