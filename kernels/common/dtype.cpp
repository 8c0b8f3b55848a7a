// SPDX-License-Identifier: Apache-2.0
/// \file dtype.cpp
/// \brief Names, sizes and half-precision conversion of tidal's element types.
#include "kernels/common/dtype.h"

#include <cmath>
#include <cstring>

namespace tidal::kernels {
namespace {
struct DTypeRow {
  DType dt;
  std::string_view name;
  size_t size;
};
constexpr DTypeRow kDTypes[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2},        {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI8, "I8", 1},          {DType::kU8, "U8", 1},
    {DType::kI16, "I16", 2},   {DType::kI32, "I32", 4},        {DType::kI64, "I64", 8},
    {DType::kBool, "BOOL", 1}, {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};
}  // namespace

size_t dtype_size(DType dt) {
  for (const auto& r : kDTypes)
    if (r.dt == dt) return r.size;
  return 0;
}

std::string_view dtype_name(DType dt) {
  for (const auto& r : kDTypes)
    if (r.dt == dt) return r.name;
  return "UNKNOWN";
}

DType dtype_from_safetensors(std::string_view s) {
  for (const auto& r : kDTypes)
    if (r.name == s) return r.dt;
  return DType::kUnknown;
}

float f16_to_f32(uint16_t bits) {
  const int sign = (bits >> 15) & 1;
  const int exp = (bits >> 10) & 0x1f;
  const int mant = bits & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
  }
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value = a_float; subnormal half units are 2^-24; round to nearest even.
    float af;
    std::memcpy(&af, &a, sizeof af);
    const float units = af * 16777216.0f;   // exact scaling by 2^24
    const float r = std::nearbyint(units);  // default rounding mode: nearest even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  // Normal: rebias exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
  uint32_t v = a - 0x38000000u;  // exponent - 112
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

}  // namespace tidal::kernels
