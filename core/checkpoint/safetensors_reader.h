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
  /// GGUF block types: the ggml type id (dtype is kUnknown, dtype_name the type's name); -1
  /// otherwise.
  int32_t ggml_type = -1;
  /// The tensor's name in its file when the checkpoint presents it under another (GGUF).
  std::string source_name;

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

/// The block scales of an FP8 weight: "<name>_scale_inv" (official FP8 checkpoints:
/// "...proj.weight_scale_inv", fused experts "...gate_up_proj_scale_inv").
inline std::string fp8_scale_name(const std::string& weight) { return weight + "_scale_inv"; }

/// All tensors of a checkpoint directory, across shards.
///
/// Note [FP8 checkpoints]: a checkpoint whose config.json has quantization_config {quant_method:
/// "fp8", weight_block_size: [B, B]} stores F8_E4M3 weights W with F32/BF16 scales S =
/// W_scale_inv of shape [ceil(rows/B), ceil(cols/B)] (a leading expert dim for fused experts);
/// the weight is W[r][c] * S[r/B][c/B]. open() dequantises every FP8 tensor except the routed
/// experts to BF16 at once (owned by the checkpoint: they are a few GB at most); routed experts
/// stay FP8 and are decoded by the expert packer (offload/expert_store.cpp), one tile at a time.
class Checkpoint {
 public:
  /// A checkpoint of tensors built elsewhere (GGUF): their data must live as long as `keep`.
  static std::unique_ptr<Checkpoint> from_tensors(const std::filesystem::path& path,
                                                  std::vector<TensorInfo> tensors,
                                                  std::shared_ptr<void> keep);
  /// FP8 block size (Note [FP8 checkpoints]); 0 when the checkpoint has no FP8 tensor.
  int64_t fp8_block() const { return fp8_block_; }

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
  std::map<std::string, std::string> weight_map_;       // from the index file
  std::vector<std::unique_ptr<TensorInfo>> synthetic_;  // converted or renamed tensors
  std::vector<std::unique_ptr<uint16_t[]>> owned_;      // their data (BF16)
  std::shared_ptr<void> keep_;
  int64_t fp8_block_ = 0;
  void convert_fp8();
};

}  // namespace tidal::core
