// SPDX-License-Identifier: Apache-2.0
/// \file sampler.cpp
/// \brief Greedy and filtered sampling.
#include "core/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace tidal::runtime {

void SamplingParams::validate() const {
  TIDAL_CHECK(std::isfinite(temperature) && temperature >= 0.0f, InvalidArgument,
              "temperature must be a finite number >= 0, got {}", temperature);
  TIDAL_CHECK(top_k >= 0, InvalidArgument, "top_k must be >= 0 (0 disables it), got {}", top_k);
  TIDAL_CHECK(top_p > 0.0f && top_p <= 1.0f, InvalidArgument, "top_p must be in (0, 1], got {}",
              top_p);
  TIDAL_CHECK(min_p >= 0.0f && min_p <= 1.0f, InvalidArgument, "min_p must be in [0, 1], got {}",
              min_p);
  TIDAL_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f, InvalidArgument,
              "repetition_penalty must be a finite number > 0 (1 disables it), got {}",
              repetition_penalty);
  TIDAL_CHECK(
      std::isfinite(presence_penalty) && presence_penalty >= -2.0f && presence_penalty <= 2.0f,
      InvalidArgument, "presence_penalty must be in [-2, 2] (0 disables it), got {}",
      presence_penalty);
  TIDAL_CHECK(
      std::isfinite(frequency_penalty) && frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
      InvalidArgument, "frequency_penalty must be in [-2, 2] (0 disables it), got {}",
      frequency_penalty);
}

Sampler::Sampler(const SamplingParams& p, std::span<const int64_t> prompt)
    : p_(p), rng_(p.seed.value_or(std::random_device{}())) {
  p_.validate();
  if (p_.repetition_penalty != 1.0f) seen_.insert(prompt.begin(), prompt.end());
}

void Sampler::accept(int64_t token) {
  if (!p_.has_penalties()) return;
  ++output_counts_[token];
  seen_.insert(token);
}

std::vector<float> Sampler::penalized(std::span<const float> logits) const {
  std::vector<float> out(logits.begin(), logits.end());
  const auto V = static_cast<int64_t>(out.size());
  if (p_.repetition_penalty != 1.0f)
    for (int64_t t : seen_)
      if (t >= 0 && t < V) {
        float& v = out[static_cast<size_t>(t)];
        v = v > 0.0f ? v / p_.repetition_penalty : v * p_.repetition_penalty;
      }
  if (p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f)
    for (const auto& [t, n] : output_counts_)
      if (t >= 0 && t < V)
        out[static_cast<size_t>(t)] -=
            p_.frequency_penalty * static_cast<float>(n) + p_.presence_penalty;
  return out;
}

std::vector<float> Sampler::probabilities(std::span<const float> logits) const {
  if (p_.temperature == 0.0f) return {};
  if (!p_.has_penalties()) return filtered(logits);
  return filtered(penalized(logits));
}

std::vector<float> Sampler::filtered(std::span<const float> logits) const {
  const size_t V = logits.size();
  std::vector<double> prob(V);
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (size_t i = 0; i < V; ++i) {
    prob[i] = std::exp((static_cast<double>(logits[i]) - mx) / p_.temperature);
    sum += prob[i];
  }
  for (auto& v : prob) v /= sum;
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  // Descending probability, lower id first on ties (a total order, so partial and full sorts
  // agree).
  const auto before = [&](int64_t a, int64_t b) {
    return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
  };
  size_t keep = V;
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < V) {
    keep = static_cast<size_t>(p_.top_k);  // only the top k need an order: O(V log k)
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                      before);
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  if (p_.top_p < 1.0f) {
    // Smallest prefix (among the kept) whose mass reaches top_p; renormalised over the kept set.
    double kept_mass = 0.0;
    for (size_t i = 0; i < keep; ++i) kept_mass += prob[order[i]];
    double cum = 0.0;
    size_t n = 0;
    while (n < keep) {
      cum += prob[order[n]] / kept_mass;
      ++n;
      if (cum >= p_.top_p) break;
    }
    keep = std::max<size_t>(1, n);
  }
  if (p_.min_p > 0.0f) {
    const double thresh = p_.min_p * prob[order[0]];
    size_t n = 0;
    while (n < keep && prob[order[n]] >= thresh) ++n;
    keep = std::max<size_t>(1, n);
  }
  std::vector<float> out(V, 0.0f);
  double mass = 0.0;
  for (size_t i = 0; i < keep; ++i) mass += prob[order[i]];
  for (size_t i = 0; i < keep; ++i) out[order[i]] = static_cast<float>(prob[order[i]] / mass);
  return out;
}

int64_t Sampler::sample(std::span<const float> raw) {
  std::vector<float> pen;
  std::span<const float> logits = raw;
  if (p_.has_penalties()) {
    pen = penalized(raw);
    logits = pen;
  }
  int64_t tok;
  if (p_.temperature == 0.0f)
    tok = std::distance(logits.begin(), std::max_element(logits.begin(), logits.end()));
  else
    tok = draw(filtered(logits));
  accept(tok);
  return tok;
}

int64_t Sampler::draw(const std::vector<float>& prob) {
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const double r = uni(rng_);
  double cum = 0.0;
  int64_t last = 0;
  for (size_t i = 0; i < prob.size(); ++i) {
    if (prob[i] <= 0.0f) continue;
    cum += prob[i];
    last = static_cast<int64_t>(i);
    if (r < cum) return last;
  }
  return last;
}

}  // namespace tidal::runtime
