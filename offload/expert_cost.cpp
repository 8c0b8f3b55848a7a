// SPDX-License-Identifier: Apache-2.0
#include "offload/expert_cost.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "core/error.h"

namespace tidal::offload {
namespace {

/// Every rate and size the model uses must be positive; the prefill choice does not read the
/// GPU's bytes rate (a streamed expert is read from its copy once per chunk, in the products).
void check(const ExpertCostInputs& in, bool gpu_bytes = true) {
  const std::pair<const char*, double> fields[] = {
      {"pcie_bytes_per_s", in.pcie_bytes_per_s},
      {"cpu_bytes_per_s", in.cpu_bytes_per_s},
      {"cpu_flops_per_s", in.cpu_flops_per_s},
      {"gpu_bytes_per_s", gpu_bytes ? in.gpu_bytes_per_s : 1},
      {"gpu_flops_per_s", in.gpu_flops_per_s},
      {"expert_bytes", in.expert_bytes},
      {"flops_per_token", in.flops_per_token}};
  for (const auto& [name, v] : fields)
    TIDAL_CHECK(v > 0, InvalidArgument, "expert cost model: {} must be > 0, got {}", name, v);
}

}  // namespace

double cpu_expert_seconds(const ExpertCostInputs& in, int64_t tokens) {
  if (tokens <= 0) return 0.0;
  return std::max(in.expert_bytes / in.cpu_bytes_per_s,
                  static_cast<double>(tokens) * in.flops_per_token / in.cpu_flops_per_s);
}

double gpu_expert_seconds(const ExpertCostInputs& in, int64_t tokens, bool resident) {
  if (tokens <= 0) return 0.0;
  const double run =
      std::max(in.expert_bytes / in.gpu_bytes_per_s,
               static_cast<double>(tokens) * in.flops_per_token / in.gpu_flops_per_s);
  return run + (resident ? 0.0 : in.expert_bytes / in.pcie_bytes_per_s);
}

LayerSplit split_layer(const ExpertCostInputs& in, const std::vector<int64_t>& tokens,
                       const std::vector<uint8_t>& resident, bool allow_copies) {
  check(in);
  TIDAL_CHECK(tokens.size() == resident.size(), InvalidArgument,
              "expert cost model: {} token counts for {} residency flags", tokens.size(),
              resident.size());
  const size_t n = tokens.size();
  LayerSplit s;
  s.on_gpu.assign(n, 0);
  s.copy.assign(n, 0);
  std::vector<size_t> candidates;
  for (size_t e = 0; e < n; ++e) {
    TIDAL_CHECK(tokens[e] >= 0, InvalidArgument, "expert cost model: expert {} has {} tokens", e,
                tokens[e]);
    if (tokens[e] == 0) continue;
    if (resident[e]) {
      s.on_gpu[e] = 1;
      s.gpu_seconds += gpu_expert_seconds(in, tokens[e], true);
    } else {
      s.cpu_seconds += cpu_expert_seconds(in, tokens[e]);
      candidates.push_back(e);
    }
  }
  if (!allow_copies) return s;
  // Most tokens first; the lower expert id on ties (deterministic).
  std::stable_sort(candidates.begin(), candidates.end(),
                   [&](size_t a, size_t b) { return tokens[a] > tokens[b]; });
  for (const size_t e : candidates) {
    const double cpu = s.cpu_seconds - cpu_expert_seconds(in, tokens[e]);
    const double gpu = s.gpu_seconds + gpu_expert_seconds(in, tokens[e], false);
    if (std::max(cpu, gpu) < s.seconds()) {
      s.cpu_seconds = cpu;
      s.gpu_seconds = gpu;
      s.on_gpu[e] = 1;
      s.copy[e] = 1;
    }
  }
  // The reported times summed again from the final placement (no subtraction residue).
  s.cpu_seconds = s.gpu_seconds = 0;
  for (size_t e = 0; e < n; ++e) {
    if (s.on_gpu[e])
      s.gpu_seconds += gpu_expert_seconds(in, tokens[e], !s.copy[e]);
    else
      s.cpu_seconds += cpu_expert_seconds(in, tokens[e]);
  }
  return s;
}

PrefillLayerCost prefill_layer_cost(const ExpertCostInputs& in, int64_t tokens, int64_t experts,
                                    int64_t top_k) {
  check(in, false);
  TIDAL_CHECK(tokens >= 0 && experts > 0 && top_k > 0 && top_k <= experts, InvalidArgument,
              "expert cost model: {} tokens, {} experts, top_k {}", tokens, experts, top_k);
  PrefillLayerCost c;
  if (tokens == 0) return c;
  const double pairs = static_cast<double>(tokens) * static_cast<double>(top_k);
  const double touched = std::min(static_cast<double>(experts), pairs);
  const double n = pairs / touched;
  c.host_seconds = touched * std::max(in.expert_bytes / in.cpu_bytes_per_s,
                                      n * in.flops_per_token / in.cpu_flops_per_s);
  c.stream_seconds = static_cast<double>(experts) * in.expert_bytes / in.pcie_bytes_per_s +
                     pairs * in.flops_per_token / in.gpu_flops_per_s;
  return c;
}

int64_t min_stream_tokens(const ExpertCostInputs& in, int64_t experts, int64_t top_k,
                          int64_t max_tokens) {
  TIDAL_CHECK(max_tokens >= 1, InvalidArgument, "expert cost model: max_tokens {}", max_tokens);
  // Down from the longest chunk: the shortest t from which every longer chunk streams too.
  if (!prefill_layer_cost(in, max_tokens, experts, top_k).stream()) return -1;
  int64_t t = max_tokens;
  while (t > 1 && prefill_layer_cost(in, t - 1, experts, top_k).stream()) --t;
  return t;
}

}  // namespace tidal::offload
