// SPDX-License-Identifier: Apache-2.0
/// \file linear.cpp
/// \brief Threaded linear(): each task converts a block of weight rows to fp32 once and reuses it
/// for every token. Built with the baseline ISA; the compiler vectorises the dot products (omp
/// simd).
#include "kernels/cpu/linear.h"

#include <algorithm>
#include <vector>

namespace tidal::kernels::cpu {
namespace {

// Weight rows per task: a block of 16 rows of a 2048-wide BF16 matrix is 64 KiB, about one L2
// slice.
constexpr int64_t kRowsPerTask = 16;

inline float dot(const float* a, const float* b, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t p = 0; p < k; ++p) acc += a[p] * b[p];
  return acc;
}

}  // namespace

void linear(const LinearArgs& a, Executor& ex) {
  const int64_t n = a.wei.rows, k = a.wei.cols;
  if (a.m <= 0 || n <= 0) return;
  const int64_t num_blocks = (n + kRowsPerTask - 1) / kRowsPerTask;
  ex.parallel_for(num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wrow;
    if (a.wei.dtype == DType::kBF16) wrow.resize(static_cast<size_t>(k));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kRowsPerTask, j1 = std::min(n, j0 + kRowsPerTask);
      for (int64_t j = j0; j < j1; ++j) {
        const float* w;
        if (a.wei.dtype == DType::kBF16) {
          const auto* src = static_cast<const uint16_t*>(a.wei.data) + j * k;
#pragma omp simd
          for (int64_t p = 0; p < k; ++p) wrow[p] = bf16_to_f32(src[p]);
          w = wrow.data();
        } else {
          w = static_cast<const float*>(a.wei.data) + j * k;
        }
        for (int64_t i = 0; i < a.m; ++i) {
          const float v = dot(a.src + i * a.ld_src, w, k);
          float& d = a.dst[i * a.ld_dst + j];
          d = a.accumulate ? d + v : v;
        }
      }
    }
  });
}

}  // namespace tidal::kernels::cpu
