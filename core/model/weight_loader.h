// SPDX-License-Identifier: Apache-2.0
/// \file weight_loader.h
/// \brief Binds checkpoint tensors to the model: checks presence, dtype and shape before any
/// compute.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"
#include "kernels/common/dtype.h"

namespace tidal::core {

/// Buffers converted at load (F16 matrices, every fp32 vector); they live as long as the model.
struct OwnedWeights {
  std::vector<std::unique_ptr<std::vector<float>>> buffers;
};

class WeightLoader {
 public:
  /// `owned` receives converted buffers; it must outlive every view returned.
  WeightLoader(const Checkpoint& ck, std::shared_ptr<OwnedWeights> owned)
      : ck_(ck), owned_(std::move(owned)) {}

  /// The tensor `name`; throws FormatError if missing or if its shape is not `shape`
  /// (`why` names the config fields behind the expected shape), Unsupported for a dtype tidal
  /// cannot run.
  const TensorInfo& require(const std::string& name, const std::vector<int64_t>& shape,
                            const std::string& why) const;

  /// A `[rows, cols]` matrix view: BF16 and F32 stay memory-mapped, F16 is converted to F32.
  kernels::WeightView matrix(const std::string& name, int64_t rows, int64_t cols,
                             const std::string& why);

  /// A view of rows [row0, row0 + rows) of a tensor already checked by `require` (any shape whose
  /// trailing dims multiply to `cols`), e.g. one expert of a fused 3-D tensor.
  kernels::WeightView rows_of(const TensorInfo& t, int64_t row0, int64_t rows, int64_t cols);

  /// Any tensor of the given shape, converted to fp32 and owned.
  std::vector<float> vector_f32(const std::string& name, const std::vector<int64_t>& shape,
                                const std::string& why);

  const Checkpoint& checkpoint() const { return ck_; }

 private:
  const Checkpoint& ck_;
  std::shared_ptr<OwnedWeights> owned_;
};

}  // namespace tidal::core
