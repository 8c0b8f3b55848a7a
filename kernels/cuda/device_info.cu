// SPDX-License-Identifier: Apache-2.0
/// \file device_info.cu
/// \brief CUDA device discovery; the first CUDA source of tidal (the CUDA backend builds on it).
#include <cuda_runtime.h>

#include <cstdio>

#include "kernels/cuda/device_info.h"

namespace tidal::kernels::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_description(int index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return "unknown CUDA device";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s, sm_%d%d, %.1f GiB", prop.name, prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace tidal::kernels::cuda
