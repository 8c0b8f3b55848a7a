// SPDX-License-Identifier: Apache-2.0
/// \file device_info.h
/// \brief What CUDA devices this process can see (compiled only when the CUDA sources are built).
#pragma once

#include <cstddef>
#include <string>

namespace tidal::kernels::cuda {

/// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();

/// A one-line description of device `index` ("NVIDIA H100 80GB HBM3, sm_90, 79.2 GiB").
std::string device_description(int index);

/// Measured bandwidths of device `index`, bytes/s (best of `repeats`): HBM read (a streaming read
/// kernel over `bytes`) and pinned host memory to/from the device (cudaMemcpyAsync of `bytes`).
/// These are the physical limits benchmarks compare against (python -m tidal.bench).
struct Bandwidth {
  double hbm_read = 0;
  double h2d_pinned = 0;
  double d2h_pinned = 0;
};

/// Throws std::runtime_error naming the failing CUDA call (no device, out of memory, ...).
Bandwidth measure_bandwidth(int index, size_t bytes, int repeats);

}  // namespace tidal::kernels::cuda
