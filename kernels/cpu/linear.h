// SPDX-License-Identifier: Apache-2.0
/// \file linear.h
/// \brief dst = src · weiᵀ (a projection `y = W x` for m tokens), fp32 activations, BF16 or F32
/// weights.
#pragma once

#include <cstdint>

#include "kernels/common/cpu_features.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"

namespace tidal::kernels::cpu {

/// Arguments of one projection. src (m, k) with row stride ld_src; wei `[n, k]`; dst (m, n) with
/// row stride ld_dst. With `accumulate`, dst += result instead of dst = result.
struct LinearArgs {
  const float* src = nullptr;
  int64_t ld_src = 0;
  WeightView wei;
  float* dst = nullptr;
  int64_t ld_dst = 0;
  int64_t m = 0;
  bool accumulate = false;
};

/// Scalar reference: plain loops, fp64 accumulation, one thread.
void linear_ref(const LinearArgs& args);

/// The ISA linear() runs with when none is given: the CPU's best, capped by TIDAL_CPU_ISA
/// (resolve_isa("auto"), read once; a value it rejects is ignored here: Runtime.load reports it).
Isa linear_default_isa();

/// Threaded version: blocks of weight rows split over the executor, fp32 accumulation in SIMD
/// lanes. `isa`: at most this ISA's kernel (AVX2 + FMA where allowed and present, else portable
/// code the compiler vectorises; Note [CPU linear] in linear.cpp).
void linear(const LinearArgs& args, Executor& ex, Isa isa);
inline void linear(const LinearArgs& args, Executor& ex) { linear(args, ex, linear_default_isa()); }

/// Convenience: contiguous src (m, k) and dst (m, n).
inline void linear(const float* src, int64_t m, const WeightView& wei, float* dst, Executor& ex,
                   bool accumulate = false, Isa isa = linear_default_isa()) {
  linear({src, wei.cols, wei, dst, wei.rows, m, accumulate}, ex, isa);
}

}  // namespace tidal::kernels::cpu
