// SPDX-License-Identifier: Apache-2.0
/// \file moe_router_test.cpp
/// \brief Router: softmax, top-k order, renormalisation, ties, hand-computed oracle.
#include "kernels/cpu/moe_router.h"

#include <gtest/gtest.h>

#include <cmath>

namespace tidal::kernels::cpu {
namespace {

TEST(MoeRoute, HandComputed) {
  // logits [0, ln 2, ln 3, ln 4]: p = [1, 2, 3, 4] / 10.
  const float logits[4] = {0.f, std::log(2.f), std::log(3.f), std::log(4.f)};
  int32_t ids[2];
  float w[2];
  moe_route(logits, 1, 4, 2, false, ids, w);
  EXPECT_EQ(ids[0], 3);
  EXPECT_EQ(ids[1], 2);
  EXPECT_NEAR(w[0], 0.4f, 1e-6);
  EXPECT_NEAR(w[1], 0.3f, 1e-6);
  moe_route(logits, 1, 4, 2, true, ids, w);
  EXPECT_NEAR(w[0], 4.f / 7.f, 1e-6);
  EXPECT_NEAR(w[1], 3.f / 7.f, 1e-6);
}

TEST(MoeRoute, TiesPickLowerIdAndManyTokens) {
  const float logits[2 * 5] = {1, 1, 1, 0, 0, /**/ -5, 2, 2, 7, 2};
  int32_t ids[2 * 3];
  float w[2 * 3];
  moe_route(logits, 2, 5, 3, true, ids, w);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 1);
  EXPECT_EQ(ids[2], 2);
  EXPECT_NEAR(w[0] + w[1] + w[2], 1.f, 1e-6);
  EXPECT_EQ(ids[3], 3);
  EXPECT_EQ(ids[4], 1);
  EXPECT_EQ(ids[5], 2);
}

}  // namespace
}  // namespace tidal::kernels::cpu
