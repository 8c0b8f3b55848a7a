// SPDX-License-Identifier: Apache-2.0
/// \file rms_norm.cpp
/// \brief RMSNorm variants and the scalar activations they share.
#include "kernels/cpu/rms_norm.h"

#include <cmath>

namespace tidal::kernels::cpu {
namespace {

float inv_rms(const float* x, int64_t dim, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  return 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(dim)) + eps);
}

}  // namespace

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float silu(float x) { return x * sigmoid(x); }
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

void rms_norm_row(const float* x, const float* w, float* y, int64_t dim, float eps,
                  NormScale scale) {
  const float r = inv_rms(x, dim, eps);
  if (scale == NormScale::kZeroCentred) {
    for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * r * (1.0f + w[i]);
  } else {
    for (int64_t i = 0; i < dim; ++i) y[i] = w[i] * (x[i] * r);
  }
}

void rms_norm_gated_row(const float* x, const float* z, const float* w, float* y, int64_t dim,
                        float eps) {
  const float r = inv_rms(x, dim, eps);
  for (int64_t i = 0; i < dim; ++i) y[i] = w[i] * (x[i] * r) * silu(z[i]);
}

}  // namespace tidal::kernels::cpu
