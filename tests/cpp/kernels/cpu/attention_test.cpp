// SPDX-License-Identifier: Apache-2.0
/// \file attention_test.cpp
/// \brief Causal GQA attention against an fp64 naive implementation; prefix + new queries.
#include "kernels/cpu/attention.h"

#include <gtest/gtest.h>

#include "tolerances.h"

namespace tidal::kernels::cpu {
namespace {

struct Case {
  int64_t num_q, q_pos0, heads, kv_heads, d;
};

class AttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionTest, MatchesNaive) {
  const auto c = GetParam();
  const int64_t n_ctx = c.q_pos0 + c.num_q, group = c.heads / c.kv_heads;
  const auto q = test::random_vec(c.num_q * c.heads * c.d, 31);
  const auto k = test::random_vec(n_ctx * c.kv_heads * c.d, 32);
  const auto v = test::random_vec(n_ctx * c.kv_heads * c.d, 33);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  std::vector<float> got(c.num_q * c.heads * c.d);
  AttentionArgs a;
  a.q = q.data();
  a.ld_q = c.heads * c.d;
  a.k_cache = k.data();
  a.v_cache = v.data();
  a.dst = got.data();
  a.num_q = c.num_q;
  a.q_pos0 = c.q_pos0;
  a.num_heads = c.heads;
  a.num_kv_heads = c.kv_heads;
  a.head_dim = c.d;
  a.scale = scale;
  auto ex = make_tbb_executor(3);
  attention(a, *ex);
  for (int64_t t = 0; t < c.num_q; ++t)
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t kvh = h / group, n = c.q_pos0 + t + 1;
      std::vector<double> s(n);
      double mx = -1e300, sum = 0;
      for (int64_t u = 0; u < n; ++u) {
        double dot = 0;
        for (int64_t j = 0; j < c.d; ++j)
          dot += static_cast<double>(q[(t * c.heads + h) * c.d + j]) *
                 k[(u * c.kv_heads + kvh) * c.d + j];
        s[u] = dot * scale;
        mx = std::max(mx, s[u]);
      }
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int64_t j = 0; j < c.d; ++j) {
        double o = 0;
        for (int64_t u = 0; u < n; ++u) o += s[u] / sum * v[(u * c.kv_heads + kvh) * c.d + j];
        ASSERT_NEAR(got[(t * c.heads + h) * c.d + j], o, 1e-5)
            << "attention num_q=" << c.num_q << " q_pos0=" << c.q_pos0 << " t=" << t << " h=" << h
            << " j=" << j;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(Case{1, 0, 1, 1, 1}, Case{1, 40, 4, 2, 32},
                                           Case{7, 0, 4, 2, 24}, Case{5, 13, 6, 3, 17},
                                           Case{17, 3, 8, 1, 64}));

}  // namespace
}  // namespace tidal::kernels::cpu
