// SPDX-License-Identifier: Apache-2.0
/// \file expert_cost.h
/// \brief The hybrid pipeline's cost model (issue 7): for one MoE layer of one step, which routed
/// experts run on the GPU (resident in the VRAM expert cache, or copied there now) and which on the
/// CPU, so that the later of the two sides finishes as early as possible (Note [Expert cost
/// model]). Pure arithmetic on rates measured at load: deterministic, tested without a GPU.
#pragma once

#include <cstdint>
#include <vector>

namespace tidal::offload {

// Note [Expert cost model]
// A layer's routed experts run on two sides at once: the CPU expert engine, and the GPU with the
// experts resident in its cache plus any it copies in for this step. Each side's time is the sum
// of its experts' times (each side's rate is already its whole-machine rate):
//   CPU:  max(bytes / cpu_bytes_per_s, tokens · flops_per_token / cpu_flops_per_s) — at decode
//         an expert is one pass over its weights, in prefill its matrix products;
//   GPU:  the same with the GPU's rates, plus bytes / pcie_bytes_per_s for an expert that is not
//         resident (copies and GPU work counted one after the other, a bound, not an overlap).
// split_layer starts from resident experts on the GPU and the rest on the CPU, then tries the
// non-resident experts, most tokens first (every expert costs the same bytes, so the most work per
// copied byte comes first), and moves each to the GPU where that lowers max(CPU, GPU). It does not
// stop at the first refusal: an expert with fewer tokens adds less GPU time and may still fit
// under the CPU side. At decode (one token per expert) copies rarely pay: a
// 35B-A3B INT4 expert is 1.7 MB, 31 µs over a 55 GB/s link against 11 µs of a 150 GB/s CPU, so
// only a CPU side far behind the GPU sends an expert over; in prefill, hundreds of tokens per
// expert make the CPU side compute-bound and copies win. The cache policy (ExpertSlotCache) decides
// what stays resident for later steps; this decides the current step.

/// Rates measured at load (bytes/s, flop/s) and one expert's size and work.
struct ExpertCostInputs {
  double pcie_bytes_per_s = 0;  ///< pinned host-to-device copy
  double cpu_bytes_per_s = 0;   ///< CPU expert engine streaming weights (all its threads)
  double cpu_flops_per_s = 0;   ///< CPU expert engine on matrix products (all its threads)
  double gpu_bytes_per_s = 0;   ///< GPU reading an expert from its slot
  double gpu_flops_per_s = 0;   ///< GPU expert matrix products
  double expert_bytes = 0;      ///< one expert as stored (gate, up, down)
  double flops_per_token = 0;   ///< 2 · 3 · hidden · moe_intermediate
};

/// One layer's placement for one step.
struct LayerSplit {
  std::vector<uint8_t> on_gpu;  ///< per expert (1: GPU, resident or copied now)
  std::vector<uint8_t> copy;    ///< per expert (1: copied in this step)
  double cpu_seconds = 0, gpu_seconds = 0;
  double seconds() const { return cpu_seconds > gpu_seconds ? cpu_seconds : gpu_seconds; }
};

/// The time of one expert for `tokens` rows on the CPU, and on the GPU (with its copy when not
/// resident). 0 for no tokens.
double cpu_expert_seconds(const ExpertCostInputs& in, int64_t tokens);
double gpu_expert_seconds(const ExpertCostInputs& in, int64_t tokens, bool resident);

/// Splits one layer's experts (tokens routed to each, whether each is resident) between the two
/// sides (Note [Expert cost model]). `allow_copies` false: residents on the GPU, the rest on the
/// CPU (no free slot, or the static policy). Throws InvalidArgument on a rate or size that is
/// not positive, negative token counts, or vectors of different lengths.
LayerSplit split_layer(const ExpertCostInputs& in, const std::vector<int64_t>& tokens,
                       const std::vector<uint8_t>& resident, bool allow_copies = true);

// Note [Streaming a prefill chunk]
// In prefill the CudaModel either computes a chunk's routed experts on the CPU engine or copies
// each MoE layer's experts to the GPU whole (one contiguous DMA, the next layer's while this one
// computes; Note [Prefill expert streaming] in core/model/cuda_model.cpp). The copy for layer L+1
// is issued before L+1's router has run, so the choice is made per chunk from its length T, with
// the routing assumed spread evenly: T·k (token, expert) pairs over min(E, T·k) experts.
//   host:   min(E, T·k) experts, each max(bytes / cpu_bytes_per_s, n · flops / cpu_flops_per_s)
//           with n = T·k / min(E, T·k) tokens (cpu_expert_seconds);
//   stream: E · bytes / pcie_bytes_per_s + T·k · flops / gpu_flops_per_s (the copy and the GEMMs
//           counted one after the other: a bound; on the H100 the copy is ~90% of it).
// Skewed routing makes the host side cheaper (fewer experts touched) and leaves the stream side
// unchanged, so the even spread favours streaming a little at the threshold. The rates are the
// ones the CudaModel measures at load (Note [Measuring the stream threshold]).

/// Seconds of one MoE layer's routed experts for a chunk of `tokens`, on the host and streamed.
struct PrefillLayerCost {
  double host_seconds = 0, stream_seconds = 0;
  bool stream() const { return stream_seconds < host_seconds; }
};
PrefillLayerCost prefill_layer_cost(const ExpertCostInputs& in, int64_t tokens, int64_t experts,
                                    int64_t top_k);
/// The shortest chunk t (1 ... max_tokens) from which every chunk up to max_tokens streams faster
/// than the host computes it, -1 if max_tokens does not (the CudaModel streams chunks of at least
/// t tokens). Where PCIe is slower than the CPU's memory and the GPU's products faster than the
/// CPU's, that is simply the first chunk that streams; otherwise a window of shorter chunks may
/// stream too (the host side is flat while every expert is read once), and it is left out.
int64_t min_stream_tokens(const ExpertCostInputs& in, int64_t experts, int64_t top_k,
                          int64_t max_tokens);

}  // namespace tidal::offload
