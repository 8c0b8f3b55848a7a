// SPDX-License-Identifier: Apache-2.0
/// \file gpu.h
/// \brief Whether the CUDA tests have a device to run on (they compile everywhere nvcc exists and
/// skip, saying why, on machines without a GPU; the device machine runs them).
#pragma once

#include <cuda_runtime_api.h>

namespace tidal::test {

inline bool have_gpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

inline constexpr const char* kNoGpu =
    "no CUDA device on this machine (the device machine runs these)";

}  // namespace tidal::test
