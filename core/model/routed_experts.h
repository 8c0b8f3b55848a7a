// SPDX-License-Identifier: Apache-2.0
/// \file routed_experts.h
/// \brief The interface through which the model graph runs routed experts. The model does not know
/// where experts live (host RAM, VRAM cache); the offload component implements this.
#pragma once

#include <cstdint>

#include "kernels/common/executor.h"

namespace tidal::core {

class RoutedExperts {
 public:
  virtual ~RoutedExperts() = default;
  /// For MoE layer `layer`: dst (num_tokens, hidden) += Σ_i weights[t, i] · expert_{ids[t,
  /// i]}(src[t]), with src (num_tokens, hidden) the post-attention-normed hidden state and
  /// ids/weights (num_tokens, top_k) from the router. Experts are added in ascending expert id per
  /// token.
  virtual void forward(int64_t layer, const float* src, int64_t num_tokens, const int32_t* ids,
                       const float* weights, int64_t top_k, float* dst, kernels::Executor& ex) = 0;
};

}  // namespace tidal::core
