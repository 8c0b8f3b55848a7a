// SPDX-License-Identifier: Apache-2.0
/// \file routed_experts.h
/// \brief The interface through which the model graph runs routed experts. The model does not know
/// where experts live (host RAM, VRAM cache); the offload component implements this.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/common/executor.h"
#include "kernels/cpu/expert_gemm.h"

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

  /// For a VRAM expert cache, which copies experts byte for byte: the packed bytes of one
  /// expert's gate, up and down matrices (kernels::cpu layout), or nulls where experts are not
  /// packed.
  struct PackedExpertView {
    const uint8_t* gate = nullptr;
    const uint8_t* up = nullptr;
    const uint8_t* down = nullptr;
  };
  /// The layouts of every expert's gate/up and down matrices; false where experts are not
  /// packed (then no VRAM cache).
  virtual bool packed_layouts(kernels::cpu::PackedLayout& /*gate_up*/,
                              kernels::cpu::PackedLayout& /*down*/) const {
    return false;
  }
  virtual PackedExpertView packed_expert(int64_t /*layer*/, int64_t /*expert*/) const { return {}; }
  /// The host memory that holds every packed expert (to register for DMA); {nullptr, 0} if none.
  virtual std::pair<void*, size_t> packed_region() const { return {nullptr, 0}; }
  /// Each MoE layer's part of packed_region() (its experts are contiguous there, in order).
  virtual std::vector<std::pair<void*, size_t>> packed_layer_regions() const { return {}; }
  /// Whether packed_region() is a file's mapping (a pre-packed checkpoint or a packed-expert
  /// cache hit) rather than anonymous memory.
  virtual bool packed_region_file_backed() const { return false; }
  /// Moves the packed experts from a file mapping into anonymous memory (copied in parallel on
  /// `ex`; packed_expert() views and packed_region() change). Only while no forward runs.
  virtual void copy_packed_to_anonymous(kernels::Executor& /*ex*/) {}
};

}  // namespace tidal::core
