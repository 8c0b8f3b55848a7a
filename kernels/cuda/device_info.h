// SPDX-License-Identifier: Apache-2.0
/// \file device_info.h
/// \brief What CUDA devices this process can see (compiled only when the CUDA sources are built).
#pragma once

#include <string>

namespace tidal::kernels::cuda {

/// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();

/// A one-line description of device `index` ("NVIDIA H100 80GB HBM3, sm_90, 79.2 GiB").
std::string device_description(int index);

}  // namespace tidal::kernels::cuda
