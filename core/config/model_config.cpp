// SPDX-License-Identifier: Apache-2.0
/// \file model_config.cpp
/// \brief config.json parsing with the resolution rules of model-spec §1 and checks of every field.
#include "core/config/model_config.h"

#include <fmt/ranges.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kernels/cpu/gated_delta_net.h"

namespace tidal::core {
namespace {

using nlohmann::json;

// A wrong value in a message: scalars as written, containers by kind only (dumping a container
// recurses as deep as the input, which a hostile file can make arbitrarily deep).
std::string shown(const json& v) {
  return v.is_structured() ? std::string("a JSON ") + v.type_name() : v.dump();
}

struct Reader {
  const json& j;
  const std::string& source;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  int64_t get_int(const char* key) const {
    TIDAL_CHECK(has(key), FormatError, "config \"{}\": required field \"{}\" is missing", source,
                key);
    return as_int(key, j.at(key));
  }
  int64_t get_int(const char* key, int64_t dflt) const {
    return has(key) ? as_int(key, j.at(key)) : dflt;
  }
  int64_t as_int(const char* key, const json& v) const {
    TIDAL_CHECK(v.is_number_integer(), FormatError,
                "config \"{}\": field \"{}\" must be an integer, got {}", source, key, shown(v));
    return v.get<int64_t>();
  }
  double get_double(const char* key, double dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    TIDAL_CHECK(v.is_number(), FormatError, "config \"{}\": field \"{}\" must be a number, got {}",
                source, key, shown(v));
    return v.get<double>();
  }
  std::string get_string(const char* key) const {
    const json& v = j.at(key);
    TIDAL_CHECK(v.is_string(), FormatError, "config \"{}\": field \"{}\" must be a string, got {}",
                source, key, shown(v));
    return v.get<std::string>();
  }
  bool get_bool(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    TIDAL_CHECK(v.is_boolean(), FormatError,
                "config \"{}\": field \"{}\" must be true or false, got {}", source, key, shown(v));
    return v.get<bool>();
  }
};

// Upper bound of any one dimension or count in a config: 2^24 (16.7 M) is far above every real
// model (largest: vocab 248,320) and keeps products of two dims inside int64 with room to spare.
constexpr int64_t kMaxConfigDim = int64_t{1} << 24;

void check_positive(const std::string& source, const char* name, int64_t v) {
  TIDAL_CHECK(v > 0, FormatError, "config \"{}\": \"{}\" must be positive, got {}", source, name,
              v);
  TIDAL_CHECK(v <= kMaxConfigDim, FormatError,
              "config \"{}\": \"{}\" = {} is implausibly large (limit {})", source, name, v,
              kMaxConfigDim);
}

RopeConfig parse_rope(const json& text, const Reader& r, ArchFamily family) {
  // One dict: rope_scaling if given (5.x prefers it), else rope_parameters, else {}.
  json d = json::object();
  if (r.has("rope_scaling") && r.j.at("rope_scaling").is_object()) {
    d = r.j.at("rope_scaling");
  } else if (r.has("rope_parameters") && r.j.at("rope_parameters").is_object()) {
    d = r.j.at("rope_parameters");
  }
  Reader dr{d, r.source};
  RopeConfig rope;
  if (dr.has("rope_type"))
    rope.rope_type = dr.get_string("rope_type");
  else if (dr.has("type"))
    rope.rope_type = dr.get_string("type");
  rope.rope_theta = dr.get_double("rope_theta", r.get_double("rope_theta", 10000.0));
  const double pr_default = family == ArchFamily::kQwen3Moe ? 1.0 : 0.25;
  rope.partial_rotary_factor =
      dr.get_double("partial_rotary_factor", r.get_double("partial_rotary_factor", pr_default));
  rope.factor = dr.get_double("factor", 1.0);
  const double max_pos = static_cast<double>(r.get_int("max_position_embeddings", 0));
  rope.original_max_position_embeddings = dr.get_double("original_max_position_embeddings", 0.0);
  rope.beta_fast = dr.get_double("beta_fast", 32.0);
  rope.beta_slow = dr.get_double("beta_slow", 1.0);
  rope.attention_factor = dr.get_double("attention_factor", -1.0);
  rope.mscale = dr.get_double("mscale", 0.0);
  rope.mscale_all_dim = dr.get_double("mscale_all_dim", 0.0);
  rope.truncate = dr.get_bool("truncate", true);
  if (rope.rope_type == "yarn") {
    if (!dr.has("factor") && rope.original_max_position_embeddings > 0)
      rope.factor = max_pos / rope.original_max_position_embeddings;
    if (rope.original_max_position_embeddings <= 0) rope.original_max_position_embeddings = max_pos;
  }
  // Qwen3.5 writes mrope for its vision inputs: for text tokens it reduces exactly to 1-D RoPE.
  TIDAL_CHECK(rope.rope_type == "default" || rope.rope_type == "yarn" || rope.rope_type == "mrope",
              Unsupported,
              "config \"{}\": rope_type \"{}\" is not supported (supported: default, yarn)",
              r.source, rope.rope_type);
  if (rope.rope_type == "mrope") rope.rope_type = "default";
  TIDAL_CHECK(rope.rope_theta > 1.0 || rope.rope_type != "yarn", FormatError,
              "config \"{}\": YaRN needs rope_theta > 1, got {}", r.source, rope.rope_theta);
  TIDAL_CHECK(rope.rope_theta > 0, FormatError,
              "config \"{}\": rope_theta must be positive, got {}", r.source, rope.rope_theta);
  TIDAL_CHECK(rope.partial_rotary_factor > 0 && rope.partial_rotary_factor <= 1.0, FormatError,
              "config \"{}\": partial_rotary_factor must be in (0, 1], got {}", r.source,
              rope.partial_rotary_factor);
  return rope;
}

}  // namespace

const std::vector<std::string>& ModelConfig::supported_model_types() {
  static const std::vector<std::string> kTypes = {"qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text",
                                                  "qwen3_moe"};
  return kTypes;
}

namespace {
ModelConfig parse_config(const json& root, const std::string& source);
}  // namespace

ModelConfig ModelConfig::from_json(const json& root, const std::string& source) {
  // A field of the wrong JSON type that a check below does not name first (a list where a string
  // belongs, ...) is still a FormatError naming the file. Found by tests/fuzz (config harness).
  try {
    return parse_config(root, source);
  } catch (const json::exception& e) {
    throw FormatError(
        fmt::format("config \"{}\": a field has the wrong type: {}", source, e.what()));
  }
}

namespace {
ModelConfig parse_config(const json& root, const std::string& source) {
  TIDAL_CHECK(root.is_object(), FormatError,
              "config \"{}\": expected a JSON object at the top level", source);
  TIDAL_CHECK(root.contains("model_type") && root.at("model_type").is_string(), FormatError,
              "config \"{}\": field \"model_type\" is missing (supported: {})", source,
              fmt::join(ModelConfig::supported_model_types(), ", "));
  ModelConfig c;
  c.model_type = root.at("model_type").get<std::string>();
  const json* text = &root;
  if (c.model_type == "qwen3_next") {
    c.family = ArchFamily::kQwen3Next;
    c.weight_prefix = "model.";
  } else if (c.model_type == "qwen3_5_moe") {
    c.family = ArchFamily::kQwen35Moe;
    c.weight_prefix = "model.language_model.";
    TIDAL_CHECK(root.contains("text_config") && root.at("text_config").is_object(), FormatError,
                "config \"{}\": model_type qwen3_5_moe needs a \"text_config\" object", source);
    text = &root.at("text_config");
  } else if (c.model_type == "qwen3_5_moe_text") {
    c.family = ArchFamily::kQwen35Moe;
    c.weight_prefix = "model.";
  } else if (c.model_type == "qwen3_moe") {
    c.family = ArchFamily::kQwen3Moe;
    c.weight_prefix = "model.";
  } else {
    throw Unsupported(
        fmt::format("config \"{}\": model_type \"{}\" is not supported (supported: {})", source,
                    c.model_type, fmt::join(ModelConfig::supported_model_types(), ", ")));
  }
  const Reader r{*text, source};
  const Reader top{root, source};

  c.vocab_size = r.get_int("vocab_size");
  c.hidden_size = r.get_int("hidden_size");
  c.num_hidden_layers = r.get_int("num_hidden_layers");
  c.num_attention_heads = r.get_int("num_attention_heads");
  c.num_key_value_heads = r.get_int("num_key_value_heads", c.num_attention_heads);
  for (auto [n, v] : {std::pair{"vocab_size", c.vocab_size},
                      {"hidden_size", c.hidden_size},
                      {"num_hidden_layers", c.num_hidden_layers},
                      {"num_attention_heads", c.num_attention_heads},
                      {"num_key_value_heads", c.num_key_value_heads}})
    check_positive(source, n, v);
  c.head_dim = r.get_int("head_dim", c.is_hybrid() ? 256 : c.hidden_size / c.num_attention_heads);
  check_positive(source, "head_dim", c.head_dim);
  TIDAL_CHECK(
      c.num_attention_heads % c.num_key_value_heads == 0, FormatError,
      "config \"{}\": num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
      source, c.num_attention_heads, c.num_key_value_heads);
  c.rms_norm_eps = r.get_double("rms_norm_eps", 1e-6);
  // tie_word_embeddings: a top-level field of the wrapper; it may also appear in text_config.
  c.tie_word_embeddings =
      top.get_bool("tie_word_embeddings", r.get_bool("tie_word_embeddings", false));
  c.max_position_embeddings = r.get_int("max_position_embeddings", 32768);
  TIDAL_CHECK(!r.get_bool("attention_bias", false), Unsupported,
              "config \"{}\": attention_bias=true is not supported by tidal", source);
  if (r.has("hidden_act")) {
    const auto act = r.get_string("hidden_act");
    TIDAL_CHECK(act == "silu", Unsupported,
                "config \"{}\": hidden_act \"{}\" is not supported (only silu)", source, act);
  }
  c.rope = parse_rope(*text, r, c.family);
  c.rotary_dim =
      static_cast<int64_t>(static_cast<double>(c.head_dim) * c.rope.partial_rotary_factor);
  TIDAL_CHECK(c.rotary_dim > 0 && c.rotary_dim % 2 == 0, FormatError,
              "config \"{}\": rotary dims int(head_dim {} × partial_rotary_factor {}) = {} must be "
              "even and positive",
              source, c.head_dim, c.rope.partial_rotary_factor, c.rotary_dim);

  // Layer types (rule 1).
  const auto L = c.num_hidden_layers;
  if (!c.is_hybrid()) {
    c.layer_types.assign(L, LayerType::kFullAttention);
  } else if (r.has("layer_types")) {
    const json& lt = text->at("layer_types");
    TIDAL_CHECK(
        lt.is_array() && static_cast<int64_t>(lt.size()) == L, FormatError,
        "config \"{}\": layer_types must be a list of num_hidden_layers ({}) entries, got {}",
        source, L,
        lt.is_array() ? fmt::format("{} entries", lt.size()) : std::string(lt.type_name()));
    for (const auto& e : lt) {
      const std::string s =
          e.is_string() ? e.get<std::string>() : std::string("a JSON ") + e.type_name();
      if (s == "full_attention" || s == "attention")
        c.layer_types.push_back(LayerType::kFullAttention);
      else if (s == "linear_attention" || s == "mamba")
        c.layer_types.push_back(LayerType::kLinearAttention);
      else
        throw FormatError(
            fmt::format("config \"{}\": unknown layer type \"{}\" in layer_types (expected "
                        "linear_attention or full_attention)",
                        source, s));
    }
  } else {
    const int64_t interval = r.get_int("full_attention_interval", 4);
    check_positive(source, "full_attention_interval", interval);
    for (int64_t i = 0; i < L; ++i)
      c.layer_types.push_back((i + 1) % interval == 0 ? LayerType::kFullAttention
                                                      : LayerType::kLinearAttention);
  }

  // MoE (rule 2).
  c.num_experts =
      r.has("num_experts") ? r.get_int("num_experts") : r.get_int("num_local_experts", 0);
  TIDAL_CHECK(c.num_experts >= 0 && c.num_experts <= kMaxConfigDim, FormatError,
              "config \"{}\": num_experts = {} is out of range [0, {}]", source, c.num_experts,
              kMaxConfigDim);
  c.num_experts_per_tok = r.get_int("num_experts_per_tok", 0);
  c.moe_intermediate_size = r.get_int("moe_intermediate_size", 0);
  c.intermediate_size = r.get_int("intermediate_size", 0);
  c.norm_topk_prob = c.family == ArchFamily::kQwen35Moe
                         ? true
                         : r.get_bool("norm_topk_prob", c.family == ArchFamily::kQwen3Next);
  if (c.family == ArchFamily::kQwen35Moe) {
    c.layer_is_moe.assign(L, true);
  } else {
    const int64_t step = r.get_int("decoder_sparse_step", 1);
    std::vector<int64_t> mlp_only;
    if (r.has("mlp_only_layers")) {
      TIDAL_CHECK(text->at("mlp_only_layers").is_array(), FormatError,
                  "config \"{}\": mlp_only_layers must be a list of layer indices", source);
      for (const json& v : text->at("mlp_only_layers"))
        mlp_only.push_back(r.as_int("mlp_only_layers", v));  // an integer (not 1e30, not "3")
    }
    for (int64_t i = 0; i < L; ++i) {
      const bool in_list = std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end();
      c.layer_is_moe.push_back(!in_list && c.num_experts > 0 && step > 0 && (i + 1) % step == 0);
    }
  }
  const bool any_moe =
      std::find(c.layer_is_moe.begin(), c.layer_is_moe.end(), true) != c.layer_is_moe.end();
  const bool any_dense =
      std::find(c.layer_is_moe.begin(), c.layer_is_moe.end(), false) != c.layer_is_moe.end();
  if (any_moe) {
    check_positive(source, "num_experts", c.num_experts);
    check_positive(source, "num_experts_per_tok", c.num_experts_per_tok);
    check_positive(source, "moe_intermediate_size", c.moe_intermediate_size);
    TIDAL_CHECK(c.num_experts_per_tok <= c.num_experts, FormatError,
                "config \"{}\": num_experts_per_tok ({}) exceeds num_experts ({})", source,
                c.num_experts_per_tok, c.num_experts);
  }
  if (any_dense) check_positive(source, "intermediate_size", c.intermediate_size);
  if (root.contains("tidal_packed_experts")) {
    const json& pe = root.at("tidal_packed_experts");
    TIDAL_CHECK(pe.is_object() && pe.contains("file") && pe.at("file").is_string() &&
                    pe.contains("dtype") && pe.at("dtype").is_string() &&
                    pe.contains("group_size") && pe.at("group_size").is_number_integer() &&
                    pe.contains("layout") && pe.at("layout").is_string(),
                FormatError,
                "config \"{}\": \"tidal_packed_experts\" must be an object with \"file\", "
                "\"dtype\", \"group_size\" and \"layout\"",
                source);
    c.packed_experts.file = pe.at("file").get<std::string>();
    c.packed_experts.dtype = pe.at("dtype").get<std::string>();
    c.packed_experts.group_size = pe.at("group_size").get<int64_t>();
    c.packed_experts.layout = pe.at("layout").get<std::string>();
    TIDAL_CHECK(!c.packed_experts.file.empty() &&
                    c.packed_experts.file.find('/') == std::string::npos &&
                    c.packed_experts.file.find("..") == std::string::npos,
                FormatError,
                "config \"{}\": tidal_packed_experts.file must be a file name in the checkpoint "
                "directory, got \"{}\"",
                source, c.packed_experts.file);
  }
  // Only widths of the layer kinds present are checked above; the others must still not overflow.
  for (auto [n, v] : {std::pair{"moe_intermediate_size", c.moe_intermediate_size},
                      {"intermediate_size", c.intermediate_size},
                      {"num_experts_per_tok", c.num_experts_per_tok}})
    TIDAL_CHECK(v >= 0 && v <= kMaxConfigDim, FormatError,
                "config \"{}\": \"{}\" = {} is out of range", source, n, v);
  if (c.is_hybrid()) {
    c.shared_expert_intermediate_size = r.get_int("shared_expert_intermediate_size", 0);
    check_positive(source, "shared_expert_intermediate_size", c.shared_expert_intermediate_size);
    c.linear_conv_kernel_dim = r.get_int("linear_conv_kernel_dim", 4);
    c.linear_key_head_dim = r.get_int("linear_key_head_dim", 128);
    c.linear_value_head_dim = r.get_int("linear_value_head_dim", 128);
    c.linear_num_key_heads = r.get_int("linear_num_key_heads", 16);
    c.linear_num_value_heads = r.get_int("linear_num_value_heads", 32);
    for (auto [n, v] : {std::pair{"linear_conv_kernel_dim", c.linear_conv_kernel_dim},
                        {"linear_key_head_dim", c.linear_key_head_dim},
                        {"linear_value_head_dim", c.linear_value_head_dim},
                        {"linear_num_key_heads", c.linear_num_key_heads},
                        {"linear_num_value_heads", c.linear_num_value_heads}})
      check_positive(source, n, v);
    TIDAL_CHECK(c.linear_num_value_heads % c.linear_num_key_heads == 0, FormatError,
                "config \"{}\": linear_num_value_heads ({}) must be a multiple of "
                "linear_num_key_heads ({})",
                source, c.linear_num_value_heads, c.linear_num_key_heads);
    TIDAL_CHECK(c.linear_conv_kernel_dim <= kernels::cpu::kMaxConvKernel, Unsupported,
                "config \"{}\": linear_conv_kernel_dim {} is larger than tidal supports ({})",
                source, c.linear_conv_kernel_dim, kernels::cpu::kMaxConvKernel);
  }
  return c;
}

}  // namespace

ModelConfig ModelConfig::from_file(const std::filesystem::path& path) {
  std::ifstream f(path);
  TIDAL_CHECK(f.good(), FileNotFound, "config \"{}\" not found", path.string());
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    throw FormatError(fmt::format("config \"{}\" is not valid JSON: {}", path.string(), e.what()));
  }
  try {
    return from_json(j, path.string());
  } catch (const json::exception& e) {
    throw FormatError(
        fmt::format("config \"{}\": a field has the wrong type: {}", path.string(), e.what()));
  }
}

}  // namespace tidal::core
