// SPDX-License-Identifier: Apache-2.0
/// \file bench_experts.cpp
/// \brief Benchmark (not a test) of the fused MoE expert op on real Qwen expert shapes: decode
/// GB/s of expert bytes against the machine's read bandwidth measured in the same run, prefill
/// TFLOP/s against the roofline min(AMX peak, bandwidth x arithmetic intensity), and oneDNN's
/// matmul on the same total work where oneDNN is built in. JSON lines on stdout.
///
/// Usage: tidal_bench_experts [--shape 35b|80b] [--dtypes bf16,int8,int4] [--m 1,4,16,128,512,2048]
///        [--threads 1,2,4,8,16] [--seconds 0.5] [--onednn] [--group G] [--executors spin,tbb]
///        [--dataflow 0,1]
#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "kernels/common/cpu_features.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/expert_gemm.h"
#include "kernels/cpu/moe_experts.h"
#include "kernels/cpu/rms_norm.h"
#ifdef TIDAL_BENCH_ONEDNN
#include <dnnl.hpp>
#endif

namespace kc = tidal::kernels::cpu;
using tidal::kernels::Executor;
using tidal::kernels::Isa;
using Clock = std::chrono::steady_clock;

namespace {

using tidal::bench::alloc_region;
using tidal::bench::measure_bandwidth;
using tidal::bench::now_s;
using tidal::bench::parse_list;
using tidal::bench::parse_names;

bool layer_hugepages() {
  const char* e = std::getenv("TIDAL_BENCH_HUGEPAGES");
  return e == nullptr || std::string(e) != "0";
}

// AnonHugePages of /proc/meminfo in KiB (-1 where unreadable).
long anon_huge_kb() {
  FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kb = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
  std::fclose(f);
  return kb;
}

// AMX peak: every thread issues independent tdpbf16ps / tdpbssd on resident tiles.
__attribute__((target("amx-tile,amx-bf16,amx-int8"))) void amx_spin(bool int8, int64_t iters) {
  struct alignas(64) {
    uint8_t palette = 1, start = 0, res[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC's tile intrinsics are asm statements without a memory clobber: without the barrier the
  // stores to cfg may be dropped or sunk below ldtilecfg, which then loads palette 0 and the first
  // tile load faults (SIGILL; seen on the development machine's Xeon).
  __asm__ __volatile__("" ::: "memory");
  _tile_loadconfig(&cfg);
  alignas(64) static thread_local uint8_t z[1024] = {};
  __asm__ __volatile__("" ::: "memory");
  _tile_loadd(4, z, 64);
  _tile_loadd(5, z, 64);
  _tile_loadd(6, z, 64);
  _tile_loadd(7, z, 64);
  for (int64_t i = 0; i < iters; ++i) {
    if (int8) {
      _tile_dpbssd(0, 4, 5);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 6, 5);
      _tile_dpbssd(3, 6, 7);
    } else {
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 6, 5);
      _tile_dpbf16ps(3, 6, 7);
    }
  }
  // No tile release: the configuration above is the one tidal's AMX kernels load once per thread
  // (palette 1, eight 16 x 64-byte tiles), so they run on unchanged after this on the same threads.
}

double amx_peak(Executor& ex, bool int8) {
  const int nt = ex.num_threads();
  constexpr int64_t kIters = 200000;
  const double t0 = now_s();
  ex.parallel_for(nt, 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) amx_spin(int8, kIters);
  });
  const double s = now_s() - t0;
  const double per_insn = int8 ? 16.0 * 16 * 64 * 2 : 16.0 * 16 * 32 * 2;
  return static_cast<double>(nt) * kIters * 4 * per_insn / s;
}

struct Shape {
  const char* name;
  int64_t hidden, inter, experts, top_k;
};

struct Layer {
  void* region = nullptr;
  size_t bytes = 0;
  std::vector<kc::PackedExpert> experts;
};

// Packs `num_layers` layers of random experts (normal weights, a few outliers), in parallel.
std::vector<Layer> make_layers(const Shape& s, const kc::PackedLayout& gu,
                               const kc::PackedLayout& dn, int num_layers, Executor& ex) {
  const int64_t H = s.hidden, I = s.inter;
  std::vector<float> src(static_cast<size_t>(H * I + 4096));
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.f, 0.02f);
  for (auto& v : src) v = d(g);
  std::vector<Layer> layers(static_cast<size_t>(num_layers));
  const auto per_expert = static_cast<size_t>(2 * gu.bytes() + dn.bytes());
  for (auto& L : layers) {
    L.bytes = per_expert * static_cast<size_t>(s.experts);
    L.region = alloc_region(L.bytes, layer_hugepages());
    L.experts.resize(static_cast<size_t>(s.experts));
    ex.parallel_for(s.experts, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        uint8_t* b = static_cast<uint8_t*>(L.region) + static_cast<size_t>(e) * per_expert;
        L.experts[e] = {b, b + gu.bytes(), b + 2 * gu.bytes()};
        const float* w = src.data() + (e * 37) % 4096;  // different weights per expert
        kc::pack_weights(gu, w, tidal::kernels::DType::kF32, H, b, 0, gu.num_tiles);
        kc::pack_weights(gu, w + 1, tidal::kernels::DType::kF32, H, b + gu.bytes(), 0,
                         gu.num_tiles);
        kc::pack_weights(dn, w + 2, tidal::kernels::DType::kF32, I, b + 2 * gu.bytes(), 0,
                         dn.num_tiles);
      }
    });
  }
  return layers;
}

struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> w;
  int64_t unique = 0;
};

// Router-like choice: top_k distinct experts per token, uniformly at random.
Routing route(const Shape& s, int64_t m, uint32_t seed) {
  Routing r;
  std::mt19937 g(seed);
  std::vector<int32_t> perm(static_cast<size_t>(s.experts));
  std::iota(perm.begin(), perm.end(), 0);
  std::vector<uint8_t> used(static_cast<size_t>(s.experts), 0);
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t i = 0; i < s.top_k; ++i) {
      std::swap(perm[i], perm[i + g() % (s.experts - i)]);
      r.ids.push_back(perm[i]);
      r.w.push_back(1.f / static_cast<float>(s.top_k));
      used[perm[i]] = 1;
    }
  }
  r.unique = std::accumulate(used.begin(), used.end(), int64_t{0});
  return r;
}

#ifdef TIDAL_BENCH_ONEDNN
// oneDNN baseline: per active expert, gate and up matmuls [m_e, H] x [H, I] and down [m_e, I] x
// [I, H] (bf16 -> f32, or u8 x s8 with per-channel scales for int8), silu(g)·u between, the same
// routing; weights reordered once into the format oneDNN prefers; primitives made before timing.
struct OnednnMoe {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream strm{eng};
  bool int8;
  int64_t H, I;
  struct Mats {
    dnnl::memory gate, up, down;
  };
  std::vector<Mats> w;
  struct Prims {
    dnnl::matmul gu, dn;
    dnnl::memory::desc src_gu, wei_gu, dst_gu, src_dn, wei_dn, dst_dn;
  };
  std::vector<std::pair<int64_t, Prims>> prims;

  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;

  OnednnMoe(const Shape& s, bool int8_) : int8(int8_), H(s.hidden), I(s.inter) {}

  Prims make(int64_t m) {
    Prims p;
    const dt sdt = int8 ? dt::u8 : dt::bf16, wdt = int8 ? dt::s8 : dt::bf16;
    p.src_gu = {{m, H}, sdt, tag::ab};
    p.wei_gu = {{H, I}, wdt, tag::any};
    p.dst_gu = {{m, I}, dt::f32, tag::ab};
    p.src_dn = {{m, I}, sdt, tag::ab};
    p.wei_dn = {{I, H}, wdt, tag::any};
    p.dst_dn = {{m, H}, dt::f32, tag::ab};
    dnnl::primitive_attr attr;
#if DNNL_VERSION_MAJOR >= 3
    // oneDNN 3: per-output-channel weight scales (mask over dimension 1 of [K, N]), given at run
    // time as DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS.
    if (int8) attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 1);
    auto pd_gu = dnnl::matmul::primitive_desc(eng, p.src_gu, p.wei_gu, p.dst_gu, attr);
    auto pd_dn = dnnl::matmul::primitive_desc(eng, p.src_dn, p.wei_dn, p.dst_dn, attr);
#else
    if (int8) attr.set_output_scales(2, {DNNL_RUNTIME_F32_VAL});
    auto pd_gu =
        dnnl::matmul::primitive_desc(dnnl::matmul::desc(p.src_gu, p.wei_gu, p.dst_gu), attr, eng);
    auto pd_dn =
        dnnl::matmul::primitive_desc(dnnl::matmul::desc(p.src_dn, p.wei_dn, p.dst_dn), attr, eng);
#endif
    p.wei_gu = pd_gu.weights_desc();
    p.wei_dn = pd_dn.weights_desc();
    p.gu = dnnl::matmul(pd_gu);
    p.dn = dnnl::matmul(pd_dn);
    return p;
  }
  const Prims& get(int64_t m) {
    for (auto& [k, p] : prims)
      if (k == m) return p;
    prims.emplace_back(m, make(m));
    return prims.back().second;
  }
};
#endif

std::unique_ptr<Executor> make_named_executor(const std::string& kind, int threads) {
  return kind == "tbb" ? tidal::kernels::make_tbb_executor(threads)
                       : tidal::kernels::make_spin_executor(threads);
}

// --gap-us: idle time between the op's calls (see run_shape).
double gap_us = 0;
bool trace_calls = false;  // --trace: per-thread timeline of hand-off decode calls

void run_shape(const Shape& s, const std::vector<std::string>& dtypes,
               const std::vector<int64_t>& ms, const std::vector<int64_t>& threads, double seconds,
               int64_t group, bool onednn, const std::vector<std::string>& executors,
               const std::vector<int64_t>& dataflows) {
  const auto& f = tidal::kernels::cpu_features();
  const Isa isa = tidal::kernels::resolve_isa("auto");
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  for (const auto& dname : dtypes) {
    const kc::ExpertDType dt = kc::parse_expert_dtype(dname);
    const int64_t G =
        dt == kc::ExpertDType::kBF16 ? 0 : (group ? group : kc::default_group_size(dt));
    const auto gu = kc::make_layout(dt, s.inter, s.hidden, G ? G : 32);
    const auto dn = kc::make_layout(dt, s.hidden, s.inter, G ? G : 32);
    const double expert_bytes = static_cast<double>(2 * gu.bytes() + dn.bytes());
    // At least 3 GB of layers, and call i uses layer i % L with routing i % 61 (a prime): the same
    // (layer, routing) pair comes back only after 61 L calls, so the experts read in between (GBs
    // even at decode) exceed any LLC. With 16 routings and 8 int4 layers, pairs repeated every 16
    // calls (~200 MB of int4 experts, inside a 300 MB L3).
    auto ex_all = make_named_executor(executors.front(), static_cast<int>(threads.back()));
    const double layer_bytes = expert_bytes * static_cast<double>(s.experts);
    const int num_layers = std::max(2, static_cast<int>(std::ceil(3e9 / layer_bytes)));
    auto layers = make_layers(s, gu, dn, num_layers, *ex_all);
    for (int64_t nt : threads)
      for (const std::string& exname : executors)
        for (int64_t flow : dataflows) {
          if (flow && exname == "tbb" && dataflows.size() > 1) continue;  // TBB has no hand-off
          auto ex = make_named_executor(exname, static_cast<int>(nt));
          {
            // Dispatch cost: an empty job of one item per thread, back to back.
            std::atomic<int64_t> items{0};
            std::function<void(int64_t, int64_t)> touch = [&](int64_t b, int64_t e) {
              items.fetch_add(e - b, std::memory_order_relaxed);
            };
            for (int i = 0; i < 100; ++i) ex->parallel_for_even(nt, touch);
            const int calls = 20000;
            const double t0 = now_s();
            for (int i = 0; i < calls; ++i) ex->parallel_for_even(nt, touch);
            std::printf(
                "{\"bench\":\"dispatch\",\"executor\":\"%s\",\"threads\":%ld,"
                "\"us_per_job\":%.2f}\n",
                exname.c_str(), static_cast<long>(nt), (now_s() - t0) / calls * 1e6);
          }
          const double bw = measure_bandwidth(*ex, size_t{2} << 30, 5);
          double peak_bf16 = 0, peak_int8 = 0;
          if (isa == Isa::kAmx) {
            peak_bf16 = amx_peak(*ex, false);
            peak_int8 = amx_peak(*ex, true);
          }
          for (int64_t m : ms) {
            kc::MoeExperts op(isa);
            op.set_dataflow(flow != 0);
            std::vector<float> src(static_cast<size_t>(m * s.hidden)), dst(src.size());
            std::mt19937 g(7);
            std::normal_distribution<float> nd(0.f, 1.f);
            for (auto& v : src) v = nd(g);
            constexpr int kRoutings = 61;
            std::vector<Routing> routes;
            for (int r = 0; r < kRoutings; ++r) routes.push_back(route(s, m, 100 + r));
            auto call = [&](int64_t i) {
              const Routing& r = routes[i % kRoutings];
              const Layer& L = layers[i % num_layers];
              kc::MoeExpertsArgs a;
              a.gate_up = &gu;
              a.down = &dn;
              a.experts = L.experts.data();
              a.num_experts = s.experts;
              a.src = src.data();
              a.ld_src = s.hidden;
              a.m = m;
              a.ids = r.ids.data();
              a.weights = r.w.data();
              a.top_k = s.top_k;
              a.dst = dst.data();
              a.ld_dst = s.hidden;
              op.run(a, *ex);
            };
            for (int i = 0; i < 3; ++i) call(i);  // workspace growth, page faults
            op.set_profile(true);
            std::vector<double> times, phases[4];
            const double t_end = now_s() + seconds;
            int64_t i = 3;
            while (now_s() < t_end || times.size() < 5) {
              // --gap-us: the calling thread busy-waits between calls, as the GPU's share of a
              // layer leaves the workers idle in a hybrid decode step.
              if (gap_us > 0)
                for (const double g0 = now_s(); now_s() - g0 < gap_us * 1e-6;) {
                }
              const double t0 = now_s();
              call(i++);
              times.push_back(now_s() - t0);
              for (int p = 0; p < 4; ++p) phases[p].push_back(op.phase_seconds()[p]);
            }
            std::sort(times.begin(), times.end());
            double ph[4];
            for (int p = 0; p < 4; ++p) {
              std::sort(phases[p].begin(), phases[p].end());
              ph[p] = phases[p][phases[p].size() / 2] * 1e6;
            }
            const double t = times[times.size() / 2];
            // Decode sizes: the probe again right after the op's calls, since on a shared host
            // it moves by several percent between minutes; bw_fraction_worst divides by the
            // larger of the two readings.
            const double bw_after = m <= 16 ? measure_bandwidth(*ex, size_t{2} << 30, 5) : bw;
            double uniq = 0;
            for (const auto& r : routes) uniq += static_cast<double>(r.unique);
            uniq /= kRoutings;
            const double bytes = uniq * expert_bytes;
            const double flops = 2.0 * static_cast<double>(m * s.top_k) * 3.0 *
                                 static_cast<double>(s.hidden * s.inter);
            const double peak = dt == kc::ExpertDType::kBF16 ? peak_bf16 : peak_int8;
            const double roof = peak > 0 ? std::min(peak, bw * flops / bytes) : bw * flops / bytes;
            std::printf(
                "{\"bench\":\"moe_experts\",\"shape\":\"%s\",\"dtype\":\"%s\",\"group\":%ld,\"m\":%"
                "ld,"
                "\"threads\":%ld,\"kernels\":\"%s\",\"median_us\":%.1f,\"min_us\":%.1f,\"calls\":%"
                "zu,"
                "\"expert_bytes_per_call\":%.0f,\"gbps\":%.2f,\"read_bw_gbps\":%.2f,"
                "\"read_bw_after_gbps\":%.2f,\"bw_fraction_worst\":%.3f,"
                "\"bw_fraction\":%.3f,\"tflops\":%.3f,\"amx_peak_bf16_tflops\":%.2f,"
                "\"amx_peak_int8_tops\":%.2f,\"roofline_tflops\":%.3f,\"roofline_fraction\":%.3f,"
                "\"layers\":%d,\"llc_bytes\":%ld,\"cpu\":\"%s\",\"isa\":\"%s\","
                "\"executor\":\"%s\",\"dataflow\":%d,\"anon_huge_kb\":%ld,\"gap_us\":%.0f,"
                "\"phase_us\":{\"prepare_x\":%.1f,\"gate_up\":%.1f,\"prepare_h\":%.1f,\"down\":%."
                "1f}}"
                "\n",
                s.name, dname.c_str(), static_cast<long>(G), static_cast<long>(m),
                static_cast<long>(nt), op.last_variants().c_str(), t * 1e6, times.front() * 1e6,
                times.size(), bytes, bytes / t / 1e9, bw / 1e9, bw_after / 1e9,
                bytes / t / std::max(bw, bw_after), bytes / t / bw, flops / t / 1e12,
                peak_bf16 / 1e12, peak_int8 / 1e12, roof / 1e12, flops / t / roof, num_layers, llc,
                f.brand.c_str(), std::string(tidal::kernels::isa_name(isa)).c_str(), exname.c_str(),
                op.last_dataflow() ? 1 : 0, anon_huge_kb(), gap_us, ph[0], ph[1], ph[2], ph[3]);
            std::fflush(stdout);
            if (trace_calls && op.last_dataflow()) {
              // Per-thread timeline (MoeExperts::set_trace) over at least `seconds` of calls:
              // for each share and point, the median offset from the job's dispatch (µs; the
              // wait point is a duration), then the run's own marks.
              using Op = kc::MoeExperts;
              op.set_trace(true);
              const int P = Op::kTracePoints;
              const int T = static_cast<int>(nt);
              std::vector<std::vector<double>> pts(static_cast<size_t>((T + 1) * P));
              std::vector<double> stolen;  // items taken from other shares, per call
              // Per call: the last share's start, gate/up end and down end (µs from dispatch).
              std::vector<double> last_start, last_gate_up, last_down;
              const double t_stop = now_s() + seconds;
              while (now_s() < t_stop || pts[static_cast<size_t>(T * P + 1)].size() < 5) {
                call(i++);
                const auto& tr = op.last_trace();
                if (static_cast<int>(tr.size()) != (T + 1) * P) break;
                stolen.push_back(static_cast<double>(op.last_stolen()));
                const int64_t t0 = tr[static_cast<size_t>(T * P + 1)];  // dispatch
                int64_t ls = 0, lg = 0, ld = 0;
                for (int sh = 0; sh < T; ++sh) {
                  ls = std::max(ls, tr[static_cast<size_t>(sh * P + Op::kShareStart)] - t0);
                  lg = std::max(lg, tr[static_cast<size_t>(sh * P + Op::kGateUpDone)] - t0);
                  ld = std::max(ld, tr[static_cast<size_t>(sh * P + Op::kDownDone)] - t0);
                }
                last_start.push_back(static_cast<double>(ls) / 1e3);
                last_gate_up.push_back(static_cast<double>(lg) / 1e3);
                last_down.push_back(static_cast<double>(ld) / 1e3);
                for (int q = 0; q < (T + 1) * P; ++q) {
                  const bool dur = q < T * P && (q % P == Op::kWaitNs || q % P == Op::kReduceNs);
                  pts[static_cast<size_t>(q)].push_back(
                      static_cast<double>(dur ? tr[static_cast<size_t>(q)]
                                              : tr[static_cast<size_t>(q)] - t0) /
                      1e3);
                }
              }
              op.set_trace(false);
              auto med = [](std::vector<double>& v) {
                if (v.empty()) return 0.0;
                std::sort(v.begin(), v.end());
                return v[v.size() / 2];
              };
              std::printf(
                  "{\"bench\":\"decode_trace\",\"shape\":\"%s\",\"dtype\":\"%s\",\"m\":%ld,"
                  "\"threads\":%d,\"calls\":%zu,\"points\":[\"start\",\"own_gate_up\","
                  "\"gate_up\",\"wait_us\",\"own_down\",\"down\",\"barrier\",\"reduce\","
                  "\"reduce_us\"],"
                  "\"entry_us\":%.2f,\"grouped_us\":%.2f,\"prepared_us\":%.2f,"
                  "\"return_us\":%.2f,\"stolen_items\":%.0f,\"last_start_us\":%.2f,"
                  "\"last_gate_up_us\":%.2f,\"last_down_us\":%.2f,\"shares\":[",
                  s.name, dname.c_str(), static_cast<long>(m), T,
                  pts[static_cast<size_t>(T * P + 1)].size(), med(pts[static_cast<size_t>(T * P)]),
                  med(pts[static_cast<size_t>(T * P + 3)]),
                  med(pts[static_cast<size_t>(T * P + 4)]),
                  med(pts[static_cast<size_t>(T * P + 2)]), med(stolen), med(last_start),
                  med(last_gate_up), med(last_down));
              for (int sh = 0; sh < T; ++sh) {
                std::printf("%s[", sh ? "," : "");
                for (int q = 0; q < P; ++q)
                  std::printf("%s%.2f", q ? "," : "", med(pts[static_cast<size_t>(sh * P + q)]));
                std::printf("]");
              }
              std::printf("]}\n");
              std::fflush(stdout);
            }
#ifdef TIDAL_BENCH_ONEDNN
            if (onednn && dt != kc::ExpertDType::kINT4 && m >= 128) {
              OnednnMoe od(s, dt == kc::ExpertDType::kINT8);
              using dt_ = dnnl::memory::data_type;
              // Routing 0 grouped per expert; weights: one layer per call in rotation, as above.
              const Routing& r = routes[0];
              std::vector<std::vector<int64_t>> tok(static_cast<size_t>(s.experts));
              for (int64_t q = 0; q < m * s.top_k; ++q) tok[r.ids[q]].push_back(q / s.top_k);
              const auto& p0 = od.get(64);
              // Weights per layer per expert in oneDNN's preferred format (contents: constant).
              std::vector<std::vector<OnednnMoe::Mats>> wl(static_cast<size_t>(num_layers));
              for (auto& ws : wl) {
                ws.resize(static_cast<size_t>(s.experts));
                for (auto& mt : ws) {
                  mt.gate = dnnl::memory(p0.wei_gu, od.eng);
                  mt.up = dnnl::memory(p0.wei_gu, od.eng);
                  mt.down = dnnl::memory(p0.wei_dn, od.eng);
                  for (auto* mm : {&mt.gate, &mt.up, &mt.down})
                    std::memset(mm->get_data_handle(), 1, mm->get_desc().get_size());
                }
              }
              const bool i8 = dt == kc::ExpertDType::kINT8;
              const size_t es = i8 ? 1 : 2;
              std::vector<uint8_t> xs(
                  static_cast<size_t>(m * s.top_k * std::max(s.hidden, s.inter)) * es, 0x3c);
              std::vector<float> gbuf(static_cast<size_t>(m * s.top_k * s.inter)),
                  ubuf(gbuf.size()), ybuf(static_cast<size_t>(m * s.top_k * s.hidden));
              std::vector<float> scales_i(static_cast<size_t>(s.inter), 1e-3f),
                  scales_h(static_cast<size_t>(s.hidden), 1e-3f);
              auto run_od = [&](int64_t it) {
                const auto& ws = wl[it % num_layers];
                int64_t off = 0;
                for (int64_t e = 0; e < s.experts; ++e) {
                  const int64_t me = static_cast<int64_t>(tok[e].size());
                  if (me == 0) continue;
                  const auto& p = od.get(me);
                  // Gather rows of the expert's tokens (as our op does) and convert.
                  dnnl::memory xsrc(p.src_gu, od.eng, xs.data() + off * s.hidden * es);
                  dnnl::memory gdst(p.dst_gu, od.eng, gbuf.data() + off * s.inter);
                  dnnl::memory udst(p.dst_gu, od.eng, ubuf.data() + off * s.inter);
                  std::unordered_map<int, dnnl::memory> args = {
                      {DNNL_ARG_SRC, xsrc}, {DNNL_ARG_WEIGHTS, ws[e].gate}, {DNNL_ARG_DST, gdst}};
                  dnnl::memory sc_i({{s.inter}, dt_::f32, dnnl::memory::format_tag::a}, od.eng,
                                    scales_i.data());
                  dnnl::memory sc_h({{s.hidden}, dt_::f32, dnnl::memory::format_tag::a}, od.eng,
                                    scales_h.data());
#if DNNL_VERSION_MAJOR >= 3
                  constexpr int kScalesArg = DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS;
#else
                  constexpr int kScalesArg = DNNL_ARG_ATTR_OUTPUT_SCALES;
#endif
                  if (i8) args[kScalesArg] = sc_i;
                  p.gu.execute(od.strm, args);
                  args[DNNL_ARG_WEIGHTS] = ws[e].up;
                  args[DNNL_ARG_DST] = udst;
                  p.gu.execute(od.strm, args);
                  // silu(g)·u into the down projection's source (bf16 or u8), threaded like ours.
                  uint8_t* hs = xs.data() + off * s.inter * es;
                  auto silu_rows = [&](int64_t a0, int64_t a1) {
                    for (int64_t q = a0 * s.inter; q < a1 * s.inter; ++q) {
                      const float h = tidal::kernels::cpu::silu(gbuf[off * s.inter + q]) *
                                      ubuf[off * s.inter + q];
                      if (i8)
                        hs[q] = static_cast<uint8_t>(std::clamp(h * 100.f + 128.f, 0.f, 255.f));
                      else
                        reinterpret_cast<uint16_t*>(hs)[q] = tidal::kernels::f32_to_bf16(h);
                    }
                  };
#ifdef TIDAL_BENCH_OMP
                  // Note [oneDNN on its own threads]: a job on tidal's spinning workers here
                  // kept them polling for 2 ms (TIDAL_SPIN_US) on the cores oneDNN's OpenMP
                  // threads run on, after every expert: the 16-thread oneDNN 3 matmul then took
                  // ~1 s per layer (twelfth-session code, thirteenth session's first device call)
                  // against ~0.2 s on one thread. So the baseline runs all its work on OpenMP.
#pragma omp parallel for
                  for (int64_t a0 = 0; a0 < me; ++a0) silu_rows(a0, a0 + 1);
#else
                  ex->parallel_for(me, 1, silu_rows);
#endif
                  dnnl::memory hsrc(p.src_dn, od.eng, hs);
                  dnnl::memory ydst(p.dst_dn, od.eng, ybuf.data() + off * s.hidden);
                  std::unordered_map<int, dnnl::memory> a2 = {
                      {DNNL_ARG_SRC, hsrc}, {DNNL_ARG_WEIGHTS, ws[e].down}, {DNNL_ARG_DST, ydst}};
                  if (i8) a2[kScalesArg] = sc_h;
                  p.dn.execute(od.strm, a2);
                  off += me;
                }
                od.strm.wait();
              };
              for (int w = 0; w < 2; ++w) run_od(w);
              std::vector<double> ot;
              const double oend = now_s() + seconds;
              int64_t it = 2;
              while (now_s() < oend || ot.size() < 3) {
                const double t0 = now_s();
                run_od(it++);
                ot.push_back(now_s() - t0);
              }
              std::sort(ot.begin(), ot.end());
              const double to = ot[ot.size() / 2];
              std::printf(
                  "{\"bench\":\"onednn_matmul_experts\",\"shape\":\"%s\",\"dtype\":\"%s\",\"m\":%"
                  "ld,"
                  "\"threads\":%ld,\"onednn\":\"%d.%d.%d\",\"median_us\":%.1f,\"tflops\":%.3f,"
                  "\"tidal_speedup\":%.3f}\n",
                  s.name, dname.c_str(), static_cast<long>(m), static_cast<long>(nt),
                  dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch, to * 1e6,
                  flops / to / 1e12, to / t);
              std::fflush(stdout);
            }
#else
            (void)onednn;
#endif
          }
        }
    for (auto& L : layers) munmap(L.region, L.bytes);
  }
}

// Single-thread micro-benchmark of one tile kernel: `hot` reuses one tile (weights in L1/L2: the
// kernel's compute rate), `cold` walks tiles of a 1 GiB buffer (with the DRAM stream).
void run_micro(const Shape& s, const std::vector<std::string>& dtypes,
               const std::vector<int64_t>& ms) {
  const Isa isa = tidal::kernels::resolve_isa("auto");
  for (const auto& dname : dtypes) {
    const kc::ExpertDType dt = kc::parse_expert_dtype(dname);
    const int64_t G = dt == kc::ExpertDType::kBF16 ? 32 : kc::default_group_size(dt);
    const auto l = kc::make_layout(dt, 16, s.hidden, G);
    const size_t total = size_t{1} << 30;
    const int64_t ntiles = static_cast<int64_t>(total / static_cast<size_t>(l.tile_bytes));
    auto* buf =
        static_cast<uint8_t*>(std::aligned_alloc(4096, static_cast<size_t>(ntiles * l.tile_bytes)));
    std::vector<float> w(static_cast<size_t>(16 * s.hidden));
    std::mt19937 g(3);
    std::normal_distribution<float> nd(0.f, 0.02f);
    for (auto& v : w) v = nd(g);
    kc::pack_weights(l, w.data(), tidal::kernels::DType::kF32, s.hidden, buf, 0, 1);
    for (int64_t t = 1; t < ntiles; ++t)
      std::memcpy(buf + t * l.tile_bytes, buf, static_cast<size_t>(l.tile_bytes));
    for (int64_t m : ms) {
      const char* ab = std::getenv("TIDAL_EXPERT_AMX_BF16");  // as MoeExperts picks
      const auto& v = kc::select_expert_gemm(dt, isa, m, &l, kc::parse_approximation(ab ? ab : ""));
      kc::ActBuffer a;
      a.reserve(v.act, l, m, isa);
      std::vector<float> x(static_cast<size_t>(s.hidden));
      for (auto& e : x) e = nd(g) * 50.f;
      for (int64_t i = 0; i < m; ++i) a.prepare(i, x.data());
      alignas(64) static float out[kc::kMaxRowsPerCall * kc::kTileRows],
          out1[kc::kMaxRowsPerCall * kc::kTileRows];
      // Variants with a two-tile entry (AMX) run as the op calls them: two tiles per call.
      const int tiles = v.run2 != nullptr ? 2 : 1;
      for (int cold = 0; cold < 2; ++cold) {
        const int64_t calls = cold ? std::min<int64_t>(ntiles / 2, 20000) : 20000;
        const double t0 = now_s();
        for (int64_t c = 0; c < calls; ++c) {
          const uint8_t* t = buf + (cold ? 2 * c : 0) * l.tile_bytes;
          if (tiles == 2)
            v.run_pair(l, t, t + l.tile_bytes, a.rows(0), m, out, out1);
          else
            v.run(l, t, a.rows(0), m, out);
        }
        const double t = (now_s() - t0) / static_cast<double>(calls);
        std::printf(
            "{\"bench\":\"micro\",\"variant\":\"%s\",\"m\":%ld,\"k\":%ld,\"cold\":%d,"
            "\"tiles_per_call\":%d,\"us_per_call\":%.3f,\"weight_gbps\":%.2f,\"tflops\":%.3f}\n",
            v.name, static_cast<long>(m), static_cast<long>(s.hidden), cold, tiles, t * 1e6,
            static_cast<double>(tiles * l.tile_bytes) / t / 1e9,
            2.0 * tiles * static_cast<double>(m) * 16 * static_cast<double>(s.hidden) / t / 1e12);
        std::fflush(stdout);
      }
    }
    std::free(buf);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string shape = "35b", dtypes = "int4,int8,bf16", ms = "1,4,16,128,512,2048";
  std::string threads = std::to_string(std::thread::hardware_concurrency());
  std::string executors = "spin", dataflows = "1";
  double seconds = 0.5;
  int64_t group = 0;
  bool onednn = false, micro = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--shape")
      shape = next();
    else if (a == "--dtypes")
      dtypes = next();
    else if (a == "--m")
      ms = next();
    else if (a == "--threads")
      threads = next();
    else if (a == "--seconds")
      seconds = std::stod(next());
    else if (a == "--group")
      group = std::stoll(next());
    else if (a == "--gap-us")
      gap_us = std::stod(next());
    else if (a == "--onednn")
      onednn = true;
    else if (a == "--trace")
      trace_calls = true;
    else if (a == "--micro")
      micro = true;
    else if (a == "--executors")  // spin (the runtime's), tbb, or both: spin,tbb
      executors = next();
    else if (a == "--dataflow")  // 1 (the default), 0, or 0,1: Note [Per-expert hand-off]
      dataflows = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  // Qwen3.6-35B-A3B: hidden 2048, expert intermediate 512, 8 of 256; Qwen3-Next-80B-A3B: 10 of 512.
  const Shape s35{"qwen3.6-35b-a3b", 2048, 512, 256, 8},
      s80{"qwen3-next-80b-a3b", 2048, 512, 512, 10},
      // tidal-mini's shape: the op's fixed cost per call (dispatch, hand-off, reduction).
      smini{"tidal-mini", 256, 32, 48, 4};
  if (micro) {
    run_micro(s35, parse_names(dtypes), parse_list(ms));
    return 0;
  }
  for (const auto& sh : parse_names(shape))
    run_shape(sh == "80b"    ? s80
              : sh == "mini" ? smini
                             : s35,
              parse_names(dtypes), parse_list(ms), parse_list(threads), seconds, group, onednn,
              parse_names(executors), parse_list(dataflows));
  return 0;
}
