// SPDX-License-Identifier: Apache-2.0
/// \file rope.cpp
/// \brief Rotary tables (default and YaRN) and their application.
#include "kernels/cpu/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace tidal::kernels::cpu {

RopeTable rope_table_default(double theta, int64_t rotary_dim) {
  RopeTable t;
  t.rotary_dim = rotary_dim;
  for (int64_t i = 0; i < rotary_dim / 2; ++i) {
    // transformers forms the exponent in fp32 and the power in fp32.
    const float e = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    t.inv_freq.push_back(1.0f / std::pow(static_cast<float>(theta), e));
  }
  return t;
}

RopeTable rope_table_yarn(double theta, int64_t rotary_dim, double factor, double original_max_pos,
                          double beta_fast, double beta_slow, bool truncate,
                          double attention_factor, double mscale, double mscale_all_dim) {
  auto m = [](double f, double s) { return f <= 1.0 ? 1.0 : 0.1 * s * std::log(f) + 1.0; };
  RopeTable t = rope_table_default(theta, rotary_dim);
  const double d = static_cast<double>(rotary_dim);
  auto corr = [&](double n) {
    return d * std::log(original_max_pos / (n * 2.0 * std::numbers::pi)) / (2.0 * std::log(theta));
  };
  double lo = corr(beta_fast), hi = corr(beta_slow);
  if (truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  lo = std::max(lo, 0.0);
  hi = std::min(hi, d - 1.0);
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < rotary_dim / 2; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
    const double extrap = 1.0 - ramp;  // ω_i
    const double base = t.inv_freq[i];
    t.inv_freq[i] = static_cast<float>((base / factor) * (1.0 - extrap) + base * extrap);
  }
  if (attention_factor >= 0.0) {
    t.attention_factor = static_cast<float>(attention_factor);
  } else if (mscale > 0.0 && mscale_all_dim > 0.0) {
    t.attention_factor = static_cast<float>(m(factor, mscale) / m(factor, mscale_all_dim));
  } else {
    t.attention_factor = static_cast<float>(m(factor, 1.0));
  }
  return t;
}

void rope_apply(float* x, int64_t num_tokens, int64_t ld, int64_t num_heads, int64_t head_dim,
                int64_t pos0, const RopeTable& table) {
  const int64_t half = table.rotary_dim / 2;
  std::vector<float> c(half), s(half);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float p = static_cast<float>(pos0 + t);
    for (int64_t i = 0; i < half; ++i) {
      const float phi = p * table.inv_freq[i];
      c[i] = std::cos(phi) * table.attention_factor;
      s[i] = std::sin(phi) * table.attention_factor;
    }
    for (int64_t h = 0; h < num_heads; ++h) {
      float* v = x + t * ld + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace tidal::kernels::cpu
