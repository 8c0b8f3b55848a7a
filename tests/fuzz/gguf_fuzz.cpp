// SPDX-License-Identifier: Apache-2.0
/// \file gguf_fuzz.cpp
/// \brief libFuzzer harness for the GGUF reader (core/checkpoint/gguf_reader.cpp) and the model
/// mapping on top of it (core/checkpoint/gguf_model.cpp: metadata -> config, tensors -> Hugging
/// Face names, dense tensors decoded): any input either loads or raises a tidal::Error
/// (FormatError, Unsupported, ...). Anything else (a crash, a sanitizer report, another exception,
/// an allocation beyond -rss_limit_mb, a timeout) is a finding.
#include <cstddef>
#include <cstdint>

#include "core/checkpoint/gguf_model.h"
#include "core/checkpoint/gguf_reader.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    tidal::core::GgufFile f(reinterpret_cast<const std::byte*>(data), size, "fuzz-input");
    // Touch what a loader reads: metadata (dumped as the Python binding does) and tensor infos.
    const std::string m =
        f.metadata().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    size_t total = m.size();
    for (const auto& t : f.tensors()) {
      total += t.nbytes + t.shape().size() + t.name.size();
      if (t.nbytes > 0)
        total += static_cast<size_t>(t.data[0]) + static_cast<size_t>(t.data[t.nbytes - 1]);
    }
    (void)total;
  } catch (const tidal::FormatError&) {
    return 0;
  }
  // A file that parses: map it as a model (most inputs stop at a missing key or tensor).
  try {
    const auto m =
        tidal::core::open_gguf_model(reinterpret_cast<const std::byte*>(data), size, "fuzz-input");
    size_t n = 0;
    for (const auto& name : m.checkpoint->names()) {
      const auto* t = m.checkpoint->find(name);
      if (t->nbytes > 0)
        n += static_cast<size_t>(t->data[0]) + static_cast<size_t>(t->data[t->nbytes - 1]);
    }
    (void)n;
  } catch (const tidal::Error&) {
  }
  return 0;
}
