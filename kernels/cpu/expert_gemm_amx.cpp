// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_amx.cpp
/// \brief AMX tile kernels for prefill-sized token counts: `tdpbf16ps` with bf16 activations.
/// BF16 weights are loaded as B tiles straight from the packed layout (it is the VNNI pair
/// layout); INT8/INT4 weights are dequantised 32 columns at a time into a 1 KiB bf16 B tile
/// (q·s rounded to bf16) in L1. Compiled with AMX-TILE/BF16/INT8 and AVX-512 flags only.
///
/// Note [AMX tile registers] (see also Note [AMX 2x2 blocking])
/// All eight tiles are 16 rows x 64 bytes: C fp32 16 tokens x 16 outputs, A bf16 16 tokens x 32
/// columns, B bf16 16 column pairs x 16 outputs. Each call checks the thread's tile configuration
/// (configure_tiles()).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

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

// Dequantises the 32 columns [c0, c0 + 32) of an INT8/INT4 tile into `dst` in the VNNI pair
// layout (16 pair rows x 16 output rows x 2 bf16). c0 is a multiple of 32, so the chunk lies in
// one group.
template <bool kInt4>
inline void dequant_chunk(const PackedLayout& l, const uint8_t* tile, int64_t c0, uint16_t* dst) {
  const int64_t g = c0 / l.group, cl0 = c0 % l.group;
  const uint8_t* gb = tile + g * l.group_bytes;
  const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      reinterpret_cast<const uint16_t*>(tile + l.data_bytes) + g * kTileRows)));
  // Lane e of the q-th 16-lane slice of a 64-byte block is row 4q + e/4.
  __m512 s[4];
  for (int q = 0; q < 4; ++q) {
    const __m512i idx = _mm512_add_epi32(
        _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                          2),
        _mm512_set1_epi32(4 * q));
    s[q] = _mm512_permutexvar_ps(idx, ws);
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  // One 64-byte block of signed values (row r, column 4j + kk at byte 4r + kk) -> pair rows 2j and
  // 2j + 1 of the chunk.
  auto emit = [&](__m512i sq, int64_t j) {
    __m512 f[4];
    __m128i parts[4] = {_mm512_extracti32x4_epi32(sq, 0), _mm512_extracti32x4_epi32(sq, 1),
                        _mm512_extracti32x4_epi32(sq, 2), _mm512_extracti32x4_epi32(sq, 3)};
    for (int q = 0; q < 4; ++q)
      f[q] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(parts[q])), s[q]);
    // cvtne2ps_pbh(a, b): low 16 bf16 from b, high 16 from a.
    const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]);  // rows 0..7
    const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);  // rows 8..15
    // dword d of lo/hi = row d/2, columns (2(d%2), 2(d%2)+1) of the quad.
    _mm512_storeu_si512(dst + (2 * j) * 32, _mm512_permutex2var_epi32(lo, even, hi));
    _mm512_storeu_si512(dst + (2 * j + 1) * 32, _mm512_permutex2var_epi32(lo, odd, hi));
  };
  if constexpr (kInt4) {
    const __m512i nibble = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    for (int64_t jj = 0; jj < 4; ++jj) {  // 4 blocks of 64 bytes = 8 quads = 32 columns
      const __m512i raw = _mm512_loadu_si512(gb + (cl0 / 8 + jj) * 64);
      emit(_mm512_sub_epi8(_mm512_and_si512(raw, nibble), eight), 2 * jj);
      emit(_mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble), eight), 2 * jj + 1);
    }
  } else {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t j = 0; j < 8; ++j)
      emit(_mm512_xor_si512(_mm512_loadu_si512(gb + (cl0 / 4 + j) * 64), flip), j);
  }
}

// Weight bytes per 32-column chunk of a tile; a tile's chunks are contiguous (then come its
// scales, then the next tile).
template <ExpertDType kDType>
constexpr int64_t kChunkBytes = kDType == ExpertDType::kBF16   ? 1024
                                : kDType == ExpertDType::kINT8 ? 512
                                                               : 256;
// The weight streams are prefetched this many chunks ahead: without it every B tile waits for
// DRAM, and at ~64 tokens per expert the loop is bound by the weight stream.
constexpr int64_t kPrefetchChunks = 8;

// Column chunks of one tile as bf16 B tiles: BF16 weights are used in place; INT8/INT4 are
// dequantised, the whole tile at once into `buf` when several token passes will reuse it.
template <ExpertDType kDType>
struct BSource {
  const PackedLayout& l;
  const uint8_t* tile;
  uint16_t* full;  // dequantised tile (k_pad/32 chunks of 512 bf16) or null
  const void* chunk(int64_t kc, uint16_t* scratch) const {
    if constexpr (kDType == ExpertDType::kBF16) {
      return tile + kc * 1024;
    } else {
      if (full != nullptr) return full + kc * 512;
      dequant_chunk<kDType == ExpertDType::kINT4>(l, tile, kc * 32, scratch);
      return scratch;
    }
  }
  void prefetch(int64_t kc) const {
    const uint8_t* ahead = tile + (kc + kPrefetchChunks) * kChunkBytes<kDType>;
    for (int64_t p = 0; p < kChunkBytes<kDType>; p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + p), _MM_HINT_T0);
  }
};

// Note [AMX 2x2 blocking]
// One pass computes NB (1 or 2) 16-token blocks against two weight tiles (gate and up of the same
// rows, or two adjacent tiles of down): C[i][j] = A_i x B_j in tmm0..3, A_i in tmm4/5, B_j in
// tmm6/7. Each A and B tile feeds two products and the four accumulation chains are independent,
// so tile loads overlap the products (a single 16-row tile with one A register serialises on it).
template <int NB, ExpertDType kDType>
void pass2(const BSource<kDType>& b0, const BSource<kDType>& b1, const uint16_t* a, int64_t ld,
           int64_t chunks, float* c0, float* c1) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  alignas(64) uint16_t s0[16 * 32], s1[16 * 32];
  const auto lda = static_cast<long>(ld * 2);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    b0.prefetch(kc);
    b1.prefetch(kc);
    const void* p0 = b0.chunk(kc, s0);
    const void* p1 = b1.chunk(kc, s1);
    _tile_loadd(4, a + kc * 32, lda);
    _tile_loadd(6, p0, 64);
    _tile_loadd(7, p1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (NB == 2) {
      _tile_loadd(5, a + 16 * ld + kc * 32, lda);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, 64);
  _tile_stored(1, c1, 64);
  if constexpr (NB == 2) {
    _tile_stored(2, c0 + 256, 64);
    _tile_stored(3, c1 + 256, 64);
  }
}

// Dequantised tiles for multi-pass calls: two tiles of up to 2048 columns (k_pad larger: per
// chunk). 128 KiB per thread, L2-resident.
constexpr int64_t kFullTileCols = 2048;

template <ExpertDType kDType>
void run2(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a, int64_t m,
          float* d0, float* d1) {
  configure_tiles();
  const int64_t chunks = l.k_pad / 32;
  const int64_t passes = (m + 31) / 32;
  uint16_t* full0 = nullptr;
  uint16_t* full1 = nullptr;
  if constexpr (kDType != ExpertDType::kBF16) {
    if (passes > 1 && l.k_pad <= kFullTileCols) {
      alignas(64) static thread_local uint16_t full[2][kFullTileCols * kTileRows];
      full0 = full[0];
      full1 = full[1];
      for (int64_t kc = 0; kc < chunks; ++kc) {
        dequant_chunk<kDType == ExpertDType::kINT4>(l, t0, kc * 32, full0 + kc * 512);
        dequant_chunk<kDType == ExpertDType::kINT4>(l, t1, kc * 32, full1 + kc * 512);
      }
    }
  }
  const BSource<kDType> b0{l, t0, full0}, b1{l, t1, full1};
  alignas(64) float c0[32 * kTileRows], c1[32 * kTileRows];
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t r0 = 32 * p, rows = std::min<int64_t>(32, m - r0);
    const uint16_t* ap = a.bf16 + r0 * a.ld;
    if (rows > 16)
      pass2<2, kDType>(b0, b1, ap, a.ld, chunks, c0, c1);
    else
      pass2<1, kDType>(b0, b1, ap, a.ld, chunks, c0, c1);
    std::memcpy(d0 + r0 * kTileRows, c0, static_cast<size_t>(rows * kTileRows) * sizeof(float));
    std::memcpy(d1 + r0 * kTileRows, c1, static_cast<size_t>(rows * kTileRows) * sizeof(float));
  }
}

template <ExpertDType kDType>
void run(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst) {
  // One tile: the pair kernel with the same tile twice (the second result is dropped). Callers
  // with two tiles use run2 directly.
  alignas(64) static thread_local float scratch[kMaxRowsPerCall * kTileRows];
  run2<kDType>(l, tile, tile, a, m, dst, scratch);
}

}  // namespace

void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run<ExpertDType::kBF16>(l, tile, a, m, dst);
}
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run<ExpertDType::kINT8>(l, tile, a, m, dst);
}
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
               float* dst) {
  run<ExpertDType::kINT4>(l, tile, a, m, dst);
}
void tile2_bf16(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  run2<ExpertDType::kBF16>(l, t0, t1, a, m, d0, d1);
}
void tile2_int8(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  run2<ExpertDType::kINT8>(l, t0, t1, a, m, d0, d1);
}
void tile2_int4(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) {
  run2<ExpertDType::kINT4>(l, t0, t1, a, m, d0, d1);
}

}  // namespace tidal::kernels::cpu::amx
