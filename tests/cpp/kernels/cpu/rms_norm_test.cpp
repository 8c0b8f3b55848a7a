// SPDX-License-Identifier: Apache-2.0
/// \file rms_norm_test.cpp
/// \brief RMSNorm variants against fp64 formulas written out in the test.
#include "kernels/cpu/rms_norm.h"

#include <gtest/gtest.h>

#include "tolerances.h"

namespace tidal::kernels::cpu {
namespace {

class RmsNormTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(RmsNormTest, VariantsMatchFormula) {
  const int64_t dim = GetParam();
  const float eps = 1e-6f;
  const auto x = test::random_vec(dim, 11, 3.0f), w = test::random_vec(dim, 12, 0.3f),
             z = test::random_vec(dim, 13);
  double ss = 0;
  for (float v : x) ss += static_cast<double>(v) * v;
  const double r = 1.0 / std::sqrt(ss / dim + eps);
  std::vector<float> plain(dim), zc(dim), gated(dim);
  rms_norm_row(x.data(), w.data(), plain.data(), dim, eps, NormScale::kPlain);
  rms_norm_row(x.data(), w.data(), zc.data(), dim, eps, NormScale::kZeroCentred);
  rms_norm_gated_row(x.data(), z.data(), w.data(), gated.data(), dim, eps);
  for (int64_t i = 0; i < dim; ++i) {
    const double n = x[i] * r;
    const double silu_z = z[i] / (1.0 + std::exp(-static_cast<double>(z[i])));
    EXPECT_NEAR(plain[i], w[i] * n, 1e-5 * (1 + std::abs(w[i] * n)))
        << "plain dim=" << dim << " i=" << i;
    EXPECT_NEAR(zc[i], (1.0 + w[i]) * n, 1e-5 * (1 + std::abs(n)))
        << "zero-centred dim=" << dim << " i=" << i;
    EXPECT_NEAR(gated[i], w[i] * n * silu_z, 1e-5 * (1 + std::abs(n)))
        << "gated dim=" << dim << " i=" << i;
  }
  // In place (x and y alias) gives the same.
  auto inplace = x;
  rms_norm_row(inplace.data(), w.data(), inplace.data(), dim, eps, NormScale::kZeroCentred);
  EXPECT_EQ(inplace, zc);
}

INSTANTIATE_TEST_SUITE_P(OddDims, RmsNormTest, ::testing::Values(1, 3, 16, 17, 128, 257));

TEST(Activations, ScalarFunctions) {
  EXPECT_FLOAT_EQ(sigmoid(0.f), 0.5f);
  EXPECT_FLOAT_EQ(silu(0.f), 0.f);
  EXPECT_NEAR(silu(2.f), 2.0 / (1 + std::exp(-2.0)), 1e-6);
  EXPECT_FLOAT_EQ(softplus(25.f), 25.f);  // PyTorch's threshold 20: identity above
  EXPECT_NEAR(softplus(0.f), std::log(2.0), 1e-7);
  EXPECT_NEAR(softplus(-30.f), std::exp(-30.0), 1e-15);
}

}  // namespace
}  // namespace tidal::kernels::cpu
