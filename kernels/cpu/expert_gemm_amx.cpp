// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_amx.cpp
/// \brief AMX tile kernels for prefill-sized token counts: `tdpbf16ps` with bf16 activations.
/// BF16 weights are loaded as B tiles straight from the packed layout (it is the VNNI pair
/// layout); INT8/INT4 weights are dequantised 32 columns at a time into a 1 KiB bf16 B tile
/// (q·s rounded to bf16) in L1. Compiled with AMX-TILE/BF16/INT8 and AVX-512 flags only.
///
/// Note [AMX tile registers]
/// tmm0..3: C, four 16-token x 16-row fp32 accumulators (up to kMaxRowsPerCall = 64 tokens);
/// tmm4, tmm6: A, 16 tokens x 32 bf16 columns, alternated so a load does not wait for the previous
/// product to release its register; tmm5, tmm7: B, 16 column pairs x 16 rows, alternated per
/// 32-column chunk. Each call checks the thread's tile configuration (configure_tiles()).
#include <immintrin.h>

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

// Tile numbers must be immediates: the body is instantiated for MB = 1..4 C tiles.
template <int MB, ExpertDType kDType>
void gemm(const PackedLayout& l, const uint8_t* tile, const ActRows& a, float* dst) {
  configure_tiles();
  if constexpr (MB >= 1) _tile_zero(0);
  if constexpr (MB >= 2) _tile_zero(1);
  if constexpr (MB >= 3) _tile_zero(2);
  if constexpr (MB >= 4) _tile_zero(3);
  alignas(64) uint16_t bbuf[2][16 * 32];
  const int64_t chunks = l.k_pad / 32;
  const auto lda = static_cast<long>(a.ld * 2);
  // Weight bytes per 32-column chunk; chunks of a tile are contiguous (then come its scales, then
  // the next tile), so the stream is prefetched kPrefetchChunks chunks ahead. Without it every B
  // tile waits for DRAM: at 64 tokens per expert the loop is bound by the weight stream.
  constexpr int64_t kChunkBytes = kDType == ExpertDType::kBF16   ? 1024
                                  : kDType == ExpertDType::kINT8 ? 512
                                                                 : 256;
  constexpr int64_t kPrefetchChunks = 4;
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const uint8_t* ahead = tile + (kc + kPrefetchChunks) * kChunkBytes;
    for (int64_t p = 0; p < kChunkBytes; p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + p), _MM_HINT_T0);
    const void* b;
    if constexpr (kDType == ExpertDType::kBF16) {
      b = tile + kc * 1024;
    } else {
      dequant_chunk<kDType == ExpertDType::kINT4>(l, tile, kc * 32, bbuf[kc & 1]);
      b = bbuf[kc & 1];
    }
    const uint16_t* a0 = a.bf16 + kc * 32;
    if (kc & 1) {
      _tile_loadd(7, b, 64);
      _tile_loadd(4, a0, lda);
      _tile_dpbf16ps(0, 4, 7);
      if constexpr (MB >= 2) {
        _tile_loadd(6, a0 + 16 * a.ld, lda);
        _tile_dpbf16ps(1, 6, 7);
      }
      if constexpr (MB >= 3) {
        _tile_loadd(4, a0 + 32 * a.ld, lda);
        _tile_dpbf16ps(2, 4, 7);
      }
      if constexpr (MB >= 4) {
        _tile_loadd(6, a0 + 48 * a.ld, lda);
        _tile_dpbf16ps(3, 6, 7);
      }
    } else {
      _tile_loadd(5, b, 64);
      _tile_loadd(4, a0, lda);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (MB >= 2) {
        _tile_loadd(6, a0 + 16 * a.ld, lda);
        _tile_dpbf16ps(1, 6, 5);
      }
      if constexpr (MB >= 3) {
        _tile_loadd(4, a0 + 32 * a.ld, lda);
        _tile_dpbf16ps(2, 4, 5);
      }
      if constexpr (MB >= 4) {
        _tile_loadd(6, a0 + 48 * a.ld, lda);
        _tile_dpbf16ps(3, 6, 5);
      }
    }
  }
  _tile_stored(0, dst, 64);
  if constexpr (MB >= 2) _tile_stored(1, dst + 256, 64);
  if constexpr (MB >= 3) _tile_stored(2, dst + 512, 64);
  if constexpr (MB >= 4) _tile_stored(3, dst + 768, 64);
}

template <ExpertDType kDType>
void run(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst) {
  // dst has room for kMaxRowsPerCall rows; C tiles store whole 16-row blocks.
  alignas(64) float out[kMaxRowsPerCall * kTileRows];
  const int64_t mb = (m + 15) / 16;
  switch (mb) {
    case 1:
      gemm<1, kDType>(l, tile, a, out);
      break;
    case 2:
      gemm<2, kDType>(l, tile, a, out);
      break;
    case 3:
      gemm<3, kDType>(l, tile, a, out);
      break;
    default:
      gemm<4, kDType>(l, tile, a, out);
      break;
  }
  std::memcpy(dst, out, static_cast<size_t>(m * kTileRows) * sizeof(float));
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

}  // namespace tidal::kernels::cpu::amx
