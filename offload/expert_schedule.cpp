// SPDX-License-Identifier: Apache-2.0
#include "offload/expert_schedule.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"

namespace tidal::offload {

ExpertCacheSchedule::ExpertCacheSchedule(int64_t layers, int64_t experts, int64_t slots,
                                         CachePolicy policy, int64_t max_fills, double decay,
                                         int64_t static_steps, int64_t prefetch)
    : layers_(layers),
      experts_(experts),
      max_fills_(max_fills),
      static_(policy == CachePolicy::kStatic),
      static_steps_(static_steps),
      // "static" profiles with LFU's counts, then stops admitting (frozen()).
      cache_(layers, experts, slots, policy == CachePolicy::kStatic ? CachePolicy::kLfu : policy,
             decay) {
  if (layers <= 0 || experts <= 0 || slots <= 0 || max_fills <= 0 || static_steps < 0 ||
      prefetch < 0)
    throw InvalidArgument(fmt::format(
        "expert cache schedule: layers {}, experts {}, slots {} and max_fills {} must be > 0 "
        "(static_steps {} and prefetch {} >= 0)",
        layers, experts, slots, max_fills, static_steps, prefetch));
  prefetch_ = prefetch;
  table_.assign(static_cast<size_t>(layers * experts), ExpertSlotCache::kNone);
  next_ = table_;
  layer_seen_.assign(static_cast<size_t>(layers), 0);
}

const std::vector<ExpertCacheSchedule::Fill>& ExpertCacheSchedule::begin_step() {
  if (in_step_) end_prefetches();   // a step that never ended: its prefetches leave the table
  for (const Fill& f : running_) {  // issued at the last step's start, landed since
    if (cache_.expert_in(f.slot) != std::pair<int64_t, int64_t>{f.layer, f.expert}) continue;
    next_[static_cast<size_t>(f.layer * experts_ + f.expert)] = f.slot;
    ++fills_kept_;
  }
  running_.clear();
  changed_ = stale_ || next_ != table_;  // stale_: the device still holds last step's prefetches
  stale_ = false;
  if (changed_) table_ = next_;
  in_step_ = true;
  pf_buffer_ = 0;
  std::fill(layer_seen_.begin(), layer_seen_.end(), uint8_t{0});
  issued_.swap(queued_);
  queued_.clear();
  for (const Fill& f : issued_) cache_.pin(f.slot);  // not handed on while it fills
  fills_issued_ += static_cast<int64_t>(issued_.size());
  running_ = issued_;
  return issued_;
}

int64_t ExpertCacheSchedule::route(int64_t layer, const int32_t* ids, int64_t k,
                                   std::vector<int32_t>& host) {
  if (layer < 0 || layer >= layers_)
    throw InvalidArgument(
        fmt::format("expert cache schedule: layer {} outside [0, {})", layer, layers_));
  host.clear();
  keys_.clear();
  layer_seen_[static_cast<size_t>(layer)] = 1;
  const int32_t* row = table_.data() + layer * experts_;
  const auto pool = static_cast<int32_t>(cache_.slots());
  for (int64_t i = 0; i < k; ++i) {
    const int32_t e = ids[i];
    const bool valid = e >= 0 && e < experts_;
    if (valid) keys_.push_back(e);  // the policy sees valid ids only
    if (valid && row[e] != ExpertSlotCache::kNone) {
      prefetch_hits_ += row[e] >= pool;  // a prefetch slot, not the policy's
      continue;
    }
    host.push_back(static_cast<int32_t>(i));
  }
  cache_.lookup(layer, keys_, found_);
  if (frozen()) return k - static_cast<int64_t>(host.size());
  for (size_t i = 0; i < keys_.size(); ++i) {
    if (found_[i] != ExpertSlotCache::kNone) continue;
    const int64_t e = keys_[i];
    if (cache_.slot_of(layer, e) != ExpertSlotCache::kNone) continue;  // listed twice
    if (static_cast<int64_t>(queued_.size() + running_.size()) >= max_fills_) break;
    const ExpertSlotCache::Admission adm = cache_.admit(layer, e);
    if (adm.slot == ExpertSlotCache::kNone) break;
    if (adm.evicted_layer != ExpertSlotCache::kNone)
      next_[static_cast<size_t>(adm.evicted_layer * experts_ + adm.evicted_expert)] =
          ExpertSlotCache::kNone;
    next_[static_cast<size_t>(layer * experts_ + e)] = ExpertSlotCache::kNone;  // until landed
    queued_.push_back({adm.slot, layer, e});
  }
  return k - static_cast<int64_t>(host.size());
}

const std::vector<ExpertCacheSchedule::Fill>& ExpertCacheSchedule::prefetch(
    int64_t layer, const int32_t* predicted, int64_t n) {
  if (layer < 0 || layer >= layers_ || n < 0)
    throw InvalidArgument(fmt::format(
        "expert cache schedule: prefetch for layer {} of [0, {}) with {} ids", layer, layers_, n));
  if (!in_step_)
    throw InvalidArgument("expert cache schedule: prefetch outside a step (call begin_step)");
  if (layer_seen_[static_cast<size_t>(layer)] != 0)
    throw InvalidArgument(fmt::format(
        "expert cache schedule: layer {} was already routed or prefetched in this step", layer));
  layer_seen_[static_cast<size_t>(layer)] = 1;
  pf_fills_.clear();
  if (prefetch_ == 0) return pf_fills_;
  int32_t* row = table_.data() + layer * experts_;
  const int64_t base = cache_.slots() + pf_buffer_ * prefetch_;
  pf_buffer_ ^= 1;
  for (int64_t i = 0; i < n && static_cast<int64_t>(pf_fills_.size()) < prefetch_; ++i) {
    const int32_t e = predicted[i];
    if (e < 0 || e >= experts_ || row[e] != ExpertSlotCache::kNone) continue;  // held or repeated
    const auto slot = static_cast<int32_t>(base + static_cast<int64_t>(pf_fills_.size()));
    row[e] = slot;
    pf_fills_.push_back({slot, layer, e});
    pf_set_.push_back({slot, layer, e});
  }
  prefetched_ += static_cast<int64_t>(pf_fills_.size());
  return pf_fills_;
}

void ExpertCacheSchedule::end_prefetches() {
  in_step_ = false;
  for (const Fill& f : pf_set_)  // this step's only: the policy's table is what stays
    table_[static_cast<size_t>(f.layer * experts_ + f.expert)] = ExpertSlotCache::kNone;
  stale_ = stale_ || !pf_set_.empty();
  pf_set_.clear();
}

void ExpertCacheSchedule::end_step() {
  end_prefetches();
  ++steps_;
  cache_.release_pins();  // a queued copy's slot is pinned again when begin_step issues it
  cache_.next_token();
}

}  // namespace tidal::offload
