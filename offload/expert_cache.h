// SPDX-License-Identifier: Apache-2.0
/// \file expert_cache.h
/// \brief The bookkeeping of the VRAM expert cache (issue 7): which routed expert, keyed by
/// (layer, expert), sits in which of a fixed pool of slots, which one a miss replaces, and the
/// counters `rt.stats()` will report. No memory and no copies here: the pipeline that owns the
/// slots' VRAM asks this object where an expert is and where a missed one goes, and moves the
/// bytes itself. Deterministic for a given sequence of calls, so policies are tested and compared
/// on routing traces without a GPU (Note [Expert cache policies]).
#pragma once

#include <cstdint>
#include <list>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace tidal::offload {

// Note [Expert cache policies]
// One pool of slots shared by every MoE layer (a layer whose routing is skewed takes more of it).
// A slot holds one expert; replacing it costs one expert's bytes over PCIe.
//   - kLru: evict the least recently used expert.
//   - kLfu: evict the expert with the lowest exponentially decayed use count: every token
//     multiplies every count by `decay`, an access adds 1 (decay 1: plain counts). Counts are kept
//     for every expert, resident or not, as log(count) + tokens · (−log decay), which orders the
//     experts as their decayed counts do without ever multiplying all of them, and does not
//     overflow; the victim is the smallest of those (ties: the lower key), found in a std::set.
//   - kStatic: the slots hold a fixed set (set_resident, e.g. the most used experts of a profile)
//     and nothing is ever replaced: no copies after load.
// A slot looked up or filled during a step is pinned until release_pins(): the GPU reads it in
// that step, so it must not be handed to another expert before the pipeline says the step's
// reads are done. A miss when every slot is pinned (or there are none, or the policy is static)
// is not admitted: the expert runs on the CPU.
// tidal.cache_sim replays the same policies in Python; tests/python/test_expert_cache.py checks
// that this class counts the same hits, misses and evictions on the same traces (LRU and static
// exactly, LFU up to its tie order).

enum class CachePolicy { kLru, kLfu, kStatic };

/// "lru" | "lfu" | "static"; throws InvalidArgument (Python: ValueError) naming the value
/// otherwise.
CachePolicy parse_cache_policy(const std::string& s);
const char* cache_policy_name(CachePolicy p);

/// Counters of one MoE layer since construction (or reset_stats).
struct CacheLayerStats {
  int64_t hits = 0, misses = 0, evictions = 0;
  int64_t admitted = 0;      ///< misses given a slot (copied in)
  uint64_t bytes_in = 0;     ///< admitted · expert_bytes
  int64_t not_admitted = 0;  ///< misses left to the CPU: no slot, static, or every slot pinned
};

class ExpertSlotCache {
 public:
  static constexpr int32_t kNone = -1;
  /// A miss's placement: the slot it goes to and the expert that slot held (evicted), each kNone
  /// where there is none (a free slot; or no slot: the expert is not cached).
  struct Admission {
    int32_t slot = kNone;
    int64_t evicted_layer = kNone, evicted_expert = kNone;
  };

  /// `layers` MoE layers of `experts` routed experts each, `slots` slots (0: no cache).
  /// `expert_bytes` counts bytes_in. Throws InvalidArgument on a negative size or a decay outside
  /// (0, 1]; every call below throws it on a (layer, expert) or slot out of range.
  ExpertSlotCache(int64_t layers, int64_t experts, int64_t slots, CachePolicy policy,
                  double decay = 0.98, uint64_t expert_bytes = 0);

  /// The step's routed experts of one layer: counts a hit or a miss for each, updates recency /
  /// frequency and pins the hits. `slots` gets each expert's slot, kNone for a miss (resized; a
  /// caller that keeps it allocates nothing per step).
  void lookup(int64_t layer, const std::vector<int64_t>& experts, std::vector<int32_t>& slots);
  /// One expert; as lookup.
  int32_t lookup(int64_t layer, int64_t expert);
  /// A slot for (layer, expert), which must not be resident: a free slot, else the policy's
  /// victim among the unpinned slots. The slot is pinned. kNone where nothing may be replaced.
  Admission admit(int64_t layer, int64_t expert);
  /// The simulator's step: lookup, then admit on a miss; true for a hit.
  bool access(int64_t layer, int64_t expert);
  /// Ends a token for kLfu's decay (call once per token, after its layers).
  void next_token();
  /// Unpins every slot (the GPU is done with the step's experts).
  void release_pins();
  /// Pins `slot` until the next release_pins() without counting an access (a slot whose copy is
  /// still in flight must not be handed to another expert).
  void pin(int32_t slot);

  /// kStatic (or a warm start for the others): the slots hold exactly these (layer, expert) keys,
  /// in order, at most `slots` of them; the rest stay free. Throws on a duplicate or out-of-range
  /// key.
  void set_resident(const std::vector<std::pair<int64_t, int64_t>>& keys);

  /// Where (layer, expert) is, without counting or updating anything.
  int32_t slot_of(int64_t layer, int64_t expert) const;
  /// The (layer, expert) in `slot`, {kNone, kNone} when free.
  std::pair<int64_t, int64_t> expert_in(int32_t slot) const;
  int64_t slots() const { return static_cast<int64_t>(slot_key_.size()); }
  int64_t resident() const { return resident_; }
  CachePolicy policy() const { return policy_; }
  const std::vector<CacheLayerStats>& stats() const { return stats_; }
  CacheLayerStats total() const;
  void reset_stats();

 private:
  int64_t key(int64_t layer, int64_t expert) const;
  void touch(int64_t k);             // recency / frequency of an access
  int32_t victim() const;            // the policy's unpinned victim, kNone if none
  void place(int64_t k, int32_t s);  // k into slot s (s free)

  int64_t layers_, experts_;
  CachePolicy policy_;
  double neg_log_decay_;
  uint64_t expert_bytes_;
  int64_t token_ = 0;
  int64_t resident_ = 0;
  std::vector<int32_t> key_slot_;  // per key: its slot or kNone
  std::vector<int64_t> slot_key_;  // per slot: its key or kNone
  std::vector<uint8_t> pinned_;    // per slot
  std::vector<int32_t> pinned_list_;
  std::vector<int32_t> free_;  // free slots, the lowest last
  // kLru: resident keys, least recent first, and each key's position.
  std::list<int64_t> lru_;
  std::vector<std::list<int64_t>::iterator> lru_pos_;
  // kLfu: each key's log decayed count (normalised, Note [Expert cache policies]), and the
  // resident keys ordered by it.
  std::vector<double> lfu_n_;
  std::set<std::pair<double, int64_t>> lfu_order_;
  std::vector<CacheLayerStats> stats_;
};

}  // namespace tidal::offload
