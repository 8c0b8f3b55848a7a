// SPDX-License-Identifier: Apache-2.0
/// \file routing_control.h
/// \brief Benchmark and analysis control of MoE routing: record the experts the routers choose, or
/// replay a routing trace in place of the routers' choice (expert-cache studies on synthetic
/// models).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

namespace tidal::core {

/// A trace is (num_tokens, num_layers, top_k) expert ids, row-major, -1 for dense layers: the
/// `experts` array of models/tidal-mini/routing_trace.npz. Thread-safe; meant for one sequence at a
/// time (rows are appended / consumed in call order).
/// The k highest of each row's E logits, highest first, lower id on ties (moe_route's top-k),
/// into out[rows][k]. For predictions (Note [Router lookahead]).
void top_k_ids(const float* logits, int64_t rows, int64_t E, int64_t k, int32_t* out);

class RoutingControl {
 public:
  RoutingControl(int64_t num_layers, int64_t num_experts, int64_t top_k)
      : num_layers_(num_layers), num_experts_(num_experts), top_k_(top_k) {}

  /// Starts recording (drops anything recorded before).
  void start_recording();
  /// Stops recording; returns the trace and its number of tokens.
  std::vector<int32_t> stop_recording(int64_t& num_tokens);
  /// Replaces the routers' choice by `trace` (num_tokens rows, looped when exhausted). Throws
  /// InvalidArgument for a wrong size or an expert id out of range.
  void set_replay(std::vector<int32_t> trace, int64_t num_tokens);
  void clear_replay();

  /// Called by the model for MoE layer `layer` after routing T tokens: records `ids`, or overwrites
  /// ids and weights from the trace (weights = router probabilities of the replayed experts,
  /// renormalised when `renormalise`, as the router would).
  void on_route(int64_t layer, const float* logits, int64_t num_tokens, bool renormalise,
                int32_t* ids, float* weights);
  /// Recording or replaying (a lock-free check, so the model pays nothing otherwise).
  bool active() const { return active_.load(std::memory_order_acquire); }

  /// Router lookahead accounting (Note [Router lookahead] in model.cpp). With it on, the CPU model
  /// predicts each MoE layer's experts one layer early and reports them here. `predict_k`: experts
  /// predicted per token (0: top_k); more than num_experts is InvalidArgument.
  void set_lookahead(bool on, int64_t predict_k = 0);
  bool lookahead() const { return lookahead_.load(std::memory_order_acquire); }
  int64_t lookahead_k() const { return lookahead_k_.load(std::memory_order_acquire); }
  /// Adds T tokens of MoE layer `layer`: `predicted` (T rows of kp ids) against `routed` (T rows
  /// of k ids). Ignored while a trace is replayed (the router did not choose those experts).
  void add_lookahead(int64_t layer, const int32_t* predicted, int64_t kp, const int32_t* routed,
                     int64_t k, int64_t num_tokens);
  /// Per layer since the last reset: ids predicted, ids routed, routed ids that were predicted.
  struct LookaheadCounts {
    std::vector<uint64_t> predicted, routed, hits;
  };
  LookaheadCounts lookahead_counts() const;
  void reset_lookahead();

 private:
  void update_active() {
    active_.store(recording_ || replay_tokens_ > 0, std::memory_order_release);
  }
  mutable std::mutex mu_;
  std::atomic<bool> active_{false};
  std::atomic<bool> lookahead_{false};
  std::atomic<int64_t> lookahead_k_{0};
  LookaheadCounts counts_;
  int64_t num_layers_, num_experts_, top_k_;
  bool recording_ = false;
  std::vector<std::vector<int32_t>> recorded_;  // per layer: rows of top_k ids
  std::vector<int32_t> replay_;
  int64_t replay_tokens_ = 0;
  std::vector<int64_t> cursor_;  // per layer: next trace row
};

}  // namespace tidal::core
