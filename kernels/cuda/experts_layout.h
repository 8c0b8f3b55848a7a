// SPDX-License-Identifier: Apache-2.0
/// \file experts_layout.h
/// \brief kernels::cpu::PackedLayout -> kernels::cuda::ExpertMatrixLayout, for host code that
/// hands the host's packed experts to the GPU expert kernels (experts.h). A header of its own so
/// experts.cu does not include the CPU headers.
#pragma once

#include "kernels/cpu/expert_gemm.h"
#include "kernels/cuda/experts.h"

namespace tidal::kernels::cuda {

inline ExpertMatrixLayout gpu_layout(const cpu::PackedLayout& l) {
  ExpertMatrixLayout g;
  g.dtype = static_cast<int>(l.dtype);
  g.n = l.n;
  g.k = l.k;
  g.group = l.group;
  g.k_pad = l.k_pad;
  g.num_tiles = l.num_tiles;
  g.num_groups = l.num_groups;
  g.group_bytes = l.group_bytes;
  g.data_bytes = l.data_bytes;
  g.tile_bytes = l.tile_bytes;
  return g;
}

}  // namespace tidal::kernels::cuda
