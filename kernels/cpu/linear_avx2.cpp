// SPDX-License-Identifier: Apache-2.0
/// \file linear_avx2.cpp
/// \brief linear()'s AVX2 + FMA rows (compiled with the AVX2 flags only; Note [CPU linear]).
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/linear_detail.h"

namespace tidal::kernels::cpu::detail {
namespace {

// This file is built with the AVX2 flags: it calls no inline function or template of a shared
// header (bf16_to_f32, std::min, std::fma), whose one merged copy the linker could take from here
// for baseline code too. Local copies and the C library's fmaf instead.
inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline float widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 BF16 values widened to fp32 (a 16-bit shift)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float value(const float* p) { return *p; }
inline float value(const uint16_t* p) { return widen(*p); }

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/// R weight rows (row stride ldw) times M activation rows (stride ldx) over kl values: the R·M
/// dot products into out[r][t]. Eight lanes per accumulator, the tail scalar.
template <int R, int M, typename W>
inline void tile(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t kl,
                 float (&out)[4][2]) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= kl; p += 8) {
    __m256 xv[M];
    for (int t = 0; t < M; ++t) xv[t] = load8(x + t * ldx + p);
    for (int r = 0; r < R; ++r) {
      __m256 wv = load8(w + r * ldw + p);
      // Keep wv in a register: folded into each FMA as a memory operand it is loaded M times,
      // and the loads, not the FMAs, would bound the tile.
      if constexpr (M > 1) asm("" : "+x"(wv));
      for (int t = 0; t < M; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t q = p; q < kl; ++q) s = fmaf(value(w + r * ldw + q), x[t * ldx + q], s);
      out[r][t] = s;
    }
}

/// One tile of up to 4 rows and up to 2 tokens, dispatched to the fixed-size templates.
template <typename W>
inline void tile_any(int nr, int nt, const W* w, int64_t ldw, const float* x, int64_t ldx,
                     int64_t kl, float (&out)[4][2]) {
  switch (nr * 2 + nt) {
    case 4 * 2 + 2:
      return tile<4, 2>(w, ldw, x, ldx, kl, out);
    case 4 * 2 + 1:
      return tile<4, 1>(w, ldw, x, ldx, kl, out);
    case 3 * 2 + 2:
      return tile<3, 2>(w, ldw, x, ldx, kl, out);
    case 3 * 2 + 1:
      return tile<3, 1>(w, ldw, x, ldx, kl, out);
    case 2 * 2 + 2:
      return tile<2, 2>(w, ldw, x, ldx, kl, out);
    case 2 * 2 + 1:
      return tile<2, 1>(w, ldw, x, ldx, kl, out);
    case 1 * 2 + 2:
      return tile<1, 2>(w, ldw, x, ldx, kl, out);
    default:
      return tile<1, 1>(w, ldw, x, ldx, kl, out);
  }
}

/// Adds (or, for the first k block without `accumulate`, stores) a tile's sums into dst.
inline void store(const LinearArgs& a, int64_t j, int64_t i, int nr, int nt, bool first,
                  const float (&s)[4][2]) {
  for (int t = 0; t < nt; ++t)
    for (int r = 0; r < nr; ++r) {
      float& d = a.dst[(i + t) * a.ld_dst + j + r];
      d = first && !a.accumulate ? s[r][t] : d + s[r][t];
    }
}

/// Rows [j0, j1) of weights W over the k block [kb, kb + kl): the block's rows at wb (row stride
/// ldw), tokens in blocks of kLinearTokenBlock (their activations stay in L2), each row quad's
/// slab (4 × kl floats, L1) passed over by every token pair of the block.
template <typename W>
void rows_blocked(const LinearArgs& a, int64_t j0, int64_t j1, int64_t kb, int64_t kl, const W* wb,
                  int64_t ldw) {
  const bool first = kb == 0;
  for (int64_t i0 = 0; i0 < a.m; i0 += kLinearTokenBlock) {
    const int64_t i1 = lmin(a.m, i0 + kLinearTokenBlock);
    for (int64_t j = j0; j < j1; j += 4) {
      const int nr = static_cast<int>(lmin(4, j1 - j));
      for (int64_t i = i0; i < i1; i += 2) {
        const int nt = static_cast<int>(lmin(2, i1 - i));
        float s[4][2];
        tile_any(nr, nt, wb + (j - j0) * ldw, ldw, a.src + i * a.ld_src + kb, a.ld_src, kl, s);
        store(a, j, i, nr, nt, first, s);
      }
    }
  }
}

}  // namespace

void linear_rows_avx2(const LinearArgs& a, int64_t j0, int64_t j1, float* scratch) {
  const int64_t k = a.wei.cols;
  const bool bf16 = a.wei.dtype == DType::kBF16;
  if (a.m <= kLinearDirectTokens || k == 0) {  // (k = 0: every sum is 0; no k block would store)
    // Decode: weights streamed once from memory, widened in registers; a row quad's weights
    // (16 KiB at k = 2048) stay in cache for the later token pairs. Summed per k block and added
    // into dst block by block exactly as the k-blocked path below does, so a token's outputs do
    // not depend on how many tokens share the call (batch invariance; the test checks it).
    for (int64_t j = j0; j < j1; j += 4) {
      const int nr = static_cast<int>(lmin(4, j1 - j));
      for (int64_t i = 0; i < a.m; i += 2) {
        const int nt = static_cast<int>(lmin(2, a.m - i));
        int64_t kb = 0;
        do {
          const int64_t kl = lmin(kLinearKBlock, k - kb);
          float s[4][2];
          if (bf16)
            tile_any(nr, nt, static_cast<const uint16_t*>(a.wei.data) + j * k + kb, k,
                     a.src + i * a.ld_src + kb, a.ld_src, kl, s);
          else
            tile_any(nr, nt, static_cast<const float*>(a.wei.data) + j * k + kb, k,
                     a.src + i * a.ld_src + kb, a.ld_src, kl, s);
          store(a, j, i, nr, nt, kb == 0, s);
          kb += kl;
        } while (kb < k);
      }
    }
    return;
  }
  // Prefill: per k block, the rows' weights (widened once into `scratch` for BF16) stay in L1
  // while every token pair passes over them.
  for (int64_t kb = 0; kb < k; kb += kLinearKBlock) {
    const int64_t kl = lmin(kLinearKBlock, k - kb);
    if (bf16) {
      const auto* w = static_cast<const uint16_t*>(a.wei.data);
      for (int64_t j = j0; j < j1; ++j) {
        const uint16_t* src = w + j * k + kb;
        float* dst = scratch + (j - j0) * kLinearKBlock;
        int64_t p = 0;
        for (; p + 8 <= kl; p += 8) _mm256_storeu_ps(dst + p, load8(src + p));
        for (; p < kl; ++p) dst[p] = widen(src[p]);
      }
      rows_blocked(a, j0, j1, kb, kl, static_cast<const float*>(scratch), kLinearKBlock);
    } else {
      rows_blocked(a, j0, j1, kb, kl, static_cast<const float*>(a.wei.data) + j0 * k + kb, k);
    }
  }
}

}  // namespace tidal::kernels::cpu::detail
