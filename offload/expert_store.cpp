// SPDX-License-Identifier: Apache-2.0
/// \file expert_store.cpp
/// \brief Expert lookup for both layouts, and the CPU routed-expert forward (tokens grouped per
/// expert).
#include "offload/expert_store.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rms_norm.h"

namespace tidal::offload {

ExpertStore::ExpertStore(const core::ModelConfig& cfg, const core::Checkpoint& ck)
    : hidden_(cfg.hidden_size), owned_(std::make_shared<core::OwnedWeights>()) {
  core::WeightLoader ld(ck, owned_);
  const int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size, H = cfg.hidden_size;
  const std::string why =
      fmt::format("num_experts={}, moe_intermediate_size={}, hidden_size={}", E, I, H);
  layers_.resize(static_cast<size_t>(cfg.num_hidden_layers));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.layer_is_moe[l]) continue;
    const std::string pre = fmt::format("{}layers.{}.mlp.experts.", cfg.weight_prefix, l);
    auto& experts = layers_[l];
    experts.resize(static_cast<size_t>(E));
    // Fused layout: gate_up_proj [E, 2I, H] (rows [0, I) gate, [I, 2I) up) and down_proj [E, H, I];
    // the published names have no ".weight" suffix, but accept it.
    std::string gu = pre + "gate_up_proj", dn = pre + "down_proj";
    if (!ck.find(gu) && ck.find(gu + ".weight")) {
      gu += ".weight";
      dn += ".weight";
    }
    if (ck.find(gu)) {
      const auto& tgu = ld.require(gu, {E, 2 * I, H}, why + " (fused experts: [E, 2I, H])");
      const auto& tdn = ld.require(dn, {E, H, I}, why + " (fused experts: [E, H, I])");
      for (int64_t e = 0; e < E; ++e) {
        experts[e].gate_proj = ld.rows_of(tgu, e * 2 * I, I, H);
        experts[e].up_proj = ld.rows_of(tgu, e * 2 * I + I, I, H);
        experts[e].down_proj = ld.rows_of(tdn, e * H, H, I);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const std::string p = fmt::format("{}{}.", pre, e);
        experts[e].gate_proj = ld.matrix(p + "gate_proj.weight", I, H, why);
        experts[e].up_proj = ld.matrix(p + "up_proj.weight", I, H, why);
        experts[e].down_proj = ld.matrix(p + "down_proj.weight", H, I, why);
      }
    }
  }
}

void ExpertStore::forward(int64_t layer, const float* src, int64_t num_tokens, const int32_t* ids,
                          const float* weights, int64_t top_k, float* dst, kernels::Executor& ex) {
  namespace kc = kernels::cpu;
  const auto& experts = layers_.at(layer);
  TIDAL_ASSERT(!experts.empty(), "layer {} has no routed experts", layer);
  const int64_t H = hidden_;
  // Group (token, weight) pairs per expert, then visit experts in ascending id: each token's expert
  // outputs are then summed in ascending expert id, as transformers does.
  std::vector<std::vector<std::pair<int64_t, float>>> routed(experts.size());
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t i = 0; i < top_k; ++i)
      routed[ids[t * top_k + i]].emplace_back(t, weights[t * top_k + i]);
  std::vector<float> x, g, u, y;
  for (size_t e = 0; e < experts.size(); ++e) {
    const auto& tok = routed[e];
    if (tok.empty()) continue;
    const auto& w = experts[e];
    const int64_t m = static_cast<int64_t>(tok.size()), I = w.gate_proj.rows;
    x.resize(static_cast<size_t>(m * H));
    g.resize(static_cast<size_t>(m * I));
    u.resize(g.size());
    y.resize(x.size());
    for (int64_t r = 0; r < m; ++r)
      std::copy(src + tok[r].first * H, src + (tok[r].first + 1) * H, x.data() + r * H);
    kc::linear(x.data(), m, w.gate_proj, g.data(), ex);
    kc::linear(x.data(), m, w.up_proj, u.data(), ex);
    for (size_t i = 0; i < g.size(); ++i) g[i] = kc::silu(g[i]) * u[i];
    kc::linear(g.data(), m, w.down_proj, y.data(), ex);
    for (int64_t r = 0; r < m; ++r) {
      float* d = dst + tok[r].first * H;
      const float s = tok[r].second;
      for (int64_t i = 0; i < H; ++i) d[i] += s * y[r * H + i];
    }
  }
}

}  // namespace tidal::offload
