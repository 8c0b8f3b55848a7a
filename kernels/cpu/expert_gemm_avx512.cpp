// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_avx512.cpp
/// \brief AVX-512 tile kernels for decode-sized token counts: `vpdpbusd` (VNNI) on INT8/INT4
/// weights with per-group int8 activations; BF16 weights widened to fp32 against fp32
/// activations. Compiled with AVX-512 F/BW/VL/DQ/VNNI/BF16 only.
///
/// Note [Why not vdpbf16ps at decode]
/// Decode (M = 1..16) is bound by reading the weights, not by arithmetic, so BF16 weights gain
/// nothing from `vdpbf16ps` there, and it would need bf16 activations. We tried keeping fp32
/// accuracy by splitting x into bf16 hi + lo (two `vdpbf16ps`): on the development machine's
/// AMD EPYC (Zen 4) the 8-layer qwen3_next golden logits then moved 1.1e-3 from the scalar path,
/// against 5e-5 for fp32 FMAs, and chunked-vs-one-shot prefill broke its 5e-4 bound. bf16 dot
/// products belong to the prefill path (AMX `tdpbf16ps`), where bf16 activations are the norm.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu::avx512 {
namespace {

// Token rows per register block: MC int32 + MC fp32 accumulators stay in zmm registers.
constexpr int64_t kRowBlock = 4;

// Software prefetch distance in bytes ahead of the weight stream (0: hardware prefetch only);
// TIDAL_EXPERT_PREFETCH overrides it (benchmark knob). On the GPU machine's Xeon, 4 KiB into L2
// read int4/int8 decode at 52-60% / 71-74% of the bandwidth against 43-48% / 62-64% at 1 KiB into
// L1 in the same run (docs/results/cpu-experts-2026-11-23/decode_prefetch.jsonl).
// Prefetch into L2 (prefetcht1) by default; TIDAL_EXPERT_PREFETCH_L2=0 prefetches into L1.
const bool kPrefetchL2 = [] {
  const char* e = std::getenv("TIDAL_EXPERT_PREFETCH_L2");
  return e == nullptr || e[0] != '0';
}();

inline void prefetch_line(const uint8_t* p) {
  if (kPrefetchL2)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  else
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

const int64_t kPrefetchBytes = [] {
  const char* e = std::getenv("TIDAL_EXPERT_PREFETCH");
  return e ? std::atoll(e) : int64_t{4096};
}();

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Four independent int32 accumulator chains per token (INT4: low/high nibble quads of even and
// odd 64-byte blocks; INT8: four consecutive blocks): a group's 8-32 `vpdpbusd` per chain would
// otherwise wait on each other's 5-cycle latency (two chains held one core to ~38 GB/s of int4
// from L2, too close to the ~13 GB/s a core must stream when 16 share the memory bus). Integer
// sums are exact, so the chains change nothing in the result. The group size is a template
// argument so the block loop is fully unrolled.
// One group's int32 sums of MC tokens folded into their fp32 accumulators: the unsigned weight
// offset undone, then times the weight scales of the 16 rows and the token's activation scale.
template <int MC, bool kInt4>
inline __attribute__((always_inline)) void fold_group(__m512i (&acc)[4][MC], const uint16_t* scales,
                                                      int64_t g, const ActRows& a,
                                                      __m512 (&accf)[MC]) {
  constexpr int32_t kOffset = kInt4 ? 8 : 128;
  const __m512 ws =
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kTileRows)));
  for (int i = 0; i < MC; ++i) {
    const int64_t gi = i * a.ld_group + g;
    // Undo the unsigned weight offset: Σ (q_w + off) q_x - off Σ q_x, exact in int32.
    const __m512i corr = _mm512_set1_epi32(kOffset * a.q_sum[gi]);
    __m512i sum;
    if constexpr (kInt4) {
      const __m512i lo_sum = _mm512_add_epi32(acc[0][i], acc[2][i]);
      const __m512i hi_sum = _mm512_srai_epi32(_mm512_add_epi32(acc[1][i], acc[3][i]), 4);
      sum = _mm512_add_epi32(lo_sum, hi_sum);
    } else {
      sum = _mm512_add_epi32(_mm512_add_epi32(acc[0][i], acc[1][i]),
                             _mm512_add_epi32(acc[2][i], acc[3][i]));
    }
    sum = _mm512_sub_epi32(sum, corr);
    accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                              _mm512_mul_ps(ws, _mm512_set1_ps(a.q_scale[gi])), accf[i]);
  }
}

template <int MC, bool kInt4, int G>
void int_block(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  __m512 accf[MC];
  for (int i = 0; i < MC; ++i) accf[i] = _mm512_setzero_ps();
  const auto* scales = reinterpret_cast<const uint16_t*>(tile + l.data_bytes);
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i high_nibble = _mm512_set1_epi8(static_cast<char>(0xf0));
  constexpr int64_t kGroupBytes = kInt4 ? G * 8 : G * 16;
  const int64_t pf = kPrefetchBytes;
  for (int64_t g = 0; g < l.num_groups; ++g) {
    const uint8_t* gb = tile + g * kGroupBytes;
    __m512i acc[4][MC];
    const int8_t* xq[MC];
    for (int i = 0; i < MC; ++i) {
      for (int c = 0; c < 4; ++c) acc[c][i] = _mm512_setzero_si512();
      xq[i] = a.q + i * a.ld + g * G;
    }
    if constexpr (kInt4) {
      // Chains 0/1: low/high nibbles of even blocks; 2/3: of odd blocks.
#pragma GCC unroll 16
      for (int j = 0; j < G / 8; ++j) {
        if (pf) prefetch_line(gb + 64 * j + pf);
        const __m512i raw = _mm512_loadu_si512(gb + 64 * j);
        const __m512i lo = _mm512_and_si512(raw, nibble);
        // High nibbles in place (16·q): their chains sum 16x, undone by an exact shift below.
        const __m512i hi = _mm512_and_si512(raw, high_nibble);
        const int c = 2 * (j % 2);
        for (int i = 0; i < MC; ++i) {
          acc[c][i] =
              _mm512_dpbusd_epi32(acc[c][i], lo, _mm512_set1_epi32(load_i32(xq[i] + 8 * j)));
          acc[c + 1][i] = _mm512_dpbusd_epi32(acc[c + 1][i], hi,
                                              _mm512_set1_epi32(load_i32(xq[i] + 8 * j + 4)));
        }
      }
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < G / 4; j += 4) {
        for (int c = 0; c < 4; ++c)
          if (pf) prefetch_line(gb + 64 * (j + c) + pf);
        for (int c = 0; c < 4; ++c) {
          const __m512i w = _mm512_loadu_si512(gb + 64 * (j + c));
          for (int i = 0; i < MC; ++i)
            acc[c][i] =
                _mm512_dpbusd_epi32(acc[c][i], w, _mm512_set1_epi32(load_i32(xq[i] + 4 * (j + c))));
        }
      }
    }
    fold_group<MC, kInt4>(acc, scales, g, a, accf);
  }
  for (int i = 0; i < MC; ++i) _mm512_storeu_ps(dst + i * kTileRows, accf[i]);
}

// Note [Two tiles per pass at decode]
// A one-token call's down tiles are 4.25 KiB (K = 512, INT4): the tile loop's fixed costs (its
// setup, the store, the call and its dispatch) come 4x as often per byte as on the gate/up tiles
// (K = 2048), and the fourteenth session's trace read phase 2 at ~0.81 of the bandwidth against
// ~0.88 for phase 1. The pair entry point (run_pair: the gate and up tiles of one item, or two
// neighbouring down tiles) runs both tiles in one pass at one token: one activation broadcast
// feeds both tiles' `vpdpbusd`, eight independent accumulator chains, and two weight streams in
// flight. Each tile's group epilogue is fold_group, as in int_block, so the results are those of
// two single passes bit for bit (tested). Prefetch: each stream kPrefetchBytes ahead, except for
// neighbouring tiles (a down pair), where both streams ask for the next pair at their offset.
// TIDAL_EXPERT_VNNI_PAIR=0 runs the two tiles one after the other (for comparison). On the
// fifteenth session's one noisy host (2 processes each) the op did not separate from the two
// passes beyond the noise (INT4 against the larger probe 0.713 / 0.772 with, 0.737 / 0.753
// without; INT8 0.857 / 0.827 against 0.815 / 0.832); kept on for the reason above.
template <bool kInt4, int G>
void int_block2(const PackedLayout& l, const uint8_t* ta, const uint8_t* tb, const ActRows& a,
                float* da, float* db) {
  __m512 fa[1] = {_mm512_setzero_ps()}, fb[1] = {_mm512_setzero_ps()};
  const auto* sa = reinterpret_cast<const uint16_t*>(ta + l.data_bytes);
  const auto* sb = reinterpret_cast<const uint16_t*>(tb + l.data_bytes);
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i high_nibble = _mm512_set1_epi8(static_cast<char>(0xf0));
  constexpr int64_t kGroupBytes = kInt4 ? G * 8 : G * 16;
  const int64_t pf = kPrefetchBytes == 0       ? 0
                     : tb == ta + l.tile_bytes ? 2 * l.tile_bytes
                                               : kPrefetchBytes;
  for (int64_t g = 0; g < l.num_groups; ++g) {
    const uint8_t* ga = ta + g * kGroupBytes;
    const uint8_t* gb = tb + g * kGroupBytes;
    __m512i acc[4][1], accb[4][1];
    for (int c = 0; c < 4; ++c) acc[c][0] = accb[c][0] = _mm512_setzero_si512();
    const int8_t* xq = a.q + g * G;
    if constexpr (kInt4) {
#pragma GCC unroll 16
      for (int j = 0; j < G / 8; ++j) {
        if (pf) {
          prefetch_line(ga + 64 * j + pf);
          prefetch_line(gb + 64 * j + pf);
        }
        const __m512i ra = _mm512_loadu_si512(ga + 64 * j);
        const __m512i rb = _mm512_loadu_si512(gb + 64 * j);
        const __m512i xl = _mm512_set1_epi32(load_i32(xq + 8 * j));
        const __m512i xh = _mm512_set1_epi32(load_i32(xq + 8 * j + 4));
        const int c = 2 * (j % 2);
        acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], _mm512_and_si512(ra, nibble), xl);
        acc[c + 1][0] = _mm512_dpbusd_epi32(acc[c + 1][0], _mm512_and_si512(ra, high_nibble), xh);
        accb[c][0] = _mm512_dpbusd_epi32(accb[c][0], _mm512_and_si512(rb, nibble), xl);
        accb[c + 1][0] = _mm512_dpbusd_epi32(accb[c + 1][0], _mm512_and_si512(rb, high_nibble), xh);
      }
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < G / 4; j += 4) {
        if (pf)
          for (int c = 0; c < 4; ++c) {
            prefetch_line(ga + 64 * (j + c) + pf);
            prefetch_line(gb + 64 * (j + c) + pf);
          }
        for (int c = 0; c < 4; ++c) {
          const __m512i x = _mm512_set1_epi32(load_i32(xq + 4 * (j + c)));
          acc[c][0] = _mm512_dpbusd_epi32(acc[c][0], _mm512_loadu_si512(ga + 64 * (j + c)), x);
          accb[c][0] = _mm512_dpbusd_epi32(accb[c][0], _mm512_loadu_si512(gb + 64 * (j + c)), x);
        }
      }
    }
    fold_group<1, kInt4>(acc, sa, g, a, fa);
    fold_group<1, kInt4>(accb, sb, g, a, fb);
  }
  _mm512_storeu_ps(da, fa[0]);
  _mm512_storeu_ps(db, fb[0]);
}

const bool kVnniPair = [] {
  const char* e = std::getenv("TIDAL_EXPERT_VNNI_PAIR");
  return e == nullptr || e[0] != '0';
}();

template <int MC, bool kInt4>
void int_block_any(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  switch (l.group) {
    case 32:
      int_block<MC, kInt4, 32>(l, tile, a, dst);
      break;
    case 64:
      int_block<MC, kInt4, 64>(l, tile, a, dst);
      break;
    default:
      int_block<MC, kInt4, 128>(l, tile, a, dst);
      break;
  }
}

// BF16 weights against fp32 activations: each 32-bit lane holds (W[r][2p], W[r][2p+1]); widening a
// bf16 to fp32 is a shift (low half) or a mask (high half), so the products and sums are plain
// fp32 FMAs, as accurate as the scalar path. See Note [Why not vdpbf16ps at decode].
template <int MC>
void bf16_block(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  // Four accumulators per token (two blocks x even/odd column) keep four independent FMA chains.
  __m512 acc[MC][4];
  for (int i = 0; i < MC; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t pairs = l.k_pad / 2;  // even: k_pad is a multiple of 32
  const int64_t pf = kPrefetchBytes;
  for (int64_t p = 0; p < pairs; p += 2) {
    if (pf) prefetch_line(tile + 64 * p + pf);
    if (pf) prefetch_line(tile + 64 * p + 64 + pf);
    for (int b = 0; b < 2; ++b) {
      const __m512i v = _mm512_loadu_si512(tile + 64 * (p + b));
      const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      for (int i = 0; i < MC; ++i) {
        const float* x = a.f32 + i * a.ld + 2 * (p + b);
        acc[i][2 * b] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[0]), acc[i][2 * b]);
        acc[i][2 * b + 1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[1]), acc[i][2 * b + 1]);
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    _mm512_storeu_ps(dst + i * kTileRows, _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]),
                                                        _mm512_add_ps(acc[i][2], acc[i][3])));
}

template <template <int> class Block>
void run_blocks(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
                float* dst) {
  for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
    const ActRows ai = a.shifted(i0);
    float* d = dst + i0 * kTileRows;
    switch (std::min<int64_t>(kRowBlock, m - i0)) {
      case 4:
        Block<4>::run(l, tile, ai, d);
        break;
      case 3:
        Block<3>::run(l, tile, ai, d);
        break;
      case 2:
        Block<2>::run(l, tile, ai, d);
        break;
      default:
        Block<1>::run(l, tile, ai, d);
        break;
    }
  }
}

template <int MC>
struct Int8Block {
  static void run(const PackedLayout& l, const uint8_t* t, const ActRows& a, float* d) {
    int_block_any<MC, false>(l, t, a, d);
  }
};
template <int MC>
struct Int4Block {
  static void run(const PackedLayout& l, const uint8_t* t, const ActRows& a, float* d) {
    int_block_any<MC, true>(l, t, a, d);
  }
};
template <int MC>
struct Bf16Block {
  static void run(const PackedLayout& l, const uint8_t* t, const ActRows& a, float* d) {
    bf16_block<MC>(l, t, a, d);
  }
};

}  // namespace

void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks<Bf16Block>(l, tile, a, m, dst);
}
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks<Int8Block>(l, tile, a, m, dst);
}
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run_blocks<Int4Block>(l, tile, a, m, dst);
}

namespace {
template <bool kInt4>
void tile2_int(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
               int64_t m, float* d0, float* d1) {
  if (m != 1 || !kVnniPair) {  // Note [Two tiles per pass at decode]: one token only
    const TileKernelFn one = kInt4 ? tile_int4 : tile_int8;
    one(l, t0, a, m, d0);
    one(l, t1, a, m, d1);
    return;
  }
  switch (l.group) {
    case 32:
      int_block2<kInt4, 32>(l, t0, t1, a, d0, d1);
      break;
    case 64:
      int_block2<kInt4, 64>(l, t0, t1, a, d0, d1);
      break;
    default:
      int_block2<kInt4, 128>(l, t0, t1, a, d0, d1);
      break;
  }
}
}  // namespace

void tile2_int8(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  tile2_int<false>(l, t0, t1, a, m, d0, d1);
}
void tile2_int4(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  tile2_int<true>(l, t0, t1, a, m, d0, d1);
}

namespace {

// e^x for x <= 88 (larger gives inf), ~2 ulp: 2^(x log2 e) with the integer part through scalef
// and the fraction by a degree-6 minimax-style Taylor polynomial on [-0.5, 0.5]. x log2 e is
// clamped to ±160 first (2^±160 is already inf / 0 in fp32), so that x = ±inf gives inf / 0, not
// inf - inf = NaN in the fraction.
inline __m512 exp_ps(__m512 x) {
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-160.f)), _mm512_set1_ps(160.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

void silu_mul(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_mask_storeu_ps(h + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
  }
}

void prepare_bf16(const float* x, int64_t k, int64_t k_pad, uint16_t* dst, uint16_t* lo) {
  for (int64_t c = 0; c < k_pad; c += 16) {
    const __mmask16 m = k - c >= 16 ? __mmask16(0xffff)
                        : k > c     ? __mmask16((1u << (k - c)) - 1)
                                    : 0;
    const __m512 v = _mm512_maskz_loadu_ps(m, x + c);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), h);
    if (lo == nullptr) continue;  // ActKind::kBf16: hi only
    // x - float(hi), exactly representable in fp32, then rounded to bf16 like the scalar path.
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + c),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
  }
}

void prepare_int8(const float* x, int64_t k, int64_t group, int64_t num_groups, int8_t* q,
                  float* scale, int32_t* sum) {
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t c0 = g * group;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t c = c0; c < c0 + group; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff)
                          : k > c     ? __mmask16((1u << (k - c)) - 1)
                                      : 0;
      // (|x| first: a NaN keeps the running maximum, as std::max(amax, |x|) in the scalar code.)
      amax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + c)), amax);
    }
    float am = _mm512_reduce_max_ps(amax);
    const float inv = act_inverse_scale(am);
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t c = c0; c < c0 + group; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff)
                          : k > c     ? __mmask16((1u << (k - c)) - 1)
                                      : 0;
      // cvtps_epi32 rounds to nearest even, as std::nearbyint in the scalar path; |x·inv| <= 127.
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), vinv));
      v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      acc = _mm512_add_epi32(acc, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtepi32_epi8(v));
    }
    scale[g] = am / 127.f;
    sum[g] = _mm512_reduce_add_epi32(acc);
  }
}

}  // namespace tidal::kernels::cpu::avx512
