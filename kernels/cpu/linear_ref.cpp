// SPDX-License-Identifier: Apache-2.0
/// \file linear_ref.cpp
/// \brief Scalar reference of linear(): no SIMD, no threads, fp64 accumulation.
#include "kernels/cpu/linear.h"

namespace tidal::kernels::cpu {

void linear_ref(const LinearArgs& a) {
  const int64_t n = a.wei.rows, k = a.wei.cols;
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p)
        acc += static_cast<double>(a.src[i * a.ld_src + p]) * a.wei.at(j, p);
      float& d = a.dst[i * a.ld_dst + j];
      d = a.accumulate ? d + static_cast<float>(acc) : static_cast<float>(acc);
    }
  }
}

}  // namespace tidal::kernels::cpu
