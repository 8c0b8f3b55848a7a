// SPDX-License-Identifier: Apache-2.0
/// \file persistent_chain.cu
/// \brief See persistent_chain.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "persistent_chain.h"

namespace tidal::bench {
namespace {

// Note [persistent GEMV chain experiment]
// The decode step is ~200 dependent kernels; the GEMVs alone reach 77% of the read bandwidth
// chained as launches with programmatic dependent launch, because a launch's blocks cannot start
// (and issue their weight loads) before the previous GEMV's resident blocks leave the SM. Here the
// blocks stay: one cooperative kernel walks the whole chain, each warp issuing its first two
// weight segments of GEMV i + 1 as soon as its part of GEMV i is done, then waiting at a grid-wide
// barrier for GEMV i's output, then staging it and streaming on. The same per-warp row streaming
// as the runtime's streaming GEMV (two 4 KB segments in flight per warp), plain input (the shared
// expert's SwiGLU product left out: bytes are what matter). If this chain beats the launched
// chain by more than the barrier costs, a persistent per-layer decode kernel is worth building.
// Result (H100, 2026-12-06, docs/performance.md): it does not. 1.99 ms at 264 blocks and 2.12 ms
// at 132 against 1.63 ms launched with PDL; one grid barrier costs ~2 µs, more than a launch
// boundary does with PDL.

constexpr int kWarps = 8, kWarp = 32, kSeg = 8;

struct Dev {
  const uint4* w;
  int rows, cols;
};

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Sense-free generation barrier over every block of the grid (all resident: cooperative launch).
__device__ void grid_barrier(unsigned* count, unsigned* gen, unsigned nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned g = atomicAdd(gen, 0u);
    __threadfence();
    if (atomicAdd(count, 1u) == nblocks - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(gen, 1u);
    } else {
      while (atomicAdd(gen, 0u) == g) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kWarps* kWarp)
    chain_kernel(const Dev* __restrict__ gs, int n, float* xa, float* xb, unsigned* bar) {
  extern __shared__ float4 xs4[];
  float* xs = reinterpret_cast<float*>(xs4);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  uint4 a[kSeg], b[kSeg];
  // Segment t of GEMV g for this warp: row gw + (t / segs) · nwarps, chunks of 8 BF16.
  auto load = [&](uint4(&buf)[kSeg], const Dev& d, int64_t t) {
    const int64_t nchunk = d.cols / 8, segs = (nchunk + kSeg * kWarp - 1) / (kSeg * kWarp);
    const uint4* rp = d.w + (gw + (t / segs) * nwarps) * nchunk;
    const int64_t c0 = (t % segs) * (kSeg * kWarp) + lane;
#pragma unroll
    for (int i = 0; i < kSeg; ++i)
      if (c0 + i * kWarp < nchunk) buf[i] = ld_stream(rp + c0 + i * kWarp);
  };
  auto items_of = [&](const Dev& d) -> int64_t {
    const int64_t nchunk = d.cols / 8, segs = (nchunk + kSeg * kWarp - 1) / (kSeg * kWarp);
    return gw < d.rows ? ((d.rows - 1 - gw) / nwarps + 1) * segs : 0;
  };
  if (n > 0) {
    const int64_t it = items_of(gs[0]);
    if (it > 0) load(a, gs[0], 0);
    if (it > 1) load(b, gs[0], 1);
  }
  for (int g = 0; g < n; ++g) {
    const Dev d = gs[g];
    const float* in = g % 2 ? xb : xa;
    float* out = g % 2 ? xa : xb;
    if (g > 0) grid_barrier(bar, bar + 1, gridDim.x);  // GEMV g − 1's output is complete
    for (int64_t j = threadIdx.x * 4; j < d.cols; j += blockDim.x * 4)
      *reinterpret_cast<float4*>(xs + j) = __ldcg(reinterpret_cast<const float4*>(in + j));
    __syncthreads();
    const int64_t nchunk = d.cols / 8, segs = (nchunk + kSeg * kWarp - 1) / (kSeg * kWarp);
    const int64_t items = items_of(d);
    float acc = 0.f;
    auto fma_seg = [&](const uint4(&buf)[kSeg], int64_t t) {
      const int64_t c0 = (t % segs) * (kSeg * kWarp) + lane;
#pragma unroll
      for (int i = 0; i < kSeg; ++i) {
        const int64_t c = c0 + i * kWarp;
        if (c < nchunk) {
          const uint32_t w4[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
          const float* xr = xs + c * 8;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc = fmaf(__uint_as_float(w4[q] << 16), xr[2 * q], acc);
            acc = fmaf(__uint_as_float(w4[q] & 0xffff0000u), xr[2 * q + 1], acc);
          }
        }
      }
      if (t % segs == segs - 1) {
        const float v = warp_sum(acc);
        acc = 0.f;
        if (lane == 0) out[gw + (t / segs) * nwarps] = v;
      }
    };
    for (int64_t t = 0; t < items; t += 2) {
      fma_seg(a, t);
      if (t + 2 < items) load(a, d, t + 2);
      if (t + 1 < items) {
        fma_seg(b, t + 1);
        if (t + 3 < items) load(b, d, t + 3);
      }
    }
    // The next GEMV's first two segments, before the barrier (weights: nothing writes them).
    if (g + 1 < n) {
      const Dev& nd = gs[g + 1];
      const int64_t it = items_of(nd);
      if (it > 0) load(a, nd, 0);
      if (it > 1) load(b, nd, 1);
    }
    __syncthreads();  // xs is rewritten after the barrier
  }
}

__global__ void barrier_kernel(int n, unsigned* bar) {
  for (int i = 0; i < n; ++i) grid_barrier(bar, bar + 1, gridDim.x);
}

double median_ms(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

PersistentChainResult persistent_gemv_chain(const std::vector<ChainGemv>& chain, float* xa,
                                            float* xb, int reps, int blocks_per_sm,
                                            cudaStream_t s) {
  PersistentChainResult r;
  int dev = 0, sms = 0, coop = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  int64_t kmax = 8;
  for (const auto& c : chain) kmax = std::max(kmax, c.cols);
  const size_t smem = static_cast<size_t>(kmax) * 4;
  int occ = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, chain_kernel, kWarps * kWarp, smem);
  const int bps = blocks_per_sm > 0 ? std::min(blocks_per_sm, occ) : occ;
  if (!coop || bps < 1 || kmax > 8192) return r;
  r.blocks = sms * bps;
  std::vector<Dev> hd;
  for (const auto& c : chain)
    hd.push_back(
        Dev{static_cast<const uint4*>(c.w), static_cast<int>(c.rows), static_cast<int>(c.cols)});
  Dev* dd = nullptr;
  unsigned* bar = nullptr;
  cudaMalloc(&dd, hd.size() * sizeof(Dev));
  cudaMemcpy(dd, hd.data(), hd.size() * sizeof(Dev), cudaMemcpyHostToDevice);
  cudaMalloc(&bar, 2 * sizeof(unsigned));
  cudaMemset(bar, 0, 2 * sizeof(unsigned));
  cudaFuncSetAttribute(chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  int n = static_cast<int>(hd.size());
  void* args[] = {&dd, &n, &xa, &xb, &bar};
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> t;
  for (int i = 0; i <= reps; ++i) {  // the first is a warm-up
    cudaEventRecord(e0, s);
    const cudaError_t err = cudaLaunchCooperativeKernel(
        reinterpret_cast<void*>(chain_kernel), dim3(r.blocks), dim3(kWarps * kWarp), args, smem, s);
    cudaEventRecord(e1, s);
    if (err != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess) {
      cudaGetLastError();
      r.blocks = 0;
      break;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i > 0) t.push_back(ms);
  }
  if (r.blocks > 0) {
    r.ms = median_ms(t);
    // One barrier alone: a kernel of 1000 of them.
    int nb = 1000;
    void* bargs[] = {&nb, &bar};
    std::vector<float> tb;
    for (int i = 0; i < 5; ++i) {
      cudaEventRecord(e0, s);
      cudaLaunchCooperativeKernel(reinterpret_cast<void*>(barrier_kernel), dim3(r.blocks),
                                  dim3(kWarps * kWarp), bargs, 0, s);
      cudaEventRecord(e1, s);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      tb.push_back(ms);
    }
    r.barrier_us = median_ms(tb) * 1e3 / nb;
    r.ran = true;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(dd);
  cudaFree(bar);
  return r;
}

}  // namespace tidal::bench
