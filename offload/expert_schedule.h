// SPDX-License-Identifier: Apache-2.0
/// \file expert_schedule.h
/// \brief The step-by-step bookkeeping of the VRAM expert cache (Note [VRAM expert cache] in
/// core/model/cuda_model.cpp), without CUDA: which routed experts of a one-token decode step the
/// GPU computes from a slot and which the host computes, which misses are admitted, when each
/// admitted expert's copy is issued and when it enters the table the GPU reads. CudaModel moves
/// the bytes and uploads the table; this class decides, so the rules are tested on the CPU
/// (tests/cpp/offload/expert_schedule_test.cpp) and replayed on routing traces
/// (tidal.cache_sim.simulate_runtime) exactly as the runtime applies them.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "offload/expert_cache.h"

namespace tidal::offload {

// Note [Expert cache schedule]
// A decode step t goes:
//   begin_step(): the copies issued at step t−1's start have completed (the caller waited for
//     them) and enter the table; the experts admitted during step t−1 are returned to be copied
//     now (their slots already left the table when they were admitted). table() is what the GPU
//     reads during step t; nothing changes it until the next begin_step().
//   route(layer, ids): for each MoE layer, the routed ids the table holds go to the GPU, the
//     others to the host (invalid ids too: the host op names them). The policy then sees the
//     valid ids (hits pinned); misses are admitted while fewer than `max_fills` copies are queued
//     or running. An admitted expert's slot, and the expert it evicts, leave the *next* table:
//     the evicted expert stays readable for the rest of step t (its copy is only issued at step
//     t+1's start, after the next table is uploaded).
//   end_step(): pins released. Nothing is admitted between end_step() and the next
//     begin_step(), which pins every slot whose copy it issues for the step the copy runs in: no
//     slot is handed to another expert before its copy has landed.
// Lookahead prefetch (Note [Lookahead prefetch] in core/model/cuda_model.cpp): with
// `prefetch` > 0 there are 2 · prefetch more slots, outside the policy's pool, in two buffers
// that alternate from one prefetch() call of a step to the next. prefetch(layer, predicted)
// gives up to `prefetch` of the predicted experts that table() does not hold a buffer slot each
// and puts them in table() for this step only (the rest of the step's table is unchanged); the
// caller copies them at once and must have the GPU read them only after the copies land. route()
// then counts them as computed on the GPU, and the policy sees them as the misses they are (it
// may admit them as usual). end_step() takes them out of the table again, so the next
// begin_step() reports the table as changed. A buffer is handed out again two prefetch() calls
// later: the caller guarantees the GPU is done with the layer that used it by then.
// "static" places experts as "lfu" does for the first `static_steps` steps (a profile of the
// routing, taken while it runs) and then freezes the set: no admissions after that (the copies
// admitted in the last profile step are still issued and land, one step later).

class ExpertCacheSchedule {
 public:
  struct Fill {
    int32_t slot = ExpertSlotCache::kNone;
    int64_t layer = -1, expert = -1;
  };
  /// `layers` x `experts` keys, `slots` slots (> 0), at most `max_fills` (> 0) copies queued or
  /// running. Throws InvalidArgument on bad sizes or a policy name it does not know.
  ExpertCacheSchedule(int64_t layers, int64_t experts, int64_t slots, CachePolicy policy,
                      int64_t max_fills, double decay = 0.98, int64_t static_steps = 256,
                      int64_t prefetch = 0);

  /// Whether the set no longer changes ("static" after its profile steps).
  bool frozen() const { return static_ && steps_ >= static_steps_; }
  /// Starts a step; returns the copies to issue now (valid until the next call).
  const std::vector<Fill>& begin_step();
  /// One MoE layer of the step: `host` gets the positions i (0 <= i < k) of `ids` the host
  /// computes (resized; a caller that keeps it allocates nothing per step). Returns the number
  /// the GPU computes (k − host.size()).
  int64_t route(int64_t layer, const int32_t* ids, int64_t k, std::vector<int32_t>& host);
  void end_step();
  /// Lookahead prefetch for MoE layer `layer` of this step (after begin_step(), before its
  /// route()): `predicted` (n ids, best first) that the table does not hold, up to
  /// prefetch_slots() of them; returns the copies to issue now (valid until the next call).
  /// Invalid and repeated ids are skipped; a layer already routed or prefetched this step, or a
  /// call between end_step() and begin_step(), is InvalidArgument.
  const std::vector<Fill>& prefetch(int64_t layer, const int32_t* predicted, int64_t n);
  /// Slots per prefetch buffer (two buffers, slot ids slots() + [0, 2 · prefetch_slots())).
  int64_t prefetch_slots() const { return prefetch_; }
  /// Since construction: experts prefetched, and routed pairs the GPU computed from a prefetch
  /// slot.
  int64_t prefetched() const { return prefetched_; }
  int64_t prefetch_hits() const { return prefetch_hits_; }

  /// [layer][expert] -> slot or kNone: what the GPU reads this step.
  const std::vector<int32_t>& table() const { return table_; }
  /// Whether begin_step() changed table() (so it must be uploaded).
  bool table_changed() const { return changed_; }
  int64_t slots() const { return cache_.slots(); }
  int64_t experts() const { return experts_; }
  const ExpertSlotCache& cache() const { return cache_; }
  /// Since construction: copies issued, and those that entered the table (a copy whose slot was
  /// taken over before it landed does not; none can be with the pins above, but it is checked).
  int64_t fills_issued() const { return fills_issued_; }
  int64_t fills_kept() const { return fills_kept_; }

 private:
  int64_t layers_, experts_, max_fills_;
  bool static_;
  int64_t static_steps_, steps_ = 0;
  ExpertSlotCache cache_;
  std::vector<int32_t> table_, next_;
  std::vector<Fill> queued_, issued_, running_;
  std::vector<int64_t> keys_;
  std::vector<int32_t> found_;
  bool changed_ = false;
  int64_t fills_issued_ = 0, fills_kept_ = 0;
  // Lookahead prefetch: slots per buffer, the buffer the next call uses, the table entries it
  // set this step (undone at end_step), layers routed or prefetched this step, and whether the
  // device's table still holds entries the host's no longer does.
  int64_t prefetch_ = 0, pf_buffer_ = 0, prefetched_ = 0, prefetch_hits_ = 0;
  std::vector<Fill> pf_fills_, pf_set_;
  std::vector<uint8_t> layer_seen_;
  bool in_step_ = false, stale_ = false;
  void end_prefetches();  // takes this step's prefetches out of the table
};

}  // namespace tidal::offload
