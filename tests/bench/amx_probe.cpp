// SPDX-License-Identifier: Apache-2.0
/// \file amx_probe.cpp
/// \brief What one quantisation group of the AMX INT kernel costs, stage by stage, on one core:
/// tile products alone, then with B and A tile loads (L1, L2, DRAM), tile stores, and the fp32
/// epilogue (right away or one group late), plus a two-C-set variant. "Time variants that leave
/// one stage out and take differences" (no perf on the GPU machine). Standalone, so that it builds
/// in seconds on the device: the `tidal_amx_probe` benchmark target, or
///   g++ -O2 -march=sapphirerapids -o /tmp/amx_probe tests/bench/amx_probe.cpp && /tmp/amx_probe
/// `amx_probe [groups] [loaded]`: with `loaded` = N > 0, N other threads, pinned to cores 1..N
/// (the probe runs on core 0), stream-read memory of their own for the whole run, as the other
/// cores of a 16-thread prefill do, so that each stage's cost under a loaded memory system shows
/// next to its cost on an idle one (the fourteenth session's planning note in
/// docs/performance.md). Every line then carries "loaded": N.
/// A "group" is the kernel's unit for INT8 group 128 with 32 tokens (NB = 2): 2 x 4 `tdpbsud`
/// (16x16x64 each) = 131072 int8 MACs (262144 ops), 4 C tiles of 16x16 int32.
#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void setup_amx() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::fprintf(stderr, "AMX not permitted\n");
    std::exit(1);
  }
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

inline void barrier() { __asm__ __volatile__("" ::: "memory"); }

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Activations as the op holds them: 64 token rows of 2048 int8 + 32 pad (ld 2080), group data.
constexpr int64_t kLd = 2048 + 32, kK = 2048, kG = 128, kGroups = kK / kG;
alignas(64) int8_t act[64 * kLd];
alignas(64) float q_scale[64 * kGroups];
alignas(64) int32_t q_sum[64 * kGroups];
alignas(64) uint8_t b_l1[2 * 1024];
alignas(64) int8_t a_l1[2 * 1024];
alignas(64) int32_t cbuf[2][4 * 256 + 64];
alignas(64) float acc0[32 * 16], acc1[32 * 16];
alignas(64) uint16_t wscale[kGroups * 16 * 2];

enum Stage : int {
  kTdp = 1,           // products
  kLoadB = 2,         // B tile loads
  kLoadAL1 = 4,       // A tile loads from a 2 KiB L1 buffer
  kLoadAL2 = 8,       // A tile loads from the 133 KB activation rows (L2)
  kStore = 16,        // tilezero + 4 tile stores per group
  kEpiNow = 32,       // epilogue of this group right after its stores
  kEpiLate = 64,      // epilogue of the previous group after this group's products
  kBStreamL2 = 128,   // B from a 1 MiB buffer walked in order (L2)
  kBStreamMem = 256,  // B from a 1 GiB buffer walked in order (DRAM)
  kEpiSplit = 512,    // with kEpiLate: 16 rows of the previous group's epilogue after each h
  kStagger = 1024,    // loads interleaved with the products instead of all before them
  kPf16k = 2048,      // software prefetch (prefetcht1) of the B stream 16 KiB ahead
  kPf64k = 4096,      // ... 64 KiB ahead
};

void epilogue(const int32_t* c, int64_t g, int64_t r0 = 0, int64_t r1 = 32) {
  const __m512 ws0 =
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wscale + g * 16)));
  const __m512 ws1 =
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wscale + 256 + g * 16)));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t gi = r * kGroups + g;
    const __m512i corr = _mm512_set1_epi32(128 * q_sum[gi]);
    const __m512 xs = _mm512_set1_ps(q_scale[gi]);
    const int64_t blk = r / 16, rr = r % 16;
    const __m512i i0 = _mm512_sub_epi32(_mm512_load_si512(c + (2 * blk) * 256 + rr * 16), corr);
    const __m512i i1 = _mm512_sub_epi32(_mm512_load_si512(c + (2 * blk + 1) * 256 + rr * 16), corr);
    _mm512_store_ps(acc0 + r * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(ws0, xs),
                                                   _mm512_load_ps(acc0 + r * 16)));
    _mm512_store_ps(acc1 + r * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(ws1, xs),
                                                   _mm512_load_ps(acc1 + r * 16)));
  }
}

// `groups` groups with the stages in `mask`; returns seconds.
double run(int mask, int64_t groups, const uint8_t* stream, size_t stream_bytes) {
  size_t off = 0;
  const double t0 = now();
  for (int64_t i = 0; i < groups; ++i) {
    const int64_t g = i % kGroups;
    if (mask & kStore) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int h = 0; h < 2; ++h) {
      const uint8_t* b = b_l1;
      if (mask & (kBStreamL2 | kBStreamMem)) {
        b = stream + off;
        if (mask & (kPf16k | kPf64k)) {
          const size_t ahead = (mask & kPf16k) ? 16384 : 65536;
          const char* q = reinterpret_cast<const char*>(stream + (off + ahead) % stream_bytes);
          for (int o = 0; o < 2048; o += 64) _mm_prefetch(q + o, _MM_HINT_T1);
        }
        off = (off + 2048) % stream_bytes;
      }
      const int8_t* ap = act + (i / kGroups % 2) * 32 * kLd + g * kG + h * 64;
      if (mask & kStagger) {  // B0, A0, C0; B1, C1; A1, C2, C3
        _tile_loadd(6, b, 64);
        _tile_loadd(4, ap, kLd);
        _tile_dpbsud(0, 4, 6);
        _tile_loadd(7, b + 1024, 64);
        _tile_dpbsud(1, 4, 7);
        _tile_loadd(5, ap + 16 * kLd, kLd);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      } else {
        if (mask & kLoadB) {
          _tile_loadd(6, b, 64);
          _tile_loadd(7, b + 1024, 64);
        }
        if (mask & kLoadAL1) {
          _tile_loadd(4, a_l1, 64);
          _tile_loadd(5, a_l1 + 1024, 64);
        } else if (mask & kLoadAL2) {
          _tile_loadd(4, ap, kLd);
          _tile_loadd(5, ap + 16 * kLd, kLd);
        }
        if (mask & kTdp) {
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
      }
      if ((mask & kEpiLate) && (mask & kEpiSplit) && i > 0)
        epilogue(cbuf[(i - 1) & 1], (i - 1) % kGroups, 16 * h, 16 * h + 16);
    }
    if ((mask & kEpiLate) && !(mask & kEpiSplit) && i > 0)
      epilogue(cbuf[(i - 1) & 1], (i - 1) % kGroups);
    if (mask & kStore) {
      int32_t* cb = cbuf[i & 1];
      barrier();
      _tile_stored(0, cb, 64);
      _tile_stored(1, cb + 256, 64);
      _tile_stored(2, cb + 512, 64);
      _tile_stored(3, cb + 768, 64);
      barrier();
      if (mask & kEpiNow) epilogue(cb, g);
    }
    if (!(mask & kStore) && (mask & (kEpiNow | kEpiLate)) && !(mask & kTdp))
      epilogue(cbuf[i & 1], g);  // the epilogue alone
  }
  // Drain: a store of the C tiles makes the timed products complete.
  _tile_stored(0, cbuf[0], 64);
  const double t = now() - t0;
  return t;
}

// Two C sets, 16 tokens per group: set (g & 1) takes group g's 2 x 2 products while the other
// set's stores and epilogue (of group g - 1) proceed. Half the MACs of a NB = 2 group.
double run_two_sets(int64_t groups, const uint8_t* stream, size_t stream_bytes) {
  size_t off = 0;
  const double t0 = now();
  for (int64_t i = 0; i < groups; ++i) {
    const int64_t g = i % kGroups;
    const bool x = (i & 1) == 0;
    if (x) {
      _tile_zero(0);
      _tile_zero(1);
    } else {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int h = 0; h < 2; ++h) {
      const uint8_t* b = stream ? stream + off : b_l1;
      if (stream) off = (off + 2048) % stream_bytes;
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + 1024, 64);
      const int8_t* ap = act + g * kG + h * 64;
      _tile_loadd(4, ap, kLd);
      if (x) {
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
      } else {
        _tile_dpbsud(2, 4, 6);
        _tile_dpbsud(3, 4, 7);
      }
    }
    // Store the other set (group i - 1), then its epilogue (16 rows: half of epilogue()).
    if (i > 0) {
      int32_t* cb = cbuf[(i - 1) & 1];
      barrier();
      if (x) {
        _tile_stored(2, cb, 64);
        _tile_stored(3, cb + 256, 64);
      } else {
        _tile_stored(0, cb, 64);
        _tile_stored(1, cb + 256, 64);
      }
      barrier();
    }
    if (i > 1) {
      // Epilogue of group i - 2 (stored one iteration ago): 16 rows.
      const int32_t* c = cbuf[(i - 2) & 1];
      const int64_t gg = (i - 2) % kGroups;
      const __m512 ws0 =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wscale + gg * 16)));
      const __m512 ws1 = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wscale + 256 + gg * 16)));
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t gi = r * kGroups + gg;
        const __m512i corr = _mm512_set1_epi32(128 * q_sum[gi]);
        const __m512 xs = _mm512_set1_ps(q_scale[gi]);
        const __m512i i0 = _mm512_sub_epi32(_mm512_load_si512(c + r * 16), corr);
        const __m512i i1 = _mm512_sub_epi32(_mm512_load_si512(c + 256 + r * 16), corr);
        _mm512_store_ps(acc0 + r * 16,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(ws0, xs),
                                        _mm512_load_ps(acc0 + r * 16)));
        _mm512_store_ps(acc1 + r * 16,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(ws1, xs),
                                        _mm512_load_ps(acc1 + r * 16)));
      }
    }
  }
  _tile_stored(0, cbuf[0], 64);
  return now() - t0;
}

// Note [TMUL and the vector ports]
// Do tile products and AVX-512 arithmetic run at the same time? `iters` iterations of 4
// `tdpbf16ps` on resident tiles (64 TMUL cycles), of `nfma` independent register-only FMAs (8
// chains), and of both. Measured on the development machine's Xeon (one core; 2026-12-07):
// 4 products 18-20 ns, 64 FMAs 9 ns, both 19-20 ns; 128 FMAs 19 ns, both 36 ns; 256 FMAs 39 ns,
// both 84 ns. Up to ~64 FMAs hide under the products, beyond that the times add up: while the
// TMUL works, vector arithmetic issues on one port only (port 5; port 0 feeds the TMUL), so
// every vector instruction in an AMX loop (an INT group's fp32 epilogue, a dequantisation)
// costs about twice its usual issue time. That is why the INT kernel's epilogue does not hide
// under its products (the "+store+epi_late" line is the sum of "+store" and "epilogue_only").
double run_overlap(int what, int nfma, int64_t iters) {
  __m512 x0 = _mm512_set1_ps(1.f), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;
  const __m512 m = _mm512_set1_ps(0.999f);
  const double t0 = now();
  for (int64_t i = 0; i < iters; ++i) {
    if (what & 1) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (what & 2) {
      for (int r = 0; r < nfma / 8; ++r) {
        x0 = _mm512_fmadd_ps(x0, m, m);
        x1 = _mm512_fmadd_ps(x1, m, m);
        x2 = _mm512_fmadd_ps(x2, m, m);
        x3 = _mm512_fmadd_ps(x3, m, m);
        x4 = _mm512_fmadd_ps(x4, m, m);
        x5 = _mm512_fmadd_ps(x5, m, m);
        x6 = _mm512_fmadd_ps(x6, m, m);
        x7 = _mm512_fmadd_ps(x7, m, m);
      }
      __asm__ __volatile__(""
                           : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4), "+v"(x5), "+v"(x6),
                             "+v"(x7));
    }
  }
  _tile_stored(0, cbuf[0], 64);
  return now() - t0;
}

void pin_to(int core) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(core, &set);
  sched_setaffinity(0, sizeof set, &set);  // best effort: unpinned where refused
}

// Streams reads over 256 MiB of its own (first touched by itself) until `stop`.
void stream_reader(int core, const std::atomic<bool>* stop, std::atomic<uint64_t>* sink) {
  pin_to(core);
  constexpr size_t kBytes = size_t{256} << 20;
  auto* buf = static_cast<uint8_t*>(std::aligned_alloc(4096, kBytes));
  std::memset(buf, 1, kBytes);
  __m512i acc = _mm512_setzero_si512();
  while (!stop->load(std::memory_order_relaxed))
    for (size_t o = 0; o < kBytes; o += 256) {
      acc = _mm512_add_epi64(acc, _mm512_load_si512(buf + o));
      acc = _mm512_add_epi64(acc, _mm512_load_si512(buf + o + 64));
      acc = _mm512_add_epi64(acc, _mm512_load_si512(buf + o + 128));
      acc = _mm512_add_epi64(acc, _mm512_load_si512(buf + o + 192));
    }
  sink->fetch_add(static_cast<uint64_t>(_mm512_reduce_add_epi64(acc)));
  std::free(buf);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t groups = argc > 1 ? std::atoll(argv[1]) : 200000;
  const int loaded = argc > 2 ? std::atoi(argv[2]) : 0;
  pin_to(0);
  setup_amx();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> sink{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < loaded; ++i) readers.emplace_back(stream_reader, i + 1, &stop, &sink);
  if (loaded > 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));  // their memset
  for (size_t i = 0; i < sizeof act; ++i) act[i] = static_cast<int8_t>((i * 7) % 255 - 127);
  for (auto& v : b_l1) v = 3;
  for (auto& v : a_l1) v = 1;
  for (auto& v : q_scale) v = 0.01f;
  for (auto& v : q_sum) v = 5;
  for (auto& v : wscale) v = 0x2000;
  const size_t l2_bytes = size_t{1} << 20, mem_bytes = size_t{1} << 30;
  auto* l2 = static_cast<uint8_t*>(std::aligned_alloc(4096, l2_bytes));
  auto* mem = static_cast<uint8_t*>(std::aligned_alloc(4096, mem_bytes));
  std::memset(l2, 1, l2_bytes);
  std::memset(mem, 1, mem_bytes);
  struct V {
    const char* name;
    int mask;
  };
  const V vs[] = {
      {"tdp", kTdp},
      {"tdp+ldB_L1", kTdp | kLoadB},
      {"tdp+ldB+ldA_L1", kTdp | kLoadB | kLoadAL1},
      {"tdp+ldB+ldA_L2", kTdp | kLoadB | kLoadAL2},
      {"+store", kTdp | kLoadB | kLoadAL2 | kStore},
      {"+store+epi_now", kTdp | kLoadB | kLoadAL2 | kStore | kEpiNow},
      {"+store+epi_late", kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate},
      {"epi_late,B_L2stream", kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kBStreamL2},
      {"epi_late,B_DRAMstream", kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kBStreamMem},
      {"store_only", kStore},
      {"epilogue_only", kEpiNow},
      {"ldB+ldA_L2_only", kLoadB | kLoadAL2},
      {"epi_late_split", kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit},
      {"epi_late_split+stagger",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit | kStagger},
      {"epi_late_split,B_L2stream",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit | kBStreamL2},
      {"epi_late_split,B_DRAM",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit | kBStreamMem},
      {"epi_late_split,B_DRAM,pf16k",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit | kBStreamMem | kPf16k},
      {"epi_late_split,B_DRAM,pf64k",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kEpiSplit | kBStreamMem | kPf64k},
      {"epi_late,B_DRAM,pf16k",
       kTdp | kLoadB | kLoadAL2 | kStore | kEpiLate | kBStreamMem | kPf16k},
  };
  constexpr double kMacs = 2.0 * 4 * 16 * 16 * 64;  // per group
  for (const auto& v : vs) {
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const uint8_t* s = (v.mask & kBStreamMem) ? mem : l2;
      const size_t sb = (v.mask & kBStreamMem) ? mem_bytes : l2_bytes;
      best = std::min(best, run(v.mask, groups, s, sb));
    }
    const double ns = best / static_cast<double>(groups) * 1e9;
    std::printf("{\"loaded\":%d,\"probe\":\"%s\",\"ns_per_group\":%.1f,\"tops\":%.3f}\n", loaded,
                v.name, ns, 2.0 * kMacs / ns / 1e3);
    std::fflush(stdout);
  }
  // Note [TMUL and the vector ports]: products, FMAs, both (tiles 4-7 hold zeros: no denormals).
  std::memset(b_l1, 0, sizeof b_l1);
  _tile_loadd(4, b_l1, 64);
  _tile_loadd(5, b_l1 + 1024, 64);
  _tile_loadd(6, b_l1, 64);
  _tile_loadd(7, b_l1 + 1024, 64);
  for (int nfma : {64, 128, 256}) {
    double ns[3];
    for (int what = 1; what <= 3; ++what) {
      double best = 1e30;
      for (int rep = 0; rep < 5; ++rep) best = std::min(best, run_overlap(what, nfma, groups));
      ns[what - 1] = best / static_cast<double>(groups) * 1e9;
    }
    std::printf(
        "{\"loaded\":%d,\"probe\":\"tmul_vs_fma\",\"fmas\":%d,\"products_ns\":%.1f,"
        "\"fmas_ns\":%.1f,\"both_ns\":%.1f}\n",
        loaded, nfma, ns[0], ns[1], ns[2]);
    std::fflush(stdout);
  }
  for (auto& v : b_l1) v = 3;
  for (int where = 0; where < 3; ++where) {
    double best = 1e30;
    const uint8_t* s = where == 0 ? nullptr : where == 1 ? l2 : mem;
    const size_t sb = where == 2 ? mem_bytes : l2_bytes;
    for (int rep = 0; rep < 5; ++rep) best = std::min(best, run_two_sets(groups, s, sb));
    const double ns = best / static_cast<double>(groups) * 1e9;
    std::printf(
        "{\"loaded\":%d,\"probe\":\"two_sets_nb1,B_%s\",\"ns_per_group\":%.1f,\"tops\":%.3f}\n",
        loaded,
        where == 0   ? "L1"
        : where == 1 ? "L2stream"
                     : "DRAMstream",
        ns, 2.0 * (kMacs / 2) / ns / 1e3);
    std::fflush(stdout);
  }
  stop.store(true);
  for (auto& t : readers) t.join();
  if (loaded > 0)  // (uses the readers' sums, so that their loads stay)
    std::fprintf(stderr, "readers' checksum %llu\n", static_cast<unsigned long long>(sink.load()));
  return 0;
}
