// SPDX-License-Identifier: Apache-2.0
/// \file model_config_test.cpp
/// \brief config.json resolution rules (model-spec §1) and config errors.
#include "core/config/model_config.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace tidal::core {
namespace {
using nlohmann::json;

json hybrid_base() {
  return json{{"model_type", "qwen3_next"},
              {"vocab_size", 320},
              {"hidden_size", 64},
              {"num_hidden_layers", 8},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"num_experts", 8},
              {"num_experts_per_tok", 2},
              {"moe_intermediate_size", 32},
              {"shared_expert_intermediate_size", 32}};
}

TEST(ModelConfig, HybridDefaultsAndInterval) {
  const auto c = ModelConfig::from_json(hybrid_base(), "t");
  EXPECT_EQ(c.head_dim, 256);  // hybrid default, not hidden/heads
  EXPECT_DOUBLE_EQ(c.rope.partial_rotary_factor, 0.25);
  EXPECT_EQ(c.rotary_dim, 64);
  EXPECT_DOUBLE_EQ(c.rope.rope_theta, 10000.0);
  ASSERT_EQ(c.layer_types.size(), 8u);
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(c.layer_types[i],
              (i + 1) % 4 == 0 ? LayerType::kFullAttention : LayerType::kLinearAttention)
        << i;
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.weight_prefix, "model.");
}

TEST(ModelConfig, RopeStylesResolveTheSame) {
  auto old_style = hybrid_base();
  old_style["rope_theta"] = 1e7;
  old_style["partial_rotary_factor"] = 0.5;
  old_style["rope_scaling"] = nullptr;
  auto new_style = hybrid_base();
  new_style["rope_parameters"] = {
      {"rope_type", "default"}, {"rope_theta", 1e7}, {"partial_rotary_factor", 0.5}};
  const auto a = ModelConfig::from_json(old_style, "old"),
             b = ModelConfig::from_json(new_style, "new");
  EXPECT_DOUBLE_EQ(a.rope.rope_theta, 1e7);
  EXPECT_DOUBLE_EQ(b.rope.rope_theta, 1e7);
  EXPECT_EQ(a.rotary_dim, 128);
  EXPECT_EQ(b.rotary_dim, 128);
  // Legacy "type" key and dict values winning over top-level ones.
  auto yarn = hybrid_base();
  yarn["rope_theta"] = 5.0;
  yarn["rope_scaling"] = {{"type", "yarn"},
                          {"factor", 4.0},
                          {"original_max_position_embeddings", 1024},
                          {"rope_theta", 1e6}};
  const auto y = ModelConfig::from_json(yarn, "yarn");
  EXPECT_EQ(y.rope.rope_type, "yarn");
  EXPECT_DOUBLE_EQ(y.rope.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(y.rope.factor, 4.0);
}

TEST(ModelConfig, LayerTypesLegacyNamesAndMlpOnly) {
  auto j = hybrid_base();
  j["num_hidden_layers"] = 4;
  j["layer_types"] = {"mamba", "linear_attention", "attention", "full_attention"};
  j["mlp_only_layers"] = {1};
  j["intermediate_size"] = 96;
  const auto c = ModelConfig::from_json(j, "t");
  EXPECT_EQ(c.layer_types[0], LayerType::kLinearAttention);
  EXPECT_EQ(c.layer_types[2], LayerType::kFullAttention);
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{true, false, true, true}));
}

TEST(ModelConfig, WrapperAndQwen3Moe) {
  json w{
      {"model_type", "qwen3_5_moe"}, {"tie_word_embeddings", true}, {"text_config", hybrid_base()}};
  w["text_config"]["model_type"] = "qwen3_5_moe_text";
  w["text_config"]["mlp_only_layers"] = {0};  // ignored: qwen3_5_moe is MoE everywhere
  const auto c = ModelConfig::from_json(w, "w");
  EXPECT_EQ(c.weight_prefix, "model.language_model.");
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.family, ArchFamily::kQwen35Moe);
  EXPECT_TRUE(c.layer_is_moe[0]);
  json m{{"model_type", "qwen3_moe"}, {"vocab_size", 10},         {"hidden_size", 64},
         {"num_hidden_layers", 2},    {"num_attention_heads", 4}, {"num_key_value_heads", 2},
         {"num_local_experts", 8},    {"num_experts_per_tok", 2}, {"moe_intermediate_size", 16}};
  const auto q = ModelConfig::from_json(m, "m");
  EXPECT_EQ(q.num_experts, 8);  // num_local_experts accepted
  EXPECT_EQ(q.head_dim, 16);    // hidden / heads
  EXPECT_EQ(q.rotary_dim, 16);  // partial factor 1.0
  EXPECT_FALSE(q.norm_topk_prob);
  // mlp_only_layers: layer indices; anything but integers is a FormatError naming the field (a
  // number too large for an integer once reached an unchecked conversion: fuzzer, 2026-12-06).
  m["intermediate_size"] = 32;  // a dense layer's MLP
  m["mlp_only_layers"] = json::array({1});
  EXPECT_FALSE(ModelConfig::from_json(m, "m").layer_is_moe[1]);
  for (const json& bad : {json::array({7.7e108}), json::array({"1"}), json::array({0.5})}) {
    m["mlp_only_layers"] = bad;
    try {
      ModelConfig::from_json(m, "m");
      FAIL() << "expected FormatError for " << bad.dump();
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("mlp_only_layers"), std::string::npos) << e.what();
    }
  }
}

TEST(ModelConfig, Errors) {
  auto unknown = hybrid_base();
  unknown["model_type"] = "llama";
  try {
    ModelConfig::from_json(unknown, "cfg.json");
    FAIL() << "expected Unsupported";
  } catch (const Unsupported& e) {
    EXPECT_NE(std::string(e.what()).find("qwen3_next, qwen3_5_moe, qwen3_5_moe_text, qwen3_moe"),
              std::string::npos);
  }
  auto missing = hybrid_base();
  missing.erase("hidden_size");
  EXPECT_THROW(ModelConfig::from_json(missing, "cfg.json"), FormatError);
  auto bad_heads = hybrid_base();
  bad_heads["num_key_value_heads"] = 3;
  EXPECT_THROW(ModelConfig::from_json(bad_heads, "cfg.json"), FormatError);
  auto topk = hybrid_base();
  topk["num_experts_per_tok"] = 9;
  EXPECT_THROW(ModelConfig::from_json(topk, "cfg.json"), FormatError);
  auto lt = hybrid_base();
  lt["layer_types"] = {"linear_attention"};
  EXPECT_THROW(ModelConfig::from_json(lt, "cfg.json"), FormatError);
  auto wrong_type = hybrid_base();
  wrong_type["hidden_size"] = "64";
  EXPECT_THROW(ModelConfig::from_json(wrong_type, "cfg.json"), FormatError);
}

}  // namespace
}  // namespace tidal::core
