// SPDX-License-Identifier: Apache-2.0
/// \file linear_test.cpp
/// \brief linear (threaded) vs linear_ref across odd shapes, dtypes, strides, accumulate; ref vs
/// exact oracle.
#include "kernels/cpu/linear.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tolerances.h"

namespace tidal::kernels::cpu {
namespace {

struct Shape {
  int64_t m, n, k;
};

class LinearTest : public ::testing::TestWithParam<std::tuple<Shape, DType, bool, Isa>> {};

TEST_P(LinearTest, ThreadedMatchesReference) {
  const auto [s, dt, accumulate, isa] = GetParam();
  if (cpu_features().best < isa)
    GTEST_SKIP() << "this CPU lacks " << isa_name(isa) << " (the device machine runs it)";
  const int64_t ld_src = s.k + 3;  // strided rows
  const auto src = test::random_vec(static_cast<size_t>(s.m * ld_src), 1);
  const auto wf = test::random_vec(static_cast<size_t>(s.n * s.k), 2, 0.5f);
  std::vector<uint16_t> wb(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = f32_to_bf16(wf[i]);
  WeightView w{dt == DType::kBF16 ? static_cast<const void*>(wb.data()) : wf.data(), dt, s.n, s.k};
  // dst rows strided (two padding columns each, which must keep their values).
  const int64_t ld_dst = s.n + 2;
  const auto init = test::random_vec(static_cast<size_t>(s.m * ld_dst), 3);
  std::vector<float> ref = init, got = init;
  linear_ref({src.data(), ld_src, w, ref.data(), ld_dst, s.m, accumulate});
  auto ex = make_tbb_executor(4);
  linear({src.data(), ld_src, w, got.data(), ld_dst, s.m, accumulate}, *ex, isa);
  ASSERT_GT(test::norm2(ref), 0.0);
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(got[i], ref[i],
                test::kF32Atol +
                    test::kF32Rtol * std::sqrt(static_cast<float>(s.k)) * std::abs(ref[i]) +
                    1e-6f * std::sqrt(static_cast<float>(s.k)))
        << "linear m=" << s.m << " n=" << s.n << " k=" << s.k << " dtype=" << dtype_name(dt)
        << " acc=" << accumulate << " isa=" << isa_name(isa) << " at " << i;
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t c = s.n; c < ld_dst; ++c) ASSERT_EQ(got[i * ld_dst + c], init[i * ld_dst + c]);
  // Determinism: same input, same threads -> bit-identical.
  std::vector<float> again = init;
  linear({src.data(), ld_src, w, again.data(), ld_dst, s.m, accumulate}, *ex, isa);
  ASSERT_EQ(again, got);
  // Batch invariance: each token alone (the decode path) gives the bits it got among all m
  // (the k-blocked path past kLinearDirectTokens tokens; Note [CPU linear]).
  for (int64_t i = 0; i < s.m; i += std::max<int64_t>(1, s.m / 3)) {
    std::vector<float> one(init.begin() + i * ld_dst, init.begin() + (i + 1) * ld_dst);
    linear({src.data() + i * ld_src, ld_src, w, one.data(), ld_dst, 1, accumulate}, *ex, isa);
    for (int64_t c = 0; c < s.n; ++c)
      ASSERT_EQ(one[c], got[i * ld_dst + c]) << "token " << i << " of " << s.m << ", column " << c;
  }
}

INSTANTIATE_TEST_SUITE_P(
    OddShapes, LinearTest,
    ::testing::Combine(::testing::Values(Shape{1, 1, 1}, Shape{1, 17, 64}, Shape{2, 33, 7},
                                         Shape{3, 15, 130}, Shape{5, 64, 63}, Shape{17, 31, 257},
                                         Shape{33, 100, 96},
                                         // odd token pairs and row quads, several tasks
                                         Shape{1, 37, 1000}, Shape{2, 19, 600}, Shape{3, 35, 513},
                                         Shape{64, 21, 770},
                                         // several k blocks of 1024 with a tail, on the direct
                                         // (≤ 8 tokens) and the k-blocked path (Note [CPU
                                         // linear]); rows wider than the portable path's scratch
                                         Shape{2, 9, 2100}, Shape{9, 5, 1025}, Shape{33, 21, 2100},
                                         Shape{2, 3, 16500}),
                       ::testing::Values(DType::kF32, DType::kBF16), ::testing::Bool(),
                       ::testing::Values(Isa::kRef, Isa::kAvx2)));

TEST(Linear, EmptyRowsGiveZerosOrKeepDst) {
  // k = 0: every dot product is 0, at every ISA and token count (decode and k-blocked paths).
  for (Isa isa : {Isa::kRef, Isa::kAvx2}) {
    if (cpu_features().best < isa) continue;
    for (int64_t m : {1, 9}) {
      const float w = 0.f, src = 0.f;
      std::vector<float> dst(static_cast<size_t>(m * 5), 7.f);
      auto ex = make_tbb_executor(2);
      linear({&src, 0, WeightView{&w, DType::kBF16, 5, 0}, dst.data(), 5, m, true}, *ex, isa);
      EXPECT_EQ(dst, std::vector<float>(dst.size(), 7.f)) << isa_name(isa) << " m=" << m;
      linear({&src, 0, WeightView{&w, DType::kBF16, 5, 0}, dst.data(), 5, m, false}, *ex, isa);
      EXPECT_EQ(dst, std::vector<float>(dst.size(), 0.f)) << isa_name(isa) << " m=" << m;
    }
  }
}

TEST(LinearRef, ExactOnSmallIntegers) {
  // Oracle by hand: [[1, 2, 3]] · [[1, 0, -1], [2, 2, 2]]ᵀ = [[-2, 12]]
  const float src[3] = {1, 2, 3};
  const float w[6] = {1, 0, -1, 2, 2, 2};
  float dst[2] = {0, 0};
  linear_ref({src, 3, WeightView{w, DType::kF32, 2, 3}, dst, 2, 1, false});
  EXPECT_EQ(dst[0], -2.0f);
  EXPECT_EQ(dst[1], 12.0f);
}

TEST(Dtype, Bf16RoundTripAndF16) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.5f)), 1.5f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.0f)), -3.0f);
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
}

}  // namespace
}  // namespace tidal::kernels::cpu
