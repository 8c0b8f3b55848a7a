// SPDX-License-Identifier: Apache-2.0
/// \file gguf_reader.h
/// \brief GGUF v2/v3 files (llama.cpp's format): header, typed metadata and tensor infos parsed
/// and checked against the file, tensor data memory-mapped. Every count, length, shape, type and
/// offset read from the file is bounded by the file before it is used, so a damaged or hostile file
/// (from the internet) is a FormatError naming the file, never a crash, a hang or a huge
/// allocation. See Note [GGUF checks].
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace tidal::core {

class MappedFile;

/// Metadata value types (gguf.h: enum gguf_type).
enum class GgufValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

/// A ggml tensor type tidal knows the block layout of (ggml.h: enum ggml_type).
struct GgmlTypeInfo {
  uint32_t id;
  std::string_view name;
  int64_t block;  ///< values per block
  int64_t bytes;  ///< bytes per block
};
/// The layout of ggml type `id`, or nullptr for an id this table does not know.
const GgmlTypeInfo* ggml_type_info(uint32_t id);

struct GgufTensor {
  std::string name;
  uint32_t type = 0;        ///< ggml_type id
  std::vector<int64_t> ne;  ///< ggml order: ne[0] is the contiguous dimension
  uint64_t offset = 0;      ///< from the start of the data section
  uint64_t nbytes = 0;
  const std::byte* data = nullptr;  ///< into the mapping (or the parsed buffer)
  /// Row-major (numpy) shape: ne reversed.
  std::vector<int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
};

class GgufFile {
 public:
  /// Maps and parses `path`. Throws FileNotFound, or FormatError naming the file (and the key or
  /// tensor) for a file that is not valid GGUF.
  explicit GgufFile(const std::filesystem::path& path);
  /// Parses `size` bytes at `data` (no mapping; `name` is used in messages; the buffer must outlive
  /// the object). For tests and fuzzing.
  GgufFile(const std::byte* data, size_t size, std::string name);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  /// Metadata as JSON values (integers, floats, bools, strings, arrays), keys sorted by name.
  const nlohmann::json& metadata() const { return metadata_; }
  /// Each key's GGUF type; for arrays, the element type is in array_types().
  const std::map<std::string, GgufValueType>& metadata_types() const { return types_; }
  const std::map<std::string, GgufValueType>& array_types() const { return array_types_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  /// The tensor, or nullptr.
  const GgufTensor* find(const std::string& name) const;
  const std::string& name() const { return name_; }

 private:
  void parse(const std::byte* data, size_t size);
  void parse_checked(const std::byte* data, size_t size);
  std::string name_;
  std::unique_ptr<MappedFile> map_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::map<std::string, GgufValueType> types_, array_types_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> index_;
};

}  // namespace tidal::core
