// SPDX-License-Identifier: Apache-2.0
/// \file weight_loader.cpp
/// \brief Tensor lookup with the error messages of house-style §6, and dtype conversion at load.
#include "core/model/weight_loader.h"

#include <fmt/ranges.h>

#include <cstring>

#include "core/error.h"

namespace tidal::core {
using kernels::DType;

namespace {
bool runnable(DType dt) { return dt == DType::kBF16 || dt == DType::kF16 || dt == DType::kF32; }

// Reads through memcpy: tensor data need not be aligned in a safetensors file.
float element(const TensorInfo& t, int64_t i) {
  if (t.dtype == DType::kF32) {
    float f;
    std::memcpy(&f, t.data + i * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, t.data + i * 2, 2);
  return t.dtype == DType::kBF16 ? kernels::bf16_to_f32(h) : kernels::f16_to_f32(h);
}
}  // namespace

const TensorInfo& WeightLoader::require(const std::string& name, const std::vector<int64_t>& shape,
                                        const std::string& why) const {
  const TensorInfo* t = ck_.find(name);
  if (t == nullptr) {
    const std::string shard = ck_.indexed_file(name);
    throw FormatError(fmt::format(
        "checkpoint \"{}\": tensor \"{}\" is missing{} (expected shape [{}]; {})",
        ck_.path().string(), name,
        shard.empty() ? "" : fmt::format(" from \"{}\", where the index places it", shard),
        fmt::join(shape, ", "), why));
  }
  TIDAL_CHECK(t->shape == shape, FormatError,
              "checkpoint \"{}\": tensor \"{}\" has shape {}, expected [{}] ({})", t->file, name,
              t->shape_str(), fmt::join(shape, ", "), why);
  TIDAL_CHECK(runnable(t->dtype), Unsupported,
              "checkpoint \"{}\": tensor \"{}\" has dtype {}, which tidal cannot run yet "
              "(supported: BF16, F16, F32)",
              t->file, name, t->dtype_name);
  return *t;
}

kernels::WeightView WeightLoader::rows_of(const TensorInfo& t, int64_t row0, int64_t rows,
                                          int64_t cols) {
  const size_t es = kernels::dtype_size(t.dtype);
  const bool aligned = reinterpret_cast<uintptr_t>(t.data) % es == 0;
  // F16 is widened at load; so is a matrix the file left unaligned for its element type.
  if (t.dtype == DType::kF16 || !aligned) {
    auto buf = std::make_unique<std::vector<float>>(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows * cols; ++i) (*buf)[i] = element(t, row0 * cols + i);
    const float* p = buf->data();
    owned_->buffers.push_back(std::move(buf));
    return {p, DType::kF32, rows, cols};
  }
  const auto* p = t.data + static_cast<size_t>(row0 * cols) * kernels::dtype_size(t.dtype);
  return {p, t.dtype, rows, cols};
}

kernels::WeightView WeightLoader::matrix(const std::string& name, int64_t rows, int64_t cols,
                                         const std::string& why) {
  return rows_of(require(name, {rows, cols}, why), 0, rows, cols);
}

std::vector<float> WeightLoader::vector_f32(const std::string& name,
                                            const std::vector<int64_t>& shape,
                                            const std::string& why) {
  const TensorInfo& t = require(name, shape, why);
  std::vector<float> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = element(t, i);
  return out;
}

}  // namespace tidal::core
