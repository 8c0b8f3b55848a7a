// SPDX-License-Identifier: Apache-2.0
/// \file sampler.h
/// \brief Next-token selection: penalties (repetition, presence, frequency), then greedy or
/// temperature / top-k / top-p / min-p sampling with a seed.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace tidal::runtime {

struct SamplingParams {
  float temperature = 0.0f;  ///< 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         ///< 0: off
  float top_p = 1.0f;        ///< 1: off
  float min_p = 0.0f;        ///< 0: off
  /// vLLM / OpenAI semantics. repetition_penalty (1: off) divides positive and multiplies negative
  /// logits of every token seen in the prompt or the output; presence_penalty (0: off) subtracts a
  /// constant from tokens that appeared in the output; frequency_penalty (0: off) subtracts per
  /// occurrence in the output.
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::optional<uint64_t> seed;

  bool has_penalties() const {
    return repetition_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f;
  }

  /// Throws InvalidArgument naming the bad field.
  void validate() const;
};

/// Holds the random stream and the token counts of one generation; deterministic for a seed.
class Sampler {
 public:
  /// `prompt`: the prompt's tokens (repetition_penalty applies to them too).
  explicit Sampler(const SamplingParams& p, std::span<const int64_t> prompt = {});
  /// Picks a token from one row of logits and records it as output (for the penalties). Order:
  /// penalties, then temperature, top-k, top-p, min-p (as transformers).
  int64_t sample(std::span<const float> logits);
  /// Records `token` as generated without sampling it (a forced token).
  void accept(int64_t token);
  /// The logits after the penalties (a copy; unchanged when no penalty is set).
  std::vector<float> penalized(std::span<const float> logits) const;
  /// The filtered, renormalised distribution `sample` draws from (for tests); empty when greedy.
  std::vector<float> probabilities(std::span<const float> logits) const;
  const SamplingParams& params() const { return p_; }

 private:
  std::vector<float> filtered(std::span<const float> penalized_logits) const;
  int64_t draw(const std::vector<float>& prob);
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::unordered_map<int64_t, int64_t> output_counts_;  ///< token -> occurrences in the output
  std::unordered_set<int64_t> seen_;                    ///< prompt ∪ output tokens
};

}  // namespace tidal::runtime
