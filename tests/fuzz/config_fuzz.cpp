// SPDX-License-Identifier: Apache-2.0
/// \file config_fuzz.cpp
/// \brief libFuzzer harness for config.json parsing (core/config/model_config): any input is
/// either a config, invalid JSON, or tidal::FormatError / tidal::Unsupported; anything else is a
/// finding.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/config/model_config.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // not JSON: ModelConfig::from_file reports that itself
  }
  try {
    const auto c = tidal::core::ModelConfig::from_json(j, "fuzz-input");
    size_t n = c.layer_types.size() + c.layer_is_moe.size() + static_cast<size_t>(c.rotary_dim);
    (void)n;
  } catch (const tidal::FormatError&) {
  } catch (const tidal::Unsupported&) {
  }
  return 0;
}
