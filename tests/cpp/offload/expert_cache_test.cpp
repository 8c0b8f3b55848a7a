// SPDX-License-Identifier: Apache-2.0
/// \file expert_cache_test.cpp
/// \brief The VRAM expert cache's slot bookkeeping (offload/expert_cache.h) on hand-made routing
/// traces: each policy's choices, pins, per-layer counters, the LFU decay over a long run, and bad
/// calls. tests/python/test_expert_cache.py replays synthetic traces against tidal.cache_sim.
#include "offload/expert_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"

namespace tidal::offload {
namespace {

/// One layer, one expert per token: returns hits, and checks every admission got a slot.
int64_t replay(ExpertSlotCache& c, const std::vector<int64_t>& ids) {
  int64_t hits = 0;
  for (const int64_t e : ids) {
    hits += c.access(0, e);
    c.release_pins();
    c.next_token();
  }
  return hits;
}

TEST(ExpertSlotCache, LruAndLfuChooseDifferentVictims) {
  // Two slots: expert 0 three times, then 1 and 2, then 0 again.
  const std::vector<int64_t> trace = {0, 0, 0, 1, 2, 0};
  ExpertSlotCache lru(1, 4, 2, CachePolicy::kLru);
  EXPECT_EQ(replay(lru, trace), 2);  // 2 evicts 0 (least recent), so the last 0 misses
  EXPECT_EQ(lru.total().misses, 4);
  EXPECT_EQ(lru.total().evictions, 2);
  ExpertSlotCache lfu(1, 4, 2, CachePolicy::kLfu, 1.0);
  EXPECT_EQ(replay(lfu, trace), 3);  // 0 has count 3: 2 evicts 1, the last 0 hits
  EXPECT_EQ(lfu.total().evictions, 1);
  EXPECT_EQ(lfu.slot_of(0, 1), ExpertSlotCache::kNone);
  EXPECT_NE(lfu.slot_of(0, 0), ExpertSlotCache::kNone);
}

TEST(ExpertSlotCache, LfuDecayForgetsOldPopularity) {
  std::vector<int64_t> trace(5, 0);
  for (int i = 0; i < 20; ++i) trace.insert(trace.end(), {1, 2});
  ExpertSlotCache slow(1, 3, 2, CachePolicy::kLfu, 1.0), fast(1, 3, 2, CachePolicy::kLfu, 0.5);
  const int64_t hs = replay(slow, trace), hf = replay(fast, trace);
  EXPECT_GT(hf, hs);
  EXPECT_EQ(fast.total().misses, 3);  // 0, 1, 2 once each: 0's count fades, 1 and 2 stay
}

TEST(ExpertSlotCache, LfuStaysExactOverALongRunWithStrongDecay) {
  // 0.5 per token over 200000 tokens: a plain decayed count would underflow to 0 and tie
  // everything; the log form keeps ordering recent use above old use.
  ExpertSlotCache c(1, 3, 2, CachePolicy::kLfu, 0.5);
  for (int t = 0; t < 200000; ++t) {
    c.access(0, t % 2);  // 0 and 1 alternate
    c.release_pins();
    c.next_token();
  }
  EXPECT_EQ(c.total().misses, 2);
  c.access(0, 2);  // evicts the older of 0 and 1: 0 (used at an even token, 1 after it)
  EXPECT_EQ(c.slot_of(0, 0), ExpertSlotCache::kNone);
  EXPECT_NE(c.slot_of(0, 1), ExpertSlotCache::kNone);
}

TEST(ExpertSlotCache, PinnedSlotsAreNotReplacedUntilReleased) {
  ExpertSlotCache c(2, 8, 2, CachePolicy::kLru, 0.98, 1000);
  // Layer 0's step: 3 and 5 miss and take both slots, pinned.
  std::vector<int32_t> slots = {7, 7, 7};  // resized to the experts looked up
  c.lookup(0, std::vector<int64_t>{3, 5}, slots);
  EXPECT_EQ(slots, (std::vector<int32_t>{ExpertSlotCache::kNone, ExpertSlotCache::kNone}));
  const auto a3 = c.admit(0, 3), a5 = c.admit(0, 5);
  EXPECT_EQ(a3.slot, 0);
  EXPECT_EQ(a5.slot, 1);
  EXPECT_EQ(a3.evicted_layer, ExpertSlotCache::kNone);
  // Layer 1 misses expert 7 while both slots are pinned: it runs on the CPU.
  EXPECT_EQ(c.lookup(1, 7), ExpertSlotCache::kNone);
  EXPECT_EQ(c.admit(1, 7).slot, ExpertSlotCache::kNone);
  EXPECT_EQ(c.stats()[1].not_admitted, 1);
  // After the step, the least recent (layer 0, expert 3) makes room.
  c.release_pins();
  const auto a7 = c.admit(1, 7);
  EXPECT_EQ(a7.slot, 0);
  EXPECT_EQ(a7.evicted_layer, 0);
  EXPECT_EQ(a7.evicted_expert, 3);
  EXPECT_EQ(c.expert_in(0), (std::pair<int64_t, int64_t>{1, 7}));
  EXPECT_EQ(c.stats()[0].evictions, 1);  // counted against the layer that lost the slot
  EXPECT_EQ(c.stats()[1].evictions, 0);
  EXPECT_EQ(c.stats()[0].bytes_in, 2000u);
  EXPECT_EQ(c.stats()[1].bytes_in, 1000u);
  EXPECT_EQ(c.resident(), 2);
  // A hit pins too: with (0, 5) looked up, a new miss must take the other slot.
  c.release_pins();
  EXPECT_EQ(c.lookup(0, 5), 1);
  EXPECT_EQ(c.admit(0, 6).slot, 0);  // evicts (1, 7), not the pinned (0, 5)
  EXPECT_EQ(c.slot_of(1, 7), ExpertSlotCache::kNone);
  EXPECT_EQ(c.total().hits, 1);
}

TEST(ExpertSlotCache, StaticSetNeverChanges) {
  ExpertSlotCache c(2, 4, 3, CachePolicy::kStatic);
  c.set_resident({{0, 3}, {1, 1}});
  EXPECT_EQ(c.slot_of(0, 3), 0);
  EXPECT_EQ(c.slot_of(1, 1), 1);
  EXPECT_EQ(c.expert_in(2),
            (std::pair<int64_t, int64_t>{ExpertSlotCache::kNone, ExpertSlotCache::kNone}));
  EXPECT_TRUE(c.access(0, 3));
  EXPECT_FALSE(c.access(0, 2));  // a free slot, but static: nothing is copied after load
  EXPECT_EQ(c.slot_of(0, 2), ExpertSlotCache::kNone);
  EXPECT_EQ(c.stats()[0].not_admitted, 1);
  EXPECT_EQ(c.total().admitted, 0);
  c.reset_stats();
  EXPECT_EQ(c.total().hits + c.total().misses, 0);
}

TEST(ExpertSlotCache, NoSlotsMeansEveryMissStaysOnTheCpu) {
  ExpertSlotCache c(1, 4, 0, CachePolicy::kLru);
  EXPECT_FALSE(c.access(0, 1));
  EXPECT_FALSE(c.access(0, 1));
  EXPECT_EQ(c.total().misses, 2);
  EXPECT_EQ(c.total().not_admitted, 2);
}

TEST(ExpertSlotCache, BadCallsAreClearErrors) {
  EXPECT_THROW(ExpertSlotCache(1, 4, -1, CachePolicy::kLru), InvalidArgument);
  EXPECT_THROW(ExpertSlotCache(1, 4, 2, CachePolicy::kLfu, 0.0), InvalidArgument);
  EXPECT_THROW(ExpertSlotCache(1, 4, 2, CachePolicy::kLfu, 1.5), InvalidArgument);
  EXPECT_THROW(parse_cache_policy("fifo"), InvalidArgument);
  EXPECT_EQ(parse_cache_policy("lfu"), CachePolicy::kLfu);
  ExpertSlotCache c(2, 4, 2, CachePolicy::kLru);
  EXPECT_THROW(c.lookup(2, 0), InvalidArgument);
  EXPECT_THROW(c.lookup(0, 4), InvalidArgument);
  EXPECT_THROW(c.lookup(0, -1), InvalidArgument);
  EXPECT_THROW(c.expert_in(2), InvalidArgument);
  c.access(0, 1);
  EXPECT_THROW(c.admit(0, 1), InvalidArgument);  // already resident
  EXPECT_THROW(c.set_resident({{0, 1}, {0, 1}}), InvalidArgument);
  EXPECT_THROW(c.set_resident({{0, 1}, {0, 2}, {1, 3}}), InvalidArgument);  // 3 for 2 slots
}

}  // namespace
}  // namespace tidal::offload
