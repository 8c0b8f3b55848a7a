// SPDX-License-Identifier: Apache-2.0
/// \file rms_norm.h
/// \brief The RMSNorm variants of the Qwen family (model-spec §3.2), fp32, one row per call.
#pragma once

#include <cstdint>

namespace tidal::kernels::cpu {

/// How the weight scales the normalised row.
enum class NormScale : uint8_t {
  kPlain,        ///< y = w ⊙ x / rms(x)          (qwen3_moe norms, DeltaNet gated norm)
  kZeroCentred,  ///< y = (1 + w) ⊙ x / rms(x)    (qwen3_next / qwen3_5_moe norms)
};

/// y[i] = scale(w)[i] · x[i] / sqrt(mean(x²) + eps), over `dim` elements. x and y may alias.
void rms_norm_row(const float* x, const float* w, float* y, int64_t dim, float eps,
                  NormScale scale);

/// Gated norm of the DeltaNet output (plain w): y = w ⊙ (x / rms(x)) ⊙ silu(z). x and y may alias.
void rms_norm_gated_row(const float* x, const float* z, const float* w, float* y, int64_t dim,
                        float eps);

/// silu(x) = x · σ(x).
float silu(float x);

/// PyTorch's softplus: x for x > 20, else log(1 + exp(x)).
float softplus(float x);

/// σ(x) = 1 / (1 + exp(−x)).
float sigmoid(float x);

}  // namespace tidal::kernels::cpu
