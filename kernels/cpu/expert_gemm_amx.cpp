// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_amx.cpp
/// \brief AMX tile kernels for prefill-sized token counts. BF16 weights: `tdpbf16ps` with the
/// activations split into bf16 hi + lo. INT8/INT4 weights: `tdpbsud` (s8 activations x u8
/// weights) per quantisation group, with the same integer sums and the same fp32 epilogue as the
/// AVX-512 VNNI kernel, so both give bit-identical results. Compiled with AMX-TILE/BF16/INT8 and
/// AVX-512 flags only.
///
/// Note [AMX activation split]
/// Rounding activations to bf16 moved the golden models' prefill logits by up to 0.3 from
/// transformers (routing ties in the random-init models amplify a 0.4% change per layer), and
/// prefill stopped matching decode. Each activation is split into x_hi = bf16(x) and
/// x_lo = bf16(x - x_hi) (|x - x_hi - x_lo| <= 2^-17 |x|) and both halves are multiplied with the
/// same bf16 weights: twice the products, fp32-grade results. At ~64 tokens per expert the pass is
/// bound by the weight stream, which the extra products do not read again.
///
/// Note [AMX 2x2 blocking]
/// One pass computes NB (1 or 2) 16-token blocks against two weight tiles (gate and up of the same
/// rows, or two adjacent tiles of down): C[i][j] = A_i x B_j in tmm0..3, A in tmm4/5, B_j in
/// tmm6/7. Each A and B tile feeds two products and the accumulation chains are independent, so
/// tile loads overlap the products. All eight tiles are 16 rows x 64 bytes; each call checks the
/// thread's tile configuration (configure_tiles()).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu::amx {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads tidal's tile configuration unless it is the current one. Other AMX users on the same
// thread (oneDNN, PyTorch) load their own configurations or release the tiles, so a per-thread
// "configured" flag is not enough: read the current configuration back and compare.
void configure_tiles() {
  static const TileConfig want = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  TileConfig cur;
  _tile_storeconfig(&cur);
  if (std::memcmp(&cur, &want, sizeof cur) != 0) _tile_loadconfig(&want);
}

// GCC's tile load/store intrinsics are asm statements without a memory clobber: the compiler does
// not see them read or write memory, and may drop stores to a buffer only a tile load reads, move
// stores before an earlier tile load of the same buffer, or read a buffer before the tile store
// that fills it. Compiler barriers on both sides of each such access order them.
inline void memory_barrier() { __asm__ __volatile__("" ::: "memory"); }

// Software prefetch of the weight stream: off by default. With hardware prefetch only, the whole
// op at 2048 tokens ran 4-7% faster on one thread (int8 209-213 ms against 220-222 ms with 8 KiB
// into L1 or 32 KiB into L2; bf16 247 against 265 ms) and within the noise on 16 (int8 16.7-18.0
// against 17.7-20.4 ms; bf16 21.9-25.0 against 23.3-25.2 ms), interleaved in one device call
// (docs/results/cpu-experts-2026-12-06/run18-amx-prefetch-op.jsonl): the weights of one tile are
// one contiguous stream, which the L2 streamer follows. TIDAL_AMX_PREFETCH (bytes ahead) and
// TIDAL_AMX_PREFETCH_L2=1 (prefetcht1) turn it on for comparison; so does set_prefetch().
struct Knobs {
  std::atomic<int64_t> prefetch_ahead{0};
  std::atomic<bool> prefetch_l2{false};
  std::atomic<bool> late_epilogue{true};  // Note [AMX group epilogue one group late]
};
Knobs& knobs() {
  static Knobs k;
  static const bool init = [] {
    if (const char* e = std::getenv("TIDAL_AMX_PREFETCH"))
      k.prefetch_ahead.store(std::strtoll(e, nullptr, 10));
    if (const char* e = std::getenv("TIDAL_AMX_PREFETCH_L2"))
      k.prefetch_l2.store(std::string(e) == "1");
    if (const char* e = std::getenv("TIDAL_AMX_LATE_EPILOGUE"))
      k.late_epilogue.store(std::string(e) != "0");
    return true;
  }();
  (void)init;
  return k;
}

inline void prefetch(const uint8_t* p, int64_t bytes) {
  const Knobs& k = knobs();
  const int64_t ahead = k.prefetch_ahead.load(std::memory_order_relaxed);
  if (ahead <= 0) return;
  const char* q = reinterpret_cast<const char*>(p + ahead);
  if (k.prefetch_l2.load(std::memory_order_relaxed)) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(q + o, _MM_HINT_T1);
  } else {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(q + o, _MM_HINT_T0);
  }
}

// ---------------------------------------------------------------- BF16

// kSplit: x = hi + lo, both halves against the same weights (Note [AMX activation split]);
// otherwise x rounded to bf16 (ActKind::kBf16, Approximation::kBf16Activations). The four C
// tiles' chains are interleaved so that consecutive products never feed the same accumulator.
template <int NB, bool kSplit>
void bf16_pass(const uint8_t* t0, const uint8_t* t1, const uint16_t* a, const uint16_t* a_lo,
               int64_t ld, int64_t chunks, float* c0, float* c1) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const auto lda = static_cast<long>(ld * 2);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    // A 32-column chunk of a BF16 tile is 1 KiB: 16 pair rows of the VNNI layout, a B tile as is.
    prefetch(t0 + kc * 1024, 1024);
    prefetch(t1 + kc * 1024, 1024);
    _tile_loadd(6, t0 + kc * 1024, 64);
    _tile_loadd(7, t1 + kc * 1024, 64);
    _tile_loadd(4, a + kc * 32, lda);
    if constexpr (NB == 2) _tile_loadd(5, a + 16 * ld + kc * 32, lda);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (NB == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if constexpr (kSplit && NB == 1) {  // lo in the free tile 5: no wait for tile 4's readers
      _tile_loadd(5, a_lo + kc * 32, lda);
      _tile_dpbf16ps(0, 5, 6);
      _tile_dpbf16ps(1, 5, 7);
    } else if constexpr (kSplit) {
      _tile_loadd(4, a_lo + kc * 32, lda);
      _tile_loadd(5, a_lo + 16 * ld + kc * 32, lda);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  memory_barrier();  // earlier reads of c0/c1 by the caller come before these stores
  _tile_stored(0, c0, 64);
  _tile_stored(1, c1, 64);
  if constexpr (NB == 2) {
    _tile_stored(2, c0 + 256, 64);
    _tile_stored(3, c1 + 256, 64);
  }
  memory_barrier();
}

template <bool kSplit>
void bf16_run2(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
               int64_t m, float* d0, float* d1) {
  configure_tiles();
  const int64_t chunks = l.k_pad / 32;
  alignas(64) float c0[32 * kTileRows], c1[32 * kTileRows];
  for (int64_t r0 = 0; r0 < m; r0 += 32) {
    const int64_t rows = std::min<int64_t>(32, m - r0);
    const uint16_t* ap = a.bf16 + r0 * a.ld;
    const uint16_t* lp = kSplit ? a.bf16_lo + r0 * a.ld : nullptr;
    if (rows > 16)
      bf16_pass<2, kSplit>(t0, t1, ap, lp, a.ld, chunks, c0, c1);
    else
      bf16_pass<1, kSplit>(t0, t1, ap, lp, a.ld, chunks, c0, c1);
    std::memcpy(d0 + r0 * kTileRows, c0, static_cast<size_t>(rows * kTileRows) * sizeof(float));
    std::memcpy(d1 + r0 * kTileRows, c1, static_cast<size_t>(rows * kTileRows) * sizeof(float));
  }
}

// ---------------------------------------------------------------- INT8 / INT4

// Note [AMX integer groups]
// A B tile of `tdpbsud` is 16 rows of 64 bytes, row j holding columns 4j..4j+3 of the 16 outputs:
// exactly one 64-byte block of the INT8 layout, so 64 columns of a group load straight from the
// packed tile (INT4: 8 blocks unpack into 16 rows). Groups of 64 and 128 columns are whole B
// tiles; group 32 stays on the VNNI kernel. Per group the int32 C tiles are stored and folded
// into fp32 sums as the VNNI kernel does: acc += float(sum - off * Σq_x) * (s_w * s_x).

// The 64 columns [c0, c0 + 64) of an INT4 tile's group as u8 rows (q + 8) of a B tile.
inline void unpack_int4(const uint8_t* gb, int64_t cl0, uint8_t* dst) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int64_t j = 0; j < 8; ++j) {  // 8 blocks of two quads
    const __m512i raw = _mm512_loadu_si512(gb + (cl0 / 8 + j) * 64);
    _mm512_store_si512(dst + (2 * j) * 64, _mm512_and_si512(raw, nibble));
    _mm512_store_si512(dst + (2 * j + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble));
  }
}

// The fp32 epilogue of one group: acc += float(C - off · Σq_x) · (s_w · s_x) per token row, the
// VNNI kernel's operations in its order (bit-identical results). `c` holds the group's 2·NB
// int32 C tiles as stored: [2·blk + j][16 rows][16 outputs].
template <int NB>
inline void int_epilogue(const int32_t* c, const uint16_t* s0, const uint16_t* s1, const ActRows& a,
                         int64_t g, int64_t rows, int32_t offset, float* acc0, float* acc1) {
  const __m512 ws0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s0)));
  const __m512 ws1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s1)));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t gi = r * a.ld_group + g;
    const __m512i corr = _mm512_set1_epi32(offset * a.q_sum[gi]);
    const __m512 xs = _mm512_set1_ps(a.q_scale[gi]);
    const int64_t blk = r / 16, rr = r % 16;
    const __m512i i0 = _mm512_sub_epi32(_mm512_load_si512(c + (2 * blk) * 256 + rr * 16), corr);
    const __m512i i1 = _mm512_sub_epi32(_mm512_load_si512(c + (2 * blk + 1) * 256 + rr * 16), corr);
    float* a0 = acc0 + r * kTileRows;
    float* a1 = acc1 + r * kTileRows;
    _mm512_storeu_ps(
        a0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(ws0, xs), _mm512_loadu_ps(a0)));
    _mm512_storeu_ps(
        a1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(ws1, xs), _mm512_loadu_ps(a1)));
  }
}

// Note [AMX group epilogue one group late]
// AMX has no move from a tile to vector registers: C goes through memory. Reading a C tile right
// after `tilestored` waits for the store to commit, and the store waits for the group's products:
// every group ran products, drain, store, epilogue in series (the single-tile micro-benchmark:
// ~500 ns per group for ~60 ns of products). Here group g's C tiles go to one of two buffers, and
// the epilogue of group g - 1 (stored one group earlier) is issued right after group g's
// products, so that it need not wait for a store just made. Measured (docs/performance.md,
// 2026-12-06 AMX prefill): the INT4 tile call ran 1.5-1.7x faster (its nibble unpacking overlaps
// too), INT8 and the whole op moved within the noise, and the stage probe
// (tests/bench/amx_probe.cpp) found that the vector epilogue still does not overlap the tile
// unit's products. The two buffers are 4 KiB + 256 B apart, so the same row of both is not at
// the same offset modulo 4 KiB. Same operations in the same order per output: bit-identical to
// the VNNI kernel.
template <int NB, bool kInt4, bool kLate>
void int_pass(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
              int64_t rows, float* acc0, float* acc1) {
  constexpr int32_t kOffset = kInt4 ? 8 : 128;
  constexpr int64_t kBufInts = 4 * 256 + 64;  // 4 KiB + 256 B
  const int64_t G = l.group, per_group = G / 64;
  const auto lda = static_cast<long>(a.ld);
  const auto* s0 = reinterpret_cast<const uint16_t*>(t0 + l.data_bytes);
  const auto* s1 = reinterpret_cast<const uint16_t*>(t1 + l.data_bytes);
  alignas(64) uint8_t u0[1024], u1[1024];
  alignas(64) int32_t c[2][kBufInts];
  for (int64_t i = 0; i < rows * kTileRows; ++i) acc0[i] = acc1[i] = 0.f;
  for (int64_t g = 0; g < l.num_groups; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (NB == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    const uint8_t* g0 = t0 + g * l.group_bytes;
    const uint8_t* g1 = t1 + g * l.group_bytes;
    prefetch(g0, l.group_bytes);
    prefetch(g1, l.group_bytes);
    for (int64_t h = 0; h < per_group; ++h) {
      const void* b0;
      const void* b1;
      if constexpr (kInt4) {
        memory_barrier();  // the previous tile loads of u0/u1 come before these stores
        unpack_int4(g0, h * 64, u0);
        unpack_int4(g1, h * 64, u1);
        memory_barrier();
        b0 = u0;
        b1 = u1;
      } else {
        b0 = g0 + h * 1024;
        b1 = g1 + h * 1024;
      }
      _tile_loadd(6, b0, 64);
      _tile_loadd(7, b1, 64);
      const int8_t* ap = a.q + g * G + h * 64;
      _tile_loadd(4, ap, lda);
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 4, 7);
      if constexpr (NB == 2) {
        _tile_loadd(5, ap + 16 * a.ld, lda);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
    }
    // Group g - 1's epilogue while this group's products run (Note [AMX group epilogue one group
    // late]); its loads come before this group's stores, so they never wait for them.
    if (kLate && g > 0)
      int_epilogue<NB>(c[(g - 1) & 1], s0 + (g - 1) * kTileRows, s1 + (g - 1) * kTileRows, a, g - 1,
                       rows, kOffset, acc0, acc1);
    int32_t* cb = c[g & 1];
    memory_barrier();  // the epilogue's reads of this buffer (group g - 2) come before the stores
    _tile_stored(0, cb, 64);
    _tile_stored(1, cb + 256, 64);
    if constexpr (NB == 2) {
      _tile_stored(2, cb + 512, 64);
      _tile_stored(3, cb + 768, 64);
    }
    memory_barrier();  // the stores come before the next epilogue's reads
    if (!kLate)        // the previous order, kept for comparison (TIDAL_AMX_LATE_EPILOGUE=0)
      int_epilogue<NB>(cb, s0 + g * kTileRows, s1 + g * kTileRows, a, g, rows, kOffset, acc0, acc1);
  }
  if constexpr (kLate) {
    const int64_t g = l.num_groups - 1;
    int_epilogue<NB>(c[g & 1], s0 + g * kTileRows, s1 + g * kTileRows, a, g, rows, kOffset, acc0,
                     acc1);
  }
}

template <bool kInt4>
void int_run2(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
              int64_t m, float* d0, float* d1) {
  configure_tiles();
  for (int64_t r0 = 0; r0 < m; r0 += 32) {
    const int64_t rows = std::min<int64_t>(32, m - r0);
    const ActRows ar = a.shifted(r0);
    float* a0 = d0 + r0 * kTileRows;
    float* a1 = d1 + r0 * kTileRows;
    if (late_epilogue()) {
      if (rows > 16)
        int_pass<2, kInt4, true>(l, t0, t1, ar, rows, a0, a1);
      else
        int_pass<1, kInt4, true>(l, t0, t1, ar, rows, a0, a1);
    } else {
      if (rows > 16)
        int_pass<2, kInt4, false>(l, t0, t1, ar, rows, a0, a1);
      else
        int_pass<1, kInt4, false>(l, t0, t1, ar, rows, a0, a1);
    }
  }
}

}  // namespace

void set_late_epilogue(bool on) { knobs().late_epilogue.store(on, std::memory_order_relaxed); }
bool late_epilogue() { return knobs().late_epilogue.load(std::memory_order_relaxed); }
void set_prefetch(int64_t ahead, bool l2) {
  knobs().prefetch_ahead.store(ahead, std::memory_order_relaxed);
  knobs().prefetch_l2.store(l2, std::memory_order_relaxed);
}

void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  alignas(64) static thread_local float scratch[kMaxRowsPerCall * kTileRows];
  bf16_run2<true>(l, tile, tile, a, m, dst, scratch);
}
void tile_bf16_act(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
                   float* dst) {
  alignas(64) static thread_local float scratch[kMaxRowsPerCall * kTileRows];
  bf16_run2<false>(l, tile, tile, a, m, dst, scratch);
}
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  alignas(64) static thread_local float scratch[kMaxRowsPerCall * kTileRows];
  int_run2<false>(l, tile, tile, a, m, dst, scratch);
}
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  alignas(64) static thread_local float scratch[kMaxRowsPerCall * kTileRows];
  int_run2<true>(l, tile, tile, a, m, dst, scratch);
}
void tile2_bf16(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  bf16_run2<true>(l, t0, t1, a, m, d0, d1);
}
void tile2_bf16_act(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                    int64_t m, float* d0, float* d1) {
  bf16_run2<false>(l, t0, t1, a, m, d0, d1);
}
void tile2_int8(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  int_run2<false>(l, t0, t1, a, m, d0, d1);
}
void tile2_int4(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  int_run2<true>(l, t0, t1, a, m, d0, d1);
}

}  // namespace tidal::kernels::cpu::amx
