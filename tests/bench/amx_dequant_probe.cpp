// SPDX-License-Identifier: Apache-2.0
/// \file amx_dequant_probe.cpp
/// \brief Would dequantising INT8 weights to BF16 inside the AMX loop beat the INT kernel's
/// per-group fp32 epilogue? One core streams 16-row INT8 tile pairs (group 128, fp16 scales; a
/// 1 GiB buffer, so from DRAM) through three variants per pair:
///   0  dequantise both tiles whole into BF16 VNNI buffers (L2), then BF16 tile passes of 32 tokens
///   1  the same with the dequantisation of each 64-column block just before its products
///   2  the dequantisation alone
/// Development machine's Xeon, one core, 2026-12-07 (`./amx_dequant_probe 64`): 11.8, 9.6 and
/// 6.2 µs per pair of 64 tokens; the INT kernel's op spends ~13-14 µs per pair. The dequantisation
/// alone (~20 vector instructions per 64 weights) streams 10.8 GB/s, under the core's 16 GB/s, and
/// it does not hide under the products (Note [TMUL and the vector ports] in amx_probe.cpp): not
/// the way to 70% of the roofline. Standalone:
///   g++ -O2 -march=sapphirerapids -o /tmp/amx_dequant_probe tests/bench/amx_dequant_probe.cpp
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
constexpr int K = 2048, G = 128, NG = K / G;
constexpr int TILE_DATA = 16 * K;                    // int8 bytes per 16-row tile
constexpr int TILE_BYTES = TILE_DATA + NG * 16 * 2;  // + fp16 scales [g][16]
constexpr int LDA = K + 32;                          // bf16 activation row pitch (elements)
alignas(64) uint16_t act[64 * LDA];
alignas(64) uint16_t wb0[16 * K], wb1[16 * K];  // bf16 VNNI tiles: chunk kc (32 K) = 1 KiB
alignas(64) float cout[2][64 * 16];
// One int8 block row j (64 B: quads 4j..4j+3 of K for 16 outputs, byte n*4+kk) -> bf16 rows 2j,
// 2j+1.
static inline void deq_block(const int8_t* src, const __m512* sc, uint16_t* dst) {
  // src: 1 KiB block (64 K x 16 n), dst: 2 KiB (64 K as 32 pair rows of 64 B)
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int j = 0; j < 16; ++j) {
    const int8_t* r = src + j * 64;
    __m512 f0 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(r)))), sc[0]);
    __m512 f1 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(r + 16)))), sc[1]);
    __m512 f2 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(r + 32)))), sc[2]);
    __m512 f3 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(r + 48)))), sc[3]);
    // bf16 of [n0..n3 x k0..3] (f0) and [n4..n7] (f1): cvtne2ps2bf16(a,b) puts b low, a high
    __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);  // n0..n7, dword = (n, kpair)
    __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);  // n8..n15
    // dwords: [n0k01 n0k23 n1k01 n1k23 ... n7k23] ; rows: even dwords -> k01 row, odd -> k23 row
    _mm512_store_si512(dst + (2 * j) * 32, _mm512_permutex2var_epi32(lo, ev, hi));
    _mm512_store_si512(dst + (2 * j + 1) * 32, _mm512_permutex2var_epi32(lo, od, hi));
  }
}
static inline void scales(const uint16_t* s, __m512* sc) {
  // s: 16 fp16 scales of one group; sc[c] lanes = s[4c + lane/4]
  __m512 all = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)s));
  for (int c = 0; c < 4; ++c) {
    __m512i idx = _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2, 4 * c + 2,
                                   4 * c + 2, 4 * c + 2, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1,
                                   4 * c, 4 * c, 4 * c, 4 * c);
    sc[c] = _mm512_permutexvar_ps(idx, all);
  }
}
static void dequant_tile(const uint8_t* t, uint16_t* dst) {
  const int8_t* d = (const int8_t*)t;
  const uint16_t* s = (const uint16_t*)(t + TILE_DATA);
  __m512 sc[4];
  for (int b = 0; b < K / 64; ++b) {
    if (b % (G / 64) == 0) scales(s + (b * 64 / G) * 16, sc);
    deq_block(d + b * 1024, sc, dst + b * 1024);
  }
}
template <int NB>
static void pass(const uint16_t* b0, const uint16_t* b1, const uint16_t* a, float* c0, float* c1) {
  _tile_zero(0);
  _tile_zero(1);
  if (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int kc = 0; kc < K / 32; ++kc) {
    _tile_loadd(6, b0 + kc * 512, 64);
    _tile_loadd(7, b1 + kc * 512, 64);
    _tile_loadd(4, a + kc * 32, LDA * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (NB == 2) {
      _tile_loadd(5, a + 16 * LDA + kc * 32, LDA * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c0, 64);
  _tile_stored(1, c1, 64);
  if (NB == 2) {
    _tile_stored(2, c0 + 256, 64);
    _tile_stored(3, c1 + 256, 64);
  }
}
// interleaved: dequant chunk-block b while products on previous block (first pass only)
static void item_interleaved(const uint8_t* t0, const uint8_t* t1, int m) {
  const int8_t* d0 = (const int8_t*)t0;
  const int8_t* d1 = (const int8_t*)t1;
  const uint16_t* s0 = (const uint16_t*)(t0 + TILE_DATA);
  const uint16_t* s1 = (const uint16_t*)(t1 + TILE_DATA);
  __m512 sc0[4], sc1[4];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int b = 0; b < K / 64; ++b) {
    if (b % (G / 64) == 0) {
      scales(s0 + (b * 64 / G) * 16, sc0);
      scales(s1 + (b * 64 / G) * 16, sc1);
    }
    deq_block(d0 + b * 1024, sc0, wb0 + b * 1024);
    deq_block(d1 + b * 1024, sc1, wb1 + b * 1024);
    for (int kc = 2 * b; kc < 2 * b + 2; ++kc) {
      _tile_loadd(6, wb0 + kc * 512, 64);
      _tile_loadd(7, wb1 + kc * 512, 64);
      _tile_loadd(4, act + kc * 32, LDA * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, act + 16 * LDA + kc * 32, LDA * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cout[0], 64);
  _tile_stored(1, cout[1], 64);
  _tile_stored(2, cout[0] + 256, 64);
  _tile_stored(3, cout[1] + 256, 64);
  for (int r0 = 32; r0 < m; r0 += 32) pass<2>(wb0, wb1, act + r0 * LDA, cout[0], cout[1]);
}
int main(int argc, char** argv) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
  const size_t N = size_t{1} << 30;
  uint8_t* m = (uint8_t*)std::aligned_alloc(1 << 21, N);
  madvise(m, N, MADV_HUGEPAGE);
  for (size_t i = 0; i < N; ++i) m[i] = (uint8_t)(i * 37 + 11);
  for (size_t t = 0; t + TILE_BYTES <= N; t += TILE_BYTES) {
    uint16_t* s = (uint16_t*)(m + t + TILE_DATA);
    for (int i = 0; i < NG * 16; ++i) s[i] = 0x2000;
  }
  for (auto& v : act) v = 0x3f80;
  const size_t ntiles = N / TILE_BYTES;
  int M = argc > 1 ? atoi(argv[1]) : 64;
  for (int v = 0; v < 3; ++v) {
    double best = 1e9;
    for (int rep = 0; rep < 3; ++rep) {
      size_t items = 0;
      double t0 = now();
      for (size_t t = 0; t + 1 < ntiles; t += 2, ++items) {
        const uint8_t* t0p = m + t * TILE_BYTES;
        const uint8_t* t1p = m + (t + 1) * TILE_BYTES;
        if (v == 0) {
          dequant_tile(t0p, wb0);
          dequant_tile(t1p, wb1);
          for (int r0 = 0; r0 < M; r0 += 32) pass<2>(wb0, wb1, act + r0 * LDA, cout[0], cout[1]);
        } else if (v == 1)
          item_interleaved(t0p, t1p, M);
        else {
          dequant_tile(t0p, wb0);
          dequant_tile(t1p, wb1);
        }
      }
      double t = (now() - t0) / items;
      if (t < best) best = t;
    }
    double flops = 2.0 * M * 32 * K, bytes = 2.0 * TILE_BYTES;
    printf("variant %d M=%d: %.2f us/item, %.3f TFLOP/s, %.2f GB/s int8\n", v, M, best * 1e6,
           flops / best / 1e12, bytes / best / 1e9);
  }
}
