// SPDX-License-Identifier: Apache-2.0
/// \file bench_util.h
/// \brief What the CPU benchmarks share (bench_experts.cpp, bench_linear.cpp): the clock, list
/// arguments, anonymous huge-page regions and the read bandwidth measured with the benchmark's
/// own threads.
#pragma once

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/executor.h"

namespace tidal::bench {

using Executor = tidal::kernels::Executor;

inline double now_s() {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

inline std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  size_t p = 0;
  while (p < s.size()) {
    size_t q = s.find(',', p);
    if (q == std::string::npos) q = s.size();
    v.push_back(std::stoll(s.substr(p, q - p)));
    p = q + 1;
  }
  return v;
}

/// Comma-separated names.
inline std::vector<std::string> parse_names(const std::string& s) {
  std::vector<std::string> v;
  size_t p = 0;
  while (p < s.size()) {
    size_t q = s.find(',', p);
    if (q == std::string::npos) q = s.size();
    v.push_back(s.substr(p, q - p));
    p = q + 1;
  }
  return v;
}

// Read bandwidth with the benchmark's own threads: every thread streams its slice with 64-byte
// loads (4 independent accumulators), best of `repeats` passes over a buffer far larger than LLC.
__attribute__((target("avx512f"))) inline uint64_t read_slice_avx512(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(
      _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3))));
}

// The same with 256-bit loads, for CPUs without AVX-512 (the read bandwidth a 2-core AVX2
// development machine reaches is the same either way).
__attribute__((target("avx2"))) inline uint64_t read_slice_avx2(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t v[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return v[0] + v[1] + v[2] + v[3];
}

inline uint64_t read_slice(const uint8_t* p, size_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? read_slice_avx512(p, n) : read_slice_avx2(p, n);
}

// One anonymous region (per layer, and the bandwidth buffer), advised for transparent huge pages:
// as the runtime's expert store allocates its packed experts (offload/expert_store.cpp).
// TIDAL_BENCH_HUGEPAGES=0 advises the expert layers against them (4 KiB pages, as a memory-mapped
// packed cache file has), to measure what page walks cost.
inline void* alloc_region(size_t n, bool huge = true) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cannot map %zu bytes\n", n);
    std::exit(1);
  }
  madvise(p, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return p;
}

/// Read bandwidth (bytes/s): best of `repeats` passes of every thread over its slice of a
/// `bytes` buffer.
inline double measure_bandwidth(Executor& ex, size_t bytes, int repeats) {
  auto* buf = static_cast<uint8_t*>(alloc_region(bytes));
  const int64_t chunks = 1024;
  const size_t per = bytes / chunks / 256 * 256;
  ex.parallel_for(chunks, 1,
                  [&](int64_t c0, int64_t c1) { std::memset(buf + c0 * per, 1, (c1 - c0) * per); });
  std::atomic<uint64_t> sink{0};
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now_s();
    ex.parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
      sink += read_slice(buf + c0 * per, (c1 - c0) * per);
    });
    best = std::max(best, static_cast<double>(per * chunks) / (now_s() - t0));
  }
  munmap(buf, bytes);
  return best;
}

}  // namespace tidal::bench
