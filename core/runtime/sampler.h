// SPDX-License-Identifier: Apache-2.0
/// \file sampler.h
/// \brief Next-token selection: greedy, or temperature / top-k / top-p / min-p sampling with a
/// seed.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

namespace tidal::runtime {

struct SamplingParams {
  float temperature = 0.0f;  ///< 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         ///< 0: off
  float top_p = 1.0f;        ///< 1: off
  float min_p = 0.0f;        ///< 0: off
  std::optional<uint64_t> seed;

  /// Throws InvalidArgument naming the bad field.
  void validate() const;
};

/// Holds the random stream of one generation; deterministic for a given seed.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  /// Picks a token from one row of logits. Order: temperature, top-k, top-p, min-p (as
  /// transformers).
  int64_t sample(std::span<const float> logits);
  /// The filtered, renormalised distribution `sample` draws from (for tests); empty when greedy.
  std::vector<float> probabilities(std::span<const float> logits) const;

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

}  // namespace tidal::runtime
