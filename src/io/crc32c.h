// CRC32C (Castagnoli) for TFRecord framing (docs/formats.md §1a): reflected polynomial 0x82F63B78,
// init ~0, final xor ~0 — the same function as the SSE4.2 `crc32` instruction. The SSE4.2 path is
// chosen at run time, so one binary runs on any x86-64 (and elsewhere, through the table).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace diffmoe {

// crc32c over `n` bytes, using SSE4.2 when the CPU has it, else the table.
uint32_t crc32c(const void* data, size_t n);
inline uint32_t crc32c(std::string_view s) { return crc32c(s.data(), s.size()); }

// The two implementations, exposed so tests can check that they agree.
uint32_t crc32c_table(const void* data, size_t n);
uint32_t crc32c_sse42(const void* data, size_t n);  // requires crc32c_sse42_available()
bool crc32c_sse42_available();

// TFRecord's masked CRC (docs/formats.md §1a): rotate right by 15, add 0xa282ead8 (uint32 arithmetic).
// Masking exists so that a CRC stored inside CRC'd data does not weaken the check.
inline uint32_t mask_crc32c(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }
inline uint32_t masked_crc32c(const void* data, size_t n) { return mask_crc32c(crc32c(data, n)); }
inline uint32_t masked_crc32c(std::string_view s) { return masked_crc32c(s.data(), s.size()); }

}  // namespace diffmoe
