// SPDX-License-Identifier: Apache-2.0
/// \file attention.cpp
/// \brief Causal GQA attention over the KV cache: scores, fp32 softmax, weighted sum of values.
#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tidal::kernels::cpu {

void attention(const AttentionArgs& a, Executor& ex) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t d = a.head_dim;
  const int64_t kv_stride = a.num_kv_heads * d;
  ex.parallel_for(a.num_q * a.num_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> score;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / a.num_heads, h = i % a.num_heads, kvh = h / group;
      const int64_t n = a.q_pos0 + t + 1;
      const float* q = a.q + t * a.ld_q + h * d;
      score.resize(static_cast<size_t>(n));
      float mx = -INFINITY;
      for (int64_t u = 0; u < n; ++u) {
        const float* k = a.k_cache + u * kv_stride + kvh * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < d; ++j) acc += q[j] * k[j];
        score[u] = acc * a.scale;
        mx = std::max(mx, score[u]);
      }
      double sum = 0.0;
      for (int64_t u = 0; u < n; ++u) {
        score[u] = std::exp(score[u] - mx);
        sum += score[u];
      }
      const float inv = static_cast<float>(1.0 / sum);
      float* o = a.dst + t * a.num_heads * d + h * d;
      std::fill(o, o + d, 0.f);
      for (int64_t u = 0; u < n; ++u) {
        const float p = score[u] * inv;
        const float* v = a.v_cache + u * kv_stride + kvh * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += p * v[j];
      }
    }
  });
}

}  // namespace tidal::kernels::cpu
