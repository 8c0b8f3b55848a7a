// SPDX-License-Identifier: Apache-2.0
/// \file dtype.h
/// \brief Element types of weights and activations, and scalar conversions between them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace tidal::kernels {

/// Element types tidal knows by name. Kernels compute on kF32 activations; weights may be kBF16 or
/// kF32.
enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kI8,
  kU8,
  kI16,
  kI32,
  kI64,
  kBool,
  kF8E4M3,
  kF8E5M2,
  kUnknown
};

/// Size of one element in bytes (0 for kUnknown).
size_t dtype_size(DType dt);
/// The safetensors spelling ("BF16", "F32", ...).
std::string_view dtype_name(DType dt);
/// Parses a safetensors dtype string; returns kUnknown for names tidal does not know.
DType dtype_from_safetensors(std::string_view s);

/// bfloat16 bits -> float (exact).
inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// float -> bfloat16 bits, round to nearest even (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

/// IEEE half bits -> float (exact, subnormals included).
float f16_to_f32(uint16_t bits);
/// float -> IEEE half bits, round to nearest even (overflow to inf, NaN stays NaN).
uint16_t f32_to_f16(float f);

/// A read-only 2-D weight matrix `[rows, cols]`, row-major, in kF32 or kBF16. Not owning.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;

  /// Element (r, c) as float.
  float at(int64_t r, int64_t c) const {
    const int64_t i = r * cols + c;
    return dtype == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(data)[i])
                                 : static_cast<const float*>(data)[i];
  }
  /// View of rows [first, first + count).
  WeightView row_slice(int64_t first, int64_t count) const {
    const auto* base =
        static_cast<const char*>(data) + first * cols * static_cast<int64_t>(dtype_size(dtype));
    return {base, dtype, count, cols};
  }
};

}  // namespace tidal::kernels
