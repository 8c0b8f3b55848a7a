// SPDX-License-Identifier: Apache-2.0
/// \file expert_schedule_test.cpp
/// \brief The VRAM expert cache's step rules (offload/expert_schedule.h, Note [Expert cache
/// schedule]) without a GPU: every routed pair goes to exactly one side, the GPU side only where
/// this step's table holds the expert; an admitted expert's copy is issued at the next step's
/// start and enters the table at the step after; a slot being filled is never handed to another
/// expert; an evicted expert stays readable for the rest of the step that evicted it; the copy
/// limit; the static policy; invalid ids. A randomised run checks the invariants step by step
/// against a model of the device's slot contents.
#include "offload/expert_schedule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"

namespace tidal::offload {
namespace {

using Fill = ExpertCacheSchedule::Fill;

/// One step of one layer: the GPU-side ids.
std::vector<int32_t> gpu_side(const std::vector<int32_t>& ids, const std::vector<int32_t>& host) {
  std::vector<int32_t> g;
  for (size_t i = 0; i < ids.size(); ++i)
    if (std::find(host.begin(), host.end(), static_cast<int32_t>(i)) == host.end())
      g.push_back(ids[i]);
  return g;
}

TEST(ExpertCacheSchedule, CopyIssuedNextStepUsedTheStepAfter) {
  ExpertCacheSchedule s(1, 8, 2, CachePolicy::kLru, 16);
  std::vector<int32_t> host;
  const std::vector<int32_t> ids = {3, 5};
  // Step 0: both miss, both admitted; nothing to copy yet, the host computes both.
  EXPECT_TRUE(s.begin_step().empty());
  EXPECT_EQ(s.route(0, ids.data(), 2, host), 0);
  EXPECT_EQ(host, (std::vector<int32_t>{0, 1}));
  s.end_step();
  // Step 1: the two copies are issued; the table does not hold them yet.
  const auto issued = s.begin_step();
  ASSERT_EQ(issued.size(), 2u);
  EXPECT_EQ(s.fills_issued(), 2);
  EXPECT_EQ(s.route(0, ids.data(), 2, host), 0);
  s.end_step();
  // Step 2: they have landed and the GPU computes them.
  EXPECT_TRUE(s.begin_step().empty());
  EXPECT_TRUE(s.table_changed());
  EXPECT_EQ(s.table()[3], issued[0].expert == 3 ? issued[0].slot : issued[1].slot);
  EXPECT_EQ(s.route(0, ids.data(), 2, host), 2);
  EXPECT_TRUE(host.empty());
  EXPECT_EQ(s.fills_kept(), 2);
  s.end_step();
  EXPECT_TRUE(s.begin_step().empty());
  EXPECT_FALSE(s.table_changed());
}

TEST(ExpertCacheSchedule, EvictedExpertStaysReadableForTheStepThatEvictedIt) {
  // One slot, expert 1 resident; a step routes 1 then (another layer) 2: 2's admission evicts 1,
  // but this step's table still holds 1, so the GPU computes it; the next table does not.
  ExpertCacheSchedule s(2, 4, 1, CachePolicy::kLru, 16);
  std::vector<int32_t> host;
  const int32_t one = 1, two = 2;
  s.begin_step();
  s.route(0, &one, 1, host);
  s.end_step();
  s.begin_step();  // issue
  s.end_step();
  s.begin_step();  // landed
  ASSERT_GE(s.table()[1], 0);
  EXPECT_EQ(s.route(0, &one, 1, host), 1);  // hit, pinned this step
  EXPECT_EQ(s.route(1, &two, 1, host), 0);  // miss: its only slot is pinned, not admitted
  s.end_step();
  s.begin_step();
  EXPECT_EQ(s.route(1, &two, 1, host), 0);  // miss again: now admitted, evicting (0, 1)
  EXPECT_GE(s.table()[1], 0);               // ... which this step's table still holds
  EXPECT_EQ(s.route(0, &one, 1, host), 1);  // and the GPU still computes this step
  s.end_step();
  s.begin_step();  // the copy of (1, 2) is issued now: (0, 1) has left the table
  EXPECT_EQ(s.table()[1], ExpertSlotCache::kNone);
  EXPECT_EQ(s.route(0, &one, 1, host), 0);
}

TEST(ExpertCacheSchedule, CopyLimitAndInvalidIds) {
  ExpertCacheSchedule s(1, 64, 64, CachePolicy::kLfu, 3);
  std::vector<int32_t> host;
  const std::vector<int32_t> ids = {1, -1, 2, 70, 3, 4, 5};
  s.begin_step();
  EXPECT_EQ(s.route(0, ids.data(), 7, host), 0);
  EXPECT_EQ(host.size(), 7u);  // invalid ids go to the host, whose op names them
  s.end_step();
  EXPECT_EQ(s.begin_step().size(), 3u);                             // at most 3 queued or running
  EXPECT_EQ(s.cache().total().hits + s.cache().total().misses, 5);  // valid ids only
  // While those 3 run, nothing more is admitted.
  s.route(0, ids.data(), 7, host);
  s.end_step();
  EXPECT_TRUE(s.begin_step().empty());
  EXPECT_THROW(ExpertCacheSchedule(1, 4, 0, CachePolicy::kLru, 1), InvalidArgument);
  EXPECT_THROW(ExpertCacheSchedule(1, 4, 2, CachePolicy::kLru, 0), InvalidArgument);
  EXPECT_THROW(s.route(1, ids.data(), 1, host), InvalidArgument);
}

TEST(ExpertCacheSchedule, StaticProfilesThenStays) {
  // Two profile steps (placed as LFU would), then frozen: no admission, no copy, ever.
  ExpertCacheSchedule s(1, 16, 3, CachePolicy::kStatic, 16, 0.98, 2);
  std::vector<int32_t> host;
  const std::vector<int32_t> a = {0, 1}, b = {2, 3, 4};
  s.begin_step();
  s.route(0, a.data(), 2, host);
  s.route(0, b.data(), 3, host);  // 2 fills the third slot; 3 and 4 find none (all pinned)
  s.end_step();
  const auto issued = s.begin_step();
  ASSERT_EQ(issued.size(), 3u);
  EXPECT_FALSE(s.frozen());
  s.route(0, b.data(), 3, host);  // the three slots are filling (pinned): nothing admitted
  s.end_step();
  EXPECT_TRUE(s.frozen());
  for (int t = 0; t < 20; ++t) {
    EXPECT_TRUE(s.begin_step().empty());
    s.route(0, b.data(), 3, host);
    s.end_step();
  }
  for (int e : {0, 1, 2}) EXPECT_GE(s.table()[static_cast<size_t>(e)], 0) << e;
  for (int e : {3, 4}) EXPECT_EQ(s.table()[static_cast<size_t>(e)], ExpertSlotCache::kNone) << e;
  EXPECT_EQ(s.fills_issued(), 3);
}

// Randomised: a model of what each slot's memory holds (a copy lands at the end of the step it
// was issued in) checks that every GPU-side expert is read from a slot holding it, every routed
// valid pair is counted once, and no copy is ever overwritten or dropped before it lands.
TEST(ExpertCacheSchedule, RandomRunKeepsEveryInvariant) {
  for (const auto policy : {CachePolicy::kLru, CachePolicy::kLfu, CachePolicy::kStatic})
    for (const int64_t slots : {1, 3, 17})
      for (const int64_t pf : {0, 2}) {
        SCOPED_TRACE(::testing::Message() << "policy " << static_cast<int>(policy) << ", slots "
                                          << slots << ", prefetch " << pf);
        const int64_t L = 4, E = 12, k = 3;
        ExpertCacheSchedule s(L, E, slots, policy, 5, 0.98, 256, pf);
        std::mt19937 rng(static_cast<unsigned>(slots * 7 + static_cast<int>(policy) + pf));
        // Slot memory: the policy's pool, then the two prefetch buffers (a prefetch copy lands
        // before the GPU reads its layer, as CudaModel's event wait makes it).
        std::vector<std::pair<int64_t, int64_t>> holds(static_cast<size_t>(slots + 2 * pf),
                                                       {-1, -1});
        // What the device's table holds: the schedule's table, copied only when it says it changed
        // (as CudaModel uploads it).
        std::vector<int32_t> device(static_cast<size_t>(L * E), ExpertSlotCache::kNone);
        std::vector<Fill> running;
        std::vector<int32_t> host;
        int64_t gpu = 0, total = 0, pf_hits = 0;
        for (int t = 0; t < 400; ++t) {
          for (const Fill& f : running) holds[static_cast<size_t>(f.slot)] = {f.layer, f.expert};
          const auto issued = s.begin_step();
          if (s.table_changed()) device = s.table();
          ASSERT_EQ(device, s.table()) << "step " << t << ": a changed table not reported";
          running = issued;
          std::set<int32_t> filling;
          for (const Fill& f : issued) EXPECT_TRUE(filling.insert(f.slot).second) << "slot twice";
          for (int64_t l = 0; l < L; ++l) {
            std::vector<int32_t> ids;
            while (static_cast<int64_t>(ids.size()) < k) {
              const uint32_t r = rng() % 40;  // now and then an invalid id or a repeated one
              if (r == 0) {
                ids.push_back(-1);
              } else if (r == 1) {
                ids.push_back(static_cast<int32_t>(E + 3));
              } else if (r == 2 && !ids.empty()) {
                ids.push_back(ids[0]);
              } else {
                const int32_t e =
                    static_cast<int32_t>(std::min<int64_t>(rng() % E, rng() % E));  // skewed
                if (std::find(ids.begin(), ids.end(), e) == ids.end()) ids.push_back(e);
              }
            }
            if (pf > 0 && l > 0 && rng() % 4 != 0) {
              // Predicted from the layer before: some of the ids routed next, some not, a repeat.
              std::vector<int32_t> pred;
              for (const int32_t e : ids)
                if (rng() % 3 != 0) pred.push_back(e);
              pred.push_back(static_cast<int32_t>(rng() % E));
              if (!pred.empty()) pred.push_back(pred[0]);
              const auto fills = s.prefetch(l, pred.data(), static_cast<int64_t>(pred.size()));
              ASSERT_LE(static_cast<int64_t>(fills.size()), pf);
              for (const Fill& f : fills) {
                ASSERT_GE(f.slot, slots) << "a prefetch in the policy's pool";
                ASSERT_LT(f.slot, slots + 2 * pf);
                EXPECT_EQ(filling.count(f.slot), 0u);
                EXPECT_EQ(f.layer, l);
                holds[static_cast<size_t>(f.slot)] = {f.layer, f.expert};
              }
              // CudaModel copies the layer's row after the experts.
              std::copy(s.table().begin() + l * E, s.table().begin() + (l + 1) * E,
                        device.begin() + l * E);
              EXPECT_THROW(s.prefetch(l, pred.data(), 1), InvalidArgument);  // once a layer
            }
            const int64_t g = s.route(l, ids.data(), k, host);
            ASSERT_EQ(device, s.table()) << "step " << t << ": the table changed within a step";
            const auto gs = gpu_side(ids, host);
            ASSERT_EQ(static_cast<int64_t>(gs.size()), g);
            for (const int32_t e : gs) {
              ASSERT_TRUE(e >= 0 && e < E) << "an invalid id went to the GPU";
              const int32_t slot = device[static_cast<size_t>(l * E + e)];
              ASSERT_GE(slot, 0);
              EXPECT_EQ(holds[static_cast<size_t>(slot)], (std::pair<int64_t, int64_t>{l, e}))
                  << "step " << t << ": the GPU would read a slot that does not hold the expert";
              EXPECT_EQ(filling.count(slot), 0u) << "step " << t << ": read while being filled";
              pf_hits += slot >= slots;
            }
            gpu += g;
            total += k;
          }
          s.end_step();
        }
        EXPECT_EQ(s.fills_issued() - s.fills_kept(), static_cast<int64_t>(running.size()))
            << "a copy was overwritten before it landed";
        if (slots >= 3) {
          EXPECT_GT(gpu, 0);
        }
        EXPECT_LT(gpu, total);
        EXPECT_EQ(s.prefetch_hits(), pf_hits);
        if (pf > 0) {
          EXPECT_GT(pf_hits, 0);
          EXPECT_GE(s.prefetched(), pf_hits);
        }
      }
}

TEST(ExpertCacheSchedule, PrefetchServesItsStepOnly) {
  // 2 policy slots, 2 prefetch slots per buffer: slots 2-3 and 4-5.
  ExpertCacheSchedule s(3, 16, 2, CachePolicy::kLfu, 1, 0.98, 256, 2);
  std::vector<int32_t> host;
  EXPECT_THROW(s.prefetch(1, nullptr, 0), InvalidArgument);  // before begin_step
  s.begin_step();
  const std::vector<int32_t> pred = {7, 7, -1, 9, 11, 12};  // a repeat and an invalid id skipped
  auto f = s.prefetch(1, pred.data(), 6);
  ASSERT_EQ(f.size(), 2u);
  EXPECT_EQ(f[0].slot, 2);
  EXPECT_EQ(f[0].expert, 7);
  EXPECT_EQ(f[1].slot, 3);
  EXPECT_EQ(f[1].expert, 9);
  EXPECT_EQ(s.table()[16 + 7], 2);
  // Layer 1 routes 9 and 5: 9 from its prefetch slot on the GPU, 5 on the host.
  const std::vector<int32_t> ids = {9, 5};
  EXPECT_EQ(s.route(1, ids.data(), 2, host), 1);
  EXPECT_EQ(host, (std::vector<int32_t>{1}));
  EXPECT_EQ(s.prefetch_hits(), 1);
  EXPECT_THROW(s.prefetch(1, pred.data(), 1), InvalidArgument);  // already routed
  // The next call takes the other buffer.
  f = s.prefetch(2, pred.data() + 3, 1);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].slot, 4);
  s.end_step();
  EXPECT_EQ(s.table()[16 + 7], ExpertSlotCache::kNone);  // this step's only
  EXPECT_EQ(s.table()[32 + 9], ExpertSlotCache::kNone);
  EXPECT_THROW(s.prefetch(1, pred.data(), 1), InvalidArgument);  // between steps
  // The device still holds the prefetches, so the next table counts as changed; the buffers
  // start over.
  const auto issued = s.begin_step();  // the fill admitted for 9 or 5 (one at a time)
  EXPECT_EQ(issued.size(), 1u);
  EXPECT_TRUE(s.table_changed());
  EXPECT_EQ(s.prefetch(2, pred.data(), 1)[0].slot, 2);
  EXPECT_EQ(s.prefetched(), 4);
  s.end_step();
  EXPECT_THROW(ExpertCacheSchedule(1, 4, 2, CachePolicy::kLru, 1, 0.98, 256, -1), InvalidArgument);
  // A step that never ended (a failed forward): the next begin_step takes its prefetches out.
  s.begin_step();
  ASSERT_EQ(s.prefetch(1, pred.data(), 1).size(), 1u);
  EXPECT_EQ(s.table()[16 + 7], 2);
  s.begin_step();
  EXPECT_EQ(s.table()[16 + 7], ExpertSlotCache::kNone);
  EXPECT_TRUE(s.table_changed());
  s.end_step();
}

}  // namespace
}  // namespace tidal::offload
