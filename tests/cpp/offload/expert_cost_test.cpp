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

TEST(ExpertCost, PrefillStreamsFromTheChunkWhereTheCopyIsCheaperThanTheCpu) {
  const auto in = desktop();
  const double f = in.flops_per_token;
  // 512 tokens, top-8 of 256: 16 tokens per expert. Host: 256 · max(11.3 µs, 16 · 6.29 MFLOP /
  // 2 TFLOP/s = 50.3 µs) = 12.9 ms. Stream: 256 · 1.7 MB / 55 GB/s = 7.9 ms + 4096 pairs on the
  // GPU (51.5 µs).
  const auto c = prefill_layer_cost(in, 512, 256, 8);
  EXPECT_NEAR(c.host_seconds, 256 * (16 * f / in.cpu_flops_per_s), 1e-12);
  EXPECT_NEAR(c.stream_seconds,
              256 * in.expert_bytes / in.pcie_bytes_per_s + 4096 * f / in.gpu_flops_per_s, 1e-12);
  EXPECT_TRUE(c.stream());
  // 4 tokens: 32 pairs, 32 experts of one token each, bound by the CPU's products (3.1 µs each
  // is below the 11.3 µs pass over the weights): 0.36 ms on the host against the 7.9 ms copy.
  const auto d = prefill_layer_cost(in, 4, 256, 8);
  EXPECT_NEAR(d.host_seconds, 32 * in.expert_bytes / in.cpu_bytes_per_s, 1e-12);
  EXPECT_FALSE(d.stream());
  EXPECT_EQ(prefill_layer_cost(in, 0, 256, 8).host_seconds, 0.0);
  // The threshold: host = 256 · (8T/256) · f / cpu_flops = 8T · f / cpu against the copy.
  const int64_t t = min_stream_tokens(in, 256, 8, 8192);
  ASSERT_GT(t, 1);
  EXPECT_TRUE(prefill_layer_cost(in, t, 256, 8).stream());
  EXPECT_FALSE(prefill_layer_cost(in, t - 1, 256, 8).stream());
  const double copy = 256 * in.expert_bytes / in.pcie_bytes_per_s;
  const double expect = copy / (8 * f / in.cpu_flops_per_s - 8 * f / in.gpu_flops_per_s);
  EXPECT_NEAR(static_cast<double>(t), expect, 1.0);
  for (int64_t u = t; u <= 8192; u += 97) EXPECT_TRUE(prefill_layer_cost(in, u, 256, 8).stream());
  // A slow link (a desktop's PCIe 3.0 x8, 6 GB/s) moves the threshold up; one slower than the
  // CPU at every length never streams.
  auto slow = in;
  slow.pcie_bytes_per_s = 6e9;
  EXPECT_GT(min_stream_tokens(slow, 256, 8, 8192), t * 8);
  slow.pcie_bytes_per_s = 1e8;
  EXPECT_EQ(min_stream_tokens(slow, 256, 8, 8192), -1);
  // PCIe faster than the CPU's memory, GPU products only a little faster than the CPU's: chunks
  // of 16 to 93 tokens stream (the host reads every expert once from 32 tokens on, a flat 2.9 ms,
  // against a 1.1 ms copy plus the GPU's products), 94 to 187 do not (the products catch up while
  // the host side stays flat), and from 188 on every chunk streams: the threshold is 188.
  auto odd = in;
  odd.pcie_bytes_per_s = 400e9;
  odd.gpu_flops_per_s = 2.6e12;
  const int64_t u = min_stream_tokens(odd, 256, 8, 8192);
  EXPECT_EQ(u, 188);
  for (int64_t v = u; v <= 8192; v += 53)
    EXPECT_TRUE(prefill_layer_cost(odd, v, 256, 8).stream()) << v;
  EXPECT_FALSE(prefill_layer_cost(odd, u - 1, 256, 8).stream());
  bool window = false;
  for (int64_t v = 1; v < u - 1; ++v)
    window = window || prefill_layer_cost(odd, v, 256, 8).stream();
  EXPECT_TRUE(window);  // the earlier window exists, and is not the threshold
  EXPECT_THROW(prefill_layer_cost(in, 8, 256, 0), InvalidArgument);
  EXPECT_THROW(prefill_layer_cost(in, 8, 4, 8), InvalidArgument);
  EXPECT_THROW(prefill_layer_cost(in, -1, 256, 8), InvalidArgument);
  EXPECT_THROW(min_stream_tokens(in, 256, 8, 0), InvalidArgument);
  auto no_gpu_bytes = in;  // the prefill choice does not read the GPU's bytes rate
  no_gpu_bytes.gpu_bytes_per_s = 0;
  EXPECT_EQ(min_stream_tokens(no_gpu_bytes, 256, 8, 8192), t);
  auto no_pcie = in;
  no_pcie.pcie_bytes_per_s = 0;
  EXPECT_THROW(prefill_layer_cost(no_pcie, 8, 256, 8), InvalidArgument);
}

}  // namespace
}  // namespace tidal::offload
