// SPDX-License-Identifier: Apache-2.0
/// \file routing_control.cpp
/// \brief Routing record / replay.
#include "core/model/routing_control.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace tidal::core {

void RoutingControl::start_recording() {
  std::lock_guard lock(mu_);
  recording_ = true;
  recorded_.assign(static_cast<size_t>(num_layers_), {});
  update_active();
}

std::vector<int32_t> RoutingControl::stop_recording(int64_t& num_tokens) {
  std::lock_guard lock(mu_);
  recording_ = false;
  update_active();
  size_t rows = 0;
  for (const auto& l : recorded_) rows = std::max(rows, l.size() / static_cast<size_t>(top_k_));
  num_tokens = static_cast<int64_t>(rows);
  const auto L = static_cast<size_t>(num_layers_), k = static_cast<size_t>(top_k_);
  std::vector<int32_t> out(rows * L * k, -1);  // dense layers stay -1
  for (size_t l = 0; l < recorded_.size(); ++l)
    for (size_t i = 0; i < recorded_[l].size(); ++i) {
      const size_t t = i / k, j = i % k;
      out[(t * L + l) * k + j] = recorded_[l][i];
    }
  recorded_.clear();
  return out;
}

void top_k_ids(const float* logits, int64_t rows, int64_t E, int64_t k, int32_t* out) {
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < rows; ++t) {
    const float* lg = logits + t * E;
    for (int64_t e = 0; e < E; ++e) order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
    });
    std::copy(order.begin(), order.begin() + k, out + t * k);
  }
}

void RoutingControl::set_replay(std::vector<int32_t> trace, int64_t num_tokens) {
  TIDAL_CHECK(num_tokens > 0, InvalidArgument, "routing trace is empty");
  TIDAL_CHECK(static_cast<int64_t>(trace.size()) == num_tokens * num_layers_ * top_k_,
              InvalidArgument,
              "routing trace has {} ids, expected (tokens={}, layers={}, top_k={})", trace.size(),
              num_tokens, num_layers_, top_k_);
  for (size_t i = 0; i < trace.size(); ++i)
    TIDAL_CHECK(trace[i] >= -1 && trace[i] < num_experts_, InvalidArgument,
                "routing trace: expert id {} at flat index {} is out of range [0, {})", trace[i], i,
                num_experts_);
  // A row (one token, one layer) is all -1 (a dense layer: the router's choice stays) or all
  // experts: a -1 among experts would reach the expert kernels as an id.
  for (size_t r = 0; r < trace.size(); r += static_cast<size_t>(top_k_)) {
    const auto* row = trace.data() + r;
    const bool dense = row[0] < 0;
    for (int64_t j = 1; j < top_k_; ++j)
      TIDAL_CHECK((row[j] < 0) == dense, InvalidArgument,
                  "routing trace: token {}, layer {} mixes -1 with expert ids (a row is all -1 for "
                  "a dense layer, or {} expert ids)",
                  r / static_cast<size_t>(top_k_ * num_layers_),
                  (r / static_cast<size_t>(top_k_)) % static_cast<size_t>(num_layers_), top_k_);
  }
  std::lock_guard lock(mu_);
  replay_ = std::move(trace);
  replay_tokens_ = num_tokens;
  cursor_.assign(static_cast<size_t>(num_layers_), 0);
  update_active();
}

void RoutingControl::clear_replay() {
  std::lock_guard lock(mu_);
  replay_.clear();
  replay_tokens_ = 0;
  update_active();
}

void RoutingControl::on_route(int64_t layer, const float* logits, int64_t num_tokens,
                              bool renormalise, int32_t* ids, float* weights) {
  std::lock_guard lock(mu_);
  const int64_t k = top_k_, E = num_experts_;
  if (replay_tokens_ > 0) {
    int64_t& cur = cursor_[static_cast<size_t>(layer)];
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int32_t* row = replay_.data() + (cur * num_layers_ + layer) * k;
      cur = (cur + 1) % replay_tokens_;
      if (row[0] < 0) continue;  // a dense layer in the trace's model: keep the router's choice
      const float* lg = logits + t * E;
      const float mx = *std::max_element(lg, lg + E);
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(lg[e] - mx));
      double kept = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        ids[t * k + j] = row[j];
        weights[t * k + j] =
            static_cast<float>(std::exp(static_cast<double>(lg[row[j]] - mx)) / sum);
        kept += weights[t * k + j];
      }
      if (renormalise)
        for (int64_t j = 0; j < k; ++j)
          weights[t * k + j] = static_cast<float>(weights[t * k + j] / kept);
    }
  }
  if (recording_) {
    auto& rec = recorded_[static_cast<size_t>(layer)];
    rec.insert(rec.end(), ids, ids + num_tokens * k);
  }
}

void RoutingControl::set_lookahead(bool on, int64_t predict_k) {
  TIDAL_CHECK(predict_k >= 0 && predict_k <= num_experts_, InvalidArgument,
              "router lookahead: predict_k must be in [0, {}] (0: top_k = {}), got {}",
              num_experts_, top_k_, predict_k);
  lookahead_k_.store(predict_k > 0 ? predict_k : top_k_, std::memory_order_release);
  lookahead_.store(on, std::memory_order_release);
}

void RoutingControl::add_lookahead(int64_t layer, const int32_t* predicted, int64_t kp,
                                   const int32_t* routed, int64_t k, int64_t num_tokens) {
  std::lock_guard lock(mu_);
  if (replay_tokens_ > 0) return;
  if (counts_.predicted.empty()) {
    const auto L = static_cast<size_t>(num_layers_);
    counts_.predicted.assign(L, 0);
    counts_.routed.assign(L, 0);
    counts_.hits.assign(L, 0);
  }
  uint64_t hits = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t* p = predicted + t * kp;
    for (int64_t j = 0; j < k; ++j)
      if (std::find(p, p + kp, routed[t * k + j]) != p + kp) ++hits;
  }
  const auto l = static_cast<size_t>(layer);
  counts_.predicted[l] += static_cast<uint64_t>(num_tokens * kp);
  counts_.routed[l] += static_cast<uint64_t>(num_tokens * k);
  counts_.hits[l] += hits;
}

RoutingControl::LookaheadCounts RoutingControl::lookahead_counts() const {
  std::lock_guard lock(mu_);
  LookaheadCounts c = counts_;
  if (c.predicted.empty()) {
    const auto L = static_cast<size_t>(num_layers_);
    c.predicted.assign(L, 0);
    c.routed.assign(L, 0);
    c.hits.assign(L, 0);
  }
  return c;
}

void RoutingControl::reset_lookahead() {
  std::lock_guard lock(mu_);
  counts_ = {};
}

}  // namespace tidal::core
