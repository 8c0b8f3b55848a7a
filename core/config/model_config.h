// SPDX-License-Identifier: Apache-2.0
/// \file model_config.h
/// \brief The model configuration tidal runs, parsed from a Hugging Face config.json (model-spec
/// §1).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace tidal::core {

/// Which architecture family; decides norms, attention gating and the DeltaNet projections.
enum class ArchFamily : uint8_t { kQwen3Next, kQwen35Moe, kQwen3Moe };

enum class LayerType : uint8_t { kLinearAttention, kFullAttention };

/// Normalised RoPE parameters (both config styles resolve to this; model-spec §1 rule 3).
struct RopeConfig {
  std::string rope_type = "default";  ///< "default" or "yarn"
  double rope_theta = 10000.0;
  double partial_rotary_factor = 1.0;
  double factor = 1.0;
  double original_max_position_embeddings = 0.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double attention_factor = -1.0;  ///< < 0: derived
  double mscale = 0.0;             ///< 0: absent
  double mscale_all_dim = 0.0;     ///< 0: absent
  bool truncate = true;
};

struct ModelConfig {
  std::string model_type;  ///< as written in config.json (qwen3_5_moe for the wrapper)
  ArchFamily family = ArchFamily::kQwen3Moe;
  std::string weight_prefix;  ///< "model." or "model.language_model."

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  ///< int(head_dim × partial_rotary_factor)
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 0;
  RopeConfig rope;

  std::vector<LayerType> layer_types;  ///< one per layer
  std::vector<bool> layer_is_moe;      ///< one per layer; false = dense SwiGLU of intermediate_size
  int64_t intermediate_size = 0;

  // Gated DeltaNet (hybrids only)
  int64_t linear_conv_kernel_dim = 0;
  int64_t linear_key_head_dim = 0;
  int64_t linear_value_head_dim = 0;
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;

  // MoE
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;  ///< 0: no shared expert (qwen3_moe)
  bool norm_topk_prob = true;

  /// Routed experts stored pre-packed in tidal's CPU format (a file next to config.json, written
  /// by `python -m tidal.synth --expert-dtype int4|int8`) instead of as checkpoint tensors. Empty
  /// `file`: the experts are checkpoint tensors. See offload/expert_store.h.
  struct PackedExperts {
    std::string file;   ///< relative to the checkpoint directory
    std::string dtype;  ///< "int8", "int4" or "bf16"
    int64_t group_size = 0;
    std::string layout;  ///< kernels::cpu::kExpertLayoutName it was packed with
  } packed_experts;

  /// Hybrids (qwen3_next, qwen3_5_moe): (1 + w) norms, gated attention, DeltaNet layers, shared
  /// expert.
  bool is_hybrid() const { return family != ArchFamily::kQwen3Moe; }
  /// Conv channels of a DeltaNet layer: 2·n_k·d_k + n_v·d_v.
  int64_t linear_conv_channels() const {
    return 2 * linear_num_key_heads * linear_key_head_dim +
           linear_num_value_heads * linear_value_head_dim;
  }

  /// Parses a config.json object; `source` names the file in error messages.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  /// Reads and parses `path` (a config.json file).
  static ModelConfig from_file(const std::filesystem::path& path);
  /// The model types tidal supports, for error messages.
  static const std::vector<std::string>& supported_model_types();
};

}  // namespace tidal::core
