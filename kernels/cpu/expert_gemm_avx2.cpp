// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_avx2.cpp
/// \brief AVX2 tile kernels: `vpmaddubsw` + `vpmaddwd` on INT8 (sign trick, no saturation) and
/// INT4 weights with per-group int8 activations; BF16 weights widened to fp32 (exact) against
/// fp32 activations. Compiled with AVX2/FMA/F16C only. Each 64-byte block is two 8-row halves.
///
/// Note [AVX2 weight stream]
/// Desktop CPUs without AVX-512 (Intel's consumer cores, AMD before Zen 4) run every routed
/// expert here, so decode speed on them is this file's weight stream. On the development
/// machine's AMD EPYC (Zen 3, 2 cores; sixteenth session, 35B-A3B shape, M = 1, µs per call):
///  - one core read INT4 from DRAM at 9.3 GB/s in a cold tile call against 32 GB/s hot: the
///    stream, not the arithmetic, held the op. A software prefetch 4 KiB ahead (into L2, as the
///    AVX-512 kernels do) took the op from 1110-1384 to 939-988 µs on one thread and from 626-660
///    to 504-561 on two; INT8 1850-1986 to 1721-1788 and 1038-1167 to 890-932 (2 and 8 KiB: within
///    the noise of 4, 0: clearly slower).
///  - the token's activations were quantised by the scalar loop (7.8-9.8 µs per call, serial
///    before the workers start) and phase 1's SiLU by std::exp (4096 per call): prepare_int8 and
///    silu_mul below (bit-identical / ~2 ulp, tested) cut the preparation to 0.8-1.0 µs and the
///    INT4 op on one thread to 823 µs.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu::avx2 {
namespace {

constexpr int64_t kRowBlock = 2;  // 2 tokens x 2 halves x (int32 + fp32) = 8 ymm accumulators

// Software prefetch distance ahead of the weight stream, in bytes (0: hardware prefetch only);
// TIDAL_EXPERT_PREFETCH overrides it, as for the AVX-512 kernels (Note [AVX2 weight stream]).
const int64_t kPrefetchBytes = [] {
  const char* e = std::getenv("TIDAL_EXPERT_PREFETCH");
  return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t{4096};
}();

inline void prefetch_line(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

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
  const int64_t G = l.group, pf = kPrefetchBytes;
  for (int64_t g = 0; g < l.num_groups; ++g) {
    const uint8_t* gb = tile + g * l.group_bytes;
    __m256i acc[MC][2];
    for (int i = 0; i < MC; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    auto dot = [&](int i, int h, __m256i w, int32_t x4) {
      const __m256i xb = _mm256_set1_epi32(x4);
      const __m256i ws = _mm256_xor_si256(w, flip);  // q + 128 -> q (s8, never -128)
      const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xb, ws));
      acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(p, ones));
    };
    if constexpr (kInt4) {
      // Note [AVX2 INT4 sums in 16 bits]: a `vpmaddubsw` lane of u4 x s8 is at most 2·15·127 =
      // 3810 in magnitude, so a block's low and high nibble lanes add to at most 7620 in int16,
      // and at one token 4 blocks' to at most 30480: one `vpmaddwd` widening per 4 blocks instead
      // of one per product. Exact integer sums: the results do not change. At two tokens the
      // 4-block sums need 4 more of the 16 ymm registers and the block spilled (Zen 3, one core,
      // hot tile calls: m = 1 0.45-0.51 µs against 0.54-0.70; m = 4 1.95-2.01 against 1.69-2.10),
      // so there each block's sum is widened at once.
      for (int64_t j0 = 0; j0 < G / 8; j0 += 4) {                           // G / 8: 4, 8 or 16
        __m256i s16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // MC == 1
        for (int64_t j = j0; j < j0 + 4; ++j) {
          if (pf) prefetch_line(gb + 64 * j + pf);
          for (int h = 0; h < 2; ++h) {
            const __m256i raw =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * j + 32 * h));
            const __m256i lo = _mm256_and_si256(raw, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
            for (int i = 0; i < MC; ++i) {
              const int8_t* xq = a.q + i * a.ld + g * G + 8 * j;
              const __m256i p =
                  _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xq))),
                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xq + 4))));
              if constexpr (MC == 1)
                s16[h] = _mm256_add_epi16(s16[h], p);
              else
                acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(p, ones));
            }
          }
        }
        if constexpr (MC == 1)
          for (int h = 0; h < 2; ++h)
            acc[0][h] = _mm256_add_epi32(acc[0][h], _mm256_madd_epi16(s16[h], ones));
      }
    } else {
      for (int64_t j = 0; j < G / 4; ++j) {
        if (pf) prefetch_line(gb + 64 * j + pf);
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
  // Note [AVX2 BF16 chains]: the even and odd columns' products go to separate accumulators, so
  // that each FMA waits on one of its own chain's, not on the pair's (one chain per half and token
  // held one core to ~25 GB/s of hot BF16 tiles on Zen 3: 8 cycles of FMA latency per 64 bytes).
  // The two are added at the end: fp32 reassociation only (Approximation::kExact). Sixteenth
  // session, one pinned core, hot tile calls (4 alternations): m = 1 1.35-1.54 µs against
  // 2.56-2.75, m = 2 1.57-1.72 against 2.62-3.45, m = 3 2.9-4.1 against 5.1-5.6. The one-token op
  // streams from DRAM and stayed within this host's noise (1 thread 3124-3848 µs against
  // 2869-3240; 2 threads 1797-1830 against 1875-1934).
  __m256 acc[MC][2][2];
  for (int i = 0; i < MC; ++i)
    for (int h = 0; h < 2; ++h) acc[i][h][0] = acc[i][h][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t pf = kPrefetchBytes;
  for (int64_t p = 0; p < l.k_pad / 2; ++p) {
    if (pf) prefetch_line(tile + 64 * p + pf);
    for (int h = 0; h < 2; ++h) {
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * p + 32 * h));
      // Lane r holds (W[r][2p], W[r][2p+1]) as bf16: widen each half to fp32 exactly.
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int i = 0; i < MC; ++i) {
        const float* x = a.f32 + i * a.ld + 2 * p;
        acc[i][h][0] = _mm256_fmadd_ps(w0, _mm256_set1_ps(x[0]), acc[i][h][0]);
        acc[i][h][1] = _mm256_fmadd_ps(w1, _mm256_set1_ps(x[1]), acc[i][h][1]);
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(dst + i * kTileRows + 8 * h, _mm256_add_ps(acc[i][h][0], acc[i][h][1]));
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

namespace {

// e^x, ~2 ulp, for the SiLU of phase 1 (the AVX-512 kernel's polynomial: 2^(x log2 e), integer
// part into the exponent, the fraction by a degree-6 Taylor polynomial on [-0.5, 0.5]). x log2 e
// is clamped to [-126, 128] before it is split, so that the fraction stays in range: below, e^x is
// 2^-126 instead of smaller (SiLU's 1 + e^x is 1 either way); at 128 the exponent field is 255,
// i.e. inf, as e^x is there. NaN stays NaN through SiLU's x / (1 + e^-x).
inline __m256 exp_ps(__m256 x) {
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-126.f)), _mm256_set1_ps(128.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes [0, n) of 8 (n may be <= 0 or >= 8).
inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), idx);
}

// Lanes [0, n) from p, the rest zero; nothing is read for n <= 0 (AMD documents faults of
// zero-masked lanes as implementation dependent).
inline __m256 load_upto(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  if (n <= 0) return _mm256_setzero_ps();
  return _mm256_maskload_ps(p, lane_mask(n));
}

}  // namespace

void silu_mul(const float* g, const float* u, float* h, int64_t n) {
  auto one = [](__m256 x, __m256 up) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x));
    return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)), up);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(h + i, one(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    const __m256i k = lane_mask(n - i);
    _mm256_maskstore_ps(h + i, k, one(_mm256_maskload_ps(g + i, k), _mm256_maskload_ps(u + i, k)));
  }
}

// The scalar preparation's operations (ActBuffer::prepare, kInt8Groups) eight lanes at a time:
// max |x| per group (with std::max's order, so that a NaN does not replace the running maximum),
// q = round-to-nearest-even(x · (127 / max)) clamped to ±127, Σ q. Bit-identical (tested).
void prepare_int8(const float* x, int64_t k, int64_t group, int64_t num_groups, int8_t* q,
                  float* scale, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t c0 = g * group;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t c = c0; c < c0 + group; c += 8)
      amax = _mm256_max_ps(_mm256_and_ps(load_upto(x + c, k - c), abs_mask), amax);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float am = 0.f;
    for (float v : lanes) am = std::max(am, v);
    const float inv = act_inverse_scale(am);
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t c = c0; c < c0 + group; c += 32) {  // group: 32, 64 or 128
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        // cvtps_epi32 rounds to nearest even, as std::nearbyint; |x·inv| <= 127 (+ rounding).
        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load_upto(x + c + 8 * i, k - c - 8 * i), vinv));
        v[i] = _mm256_max_epi32(_mm256_min_epi32(v[i], hi), lo);
        acc = _mm256_add_epi32(acc, v[i]);
      }
      // packs: dwords [v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, ...]; then into token order.
      const __m256i b =
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm256_permutevar8x32_epi32(b, order));
    }
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m128i s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1)));
    scale[g] = am / 127.f;
    sum[g] = _mm_cvtsi128_si32(s1);
  }
}

}  // namespace tidal::kernels::cpu::avx2
