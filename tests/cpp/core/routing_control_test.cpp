// SPDX-License-Identifier: Apache-2.0
/// \file routing_control_test.cpp
/// \brief Router lookahead accounting (Note [Router lookahead]): hits counted per layer by hand,
/// ignored while a trace replays, reset, and the predict_k argument checked.
#include "core/model/routing_control.h"

#include <gtest/gtest.h>

#include <vector>

#include "core/error.h"

namespace tidal::core {
namespace {

TEST(RoutingControl, LookaheadCountsHitsPerLayer) {
  RoutingControl rc(/*layers=*/3, /*experts=*/8, /*top_k=*/2);
  EXPECT_FALSE(rc.lookahead());
  rc.set_lookahead(true);
  EXPECT_TRUE(rc.lookahead());
  EXPECT_EQ(rc.lookahead_k(), 2);  // 0: top_k
  // Two tokens, layer 1: token 0 predicted {3, 5}, routed {5, 7} -> 1 hit; token 1 predicted
  // {0, 1}, routed {1, 0} -> 2 hits (order does not matter).
  const std::vector<int32_t> pred = {3, 5, 0, 1}, routed = {5, 7, 1, 0};
  rc.add_lookahead(1, pred.data(), 2, routed.data(), 2, 2);
  // Layer 2, predict_k 3 against top-2: token 0 predicted {2, 4, 6}, routed {6, 1} -> 1 hit.
  const std::vector<int32_t> pred3 = {2, 4, 6}, routed2 = {6, 1};
  rc.add_lookahead(2, pred3.data(), 3, routed2.data(), 2, 1);
  auto c = rc.lookahead_counts();
  ASSERT_EQ(c.predicted.size(), 3u);
  EXPECT_EQ(c.predicted, (std::vector<uint64_t>{0, 4, 3}));
  EXPECT_EQ(c.routed, (std::vector<uint64_t>{0, 4, 2}));
  EXPECT_EQ(c.hits, (std::vector<uint64_t>{0, 3, 1}));

  // While a trace replays, the routed ids are the trace's: nothing is counted.
  rc.set_replay(std::vector<int32_t>(3 * 2, 0), 1);
  rc.add_lookahead(1, pred.data(), 2, routed.data(), 2, 2);
  EXPECT_EQ(rc.lookahead_counts().hits, (std::vector<uint64_t>{0, 3, 1}));
  rc.clear_replay();

  rc.reset_lookahead();
  c = rc.lookahead_counts();
  EXPECT_EQ(c.predicted, (std::vector<uint64_t>{0, 0, 0}));
  EXPECT_EQ(c.hits, (std::vector<uint64_t>{0, 0, 0}));
}

TEST(RoutingControl, LookaheadRejectsBadPredictK) {
  RoutingControl rc(2, 8, 2);
  EXPECT_THROW(rc.set_lookahead(true, 9), InvalidArgument);
  EXPECT_THROW(rc.set_lookahead(true, -1), InvalidArgument);
  EXPECT_FALSE(rc.lookahead());
  rc.set_lookahead(true, 8);
  EXPECT_EQ(rc.lookahead_k(), 8);
}

}  // namespace
}  // namespace tidal::core

namespace tidal::core {
namespace {

// top_k_ids: highest first, ties broken toward the lower id (as the routers' top-k), per row.
TEST(RoutingControl, TopKIdsHighestFirstLowerIdOnTies) {
  const std::vector<float> logits = {0.5f, 2.f, 2.f, -1.f, 3.f,   // row 0
                                     1.f,  1.f, 1.f, 1.f,  1.f};  // row 1: all tied
  std::vector<int32_t> out(6, -7);
  top_k_ids(logits.data(), 2, 5, 3, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{4, 1, 2, 0, 1, 2}));
}

}  // namespace
}  // namespace tidal::core
