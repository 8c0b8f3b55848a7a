// SPDX-License-Identifier: Apache-2.0
/// \file expert_cost_test.cpp
/// \brief The hybrid pipeline's per-layer CPU/GPU split (offload/expert_cost.h, Note [Expert cost
/// model]) on decode- and prefill-like steps, with the expected times worked out from the rates.
#include "offload/expert_cost.h"

#include <gtest/gtest.h>

#include <vector>

#include "core/error.h"

namespace tidal::offload {
namespace {

/// Roughly the GPU test machine with the 35B-A3B shape's INT4 experts (1.7 MB each).
ExpertCostInputs desktop() {
  ExpertCostInputs in;
  in.pcie_bytes_per_s = 55e9;
  in.cpu_bytes_per_s = 150e9;
  in.cpu_flops_per_s = 2e12;
  in.gpu_bytes_per_s = 3e12;
  in.gpu_flops_per_s = 500e12;
  in.expert_bytes = 1.7e6;
  in.flops_per_token = 2.0 * 3 * 2048 * 512;
  return in;
}

TEST(ExpertCost, DecodeCopiesOnlyWhileTheCpuSideIsFarBehind) {
  const auto in = desktop();
  const double c = in.expert_bytes / in.cpu_bytes_per_s;  // 11.3 µs: one pass over the weights
  const double g = in.expert_bytes / in.gpu_bytes_per_s + in.expert_bytes / in.pcie_bytes_per_s;
  EXPECT_DOUBLE_EQ(cpu_expert_seconds(in, 1), c);
  EXPECT_DOUBLE_EQ(gpu_expert_seconds(in, 1, false), g);
  // 8 misses of one token: 90.7 µs on the CPU alone. One copy: max(79.3, 31.5); two: max(68.0,
  // 63.0); a third would make the GPU side 94.4 µs. So exactly two go over, the lowest ids.
  const auto s = split_layer(in, std::vector<int64_t>(8, 1), std::vector<uint8_t>(8, 0));
  EXPECT_EQ(s.copy, (std::vector<uint8_t>{1, 1, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(s.on_gpu, s.copy);
  EXPECT_NEAR(s.cpu_seconds, 6 * c, 1e-12);
  EXPECT_NEAR(s.gpu_seconds, 2 * g, 1e-12);
  EXPECT_LT(s.seconds(), 8 * c);
}

TEST(ExpertCost, ResidentExpertsRunOnTheGpuAndIdleOnesNowhere) {
  const auto in = desktop();
  // Experts 1 and 3 resident; expert 2 got no token.
  const auto s = split_layer(in, {1, 1, 0, 1}, {0, 1, 0, 1});
  EXPECT_EQ(s.on_gpu[1], 1);
  EXPECT_EQ(s.on_gpu[3], 1);
  EXPECT_EQ(s.copy[1] + s.copy[3], 0);
  EXPECT_EQ(s.on_gpu[2], 0);
  EXPECT_EQ(s.copy[2], 0);
  EXPECT_EQ(s.on_gpu[0], 0);  // 11.3 µs on the CPU beats a 31.5 µs copy
  EXPECT_NEAR(s.gpu_seconds, 2 * gpu_expert_seconds(in, 1, true), 1e-15);
  EXPECT_NEAR(s.cpu_seconds, cpu_expert_seconds(in, 1), 1e-15);
}

TEST(ExpertCost, PrefillCopiesEveryExpert) {
  const auto in = desktop();
  // 512 tokens each: 1.6 ms of CPU matrix products against a 37 µs copy and GPU run.
  const auto s = split_layer(in, std::vector<int64_t>(8, 512), std::vector<uint8_t>(8, 0));
  EXPECT_EQ(s.copy, std::vector<uint8_t>(8, 1));
  EXPECT_DOUBLE_EQ(s.cpu_seconds, 0.0);
  EXPECT_NEAR(s.gpu_seconds, 8 * gpu_expert_seconds(in, 512, false), 1e-12);
  // With copies not allowed (no free slot, static policy) they all stay on the CPU.
  const auto n = split_layer(in, std::vector<int64_t>(8, 512), std::vector<uint8_t>(8, 0), false);
  EXPECT_EQ(n.on_gpu, std::vector<uint8_t>(8, 0));
  EXPECT_NEAR(n.cpu_seconds, 8 * cpu_expert_seconds(in, 512), 1e-12);
}

TEST(ExpertCost, ASmallerExpertMayGoWhereALargerOneDoesNot) {
  // Unit rates, a GPU half as fast as the CPU at products: A (10 tokens) costs 10 s on the CPU
  // and 1 + 20 s on the GPU; B (1 token) 1 s and 1 + 2 s. Moving A makes it worse (21 > 11);
  // moving B still helps (max(10, 3) < 11).
  ExpertCostInputs in;
  in.pcie_bytes_per_s = in.cpu_bytes_per_s = in.cpu_flops_per_s = 1;
  in.gpu_bytes_per_s = 1e9;
  in.gpu_flops_per_s = 0.5;
  in.expert_bytes = in.flops_per_token = 1;
  const auto s = split_layer(in, {10, 1}, {0, 0});
  EXPECT_EQ(s.copy, (std::vector<uint8_t>{0, 1}));
  EXPECT_DOUBLE_EQ(s.cpu_seconds, 10.0);
  EXPECT_DOUBLE_EQ(s.gpu_seconds, 3.0);
}

TEST(ExpertCost, BadInputsAreClearErrors) {
  auto in = desktop();
  in.pcie_bytes_per_s = 0;
  EXPECT_THROW(split_layer(in, {1}, {0}), InvalidArgument);
  in = desktop();
  EXPECT_THROW(split_layer(in, {1, 2}, {0}), InvalidArgument);
  EXPECT_THROW(split_layer(in, {-1}, {0}), InvalidArgument);
  EXPECT_EQ(cpu_expert_seconds(in, 0), 0.0);
  EXPECT_EQ(gpu_expert_seconds(in, 0, false), 0.0);
}

}  // namespace
}  // namespace tidal::offload
