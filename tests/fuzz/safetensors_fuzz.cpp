// SPDX-License-Identifier: Apache-2.0
/// \file safetensors_fuzz.cpp
/// \brief libFuzzer harness for the safetensors header parser (core/checkpoint/safetensors_reader):
/// any input either parses or raises tidal::FormatError; anything else is a finding.
#include <cstddef>
#include <cstdint>

#include "core/checkpoint/safetensors_reader.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    tidal::core::SafetensorsFile f(reinterpret_cast<const std::byte*>(data), size, "fuzz-input");
    size_t total = 0;
    for (const auto& [name, t] : f.tensors()) {
      total += name.size() + t.shape_str().size();
      if (t.nbytes > 0)
        total += static_cast<size_t>(t.data[0]) + static_cast<size_t>(t.data[t.nbytes - 1]);
    }
    (void)total;
  } catch (const tidal::FormatError&) {
  }
  return 0;
}
