// SPDX-License-Identifier: Apache-2.0
/// \file sequence_state.h
/// \brief Per-sequence decoding state: KV cache of full-attention layers, conv and recurrent state
/// of DeltaNet layers (model-spec §6). Explicit, so a sequence can be prefilled in chunks and
/// decoded.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace tidal::core {

struct LayerState {
  std::vector<float>
      k_cache;  ///< (num_tokens, num_key_value_heads, head_dim), after k_norm and RoPE
  std::vector<float> v_cache;  ///< (num_tokens, num_key_value_heads, head_dim)
  std::vector<float> conv;  ///< (linear_conv_kernel_dim − 1, conv channels): last pre-conv inputs
  std::vector<float> recurrent;  ///< (num_v_heads, d_k, d_v) fp32
};

struct DeviceSequenceState;  // core/model/cuda_model.cpp

struct SequenceState {
  int64_t num_tokens = 0;  ///< tokens already processed; the next token sits at this position
  std::vector<LayerState> layers;               ///< CPU engine (empty vectors on the GPU)
  std::shared_ptr<DeviceSequenceState> device;  ///< device="cuda": the state in VRAM
};

}  // namespace tidal::core
