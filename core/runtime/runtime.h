// SPDX-License-Identifier: Apache-2.0
/// \file runtime.h
/// \brief The user-facing engine: load a checkpoint, compute logits, generate; sequences with
/// explicit state.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"
#include "core/config/model_config.h"
#include "core/model/model.h"
#include "core/runtime/sampler.h"
#include "kernels/common/executor.h"

namespace tidal::runtime {

struct RuntimeOptions {
  std::string device = "cpu";  ///< "cpu" (the CUDA backend is issue #4)
  int num_threads = 0;         ///< 0: one per physical core
};

struct GenerationConfig {
  int64_t max_new_tokens = 32;
  SamplingParams sampling;
  std::vector<int64_t> stop_token_ids;  ///< generation ends after emitting one of these

  void validate() const;
};

struct GenerationResult {
  std::vector<int64_t> token_ids;  ///< the new tokens only
  std::string finish_reason;       ///< "length" or "stop"
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

class Runtime;

/// One sequence: its own KV cache and DeltaNet states. Feed it tokens in chunks of any size.
class Sequence {
 public:
  explicit Sequence(std::shared_ptr<const Runtime> rt);
  /// Appends `ids`; returns logits (rows, vocab) for every new token (all_logits) or only the last.
  std::vector<float> forward(std::span<const int64_t> ids, bool all_logits);
  int64_t num_tokens() const { return state_.num_tokens; }

 private:
  std::shared_ptr<const Runtime> rt_;
  core::SequenceState state_;
};

class Runtime : public std::enable_shared_from_this<Runtime> {
 public:
  /// Loads a checkpoint directory (config.json + safetensors). All validation happens here.
  static std::shared_ptr<Runtime> load(const std::filesystem::path& path,
                                       const RuntimeOptions& opts);

  const core::ModelConfig& config() const { return model_->config(); }
  const RuntimeOptions& options() const { return opts_; }
  int num_threads() const { return executor_->num_threads(); }

  /// Logits at every position of a fresh sequence: (ids.size(), vocab_size) row-major.
  std::vector<float> logits(std::span<const int64_t> ids) const;

  /// Prefills `prompt` and generates up to max_new_tokens tokens.
  GenerationResult generate(std::span<const int64_t> prompt, const GenerationConfig& gen) const;

  /// Throws InvalidArgument unless every id is in [0, vocab_size) (and, with `non_empty`, ids is
  /// not empty).
  void check_token_ids(std::span<const int64_t> ids, bool non_empty) const;

  const core::Model& model() const { return *model_; }
  kernels::Executor& executor() const { return *executor_; }

 private:
  Runtime() = default;
  RuntimeOptions opts_;
  std::unique_ptr<core::Checkpoint> checkpoint_;
  std::unique_ptr<core::Model> model_;
  std::unique_ptr<kernels::Executor> executor_;
};

/// Physical cores of this machine (hwloc), at least 1.
int physical_core_count();

}  // namespace tidal::runtime
