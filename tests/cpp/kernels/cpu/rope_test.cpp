// SPDX-License-Identifier: Apache-2.0
/// \file rope_test.cpp
/// \brief Partial RoPE against a complex-rotation oracle; tables against their formulas (default,
/// YaRN).
#include "kernels/cpu/rope.h"

#include <gtest/gtest.h>

#include <complex>
#include <numbers>

#include "tolerances.h"

namespace tidal::kernels::cpu {
namespace {

TEST(Rope, DefaultTableFormula) {
  const auto t = rope_table_default(10000.0, 64);
  ASSERT_EQ(t.inv_freq.size(), 32u);
  for (int i = 0; i < 32; ++i)
    EXPECT_NEAR(t.inv_freq[i], std::pow(10000.0, -2.0 * i / 64), 1e-7 * (1 + i));
  EXPECT_EQ(t.attention_factor, 1.0f);
}

TEST(Rope, PartialRotationMatchesComplexOracle) {
  const int64_t T = 5, heads = 3, d = 24, rd = 8, pos0 = 37, half = rd / 2;
  const auto table = rope_table_default(1e6, rd);
  auto x = test::random_vec(T * heads * d, 21);
  const auto orig = x;
  rope_apply(x.data(), T, heads * d, heads, d, pos0, table);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const float* o = orig.data() + (t * heads + h) * d;
      const float* y = x.data() + (t * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        // Pair (i, i + half) as the complex number o_i + i·o_{i+half}, rotated by angle
        // p·inv_freq_i.
        const double phi = static_cast<double>(pos0 + t) * table.inv_freq[i];
        const std::complex<double> z(o[i], o[i + half]);
        const auto r = z * std::polar(1.0, phi);
        EXPECT_NEAR(y[i], r.real(), 2e-5) << "t=" << t << " h=" << h << " i=" << i;
        EXPECT_NEAR(y[i + half], r.imag(), 2e-5) << "t=" << t << " h=" << h << " i=" << i;
      }
      for (int64_t i = rd; i < d; ++i)
        EXPECT_EQ(y[i], o[i]) << "dims past rotary_dim must pass through";
    }
}

TEST(Rope, YarnTable) {
  const double theta = 1e6, factor = 4.0, L0 = 4096;
  const auto t = rope_table_yarn(theta, 64, factor, L0, 32, 1, true, -1.0, 0, 0);
  const auto base = rope_table_default(theta, 64);
  EXPECT_NEAR(t.attention_factor, 0.1 * std::log(factor) + 1.0, 1e-6);
  // High-frequency dims keep their frequency, the lowest frequencies are divided by the factor.
  EXPECT_NEAR(t.inv_freq[0], base.inv_freq[0], 1e-7);
  EXPECT_NEAR(t.inv_freq[31], base.inv_freq[31] / factor, 1e-12);
  for (size_t i = 0; i < t.inv_freq.size(); ++i) {
    EXPECT_LE(t.inv_freq[i], base.inv_freq[i] * (1 + 1e-6));
    EXPECT_GE(t.inv_freq[i], base.inv_freq[i] / factor * (1 - 1e-6));
  }
  const auto explicit_af = rope_table_yarn(theta, 64, factor, L0, 32, 1, true, 0.5, 0, 0);
  EXPECT_FLOAT_EQ(explicit_af.attention_factor, 0.5f);
}

}  // namespace
}  // namespace tidal::kernels::cpu
