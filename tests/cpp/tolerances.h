// SPDX-License-Identifier: Apache-2.0
/// \file tolerances.h
/// \brief Test tolerances in one place (house-style §3), each with the numerics behind it.
#pragma once

#include <cmath>
#include <random>
#include <vector>

namespace tidal::test {

// fp32 kernels vs fp64 references on sums of up to ~1000 terms of O(1) values: a few fp32 ulps per
// term.
constexpr float kF32Rtol = 1e-5f;
constexpr float kF32Atol = 1e-5f;
// The chunked delta rule reorders the recurrence (triangular solves, decays factored as e^{γt−γs}):
// fp32 rounding of a 64-step chain of products; measured ≲ 3e-6, bound with margin.
constexpr float kDeltaRuleAtol = 5e-5f;

inline std::vector<float> random_vec(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

inline double norm2(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

}  // namespace tidal::test
