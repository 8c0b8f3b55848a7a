// SPDX-License-Identifier: Apache-2.0
/// \file linear.cpp
/// \brief Threaded linear(): blocks of weight rows over the executor, each run by the AVX2 rows
/// (linear_avx2.cpp) or by portable code built with the baseline ISA.
#include "kernels/cpu/linear.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/linear_detail.h"

namespace tidal::kernels::cpu {

// Note [CPU linear]
// The dense projections of a CPU-only run (attention, DeltaNet, shared expert, router, lm_head:
// most of the bytes a CPU-only decode step reads) and the routers' logits in every mode.
// Weights are BF16 (or F32), activations and sums fp32. Work is split in blocks of
// kLinearRowsPerTask weight rows, so every thread streams its own rows once.
//  - Decode (at most kLinearDirectTokens tokens): tiles of 4 rows × 2 tokens over the whole k,
//    BF16 widened in registers (a 16-bit shift): the weights are read once, at memory speed.
//  - Prefill: per k block of kLinearKBlock columns, the block's rows are widened once into a
//    16 KiB scratch (on the task's stack: nothing is allocated per call) that stays in L1 while
//    every pair of tokens passes over it with the same 4 × 2 tiles; partial sums go to dst.
// Every sum is fp32 in eight lanes (then the lanes, then the tail), so results differ from the
// fp64 reference by rounding only (tests/cpp/kernels/cpu/linear_test.cpp bounds it per ISA).
// Both paths sum per k block and add the blocks into dst in the same order, so a token's outputs
// are the same bits whatever the number of tokens in the call (batch invariance: the dense
// projections add nothing that depends on how many sequences forward_batch runs together).
// The portable path (no AVX2, or an ISA cap below it) widens each row once and runs one dot per
// token with `omp simd`.

Isa linear_default_isa() {
  static const Isa isa = [] {
    try {
      return resolve_isa("auto");
    } catch (const std::invalid_argument&) {  // Runtime.load reports a bad TIDAL_CPU_ISA
      return cpu_features().best;
    }
  }();
  return isa;
}

namespace {

inline float dot(const float* a, const float* b, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t p = 0; p < k; ++p) acc += a[p] * b[p];
  return acc;
}

/// The portable rows: each BF16 row widened once into `wrow` (k floats), one dot per token.
void rows_portable(const LinearArgs& a, int64_t j0, int64_t j1, float* wrow) {
  const int64_t k = a.wei.cols;
  for (int64_t j = j0; j < j1; ++j) {
    const float* w;
    if (a.wei.dtype == DType::kBF16) {
      const auto* src = static_cast<const uint16_t*>(a.wei.data) + j * k;
#pragma omp simd
      for (int64_t p = 0; p < k; ++p) wrow[p] = bf16_to_f32(src[p]);
      w = wrow;
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

}  // namespace

void linear(const LinearArgs& a, Executor& ex, Isa isa) {
  using detail::kLinearRowsPerTask;
  const int64_t n = a.wei.rows, k = a.wei.cols;
  if (a.m <= 0 || n <= 0) return;
  const bool avx2 = isa >= Isa::kAvx2 && cpu_features().best >= Isa::kAvx2;
  const int64_t num_blocks = (n + kLinearRowsPerTask - 1) / kLinearRowsPerTask;
  ex.parallel_for(num_blocks, 1, [&](int64_t b0, int64_t b1) {
    // The task's scratch (64 KiB): the AVX2 path's widened k block, the portable path's widened
    // row (rows wider than it widen into the heap, once per task).
    alignas(64) float scratch[detail::kLinearScratchFloats];
    if (avx2) {
      for (int64_t b = b0; b < b1; ++b)
        detail::linear_rows_avx2(a, b * kLinearRowsPerTask,
                                 std::min(n, (b + 1) * kLinearRowsPerTask), scratch);
      return;
    }
    std::vector<float> heap_row;
    float* wrow = scratch;
    if (a.wei.dtype == DType::kBF16 && k > detail::kLinearScratchFloats) {
      heap_row.resize(static_cast<size_t>(k));
      wrow = heap_row.data();
    }
    for (int64_t b = b0; b < b1; ++b)
      rows_portable(a, b * kLinearRowsPerTask, std::min(n, (b + 1) * kLinearRowsPerTask), wrow);
  });
}

}  // namespace tidal::kernels::cpu
