// SPDX-License-Identifier: Apache-2.0
/// \file sampler_test.cpp
/// \brief Sampling: greedy, seeded reproducibility, each filter against hand-computed
/// distributions.
#include "core/runtime/sampler.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"

namespace tidal::runtime {
namespace {

std::vector<float> logits_of(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

TEST(Sampler, GreedyTakesArgmaxLowestOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(std::vector<float>{0.f, 3.f, 3.f, 1.f}), 1);
}

TEST(Sampler, SeededIsReproducible) {
  const auto l = logits_of({0.1, 0.2, 0.3, 0.4});
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  Sampler a(p), b(p);
  std::vector<int64_t> xa, xb;
  for (int i = 0; i < 50; ++i) {
    xa.push_back(a.sample(l));
    xb.push_back(b.sample(l));
  }
  EXPECT_EQ(xa, xb);
  // Empirical frequencies follow p (10,000 draws; 4-sigma bound ~ 0.02).
  Sampler c(p);
  std::vector<int> count(4, 0);
  for (int i = 0; i < 10000; ++i) ++count[c.sample(l)];
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(count[i] / 10000.0, 0.1 * (i + 1), 0.02) << i;
}

TEST(Sampler, Filters) {
  const auto l = logits_of({0.1, 0.2, 0.3, 0.4});
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 1;
  p.top_k = 2;
  auto pr = Sampler(p).probabilities(l);
  EXPECT_NEAR(pr[3], 4.0 / 7.0, 1e-6);
  EXPECT_NEAR(pr[2], 3.0 / 7.0, 1e-6);
  EXPECT_EQ(pr[0], 0.f);
  p.top_k = 0;
  p.top_p = 0.65f;  // 0.4 + 0.3 = 0.7 >= 0.65
  pr = Sampler(p).probabilities(l);
  EXPECT_NEAR(pr[3], 4.0 / 7.0, 1e-6);
  EXPECT_EQ(pr[1], 0.f);
  p.top_p = 1.0f;
  p.min_p = 0.45f;  // keep p >= 0.18: {0.2, 0.3, 0.4}
  pr = Sampler(p).probabilities(l);
  EXPECT_NEAR(pr[1], 0.2 / 0.9, 1e-6);
  EXPECT_EQ(pr[0], 0.f);
  p.min_p = 0.f;
  p.temperature = 0.5f;  // p^2 renormalised
  pr = Sampler(p).probabilities(l);
  EXPECT_NEAR(pr[3], 0.16 / 0.30, 1e-6);
}

TEST(Sampler, BadParams) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_THROW(p.validate(), InvalidArgument);
  p = {};
  p.top_p = 0;
  EXPECT_THROW(p.validate(), InvalidArgument);
  p = {};
  p.top_k = -2;
  EXPECT_THROW(p.validate(), InvalidArgument);
  p = {};
  p.min_p = 2;
  EXPECT_THROW(p.validate(), InvalidArgument);
}

}  // namespace
}  // namespace tidal::runtime
