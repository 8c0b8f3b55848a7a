// SPDX-License-Identifier: Apache-2.0
/// \file gguf_model.h
/// \brief A llama.cpp GGUF model file (or split set) as a tidal checkpoint: the metadata mapped to
/// a Hugging Face config, the tensors to the Hugging Face names tidal loads. See Note [GGUF
/// models].
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"

namespace tidal::core {

struct GgufModel {
  nlohmann::json config;  ///< what config.json would hold (model_type, sizes, rope, ...)
  std::unique_ptr<Checkpoint> checkpoint;
  std::vector<std::filesystem::path> parts;  ///< every file of the model, in order
  std::string architecture;                  ///< general.architecture
};

/// Opens `path`: one .gguf file, or the first part of a split ("name-00001-of-00003.gguf"; the
/// others are found next to it). Throws FileNotFound (a missing part), FormatError (bad file,
/// missing or mis-shaped tensor, naming file and tensor), Unsupported (another architecture).
/// Dense tensors stored quantised are decoded at once; the routed experts stay in the file.
/// With `decode` false nothing is decoded: tensors that would be are listed with their source
/// type and bytes (for inspection: no values may be read from them).
GgufModel open_gguf_model(const std::filesystem::path& path, bool decode = true);
/// The same for one GGUF file held in memory (`name` in messages; the buffer must outlive the
/// model). For tests and fuzzing.
GgufModel open_gguf_model(const std::byte* data, size_t size, const std::string& name,
                          bool decode = true);

/// The architectures open_gguf_model() maps, as general.architecture spells them.
const std::vector<std::string>& gguf_architectures();

}  // namespace tidal::core
