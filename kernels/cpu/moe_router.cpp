// SPDX-License-Identifier: Apache-2.0
/// \file moe_router.cpp
/// \brief Softmax + top-k + renormalisation of router logits.
#include "kernels/cpu/moe_router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace tidal::kernels::cpu {

void moe_route(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
               bool renormalise, int32_t* ids, float* weights) {
  std::vector<float> p(static_cast<size_t>(num_experts));
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* l = logits + t * num_experts;
    const float mx = *std::max_element(l, l + num_experts);
    double sum = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
      p[e] = std::exp(l[e] - mx);
      sum += p[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) p[e] = static_cast<float>(p[e] / sum);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int32_t x, int32_t y) { return p[x] > p[y] || (p[x] == p[y] && x < y); });
    float top_sum = 0.f;
    for (int64_t i = 0; i < top_k; ++i) top_sum += p[order[i]];
    for (int64_t i = 0; i < top_k; ++i) {
      ids[t * top_k + i] = order[i];
      weights[t * top_k + i] = renormalise ? p[order[i]] / top_sum : p[order[i]];
    }
  }
}

}  // namespace tidal::kernels::cpu
