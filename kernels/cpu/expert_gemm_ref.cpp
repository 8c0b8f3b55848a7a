// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_ref.cpp
/// \brief Scalar reference tile kernels: plain loops over packed_value(), fp64 accumulation, exact
/// int32/int64 group sums. Also the runtime fallback (TIDAL_CPU_ISA=scalar).
#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu::ref {

void tile_f32(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst) {
  for (int64_t i = 0; i < m; ++i) {
    const float* x = a.f32 + i * a.ld;
    for (int64_t r = 0; r < kTileRows; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < l.k_pad; ++c)
        acc += static_cast<double>(packed_value(l, tile, r, c).value) * x[c];
      dst[i * kTileRows + r] = static_cast<float>(acc);
    }
  }
}

void tile_int8_groups(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
                      float* dst) {
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* xq = a.q + i * a.ld;
    for (int64_t r = 0; r < kTileRows; ++r) {
      double acc = 0;
      for (int64_t g = 0; g < l.num_groups; ++g) {
        int64_t isum = 0;
        float ws = 0.f;
        for (int64_t c = g * l.group; c < (g + 1) * l.group; ++c) {
          const PackedValue v = packed_value(l, tile, r, c);
          isum += static_cast<int64_t>(v.q) * xq[c];
          ws = v.scale;
        }
        acc += static_cast<double>(ws) * a.q_scale[i * a.ld_group + g] * static_cast<double>(isum);
      }
      dst[i * kTileRows + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace tidal::kernels::cpu::ref
