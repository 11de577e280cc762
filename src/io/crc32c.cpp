// CRC32C: a byte-at-a-time table (portable reference) and an SSE4.2 path picked at run time
// (docs/formats.md §1a "CRC32C options"). The target attribute lets this file build without -msse4.2.
#include "io/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace diffmoe {
namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kCastagnoliReflected : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kTable = make_table();

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t sse42_impl(const unsigned char* p, size_t n) {
  uint64_t c = 0xFFFFFFFFu;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // unaligned-safe load; x86 is little-endian as the CRC expects
    c = _mm_crc32_u64(c, word);
  }
  auto c32 = static_cast<uint32_t>(c);
  for (; n > 0; ++p, --n) c32 = _mm_crc32_u8(c32, *p);
  return ~c32;
}
#endif

using CrcFn = uint32_t (*)(const void*, size_t);

CrcFn pick_implementation() { return crc32c_sse42_available() ? &crc32c_sse42 : &crc32c_table; }

}  // namespace

uint32_t crc32c_table(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return ~c;
}

bool crc32c_sse42_available() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

uint32_t crc32c_sse42(const void* data, size_t n) {
#if defined(__x86_64__)
  return sse42_impl(static_cast<const unsigned char*>(data), n);
#else
  return crc32c_table(data, n);  // unreachable in practice: callers check availability first
#endif
}

uint32_t crc32c(const void* data, size_t n) {
  // Chosen once (thread-safe static init); the CPU cannot change under us.
  static const CrcFn impl = pick_implementation();
  return impl(data, n);
}

}  // namespace diffmoe
