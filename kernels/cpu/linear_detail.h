// SPDX-License-Identifier: Apache-2.0
/// \file linear_detail.h
/// \brief Internals of linear() shared by its per-ISA files (Note [CPU linear] in linear.cpp).
#pragma once

#include <cstdint>

#include "kernels/cpu/linear.h"

namespace tidal::kernels::cpu::detail {

/// Weight rows per task: 16 rows of a 2048-wide BF16 matrix are 64 KiB.
constexpr int64_t kLinearRowsPerTask = 16;
/// Up to this many tokens, the rows are read straight from the weights (decode); more tokens
/// take the k-blocked path, whose block of widened weights stays in cache across the tokens.
constexpr int64_t kLinearDirectTokens = 8;
/// Columns of a k block: a row quad of it in fp32 is 16 KiB (L1), the task's 16 rows 64 KiB.
constexpr int64_t kLinearKBlock = 1024;
/// Tokens whose activations (kLinearKBlock floats each: 128 KiB) pass over a row quad together.
constexpr int64_t kLinearTokenBlock = 32;
/// Floats of scratch one task needs (the widened weights of one k block).
constexpr int64_t kLinearScratchFloats = kLinearRowsPerTask * kLinearKBlock;

/// dst rows' columns [j0, j1) (j1 - j0 ≤ kLinearRowsPerTask) for all a.m tokens, AVX2 + FMA.
void linear_rows_avx2(const LinearArgs& a, int64_t j0, int64_t j1, float* scratch);

}  // namespace tidal::kernels::cpu::detail
