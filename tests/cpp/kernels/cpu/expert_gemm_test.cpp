// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_test.cpp
/// \brief Expert weight formats (fp16 scales, quantisation, layout), activation preparation, every
/// tile-kernel variant this CPU runs against the scalar reference, and the fused MoE op against
/// its reference, across odd shapes.
#include "kernels/cpu/expert_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/cpu_features.h"
#include "kernels/cpu/expert_gemm_ref.h"
#include "kernels/cpu/moe_experts.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/weight_decode.h"
#include "tolerances.h"

// Counts operator new calls (the whole test binary uses this allocator) so a test can assert that
// the MoE op allocates nothing once its workspace has grown.
namespace {
std::atomic<long> g_allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace tidal::kernels::cpu {
namespace {

using test::random_vec;

// Packed buffers must be 64-byte aligned.
struct Packed {
  PackedLayout layout;
  std::vector<uint8_t> storage;
  uint8_t* data() {
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) &
                                      ~uintptr_t{63});
  }
};

Packed pack(ExpertDType dt, int64_t n, int64_t k, int64_t group, const std::vector<float>& w) {
  Packed p;
  p.layout = make_layout(dt, n, k, group);
  p.storage.resize(static_cast<size_t>(p.layout.bytes() + 64));
  pack_weights(p.layout, w.data(), DType::kF32, k, p.data(), 0, p.layout.num_tiles);
  return p;
}

// Weights with a few outliers per row, as real expert matrices have.
std::vector<float> weights(int64_t n, int64_t k, uint32_t seed) {
  auto w = random_vec(static_cast<size_t>(n * k), seed, 0.05f);
  std::mt19937 g(seed + 1);
  for (int64_t r = 0; r < n; ++r) w[r * k + g() % k] *= 8.f;
  return w;
}

bool isa_available(Isa isa) {
  return static_cast<int>(isa) <= static_cast<int>(cpu_features().best);
}

TEST(ExpertFormat, HalfConversionRoundTripsEveryHalf) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    const float f = f16_to_f32(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << "half bits " << b;
  }
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);                // overflow -> inf
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 4096), 0x3c00);  // ties to even: 1 + 2^-12 -> 1
}

TEST(ExpertFormat, LayoutSizes) {
  const auto b = make_layout(ExpertDType::kBF16, 17, 45, 0);
  EXPECT_EQ(b.num_tiles, 2);
  EXPECT_EQ(b.k_pad, 64);
  EXPECT_EQ(b.tile_bytes, 64 / 2 * 64);
  const auto i8 = make_layout(ExpertDType::kINT8, 512, 2048, 32);
  EXPECT_EQ(i8.num_groups, 64);
  EXPECT_EQ(i8.tile_bytes, 16 * 2048 + 64 * 16 * 2);  // 1 byte + 1/16 fp16 scale per weight
  const auto i4 = make_layout(ExpertDType::kINT4, 512, 2048, 128);
  EXPECT_EQ(i4.tile_bytes, 16 * 2048 / 2 + 16 * 16 * 2);
  EXPECT_THROW(make_layout(ExpertDType::kINT8, 16, 64, 48), std::invalid_argument);
  EXPECT_THROW(make_layout(ExpertDType::kINT4, 0, 64, 32), std::invalid_argument);
  EXPECT_THROW(parse_expert_dtype("fp4"), std::invalid_argument);
  EXPECT_EQ(parse_expert_dtype("int4"), ExpertDType::kINT4);
}

// Independent oracle: a hand-computed INT4 group. w = c - 16 for c in [0, 32): the extreme is -16,
// so s = -16 / -8 = 2 and q = round(w / 2) clamped to [-8, 7] (ties to even).
TEST(ExpertFormat, Int4HandComputedGroup) {
  std::vector<float> w(32);
  for (int c = 0; c < 32; ++c) w[c] = static_cast<float>(c - 16);
  Packed p = pack(ExpertDType::kINT4, 1, 32, 32, w);
  const int expect_q[] = {-8, -8, -7, -6, -6, -6, -5, -4, -4, -4, -3, -2, -2, -2, -1, 0,
                          0,  0,  1,  2,  2,  2,  3,  4,  4,  4,  5,  6,  6,  6,  7,  7};
  for (int c = 0; c < 32; ++c) {
    const auto v = packed_value(p.layout, p.data(), 0, c);
    EXPECT_EQ(v.q, expect_q[c]) << "column " << c;
    EXPECT_EQ(v.scale, 2.f);
  }
  // Padding row 1..15 decodes to zero.
  EXPECT_EQ(packed_value(p.layout, p.data(), 5, 3).value, 0.f);
}

TEST(ExpertFormat, QuantiseDequantiseErrorBounds) {
  const int64_t n = 37, k = 200;
  const auto w = weights(n, k, 7);
  for (int64_t group : {32, 64, 128}) {
    for (auto dt : {ExpertDType::kINT8, ExpertDType::kINT4}) {
      Packed p = pack(dt, n, k, group, w);
      double err2 = 0, ref2 = 0;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < p.layout.k_pad; ++c) {
          const auto v = packed_value(p.layout, p.data(), r, c);
          if (c >= k) {
            ASSERT_EQ(v.value, 0.f);
            continue;
          }
          const float x = w[r * k + c];
          // Rounding to the nearest level: half a step, plus the fp16 rounding of the scale
          // (2^-11 relative) times the largest level. INT4 maps the extreme to -8, so values of
          // the other sign near it clamp at +7: up to one full step there.
          const float steps = dt == ExpertDType::kINT8 ? 0.5f + 128.f / 2048.f : 1.f + 8.f / 2048.f;
          const float bound = std::fabs(v.scale) * steps + 1e-7f;
          ASSERT_LE(std::fabs(x - v.value), bound)
              << expert_dtype_name(dt) << " group " << group << " (" << r << ", " << c << ")";
          err2 += (x - v.value) * (x - v.value);
          ref2 += x * x;
        }
      // Relative RMS error of normal rows with one 8x outlier each (the outlier's group gets a
      // coarse step): step/sqrt(12) per element. Measured int8 0.7-1.2%, int4 12-19% (group
      // 32..128); the bounds leave ~1.5x margin and still fail a broken rounding or scale.
      const double rel = std::sqrt(err2 / ref2);
      std::printf("%s group %ld: relative RMS error %.4f\n",
                  std::string(expert_dtype_name(dt)).c_str(), static_cast<long>(group), rel);
      EXPECT_LT(rel, dt == ExpertDType::kINT8 ? 0.018 : 0.3) << group;
      EXPECT_GT(rel, 0.0);
    }
  }
  Packed b = pack(ExpertDType::kBF16, n, k, 0, w);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      ASSERT_EQ(packed_value(b.layout, b.data(), r, c).value,
                bf16_to_f32(f32_to_bf16(w[r * k + c])));
}

TEST(ExpertFormat, ActivationPreparation) {
  const auto l = make_layout(ExpertDType::kINT8, 16, 100, 32);
  const auto x = random_vec(100, 3);
  ActBuffer q;
  q.reserve(ActKind::kInt8Groups, l, 1);
  q.prepare(0, x.data());
  for (int64_t g = 0; g < l.num_groups; ++g) {
    int32_t sum = 0;
    for (int64_t c = g * 32; c < (g + 1) * 32; ++c) {
      const float xc = c < 100 ? x[c] : 0.f;
      ASSERT_LE(std::fabs(xc - q.q[c] * q.q_scale[g]), 0.5f * q.q_scale[g] * 1.0001f);
      sum += q.q[c];
    }
    EXPECT_EQ(sum, q.q_sum[g]);
  }
  ActBuffer s;
  s.reserve(ActKind::kBf16Split, l, 1);
  s.prepare(0, x.data());
  for (int64_t c = 0; c < 100; ++c)
    ASSERT_LE(std::fabs(x[c] - (bf16_to_f32(s.bf16[c]) + bf16_to_f32(s.bf16_lo[c]))),
              std::ldexp(std::fabs(x[c]), -16));
  // kBf16: x rounded to nearest bf16 (≤ 2^-8 relative), padding zero, no lo part.
  ActBuffer b;
  b.reserve(ActKind::kBf16, l, 1);
  b.prepare(0, x.data());
  EXPECT_TRUE(b.bf16_lo.empty());
  for (int64_t c = 0; c < l.k_pad; ++c) {
    const float want = c < 100 ? x[c] : 0.f;
    ASSERT_EQ(b.bf16[c], f32_to_bf16(want)) << c;
    ASSERT_LE(std::fabs(want - bf16_to_f32(b.bf16[c])), std::ldexp(std::fabs(want), -8)) << c;
  }
}

TEST(ExpertFormat, ApproximationParsing) {
  EXPECT_EQ(parse_approximation(""), Approximation::kExact);
  EXPECT_EQ(parse_approximation("0"), Approximation::kExact);
  EXPECT_EQ(parse_approximation("1"), Approximation::kSplit);
  EXPECT_EQ(parse_approximation("split"), Approximation::kSplit);
  EXPECT_EQ(parse_approximation("bf16"), Approximation::kBf16Activations);
  EXPECT_THROW(parse_approximation("yes"), std::invalid_argument);
  // Selection never goes past the allowed level.
  const auto l = make_layout(ExpertDType::kBF16, 16, 64, 0);
  for (Approximation a :
       {Approximation::kExact, Approximation::kSplit, Approximation::kBf16Activations})
    EXPECT_LE(static_cast<int>(
                  select_expert_gemm(ExpertDType::kBF16, Isa::kAmx, 64, &l, a).approximation),
              static_cast<int>(a));
}

TEST(ExpertFormat, VectorPreparationIsBitIdentical) {
  bool ran = false;
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_available(isa)) {
      std::printf("[ SKIPPED ] preparation at %s: not available on this CPU (%s)\n",
                  std::string(isa_name(isa)).c_str(), cpu_features().brand.c_str());
      continue;
    }
    ran = true;
    for (int64_t group : {32, 64, 128})
      for (int64_t k : {1, 45, 100, 2048, 2049}) {
        const auto l = make_layout(ExpertDType::kINT8, 16, k, group);
        auto x = random_vec(static_cast<size_t>(k), 9 + static_cast<uint32_t>(k), 3.f);
        x[0] = 0.f;
        if (k > 40) {
          x[7] = std::nanf("");  // a NaN does not replace a group's maximum (std::max's order)
          x[39] = std::numeric_limits<float>::infinity();
          x[k - 1] = x[k - 2];  // a repeated value rounds alike
        }
        // (AVX2 vectorises kInt8Groups only: the bf16 kinds would compare the scalar code with
        // itself.)
        for (ActKind kind : {ActKind::kInt8Groups, ActKind::kBf16Split, ActKind::kBf16}) {
          if (isa == Isa::kAvx2 && kind != ActKind::kInt8Groups) continue;
          ActBuffer s, v;
          s.reserve(kind, l, 2, Isa::kRef);
          v.reserve(kind, l, 2, isa);
          s.prepare(1, x.data());
          v.prepare(1, x.data());
          const std::string what = std::string(isa_name(isa)) + " k=" + std::to_string(k) +
                                   " group " + std::to_string(group);
          EXPECT_EQ(s.bf16, v.bf16) << what;
          EXPECT_EQ(s.bf16_lo, v.bf16_lo) << what;
          EXPECT_EQ(s.q, v.q) << what;
          EXPECT_EQ(s.q_scale, v.q_scale) << what;
          EXPECT_EQ(s.q_sum, v.q_sum) << what;
        }
      }
  }
  if (!ran) GTEST_SKIP() << "neither AVX2 nor AVX-512 on this CPU (" << cpu_features().brand << ")";
}

// A group whose max |x| is below 127 / FLT_MAX (the inverse scale would be infinite) is quantised
// as zero with scale 0 at every ISA, padding included; the next, ordinary group is not affected.
TEST(ExpertFormat, TinyActivationGroupsQuantiseAsZero) {
  for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_available(isa)) continue;
    for (int64_t k : {33, 70}) {  // the tiny group partial (33) or whole, then a partial one (70)
      const auto l = make_layout(ExpertDType::kINT8, 16, k, 32);
      std::vector<float> x(static_cast<size_t>(k), 0.f);
      for (int64_t c = 0; c < std::min<int64_t>(k, 32); ++c)
        x[c] = (c % 3 == 0 ? -1.f : 1.f) * (c % 2 ? 1e-38f : 3e-39f);  // normal and subnormal
      for (int64_t c = 32; c < k; ++c) x[c] = 0.25f * static_cast<float>(c - 40);
      ActBuffer b;
      b.reserve(ActKind::kInt8Groups, l, 1, isa);
      b.prepare(0, x.data());
      for (int64_t c = 0; c < 32; ++c)
        ASSERT_EQ(b.q[c], 0) << isa_name(isa) << " k=" << k << " c=" << c;
      EXPECT_EQ(b.q_scale[0], 0.f) << isa_name(isa);
      EXPECT_EQ(b.q_sum[0], 0) << isa_name(isa);
      if (k > 32) {
        EXPECT_GT(b.q_scale[1], 0.f) << isa_name(isa);
        for (int64_t c = 32; c < 64; ++c) {
          const float xc = c < k ? x[c] : 0.f;
          ASSERT_LE(std::fabs(xc - b.q[c] * b.q_scale[1]), 0.5f * b.q_scale[1] * 1.0001f)
              << isa_name(isa) << " k=" << k << " c=" << c;
        }
      }
    }
  }
}

// AVX2's SiLU·up (phase 1 of the expert op) against the scalar silu: ~2 ulp of the exp, then a
// division and a product; saturates cleanly at both ends.
TEST(ExpertFormat, VectorSiluMatchesScalar) {
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_available(isa)) {
      std::printf("[ SKIPPED ] silu_mul at %s: not available on this CPU (%s)\n",
                  std::string(isa_name(isa)).c_str(), cpu_features().brand.c_str());
      continue;
    }
    for (int64_t n : {1, 7, 16, 37}) {  // 37: four full vectors and a tail
      auto g = random_vec(static_cast<size_t>(n), 5 + static_cast<uint32_t>(n), 12.f);
      auto u = random_vec(static_cast<size_t>(n), 6 + static_cast<uint32_t>(n), 2.f);
      if (n > 12) {
        g[1] = 100.f;   // e^-100: silu(g) = g
        g[2] = -100.f;  // e^100: silu(g) = -0
        g[3] = 0.f;
        g[4] = -88.f;
        g[5] = 1e6f;  // far beyond exp's range both ways
        g[6] = -1e6f;
        g[7] = 1e7f;
        g[8] = -1e7f;
        g[9] = std::numeric_limits<float>::infinity();    // silu(inf) = inf
        g[10] = -std::numeric_limits<float>::infinity();  // -inf / inf: NaN, as the scalar silu
        g[11] = std::nanf("");
        u[9] = 1.f;
      }
      std::vector<float> h(static_cast<size_t>(n) + 1, 42.f);  // one past the end: untouched
      if (isa == Isa::kAvx2)
        avx2::silu_mul(g.data(), u.data(), h.data(), n);
      else
        avx512::silu_mul(g.data(), u.data(), h.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const float scalar = silu(g[i]) * u[i];
        if (!std::isfinite(scalar)) {  // inf, or NaN, exactly as the scalar silu
          EXPECT_TRUE(std::isnan(scalar) ? std::isnan(h[i]) : h[i] == scalar)
              << isa_name(isa) << " g=" << g[i] << " got " << h[i];
          continue;
        }
        const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
        EXPECT_NEAR(h[i], want, 1e-6 * std::fabs(want) + 1e-30)
            << isa_name(isa) << " n=" << n << " g=" << g[i];
      }
      EXPECT_EQ(h[static_cast<size_t>(n)], 42.f) << isa_name(isa) << " n=" << n;
    }
  }
}

// Σ_c |W[r][c]| |x[c]| per (row, token): the scale of a dot product's rounding error.
float abs_dot(const PackedLayout& l, uint8_t* tile, const std::vector<float>& x, int64_t i,
              int64_t r) {
  double s = 0;
  for (int64_t c = 0; c < l.k; ++c)
    s += std::fabs(packed_value(l, tile, r, c).value) * std::fabs(x[i * l.k + c]);
  return static_cast<float>(s);
}

// Every variant this CPU runs, against the reference with the same activations.
TEST(ExpertGemm, VariantsMatchReference) {
  struct Shape {
    int64_t n, k, group;
  };
  const Shape shapes[] = {{16, 32, 32}, {17, 45, 32}, {40, 64, 64}, {33, 200, 128}, {512, 256, 32}};
  int tested = 0;
  for (const auto& v : expert_gemm_variants()) {
    if (!isa_available(v.isa)) {
      std::printf(
          "[ SKIPPED ] %s: %s not available on this CPU (%s); AMX runs on the GPU test machine\n",
          v.name, std::string(isa_name(v.isa)).c_str(), cpu_features().brand.c_str());
      continue;
    }
    const TileKernelFn ref = v.dtype == ExpertDType::kBF16 ? ref::tile_f32 : ref::tile_int8_groups;
    const ActKind ref_act = v.dtype == ExpertDType::kBF16 ? ActKind::kF32 : ActKind::kInt8Groups;
    for (const auto& s : shapes) {
      Packed p = pack(v.dtype, s.n, s.k, s.group, weights(s.n, s.k, 11));
      if (!v.supports(p.layout)) continue;  // AMX INT: groups of 64 and 128 only
      for (int64_t m : {1, 2, 3, 5, 17, 33, 64, 100}) {
        auto x = random_vec(static_cast<size_t>(m * s.k), 5 + static_cast<uint32_t>(m));
        // A variant that rounds activations to bf16 is compared with the reference on the
        // rounded activations: the same products, fp32 sums.
        if (v.act == ActKind::kBf16)
          for (auto& e : x) e = bf16_to_f32(f32_to_bf16(e));
        ActBuffer a, ar;
        a.reserve(v.act, p.layout, m);
        ar.reserve(ref_act, p.layout, m);
        for (int64_t i = 0; i < m; ++i) {
          a.prepare(i, x.data() + i * s.k);
          ar.prepare(i, x.data() + i * s.k);
        }
        std::vector<float> out(static_cast<size_t>(kMaxRowsPerCall * kTileRows), -1.f),
            want(out.size());
        for (int64_t t = 0; t < p.layout.num_tiles; ++t) {
          uint8_t* tile = p.data() + t * p.layout.tile_bytes;
          v.run(p.layout, tile, a.rows(0), m, out.data());
          ref(p.layout, tile, ar.rows(0), m, want.data());
          for (int64_t i = 0; i < m; ++i)
            for (int64_t r = 0; r < kTileRows; ++r) {
              const int64_t row = t * kTileRows + r;
              const float got = out[i * kTileRows + r], exp = want[i * kTileRows + r];
              if (row >= s.n) {
                ASSERT_EQ(got, 0.f) << v.name << " padding row " << row;
                continue;
              }
              // fp32 accumulation (and, for avx512_bf16, the 2^-17 residue of the hi/lo split)
              // against fp64: a few ulps of Σ|w·x|.
              const float tol = 4e-5f * abs_dot(p.layout, p.data(), x, i, row) + 1e-6f;
              ASSERT_NEAR(got, exp, tol) << "repro: variant=" << v.name << " n=" << s.n
                                         << " k=" << s.k << " group=" << s.group << " m=" << m
                                         << " tile=" << t << " token=" << i << " row=" << r;
            }
        }
        // The pair entry point (AMX: two tiles in one 2x2-blocked pass; VNNI at one token: one
        // interleaved pass, Note [Two tiles per pass at decode]) on tiles 0 and last, and on the
        // neighbouring tiles 0 and 1 (another prefetch distance).
        std::vector<float> o0(out.size()), o1(out.size()), w0(out.size()), w1(out.size());
        for (int64_t tl : {p.layout.num_tiles - 1, std::min<int64_t>(1, p.layout.num_tiles - 1)}) {
          uint8_t* ta = p.data();
          uint8_t* tb = p.data() + tl * p.layout.tile_bytes;
          v.run_pair(p.layout, ta, tb, a.rows(0), m, o0.data(), o1.data());
          v.run(p.layout, ta, a.rows(0), m, w0.data());
          v.run(p.layout, tb, a.rows(0), m, w1.data());
          for (int64_t q = 0; q < m * kTileRows; ++q) {
            ASSERT_EQ(o0[q], w0[q]) << "repro: run_pair tile 0, variant=" << v.name << " m=" << m;
            ASSERT_EQ(o1[q], w1[q])
                << "repro: run_pair tile " << tl << ", variant=" << v.name << " m=" << m;
          }
        }
        ++tested;
      }
    }
  }
  EXPECT_GT(tested, 0);
}

// Random ggml blocks of `type` for an [n, k] matrix (fp16 scales kept finite and small).
std::vector<uint8_t> random_blocks(int32_t type, int64_t n, int64_t k, uint32_t seed) {
  std::vector<uint8_t> b(ggml_row_bytes(type, k) * static_cast<size_t>(n));
  std::mt19937 g(seed);
  for (auto& v : b) v = static_cast<uint8_t>(g());
  const int64_t bb = ggml_block_bytes(type), nb = static_cast<int64_t>(b.size()) / bb;
  // Scale fields: Q8_0/Q4_0 d at 0; K-quants d (and dmin) where the decoder reads them.
  std::vector<int64_t> at = type == kGgmlQ6_K                        ? std::vector<int64_t>{208}
                            : type == kGgmlQ4_K || type == kGgmlQ5_K ? std::vector<int64_t>{0, 2}
                                                                     : std::vector<int64_t>{0};
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t o : at) {
      const uint16_t h = f32_to_f16(std::uniform_real_distribution<float>(-0.01f, 0.01f)(g));
      std::memcpy(&b[static_cast<size_t>(i * bb + o)], &h, 2);
    }
  return b;
}

// Q8_0 / Q4_0 pack into INT8 / INT4 group 32 exactly (Note [Exact GGUF repack]): every packed value
// equals the block's value, including Q8_0's -128, and every tile kernel this CPU runs agrees with
// the reference on them.
TEST(ExpertFormat, GgufSymmetricBlocksRepackExactly) {
  struct Case {
    int32_t type;
    ExpertDType dt;
  };
  for (const Case c : {Case{kGgmlQ8_0, ExpertDType::kINT8}, Case{kGgmlQ4_0, ExpertDType::kINT4},
                       Case{kGgmlQ4_0, ExpertDType::kINT8}}) {
    const int64_t n = 37, k = 96;
    auto blocks = random_blocks(c.type, n, k, 7);
    if (c.type == kGgmlQ8_0) blocks[2] = 0x80;  // a -128 in the first block
    MatrixSource src;
    src.ggml_type = c.type;
    src.rows = n;
    src.cols = k;
    src.row_bytes = ggml_row_bytes(c.type, k);
    src.data = blocks.data();
    Packed p;
    p.layout = make_layout(c.dt, n, k, 32);
    ASSERT_TRUE(pack_is_exact(p.layout, src));
    p.storage.resize(static_cast<size_t>(p.layout.bytes() + 64));
    pack_weights_from(p.layout, src, p.data(), 0, p.layout.num_tiles);
    std::vector<float> row(static_cast<size_t>(k));
    bool saw_min = false;
    for (int64_t r = 0; r < n; ++r) {
      src.decode_row(r, row.data());
      for (int64_t col = 0; col < k; ++col) {
        const PackedValue v = packed_value(p.layout, p.data(), r, col);
        ASSERT_EQ(v.value, row[col]) << "type " << c.type << " row " << r << " col " << col;
        saw_min = saw_min || v.q == -128;
      }
    }
    EXPECT_EQ(saw_min, c.type == kGgmlQ8_0);
    // Every variant on these tiles, against the reference.
    for (const auto& v : expert_gemm_variants()) {
      if (v.dtype != c.dt || !isa_available(v.isa) || !v.supports(p.layout)) continue;
      for (int64_t m : {1, 3, 17, 64}) {
        const auto x = random_vec(static_cast<size_t>(m * k), 3 + static_cast<uint32_t>(m));
        ActBuffer a, ar;
        a.reserve(v.act, p.layout, m);
        ar.reserve(ActKind::kInt8Groups, p.layout, m);
        for (int64_t i = 0; i < m; ++i) {
          a.prepare(i, x.data() + i * k);
          ar.prepare(i, x.data() + i * k);
        }
        std::vector<float> out(static_cast<size_t>(kMaxRowsPerCall * kTileRows)), want(out.size());
        for (int64_t t = 0; t < p.layout.num_tiles; ++t) {
          uint8_t* tile = p.data() + t * p.layout.tile_bytes;
          v.run(p.layout, tile, a.rows(0), m, out.data());
          ref::tile_int8_groups(p.layout, tile, ar.rows(0), m, want.data());
          for (int64_t i = 0; i < m; ++i)
            for (int64_t r = 0; r < kTileRows && t * kTileRows + r < n; ++r) {
              const float tol =
                  4e-5f * abs_dot(p.layout, p.data(), x, i, t * kTileRows + r) + 1e-6f;
              ASSERT_NEAR(out[i * kTileRows + r], want[i * kTileRows + r], tol)
                  << v.name << " type " << c.type << " m " << m << " tile " << t;
            }
        }
      }
    }
  }
}

// Other ggml types (and FP8) are decoded row by row and quantised: the same bytes as packing the
// decoded fp32 matrix.
TEST(ExpertFormat, DecodedSourcesPackLikeTheirFloatValues) {
  const int64_t n = 33, k = 512;
  for (int32_t type : {kGgmlQ4_K, kGgmlQ5_K, kGgmlQ6_K, kGgmlQ8_0}) {
    const auto blocks = random_blocks(type, n, k, 11);
    MatrixSource src;
    src.ggml_type = type;
    src.rows = n;
    src.cols = k;
    src.row_bytes = ggml_row_bytes(type, k);
    src.data = blocks.data();
    std::vector<float> dense(static_cast<size_t>(n * k));
    for (int64_t r = 0; r < n; ++r) src.decode_row(r, dense.data() + r * k);
    for (ExpertDType dt : {ExpertDType::kINT8, ExpertDType::kINT4, ExpertDType::kBF16}) {
      const auto layout = make_layout(dt, n, k, 64);
      std::vector<uint8_t> a(static_cast<size_t>(layout.bytes())), b(a.size());
      pack_weights_from(layout, src, a.data(), 0, layout.num_tiles);
      pack_weights(layout, dense.data(), DType::kF32, k, b.data(), 0, layout.num_tiles);
      EXPECT_EQ(a, b) << "type " << type << " dtype " << expert_dtype_name(dt);
      EXPECT_FALSE(pack_is_exact(layout, src));
    }
  }
}

TEST(ExpertFormat, Fp8E4M3EncodeDecode) {
  // Every finite code decodes and encodes back to itself; known values.
  for (int c = 0; c < 256; ++c) {
    const float v = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v));
      continue;
    }
    const uint8_t back = f32_to_fp8_e4m3(v);
    EXPECT_EQ(fp8_e4m3_to_f32(back), v) << "code " << c;
  }
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.f, -9));
  EXPECT_EQ(fp8_e4m3_to_f32(0xb8), -1.f);
  // Round to nearest even between neighbours, saturation, NaN.
  EXPECT_EQ(f32_to_fp8_e4m3(1.0625f), 0x38);  // halfway 1 and 1.125: even (1)
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3a);  // halfway 1.125 and 1.25: even (1.25)
  EXPECT_EQ(f32_to_fp8_e4m3(1000.f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(-1000.f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.5f, -10)), 0x01);   // 0.75 of the smallest step: rounds up
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.f, -10)), 0x00);    // halfway to the smallest: even (0)
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(15.9f, -10)), 0x08);  // rounds up into the first normal
  EXPECT_EQ(f32_to_fp8_e4m3(std::nanf("")) & 0x7f, 0x7f);
  // Random values: the nearest code (ties aside) by brute force.
  std::mt19937 g(5);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::uniform_real_distribution<float>(-500.f, 500.f)(g) *
                    std::ldexp(1.f, -static_cast<int>(g() % 12));
    float best = 0.f, bd = 1e30f;
    for (int c = 0; c < 256; ++c) {
      const float v = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
      if (!std::isnan(v) && std::fabs(v - x) < bd) {
        bd = std::fabs(v - x);
        best = v;
      }
    }
    ASSERT_EQ(std::fabs(fp8_e4m3_to_f32(f32_to_fp8_e4m3(x)) - x), std::fabs(best - x)) << x;
  }
}

struct MoeProblem {
  int64_t hidden, inter, experts, top_k, m;
  ExpertDType dt;
  int64_t group;
  std::vector<Packed> gate, up, down;
  std::vector<PackedExpert> views;
  std::vector<float> src;
  std::vector<int32_t> ids;
  std::vector<float> w;

  MoeProblem(int64_t H, int64_t I, int64_t E, int64_t K, int64_t M, ExpertDType d, int64_t G,
             uint32_t seed, int64_t unused_experts = 0)
      : hidden(H), inter(I), experts(E), top_k(K), m(M), dt(d), group(G) {
    for (int64_t e = 0; e < E; ++e) {
      gate.push_back(pack(d, I, H, G, weights(I, H, seed + 3 * e)));
      up.push_back(pack(d, I, H, G, weights(I, H, seed + 3 * e + 1)));
      down.push_back(pack(d, H, I, G, weights(H, I, seed + 3 * e + 2)));
    }
    for (int64_t e = 0; e < E; ++e) views.push_back({gate[e].data(), up[e].data(), down[e].data()});
    src = random_vec(static_cast<size_t>(M * H), seed + 99);
    std::mt19937 g(seed);
    for (int64_t t = 0; t < M; ++t) {
      std::vector<int32_t> all(static_cast<size_t>(E - unused_experts));
      for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int32_t>(i);
      std::shuffle(all.begin(), all.end(), g);
      for (int64_t i = 0; i < K; ++i) {
        ids.push_back(all[i]);
        w.push_back(std::uniform_real_distribution<float>(0.05f, 1.f)(g));
      }
    }
  }
  MoeExpertsArgs args(float* dst) const {
    MoeExpertsArgs a;
    a.gate_up = &gate[0].layout;
    a.down = &down[0].layout;
    a.experts = views.data();
    a.num_experts = experts;
    a.src = src.data();
    a.ld_src = hidden;
    a.m = m;
    a.ids = ids.data();
    a.weights = w.data();
    a.top_k = top_k;
    a.dst = dst;
    a.ld_dst = hidden;
    return a;
  }
};

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (a[i] - b[i]) * (a[i] - b[i]);
    n += b[i] * b[i];
  }
  return std::sqrt(e / n);
}

TEST(MoeExperts, EveryIsaMatchesReference) {
  auto pool = make_tbb_executor(3);
  for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (!isa_available(isa)) {
      std::printf("[ SKIPPED ] MoeExperts at %s: not available on this CPU (%s)\n",
                  std::string(isa_name(isa)).c_str(), cpu_features().brand.c_str());
      continue;
    }
    for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT8, ExpertDType::kINT4}) {
      for (int64_t m : {1, 3, 17, 64}) {
        // H and I not multiples of 16 or of the group; two experts never routed to. Group 64,
        // so that AMX (>= 16 tokens per expert at m = 64) takes the INT experts too.
        MoeProblem p(72, 40, 10, 3, m, dt, 64, 100 + static_cast<uint32_t>(m), 2);
        std::vector<float> got(static_cast<size_t>(m * 72), 0.25f), want(got);
        MoeExperts op(isa);
        op.set_allow_approximate(true);  // AMX BF16 too (5e-5 holds for it on these shapes)
        if (m == 64) op.set_slot_major_limit(0);  // the prefill schedule of phase 2
        op.run(p.args(got.data()), *pool);
        moe_experts_ref(p.args(want.data()));
        // At 64 tokens (~19 per expert) AMX takes the experts: guards the variant selection.
        if (isa == Isa::kAmx && m == 64)
          EXPECT_NE(op.last_variants().find("amx"), std::string::npos) << op.last_variants();
        // fp32 vs fp64 sums (~1e-6); AMX BF16 adds the 2^-17 residue of the activation split.
        EXPECT_LT(rel_l2(got, want), 5e-5)
            << "repro: isa=" << isa_name(isa) << " dtype=" << expert_dtype_name(dt) << " m=" << m
            << " variants=" << op.last_variants();
        // Deterministic: same input, different thread count -> bit-identical.
        auto serial = SerialExecutor();
        std::vector<float> again(got.size(), 0.25f);
        op.run(p.args(again.data()), serial);
        EXPECT_EQ(again, got) << isa_name(isa) << " " << expert_dtype_name(dt) << " m=" << m;
      }
    }
  }
}

// AMX INT computes the VNNI kernel's integer group sums and fp32 epilogue: bit-identical results.
TEST(MoeExperts, AmxIntegerPathEqualsVnni) {
  if (!isa_available(Isa::kAmx))
    GTEST_SKIP() << "AMX not available on this CPU (" << cpu_features().brand
                 << "); runs on the GPU test machine";
  auto pool = make_tbb_executor(4);
  for (auto dt : {ExpertDType::kINT8, ExpertDType::kINT4}) {
    for (int64_t group : {64, 128}) {
      // 3 experts, top-2, 70 tokens: ~47 tokens per expert -> AMX passes of 32 + a tail.
      MoeProblem p(200, 130, 3, 2, 70, dt, group, 9);
      std::vector<float> amx(static_cast<size_t>(70 * 200), 0.f), vnni(amx);
      MoeExperts a(Isa::kAmx), v(Isa::kAvx512);
      a.run(p.args(amx.data()), *pool);
      v.run(p.args(vnni.data()), *pool);
      ASSERT_NE(a.last_variants().find("amx"), std::string::npos) << a.last_variants();
      EXPECT_EQ(amx, vnni) << expert_dtype_name(dt) << " group " << group;
      EXPECT_GT(test::norm2(vnni), 0.0);
    }
  }
}

// The AMX knobs (epilogue order, software prefetch) change timing only: every setting stays
// bit-identical to the VNNI kernel.
TEST(MoeExperts, AmxKnobsKeepResultsBitwise) {
  if (!isa_available(Isa::kAmx))
    GTEST_SKIP() << "AMX not available on this CPU (" << cpu_features().brand
                 << "); runs on the GPU test machine";
  auto pool = make_tbb_executor(4);
  const bool late0 = amx::late_epilogue();
  for (auto dt : {ExpertDType::kINT8, ExpertDType::kINT4}) {
    MoeProblem p(200, 130, 3, 2, 70, dt, dt == ExpertDType::kINT8 ? 128 : 64, 21);
    std::vector<float> vnni(static_cast<size_t>(70 * 200), 0.f);
    MoeExperts v(Isa::kAvx512);
    v.run(p.args(vnni.data()), *pool);
    for (bool late : {true, false})
      for (int pf : {0, 1, 2}) {
        amx::set_late_epilogue(late);
        amx::set_prefetch(pf == 0 ? 0 : pf == 1 ? 8192 : 32768, pf == 2);
        std::vector<float> got(vnni.size(), 0.f);
        MoeExperts a(Isa::kAmx);
        a.run(p.args(got.data()), *pool);
        ASSERT_NE(a.last_variants().find("amx"), std::string::npos) << a.last_variants();
        EXPECT_EQ(got, vnni) << expert_dtype_name(dt) << " late=" << late << " prefetch=" << pf;
      }
  }
  amx::set_late_epilogue(late0);
  amx::set_prefetch(0, false);
}

// The prefill schedule of phase 2 (column blocks over all experts) agrees with the slot-major
// one bit for bit, for every block size (1 pair to all, the partial last pair of H = 72 included)
// and with or without the next expert's lines ahead (Note [Prefill down: the next expert ahead]).
TEST(MoeExperts, BothPhase2SchedulesAgreeBitwise) {
  auto pool = make_tbb_executor(3);
  for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT8, ExpertDType::kINT4}) {
    for (int64_t m : {17, 64}) {
      MoeProblem p(72, 40, 10, 3, m, dt, 64, 5 + static_cast<uint32_t>(m));
      std::vector<float> slot(static_cast<size_t>(m * 72), 0.5f);
      MoeExperts a(cpu_features().best);
      a.set_slot_major_limit(int64_t{1} << 30);
      a.run(p.args(slot.data()), *pool);
      for (int pairs : {0, 1, 2, 3, 100})
        for (bool ahead : {true, false}) {
          std::vector<float> column(slot.size(), 0.5f);
          MoeExperts b(cpu_features().best);
          b.set_slot_major_limit(0);
          b.set_prefill_pairs(pairs);
          b.set_prefill_ahead(ahead);
          b.run(p.args(column.data()), *pool);
          EXPECT_EQ(slot, column) << expert_dtype_name(dt) << " m=" << m << " pairs=" << pairs
                                  << " ahead=" << ahead;
        }
    }
  }
}

TEST(MoeExperts, HandOffEqualsTwoPhasesBitwise) {
  // Note [Per-expert hand-off]: the one-job decode path does the two-phase arithmetic item for
  // item, for every thread count (more threads than experts' tiles included) and both variants.
  for (int threads : {2, 3, 5}) {
    auto pool = make_spin_executor(threads);
    for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT8, ExpertDType::kINT4}) {
      for (int64_t m : {1, 3, 16}) {
        MoeProblem p(72, 40, 10, 3, m, dt, 64, 50 + static_cast<uint32_t>(m));
        std::vector<float> flow(static_cast<size_t>(m * 72), 0.5f), two(flow), ref(flow);
        MoeExperts a(cpu_features().best), b(cpu_features().best);
        a.set_dataflow(true);
        b.set_dataflow(false);
        a.run(p.args(flow.data()), *pool);
        b.run(p.args(two.data()), *pool);
        EXPECT_TRUE(a.last_dataflow()) << threads << " threads";
        EXPECT_FALSE(b.last_dataflow());
        EXPECT_EQ(flow, two) << expert_dtype_name(dt) << " m=" << m << " threads=" << threads;
        moe_experts_ref(p.args(ref.data()));
        EXPECT_LT(rel_l2(flow, ref), 5e-5) << expert_dtype_name(dt) << " m=" << m;
        // Repeated calls reuse the hand-off flags.
        std::vector<float> again(flow.size(), 0.5f);
        a.run(p.args(again.data()), *pool);
        EXPECT_EQ(again, flow);
      }
    }
  }
  // TBB cannot promise concurrent shares: the op falls back to the two phases.
  auto tbb = make_tbb_executor(3);
  MoeProblem p(72, 40, 10, 3, 1, ExpertDType::kINT4, 64, 8);
  std::vector<float> dst(72, 0.f);
  MoeExperts op(cpu_features().best);
  op.run(p.args(dst.data()), *tbb);
  EXPECT_FALSE(op.last_dataflow());
}

// Note [Column blocks finish the call]: phase 2 items of 2, 4, 8 or 16 tiles of H give the
// two-phase result bit for bit; H of 5 and 13 tiles leaves a partial pair and a partial block.
TEST(MoeExperts, HandOffDownBlocksAgreeBitwise) {
  for (int threads : {2, 5}) {
    auto pool = make_spin_executor(threads);
    for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT4}) {
      for (int64_t H : {72, 200}) {
        for (int64_t m : {1, 16}) {
          MoeProblem p(H, 40, 10, 3, m, dt, 64, 70 + static_cast<uint32_t>(m + H));
          std::vector<float> two(static_cast<size_t>(m * H), 0.5f);
          MoeExperts b(cpu_features().best);
          b.set_dataflow(false);
          b.run(p.args(two.data()), *pool);
          for (int tiles : {2, 4, 8, 16}) {
            std::vector<float> flow(two.size(), 0.5f);
            MoeExperts a(cpu_features().best);
            a.set_down_tiles(tiles);
            EXPECT_EQ(a.down_tiles(), tiles);
            for (int call = 0; call < 2; ++call) {  // the second reuses the counters
              std::fill(flow.begin(), flow.end(), 0.5f);
              a.run(p.args(flow.data()), *pool);
              ASSERT_TRUE(a.last_dataflow());
              EXPECT_EQ(flow, two)
                  << expert_dtype_name(dt) << " H=" << H << " m=" << m << " threads=" << threads
                  << " tiles=" << tiles << " call " << call;
            }
          }
        }
      }
    }
  }
  MoeExperts op(Isa::kRef);
  op.set_down_tiles(5);
  EXPECT_EQ(op.down_tiles(), 4);
  op.set_down_tiles(0);
  EXPECT_EQ(op.down_tiles(), 2);
  op.set_down_tiles(40);
  EXPECT_EQ(op.down_tiles(), 16);
}

// Note [Grouping a few slots]: up to 32 slots are grouped by sorting, more by counting over all
// experts. Either way a batch gives, bit for bit, what its tokens give one call each (every
// token's slots fewer than 32), repeated ids within a token included.
TEST(MoeExperts, GroupingBySortAndByCountAgree) {
  auto pool = make_tbb_executor(3);
  for (auto [K, M] : {std::pair<int64_t, int64_t>{4, 8}, {3, 11}, {8, 16}}) {  // S = 32, 33, 128
    MoeProblem p(72, 40, 12, K, M, ExpertDType::kINT4, 64, 31 + static_cast<uint32_t>(K));
    p.ids[static_cast<size_t>(K + 1)] = p.ids[static_cast<size_t>(K)];  // token 1 repeats an id
    p.ids[static_cast<size_t>(M * K - 1)] = 0;                          // the last token uses 0
    p.ids[static_cast<size_t>(M * K - 2)] = 0;
    std::vector<float> batch(static_cast<size_t>(M * 72), 0.25f), single(batch);
    MoeExperts a(cpu_features().best), b(cpu_features().best);
    a.run(p.args(batch.data()), *pool);
    for (int64_t t = 0; t < M; ++t) {
      MoeExpertsArgs one = p.args(single.data() + t * 72);
      one.m = 1;
      one.src = p.src.data() + t * 72;
      one.ids = p.ids.data() + t * K;
      one.weights = p.w.data() + t * K;
      b.run(one, *pool);
    }
    EXPECT_EQ(batch, single) << "K=" << K << " M=" << M;
    std::vector<float> ref(batch.size(), 0.25f);
    moe_experts_ref(p.args(ref.data()));
    EXPECT_LT(rel_l2(batch, ref), 5e-5) << "K=" << K << " M=" << M;
  }
}

// MoeExperts::set_trace: each share's marks come in its job's order, between the run's entry,
// dispatch and return; the wait is a duration; off, a run records nothing.
TEST(MoeExperts, HandOffTraceIsOrdered) {
  using Op = MoeExperts;
  constexpr int T = 3, P = Op::kTracePoints;
  auto pool = make_spin_executor(T);
  // One token: its row is prepared inside the job (Note [The token's row inside the job]); two
  // tokens: before it.
  MoeProblem p1(72, 40, 10, 3, 1, ExpertDType::kINT4, 64, 9),
      p2(72, 40, 10, 3, 2, ExpertDType::kINT4, 64, 9);
  std::vector<float> dst(2 * 72, 0.f);
  MoeExperts op(cpu_features().best);
  op.run(p1.args(dst.data()), *pool);
  EXPECT_TRUE(op.last_trace().empty());
  op.set_trace(true);
  for (int call = 0; call < 4; ++call) {
    const bool late = call % 2 == 0;
    op.run((late ? p1 : p2).args(dst.data()), *pool);
    ASSERT_TRUE(op.last_dataflow());
    const auto& tr = op.last_trace();
    ASSERT_EQ(tr.size(), static_cast<size_t>((T + 1) * P));
    const int64_t entry = tr[T * P], dispatch = tr[T * P + 1], ret = tr[T * P + 2],
                  grouped = tr[T * P + 3], prepared = tr[T * P + 4];
    EXPECT_GT(entry, 0);
    EXPECT_LE(entry, grouped);
    EXPECT_LE(grouped, dispatch);
    // Note [The token's row inside the job]: prepared in the job, or before it.
    if (late) {
      EXPECT_LE(dispatch, prepared);
      EXPECT_LE(prepared, ret);
    } else {
      EXPECT_LE(grouped, prepared);
      EXPECT_LE(prepared, dispatch);
    }
    for (int i = 0; i < T; ++i) {
      const int64_t* m = tr.data() + i * P;
      const int order[] = {Op::kShareStart, Op::kOwnGateUpDone, Op::kGateUpDone, Op::kOwnDownDone,
                           Op::kDownDone,   Op::kBarrierDone,   Op::kReduceDone};
      EXPECT_LE(dispatch, m[order[0]]) << "share " << i;
      for (int q = 1; q < 7; ++q) EXPECT_LE(m[order[q - 1]], m[order[q]]) << "share " << i;
      EXPECT_LE(m[Op::kReduceDone], ret) << "share " << i;
      EXPECT_GE(m[Op::kWaitNs], 0);
      EXPECT_LE(m[Op::kWaitNs], m[Op::kDownDone] - m[Op::kGateUpDone] + 1) << "share " << i;
      EXPECT_GE(m[Op::kReduceNs], 0);
      EXPECT_LE(m[Op::kReduceNs], m[Op::kDownDone] - m[Op::kGateUpDone] + 1) << "share " << i;
    }
  }
}

// Runs try_run_concurrent on an inner executor with thread 0 held back, so that the others run
// out of work first and take its items (Note [Per-expert hand-off]).
class LateFirstThread final : public Executor {
 public:
  explicit LateFirstThread(Executor& inner) : inner_(inner) {}
  int num_threads() const override { return inner_.num_threads(); }
  const char* name() const override { return "late-first-thread"; }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    inner_.parallel_for(n, grain, fn);
  }
  bool try_run_concurrent(int n, const std::function<void(int)>& fn) override {
    return inner_.try_run_concurrent(n, [&](int i) {
      if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(30));
      fn(i);
    });
  }

 private:
  Executor& inner_;
};

TEST(MoeExperts, HandOffStealsFromASlowThreadAndStaysExact) {
  auto spin = make_spin_executor(3);
  LateFirstThread late(*spin);
  for (auto dt : {ExpertDType::kINT8, ExpertDType::kINT4}) {
    for (int64_t H : {72, 200}) {  // one column block, or several (13 tiles of H)
      MoeProblem p(H, 40, 10, 3, 2, dt, 64, 71);
      std::vector<float> two(static_cast<size_t>(2 * H), 0.5f);
      MoeExperts b(cpu_features().best);
      b.set_dataflow(false);
      b.run(p.args(two.data()), *spin);
      // Half shares stolen (Note [Stealing half a share]) with phase 2 items of 2, 4 or 8 tiles.
      for (int mode = 0; mode < 3; ++mode) {
        std::vector<float> flow(two.size(), 0.5f);
        MoeExperts a(cpu_features().best);
        a.set_down_tiles(2 << mode);
        a.run(p.args(flow.data()), late);
        ASSERT_TRUE(a.last_dataflow());
        EXPECT_GT(a.last_stolen(), 0)
            << "the held-back thread's items were not taken by the others";
        EXPECT_EQ(flow, two) << expert_dtype_name(dt) << " H=" << H << " mode " << mode;
      }
    }
  }
}

// Note [NUMA expert placement]: shares split each node's items among that node's threads.
TEST(NumaShares, SplitsEachNodesItemsAmongItsThreads) {
  NumaShares one;
  const std::vector<int> zeros(5, 0);
  one.set(zeros.data(), 5, 1);
  const int64_t all[2] = {0, 23};
  std::vector<int64_t> out(10);
  one.split(all, out.data());
  for (int i = 0; i < 5; ++i) {  // one node: the plain even split
    EXPECT_EQ(out[2 * i], 23 * i / 5);
    EXPECT_EQ(out[2 * i + 1], 23 * (i + 1) / 5);
  }
  // Two nodes, shares alternating as the spread core order places them (0, 1, 0, 1, 0).
  NumaShares two;
  const std::vector<int> alt{0, 1, 0, 1, 0};
  two.set(alt.data(), 5, 2);
  EXPECT_EQ(two.nodes(), 2);
  for (const auto& bounds :
       std::vector<std::array<int64_t, 3>>{{0, 16, 40}, {0, 0, 9}, {0, 7, 7}, {0, 1, 2}}) {
    two.split(bounds.data(), out.data());
    std::vector<int> taken(static_cast<size_t>(bounds[2]), 0);
    for (int i = 0; i < 5; ++i) {
      const int n = alt[static_cast<size_t>(i)];
      for (int64_t w = out[2 * i]; w < out[2 * i + 1]; ++w) {
        ++taken[static_cast<size_t>(w)];
        EXPECT_TRUE(w >= bounds[n] && w < bounds[n + 1])
            << "share " << i << " (node " << n << ") got item " << w << " of node range ["
            << bounds[n] << ", " << bounds[n + 1] << ")";
      }
    }
    for (size_t w = 0; w < taken.size(); ++w) EXPECT_EQ(taken[w], 1) << "item " << w;
  }
  // Node 0's 3 shares split its 16 items evenly: 5, 5, 6.
  const std::array<int64_t, 3> b{0, 16, 40};
  two.split(b.data(), out.data());
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[1], 5);
  EXPECT_EQ(out[4], 5);
  EXPECT_EQ(out[5], 10);
  EXPECT_EQ(out[8], 10);
  EXPECT_EQ(out[9], 16);
  // A node with items but no share: the plain even split, so that no item is left out.
  NumaShares lopsided;
  const std::vector<int> all0{0, 0, 0};
  lopsided.set(all0.data(), 3, 2);
  lopsided.split(b.data(), out.data());
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[5], 40);
  // Expert ranges per node: contiguous, covering [0, E), consistent with expert_numa_node.
  for (int64_t E : {1, 7, 10, 256, 512})
    for (int nodes : {1, 2, 3, 4}) {
      EXPECT_EQ(first_expert_of_node(0, E, nodes), 0);
      EXPECT_EQ(first_expert_of_node(nodes, E, nodes), E);
      for (int64_t e = 0; e < E; ++e) {
        const int n = expert_numa_node(e, E, nodes);
        EXPECT_GE(e, first_expert_of_node(n, E, nodes)) << E << " " << nodes;
        EXPECT_LT(e, first_expert_of_node(n + 1, E, nodes)) << E << " " << nodes;
      }
    }
}

// Note [One token reads its own row]: one token reading its row in place computes what the K
// copies did, bit for bit; a token that names one expert twice (allowed by the op) keeps the
// copies and matches the reference.
TEST(MoeExperts, OneTokenOwnRowEqualsCopiesBitwise) {
  auto spin = make_spin_executor(3);
  for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT8, ExpertDType::kINT4}) {
    MoeProblem p(72, 40, 10, 3, 1, dt, 64, 404);
    for (bool repeat : {false, true}) {
      if (repeat) p.ids[2] = p.ids[0];  // expert ids[0] twice in the token's top-3
      for (int flow : {0, 1}) {
        std::vector<float> own(72, 0.5f), copies(own), ref(own);
        MoeExperts a(cpu_features().best), b(cpu_features().best);
        a.set_own_row(true);
        b.set_own_row(false);
        a.set_dataflow(flow != 0);
        b.set_dataflow(flow != 0);
        a.run(p.args(own.data()), *spin);
        b.run(p.args(copies.data()), *spin);
        EXPECT_EQ(own, copies) << expert_dtype_name(dt) << " repeat=" << repeat << " flow=" << flow;
        moe_experts_ref(p.args(ref.data()));
        EXPECT_LT(rel_l2(own, ref), 5e-5) << expert_dtype_name(dt) << " repeat=" << repeat;
      }
    }
  }
}

// An executor whose share `skip` throws instead of running, once, on the call after `arm()`: the
// other shares must take all of its items (its ranges were never set for that call).
class SkipsAShare final : public Executor {
 public:
  SkipsAShare(Executor& inner, int skip) : inner_(inner), skip_(skip) {}
  void arm() { armed_ = true; }
  int num_threads() const override { return inner_.num_threads(); }
  const char* name() const override { return "skips-a-share"; }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    inner_.parallel_for(n, grain, fn);
  }
  bool try_run_concurrent(int n, const std::function<void(int)>& fn) override {
    const bool skip = armed_;
    armed_ = false;
    return inner_.try_run_concurrent(n, [&](int i) {
      if (skip && i == skip_) throw std::runtime_error("share skipped");
      fn(i);
    });
  }

 private:
  Executor& inner_;
  int skip_;
  bool armed_ = false;
};

// Note [A call's setup leaves the workers' lines alone] and Note [Phase 2's first lines]: one op
// over a sequence of calls that changes the routing, the token count and the thread count
// between calls, holds a thread back, skips a share altogether, and meets an executor that
// declines the one-job form (TBB: the two phases run instead), gives every call the two-phase
// result bit for bit, with the caller's setup local or not and the prefetches on or off.
TEST(MoeExperts, HandOffCallSequencesAgreeBitwise) {
  auto two = make_spin_executor(2), five = make_spin_executor(5), three = make_spin_executor(3);
  LateFirstThread late(*three);
  SkipsAShare skips(*five, 1);
  auto tbb = make_tbb_executor(5);
  Executor* pools[] = {two.get(),  five.get(), &late,      &skips,
                       five.get(), tbb.get(),  five.get(), two.get()};
  for (auto dt : {ExpertDType::kINT8, ExpertDType::kINT4, ExpertDType::kBF16}) {
    std::vector<MoeProblem> probs;
    for (int64_t k = 0; k < 4; ++k)
      probs.emplace_back(200, 40, 10, 3, k == 2 ? 3 : 1, dt, 64, 900 + static_cast<uint32_t>(k));
    std::vector<std::vector<float>> want;
    for (const auto& p : probs) {
      want.emplace_back(static_cast<size_t>(p.m * 200), 0.5f);
      MoeExperts b(cpu_features().best);
      b.set_dataflow(false);
      b.run(p.args(want.back().data()), *two);
    }
    for (bool local : {true, false})
      for (bool ahead : {true, false}) {
        MoeExperts a(cpu_features().best);
        a.set_local_setup(local);
        a.set_down_ahead(ahead);
        a.set_row_ahead(ahead);  // Note [The token's row ahead]: prefetches only
        for (int call = 0; call < 24; ++call) {
          const size_t k = static_cast<size_t>(call % 4);
          Executor* pool = pools[call % 8];
          std::vector<float> got(want[k].size(), 0.5f);
          if (pool == &skips) {
            skips.arm();
            EXPECT_THROW(a.run(probs[k].args(got.data()), skips), std::runtime_error);
            continue;
          }
          a.run(probs[k].args(got.data()), *pool);
          ASSERT_EQ(a.last_dataflow(), pool != tbb.get());
          EXPECT_EQ(got, want[k]) << expert_dtype_name(dt) << " local=" << local
                                  << " ahead=" << ahead << " call " << call;
          // (At one token the others wait for share 0 anyway: it prepares the token's row.)
          if (pool == &late && probs[k].m > 1)
            EXPECT_GT(a.last_stolen(), 0) << "call " << call << ": the held-back share's items";
        }
      }
  }
}

// A range's call tag comes round every 65535 calls: a call whose tag equals that of the last call
// whose shares all ran (the calls in between declined) must not take that call's drained ranges
// as its own.
TEST(MoeExperts, HandOffRangeTagsComeRound) {
  auto five = make_spin_executor(5);
  MoeProblem p(200, 40, 10, 3, 1, ExpertDType::kINT4, 64, 77);
  std::vector<float> want(200, 0.5f);
  MoeExperts b(cpu_features().best);
  b.set_dataflow(false);
  b.run(p.args(want.data()), *five);
  for (int64_t skip : {int64_t{65534}, int64_t{2 * 65535 - 1}, int64_t{0}}) {
    MoeExperts a(cpu_features().best);
    std::vector<float> got(200, 0.5f);
    a.run(p.args(got.data()), *five);
    ASSERT_EQ(got, want);
    a.skip_calls(skip);  // the next call's tag: the first call's when skip + 1 is 65535·n
    std::fill(got.begin(), got.end(), 0.5f);
    a.run(p.args(got.data()), *five);
    ASSERT_TRUE(a.last_dataflow());
    EXPECT_EQ(got, want) << "after " << skip << " skipped calls";
  }
}

// An executor that says its shares run on NUMA nodes i % nodes (a two-socket machine as the op
// sees it), over a real spinning executor; optionally holds share 0 back so others steal.
class FakeNodes final : public Executor {
 public:
  FakeNodes(Executor& inner, int nodes, bool late_first)
      : inner_(inner), nodes_(nodes), late_(late_first) {}
  int num_threads() const override { return inner_.num_threads(); }
  const char* name() const override { return "fake-nodes"; }
  int numa_nodes() const override { return nodes_; }
  int node_of_share(int i) const override { return i % nodes_; }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    inner_.parallel_for(n, grain, fn);
  }
  bool try_run_concurrent(int n, const std::function<void(int)>& fn) override {
    return inner_.try_run_concurrent(n, [&](int i) {
      if (late_ && i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(30));
      fn(i);
    });
  }

 private:
  Executor& inner_;
  int nodes_;
  bool late_;
};

// The node-ordered hand-off (Note [NUMA expert placement]) does the same items with the same
// arithmetic: bit-identical to one node, also when a token's experts all sit on one node, and
// when a held-back thread's items are stolen across nodes.
TEST(MoeExperts, NumaOrderedHandOffIsBitwiseTheSame) {
  auto spin = make_spin_executor(5);
  for (int nodes : {2, 3}) {
    for (bool late : {false, true}) {
      FakeNodes fake(*spin, nodes, late);
      for (auto dt : {ExpertDType::kBF16, ExpertDType::kINT8, ExpertDType::kINT4}) {
        for (int64_t m : {1, 4, 16}) {
          for (int64_t unused : {0, 5}) {  // 5 of 10 unused: every expert on node 0 of 2
            MoeProblem p(72, 40, 10, 3, m, dt, 64, 300 + static_cast<uint32_t>(m), unused);
            std::vector<float> got(static_cast<size_t>(m * 72), 0.5f), want(got);
            MoeExperts a(cpu_features().best), b(cpu_features().best);
            auto args = p.args(got.data());
            args.numa_nodes = nodes;
            a.run(args, fake);
            b.run(p.args(want.data()), *spin);
            ASSERT_TRUE(a.last_dataflow());
            EXPECT_EQ(got, want) << expert_dtype_name(dt) << " m=" << m << " nodes=" << nodes
                                 << " late=" << late << " unused=" << unused;
            if (late && m == 1) EXPECT_GT(a.last_stolen(), 0);
            // The shares followed the nodes: with every routed expert on node 0 of 2 the shares
            // of node 1 (odd threads) own no items and node 0's own them all; one node never
            // steals across nodes.
            const auto& sh = a.last_share_items();
            ASSERT_EQ(sh.size(), size_t{4 * 5});
            for (int phase = 0; phase < 2; ++phase) {
              int64_t total = 0;
              for (int i = 0; i < 5; ++i) {
                const int64_t len = sh[phase * 10 + 2 * i + 1] - sh[phase * 10 + 2 * i];
                total += len;
                if (nodes == 2 && unused == 5 && i % 2 == 1) EXPECT_EQ(len, 0) << "share " << i;
              }
              EXPECT_GT(total, 0);
            }
            EXPECT_EQ(b.last_remote_stolen(), 0);
          }
        }
      }
    }
  }
}

TEST(MoeExperts, ApproximateVariantsAreOptIn) {
  MoeProblem p(64, 64, 2, 2, 40, ExpertDType::kBF16, 64, 3);
  std::vector<float> dst(static_cast<size_t>(40 * 64), 0.f);
  auto pool = make_tbb_executor(2);
  MoeExperts op(cpu_features().best);
  op.set_allow_approximate(false);
  op.run(p.args(dst.data()), *pool);
  EXPECT_EQ(op.last_variants().find("amx"), std::string::npos) << op.last_variants();
}

// AMX BF16 with bf16 activations: picked only at kBf16Activations, and within the bf16 rounding
// of the activations of the fp64 reference: each activation moves by at most 2^-8 of itself, so
// each dot product by at most 2^-8 Σ|w·x|, and with random signs the relative L2 error of the
// outputs stays below 2^-8 (3.9e-3).
TEST(MoeExperts, Bf16ActivationsVariantOnAmx) {
  if (!isa_available(Isa::kAmx))
    GTEST_SKIP() << "AMX not available on this CPU (" << cpu_features().brand
                 << "); runs on the GPU test machine";
  MoeProblem p(200, 130, 3, 2, 70, ExpertDType::kBF16, 64, 13);
  auto pool = make_tbb_executor(4);
  std::vector<float> want(static_cast<size_t>(70 * 200), 0.f);
  moe_experts_ref(p.args(want.data()));
  for (Approximation a : {Approximation::kSplit, Approximation::kBf16Activations}) {
    std::vector<float> got(want.size(), 0.f);
    MoeExperts op(Isa::kAmx);
    op.set_approximation(a);
    op.run(p.args(got.data()), *pool);
    const bool act = op.last_variants().find("amx_bf16_act") != std::string::npos;
    EXPECT_EQ(act, a == Approximation::kBf16Activations) << op.last_variants();
    EXPECT_LT(rel_l2(got, want), a == Approximation::kSplit ? 5e-5 : 3.9e-3) << op.last_variants();
  }
}

TEST(MoeExperts, RealShapeDecode) {
  // Qwen3.6-35B-A3B expert shape, 8 active experts of 16, one token.
  const int64_t H = 2048, I = 512;
  auto pool = make_tbb_executor(2);
  for (auto dt : {ExpertDType::kINT4, ExpertDType::kINT8}) {
    MoeProblem p(H, I, 16, 8, 1, dt, 32, 77);
    std::vector<float> got(static_cast<size_t>(H), 0.f), want(got);
    MoeExperts op(cpu_features().best);
    op.run(p.args(got.data()), *pool);
    moe_experts_ref(p.args(want.data()));
    EXPECT_LT(rel_l2(got, want), 2e-5) << expert_dtype_name(dt) << " " << op.last_variants();
    EXPECT_GT(test::norm2(want), 0.0);
  }
}

TEST(MoeExperts, NoAllocationOnceWarm) {
  // Decode-sized and prefill-sized calls through both threaded executors: after one call of each
  // size, further calls allocate nothing (no heap allocation per token).
  auto tbb = make_tbb_executor(3);
  auto spin = make_spin_executor(3);
  for (Executor* pool : {tbb.get(), spin.get()}) {
    for (int64_t m : {1, 40}) {
      MoeExperts op(cpu_features().best);
      MoeProblem p(128, 64, 8, 2, m, ExpertDType::kINT4, 64, 21);
      std::vector<float> dst(static_cast<size_t>(m * 128), 0.f);
      op.run(p.args(dst.data()), *pool);  // grows the workspace
      const long before = g_allocations.load();
      for (int i = 0; i < 3; ++i) op.run(p.args(dst.data()), *pool);
      EXPECT_EQ(g_allocations.load() - before, 0)
          << "m=" << m << " " << op.last_variants() << " dataflow=" << op.last_dataflow();
    }
  }
}

TEST(MoeExperts, RejectsBadExpertId) {
  MoeProblem p(32, 32, 4, 2, 2, ExpertDType::kINT8, 32, 1);
  p.ids[3] = 4;
  std::vector<float> dst(64, 0.f);
  MoeExperts op(Isa::kRef);
  SerialExecutor ex;
  EXPECT_THROW(op.run(p.args(dst.data()), ex), std::invalid_argument);
}

TEST(CpuFeatures, ResolveIsa) {
  const auto& f = cpu_features();
  EXPECT_EQ(resolve_isa("scalar"), Isa::kRef);
  EXPECT_EQ(resolve_isa(isa_name(f.best)), f.best);
  EXPECT_THROW(resolve_isa("sse9"), std::invalid_argument);
  if (f.best != Isa::kAmx) EXPECT_THROW(resolve_isa("amx"), std::invalid_argument);
}

}  // namespace
}  // namespace tidal::kernels::cpu
