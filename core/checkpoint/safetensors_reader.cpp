// SPDX-License-Identifier: Apache-2.0
/// \file safetensors_reader.cpp
/// \brief safetensors header parsing with bounds checks, memory mapping, and shard indexes.
#include "core/checkpoint/safetensors_reader.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <thread>

#include "core/error.h"
#include "kernels/cpu/weight_decode.h"

namespace tidal::core {
namespace fs = std::filesystem;
using nlohmann::json;

// A safetensors header larger than this is refused (the format's own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

MappedFile::MappedFile(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      throw FileNotFound(fmt::format("checkpoint file \"{}\" not found", path.string()));
    throw FormatError(fmt::format("cannot open \"{}\": {}", path.string(), std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(fmt::format("\"{}\" is not a regular file", path.string()));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw FormatError(
          fmt::format("cannot memory-map \"{}\": {}", path.string(), std::strerror(errno)));
    }
    data_ = static_cast<const std::byte*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const fs::path& path) {
  map_ = std::make_unique<MappedFile>(path);
  parse(map_->data(), map_->size(), path.filename().string());
}

SafetensorsFile::SafetensorsFile(const std::byte* data, size_t size, const std::string& name) {
  parse(data, size, name);
}

void SafetensorsFile::parse(const std::byte* data, size_t size, const std::string& fname) {
  TIDAL_CHECK(size >= 8, FormatError,
              "checkpoint \"{}\": file is {} bytes, too short for a safetensors header", fname,
              size);
  uint64_t header_len = 0;
  std::memcpy(&header_len, data, 8);  // little-endian on every platform tidal runs on
  TIDAL_CHECK(header_len <= kMaxHeaderBytes && header_len <= size - 8, FormatError,
              "checkpoint \"{}\": header length {} exceeds the file size {} (truncated or not a "
              "safetensors file)",
              fname, header_len, size);
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(data) + 8,
                         reinterpret_cast<const char*>(data) + 8 + header_len);
  } catch (const json::exception& e) {
    throw FormatError(
        fmt::format("checkpoint \"{}\": corrupt header (invalid JSON): {}", fname, e.what()));
  }
  TIDAL_CHECK(header.is_object(), FormatError,
              "checkpoint \"{}\": corrupt header (not a JSON object)", fname);
  const std::byte* base = data + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") continue;
    TensorInfo t;
    t.name = name;
    t.file = fname;
    try {
      TIDAL_CHECK(v.is_object() && v.contains("shape") && v.at("shape").is_array() &&
                      v.contains("data_offsets") && v.at("data_offsets").is_array(),
                  FormatError, "checkpoint \"{}\": corrupt header entry for tensor \"{}\"", fname,
                  name);
      for (const auto* arr : {&v.at("shape"), &v.at("data_offsets")})
        for (const auto& x : *arr)
          TIDAL_CHECK(
              x.is_number_unsigned() || (x.is_number_integer() && x.get<int64_t>() >= 0),
              FormatError,
              "checkpoint \"{}\": tensor \"{}\" has a non-integer or negative shape/offset (a {})",
              fname, name, x.type_name());  // not dump(): it recurses as deep as the input
      t.dtype_name = v.at("dtype").get<std::string>();
      t.shape = v.at("shape").get<std::vector<int64_t>>();
      const auto off = v.at("data_offsets").get<std::vector<uint64_t>>();
      TIDAL_CHECK(off.size() == 2, FormatError,
                  "checkpoint \"{}\": tensor \"{}\" has {} data_offsets, expected 2", fname, name,
                  off.size());
      TIDAL_CHECK(
          off[0] <= off[1] && off[1] <= data_size, FormatError,
          "checkpoint \"{}\": tensor \"{}\" spans bytes [{}, {}) but the data section has {} bytes "
          "(truncated file?)",
          fname, name, off[0], off[1], data_size);
      t.dtype = kernels::dtype_from_safetensors(t.dtype_name);
      uint64_t numel = 1;
      for (int64_t d : t.shape) {
        TIDAL_CHECK(d >= 0, FormatError,
                    "checkpoint \"{}\": tensor \"{}\" has a negative dimension", fname, name);
        TIDAL_CHECK(
            d == 0 || numel <= std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d),
            FormatError, "checkpoint \"{}\": tensor \"{}\" shape overflows", fname, name);
        numel *= static_cast<uint64_t>(d);
      }
      t.data = base + off[0];
      t.nbytes = off[1] - off[0];
      const size_t es = kernels::dtype_size(t.dtype);
      if (es > 0) {
        TIDAL_CHECK(numel <= std::numeric_limits<uint64_t>::max() / es && numel * es == t.nbytes,
                    FormatError,
                    "checkpoint \"{}\": tensor \"{}\" ({} {}) should take {} bytes but its "
                    "data_offsets give {}",
                    fname, name, t.dtype_name, t.shape_str(), numel * es, t.nbytes);
      }
    } catch (const json::exception& e) {
      throw FormatError(fmt::format("checkpoint \"{}\": corrupt header entry for tensor \"{}\": {}",
                                    fname, name, e.what()));
    }
    tensors_.emplace(name, std::move(t));
  }
}

std::unique_ptr<Checkpoint> Checkpoint::open(const fs::path& path) {
  auto ck = std::unique_ptr<Checkpoint>(new Checkpoint());
  ck->path_ = path;
  TIDAL_CHECK(fs::exists(path), FileNotFound, "checkpoint path \"{}\" does not exist",
              path.string());
  std::vector<fs::path> files;
  if (fs::is_regular_file(path)) {
    files.push_back(path);
  } else {
    const fs::path index = path / "model.safetensors.index.json";
    if (fs::exists(index)) {
      std::ifstream f(index);
      json j;
      try {
        j = json::parse(f);
      } catch (const json::exception& e) {
        throw FormatError(
            fmt::format("checkpoint index \"{}\" is not valid JSON: {}", index.string(), e.what()));
      }
      TIDAL_CHECK(j.is_object() && j.contains("weight_map") && j.at("weight_map").is_object(),
                  FormatError, "checkpoint index \"{}\" has no \"weight_map\" object",
                  index.string());
      std::set<std::string> shard_names;
      for (const auto& [name, file] : j.at("weight_map").items()) {
        TIDAL_CHECK(file.is_string(), FormatError,
                    "checkpoint index \"{}\": entry \"{}\" is not a file name", index.string(),
                    name);
        const auto fn = file.get<std::string>();
        TIDAL_CHECK(fn.find('/') == std::string::npos && fn != "..", FormatError,
                    "checkpoint index \"{}\": shard name \"{}\" must be a plain file name",
                    index.string(), fn);
        shard_names.insert(fn);
        ck->weight_map_[name] = fn;
      }
      for (const auto& s : shard_names) files.push_back(path / s);
    } else if (fs::exists(path / "model.safetensors")) {
      files.push_back(path / "model.safetensors");
    } else {
      for (const auto& e : fs::directory_iterator(path))
        if (e.path().extension() == ".safetensors") files.push_back(e.path());
      std::sort(files.begin(), files.end());
    }
    TIDAL_CHECK(!files.empty(), FileNotFound,
                "no safetensors checkpoint in \"{}\" (expected model.safetensors, "
                "model.safetensors.index.json or "
                "*.safetensors)",
                path.string());
  }
  for (const auto& f : files) {
    ck->files_.push_back(std::make_unique<SafetensorsFile>(f));
    for (const auto& [name, t] : ck->files_.back()->tensors()) {
      auto [it, inserted] = ck->index_.emplace(name, &t);
      TIDAL_CHECK(inserted, FormatError,
                  "checkpoint \"{}\": tensor \"{}\" appears in both \"{}\" and \"{}\"",
                  path.string(), name, it->second->file, t.file);
    }
  }
  ck->convert_fp8();
  return ck;
}

std::unique_ptr<Checkpoint> Checkpoint::from_tensors(const fs::path& path,
                                                     std::vector<TensorInfo> tensors,
                                                     std::shared_ptr<void> keep) {
  auto ck = std::unique_ptr<Checkpoint>(new Checkpoint());
  ck->path_ = path;
  ck->keep_ = std::move(keep);
  for (auto& t : tensors) {
    ck->synthetic_.push_back(std::make_unique<TensorInfo>(std::move(t)));
    const TensorInfo* p = ck->synthetic_.back().get();
    auto [it, inserted] = ck->index_.emplace(p->name, p);
    TIDAL_CHECK(inserted, FormatError, "checkpoint \"{}\": tensor \"{}\" appears twice",
                path.string(), p->name);
  }
  return ck;
}

// See Note [FP8 checkpoints].
void Checkpoint::convert_fp8() {
  bool any = false;
  for (const auto& [name, t] : index_) any = any || t->dtype == kernels::DType::kF8E4M3;
  if (!any) return;
  const fs::path cfg =
      fs::is_directory(path_) ? path_ / "config.json" : path_.parent_path() / "config.json";
  int64_t block = 128;
  if (fs::exists(cfg)) {
    try {
      std::ifstream f(cfg);
      const json j = json::parse(f);
      const json* q = nullptr;
      if (j.contains("quantization_config"))
        q = &j.at("quantization_config");
      else if (j.contains("text_config") && j.at("text_config").contains("quantization_config"))
        q = &j.at("text_config").at("quantization_config");
      if (q != nullptr) {
        const std::string method = q->value("quant_method", std::string("fp8"));
        TIDAL_CHECK(method == "fp8", Unsupported,
                    "checkpoint \"{}\": quantization_config.quant_method \"{}\" is not "
                    "supported (tidal reads fp8 with block scales)",
                    path_.string(), method);
        if (q->contains("weight_block_size")) {
          const auto b = q->at("weight_block_size").get<std::vector<int64_t>>();
          TIDAL_CHECK(b.size() == 2 && b[0] == b[1] && b[0] > 0 && b[0] <= 4096, Unsupported,
                      "checkpoint \"{}\": FP8 weight_block_size [{}] is not supported (square "
                      "blocks, e.g. [128, 128])",
                      path_.string(), fmt::join(b, ", "));
          block = b[0];
        }
      }
    } catch (const json::exception& e) {
      throw FormatError(
          fmt::format("config \"{}\": bad quantization_config: {}", cfg.string(), e.what()));
    }
  }
  fp8_block_ = block;
  std::vector<std::pair<kernels::cpu::MatrixSource, uint16_t*>> work;
  for (auto& [name, tp] : index_) {
    const TensorInfo& t = *tp;
    if (t.dtype != kernels::DType::kF8E4M3 || name.find(".mlp.experts.") != std::string::npos)
      continue;
    const auto sit = index_.find(fp8_scale_name(name));
    TIDAL_CHECK(sit != index_.end(), FormatError,
                "checkpoint \"{}\": FP8 tensor \"{}\" has no block scales \"{}\"", t.file, name,
                fp8_scale_name(name));
    const TensorInfo& s = *sit->second;
    TIDAL_CHECK(t.shape.size() == 2, FormatError,
                "checkpoint \"{}\": FP8 tensor \"{}\" is {}-D; tidal reads 2-D FP8 matrices "
                "(and 3-D fused experts)",
                t.file, name, t.shape.size());
    const int64_t rows = t.shape[0], cols = t.shape[1];
    kernels::cpu::MatrixSource m;
    m.data = t.data;
    m.dtype = t.dtype;
    m.rows = rows;
    m.cols = cols;
    m.ld = cols;
    m.block = block;
    m.scale_ld = (cols + block - 1) / block;
    const std::vector<int64_t> want{(rows + block - 1) / block, m.scale_ld};
    TIDAL_CHECK(
        s.shape == want && (s.dtype == kernels::DType::kF32 || s.dtype == kernels::DType::kBF16),
        FormatError,
        "checkpoint \"{}\": FP8 block scales \"{}\" are {} {}, expected F32 or BF16 [{}] "
        "({}x{} blocks of \"{}\" {})",
        s.file, s.name, s.dtype_name, s.shape_str(), fmt::join(want, ", "), block, block, name,
        t.shape_str());
    m.scale_inv = s.data;
    m.scale_dtype = s.dtype;
    auto buf = std::make_unique<uint16_t[]>(static_cast<size_t>(rows * cols));
    auto conv = std::make_unique<TensorInfo>(t);
    conv->dtype = kernels::DType::kBF16;
    conv->dtype_name = "BF16";
    conv->data = reinterpret_cast<const std::byte*>(buf.get());
    conv->nbytes = static_cast<size_t>(rows * cols) * 2;
    work.push_back({m, buf.get()});
    owned_.push_back(std::move(buf));
    synthetic_.push_back(std::move(conv));
    tp = synthetic_.back().get();
  }
  // Decode (rows of every tensor in blocks of 64) on plain threads: no executor exists yet.
  std::vector<std::pair<size_t, int64_t>> tasks;
  for (size_t i = 0; i < work.size(); ++i)
    for (int64_t r = 0; r < work[i].first.rows; r += 64) tasks.emplace_back(i, r);
  std::atomic<size_t> next{0};
  auto run = [&] {
    std::vector<float> row;
    for (size_t k = next++; k < tasks.size(); k = next++) {
      const auto& [m, out] = work[tasks[k].first];
      row.resize(static_cast<size_t>(m.cols));
      for (int64_t r = tasks[k].second; r < std::min(m.rows, tasks[k].second + 64); ++r) {
        m.decode_row(r, row.data());
        for (int64_t c = 0; c < m.cols; ++c) out[r * m.cols + c] = kernels::f32_to_bf16(row[c]);
      }
    }
  };
  std::vector<std::thread> pool;
  const size_t n = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), 32);
  try {
    for (size_t w = 1; w < n && w < tasks.size(); ++w) pool.emplace_back(run);
  } catch (const std::system_error&) {
  }
  run();
  for (auto& th : pool) th.join();
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

std::string Checkpoint::indexed_file(const std::string& name) const {
  auto it = weight_map_.find(name);
  return it == weight_map_.end() ? std::string() : it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : index_) out.push_back(n);
  return out;
}

}  // namespace tidal::core
