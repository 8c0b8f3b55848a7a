// SPDX-License-Identifier: Apache-2.0
/// \file bind_config.cpp
/// \brief ModelConfig as a read-only Python object.
#include <pybind11/stl.h>

#include "core/config/model_config.h"
#include "python/bindings/bindings.h"

namespace py = pybind11;

namespace tidal::python {
namespace {
std::string family_name(core::ArchFamily f) {
  switch (f) {
    case core::ArchFamily::kQwen3Next:
      return "qwen3_next";
    case core::ArchFamily::kQwen35Moe:
      return "qwen3_5_moe";
    case core::ArchFamily::kQwen3Moe:
      return "qwen3_moe";
  }
  return "?";
}
std::vector<std::string> layer_type_names(const core::ModelConfig& c) {
  std::vector<std::string> out;
  for (auto t : c.layer_types)
    out.push_back(t == core::LayerType::kFullAttention ? "full_attention" : "linear_attention");
  return out;
}
}  // namespace

void bind_config(py::module_& m) {
  using C = core::ModelConfig;
  py::class_<C>(m, "ModelConfig", "The model configuration tidal runs (resolved from config.json).")
      .def_readonly("model_type", &C::model_type)
      .def_property_readonly("family", [](const C& c) { return family_name(c.family); })
      .def_readonly("vocab_size", &C::vocab_size)
      .def_readonly("hidden_size", &C::hidden_size)
      .def_readonly("num_hidden_layers", &C::num_hidden_layers)
      .def_readonly("num_attention_heads", &C::num_attention_heads)
      .def_readonly("num_key_value_heads", &C::num_key_value_heads)
      .def_readonly("head_dim", &C::head_dim)
      .def_readonly("rotary_dim", &C::rotary_dim)
      .def_readonly("rms_norm_eps", &C::rms_norm_eps)
      .def_readonly("tie_word_embeddings", &C::tie_word_embeddings)
      .def_readonly("max_position_embeddings", &C::max_position_embeddings)
      .def_property_readonly("rope_theta", [](const C& c) { return c.rope.rope_theta; })
      .def_property_readonly("rope_type", [](const C& c) { return c.rope.rope_type; })
      .def_property_readonly("partial_rotary_factor",
                             [](const C& c) { return c.rope.partial_rotary_factor; })
      .def_property_readonly("layer_types", &layer_type_names)
      .def_readonly("layer_is_moe", &C::layer_is_moe)
      .def_readonly("intermediate_size", &C::intermediate_size)
      .def_readonly("num_experts", &C::num_experts)
      .def_readonly("num_experts_per_tok", &C::num_experts_per_tok)
      .def_readonly("moe_intermediate_size", &C::moe_intermediate_size)
      .def_readonly("shared_expert_intermediate_size", &C::shared_expert_intermediate_size)
      .def_readonly("norm_topk_prob", &C::norm_topk_prob)
      .def_readonly("linear_conv_kernel_dim", &C::linear_conv_kernel_dim)
      .def_readonly("linear_key_head_dim", &C::linear_key_head_dim)
      .def_readonly("linear_value_head_dim", &C::linear_value_head_dim)
      .def_readonly("linear_num_key_heads", &C::linear_num_key_heads)
      .def_readonly("linear_num_value_heads", &C::linear_num_value_heads)
      .def_property_readonly(
          "packed_experts",
          [](const C& c) -> py::object {
            if (c.packed_experts.file.empty()) return py::none();
            py::dict d;
            d["file"] = c.packed_experts.file;
            d["dtype"] = c.packed_experts.dtype;
            d["group_size"] = c.packed_experts.group_size;
            d["layout"] = c.packed_experts.layout;
            return d;
          },
          "The pre-packed routed experts file (config.json tidal_packed_experts), or None.")
      .def("__repr__", [](const C& c) {
        return "ModelConfig(model_type='" + c.model_type +
               "', hidden_size=" + std::to_string(c.hidden_size) +
               ", num_hidden_layers=" + std::to_string(c.num_hidden_layers) +
               ", num_experts=" + std::to_string(c.num_experts) +
               ", vocab_size=" + std::to_string(c.vocab_size) + ")";
      });
}

}  // namespace tidal::python
