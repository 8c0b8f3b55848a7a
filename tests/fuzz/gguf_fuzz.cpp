// SPDX-License-Identifier: Apache-2.0
/// \file gguf_fuzz.cpp
/// \brief libFuzzer harness for the GGUF reader (core/checkpoint/gguf_reader.cpp): any input
/// either parses or raises tidal::FormatError. Anything else (a crash, a sanitizer report, another
/// exception, an allocation beyond -rss_limit_mb, a timeout) is a finding.
#include <cstddef>
#include <cstdint>

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
  }
  return 0;
}
