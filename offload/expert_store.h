// SPDX-License-Identifier: Apache-2.0
/// \file expert_store.h
/// \brief Host expert store: the routed experts of every MoE layer, in host memory, computed on the
/// CPU. Accepts both checkpoint layouts (per-expert tensors and fused 3-D tensors, model-spec §4).
#pragma once

#include <memory>
#include <vector>

#include "core/config/model_config.h"
#include "core/model/routed_experts.h"
#include "core/model/weight_loader.h"
#include "kernels/common/dtype.h"

namespace tidal::offload {

/// The three matrices of one routed expert: gate, up `[I, H]`, down `[H, I]`.
struct ExpertWeights {
  kernels::WeightView gate_proj, up_proj, down_proj;
};

class ExpertStore final : public core::RoutedExperts {
 public:
  /// Locates and checks every routed expert of `cfg` in `ck` (presence, dtype and shape).
  ExpertStore(const core::ModelConfig& cfg, const core::Checkpoint& ck);

  void forward(int64_t layer, const float* src, int64_t num_tokens, const int32_t* ids,
               const float* weights, int64_t top_k, float* dst, kernels::Executor& ex) override;

  /// Expert `e` of layer `layer` (a MoE layer).
  const ExpertWeights& expert(int64_t layer, int64_t e) const { return layers_.at(layer).at(e); }

 private:
  int64_t hidden_ = 0;
  std::shared_ptr<core::OwnedWeights> owned_;
  std::vector<std::vector<ExpertWeights>> layers_;  // empty for dense layers
};

}  // namespace tidal::offload
