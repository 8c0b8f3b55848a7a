// SPDX-License-Identifier: Apache-2.0
/// \file safetensors_reader.h
/// \brief Memory-mapped safetensors checkpoints, single file or sharded
/// (model.safetensors.index.json).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/dtype.h"

namespace tidal::core {

/// One tensor of a checkpoint: its metadata and a pointer into the memory-mapped file.
struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kUnknown;
  std::string dtype_name;  ///< as written in the header (kept for unknown dtypes)
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  std::string file;  ///< file name (no directory), for messages

  int64_t numel() const;
  std::string shape_str() const;  ///< "[2048, 512]"
};

/// A read-only memory map of one file.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

/// One safetensors file: header parsed and checked (offsets inside the file, sizes matching
/// shapes).
class SafetensorsFile {
 public:
  /// Throws FileNotFound, or FormatError naming the file (and tensor) for a corrupt or truncated
  /// file.
  explicit SafetensorsFile(const std::filesystem::path& path);
  /// Parses `size` bytes at `data` (no mapping; `name` in messages; the buffer must outlive the
  /// object). For tests and fuzzing.
  SafetensorsFile(const std::byte* data, size_t size, const std::string& name);
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

 private:
  void parse(const std::byte* data, size_t size, const std::string& fname);
  std::unique_ptr<MappedFile> map_;
  std::map<std::string, TensorInfo> tensors_;
};

/// All tensors of a checkpoint directory, across shards.
class Checkpoint {
 public:
  /// `path`: a directory holding model.safetensors, model.safetensors.index.json or *.safetensors
  /// files, or one .safetensors file.
  static std::unique_ptr<Checkpoint> open(const std::filesystem::path& path);

  /// The tensor, or nullptr.
  const TensorInfo* find(const std::string& name) const;
  /// Every tensor name, sorted.
  std::vector<std::string> names() const;
  /// The shard model.safetensors.index.json assigns `name` to ("" when there is no index or entry).
  std::string indexed_file(const std::string& name) const;
  /// Where it was read from, for messages.
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
  std::map<std::string, std::string> weight_map_;  // from the index file
};

}  // namespace tidal::core
