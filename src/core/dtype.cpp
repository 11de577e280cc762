#include "core/dtype.h"

#include <bit>
#include <cmath>

#include "core/error.h"

namespace diffmoe {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kBF16: return 2;
    case DType::kF8E4M3: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  DIFFMOE_FAIL("[dtype] unknown dtype {}", static_cast<int>(t));
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF64: return "f64";
    case DType::kBF16: return "bf16";
    case DType::kF8E4M3: return "f8e4m3";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
    case DType::kU8: return "u8";
  }
  return "?";
}

bool dtype_is_float(DType t) {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kBF16 || t == DType::kF8E4M3;
}

uint16_t f32_to_bf16(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

float e4m3_to_f32(uint8_t b) {
  const uint32_t sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 0x7;
  float mag;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    mag = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, static_cast<int>(exp) - 7);
  }
  return sign ? -mag : mag;
}

// Round-to-nearest-even by working on the exact binary value: every e4m3 value is k * 2^-9
// for an integer k in the subnormal range and (8+man) * 2^(e-10) above, so we scale |x| to units
// of the target's last place (ulp) for its binade and round that integer with nearbyint (ties-to-even
// in the default rounding mode). Values are exactly representable in float, so this is exact.
uint8_t f32_to_e4m3(float x, bool saturate) {
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const float a = std::fabs(x);
  // The midpoint between 448 and the next (unrepresentable) 480 is 464: at or above it a
  // non-saturating cast gives NaN; 464 itself rounds to even (480 -> overflow).
  if (a >= 464.0f || std::isinf(a))
    return saturate ? static_cast<uint8_t>(sign | 0x7e) : static_cast<uint8_t>(sign | 0x7f);
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)  =>  binade exponent e-1
  int unbiased = e - 1;
  if (unbiased < -6) unbiased = -6;  // subnormals share the ulp of the smallest binade: 2^-9
  const float ulp = std::ldexp(1.0f, unbiased - 3);
  const float q = std::nearbyint(a / ulp);  // integer count of ulps, ties to even
  const float r = q * ulp;
  if (r == 0.0f) return sign;
  int re;
  std::frexp(r, &re);
  int rexp = re - 1;  // rounding may have carried into the next binade
  if (rexp < -6) {    // subnormal: man = r / 2^-9
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(r / std::ldexp(1.0f, -9)));
  }
  const int man = static_cast<int>(r / std::ldexp(1.0f, rexp - 3)) - 8;
  return static_cast<uint8_t>(sign | ((rexp + 7) << 3) | man);
}

float e4m3_scale(float amax, bool ue8m0) {
  const float s = std::fmax(amax, kE4M3AmaxFloor) / kE4M3Max;
  if (!ue8m0) return s;
  // s ≥ 1e-4/448 is a normal f32, so 2^ceil(log2 s) is its exponent field, plus one unless the
  // mantissa is zero (already a power of two). +inf (exponent field 255) stays +inf.
  const uint32_t u = std::bit_cast<uint32_t>(s);
  const uint32_t exp = u >> 23, man = u & 0x7fffffu;
  if (exp == 0xffu) return s;
  return std::bit_cast<float>((exp + (man != 0 ? 1u : 0u)) << 23);
}

}  // namespace diffmoe
