// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_avx2.cpp
/// \brief AVX2 tile kernels: `vpmaddubsw` + `vpmaddwd` on INT8 (sign trick, no saturation) and
/// INT4 weights with per-group int8 activations; BF16 weights widened to fp32 (exact) against
/// fp32 activations. Compiled with AVX2/FMA/F16C only. Each 64-byte block is two 8-row halves.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu::avx2 {
namespace {

constexpr int64_t kRowBlock = 2;  // 2 tokens x 2 halves x (int32 + fp32) = 8 ymm accumulators

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int MC, bool kInt4>
void int_block(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  __m256 accf[MC][2];
  for (int i = 0; i < MC; ++i) accf[i][0] = accf[i][1] = _mm256_setzero_ps();
  const auto* scales = reinterpret_cast<const uint16_t*>(tile + l.data_bytes);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int64_t G = l.group;
  for (int64_t g = 0; g < l.num_groups; ++g) {
    const uint8_t* gb = tile + g * l.group_bytes;
    __m256i acc[MC][2];
    for (int i = 0; i < MC; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    auto dot = [&](int i, int h, __m256i w, int32_t x4) {
      const __m256i xb = _mm256_set1_epi32(x4);
      __m256i p;
      if constexpr (kInt4) {
        p = _mm256_maddubs_epi16(w, xb);  // u4 x s8: |pair sum| <= 2*15*127, no saturation
      } else {
        const __m256i ws = _mm256_xor_si256(w, flip);  // q + 128 -> q (s8, never -128)
        p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xb, ws));
      }
      acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(p, ones));
    };
    if constexpr (kInt4) {
      for (int64_t j = 0; j < G / 8; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m256i raw =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * j + 32 * h));
          const __m256i lo = _mm256_and_si256(raw, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
          for (int i = 0; i < MC; ++i) {
            const int8_t* xq = a.q + i * a.ld + g * G + 8 * j;
            dot(i, h, lo, load_i32(xq));
            dot(i, h, hi, load_i32(xq + 4));
          }
        }
      }
    } else {
      for (int64_t j = 0; j < G / 4; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m256i w =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * j + 32 * h));
          for (int i = 0; i < MC; ++i) dot(i, h, w, load_i32(a.q + i * a.ld + g * G + 4 * j));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 ws = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * kTileRows + 8 * h)));
      for (int i = 0; i < MC; ++i) {
        const int64_t gi = i * a.ld_group + g;
        __m256i s = acc[i][h];
        if constexpr (kInt4) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * a.q_sum[gi]));
        accf[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),
                                     _mm256_mul_ps(ws, _mm256_set1_ps(a.q_scale[gi])), accf[i][h]);
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(dst + i * kTileRows + 8 * h, accf[i][h]);
}

template <int MC>
void bf16_block(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  __m256 acc[MC][2];
  for (int i = 0; i < MC; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < l.k_pad / 2; ++p) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * p + 32 * h));
      // Lane r holds (W[r][2p], W[r][2p+1]) as bf16: widen each half to fp32 exactly.
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int i = 0; i < MC; ++i) {
        const float* x = a.f32 + i * a.ld + 2 * p;
        acc[i][h] = _mm256_fmadd_ps(w0, _mm256_set1_ps(x[0]), acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(w1, _mm256_set1_ps(x[1]), acc[i][h]);
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(dst + i * kTileRows + 8 * h, acc[i][h]);
}

template <class Fn2, class Fn1>
void run_blocks(const ActRows& a, int64_t m, float* dst, Fn2 two, Fn1 one) {
  for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
    const ActRows ai = a.shifted(i0);
    if (m - i0 >= 2)
      two(ai, dst + i0 * kTileRows);
    else
      one(ai, dst + i0 * kTileRows);
  }
}

}  // namespace

void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks(
      a, m, dst, [&](const ActRows& ai, float* d) { bf16_block<2>(l, tile, ai, d); },
      [&](const ActRows& ai, float* d) { bf16_block<1>(l, tile, ai, d); });
}
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks(
      a, m, dst, [&](const ActRows& ai, float* d) { int_block<2, false>(l, tile, ai, d); },
      [&](const ActRows& ai, float* d) { int_block<1, false>(l, tile, ai, d); });
}
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks(
      a, m, dst, [&](const ActRows& ai, float* d) { int_block<2, true>(l, tile, ai, d); },
      [&](const ActRows& ai, float* d) { int_block<1, true>(l, tile, ai, d); });
}

}  // namespace tidal::kernels::cpu::avx2
