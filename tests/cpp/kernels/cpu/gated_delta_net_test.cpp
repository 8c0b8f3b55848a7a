// SPDX-License-Identifier: Apache-2.0
/// \file gated_delta_net_test.cpp
/// \brief Delta rule: recurrent vs an fp64 oracle; chunked vs recurrent for any split and incoming
/// state; causal conv1d vs a naive convolution, split into chunks.
#include "kernels/cpu/gated_delta_net.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tolerances.h"

namespace tidal::kernels::cpu {
namespace {

struct Inputs {
  int64_t T, nk, nv, dk, dv;
  std::vector<float> q, k, v, g, beta;
};

Inputs make_inputs(int64_t T, int64_t nk, int64_t nv, int64_t dk, int64_t dv, uint32_t seed) {
  Inputs in{T, nk, nv, dk, dv, {}, {}, {}, {}, {}};
  auto l2 = [&](std::vector<float>& x, int64_t rows, int64_t dim, float s) {
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
      for (int64_t i = 0; i < dim; ++i)
        x[r * dim + i] = static_cast<float>(x[r * dim + i] / std::sqrt(ss + 1e-6) * s);
    }
  };
  in.q = test::random_vec(T * nk * dk, seed);
  in.k = test::random_vec(T * nk * dk, seed + 1);
  l2(in.q, T * nk, dk, 1.0f / std::sqrt(static_cast<float>(dk)));
  l2(in.k, T * nk, dk, 1.0f);
  in.v = test::random_vec(T * nv * dv, seed + 2);
  auto gr = test::random_vec(T * nv, seed + 3), br = test::random_vec(T * nv, seed + 4);
  for (int64_t i = 0; i < T * nv; ++i) {
    in.g.push_back(-std::log1p(std::exp(gr[i])) * 0.5f);  // log decay in (−∞, 0)
    in.beta.push_back(1.0f / (1.0f + std::exp(-br[i])));
  }
  return in;
}

DeltaRuleArgs args_for(const Inputs& in, int64_t t0, int64_t n, float* state, float* out) {
  DeltaRuleArgs a;
  a.q = in.q.data() + t0 * in.nk * in.dk;
  a.k = in.k.data() + t0 * in.nk * in.dk;
  a.v = in.v.data() + t0 * in.nv * in.dv;
  a.g = in.g.data() + t0 * in.nv;
  a.beta = in.beta.data() + t0 * in.nv;
  a.state = state;
  a.out = out + t0 * in.nv * in.dv;
  a.num_tokens = n;
  a.num_k_heads = in.nk;
  a.num_v_heads = in.nv;
  a.d_k = in.dk;
  a.d_v = in.dv;
  return a;
}

TEST(DeltaRule, RecurrentMatchesFp64Oracle) {
  const auto in = make_inputs(9, 2, 4, 5, 3, 40);
  const int64_t rho = 2;
  std::vector<float> state(4 * 5 * 3, 0.f), out(9 * 4 * 3);
  SerialExecutor ex;
  delta_rule_recurrent(args_for(in, 0, 9, state.data(), out.data()), ex);
  for (int64_t h = 0; h < 4; ++h) {
    std::vector<double> S(5 * 3, 0.0);
    for (int64_t t = 0; t < 9; ++t) {
      const float* k = &in.k[(t * 2 + h / rho) * 5];
      const float* q = &in.q[(t * 2 + h / rho) * 5];
      const float* v = &in.v[(t * 4 + h) * 3];
      const double a = std::exp(static_cast<double>(in.g[t * 4 + h])), b = in.beta[t * 4 + h];
      // S_t = a (I − b k kᵀ) S + b k vᵀ ; o = Sᵀ q
      std::vector<double> kS(3, 0.0);
      for (int j = 0; j < 3; ++j)
        for (int i = 0; i < 5; ++i) kS[j] += k[i] * S[i * 3 + j];
      for (int i = 0; i < 5; ++i)
        for (int j = 0; j < 3; ++j)
          S[i * 3 + j] = a * (S[i * 3 + j] - b * k[i] * kS[j]) + b * k[i] * v[j];
      for (int j = 0; j < 3; ++j) {
        double o = 0;
        for (int i = 0; i < 5; ++i) o += S[i * 3 + j] * q[i];
        ASSERT_NEAR(out[(t * 4 + h) * 3 + j], o, 1e-5) << "t=" << t << " h=" << h << " j=" << j;
      }
    }
  }
}

class ChunkedTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(ChunkedTest, ChunkedEqualsRecurrentWithIncomingState) {
  const int64_t T = GetParam(), nk = 2, nv = 4, dk = 16, dv = 8;
  const auto in = make_inputs(T, nk, nv, dk, dv, 50);
  const auto s0 = test::random_vec(nv * dk * dv, 51, 0.3f);
  std::vector<float> s_rec = s0, s_chk = s0, o_rec(T * nv * dv), o_chk(T * nv * dv);
  auto ex = make_tbb_executor(2);
  delta_rule_recurrent(args_for(in, 0, T, s_rec.data(), o_rec.data()), *ex);
  delta_rule_chunked(args_for(in, 0, T, s_chk.data(), o_chk.data()), *ex);
  ASSERT_GT(test::norm2(o_rec), 0.0);
  for (size_t i = 0; i < o_rec.size(); ++i)
    ASSERT_NEAR(o_chk[i], o_rec[i], test::kDeltaRuleAtol)
        << "delta_rule_chunked T=" << T << " out " << i;
  for (size_t i = 0; i < s_rec.size(); ++i)
    ASSERT_NEAR(s_chk[i], s_rec[i], test::kDeltaRuleAtol)
        << "delta_rule_chunked T=" << T << " state " << i;
  // Split into pieces of 7 (chunked prefill): same result as one shot.
  std::vector<float> s_split = s0, o_split(T * nv * dv);
  for (int64_t t0 = 0; t0 < T; t0 += 7)
    delta_rule_chunked(
        args_for(in, t0, std::min<int64_t>(7, T - t0), s_split.data(), o_split.data()), *ex);
  for (size_t i = 0; i < o_rec.size(); ++i)
    ASSERT_NEAR(o_split[i], o_rec[i], test::kDeltaRuleAtol) << "split-7 T=" << T << " out " << i;
}

INSTANTIATE_TEST_SUITE_P(Lengths, ChunkedTest, ::testing::Values(1, 2, 5, 63, 64, 65, 130));

TEST(CausalConv1d, MatchesNaiveAndSplits) {
  const int64_t T = 11, C = 37, K = 4;
  const auto x = test::random_vec(T * C, 60), w = test::random_vec(C * K, 61);
  std::vector<float> state((K - 1) * C, 0.f), out(T * C);
  SerialExecutor ex;
  causal_conv1d_silu(x.data(), T, C, K, w.data(), state.data(), out.data(), ex);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = t - K + 1 + j;
        if (s >= 0) acc += w[c * K + j] * x[s * C + c];
      }
      ASSERT_NEAR(out[t * C + c], acc / (1 + std::exp(-acc)), 1e-5) << "t=" << t << " c=" << c;
    }
  // State holds the last K−1 inputs, oldest first.
  for (int64_t j = 0; j < K - 1; ++j)
    for (int64_t c = 0; c < C; ++c) ASSERT_EQ(state[j * C + c], x[(T - K + 1 + j) * C + c]);
  // Chunks of 1, 2, 3, 5 tokens with carried state: same output.
  std::vector<float> st2((K - 1) * C, 0.f), out2(T * C);
  int64_t t0 = 0;
  for (int64_t n : {1, 2, 3, 5}) {
    causal_conv1d_silu(x.data() + t0 * C, n, C, K, w.data(), st2.data(), out2.data() + t0 * C, ex);
    t0 += n;
  }
  EXPECT_EQ(out2, out);
  EXPECT_EQ(st2, state);
}

}  // namespace
}  // namespace tidal::kernels::cpu
