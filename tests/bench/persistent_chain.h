// SPDX-License-Identifier: Apache-2.0
/// \file persistent_chain.h
/// \brief Benchmark-only experiment (tidal_bench_cuda): the decode step's GEMV chain in one
/// persistent cooperative kernel with a grid-wide barrier between GEMVs, against the chain of
/// launches (Note [persistent GEMV chain experiment] in persistent_chain.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace tidal::bench {

struct ChainGemv {
  const void* w = nullptr;     ///< BF16 (rows, cols), 16-byte aligned
  int64_t rows = 0, cols = 0;  ///< cols % 8 == 0, ≤ 8192
};

struct PersistentChainResult {
  double ms = 0;          ///< median GPU time of the whole chain
  double barrier_us = 0;  ///< one grid barrier alone (a kernel of barriers only)
  int blocks = 0;         ///< resident blocks (SMs × blocks per SM)
  bool ran = false;       ///< false: the device cannot launch it cooperatively
};

/// Runs `chain` (ping-ponging the activations between xa and xb, each at least the widest rows /
/// cols) `reps` times in one cooperative kernel each, blocks_per_sm blocks per SM (0: occupancy).
PersistentChainResult persistent_gemv_chain(const std::vector<ChainGemv>& chain, float* xa,
                                            float* xb, int reps, int blocks_per_sm, cudaStream_t s);

}  // namespace tidal::bench
