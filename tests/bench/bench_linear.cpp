// SPDX-License-Identifier: Apache-2.0
/// \file bench_linear.cpp
/// \brief Benchmark (not a test) of the dense CPU projection kernels::cpu::linear (Note [CPU
/// linear]) on Qwen3.6-35B-A3B's dense shapes, each ISA path this CPU has. Few tokens: GB/s of
/// weight bytes against the read bandwidth measured in the same run (the weights cycle through
/// enough copies to leave the caches, as 40 layers do). Many tokens: GFLOP/s against the FMA peak
/// of the same threads, measured in the same run. JSON lines on stdout.
///
/// Usage: tidal_bench_linear [--threads N] [--m 1,2,4,512] [--isas ref,avx2] [--seconds 1]
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.h"
#include "kernels/common/cpu_features.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/linear.h"

namespace kc = tidal::kernels::cpu;
using tidal::bench::measure_bandwidth;
using tidal::bench::now_s;
using tidal::bench::parse_list;
using tidal::bench::parse_names;
using tidal::kernels::Executor;
using tidal::kernels::Isa;

namespace {

// FMA peak: every thread runs independent 256-bit FMA chains (10 accumulators hide the latency).
__attribute__((target("avx2,fma"))) float fma_spin(int64_t iters) {
  __m256 a[10];
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(1.0f + 1e-7f * static_cast<float>(i));
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  __m256 s = a[0];
  for (int i = 1; i < 10; ++i) s = _mm256_add_ps(s, a[i]);
  alignas(32) float v[8];
  _mm256_store_ps(v, s);
  return v[0];
}

/// FLOP/s of all threads issuing FMAs (16 FLOPs per 256-bit FMA).
double fma_peak(Executor& ex) {
  constexpr int64_t kIters = 20'000'000;
  std::vector<float> sink(static_cast<size_t>(ex.num_threads()));
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    const double t0 = now_s();
    ex.parallel_for_even(ex.num_threads(), [&](int64_t a, int64_t b) {
      for (int64_t w = a; w < b; ++w) sink[static_cast<size_t>(w)] = fma_spin(kIters);
    });
    best = std::max(best,
                    10.0 * 16.0 * static_cast<double>(kIters) * ex.num_threads() / (now_s() - t0));
  }
  return best;
}

struct Shape {
  const char* name;
  int64_t n, k;
};

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  std::vector<int64_t> ms = {1, 2, 4, 512};
  std::vector<std::string> isas = {"ref", "avx2"};
  double seconds = 1.0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--threads") {
      threads = std::stoi(next());
    } else if (a == "--m") {
      ms = parse_list(next());
    } else if (a == "--isas") {
      isas = parse_names(next());
    } else if (a == "--seconds") {
      seconds = std::stod(next());
    } else {
      std::fprintf(stderr,
                   "usage: tidal_bench_linear [--threads N] [--m 1,2,4,512] [--isas ref,avx2] "
                   "[--seconds 1]\n");
      return 2;
    }
  }
  auto ex = tidal::kernels::make_executor(threads > 0 ? threads : 0, 0);
  const double bw = measure_bandwidth(*ex, size_t{1} << 30, 5);
  // The FMA peak needs AVX2 + FMA (0 where the CPU lacks them: no fraction is meaningful).
  const bool has_avx2 = tidal::kernels::cpu_features().best >= Isa::kAvx2;
  const double peak = has_avx2 ? fma_peak(*ex) : 0.0;
  std::printf(
      "{\"bench\":\"linear_machine\",\"cpu\":\"%s\",\"threads\":%d,\"read_bw_gbps\":%.2f,"
      "\"fma_peak_gflops\":%.1f}\n",
      tidal::kernels::cpu_features().brand.c_str(), ex->num_threads(), bw * 1e-9, peak * 1e-9);
  std::fflush(stdout);
  // Qwen3.6-35B-A3B: DeltaNet in-projection (q, k, v, z), out_proj, the shared expert's up.
  const Shape shapes[] = {
      {"gdn_in_proj", 12288, 2048}, {"out_proj", 2048, 4096}, {"shared_up", 512, 2048}};
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (const Shape& s : shapes) {
    const size_t bytes = static_cast<size_t>(s.n * s.k) * 2;
    // Enough copies to read 512 MiB before one repeats (far beyond the last-level cache).
    const size_t copies = std::max<size_t>(2, (size_t{512} << 20) / bytes);
    std::vector<std::vector<uint16_t>> w(copies);
    for (auto& c : w) {
      c.resize(static_cast<size_t>(s.n * s.k));
      for (auto& v : c) v = tidal::kernels::f32_to_bf16(u(rng));
    }
    for (int64_t m : ms) {
      std::vector<float> x(static_cast<size_t>(m * s.k)), y(static_cast<size_t>(m * s.n));
      for (auto& v : x) v = u(rng);
      for (const std::string& iname : isas) {
        Isa isa;
        try {
          isa = tidal::kernels::parse_isa(iname);
        } catch (const std::invalid_argument& e) {
          std::fprintf(stderr, "--isas: %s\n", e.what());
          return 2;
        }
        if (tidal::kernels::cpu_features().best < isa) continue;
        std::vector<double> t;
        size_t c = 0;
        const double end = now_s() + seconds;
        while (now_s() < end || t.size() < 3) {
          const tidal::kernels::WeightView wv{w[c].data(), tidal::kernels::DType::kBF16, s.n, s.k};
          c = (c + 1) % copies;
          const double t0 = now_s();
          kc::linear(x.data(), m, wv, y.data(), *ex, false, isa);
          t.push_back(now_s() - t0);
        }
        std::sort(t.begin(), t.end());
        const double med = t[t.size() / 2];
        const double flops = 2.0 * static_cast<double>(m * s.n * s.k);
        std::printf(
            "{\"bench\":\"linear\",\"shape\":\"%s\",\"n\":%ld,\"k\":%ld,\"m\":%ld,\"isa\":\"%s\","
            "\"threads\":%d,\"calls\":%zu,\"median_us\":%.1f,\"weight_gbps\":%.2f,"
            "\"bw_fraction\":%.3f,\"gflops\":%.2f,\"fma_peak_fraction\":%.3f}\n",
            s.name, static_cast<long>(s.n), static_cast<long>(s.k), static_cast<long>(m),
            iname.c_str(), ex->num_threads(), t.size(), med * 1e6, bytes / med * 1e-9,
            bytes / med / bw, flops / med * 1e-9, peak > 0 ? flops / med / peak : 0.0);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
