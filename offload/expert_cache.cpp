// SPDX-License-Identifier: Apache-2.0
#include "offload/expert_cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>

#include "core/error.h"

namespace tidal::offload {

CachePolicy parse_cache_policy(const std::string& s) {
  if (s == "lru") return CachePolicy::kLru;
  if (s == "lfu") return CachePolicy::kLfu;
  if (s == "static") return CachePolicy::kStatic;
  throw InvalidArgument(
      fmt::format("unknown expert cache policy '{}': expected lru, lfu or static", s));
}

const char* cache_policy_name(CachePolicy p) {
  switch (p) {
    case CachePolicy::kLru:
      return "lru";
    case CachePolicy::kLfu:
      return "lfu";
    case CachePolicy::kStatic:
      return "static";
  }
  return "?";
}

ExpertSlotCache::ExpertSlotCache(int64_t layers, int64_t experts, int64_t slots, CachePolicy policy,
                                 double decay, uint64_t expert_bytes)
    : layers_(layers), experts_(experts), policy_(policy), expert_bytes_(expert_bytes) {
  if (layers < 0 || experts < 0 || slots < 0)
    throw InvalidArgument(
        fmt::format("expert cache: layers ({}), experts ({}) and slots ({}) must be >= 0", layers,
                    experts, slots));
  if (!(decay > 0.0 && decay <= 1.0))
    throw InvalidArgument(fmt::format("expert cache: decay must be in (0, 1], got {}", decay));
  if (slots > std::numeric_limits<int32_t>::max())
    throw InvalidArgument(fmt::format("expert cache: {} slots is too many", slots));
  neg_log_decay_ = -std::log(decay);
  const int64_t keys = layers * experts;
  key_slot_.assign(static_cast<size_t>(keys), kNone);
  slot_key_.assign(static_cast<size_t>(slots), kNone);
  pinned_.assign(static_cast<size_t>(slots), 0);
  free_.reserve(static_cast<size_t>(slots));
  for (int64_t s = slots - 1; s >= 0; --s) free_.push_back(static_cast<int32_t>(s));
  if (policy_ == CachePolicy::kLru) lru_pos_.resize(static_cast<size_t>(keys));
  if (policy_ == CachePolicy::kLfu)
    lfu_n_.assign(static_cast<size_t>(keys), -std::numeric_limits<double>::infinity());
  stats_.resize(static_cast<size_t>(layers));
}

int64_t ExpertSlotCache::key(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= layers_ || expert < 0 || expert >= experts_)
    throw InvalidArgument(
        fmt::format("expert cache: (layer {}, expert {}) outside {} layers of {} experts", layer,
                    expert, layers_, experts_));
  return layer * experts_ + expert;
}

void ExpertSlotCache::touch(int64_t k) {
  if (policy_ == CachePolicy::kLru) {
    if (key_slot_[static_cast<size_t>(k)] != kNone)
      lru_.splice(lru_.end(), lru_, lru_pos_[static_cast<size_t>(k)]);
  } else if (policy_ == CachePolicy::kLfu) {
    // n = log(count) + token · L; the decayed count now is exp(n − token · L).
    double& n = lfu_n_[static_cast<size_t>(k)];
    const double t = static_cast<double>(token_) * neg_log_decay_;
    const bool res = key_slot_[static_cast<size_t>(k)] != kNone;
    if (res) lfu_order_.erase({n, k});
    n = std::isinf(n) ? t : t + std::log1p(std::exp(n - t));
    if (res) lfu_order_.insert({n, k});
  }
}

int32_t ExpertSlotCache::victim() const {
  if (policy_ == CachePolicy::kLru) {
    for (const int64_t k : lru_) {
      const int32_t s = key_slot_[static_cast<size_t>(k)];
      if (!pinned_[static_cast<size_t>(s)]) return s;
    }
  } else if (policy_ == CachePolicy::kLfu) {
    for (const auto& [n, k] : lfu_order_) {
      const int32_t s = key_slot_[static_cast<size_t>(k)];
      if (!pinned_[static_cast<size_t>(s)]) return s;
    }
  }
  return kNone;
}

void ExpertSlotCache::place(int64_t k, int32_t s) {
  slot_key_[static_cast<size_t>(s)] = k;
  key_slot_[static_cast<size_t>(k)] = s;
  ++resident_;
  if (policy_ == CachePolicy::kLru) {
    lru_.push_back(k);
    lru_pos_[static_cast<size_t>(k)] = std::prev(lru_.end());
  } else if (policy_ == CachePolicy::kLfu) {
    lfu_order_.insert({lfu_n_[static_cast<size_t>(k)], k});
  }
}

int32_t ExpertSlotCache::lookup(int64_t layer, int64_t expert) {
  const int64_t k = key(layer, expert);
  const int32_t s = key_slot_[static_cast<size_t>(k)];
  auto& st = stats_[static_cast<size_t>(layer)];
  if (s != kNone) {
    ++st.hits;
    if (!pinned_[static_cast<size_t>(s)]) {
      pinned_[static_cast<size_t>(s)] = 1;
      pinned_list_.push_back(s);
    }
  } else {
    ++st.misses;
  }
  touch(k);
  return s;
}

void ExpertSlotCache::lookup(int64_t layer, const std::vector<int64_t>& experts,
                             std::vector<int32_t>& slots) {
  slots.resize(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) slots[i] = lookup(layer, experts[i]);
}

ExpertSlotCache::Admission ExpertSlotCache::admit(int64_t layer, int64_t expert) {
  const int64_t k = key(layer, expert);
  if (key_slot_[static_cast<size_t>(k)] != kNone)
    throw InvalidArgument(fmt::format("expert cache: (layer {}, expert {}) is already in slot {}",
                                      layer, expert, key_slot_[static_cast<size_t>(k)]));
  auto& st = stats_[static_cast<size_t>(layer)];
  Admission a;
  if (policy_ == CachePolicy::kStatic || slot_key_.empty()) {
    ++st.not_admitted;
    return a;
  }
  int32_t s = kNone;
  if (!free_.empty()) {
    s = free_.back();
    free_.pop_back();
  } else {
    s = victim();
    if (s == kNone) {
      ++st.not_admitted;
      return a;
    }
    const int64_t old = slot_key_[static_cast<size_t>(s)];
    a.evicted_layer = old / experts_;
    a.evicted_expert = old % experts_;
    ++stats_[static_cast<size_t>(a.evicted_layer)].evictions;
    if (policy_ == CachePolicy::kLru) {
      lru_.erase(lru_pos_[static_cast<size_t>(old)]);
    } else {
      lfu_order_.erase({lfu_n_[static_cast<size_t>(old)], old});
    }
    key_slot_[static_cast<size_t>(old)] = kNone;
    slot_key_[static_cast<size_t>(s)] = kNone;
    --resident_;
  }
  place(k, s);
  pinned_[static_cast<size_t>(s)] = 1;
  pinned_list_.push_back(s);
  ++st.admitted;
  st.bytes_in += expert_bytes_;
  a.slot = s;
  return a;
}

bool ExpertSlotCache::access(int64_t layer, int64_t expert) {
  if (lookup(layer, expert) != kNone) return true;
  admit(layer, expert);
  return false;
}

void ExpertSlotCache::next_token() { ++token_; }

void ExpertSlotCache::release_pins() {
  for (const int32_t s : pinned_list_) pinned_[static_cast<size_t>(s)] = 0;
  pinned_list_.clear();
}

void ExpertSlotCache::pin(int32_t slot) {
  if (slot < 0 || slot >= slots())
    throw InvalidArgument(fmt::format("expert cache: slot {} outside [0, {})", slot, slots()));
  if (pinned_[static_cast<size_t>(slot)]) return;
  pinned_[static_cast<size_t>(slot)] = 1;
  pinned_list_.push_back(slot);
}

void ExpertSlotCache::set_resident(const std::vector<std::pair<int64_t, int64_t>>& keys) {
  if (static_cast<int64_t>(keys.size()) > slots())
    throw InvalidArgument(
        fmt::format("expert cache: {} resident experts for {} slots", keys.size(), slots()));
  std::vector<int64_t> ks;
  ks.reserve(keys.size());
  std::vector<uint8_t> seen(key_slot_.size(), 0);
  for (const auto& [l, e] : keys) {
    const int64_t k = key(l, e);
    if (seen[static_cast<size_t>(k)])
      throw InvalidArgument(fmt::format("expert cache: (layer {}, expert {}) listed twice", l, e));
    seen[static_cast<size_t>(k)] = 1;
    ks.push_back(k);
  }
  // Empty the pool, then fill slots 0, 1, ... in the order given.
  for (auto& k : slot_key_)
    if (k != kNone) key_slot_[static_cast<size_t>(k)] = kNone;
  std::fill(slot_key_.begin(), slot_key_.end(), kNone);
  release_pins();
  lru_.clear();
  lfu_order_.clear();
  resident_ = 0;
  free_.clear();
  for (int64_t s = slots() - 1; s >= static_cast<int64_t>(ks.size()); --s)
    free_.push_back(static_cast<int32_t>(s));
  for (size_t i = 0; i < ks.size(); ++i) place(ks[i], static_cast<int32_t>(i));
}

int32_t ExpertSlotCache::slot_of(int64_t layer, int64_t expert) const {
  return key_slot_[static_cast<size_t>(key(layer, expert))];
}

std::pair<int64_t, int64_t> ExpertSlotCache::expert_in(int32_t slot) const {
  if (slot < 0 || slot >= slots())
    throw InvalidArgument(fmt::format("expert cache: slot {} outside {}", slot, slots()));
  const int64_t k = slot_key_[static_cast<size_t>(slot)];
  if (k == kNone) return {kNone, kNone};
  return {k / experts_, k % experts_};
}

CacheLayerStats ExpertSlotCache::total() const {
  CacheLayerStats t;
  for (const auto& s : stats_) {
    t.hits += s.hits;
    t.misses += s.misses;
    t.evictions += s.evictions;
    t.admitted += s.admitted;
    t.bytes_in += s.bytes_in;
    t.not_admitted += s.not_admitted;
  }
  return t;
}

void ExpertSlotCache::reset_stats() {
  for (auto& s : stats_) s = CacheLayerStats{};
}

}  // namespace tidal::offload
