// SPDX-License-Identifier: Apache-2.0
/// \file ops.cu
/// \brief The CUDA kernels of ops.h. Each mirrors a CPU reference in kernels/cpu (tests compare
/// them on odd shapes): same formulas, fp32 arithmetic, reductions reordered for warps.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "kernels/cuda/ops.h"

namespace tidal::kernels::cuda {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
/// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // part may still be read by a previous call
  if (lane == 0) part[wid] = v;
  __syncthreads();
  const int nw = (blockDim.x + kWarp - 1) / kWarp;
  float t = lane < nw ? part[lane] : 0.f;
  return warp_sum(t);
}
__device__ __forceinline__ float bf16f(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }
__device__ __forceinline__ uint16_t f2bf16(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float siluf_(float x) { return x * sigmoidf_(x); }
__device__ __forceinline__ float softplusf_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

// Note [programmatic dependent launch]
// A decode step is a chain of ~400 dependent kernels, most of them small, and each boundary costs
// the drain of one grid plus the launch and ramp-up of the next (µs each, the bulk of the step
// beside the weight bytes). On sm_90+ every kernel here is launched with programmatic stream
// serialisation: the next kernel's blocks may start as soon as every block of the running one has
// passed `pdl_begin()`, and they wait in `griddepcontrol.wait` until the running grid has finished
// and its writes are visible. The rule that keeps this exactly as ordered as plain launches: a
// kernel touches no global memory before `pdl_wait()` except weights, which nothing writes during
// a forward (the GEMV loads its first weight chunks there, so weight streaming overlaps the tail of
// the kernels before it), and a DeltaNet layer's conv and recurrent state, which only that layer's
// own conv / delta-rule kernel writes and never as the kernel just before its next reader (when a
// kernel starts, every kernel before its immediate predecessor has finished: each passes
// `pdl_wait()` before it lets the next one start), located through `StepDev`, which only
// host-to-device copies write. Callers keep that true: ops.h says which kernels read state early.
// Captured into the decode graphs as programmatic edges. TIDAL_CUDA_PDL=0 or set_pdl_enabled(false)
// turns it off (plain launches; the benchmark compares both).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Note [Kernel stamps]
// Where a graph-replayed decode step spends its time, kernel by kernel, without a profiler: while
// stamps are on (stamps_begin), thread 0 of block 0 of every kernel that passes pdl_begin records
// %globaltimer when it reaches the dependency wait and when the wait releases it, with its grid
// and block size, into the next slot of a device buffer (an atomic counter orders them). With
// programmatic dependent launch a kernel's release is the moment the kernel before it finished and
// its writes became visible, so the gaps between consecutive releases split the step's critical
// path into one share per kernel (its own time plus the launch boundary after it); an entry well
// before the release shows the kernel was resident early. Off, the cost is one constant-cache
// load by one thread per kernel; the graphs need no recapture (the switch lives in constant
// memory and is read at run time).
__constant__ KernelStamp* c_stamps = nullptr;
__constant__ unsigned c_stamp_cap = 0;
__device__ unsigned g_stamp_n = 0;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// Start of every kernel launched through `launch`: wait for the kernel before it, then let the
/// next one be scheduled. `name`: the kernel's __func__ (Note [Kernel stamps]). Returns this
/// kernel's stamp where one is recorded (block 0, thread 0, stamps on), else null.
__device__ __forceinline__ KernelStamp* pdl_begin(const char* name) {
  const bool first =
      (threadIdx.x | threadIdx.y | threadIdx.z | blockIdx.x | blockIdx.y | blockIdx.z) == 0;
  KernelStamp* st = first ? c_stamps : nullptr;
  const unsigned long long entry = st ? global_ns() : 0;
  pdl_wait();
  unsigned i = 0;
  if (st) {
    const unsigned long long release = global_ns();
    i = atomicAdd(&g_stamp_n, 1u);
    if (i < c_stamp_cap) {
      st[i].entry_ns = entry;
      st[i].release_ns = release;
      st[i].blocks = gridDim.x * gridDim.y * gridDim.z;
      st[i].threads = blockDim.x * blockDim.y * blockDim.z;
      st[i].mark_ns[0] = st[i].mark_ns[1] = st[i].mark_ns[2] = 0;
    }
  }
  pdl_trigger();
  if (st && i < c_stamp_cap) {  // after the trigger: the name copy is off the chain
    int j = 0;
    for (; j + 1 < static_cast<int>(sizeof(st[i].name)) && name && name[j]; ++j)
      st[i].name[j] = name[j];
    st[i].name[j] = 0;
  }
  return st && i < c_stamp_cap ? st + i : nullptr;
}
/// Records the time of stage `j` (< 3) in the kernel's stamp (from pdl_begin; null: nothing).
__device__ __forceinline__ void stamp_mark(KernelStamp* st, int j) {
  if (st) st->mark_ns[j] = global_ns();
}

/// Launches `kernel` on `s`, with programmatic stream serialisation where the device has it.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
            Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

/// Lets `kernel` use `bytes` of dynamic shared memory (past the 48 KB default); false, with the
/// error cleared, where the device cannot give that much.
template <typename... KArgs>
bool allow_smem(void (*kernel)(KArgs...), size_t bytes) {
  const bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)) == cudaSuccess;
  if (!ok) cudaGetLastError();  // the error of this probe only
  return ok;
}

// ------------------------------------------------------------------------------------------ GEMV

/// Element j of row `row` as float (any format), for the scalar tail and gathers.
__device__ __forceinline__ float weight_at(const DevMatrix& w, int64_t row, int64_t j) {
  const int64_t i = row * w.cols + j;
  switch (w.format) {
    case WFormat::kF32:
      return static_cast<const float*>(w.data)[i];
    case WFormat::kBF16:
      return bf16f(static_cast<const uint16_t*>(w.data)[i]);
    default:
      return static_cast<float>(static_cast<const int8_t*>(w.data)[i]) * w.scale[row];
  }
}

/// 16 bytes of weights -> E floats (`convert` of one 16-byte load).
template <WFormat F>
struct Chunk;
template <>
struct Chunk<WFormat::kBF16> {
  static constexpr int E = 8;
  __device__ static void convert(const uint4 v, float* out) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <>
struct Chunk<WFormat::kF32> {
  static constexpr int E = 4;
  __device__ static void convert(const uint4 v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
};
template <>
struct Chunk<WFormat::kI8> {
  static constexpr int E = 16;
  // int8 q -> float without the (quarter-rate) integer conversion: q + 128 in [0, 255] placed in
  // the low mantissa byte of 2^23 (0x4B000000) is the float 2^23 + q + 128, exactly, so one byte
  // permute and one subtraction give q.
  __device__ static void convert(const uint4 v, float* out) {
    const uint32_t w[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u,
                           v.w ^ 0x80808080u};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int b = 0; b < 4; ++b)
        out[4 * i + b] =
            __uint_as_float(__byte_perm(w[i], 0x4B000000u, 0x7540u | static_cast<unsigned>(b))) -
            8388736.0f;
  }
};

constexpr int kGemvWarps = 8;  // warps per block
/// 16-byte weight chunks per lane loaded before the dependency wait: a whole 2048-wide BF16 row
/// per warp (32 registers a thread).
constexpr int kGemvPrefetch = 8;

/// What a GEMV launch takes (ops.h `gemv`, `gemv_rms_norm`).
struct GemvParams {
  DevMatrix w;
  const float* x = nullptr;
  int64_t ldx = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  const float* xu = nullptr;      ///< kGated: the input is silu(x) ⊙ xu
  const float* norm_w = nullptr;  ///< kNormed: the input is rms_norm(x) ⊙ norm_w (M = 1)
  float eps = 0.f;
  bool zero_centred = false;        ///< kNormed: ⊙ (1 + norm_w)
  const float* out_gate = nullptr;  ///< output × sigmoid(out_gate[m · ld_gate]) when set
  int64_t ld_gate = 0;
  bool accumulate = false, vec = false;
  int wpr = 1;
  int64_t group = 0;    ///< kGroupNormGated: values per RMS-normalised group (a value head)
  GdnConvEpilogue gdn;  ///< gemv_stream_kernel<..., true>: the DeltaNet decode epilogue
  RouteTail route;  ///< gemv_stream_kernel<..., RT = true>: Note [Router in the MoE in-projection]
};
/// How the GEMV forms its input vector from x.
enum class GemvIn { kPlain, kGated, kNormed, kGroupNormGated };

// Note [norm inside the GEMV]
// rms_norm(x) ⊙ w times Wᵀ equals inv_rms(x) · (W (x ⊙ w)), and every warp of a row already reads
// all of x (or its part of it, split K) for its dot product. So the normed GEMV accumulates Σ x²
// next to the dot product, reduces both the same way, and scales the row's result by
// rsqrt(Σ x² / K + eps) at the end: the norm costs one FMA per element and no kernel of its own.
// With the residual adds moved into the epilogues of the GEMVs that produce them (`accumulate`,
// `out_gate`), a decode layer needs no separate residual + norm kernel at all.

/// `wpr` warps per weight row (split K, partial sums added through shared memory); each lane
/// takes 16-byte chunks of its part of the row, M activation rows at once.
template <WFormat F, int M, GemvIn IN>
__global__ void __launch_bounds__(kGemvWarps* kWarp) gemv_kernel(const GemvParams p) {
  static_assert(IN != GemvIn::kNormed || M == 1, "the normed GEMV takes one row");
  constexpr int E = Chunk<F>::E;
  __shared__ float red[kGemvWarps][M + 1];  // dot products, then Σ x² (kNormed)
  const DevMatrix& w = p.w;
  const float* __restrict__ x = p.x;
  const float* __restrict__ xu = p.xu;
  const float* __restrict__ nw = p.norm_w;
  const int64_t ldx = p.ldx;
  const int wpr = p.wpr;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kGemvWarps / wpr) + warp / wpr;
  const int part = warp % wpr;
  const bool active = row < w.rows;
  const int64_t K = w.cols;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  float ss = 0.f;  // kNormed: Σ x² over this warp's part of the row
  int64_t j0 = 0;
  const int64_t nchunk = K / E, per = (nchunk + wpr - 1) / wpr;
  const int64_t c_begin = part * per + lane;
  const int64_t c_end = (part + 1) * per < nchunk ? (part + 1) * per : nchunk;
  const auto* base = static_cast<const uint4*>(w.data) + row * (K / E);
  // The lane's first kGemvPrefetch weight chunks are loaded before the dependency wait (Note
  // [programmatic dependent launch]): weights are constant, and these loads overlap the end of the
  // kernel that produces x.
  uint4 pre[kGemvPrefetch];
#pragma unroll
  for (int i = 0; i < kGemvPrefetch; ++i) {
    const int64_t c = c_begin + i * kWarp;
    if (p.vec && active && c < c_end) pre[i] = __ldg(base + c);
  }
  pdl_begin(__func__);
  const float nw0 = p.zero_centred ? 1.0f : 0.0f;
  // acc[m] += the chunk's E weights · the input at chunk c.
  auto fma_chunk = [&](const uint4 raw, int64_t c) {
    float wv[E];
    Chunk<F>::convert(raw, wv);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float* xr = x + m * ldx + c * E;
#pragma unroll
      for (int e = 0; e < E; e += 4) {
        float4 xv = *reinterpret_cast<const float4*>(xr + e);
        if constexpr (IN == GemvIn::kGated) {
          const float4 u = *reinterpret_cast<const float4*>(xu + m * ldx + c * E + e);
          xv = make_float4(siluf_(xv.x) * u.x, siluf_(xv.y) * u.y, siluf_(xv.z) * u.z,
                           siluf_(xv.w) * u.w);
        } else if constexpr (IN == GemvIn::kNormed) {
          ss = fmaf(xv.x, xv.x, fmaf(xv.y, xv.y, fmaf(xv.z, xv.z, fmaf(xv.w, xv.w, ss))));
          const float4 g = *reinterpret_cast<const float4*>(nw + c * E + e);
          xv = make_float4(xv.x * (nw0 + g.x), xv.y * (nw0 + g.y), xv.z * (nw0 + g.z),
                           xv.w * (nw0 + g.w));
        }
        acc[m] = fmaf(wv[e], xv.x, acc[m]);
        acc[m] = fmaf(wv[e + 1], xv.y, acc[m]);
        acc[m] = fmaf(wv[e + 2], xv.z, acc[m]);
        acc[m] = fmaf(wv[e + 3], xv.w, acc[m]);
      }
    }
  };
  if (p.vec && active) {
#pragma unroll
    for (int i = 0; i < kGemvPrefetch; ++i) {
      const int64_t c = c_begin + i * kWarp;
      if (c < c_end) fma_chunk(pre[i], c);
    }
#pragma unroll 8
    for (int64_t c = c_begin + kGemvPrefetch * kWarp; c < c_end; c += kWarp)
      fma_chunk(__ldg(base + c), c);
    j0 = nchunk * E;
  }
  for (int64_t j = j0 + part * kWarp + lane; active && j < K; j += kWarp * wpr) {
    float wj = weight_at(w, row, j);
    if (F == WFormat::kI8) wj = static_cast<float>(static_cast<const int8_t*>(w.data)[row * K + j]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xj = x[m * ldx + j];
      if constexpr (IN == GemvIn::kGated) xj = siluf_(xj) * xu[m * ldx + j];
      if constexpr (IN == GemvIn::kNormed) {
        ss = fmaf(xj, xj, ss);
        xj *= nw0 + nw[j];
      }
      acc[m] = fmaf(wj, xj, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) red[warp][m] = v;
  }
  if constexpr (IN == GemvIn::kNormed) {
    const float v = warp_sum(ss);
    if (lane == 0) red[warp][M] = v;
  }
  if (wpr > 1)
    __syncthreads();
  else
    __syncwarp();
  if (!active || part != 0 || lane >= M) return;
  const float sc = F == WFormat::kI8 ? w.scale[row] : 1.0f;
  float v = 0.f;
  for (int q = 0; q < wpr; ++q) v += red[warp + q][lane];
  v *= sc;
  if constexpr (IN == GemvIn::kNormed) {
    float sum_sq = 0.f;
    for (int q = 0; q < wpr; ++q) sum_sq += red[warp + q][M];
    v *= rsqrtf(sum_sq / static_cast<float>(K) + p.eps);
  }
  if (p.out_gate) v *= sigmoidf_(p.out_gate[lane * p.ld_gate]);
  float* d = p.y + lane * p.ldy + row;
  *d = p.accumulate ? *d + v : v;
}

// Note [streaming GEMV]
// The one-row decode GEMV (M = 1) is a chain of ~160 launches a step, most of them 2-50 MB, too
// short for a grid of short-lived blocks: every block waits one DRAM latency with a handful of
// loads in flight, reduces, exits, and the next block's first loads start only then, so the
// bytes in flight sag between block generations and at each kernel's ramp and tail (measured on
// an H100, launches of one shape chained in a graph: 52% of HBM bandwidth on 2048x4096, 29% on
// 1284x2048, 9% on the 2048x512 shared-expert down projection). This kernel is one wave of
// resident blocks instead:
//   - every warp owns whole rows (rows gw, gw + warps, ...), each row cut into segments of
//     kSeg 16-byte chunks per lane (a 2048-wide BF16 row is one 4 KB segment), and keeps two
//     segments' loads in flight in registers: the next segment is issued before the current one
//     is reduced;
//   - the input row is staged once per block in shared memory, where the RMSNorm (Σx² by a block
//     reduction) or the SwiGLU product is applied once, not per warp and chunk;
//   - the first two segments are loaded before the dependency wait (Note [programmatic dependent
//     launch]).
// A variant that kept three or four segments per warp in flight through cp.async into shared
// memory, one block per SM so that the next kernel's block fits beside it, measured slower on
// every shape (decode step 3.20 ms against 2.50 ms, H100): more resident warps mattered more than
// more bytes in flight per warp. Nor did the bulk-copy engine (one cp.async.bulk per 4 KB segment
// into an mbarrier ring, 192 KB per SM in flight without registers; commit 081e476, removed since):
// correct, but slower (step 2.51 against 2.40 ms), and the 12352x2048 projection took 21.3 µs
// either way, so bytes in flight are not what holds the large projections near 77%.
// Each lane sums its chunks (lane, lane + 32, ...) in turn and the warp adds the lanes as a tree,
// the order gemv_kernel uses with one warp per row. TIDAL_GEMV_STREAM=0 turns it off (the
// block-per-rows kernel for every shape; the benchmark compares both); TIDAL_GEMV_BPS sets the
// resident blocks per SM.
constexpr int kStreamWarps = 8;
constexpr int kSeg = 8;                   // 16-byte chunks per lane per segment
constexpr int64_t kStreamMaxK = 8192;     // fp32 input row in (static-limit) shared memory
constexpr int64_t kStreamMaxGroups = 64;  // kGroupNormGated: value heads

/// A 16-byte weight load that skips L1 (weights are read once per step; the input row lives in
/// shared memory).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

/// Stages the GEMV's input row (K floats; K % 4 == 0 and 16-byte aligned, checked by the
/// launchers) in shared memory `xs`, transformed as IN says; every thread of the block calls it
/// (block-wide syncs). Returns the factor the row results take (the RMSNorm's rsqrt for kNormed).
template <GemvIn IN>
__device__ float stage_row(const GemvParams& p, float* xs, int64_t K, int warp, int lane) {
  const float nw0 = p.zero_centred ? 1.0f : 0.0f;
  float ss = 0.f;
  __shared__ float ginv[kStreamMaxGroups];  // kGroupNormGated: rsqrt(mean square) per group
  // kGroupNormGated with 128-value groups (the models' value heads): the staging loop's float4s
  // of one warp in one pass are exactly one group, so a warp sum gives its norm in the same pass.
  const bool warp_groups = IN == GemvIn::kGroupNormGated && p.group == 4 * kWarp;
  if (IN == GemvIn::kGroupNormGated && !warp_groups) {
    const int64_t G = p.group;
    for (int64_t gi = warp; gi < K / G; gi += kStreamWarps) {
      float s2 = 0.f;
      for (int64_t j = lane; j < G; j += kWarp) s2 = fmaf(p.x[gi * G + j], p.x[gi * G + j], s2);
      s2 = warp_sum(s2);
      if (lane == 0) ginv[gi] = rsqrtf(s2 / static_cast<float>(G) + p.eps);
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x * 4; j < K; j += blockDim.x * 4) {
    float4 v = *reinterpret_cast<const float4*>(p.x + j);
    if constexpr (IN == GemvIn::kGroupNormGated) {  // w · (o · inv) · silu(z), as rms_norm_gated
      const float4 z = *reinterpret_cast<const float4*>(p.xu + j);
      const float4 g = *reinterpret_cast<const float4*>(p.norm_w + j % p.group);
      // group % 4 == 0: the 4 values share a group. blockDim.x · 4 is a multiple of 128, so with
      // warp_groups every lane of the warp is in this pass (K % 128 == 0) and in one group.
      const float r =
          warp_groups ? rsqrtf(warp_sum(fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, v.w * v.w)))) /
                                   static_cast<float>(p.group) +
                               p.eps)
                      : ginv[j / p.group];
      v = make_float4(g.x * (v.x * r) * siluf_(z.x), g.y * (v.y * r) * siluf_(z.y),
                      g.z * (v.z * r) * siluf_(z.z), g.w * (v.w * r) * siluf_(z.w));
    } else if constexpr (IN == GemvIn::kGated) {
      const float4 u = *reinterpret_cast<const float4*>(p.xu + j);
      v = make_float4(siluf_(v.x) * u.x, siluf_(v.y) * u.y, siluf_(v.z) * u.z, siluf_(v.w) * u.w);
    } else if constexpr (IN == GemvIn::kNormed) {
      ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
      const float4 g = *reinterpret_cast<const float4*>(p.norm_w + j);
      v = make_float4(v.x * (nw0 + g.x), v.y * (nw0 + g.y), v.z * (nw0 + g.z), v.w * (nw0 + g.w));
    }
    *reinterpret_cast<float4*>(xs + j) = v;
  }
  if constexpr (IN == GemvIn::kNormed) {
    return rsqrtf(block_sum(ss) / static_cast<float>(K) + p.eps);  // its syncs publish xs
  } else {
    __syncthreads();
    return 1.0f;
  }
}

// Note [DeltaNet conv in the GEMV]
// A DeltaNet decode step's causal conv, SiLU, beta and g are per channel: output row c of the
// in-projection, the K − 1 values of c in the layer's conv state and c's K filter taps. So the
// streaming GEMV that produces row c applies them (gemv_gdn_in) instead of a kernel of its own
// between the projection and the delta rule (which now L2-normalises q and k itself): one launch
// and one round trip through memory less per DeltaNet layer. The taps and the state slots are
// loaded with the row's first weight segment, one per lane (lane j < K a tap, lane K + j state
// slot j), so their latency hides behind the row's weights; when the row's dot product is done the
// warp forms the conv sum with shuffles and lanes 0..K−2 store the shifted window. The state is
// read before the dependency wait, as gdn_conv_prep_step reads it (Note [programmatic dependent
// launch]): only this layer's conv step writes it, never as the kernel just before this one.
/// The router for one token's logits l[0, E) by one warp: softmax, top-k (ties to the lower id),
/// renormalised when `renorm`; ids / weights get k entries. `CG`: the logits were written by other
/// blocks of the running kernel, so they are read from L2 (Note [Router in the MoE
/// in-projection]).
template <int kMaxPer, bool CG = false>
__device__ void route_row(const float* l, int64_t E, int64_t k, bool renorm, int32_t* ids,
                          float* weights) {
  const int lane = threadIdx.x % kWarp;
  float p[kMaxPer];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) {
    const int64_t e = lane + i * kWarp;
    p[i] = e < E ? (CG ? __ldcg(l + e) : l[e]) : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) {
    const int64_t e = lane + i * kWarp;
    p[i] = e < E ? expf(p[i] - mx) : 0.f;
    sum += p[i];
  }
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) p[i] *= inv;
  float top_sum = 0.f, my_w = 0.f;
  int my_id = 0;
  for (int64_t j = 0; j < k; ++j) {
    float best = -1.f;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      const int e = lane + i * kWarp;
      if (e < E && (p[i] > best || (p[i] == best && e < best_e))) {
        best = p[i];
        best_e = e;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, off);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i)  // mark taken (static indices: p stays in registers)
      if (lane + i * kWarp == best_e) p[i] = -2.f;
    if (lane == j) {
      my_id = best_e;
      my_w = best;
    }
    top_sum += best;
  }
  if (lane < k) {
    ids[lane] = my_id;
    weights[lane] = renorm ? my_w / top_sum : my_w;
  }
}

// Note [Router in the MoE in-projection]
// A MoE layer's in-projection produces the router logits (its first E rows) beside the shared
// expert's gate and up rows, and the router's top-k ran as a kernel of its own after it: one more
// launch boundary per layer on the decode chain, or, on a side stream beside the shared expert, a
// fork and a join that the next layer's projection waited on without programmatic launch (kernel
// stamps put that join at ~9 µs per layer on an H100, docs/performance.md). Here the block of the
// in-projection's streaming GEMV that finishes last runs the top-k: every block, once its rows are
// stored, fences and counts itself in (route.sync); the block that brings the count to the grid
// size fences again, reads the logits from L2 and routes with one warp, then zeroes the counter
// (the next launch that uses it starts after this grid has completed). No block waits for another,
// so nothing needs the grid resident at once. The arithmetic is moe_route_kernel's (route_row).
template <WFormat F, GemvIn IN, bool GDN, bool RT = false>
__global__ void __launch_bounds__(kStreamWarps* kWarp) gemv_stream_kernel(const GemvParams p) {
  constexpr int E = Chunk<F>::E;
  extern __shared__ float4 xs4[];  // the input row, K floats (transformed)
  float* xs = reinterpret_cast<float*>(xs4);
  const DevMatrix& w = p.w;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t K = w.cols, nchunk = K / E;
  const int64_t segs = (nchunk + kSeg * kWarp - 1) / (kSeg * kWarp);  // per row
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kStreamWarps;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kStreamWarps + warp;
  const int64_t items = gw < w.rows ? ((w.rows - 1 - gw) / nwarps + 1) * segs : 0;
  const auto* base = static_cast<const uint4*>(w.data);
  // GDN: per lane, the epilogue operand of the row whose first segment a buffer holds (epa, epb),
  // then of the row being reduced (epc), Note [DeltaNet conv in the GEMV].
  const GdnConvEpilogue& ge = p.gdn;
  float* conv_state = nullptr;
  if constexpr (GDN) conv_state = ge.step->layers[ge.layer].conv;
  float epa = 0.f, epb = 0.f, epc = 0.f;
  auto load = [&](uint4(&buf)[kSeg], float& ep, int64_t t) {
    const int64_t row = gw + (t / segs) * nwarps;
    const uint4* rp = base + row * nchunk;
    const int64_t c0 = (t % segs) * (kSeg * kWarp) + lane;
#pragma unroll
    for (int i = 0; i < kSeg; ++i) {
      const int64_t c = c0 + i * kWarp;
      if (c < nchunk) buf[i] = ld_stream(rp + c);
    }
    if constexpr (GDN) {
      if (t % segs == 0) {
        if (row < ge.C) {
          if (lane < ge.K)
            ep = ge.conv_w[row * ge.K + lane];
          else if (lane < 2 * ge.K - 1)
            ep = conv_state[(lane - ge.K) * ge.C + row];
        } else if (row >= ge.ba_row + ge.nv && row < ge.ba_row + 2 * ge.nv && lane < 2) {
          const int64_t h = row - ge.ba_row - ge.nv;
          ep = lane == 0 ? ge.A_log[h] : ge.dt_bias[h];
        }
      }
    }
  };
  uint4 a[kSeg], b[kSeg];
  if (items > 0) load(a, epa, 0);
  if (items > 1) load(b, epb, 1);
  pdl_begin(__func__);
  const float inv = stage_row<IN>(p, xs, K, warp, lane);
  const float gate = p.out_gate ? sigmoidf_(p.out_gate[0]) : 1.0f;
  float acc = 0.f;
  auto fma_seg = [&](const uint4(&buf)[kSeg], int64_t t) {
    if constexpr (GDN) {
      if (t % segs == 0) epc = (t & 1) ? epb : epa;  // before the buffer's next load
    }
    const int64_t c0 = (t % segs) * (kSeg * kWarp) + lane;
#pragma unroll
    for (int i = 0; i < kSeg; ++i) {
      const int64_t c = c0 + i * kWarp;
      if (c < nchunk) {
        float wv[E];
        Chunk<F>::convert(buf[i], wv);
        const float* xr = xs + c * E;
#pragma unroll
        for (int e = 0; e < E; e += 4) {
          const float4 xv = *reinterpret_cast<const float4*>(xr + e);
          acc = fmaf(wv[e], xv.x, acc);
          acc = fmaf(wv[e + 1], xv.y, acc);
          acc = fmaf(wv[e + 2], xv.z, acc);
          acc = fmaf(wv[e + 3], xv.w, acc);
        }
      }
    }
    if (t % segs == segs - 1) {  // the row is complete
      const int64_t row = gw + (t / segs) * nwarps;
      float v = warp_sum(acc);
      acc = 0.f;
      if constexpr (GDN) {  // every lane holds v; the row's operands are spread over the lanes
        if (F == WFormat::kI8) v *= w.scale[row];
        v *= inv * gate;
        const int K1 = static_cast<int>(ge.K) - 1;
        if (row < ge.C) {
          const float slot = __shfl_sync(0xffffffffu, epc, (lane + K1 + 1) & 31);  // slot lane
          const float next = __shfl_sync(0xffffffffu, epc, (lane + K1 + 2) & 31);  // slot lane+1
          const float conv = warp_sum(lane < K1    ? epc * slot
                                      : lane == K1 ? epc * v
                                                   : 0.f);  // Σ taps · window
          if (lane < K1) conv_state[lane * ge.C + row] = lane + 1 < K1 ? next : v;
          v = siluf_(conv);
        } else if (row >= ge.ba_row && row < ge.ba_row + ge.nv) {
          v = sigmoidf_(v);
        } else if (row >= ge.ba_row + ge.nv && row < ge.ba_row + 2 * ge.nv) {
          const float alog = __shfl_sync(0xffffffffu, epc, 0);
          const float dtb = __shfl_sync(0xffffffffu, epc, 1);
          v = -expf(alog) * softplusf_(v + dtb);
        }
        if (lane == 0) p.y[row] = v;
      } else if (lane == 0) {
        if (F == WFormat::kI8) v *= w.scale[row];
        v *= inv * gate;
        float* d = p.y + row;
        *d = p.accumulate ? *d + v : v;
      }
    }
  };
  for (int64_t t = 0; t < items; t += 2) {
    fma_seg(a, t);
    if (t + 2 < items) load(a, epa, t + 2);
    if (t + 1 < items) {
      fma_seg(b, t + 1);
      if (t + 3 < items) load(b, epb, t + 3);
    }
  }
  if constexpr (RT) {  // Note [Router in the MoE in-projection]
    __shared__ bool last;
    __threadfence();  // this thread's row stores, before the block counts itself in
    __syncthreads();
    if (threadIdx.x == 0) {
      last = atomicAdd(p.route.sync, 1u) == gridDim.x - 1;
      __threadfence();  // acquire side of the count, as a grid barrier does
    }
    __syncthreads();
    if (last) {
      __threadfence();
      const RouteTail& r = p.route;
      if (warp == 0) {
        const int64_t per = (r.E + kWarp - 1) / kWarp;
        if (per <= 4)
          route_row<4, true>(p.y, r.E, r.k, r.renorm, r.ids, r.weights);
        else if (per <= 8)
          route_row<8, true>(p.y, r.E, r.k, r.renorm, r.ids, r.weights);
        else if (per <= 16)
          route_row<16, true>(p.y, r.E, r.k, r.renorm, r.ids, r.weights);
        else
          route_row<32, true>(p.y, r.E, r.k, r.renorm, r.ids, r.weights);
      }
      if (threadIdx.x == 0) *r.sync = 0;
    }
  }
}

/// TIDAL_GEMV_STREAM=0: the block-per-rows kernel for every shape.
bool stream_off() {
  static const bool off = [] {
    const char* e = std::getenv("TIDAL_GEMV_STREAM");
    return e && std::string(e) == "0";
  }();
  return off;
}

/// TIDAL_GEMV_BPS: resident blocks per SM for the streaming GEMV (1-8), 0 unset.
int forced_blocks_per_sm() {
  static const int v = [] {
    const char* e = std::getenv("TIDAL_GEMV_BPS");
    const int n = e ? std::atoi(e) : 0;
    return n >= 1 && n <= 8 ? n : 0;
  }();
  return v;
}

int device_sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 1;
    return std::max(1, v);
  }();
  return n;
}

/// Launches gemv_stream_kernel<F, IN, GDN, RT>: one wave of `bps` resident blocks per SM, bps =
/// TIDAL_GEMV_BPS (1-8) or the occupancy limit.
template <WFormat F, GemvIn IN, bool GDN = false, bool RT = false>
void stream_launch(const GemvParams& p, size_t smem, cudaStream_t s) {
  void (*k)(GemvParams) = gemv_stream_kernel<F, IN, GDN, RT>;
  int bps = forced_blocks_per_sm();
  if (bps == 0) {
    static std::atomic<long> cached{-1};  // (smem << 8) | blocks of the last query
    const long c = cached.load(std::memory_order_relaxed);
    if (c >= 0 && static_cast<size_t>(c >> 8) == smem) {
      bps = static_cast<int>(c & 0xff);
    } else {
      int n = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, kStreamWarps * kWarp, smem) !=
          cudaSuccess) {
        (void)cudaGetLastError();
        n = 1;
      }
      bps = std::max(1, std::min(n, 8));
      cached.store((static_cast<long>(smem) << 8) | bps, std::memory_order_relaxed);
    }
  }
  const int64_t want = (p.w.rows + kStreamWarps - 1) / kStreamWarps;
  const dim3 grid(static_cast<unsigned>(
      std::min<int64_t>(want, static_cast<int64_t>(device_sm_count()) * bps)));
  launch(k, grid, kStreamWarps * kWarp, smem, s, p);
}

/// Launches the streaming GEMV (one input row) when the shape suits it; false otherwise. With
/// p.gdn.conv_w set, the DeltaNet epilogue variant (gemv_gdn_in).
template <WFormat F>
bool gemv_stream_launch(const GemvParams& p, cudaStream_t s) {
  constexpr int E = Chunk<F>::E;
  const DevMatrix& w = p.w;
  if (!p.vec || w.cols == 0 || w.cols % E != 0 || w.cols > kStreamMaxK || stream_off())
    return false;
  const size_t smem = static_cast<size_t>(w.cols) * 4;
  if (p.gdn.conv_w) {
    if (p.gdn.K < 1 || p.gdn.K > 16 || p.group > 0 || p.xu) return false;
    if (p.norm_w)
      stream_launch<F, GemvIn::kNormed, true>(p, smem, s);
    else
      stream_launch<F, GemvIn::kPlain, true>(p, smem, s);
    return true;
  }
  if (p.group > 0 && (p.group % 4 != 0 || w.cols % p.group != 0 ||
                      w.cols / p.group > kStreamMaxGroups || !p.xu || !p.norm_w))
    return false;
  if (p.group > 0)
    stream_launch<F, GemvIn::kGroupNormGated>(p, smem, s);
  else if (p.norm_w)
    stream_launch<F, GemvIn::kNormed>(p, smem, s);
  else if (p.xu)
    stream_launch<F, GemvIn::kGated>(p, smem, s);
  else
    stream_launch<F, GemvIn::kPlain>(p, smem, s);
  return true;
}

/// The streaming GEMV or nothing (the variants only it has: gemv_gated_norm, gemv_gdn_in): sets
/// the vector-path flag from p's pointers, false where the kernel does not take the shape.
bool gemv_stream_only(GemvParams& p, cudaStream_t s) {
  p.vec = reinterpret_cast<uintptr_t>(p.w.data) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.xu) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.norm_w) % 16 == 0 && p.w.cols % 4 == 0;
  switch (p.w.format) {
    case WFormat::kF32:
      return gemv_stream_launch<WFormat::kF32>(p, s);
    case WFormat::kBF16:
      return gemv_stream_launch<WFormat::kBF16>(p, s);
    case WFormat::kI8:
      return gemv_stream_launch<WFormat::kI8>(p, s);
  }
  return false;
}

template <WFormat F>
void gemv_launch(GemvParams p, int64_t m, cudaStream_t s) {
  constexpr int E = Chunk<F>::E;
  const DevMatrix& w = p.w;
  // Vector path: 16-byte aligned rows and activations.
  p.vec = w.cols % E == 0 && w.cols % 4 == 0 && p.ldx % 4 == 0 &&
          reinterpret_cast<uintptr_t>(w.data) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.xu) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.norm_w) % 16 == 0;
  // Warps per row: split K until there are enough warps to keep every SM's loads in flight, while
  // each warp still covers at least 16 chunks. TIDAL_GEMV_WPR (1, 2, 4, 8) forces it for tuning.
  const int64_t nchunk = w.cols / E;
  int wpr = 1;
  while (wpr < kGemvWarps && w.rows * wpr < 16384 && nchunk / (wpr * 2) >= 16) wpr *= 2;
  static const int forced = [] {
    const char* e = std::getenv("TIDAL_GEMV_WPR");
    const int v = e ? std::atoi(e) : 0;
    return v == 1 || v == 2 || v == 4 || v == 8 ? v : 0;
  }();
  if (forced) wpr = forced;
  p.wpr = wpr;
  if (m == 1 && gemv_stream_launch<F>(p, s)) return;  // Note [streaming GEMV]
  const int rows_per_block = kGemvWarps / wpr;
  const dim3 grid(static_cast<unsigned>((w.rows + rows_per_block - 1) / rows_per_block));
  const dim3 block(kGemvWarps * kWarp);
  if (p.norm_w) {
    launch(gemv_kernel<F, 1, GemvIn::kNormed>, grid, block, 0, s, p);
    return;
  }
  switch (m) {
#define TIDAL_GEMV_CASE(M)                                             \
  case M:                                                              \
    if (p.xu)                                                          \
      launch(gemv_kernel<F, M, GemvIn::kGated>, grid, block, 0, s, p); \
    else                                                               \
      launch(gemv_kernel<F, M, GemvIn::kPlain>, grid, block, 0, s, p); \
    break;
    TIDAL_GEMV_CASE(1)
    TIDAL_GEMV_CASE(2)
    TIDAL_GEMV_CASE(3)
    TIDAL_GEMV_CASE(4)
    TIDAL_GEMV_CASE(5)
    TIDAL_GEMV_CASE(6)
    TIDAL_GEMV_CASE(7)
    TIDAL_GEMV_CASE(8)
#undef TIDAL_GEMV_CASE
    default:
      break;
  }
}

__global__ void weight_convert_kernel(DevMatrix w, uint16_t* bf, float* f) {
  pdl_begin(__func__);
  const int64_t n = w.rows * w.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = weight_at(w, i / w.cols, i % w.cols);
    if (bf) bf[i] = f2bf16(v);
    if (f) f[i] = v;
  }
}

__global__ void f32_to_bf16_kernel(const float* x, int64_t ldx, uint16_t* y, int64_t rows,
                                   int64_t cols) {
  pdl_begin(__func__);
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    y[i] = f2bf16(x[r * ldx + c]);
  }
}

__global__ void f32_to_bf16_split_kernel(const float* x, int64_t ldx, uint16_t* hi, uint16_t* lo,
                                         int64_t rows, int64_t cols) {
  pdl_begin(__func__);
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[(i / cols) * ldx + i % cols];
    const uint16_t h = f2bf16(v);
    hi[i] = h;
    lo[i] = f2bf16(v - bf16f(h));
  }
}

int grid_stride_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
}

// ------------------------------------------------------------------------------- element-wise

/// Block per token. Each thread loads kEmbedPer values before it stores any: `out` may alias the
/// table as far as the compiler knows, so a load-store loop ran one dependent round trip per
/// iteration (the stamps put the step's first kernel at ~10 µs on an H100 for a 2048-wide row).
constexpr int kEmbedPer = 8;
__global__ void embed_kernel(DevMatrix t, const int32_t* ids, float* out) {
  pdl_begin(__func__);
  const int64_t row = ids[blockIdx.x];
  float* dst = out + blockIdx.x * t.cols;
  const int64_t step = static_cast<int64_t>(blockDim.x);
  for (int64_t i0 = threadIdx.x; i0 < t.cols; i0 += kEmbedPer * step) {
    float v[kEmbedPer];
#pragma unroll
    for (int j = 0; j < kEmbedPer; ++j) {
      const int64_t i = i0 + j * step;
      v[j] = i < t.cols ? weight_at(t, row, i) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kEmbedPer; ++j) {
      const int64_t i = i0 + j * step;
      if (i < t.cols) dst[i] = v[j];
    }
  }
}

/// Row norm with everything in registers (dim ≤ 16 · 256): all loads of a row are issued at
/// once, instead of one dependent round trip per loop iteration.
__global__ void __launch_bounds__(256)
    rms_norm_reg_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w,
                        float* __restrict__ y, int64_t ldy, int64_t dim, float eps, bool zc,
                        float* __restrict__ x_add, const float* __restrict__ y_add,
                        const float* __restrict__ hs, const float* __restrict__ gate,
                        int64_t ld_gate) {
  pdl_begin(__func__);
  constexpr int kPer = 16;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  float v[kPer];
  const float* src = x_add ? x_add + r * dim : x + r * ldx;
  const float* yr = y_add ? y_add + r * dim : nullptr;
  const float* hr = hs ? hs + r * dim : nullptr;
  const float gs = hs ? sigmoidf_(gate[r * ld_gate]) : 0.f;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = tid + j * 256;
    float a = 0.f;
    if (i < dim) {
      a = src[i];
      if (yr) a += yr[i];
      if (hr) a += gs * hr[i];
    }
    v[j] = a;
    ss += a * a;
  }
  if (x_add)
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (tid + j * 256 < dim) x_add[r * dim + tid + j * 256] = v[j];
  ss = block_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = tid + j * 256;
    if (i < dim) y[r * ldy + i] = zc ? v[j] * inv * (1.0f + w[i]) : w[i] * (v[j] * inv);
  }
}

__global__ void rms_norm_kernel(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy,
                                int64_t dim, float eps, bool zc, float* x_add, const float* y_add,
                                const float* hs, const float* gate, int64_t ld_gate) {
  pdl_begin(__func__);
  const int64_t r = blockIdx.x;
  float ss = 0.f;
  if (x_add) {  // fused residual: x += y + sigmoid(gate)·hs, then normalise x
    float* xr = x_add + r * dim;
    const float* yr = y_add ? y_add + r * dim : nullptr;
    const float* hr = hs ? hs + r * dim : nullptr;
    const float gs = hs ? sigmoidf_(gate[r * ld_gate]) : 0.f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = yr ? xr[i] + yr[i] : xr[i];
      if (hr) v += gs * hr[i];
      xr[i] = v;
      ss += v * v;
    }
    x = x_add;
    ldx = dim;
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += x[r * ldx + i] * x[r * ldx + i];
  }
  ss = block_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = x[r * ldx + i];
    y[r * ldy + i] = zc ? v * inv * (1.0f + w[i]) : w[i] * (v * inv);
  }
}

__global__ void silu_mul_kernel(const float* g, const float* u, int64_t ld, float* h, int64_t T,
                                int64_t I) {
  pdl_begin(__func__);
  const int64_t n = T * I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / I, c = i % I;
    h[i] = siluf_(g[t * ld + c]) * u[t * ld + c];
  }
}

// ----------------------------------------------------------------------------------- attention

__device__ __forceinline__ void store_kv(void* cache, int64_t i, float v, bool f32) {
  if (f32)
    static_cast<float*>(cache)[i] = v;
  else
    static_cast<uint16_t*>(cache)[i] = f2bf16(v);
}

/// Block per (token, head): heads [0, nh) are queries, [nh, nh+nkv) keys, then values.
__global__ void attn_prep_kernel(AttnPrepArgs a) {
  pdl_begin(__func__);
  extern __shared__ float sh[];  // d floats
  const int64_t t = blockIdx.x, h = blockIdx.y, d = a.d;
  const int64_t pos = a.step->pos0 + t;
  const LayerStateDev ls = a.step->layers[a.layer];
  if (h >= a.nh + a.nkv) {  // value head -> cache
    const int64_t vh = h - a.nh - a.nkv;
    const int64_t ldv = a.ld ? a.ld : a.nkv * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
      store_kv(ls.v_cache, (pos * a.nkv + vh) * d + i, a.v[t * ldv + vh * d + i], a.kv_f32);
    return;
  }
  const bool is_q = h < a.nh;
  const float* src;
  const float* w;
  if (is_q) {
    src = a.qg + t * (a.ld ? a.ld : a.nh * d * (a.gated ? 2 : 1)) + h * d * (a.gated ? 2 : 1);
    w = a.q_norm;
  } else {
    src = a.k + t * (a.ld ? a.ld : a.nkv * d) + (h - a.nh) * d;
    w = a.k_norm;
  }
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += src[i] * src[i];
  ss = block_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(d) + a.eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    sh[i] = a.zero_centred ? src[i] * inv * (1.0f + w[i]) : w[i] * (src[i] * inv);
  __syncthreads();
  const int64_t half = a.rotary_dim / 2;
  const float p = static_cast<float>(pos);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = sh[i];
    if (i < a.rotary_dim) {
      const int64_t f = i < half ? i : i - half;
      const float phi = p * a.inv_freq[f];
      const float c = cosf(phi) * a.rope_scale, s = sinf(phi) * a.rope_scale;
      v = i < half ? sh[i] * c - sh[i + half] * s : sh[i] * c + sh[i - half] * s;
    }
    if (is_q) {
      a.q[(t * a.nh + h) * d + i] = v;
      if (a.gated) a.gate[(t * a.nh + h) * d + i] = src[d + i];
    } else {
      store_kv(ls.k_cache, (pos * a.nkv + (h - a.nh)) * d + i, v, a.kv_f32);
    }
  }
}

/// Sum of R values over groups of W adjacent lanes (R ≤ W, both powers of two): afterwards lane l
/// holds the group's sum of value index (l % W) / (W / R).
template <int R, int W>
__device__ __forceinline__ float group_transpose_reduce(float (&v)[R], int lane) {
#pragma unroll
  for (int n = R, off = W / 2; n > 1; n >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float send = upper ? v[i] : v[i + n / 2];
      const float keep = upper ? v[i + n / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  float s = v[0];
#pragma unroll
  for (int off = W / R / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

/// The whole-warp case: lane l holds the sum of value index l >> (5 − log2 R).
template <int R>
__device__ __forceinline__ float transpose_reduce(float (&v)[R], int lane) {
  return group_transpose_reduce<R, kWarp>(v, lane);
}

/// DPL values of one cache row, raw (loads stay in flight while earlier keys are computed).
template <typename KT, int DPL>
struct RawKV;
template <int DPL>
struct RawKV<uint16_t, DPL> {
  uint32_t w[(DPL + 1) / 2];
};
template <int DPL>
struct RawKV<float, DPL> {
  float w[DPL];
};
template <typename KT, int DPL>
__device__ __forceinline__ RawKV<float, DPL> load_raw(const float* p, int64_t dim0, int64_t d) {
  RawKV<float, DPL> r;
  if (dim0 + DPL <= d && DPL % 4 == 0) {
#pragma unroll
    for (int i = 0; i < DPL; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      r.w[i] = v.x;
      r.w[i + 1] = v.y;
      r.w[i + 2] = v.z;
      r.w[i + 3] = v.w;
    }
    return r;
  }
#pragma unroll
  for (int i = 0; i < DPL; ++i) r.w[i] = dim0 + i < d ? p[i] : 0.f;
  return r;
}
template <int DPL>
__device__ __forceinline__ void raw_to_f32(const RawKV<float, DPL>& r, float* out) {
#pragma unroll
  for (int i = 0; i < DPL; ++i) out[i] = r.w[i];
}
template <typename KT, int DPL>
__device__ __forceinline__ RawKV<uint16_t, DPL> load_raw(const uint16_t* p, int64_t dim0,
                                                         int64_t d) {
  RawKV<uint16_t, DPL> r;
  if (dim0 + DPL <= d) {
    if constexpr (DPL == 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      r.w[0] = v.x;
      r.w[1] = v.y;
      r.w[2] = v.z;
      r.w[3] = v.w;
    } else if constexpr (DPL == 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      r.w[0] = v.x;
      r.w[1] = v.y;
    } else if constexpr (DPL == 2) {
      r.w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else {
      r.w[0] = p[0];
    }
    return r;
  }
#pragma unroll
  for (int i = 0; i < (DPL + 1) / 2; ++i) r.w[i] = 0;
#pragma unroll
  for (int i = 0; i < DPL; ++i)
    if (dim0 + i < d) r.w[i / 2] |= static_cast<uint32_t>(p[i]) << (16 * (i % 2));
  return r;
}
template <int DPL>
__device__ __forceinline__ void raw_to_f32(const RawKV<uint16_t, DPL>& r, float* out) {
#pragma unroll
  for (int i = 0; i < DPL; ++i)
    out[i] =
        i % 2 == 0 ? __uint_as_float(r.w[i / 2] << 16) : __uint_as_float(r.w[i / 2] & 0xffff0000u);
}

constexpr int kAttnWarps = 4;
constexpr int kKeyGroup = 8;            // cache rows loaded before any is used
constexpr int64_t kMinSplitKeys = 256;  // a split covers at least this many keys
constexpr int kMaxSplits = 512;

/// Keys per split and splits in use for a query that sees n keys.
__device__ __forceinline__ void split_plan(int64_t n, int splits, int64_t min_keys, int64_t& chunk,
                                           int64_t& used) {
  chunk = (n + splits - 1) / splits;
  chunk = chunk < min_keys ? min_keys : (chunk + 31) / 32 * 32;
  used = (n + chunk - 1) / chunk;
}

/// One warp per (token, kv head, head subset, split): R query heads of the GQA group against keys
/// [u0, u1) of the split, 32 keys at a time (scores to shared memory, online softmax per row, then
/// P·V), cache rows loaded kKeyGroup at a time. Lane l owns dims [l·DPL, (l+1)·DPL). Partial
/// results (m, l, o) go to `partial`; splits past the keys do nothing.
template <typename KT, int DPL, int R>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attention_kernel(AttentionArgs a, int subsets, int splits) {
  pdl_begin(__func__);
  __shared__ float sp[kAttnWarps][R][kWarp];
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
  const int split = blockIdx.x * kAttnWarps + wid;
  const int64_t t = blockIdx.y;
  const int64_t kvh = blockIdx.z / subsets, sub = blockIdx.z % subsets;
  const int64_t group = a.nh / a.nkv, d = a.d;
  const int64_t h0 = kvh * group + sub * R;
  const int nrows = static_cast<int>(group - sub * R < R ? group - sub * R : R);
  const int64_t n = a.step->pos0 + t + 1;  // causal: keys [0, n)
  int64_t chunk, used;
  split_plan(n, splits, kMinSplitKeys, chunk, used);
  if (split >= used) return;
  const int64_t u0 = split * chunk, u1 = u0 + chunk < n ? u0 + chunk : n;
  const LayerStateDev ls = a.step->layers[a.layer];
  const int64_t dim0 = lane * DPL;
  float q[R][DPL], o[R][DPL], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      o[r][i] = 0.f;
      q[r][i] = r < nrows && dim0 + i < d ? a.q[(t * a.nh + h0 + r) * d + dim0 + i] * a.scale : 0.f;
    }
  }
  constexpr int kLog = R == 1 ? 0 : R == 2 ? 1 : R == 4 ? 2 : R == 8 ? 3 : 4;
  const int my_row = lane >> (5 - kLog);
  const int64_t kv_stride = a.nkv * d;
  const KT* kbase = static_cast<const KT*>(ls.k_cache) + kvh * d + dim0;
  const KT* vbase = static_cast<const KT*>(ls.v_cache) + kvh * d + dim0;
  for (int64_t b0 = u0; b0 < u1; b0 += kWarp) {
    const int nb = static_cast<int>(u1 - b0 < kWarp ? u1 - b0 : kWarp);
    for (int g0 = 0; g0 < nb; g0 += kKeyGroup) {
      RawKV<KT, DPL> kr[kKeyGroup];
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj)
        if (g0 + jj < nb) kr[jj] = load_raw<KT, DPL>(kbase + (b0 + g0 + jj) * kv_stride, dim0, d);
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj) {
        if (g0 + jj >= nb) break;
        float kv[DPL];
        raw_to_f32<DPL>(kr[jj], kv);
        float sc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sc[r] = 0.f;
#pragma unroll
          for (int i = 0; i < DPL; ++i) sc[r] = fmaf(q[r][i], kv[i], sc[r]);
        }
        const float tot = transpose_reduce<R>(sc, lane);
        if ((lane & ((32 >> kLog) - 1)) == 0) sp[wid][my_row][g0 + jj] = tot;
      }
    }
    __syncwarp();
    float scale_r[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float sc = lane < nb ? sp[wid][r][lane] : -INFINITY;
      const float mx = fmaxf(m[r], warp_max(sc));
      const float p = lane < nb ? expf(sc - mx) : 0.f;
      scale_r[r] = expf(m[r] - mx);  // 0 on the first batch (m = −inf)
      l[r] = l[r] * scale_r[r] + warp_sum(p);
      m[r] = mx;
      sp[wid][r][lane] = p;
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[r][i] *= scale_r[r];
    for (int g0 = 0; g0 < nb; g0 += kKeyGroup) {
      RawKV<KT, DPL> vr[kKeyGroup];
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj)
        if (g0 + jj < nb) vr[jj] = load_raw<KT, DPL>(vbase + (b0 + g0 + jj) * kv_stride, dim0, d);
#pragma unroll
      for (int jj = 0; jj < kKeyGroup; ++jj) {
        if (g0 + jj >= nb) break;
        float vv[DPL];
        raw_to_f32<DPL>(vr[jj], vv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float p = sp[wid][r][g0 + jj];
#pragma unroll
          for (int i = 0; i < DPL; ++i) o[r][i] = fmaf(p, vv[i], o[r][i]);
        }
      }
    }
    __syncwarp();
  }
  // partial layout: m, l: [(t·nh + h)·splits + split]; o: [((t·nh + h)·splits + split)·d + i].
  const int64_t nrow_total = static_cast<int64_t>(gridDim.y) * a.nh * splits;
  float* pm = a.partial;
  float* pl = a.partial + nrow_total;
  float* po = a.partial + 2 * nrow_total;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nrows) break;
    const int64_t idx = (t * a.nh + h0 + r) * splits + split;
    if (lane == 0) {
      pm[idx] = m[r];
      pl[idx] = l[r];
    }
#pragma unroll
    for (int i = 0; i < DPL; ++i)
      if (dim0 + i < d) po[idx * d + dim0 + i] = o[r][i];
  }
}

/// Block per (token, head, 32 dims): merges the used splits' (m, l, o), applies the gate. Warps
/// take splits round-robin, then reduce through shared memory.
__global__ void attention_combine_kernel(AttentionArgs a, int splits, int64_t min_keys) {
  KernelStamp* const ks = pdl_begin(__func__);
  __shared__ float wts[kMaxSplits];
  __shared__ float red[8][kWarp + 1];
  __shared__ float stat[1];
  const int64_t t = blockIdx.x, h = blockIdx.y, d = a.d;
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  const int64_t nrow_total = static_cast<int64_t>(gridDim.x) * a.nh * splits;
  const float* pm = a.partial;
  const float* pl = a.partial + nrow_total;
  const float* po = a.partial + 2 * nrow_total;
  const int64_t base = (t * a.nh + h) * splits;
  int64_t chunk, used;
  split_plan(a.step->pos0 + t + 1, splits, min_keys, chunk, used);
  float mx = -INFINITY;
  for (int64_t s = threadIdx.x; s < used; s += blockDim.x) mx = fmaxf(mx, pm[base + s]);
  mx = warp_max(mx);
  if (lane == 0) red[wid][0] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = red[0][0];
    for (int w = 1; w < nw; ++w) M = fmaxf(M, red[w][0]);
    stat[0] = M;
  }
  __syncthreads();
  stamp_mark(ks, 0);  // the maximum
  const float M = stat[0];
  float lsum = 0.f;
  for (int64_t s = threadIdx.x; s < used; s += blockDim.x) {
    const float w = expf(pm[base + s] - M);
    wts[s] = w;
    lsum += w * pl[base + s];
  }
  lsum = block_sum(lsum);  // synchronises, so wts is visible below
  stamp_mark(ks, 1);       // the weights and their sum
  const int64_t dim = blockIdx.z * kWarp + lane;
  float acc = 0.f;
  if (dim < d)
    for (int64_t s = wid; s < used; s += nw) acc += wts[s] * po[(base + s) * d + dim];
  red[wid][lane] = acc;
  __syncthreads();
  stamp_mark(ks, 2);  // the o sums
  if (wid == 0 && dim < d) {
    float v = 0.f;
    for (int w = 0; w < nw; ++w) v += red[w][lane];
    v /= lsum;
    if (a.fused_prep) {  // the gate in the projection output, [q_h | gate_h] per head (T = 1)
      if (a.prep.gated) v *= sigmoidf_(a.prep.qg[h * 2 * d + d + dim]);
    } else if (a.gate) {
      v *= sigmoidf_(a.gate[(t * a.nh + h) * d + dim]);
    }
    a.out[(t * a.nh + h) * d + dim] = v;
  }
}

/// attention_combine_kernel with every global load issued before the first barrier (Note [early
/// loads]): thread s < 256 loads split s's m and l, each warp the o values of its first kPre
/// splits, warp 0 the gate; splits past those are read in the later loops as before. The sums
/// run in the same order, so the result is bit-identical to attention_combine_kernel's.
__global__ void attention_combine_early_kernel(AttentionArgs a, int splits, int64_t min_keys) {
  constexpr int kPre = 8;
  KernelStamp* const ks = pdl_begin(__func__);
  __shared__ float wts[kMaxSplits];
  __shared__ float red[8][kWarp + 1];
  const int64_t t = blockIdx.x, h = blockIdx.y, d = a.d;
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  const int64_t nrow_total = static_cast<int64_t>(gridDim.x) * a.nh * splits;
  const float* pm = a.partial;
  const float* pl = a.partial + nrow_total;
  const float* po = a.partial + 2 * nrow_total;
  const int64_t base = (t * a.nh + h) * splits;
  int64_t chunk, used;
  split_plan(a.step->pos0 + t + 1, splits, min_keys, chunk, used);
  const int64_t dim = blockIdx.z * kWarp + lane;
  const int64_t s0 = threadIdx.x;
  const float m0 = s0 < used ? pm[base + s0] : -INFINITY;
  const float l0 = s0 < used ? pl[base + s0] : 0.f;
  float ov[kPre];
#pragma unroll
  for (int j = 0; j < kPre; ++j) {
    const int64_t s = wid + static_cast<int64_t>(j) * nw;
    ov[j] = dim < d && s < used ? po[(base + s) * d + dim] : 0.f;
  }
  float gv = 0.f;
  if (wid == 0 && dim < d) {
    if (a.fused_prep) {
      if (a.prep.gated) gv = a.prep.qg[h * 2 * d + d + dim];
    } else if (a.gate) {
      gv = a.gate[(t * a.nh + h) * d + dim];
    }
  }
  float mx = m0;
  for (int64_t s = s0 + blockDim.x; s < used; s += blockDim.x) mx = fmaxf(mx, pm[base + s]);
  mx = warp_max(mx);
  if (lane == 0) red[wid][0] = mx;
  __syncthreads();
  float M = red[0][0];
  for (int w = 1; w < nw; ++w) M = fmaxf(M, red[w][0]);
  stamp_mark(ks, 0);  // the maximum
  float lsum = 0.f;
  if (s0 < used) {
    const float w = expf(m0 - M);
    wts[s0] = w;
    lsum += w * l0;
  }
  for (int64_t s = s0 + blockDim.x; s < used; s += blockDim.x) {
    const float w = expf(pm[base + s] - M);
    wts[s] = w;
    lsum += w * pl[base + s];
  }
  lsum = block_sum(lsum);  // synchronises (after every thread read red above), so wts is visible
  stamp_mark(ks, 1);       // the weights and their sum
  float acc = 0.f;
  if (dim < d) {
#pragma unroll
    for (int j = 0; j < kPre; ++j) {
      const int64_t s = wid + static_cast<int64_t>(j) * nw;
      if (s < used) acc += wts[s] * ov[j];
    }
    for (int64_t s = wid + static_cast<int64_t>(kPre) * nw; s < used; s += nw)
      acc += wts[s] * po[(base + s) * d + dim];
  }
  red[wid][lane] = acc;
  __syncthreads();
  stamp_mark(ks, 2);  // the o sums
  if (wid == 0 && dim < d) {
    float v = 0.f;
    for (int w = 0; w < nw; ++w) v += red[w][lane];
    v /= lsum;
    if (a.fused_prep ? a.prep.gated : a.gate != nullptr) v *= sigmoidf_(gv);
    a.out[(t * a.nh + h) * d + dim] = v;
  }
}

// ------------------------------------------------------------------ decode attention, tiled

constexpr int kTileKeys = 32;              // keys per shared-memory tile
constexpr int64_t kTileMinSplitKeys = 64;  // a split of the tiled kernel covers at least two tiles

/// Decode (one query token) for BF16 caches, head_dim D in {64, 128, 256} and GQA group G ≤ D/8:
/// block per (kv head, split), 256 threads, two shared-memory stages: while tile i is computed,
/// tile i + 1 streams in with cp.async (16-byte chunks, XOR-swizzled by key so that one chunk of
/// consecutive keys hits distinct banks). Scores: D/8 lanes per key, lane = 16-byte chunk, holding
/// that chunk of all G query vectors in registers (8·G FMAs per shared load), then a transposed
/// shuffle reduction. Softmax: one warp per head. P·V: thread = (pair of dims, key slice) with
/// 2·G accumulators, slices summed at the end. Partial (m, l, o) per split as in attention_kernel.
template <int D, int G>
__global__ void __launch_bounds__(256) attention_tile_kernel(AttentionArgs a, int splits) {
  pdl_begin(__func__);
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kChunks = D / 8;               // 16-byte chunks per row = lanes per key
  constexpr int kKeysPerPass = 256 / kChunks;  // keys scored at once by the block
  constexpr int kStage = 2 * kTileKeys * D;    // K then V of one tile, in uint16
  constexpr int kPairs = D / 2;
  constexpr int kSlices = 256 / kPairs;  // key slices of the P·V phase
  uint16_t* stage0 = reinterpret_cast<uint16_t*>(smem);
  float* ps = reinterpret_cast<float*>(stage0 + 2 * kStage);  // [kTileKeys][G]
  float* ml = ps + kTileKeys * G;                             // m[G], l[G], alpha[G]
  const int tid = threadIdx.x, lane = tid % kWarp, wid = tid / kWarp;
  const int64_t kvh = blockIdx.y, split = blockIdx.x;
  const int64_t n = a.step->pos0 + 1;
  int64_t chunk, used;
  split_plan(n, splits, a.min_split_keys, chunk, used);
  if (split >= used) return;
  const int64_t u0 = split * chunk, u1 = u0 + chunk < n ? u0 + chunk : n;
  const LayerStateDev ls = a.step->layers[a.layer];
  const int64_t kv_stride = a.nkv * D;
  const uint16_t* kg = static_cast<const uint16_t*>(ls.k_cache) + kvh * D;
  const uint16_t* vg = static_cast<const uint16_t*>(ls.v_cache) + kvh * D;
  const int64_t h0 = kvh * G;
  auto load_tile = [&](int64_t b0, uint16_t* dst) {
    const int nb = static_cast<int>(u1 - b0 < kTileKeys ? u1 - b0 : kTileKeys);
    for (int i = tid; i < nb * kChunks; i += blockDim.x) {
      const int key = i / kChunks, c = i % kChunks;
      const int pc = c ^ (key & (kChunks - 1) & 7);
      __pipeline_memcpy_async(dst + key * D + pc * 8, kg + (b0 + key) * kv_stride + c * 8, 16);
      __pipeline_memcpy_async(dst + kTileKeys * D + key * D + pc * 8,
                              vg + (b0 + key) * kv_stride + c * 8, 16);
    }
    __pipeline_commit();
  };
  load_tile(u0, stage0);
  // This lane's chunk of every query head, pre-scaled.
  const int my_c = tid % kChunks, my_k = tid / kChunks;  // chunk, key within a pass
  float q[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) q[h][e] = a.q[(h0 + h) * D + my_c * 8 + e] * a.scale;
  if (tid < G) {
    ml[tid] = -INFINITY;
    ml[G + tid] = 0.f;
  }
  const int pp = tid % kPairs, slice = tid / kPairs;
  float acc[G][2];
#pragma unroll
  for (int h = 0; h < G; ++h) acc[h][0] = acc[h][1] = 0.f;
  int stage = 0;
  for (int64_t b0 = u0; b0 < u1; b0 += kTileKeys, stage ^= 1) {
    const int nb = static_cast<int>(u1 - b0 < kTileKeys ? u1 - b0 : kTileKeys);
    const uint16_t* Ks = stage0 + stage * kStage;
    const uint16_t* Vs = Ks + kTileKeys * D;
    if (b0 + kTileKeys < u1) {  // stream the next tile into the other stage
      load_tile(b0 + kTileKeys, stage0 + (stage ^ 1) * kStage);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    // Scores: pass p covers keys p·kKeysPerPass + my_k.
    for (int key = my_k; key < kTileKeys; key += kKeysPerPass) {
      float sc[G];
      const uint4 kv4 =
          *reinterpret_cast<const uint4*>(Ks + key * D + (my_c ^ (key & (kChunks - 1) & 7)) * 8);
      const uint32_t w[4] = {kv4.x, kv4.y, kv4.z, kv4.w};
      float kf[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        kf[2 * e] = __uint_as_float(w[e] << 16);
        kf[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
      }
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float t = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) t = fmaf(q[h][e], kf[e], t);
        sc[h] = t;
      }
      const float tot = group_transpose_reduce<G, kChunks>(sc, lane);
      const int row = (lane % kChunks) / (kChunks / G);
      if ((lane % (kChunks / G)) == 0 && key < nb) ps[key * G + row] = tot;
    }
    __syncthreads();
    // Online softmax, one warp per head, lane = key.
    for (int h = wid; h < G; h += blockDim.x / kWarp) {
      const float s0 = lane < nb ? ps[lane * G + h] : -INFINITY;
      const float mold = ml[h];
      const float mx = fmaxf(mold, warp_max(s0));
      const float p0 = lane < nb ? expf(s0 - mx) : 0.f;
      const float sum = warp_sum(p0);
      ps[lane * G + h] = p0;  // 0 past nb
      if (lane == 0) {
        const float alpha = expf(mold - mx);
        ml[2 * G + h] = alpha;
        ml[G + h] = ml[G + h] * alpha + sum;
        ml[h] = mx;
      }
    }
    __syncthreads();
    // P·V over this thread's key slice.
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float al = ml[2 * G + h];
      acc[h][0] *= al;
      acc[h][1] *= al;
    }
    const int pc = (2 * pp) / 8, pe = (2 * pp) % 8;
    for (int key = slice; key < nb; key += kSlices) {
      const uint32_t vw = *reinterpret_cast<const uint32_t*>(
          Vs + key * D + ((pc ^ (key & (kChunks - 1) & 7)) * 8) + pe);
      const float v0 = __uint_as_float(vw << 16), v1 = __uint_as_float(vw & 0xffff0000u);
      const float* pk = ps + key * G;
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float p = pk[h];
        acc[h][0] = fmaf(p, v0, acc[h][0]);
        acc[h][1] = fmaf(p, v1, acc[h][1]);
      }
    }
    __syncthreads();  // this stage is refilled two tiles later; ps is rewritten next tile
  }
  // Sum the key slices through shared memory (the stages are free now).
  float* red = reinterpret_cast<float*>(stage0);  // [kSlices][G][D]
#pragma unroll
  for (int h = 0; h < G; ++h) {
    red[(slice * G + h) * D + 2 * pp] = acc[h][0];
    red[(slice * G + h) * D + 2 * pp + 1] = acc[h][1];
  }
  __syncthreads();
  const int64_t nrow_total = static_cast<int64_t>(a.nh) * splits;  // T = 1
  float* pm = a.partial;
  float* pl = a.partial + nrow_total;
  float* po = a.partial + 2 * nrow_total;
  if (tid < G) {
    pm[(h0 + tid) * splits + split] = ml[tid];
    pl[(h0 + tid) * splits + split] = ml[G + tid];
  }
  for (int i = tid; i < G * D; i += blockDim.x) {
    float v = 0.f;
    for (int sl = 0; sl < kSlices; ++sl) v += red[sl * G * D + i];
    po[((h0 + i / D) * splits + split) * D + i % D] = v;
  }
}

template <int D, int G>
bool launch_tile(const AttentionArgs& a, cudaStream_t s) {
  static_assert((256 / (D / 2)) * G * D * 4 <= 4 * kTileKeys * D * 2, "slice reduction fits");
  const size_t smem = static_cast<size_t>(4 * kTileKeys * D) * 2 +
                      static_cast<size_t>(kTileKeys * G) * 4 + 3 * G * 4;
  static const bool ok = allow_smem(attention_tile_kernel<D, G>, smem);
  if (!ok) return false;
  const dim3 grid(static_cast<unsigned>(a.max_splits), static_cast<unsigned>(a.nkv));
  launch(attention_tile_kernel<D, G>, grid, 256, smem, s, a, a.max_splits);
  return true;
}

template <int D>
bool launch_tile_g(const AttentionArgs& a, int64_t G, cudaStream_t s) {
  if (G > D / 8) return false;
  switch (G) {
    case 1:
      return launch_tile<D, 1>(a, s);
    case 2:
      return launch_tile<D, 2>(a, s);
    case 4:
      return launch_tile<D, 4>(a, s);
    case 8:
      return launch_tile<D, 8>(a, s);
    case 16:
      if constexpr (D >= 128) return launch_tile<D, 16>(a, s);
      return false;
    default:
      return false;
  }
}

// ------------------------------------------------------- decode attention on tensor cores

// Note [tensor-core decode attention]
// At long context the SIMT tile kernel above is bound by instructions, not bytes: every BF16 key
// and value element costs G fp32 FMAs plus a conversion (8 FMAs per element for the 35B-A3B's
// 8-head groups), which held it at 54-56% of HBM bandwidth at 128K. Here the GQA group's query
// heads are the 16 rows of an `mma.sync.m16n8k16` A operand (rows past G are zero), so scores
// S = Q·Kᵀ and O += P·V run on tensor cores with fp32 accumulation. K and V come straight from the
// BF16 cache in shared memory (`ldmatrix`, `.trans` for V), so they are exact. Q and P are fp32
// values: each is split into hi = bf16(x) and lo = bf16(x − hi) and multiplied twice, which keeps
// them to ~2^-17 relative (the "bf16x2" idea of the GEMVs) at twice the tensor work, which is
// still a small fraction of what the tensor cores can do while the bytes stream in.
// Layout per block (kv head, split): 8 warps; a tile is 32 keys, three cp.async stages.
//   scores: warp w takes keys [8(w mod 4), +8) and half the head dims (w / 4); the two halves'
//           partial scores are summed in shared memory by the softmax;
//   softmax: one warp per head, lane = key; P (hi, lo) to shared memory as BF16;
//   P·V:    warp w takes dims [w·D/8, (w+1)·D/8) for all 32 keys.
// Partial (m, l, o) per split as the other decode kernels write them (the combine is shared).

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
/// Two fp32 values as their BF16 hi parts packed (x0 in the low half) and the BF16 remainders.
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
  const __nv_bfloat16 l0 = __float2bfloat16_rn(x0 - __bfloat162float(h0));
  const __nv_bfloat16 l1 = __float2bfloat16_rn(x1 - __bfloat162float(h1));
  hi = static_cast<uint32_t>(__bfloat16_as_ushort(h0)) |
       (static_cast<uint32_t>(__bfloat16_as_ushort(h1)) << 16);
  lo = static_cast<uint32_t>(__bfloat16_as_ushort(l0)) |
       (static_cast<uint32_t>(__bfloat16_as_ushort(l1)) << 16);
}

/// Keys [b0, b0 + nb) of one KV head's BF16 cache (rows kv_stride apart) into a shared-memory
/// stage of kTileKeys keys, K then V, 16-byte chunks XOR-swizzled by key; keys nb.. are zero-filled
/// (P is 0 there, and 0 · garbage could be NaN). Commits one cp.async group. Shared by the
/// tensor-core decode and prefill kernels.
template <int D>
__device__ __forceinline__ void stage_kv_tile(const uint16_t* kg, const uint16_t* vg,
                                              int64_t kv_stride, int64_t b0, int nb,
                                              uint16_t* dst) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < kTileKeys * kChunks; i += blockDim.x) {
    const int key = i / kChunks, c = i % kChunks, pc = c ^ (key & 7);
    uint16_t* dk = dst + key * D + pc * 8;
    uint16_t* dv = dst + kTileKeys * D + key * D + pc * 8;
    if (key < nb) {
      __pipeline_memcpy_async(dk, kg + (b0 + key) * kv_stride + c * 8, 16);
      __pipeline_memcpy_async(dv, vg + (b0 + key) * kv_stride + c * 8, 16);
    } else {
      *reinterpret_cast<uint4*>(dk) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dv) = make_uint4(0, 0, 0, 0);
    }
  }
}

constexpr int kMmaStages = 3;
constexpr int kMmaPitch = kTileKeys + 8;  // P rows in shared memory (bf16), padded

// Note [attention prep in the decode kernel]
// attn_prep (q/k RMSNorm, partial RoPE, the new key and value into the cache) is a kernel of its
// own between the q|k|v projection and the attention, one more launch and dependency per
// attention layer of a decode step. With AttentionArgs::fused_prep the tensor-core decode kernel
// does it: every block (split, KV head) normalises and rotates the q vectors of its GQA group
// into shared memory (the third tile stage, free until the main loop loads it), one warp per
// head, and the block of the last split, the only one whose keys include the new position,
// writes the new key and value into the cache before it loads its tiles. The other splits read
// only older cache rows, which no kernel of this step writes, so they issue their first two tile
// loads before the dependency wait (Note [programmatic dependent launch]). The gate stays in the
// projection output, where the combine reads it.

/// RMSNorm (plain or zero-centred) and partial RoPE of one D-wide head vector, by one warp, into
/// shared memory `dst` (as attn_prep_kernel computes it).
template <int D>
__device__ __forceinline__ void norm_rope_warp(const float* src, const float* w, float* dst,
                                               const AttnPrepArgs& p, float pos, int lane) {
  constexpr int PL = D / kWarp;
  float x[PL];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < PL; ++j) {
    x[j] = src[lane + kWarp * j];
    ss = fmaf(x[j], x[j], ss);
  }
  ss = warp_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(D) + p.eps);
#pragma unroll
  for (int j = 0; j < PL; ++j) {
    const int i = lane + kWarp * j;
    dst[i] = p.zero_centred ? x[j] * inv * (1.0f + w[i]) : w[i] * (x[j] * inv);
  }
  __syncwarp();
  const int half = static_cast<int>(p.rotary_dim / 2);
  for (int i = lane; i < half; i += kWarp) {
    const float phi = pos * p.inv_freq[i];
    const float c = cosf(phi) * p.rope_scale, sn = sinf(phi) * p.rope_scale;
    const float x1 = dst[i], x2 = dst[i + half];
    dst[i] = x1 * c - x2 * sn;
    dst[i + half] = x2 * c + x1 * sn;
  }
  __syncwarp();
}

template <int D>
__global__ void __launch_bounds__(256, 2) attention_mma_kernel(AttentionArgs a, int splits) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kStage = 2 * kTileKeys * D;  // K then V of one tile, in uint16
  constexpr int kChunks = D / 8;             // 16-byte chunks per cache row
  constexpr int kKSteps = D / 32;            // 16-dim steps per warp in the score phase
  constexpr int kDimsPerWarp = D / 8;        // P·V: output dims per warp
  constexpr int kNT = kDimsPerWarp / 8;      // P·V: 8-dim n-tiles per warp
  static_assert(D % 64 == 0 && kChunks >= 8, "swizzle needs 8 chunks per row");
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem);
  float* sp = reinterpret_cast<float*>(stages + kMmaStages * kStage);   // [2][16][kTileKeys]
  uint16_t* ph = reinterpret_cast<uint16_t*>(sp + 2 * 16 * kTileKeys);  // [16][kMmaPitch]
  uint16_t* pl = ph + 16 * kMmaPitch;
  float* ml = reinterpret_cast<float*>(pl + 16 * kMmaPitch);  // m[16], l[16], alpha[16]
  const int tid = threadIdx.x, lane = tid % kWarp, wid = tid / kWarp;
  const int G = static_cast<int>(a.nh / a.nkv);
  const int64_t kvh = blockIdx.y, split = blockIdx.x;
  const int64_t n = a.step->pos0 + 1;
  int64_t chunk, used;
  split_plan(n, splits, a.min_split_keys, chunk, used);
  if (split >= used) {
    pdl_begin(__func__);
    return;
  }
  const int64_t u0 = split * chunk, u1 = u0 + chunk < n ? u0 + chunk : n;
  const int64_t ntiles = (u1 - u0 + kTileKeys - 1) / kTileKeys;
  const bool last = split == used - 1;  // the split whose keys include the new position
  const LayerStateDev ls = a.step->layers[a.layer];
  const int64_t kv_stride = a.nkv * D;
  const uint16_t* kg = static_cast<const uint16_t*>(ls.k_cache) + kvh * D;
  const uint16_t* vg = static_cast<const uint16_t*>(ls.v_cache) + kvh * D;
  const int64_t h0 = kvh * G;
  auto load_tile = [&](int64_t t, uint16_t* dst) {
    if (t < ntiles) {
      const int64_t b0 = u0 + t * kTileKeys;
      stage_kv_tile<D>(kg, vg, kv_stride, b0,
                       static_cast<int>(u1 - b0 < kTileKeys ? u1 - b0 : kTileKeys), dst);
    }
    __pipeline_commit();  // an empty group past the last tile keeps the wait counts uniform
  };
  // Rows before the new position: written by earlier steps only (Note [attention prep in the
  // decode kernel]).
  if (!last) {
    load_tile(0, stages);
    load_tile(1, stages + kStage);
  }
  pdl_begin(__func__);
  float* qs = reinterpret_cast<float*>(stages + 2 * kStage);  // fused_prep: G q rows, then k
  if (a.fused_prep) {
    const AttnPrepArgs& p = a.prep;
    const float pos = static_cast<float>(n - 1);
    const int64_t qw = p.gated ? 2 * D : D;
    for (int h = wid; h < G; h += 8)
      norm_rope_warp<D>(p.qg + (h0 + h) * qw, p.q_norm, qs + h * D, p, pos, lane);
    if (last) {
      const int64_t row = ((n - 1) * a.nkv + kvh) * D;
      if (wid == (G % 8)) {  // the new key: norm, RoPE, into the cache
        float* ks = qs + G * D;
        norm_rope_warp<D>(p.k + kvh * D, p.k_norm, ks, p, pos, lane);
        for (int i = lane; i < D; i += kWarp)
          static_cast<uint16_t*>(ls.k_cache)[row + i] = f2bf16(ks[i]);
      } else if (wid == ((G + 1) % 8)) {  // the new value
        for (int i = lane; i < D; i += kWarp)
          static_cast<uint16_t*>(ls.v_cache)[row + i] = f2bf16(p.v[kvh * D + i]);
      }
    }
    __syncthreads();  // q rows complete; the new cache row written before this block loads it
  }
  if (last) {
    load_tile(0, stages);
    load_tile(1, stages + kStage);
  }

  // Q fragments of this warp's half of the dims, pre-scaled, split into hi and lo.
  const int nt_s = wid % 4, khalf = wid / 4;
  const int r0 = lane / 4, cq = (lane % 4) * 2;
  uint32_t qh[kKSteps][4], ql[kKSteps][4];
  {
    auto qv = [&](int row, int dim) -> float {
      if (row >= G) return 0.f;
      return (a.fused_prep ? qs[row * D + dim] : a.q[(h0 + row) * D + dim]) * a.scale;
    };
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int k0 = khalf * (D / 2) + ks * 16 + cq;
      split_pack(qv(r0, k0), qv(r0, k0 + 1), qh[ks][0], ql[ks][0]);
      split_pack(qv(r0 + 8, k0), qv(r0 + 8, k0 + 1), qh[ks][1], ql[ks][1]);
      split_pack(qv(r0, k0 + 8), qv(r0, k0 + 9), qh[ks][2], ql[ks][2]);
      split_pack(qv(r0 + 8, k0 + 8), qv(r0 + 8, k0 + 9), qh[ks][3], ql[ks][3]);
    }
  }
  // P rows past G stay zero; m, l, alpha start neutral.
  for (int i = tid; i < 16 * kMmaPitch; i += blockDim.x) ph[i] = pl[i] = 0;
  if (tid < 16) {
    ml[tid] = -INFINITY;
    ml[16 + tid] = 0.f;
    ml[32 + tid] = 1.f;
  }
  float o[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t b0 = u0 + t * kTileKeys;
    const int nb = static_cast<int>(u1 - b0 < kTileKeys ? u1 - b0 : kTileKeys);
    __pipeline_wait_prior(1);  // tile t has landed (t + 1 may still be in flight)
    __syncthreads();           // ... for every thread; iteration t − 1 is finished everywhere
    load_tile(t + 2, stages + ((t + 2) % kMmaStages) * kStage);
    const uint16_t* Ks = stages + (t % kMmaStages) * kStage;
    const uint16_t* Vs = Ks + kTileKeys * D;

    // Scores for keys [8·nt_s, +8) over this warp's half of the dims.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const int key = nt_s * 8 + (lane % 8);
#pragma unroll
      for (int ks = 0; ks < kKSteps; ks += 2) {
        const int c = (khalf * (D / 2) + ks * 16) / 8 + lane / 8;  // chunk of matrix lane / 8
        uint32_t kb[4];
        ldmatrix_x4(kb, Ks + key * D + ((c ^ (key & 7)) * 8));
        mma_bf16_16816(s, qh[ks], kb[0], kb[1]);
        mma_bf16_16816(s, ql[ks], kb[0], kb[1]);
        mma_bf16_16816(s, qh[ks + 1], kb[2], kb[3]);
        mma_bf16_16816(s, ql[ks + 1], kb[2], kb[3]);
      }
      float* dst = sp + khalf * 16 * kTileKeys;
      dst[r0 * kTileKeys + nt_s * 8 + cq] = s[0];
      dst[r0 * kTileKeys + nt_s * 8 + cq + 1] = s[1];
      dst[(r0 + 8) * kTileKeys + nt_s * 8 + cq] = s[2];
      dst[(r0 + 8) * kTileKeys + nt_s * 8 + cq + 1] = s[3];
    }
    __syncthreads();
    // Online softmax, one warp per head, lane = key.
    for (int h = wid; h < G; h += blockDim.x / kWarp) {
      const float s0 = lane < nb
                           ? sp[h * kTileKeys + lane] + sp[16 * kTileKeys + h * kTileKeys + lane]
                           : -INFINITY;
      const float mold = ml[h];
      const float mx = fmaxf(mold, warp_max(s0));
      const float p = lane < nb ? expf(s0 - mx) : 0.f;
      const float sum = warp_sum(p);
      const __nv_bfloat16 hi = __float2bfloat16_rn(p);
      ph[h * kMmaPitch + lane] = __bfloat16_as_ushort(hi);
      pl[h * kMmaPitch + lane] =
          __bfloat16_as_ushort(__float2bfloat16_rn(p - __bfloat162float(hi)));
      if (lane == 0) {
        const float alpha = expf(mold - mx);  // 0 on the first tile (m = −inf)
        ml[32 + h] = alpha;
        ml[16 + h] = ml[16 + h] * alpha + sum;
        ml[h] = mx;
      }
    }
    __syncthreads();
    // O(16 × this warp's dims) = alpha · O + P · V over the tile's 32 keys.
    {
      const float a0 = ml[32 + r0], a1 = ml[32 + r0 + 8];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        o[j][0] *= a0;
        o[j][1] *= a0;
        o[j][2] *= a1;
        o[j][3] *= a1;
      }
#pragma unroll
      for (int ks = 0; ks < kTileKeys / 16; ++ks) {
        uint32_t pa_h[4], pa_l[4];
        const int kc = ks * 16 + cq;
        pa_h[0] = *reinterpret_cast<const uint32_t*>(ph + r0 * kMmaPitch + kc);
        pa_h[1] = *reinterpret_cast<const uint32_t*>(ph + (r0 + 8) * kMmaPitch + kc);
        pa_h[2] = *reinterpret_cast<const uint32_t*>(ph + r0 * kMmaPitch + kc + 8);
        pa_h[3] = *reinterpret_cast<const uint32_t*>(ph + (r0 + 8) * kMmaPitch + kc + 8);
        pa_l[0] = *reinterpret_cast<const uint32_t*>(pl + r0 * kMmaPitch + kc);
        pa_l[1] = *reinterpret_cast<const uint32_t*>(pl + (r0 + 8) * kMmaPitch + kc);
        pa_l[2] = *reinterpret_cast<const uint32_t*>(pl + r0 * kMmaPitch + kc + 8);
        pa_l[3] = *reinterpret_cast<const uint32_t*>(pl + (r0 + 8) * kMmaPitch + kc + 8);
        // ldmatrix row addresses: matrix lane / 8 = (keys +0 / +8) × (dims +0 / +8).
        const int key = ks * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
        if constexpr (kNT >= 2) {
#pragma unroll
          for (int j = 0; j < kNT; j += 2) {
            const int c = (wid * kDimsPerWarp + j * 8) / 8 + lane / 16;
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, Vs + key * D + ((c ^ (key & 7)) * 8));
            mma_bf16_16816(o[j], pa_h, vb[0], vb[1]);
            mma_bf16_16816(o[j], pa_l, vb[0], vb[1]);
            mma_bf16_16816(o[j + 1], pa_h, vb[2], vb[3]);
            mma_bf16_16816(o[j + 1], pa_l, vb[2], vb[3]);
          }
        } else {
          const int c = wid * kDimsPerWarp / 8;
          uint32_t vb[2];
          ldmatrix_x2_trans(vb, Vs + key * D + ((c ^ (key & 7)) * 8));
          mma_bf16_16816(o[0], pa_h, vb[0], vb[1]);
          mma_bf16_16816(o[0], pa_l, vb[0], vb[1]);
        }
      }
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  const int64_t nrow_total = static_cast<int64_t>(a.nh) * splits;  // T = 1
  float* pm = a.partial;
  float* plo = a.partial + nrow_total;
  float* po = a.partial + 2 * nrow_total;
  if (tid < G) {
    pm[(h0 + tid) * splits + split] = ml[tid];
    plo[(h0 + tid) * splits + split] = ml[16 + tid];
  }
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int dim = wid * kDimsPerWarp + j * 8 + cq;
    if (r0 < G) {
      float* dst = po + ((h0 + r0) * splits + split) * D + dim;
      dst[0] = o[j][0];
      dst[1] = o[j][1];
    }
    if (r0 + 8 < G) {
      float* dst = po + ((h0 + r0 + 8) * splits + split) * D + dim;
      dst[0] = o[j][2];
      dst[1] = o[j][3];
    }
  }
}

/// f(std::integral_constant<int, D>{}) for the head dims the tensor-core attention kernels are
/// instantiated for (64, 128, 256); false for any other.
template <class F>
bool by_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    default:
      return false;
  }
}

template <int D>
size_t attention_mma_smem() {
  return static_cast<size_t>(kMmaStages) * 2 * kTileKeys * D * 2 + 2 * 16 * kTileKeys * 4 +
         2 * 16 * kMmaPitch * 2 + 48 * 4;
}

/// Whether the tensor-core kernel for head_dim D can run on this device (its shared memory: 105 KB
/// at D = 256, more than sm_86/89 give a block).
template <int D>
bool mma_ready() {
  static const bool ok = allow_smem(attention_mma_kernel<D>, attention_mma_smem<D>());
  return ok;
}

bool mma_applies(const AttentionArgs& a) {
  if (a.T != 1 || a.kv_f32 || a.nh % a.nkv != 0 || a.nh / a.nkv > 16) return false;
  return by_head_dim(a.d, [](auto D) { return mma_ready<decltype(D)::value>(); });
}

template <int D>
void launch_mma(const AttentionArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(a.max_splits), static_cast<unsigned>(a.nkv));
  launch(attention_mma_kernel<D>, grid, 256, attention_mma_smem<D>(), s, a, a.max_splits);
}

/// The tensor-core decode kernel when it applies (one token, BF16 cache, head_dim 64/128/256, GQA
/// group ≤ 16, shared memory for it); false: try the others.
bool attention_mma(const AttentionArgs& a, cudaStream_t s) {
  return mma_applies(a) && by_head_dim(a.d, [&](auto D) {
           launch_mma<decltype(D)::value>(a, s);
           return true;
         });
}

/// The tiled decode kernel when it applies (one token, BF16 cache, head_dim 64/128/256, GQA group
/// 1..16 a power of two); false: use the general kernel.
bool attention_tile(const AttentionArgs& a, cudaStream_t s) {
  if (a.T != 1 || a.kv_f32 || a.nh % a.nkv != 0) return false;
  const int64_t G = a.nh / a.nkv;
  return by_head_dim(a.d, [&](auto D) { return launch_tile_g<decltype(D)::value>(a, G, s); });
}

// ------------------------------------------------------------- prefill attention, tensor cores

// Note [tensor-core prefill attention]
// The warp kernel (attention_kernel) does a prompt's attention in fp32 FMAs: at 8K tokens the
// 35B-A3B's ten attention layers took 1.13 s on the H100 (~5 TFLOP/s, half of an 8K prefill).
// Here a block takes 64 query rows of one KV head, a row being a (token, head of the GQA group)
// pair (row = token · G + head), so the group's heads share every K/V tile the block loads, and
// walks the keys the rows can see (causal) in tiles of 32 in flash style: S = Q·Kᵀ and O += P·V on
// tensor cores (`mma.sync.m16n8k16`, fp32 accumulation), the online softmax in registers (FA2:
// the accumulator layout of S is the A operand layout of P). As in the decode kernel (Note
// [tensor-core decode attention]) K and V are exact BF16 from the cache and Q and P, fp32 values,
// are each split into hi + lo BF16 parts and multiplied twice, which keeps the result within the
// fp32 kernels' tolerance at twice the tensor work.
// Layout: 4 warps, warp w owns rows [16w, 16w + 16) and all D output dims (D/2 fp32 accumulators
// per thread at D = 256); shared memory holds Q (hi and lo, staged once) and two K|V tile stages
// (cp.async double buffer), rows XOR-swizzled by 16-byte chunk as in the decode kernels. Only
// tiles past the block's first token need the causal mask. Blocks start with the last rows
// (those with the most keys) so the last wave is short. No split over keys and no combine: it
// pays where there are enough rows to fill the GPU (attention_prefill_applies), the warp kernel
// with its key splits takes the rest (a few tokens after a long context).
constexpr int kPfRows = 64;         // query rows per block: 4 warps × 16
constexpr int kPfKeys = kTileKeys;  // keys per tile (the decode kernels' tiles: stage_kv_tile)

template <int D>
constexpr size_t attention_prefill_smem() {
  return static_cast<size_t>(2 * kPfRows * D + 2 * 2 * kPfKeys * D) * sizeof(uint16_t);
}

template <int D>
__global__ void __launch_bounds__(128) attention_prefill_kernel(AttentionArgs a, int64_t nrt) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kStage = 2 * kPfKeys * D;
  constexpr int kNT = D / 8;  // 8-dim n-tiles of the output
  static_assert(D % 64 == 0, "the swizzle needs 8 chunks per row");
  uint16_t* qhs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* qls = qhs + kPfRows * D;
  uint16_t* kvs = qls + kPfRows * D;
  pdl_begin(__func__);
  const int tid = threadIdx.x, lane = tid % kWarp, wid = tid / kWarp;
  const int64_t G = a.nh / a.nkv;
  const int64_t rt = nrt - 1 - static_cast<int64_t>(blockIdx.x);  // the longest rows first
  const int64_t kvh = blockIdx.y, row0 = rt * kPfRows;
  const int64_t pos0 = a.step->pos0;
  const int64_t tok_first = row0 / G;
  const int64_t tok_last = min((row0 + kPfRows - 1) / G, a.T - 1);
  const int64_t nkeys = pos0 + tok_last + 1;      // keys the block's last token sees
  const int64_t unmasked = pos0 + tok_first + 1;  // keys every row of the block sees
  const int64_t ntiles = (nkeys + kPfKeys - 1) / kPfKeys;
  const LayerStateDev ls = a.step->layers[a.layer];
  const int64_t kv_stride = a.nkv * D;
  const uint16_t* kg = static_cast<const uint16_t*>(ls.k_cache) + kvh * D;
  const uint16_t* vg = static_cast<const uint16_t*>(ls.v_cache) + kvh * D;
  // Keys at or past nkeys are zero-filled by stage_kv_tile (and masked below).
  auto load_tile = [&](int64_t t, uint16_t* dst) {
    if (t < ntiles) {
      const int64_t b0 = t * kPfKeys;
      stage_kv_tile<D>(kg, vg, kv_stride, b0,
                       static_cast<int>(nkeys - b0 < kPfKeys ? nkeys - b0 : kPfKeys), dst);
    }
    __pipeline_commit();
  };
  load_tile(0, kvs);
  // Q rows, pre-scaled, split into hi and lo (rows past the last token: zero).
  for (int i = tid; i < kPfRows * kChunks; i += blockDim.x) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t row = row0 + r, tok = row / G, h = kvh * G + row % G;
    uint32_t hi[4] = {0, 0, 0, 0}, lo[4] = {0, 0, 0, 0};
    if (tok < a.T) {
      const float* src = a.q + (tok * a.nh + h) * D + c * 8;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        split_pack(src[2 * j] * a.scale, src[2 * j + 1] * a.scale, hi[j], lo[j]);
    }
    const int pc = c ^ (r & 7);
    *reinterpret_cast<uint4*>(qhs + r * D + pc * 8) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    *reinterpret_cast<uint4*>(qls + r * D + pc * 8) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
  const int r0 = lane / 4, cq = (lane % 4) * 2;
  const int64_t wr = row0 + wid * 16 + r0;  // this thread's rows: wr and wr + 8
  const int64_t lim0 = min(pos0 + wr / G, nkeys - 1), lim1 = min(pos0 + (wr + 8) / G, nkeys - 1);
  const int qrow = wid * 16 + (lane % 8) + 8 * ((lane / 8) % 2);  // ldmatrix row of the A operand
  float o[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  for (int64_t t = 0; t < ntiles; ++t) {
    __pipeline_wait_prior(0);  // tile t has landed
    __syncthreads();           // ... for every thread (and Q is staged); tile t − 1 is done
    load_tile(t + 1, kvs + ((t + 1) & 1) * kStage);
    const uint16_t* Ks = kvs + (t & 1) * kStage;
    const uint16_t* Vs = Ks + kPfKeys * D;
    // S (16 rows × 32 keys per warp): 4 n-tiles of 8 keys.
    float s[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks += 2) {
      uint32_t qh0[4], ql0[4], qh1[4], ql1[4];
      const int qc0 = ks * 2 + lane / 16, qc1 = qc0 + 2;
      ldmatrix_x4(qh0, qhs + qrow * D + ((qc0 ^ (qrow & 7)) * 8));
      ldmatrix_x4(ql0, qls + qrow * D + ((qc0 ^ (qrow & 7)) * 8));
      ldmatrix_x4(qh1, qhs + qrow * D + ((qc1 ^ (qrow & 7)) * 8));
      ldmatrix_x4(ql1, qls + qrow * D + ((qc1 ^ (qrow & 7)) * 8));
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int key = nt * 8 + (lane % 8), c = ks * 2 + lane / 8;
        uint32_t kb[4];
        ldmatrix_x4(kb, Ks + key * D + ((c ^ (key & 7)) * 8));
        mma_bf16_16816(s[nt], qh0, kb[0], kb[1]);
        mma_bf16_16816(s[nt], ql0, kb[0], kb[1]);
        mma_bf16_16816(s[nt], qh1, kb[2], kb[3]);
        mma_bf16_16816(s[nt], ql1, kb[2], kb[3]);
      }
    }
    const int64_t b0 = t * kPfKeys;
    if (b0 + kPfKeys > unmasked) {  // some key of the tile lies past some row's position
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (b0 + nt * 8 + cq + (e & 1) > (e < 2 ? lim0 : lim1)) s[nt][e] = -INFINITY;
    }
    // Online softmax over the quad that holds each row (key 0 is in every row's first tile, so
    // the maxima are finite from then on).
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float al0 = expf(m0 - mx0), al1 = expf(m1 - mx1);  // 0 on the first tile
    m0 = mx0;
    m1 = mx1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      s[nt][0] = expf(s[nt][0] - mx0);
      s[nt][1] = expf(s[nt][1] - mx0);
      s[nt][2] = expf(s[nt][2] - mx1);
      s[nt][3] = expf(s[nt][3] - mx1);
      ps0 += s[nt][0] + s[nt][1];
      ps1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * al0 + ps0;  // this thread's share of the row sums (the quad adds them at the end)
    l1 = l1 * al1 + ps1;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      o[j][0] *= al0;
      o[j][1] *= al0;
      o[j][2] *= al1;
      o[j][3] *= al1;
    }
    // O += P · V: P's A operand straight from the S accumulators (two k-steps of 16 keys).
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t ph[4], pl[4];
      split_pack(s[2 * kk][0], s[2 * kk][1], ph[0], pl[0]);
      split_pack(s[2 * kk][2], s[2 * kk][3], ph[1], pl[1]);
      split_pack(s[2 * kk + 1][0], s[2 * kk + 1][1], ph[2], pl[2]);
      split_pack(s[2 * kk + 1][2], s[2 * kk + 1][3], ph[3], pl[3]);
      const int key = kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        const int c = j + lane / 16;
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, Vs + key * D + ((c ^ (key & 7)) * 8));
        mma_bf16_16816(o[j], ph, vb[0], vb[1]);
        mma_bf16_16816(o[j], pl, vb[0], vb[1]);
        mma_bf16_16816(o[j + 1], ph, vb[2], vb[3]);
        mma_bf16_16816(o[j + 1], pl, vb[2], vb[3]);
      }
    }
  }
  __pipeline_wait_prior(0);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = wr + 8 * half, tok = row / G;
    if (tok >= a.T) continue;
    const int64_t h = kvh * G + row % G;
    const float inv = 1.0f / (half ? l1 : l0);
    float* dst = a.out + (tok * a.nh + h) * D;
    const float* gt = a.gate ? a.gate + (tok * a.nh + h) * D : nullptr;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int dim = j * 8 + cq;
      float v0 = o[j][2 * half] * inv, v1 = o[j][2 * half + 1] * inv;
      if (gt) {
        v0 *= sigmoidf_(gt[dim]);
        v1 *= sigmoidf_(gt[dim + 1]);
      }
      dst[dim] = v0;
      dst[dim + 1] = v1;
    }
  }
}

template <int D>
bool prefill_ready() {
  static const bool ok = allow_smem(attention_prefill_kernel<D>, attention_prefill_smem<D>());
  return ok;
}

/// Rows × heads × dims from which the tensor-core prefill kernel is taken. An estimate, not a
/// measured crossover: its blocks walk their keys serially (one block per 64 rows and KV head, a
/// few µs per 32-key tile), while the warp kernel splits the keys over many blocks but computes
/// at ~5 TFLOP/s (its 8K-token time on the H100), so the tensor cores should win from
/// T·nh·d ≈ 8·10⁴ on (T ≈ 20 tokens for the 35B-A3B) whatever the context; below that, a few
/// tokens after a long context keep the split warp kernel.
constexpr int64_t kPrefillMinWork = 65536;

bool attention_prefill_applies(const AttentionArgs& a) {
  if (a.T < 2 || a.kv_f32 || a.fused_prep || a.nkv <= 0 || a.nh % a.nkv != 0) return false;
  const int64_t G = a.nh / a.nkv;
  if (G > kPfRows || kPfRows % G != 0 || a.T * a.nh * a.d < kPrefillMinWork) return false;
  return by_head_dim(a.d, [](auto D) { return prefill_ready<decltype(D)::value>(); });
}

template <int D>
void launch_prefill(const AttentionArgs& a, cudaStream_t s) {
  const int64_t nrt = (a.T * (a.nh / a.nkv) + kPfRows - 1) / kPfRows;
  const dim3 grid(static_cast<unsigned>(nrt), static_cast<unsigned>(a.nkv));
  launch(attention_prefill_kernel<D>, grid, 128, attention_prefill_smem<D>(), s, a, nrt);
}

/// The tensor-core prefill kernel when it applies; false: use the others.
bool attention_prefill(const AttentionArgs& a, cudaStream_t s) {
  return attention_prefill_applies(a) && by_head_dim(a.d, [&](auto D) {
           launch_prefill<decltype(D)::value>(a, s);
           return true;
         });
}

template <typename KT, int DPL>
void attention_dispatch_r(const AttentionArgs& a, int R, int subsets, int splits, dim3 grid,
                          cudaStream_t s) {
  const dim3 block(kAttnWarps * kWarp);
  switch (R) {
    case 1:
      launch(attention_kernel<KT, DPL, 1>, grid, block, 0, s, a, subsets, splits);
      break;
    case 2:
      launch(attention_kernel<KT, DPL, 2>, grid, block, 0, s, a, subsets, splits);
      break;
    case 4:
      launch(attention_kernel<KT, DPL, 4>, grid, block, 0, s, a, subsets, splits);
      break;
    case 8:
      launch(attention_kernel<KT, DPL, 8>, grid, block, 0, s, a, subsets, splits);
      break;
    default:
      launch(attention_kernel<KT, DPL, 16>, grid, block, 0, s, a, subsets, splits);
      break;
  }
}
template <typename KT>
void attention_dispatch(const AttentionArgs& a, int dpl, int R, int subsets, int splits, dim3 grid,
                        cudaStream_t s) {
  switch (dpl) {
    case 1:
      attention_dispatch_r<KT, 1>(a, R, subsets, splits, grid, s);
      break;
    case 2:
      attention_dispatch_r<KT, 2>(a, R, subsets, splits, grid, s);
      break;
    case 4:
      attention_dispatch_r<KT, 4>(a, R, subsets, splits, grid, s);
      break;
    default:
      attention_dispatch_r<KT, 8>(a, R, subsets, splits, grid, s);
      break;
  }
}

// --------------------------------------------------------------------------- Gated DeltaNet

__global__ void gdn_split_next_kernel(const float* p, const float* ba, int64_t ld, float* mixed,
                                      float* z, float* b, float* a, int64_t nk, int64_t nv,
                                      int64_t dk, int64_t dv) {
  pdl_begin(__func__);
  const int64_t t = blockIdx.x, rho = nv / nk, gw = 2 * dk + 2 * rho * dv,
                C = 2 * nk * dk + nv * dv;
  const float* pt = p + t * (ld ? ld : nk * gw);
  const float* bat = ba + t * (ld ? ld : 2 * nv);
  for (int64_t i = threadIdx.x; i < nk * gw; i += blockDim.x) {
    const int64_t kh = i / gw, o = i % gw;
    const float v = pt[i];
    if (o < dk) {
      mixed[t * C + kh * dk + o] = v;
    } else if (o < 2 * dk) {
      mixed[t * C + nk * dk + kh * dk + (o - dk)] = v;
    } else if (o < 2 * dk + rho * dv) {
      const int64_t j = (o - 2 * dk) / dv, e = (o - 2 * dk) % dv;
      mixed[t * C + 2 * nk * dk + (kh * rho + j) * dv + e] = v;
    } else {
      const int64_t j = (o - 2 * dk - rho * dv) / dv, e = (o - 2 * dk - rho * dv) % dv;
      z[(t * nv + kh * rho + j) * dv + e] = v;
    }
  }
  for (int64_t i = threadIdx.x; i < 2 * nv; i += blockDim.x) {
    const int64_t kh = i / (2 * rho), o = i % (2 * rho);
    if (o < rho)
      b[t * nv + kh * rho + o] = bat[i];
    else
      a[t * nv + kh * rho + (o - rho)] = bat[i];
  }
}

/// Thread per channel, sequential over tokens (K ≤ 8).
__global__ void conv1d_kernel(const float* src, int64_t ld, int64_t T, int64_t C, int64_t K,
                              const float* w, const StepDev* step, int layer, float* dst) {
  pdl_begin(__func__);
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float* state = step->layers[layer].conv;
  const int64_t hist = K - 1;
  float win[8], wk[8];
  for (int64_t j = 0; j < hist; ++j) win[j] = state[j * C + c];
  for (int64_t j = 0; j < K; ++j) wk[j] = w[c * K + j];
  for (int64_t t = 0; t < T; ++t) {
    const float x = src[t * ld + c];
    float acc = 0.f;
    for (int64_t j = 0; j < hist; ++j) acc = fmaf(wk[j], win[j], acc);
    acc = fmaf(wk[hist], x, acc);
    dst[t * C + c] = siluf_(acc);
    for (int64_t j = 0; j + 1 < hist; ++j) win[j] = win[j + 1];
    if (hist > 0) win[hist - 1] = x;
  }
  for (int64_t j = 0; j < hist; ++j) state[j * C + c] = win[j];
}

/// A prompt's conv in parallel over time as well: thread per (channel, segment of kConvSeg tokens),
/// the window's history from src, or from the layer's conv state before the first token. The new
/// state is written by conv1d_state_kernel once every segment has read the old one. (conv1d_kernel,
/// one thread per channel walking all T tokens, left 64 blocks on the GPU: 4.9 ms per 35B-A3B
/// layer at 8K tokens.)
constexpr int64_t kConvSeg = 32;
__global__ void conv1d_seg_kernel(const float* src, int64_t ld, int64_t T, int64_t C, int64_t K,
                                  const float* w, const StepDev* step, int layer, float* dst) {
  pdl_begin(__func__);
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t t0 = blockIdx.y * kConvSeg, t1 = t0 + kConvSeg < T ? t0 + kConvSeg : T;
  const float* state = step->layers[layer].conv;
  const int64_t hist = K - 1;
  float win[8], wk[8];
  for (int64_t j = 0; j < hist; ++j) {
    const int64_t t = t0 - hist + j;  // state row j holds token j − hist
    win[j] = t >= 0 ? src[t * ld + c] : state[(t + hist) * C + c];
  }
  for (int64_t j = 0; j < K; ++j) wk[j] = w[c * K + j];
  for (int64_t t = t0; t < t1; ++t) {
    const float x = src[t * ld + c];
    float acc = 0.f;
    for (int64_t j = 0; j < hist; ++j) acc = fmaf(wk[j], win[j], acc);
    acc = fmaf(wk[hist], x, acc);
    dst[t * C + c] = siluf_(acc);
    for (int64_t j = 0; j + 1 < hist; ++j) win[j] = win[j + 1];
    if (hist > 0) win[hist - 1] = x;
  }
}
/// The conv state after T ≥ K − 1 tokens: their last K − 1 inputs.
__global__ void conv1d_state_kernel(const float* src, int64_t ld, int64_t T, int64_t C, int64_t K,
                                    const StepDev* step, int layer) {
  pdl_begin(__func__);
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float* state = step->layers[layer].conv;
  for (int64_t j = 0; j < K - 1; ++j) state[j * C + c] = src[(T - (K - 1) + j) * ld + c];
}

/// Decode step (T = 1) of conv1d + SiLU + q/k L2 norms + beta/g: block per q, k or v head, thread
/// per channel of the head.
__global__ void gdn_conv_prep_step_kernel(const float* src, const float* cw, const StepDev* step,
                                          int layer, int64_t K, const float* b, const float* a,
                                          const float* A_log, const float* dt_bias, float* q,
                                          float* k, float* v, float* beta, float* g, int64_t nk,
                                          int64_t nv, int64_t dk, int64_t dv, int64_t ld_src,
                                          int64_t ld_ba) {
  const int64_t C = 2 * nk * dk + nv * dv, blk = blockIdx.x;
  {  // row blockIdx.y: its own sequence (batched decode)
    const int64_t r = blockIdx.y;
    src += r * ld_src;
    b += r * ld_ba;
    a += r * ld_ba;
    q += r * nk * dk;
    k += r * nk * dk;
    v += r * nv * dv;
    beta += r * nv;
    g += r * nv;
    step += r;
  }
  const bool is_v = blk >= 2 * nk;
  const int64_t width = is_v ? dv : dk;
  const int64_t base = is_v ? 2 * nk * dk + (blk - 2 * nk) * dv : blk * dk;
  const int c = threadIdx.x;
  const int64_t ch = base + c;
  float* state = step->layers[layer].conv;
  // Filter taps and the conv state are read before the dependency wait (K ≤ 4, the models'
  // kernel): only this layer's conv step writes the state, and never as the kernel just before
  // this one (Note [programmatic dependent launch]).
  constexpr int kPre = 4;
  float cwr[kPre] = {}, str[kPre] = {};
  const bool pre = K <= kPre && c < width;
  if (pre) {
#pragma unroll
    for (int j = 0; j < kPre; ++j)
      if (j < K) {
        cwr[j] = cw[ch * K + j];
        if (j + 1 < K) str[j] = state[j * C + ch];
      }
  }
  pdl_begin(__func__);
  float u = 0.f;
  if (pre) {
    const float x = src[ch];
    float acc = cwr[K - 1] * x;
#pragma unroll
    for (int j = 0; j + 1 < kPre; ++j)
      if (j + 1 < K) acc = fmaf(cwr[j], str[j], acc);
#pragma unroll
    for (int j = 0; j + 2 < kPre; ++j)
      if (j + 2 < K) state[j * C + ch] = str[j + 1];
    if (K > 1) state[(K - 2) * C + ch] = x;
    u = siluf_(acc);
  } else if (c < width) {
    const float x = src[ch];
    float acc = cw[ch * K + K - 1] * x;
    for (int64_t j = 0; j + 1 < K; ++j) acc = fmaf(cw[ch * K + j], state[j * C + ch], acc);
    for (int64_t j = 0; j + 2 < K; ++j) state[j * C + ch] = state[(j + 1) * C + ch];
    if (K > 1) state[(K - 2) * C + ch] = x;
    u = siluf_(acc);
  }
  if (is_v) {
    if (c < width) v[(blk - 2 * nk) * dv + c] = u;
  } else {
    const float ss = block_sum(u * u);
    const bool is_k = blk >= nk;
    const float f = (1.0f / sqrtf(ss + 1e-6f)) * (is_k ? 1.0f : rsqrtf(static_cast<float>(dk)));
    if (c < width) (is_k ? k + (blk - nk) * dk : q + blk * dk)[c] = u * f;
  }
  if (blk == 0)
    for (int64_t h = c; h < nv; h += blockDim.x) {
      beta[h] = sigmoidf_(b[h]);
      g[h] = -expf(A_log[h]) * softplusf_(a[h] + dt_bias[h]);
    }
}

/// Block per token: warps normalise q/k heads, then v copy and beta/g.
__global__ void gdn_prep_kernel(const float* u, const float* b, const float* a, int64_t ld_ba,
                                const float* A_log, const float* dt_bias, float* q, float* k,
                                float* v, float* beta, float* g, int64_t nk, int64_t nv, int64_t dk,
                                int64_t dv) {
  pdl_begin(__func__);
  const int64_t t = blockIdx.x, C = 2 * nk * dk + nv * dv;
  const float* ut = u + t * C;
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  const float qscale = rsqrtf(static_cast<float>(dk));
  for (int64_t row = wid; row < 2 * nk; row += nw) {
    const bool is_k = row >= nk;
    const int64_t kh = is_k ? row - nk : row;
    const float* src = ut + (is_k ? nk * dk : 0) + kh * dk;
    float ss = 0.f;
    for (int64_t i = lane; i < dk; i += kWarp) ss += src[i] * src[i];
    ss = warp_sum(ss);
    const float f = (1.0f / sqrtf(ss + 1e-6f)) * (is_k ? 1.0f : qscale);
    float* dst = (is_k ? k : q) + (t * nk + kh) * dk;
    for (int64_t i = lane; i < dk; i += kWarp) dst[i] = src[i] * f;
  }
  for (int64_t i = threadIdx.x; i < nv * dv; i += blockDim.x)
    v[t * nv * dv + i] = ut[2 * nk * dk + i];
  for (int64_t h = threadIdx.x; h < nv; h += blockDim.x) {
    beta[t * nv + h] = sigmoidf_(b[t * ld_ba + h]);
    g[t * nv + h] = -expf(A_log[h]) * softplusf_(a[t * ld_ba + h] + dt_bias[h]);
  }
}

/// Block per (v head, slice of CB value columns); thread (col, row group) keeps RPT rows of one
/// state column in registers; lanes of one column are adjacent, so the dot products over d_k are
/// warp shuffles. Tokens are processed in order.
template <int RPT, bool NORM, bool EARLY>
__global__ void delta_rule_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v, const float* __restrict__ g,
                                  const float* __restrict__ beta, const StepDev* step, int layer,
                                  float* __restrict__ out, int64_t T, int64_t nk, int64_t nv,
                                  int64_t dk, int64_t dv, int CB, const float* __restrict__ z,
                                  int64_t ld_z, const float* __restrict__ nw, float eps,
                                  bool qk_l2) {
  extern __shared__ float qk[];  // q then k of the current token (2·dk)
  __shared__ float qkf[2];       // qk_l2: the q and k L2-norm factors
  {  // row blockIdx.z: its own sequence of T tokens (batched decode: T = 1)
    const int64_t r = blockIdx.z;
    q += r * T * nk * dk;
    k += r * T * nk * dk;
    v += r * T * nv * dv;
    g += r * T * nv;
    beta += r * T * nv;
    out += r * T * nv * dv;
    if (z) z += r * T * ld_z;
    step += r;
  }
  const int RG = static_cast<int>(dk / RPT);
  const int h = blockIdx.x, col = blockIdx.y * CB + threadIdx.x / RG, rg = threadIdx.x % RG;
  const int64_t kh = h / (nv / nk);
  float* S = step->layers[layer].recurrent + static_cast<int64_t>(h) * dk * dv;
  // The state is loaded before the dependency wait: only this layer's delta rule writes it, and
  // never as the kernel just before this one (Note [programmatic dependent launch]).
  float st[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) st[i] = S[(rg * RPT + i) * dv + col];
  KernelStamp* const ks = pdl_begin(__func__);
  for (int64_t t = 0; t < T; ++t) {
    // EARLY: this token's v, g, beta (and z, the norm weight) loaded with q and k, before the
    // first barrier (Note [early loads]).
    float ev = 0.f, eg = 0.f, eb = 0.f, ez = 0.f, ew = 0.f;
    if constexpr (EARLY) {
      eg = g[t * nv + h];
      eb = beta[t * nv + h];
      ev = v[(t * nv + h) * dv + col];
      if constexpr (NORM)
        if (rg == 0) {
          ez = z[t * ld_z + h * dv + col];
          ew = nw[col];
        }
    }
    for (int64_t i = threadIdx.x; i < 2 * dk; i += blockDim.x)
      qk[i] = i < dk ? q[(t * nk + kh) * dk + i] : k[(t * nk + kh) * dk + (i - dk)];
    __syncthreads();
    if (t == 0) stamp_mark(ks, 0);  // q and k in shared memory
    // qk_l2: q and k as they come from the conv (gemv_gdn_in), L2-normalised here as
    // gdn_conv_prep_step does (q also by 1/sqrt(d_k)); the factors scale the sums below.
    float fq = 1.f, fk = 1.f;
    if (qk_l2) {
      // Full warps reduce (one per vector); a block narrower than a warp (d_v < 32) sums serially.
      const int ln = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
      const int nfull = static_cast<int>(blockDim.x / kWarp);
      auto factor = [&](int r, float ss) {
        qkf[r] = (1.0f / sqrtf(ss + 1e-6f)) * (r == 0 ? rsqrtf(static_cast<float>(dk)) : 1.0f);
      };
      if (nfull > 0) {
        if (wid < nfull)
          for (int r = wid; r < 2; r += nfull) {
            float ss = 0.f;
            for (int64_t i = ln; i < dk; i += kWarp) ss = fmaf(qk[r * dk + i], qk[r * dk + i], ss);
            ss = warp_sum(ss);
            if (ln == 0) factor(r, ss);
          }
      } else if (threadIdx.x < 2) {
        const int r = static_cast<int>(threadIdx.x);
        float ss = 0.f;
        for (int64_t i = 0; i < dk; ++i) ss = fmaf(qk[r * dk + i], qk[r * dk + i], ss);
        factor(r, ss);
      }
      __syncthreads();
      fq = qkf[0];
      fk = qkf[1];
    }
    const float decay = expf(EARLY ? eg : g[t * nv + h]);
    const float bt = EARLY ? eb : beta[t * nv + h];
    const float* kk = qk + dk + rg * RPT;
    const float* qq = qk + rg * RPT;
    float mem = 0.f;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      st[i] *= decay;
      mem = fmaf(st[i], kk[i], mem);
    }
    for (int off = 1; off < RG; off <<= 1) mem += __shfl_xor_sync(0xffffffffu, mem, off);
    const float delta = bt * ((EARLY ? ev : v[(t * nv + h) * dv + col]) - mem * fk) * fk;
    float o = 0.f;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      st[i] = fmaf(kk[i], delta, st[i]);
      o = fmaf(st[i], qq[i], o);
    }
    for (int off = 1; off < RG; off <<= 1) o += __shfl_xor_sync(0xffffffffu, o, off);
    o *= fq;
    if (t == 0) stamp_mark(ks, 1);  // the state updated, the output column computed
    if constexpr (NORM) {  // the block holds the whole head: y = w · rms_norm(o) · silu(z)
      const float ss = block_sum(rg == 0 ? o * o : 0.f);
      const float inv = rsqrtf(ss / static_cast<float>(dv) + eps);
      if (rg == 0)
        out[(t * nv + h) * dv + col] =
            (EARLY ? ew : nw[col]) * (o * inv) * siluf_(EARLY ? ez : z[t * ld_z + h * dv + col]);
    } else {
      if (rg == 0) out[(t * nv + h) * dv + col] = o;
    }
    __syncthreads();
  }
  stamp_mark(ks, 2);  // the outputs written, the state's store next
#pragma unroll
  for (int i = 0; i < RPT; ++i) S[(rg * RPT + i) * dv + col] = st[i];
}

// Note [delta rule over a prompt]
// delta_rule_kernel walks the tokens one by one, each step loading that token's q and k from
// global memory into shared memory between two barriers, so a step costs a few global-memory
// latencies (~2.3 µs per token on the H100: 18.5 ms per 35B-A3B layer at 8K tokens, a quarter
// of an 8K prefill). For T ≥ 2 this kernel stages kDrChunk tokens at a time (q, k, the block's v
// columns, g, beta) into shared memory with cp.async, the next chunk in flight while the current
// one is computed, so a step touches only shared memory and registers and a barrier falls once
// per chunk. Thread (column, row group) holds rows i·RG + rg of its state column (interleaved,
// so the lanes of a warp read distinct banks); blocks of 16 columns give 4·nv blocks for the
// recurrence's parallelism. Same arithmetic per token as delta_rule_kernel (fp32, same order of
// the row sums up to the interleave).
constexpr int kDrChunk = 16;

template <int RPT>
__global__ void delta_rule_prefill_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ g,
                                          const float* __restrict__ beta, const StepDev* step,
                                          int layer, float* __restrict__ out, int64_t T, int64_t nk,
                                          int64_t nv, int64_t dk, int64_t dv, int CB, bool qk_l2) {
  extern __shared__ float dsm[];
  const int64_t r = blockIdx.z;  // row r: its own sequence of T tokens
  q += r * T * nk * dk;
  k += r * T * nk * dk;
  v += r * T * nv * dv;
  g += r * T * nv;
  beta += r * T * nv;
  out += r * T * nv * dv;
  step += r;
  const int64_t pitch = 2 * dk + 1;        // a token's q | k in shared memory (odd: no bank clashes
                                           // when threads of one token row read different tokens)
  float* qks = dsm;                        // [2][kDrChunk][pitch]
  float* vs = qks + 2 * kDrChunk * pitch;  // [2][kDrChunk][CB]
  float* gbs = vs + 2 * kDrChunk * CB;     // [2][kDrChunk][2]: g, beta
  float* fs = gbs + 2 * kDrChunk * 2;      // [kDrChunk][2]: qk_l2 factors of q, k
  const int RG = static_cast<int>(dk / RPT);
  const int h = blockIdx.x, cl = threadIdx.x / RG, rg = threadIdx.x % RG;
  const int64_t col = blockIdx.y * static_cast<int64_t>(CB) + cl;
  const int64_t kh = h / (nv / nk);
  // The lanes of a block narrower than a warp (the row groups of a column are consecutive lanes).
  const unsigned lanes = blockDim.x >= kWarp ? 0xffffffffu : (1u << blockDim.x) - 1u;
  float* S = step->layers[layer].recurrent + static_cast<int64_t>(h) * dk * dv;
  // State before the dependency wait, as delta_rule_kernel (only this layer's kernel writes it).
  float st[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) st[i] = S[(i * RG + rg) * dv + col];
  pdl_begin(__func__);
  // Staging without divisions: the 64-bit division and remainder per staged element are gone.
  const int dki = static_cast<int>(dk), nth = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  auto stage = [&](int64_t c0, int buf) {
    const int n = static_cast<int>(T - c0 < kDrChunk ? T - c0 : kDrChunk);
    float* qd = qks + buf * kDrChunk * pitch;
    for (int tt = 0; tt < n; ++tt) {
      const int64_t off = ((c0 + tt) * nk + kh) * dk;
      for (int j = tid; j < dki; j += nth) {
        __pipeline_memcpy_async(qd + tt * pitch + j, q + off + j, 4);
        __pipeline_memcpy_async(qd + tt * pitch + dki + j, k + off + j, 4);
      }
      const int64_t voff = ((c0 + tt) * nv + h) * dv + blockIdx.y * static_cast<int64_t>(CB);
      for (int c = tid; c < CB; c += nth)
        __pipeline_memcpy_async(vs + (buf * kDrChunk + tt) * CB + c, v + voff + c, 4);
    }
    for (int i = tid; i < 2 * n; i += nth) {
      const int64_t t = c0 + i / 2;
      __pipeline_memcpy_async(gbs + buf * kDrChunk * 2 + i,
                              i % 2 ? beta + t * nv + h : g + t * nv + h, 4);
    }
    __pipeline_commit();
  };
  stage(0, 0);
  int buf = 0;
  for (int64_t c0 = 0; c0 < T; c0 += kDrChunk, buf ^= 1) {
    __pipeline_wait_prior(0);
    __syncthreads();  // chunk c0 staged for every thread; the other buffer's chunk is done
    if (c0 + kDrChunk < T) stage(c0 + kDrChunk, buf ^ 1);
    const int n = static_cast<int>(T - c0 < kDrChunk ? T - c0 : kDrChunk);
    const float* qd = qks + buf * kDrChunk * pitch;
    if (qk_l2) {  // L2 factors of the chunk's q and k rows (q also by 1/sqrt(d_k)), as
                  // delta_rule_kernel computes them
      for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
        const float* x = qd + (i / 2) * pitch + (i % 2) * dk;
        float ss = 0.f;
        for (int64_t j = 0; j < dk; ++j) ss = fmaf(x[j], x[j], ss);
        fs[i] = (1.0f / sqrtf(ss + 1e-6f)) * (i % 2 == 0 ? rsqrtf(static_cast<float>(dk)) : 1.0f);
      }
      __syncthreads();
    }
    for (int tt = 0; tt < n; ++tt) {
      const float* qq = qd + tt * pitch + rg;
      const float* kk = qq + dk;
      const float fq = qk_l2 ? fs[2 * tt] : 1.f, fk = qk_l2 ? fs[2 * tt + 1] : 1.f;
      const float decay = expf(gbs[(buf * kDrChunk + tt) * 2]);
      const float bt = gbs[(buf * kDrChunk + tt) * 2 + 1];
      // Four partial sums each: the recurrence is a chain of dependent steps, and each step's
      // latency (not the GPU's throughput) sets the kernel's time.
      float m4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        st[i] *= decay;
        m4[i % 4] = fmaf(st[i], kk[i * RG], m4[i % 4]);
      }
      float mem = (m4[0] + m4[1]) + (m4[2] + m4[3]);
      for (int off = 1; off < RG; off <<= 1) mem += __shfl_xor_sync(lanes, mem, off);
      const float delta = bt * (vs[(buf * kDrChunk + tt) * CB + cl] - mem * fk) * fk;
      float o4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        st[i] = fmaf(kk[i * RG], delta, st[i]);
        o4[i % 4] = fmaf(st[i], qq[i * RG], o4[i % 4]);
      }
      float o = (o4[0] + o4[1]) + (o4[2] + o4[3]);
      for (int off = 1; off < RG; off <<= 1) o += __shfl_xor_sync(lanes, o, off);
      if (rg == 0) out[((c0 + tt) * nv + h) * dv + col] = o * fq;
    }
  }
#pragma unroll
  for (int i = 0; i < RPT; ++i) S[(i * RG + rg) * dv + col] = st[i];
}

size_t delta_rule_prefill_smem(int64_t dk, int CB) {
  return static_cast<size_t>(2 * kDrChunk * (2 * dk + 1) + 2 * kDrChunk * CB + 4 * kDrChunk +
                             2 * kDrChunk) *
         sizeof(float);
}

// Note [chunked delta rule]
// The staged kernel above still walks a prompt token by token: each step is a chain of dependent
// sums whose latency, not the GPU's throughput, sets the time (321 ms for the 35B-A3B's 30 layers
// at 8K tokens on the H100). The chunked form of model-spec §3.4 (as cpu::delta_rule_chunked) turns
// chunks of kDcChunk tokens into small dense products: per chunk, with γ the cumulative log decay,
//   A_ts = β_t (k_t·k_s) e^{γ_t−γ_s} (s < t);  (I + A) U = diag(β) V;  (I + A) W = diag(β e^γ) K
//   V' = U − W S;  O = diag(e^γ) Q S + (Q Kᵀ ⊙ Γ) V';  S ← e^{γ_c} S + Σ_t e^{γ_c−γ_t} k_t V'_tᵀ
// and only the triangular solve stays sequential (one step per token of the chunk, a barrier each).
// Everything but A, W and Q Kᵀ is separable by the value column, so a block takes one head and
// kDcCols of its value columns (the state slice S[:, cols] in shared memory for the whole prompt);
// A, W and Q Kᵀ are recomputed by each of a head's column blocks. fp32 throughout (SIMT): the CPU's
// chunked form with 32-token chunks instead of its 64 (the same maths, other roundings).
// Measured (H200, the 40-layer 35B-A3B shape with INT4 experts streamed, pp8192, one device call):
// 6715 tok/s end to end against 9969 with the staged kernel, so it stays opt-in. A block needs
// ~145 KB of shared memory (one per SM); 32 heads x 4 column blocks = 128 blocks, each walking 256
// chunks in sequence with a barrier per token of the solve: the walk is still a sequential chain,
// now with barriers in it. What could make it pay: A, W and U do not depend on S, so a first pass
// over all chunks at once (the whole grid) can compute them; the sequential pass then only forms
// V' = U - W S, the output and the state update per chunk.
/// A chunk of c tokens staged in shared memory (k rows at Ks, q rows at Qs, `pitch` floats
/// apart; γ = the log decays at gam): the q and k rows L2-normalised where they are raw conv
/// outputs (qk_l2; q also by 1/sqrt(d_k)), then γ made cumulative (c adds, in order, as the CPU
/// does) with e^γ and e^{γ_c − γ}; entries c..n-1 of those two are zero. Ends with a barrier.
__device__ void delta_chunk_decay(float* Ks, float* Qs, int pitch, int c, int n, int dk, bool qk_l2,
                                  float* gam, float* egs, float* fts) {
  const int tid = threadIdx.x, nth = blockDim.x, lane = tid % kWarp, wid = tid / kWarp;
  if (qk_l2) {
    for (int row = wid; row < 2 * c; row += nth / kWarp) {
      float* x = row < c ? Ks + row * pitch : Qs + (row - c) * pitch;
      float ss = 0.f;
      for (int i = lane; i < dk; i += kWarp) ss = fmaf(x[i], x[i], ss);
      ss = warp_sum(ss);
      const float f =
          (1.0f / sqrtf(ss + 1e-6f)) * (row < c ? 1.0f : rsqrtf(static_cast<float>(dk)));
      for (int i = lane; i < dk; i += kWarp) x[i] *= f;
    }
  }
  if (tid == 0) {
    float acc = 0.f;
    for (int t = 0; t < c; ++t) {
      acc += gam[t];
      gam[t] = acc;
      egs[t] = expf(acc);
    }
    for (int t = 0; t < n; ++t) {
      fts[t] = t < c ? expf(acc - gam[t]) : 0.f;
      if (t >= c) egs[t] = 0.f;
    }
  }
  __syncthreads();
}

/// Entry (t, s ≤ t) of a staged chunk's A (s < t: β_t (k_t·k_s) e^{γ_t − γ_s}; left alone on the
/// diagonal) and of P = Q Kᵀ ⊙ Γ ((q_t·k_s) e^{γ_t − γ_s}).
__device__ __forceinline__ void delta_chunk_pair(const float* Ks, const float* Qs, int pitch, int t,
                                                 int s, int dk, const float* gam, const float* bts,
                                                 float& a, float& p) {
  const float* kt = Ks + t * pitch;
  const float* ks = Ks + s * pitch;
  const float* qt = Qs + t * pitch;
  float dkk = 0.f, dqk = 0.f;
  for (int i = 0; i < dk; ++i) {
    dkk = fmaf(kt[i], ks[i], dkk);
    dqk = fmaf(qt[i], ks[i], dqk);
  }
  const float e = expf(gam[t] - gam[s]);
  if (s < t) a = bts[t] * dkk * e;
  p = dqk * e;
}

constexpr int kDcChunk = 32;  // tokens per chunk
constexpr int kDcCols = 32;   // value columns per block
constexpr int kDcThreads = 256;

size_t delta_rule_chunk_smem(int64_t dk, int cols) {
  const int64_t C = kDcChunk, pk = dk + 1, pc = cols + 1;
  return static_cast<size_t>(3 * C * pk + C * pc + 2 * C * (C + 1) + dk * cols + 4 * C) *
         sizeof(float);
}

__global__ void __launch_bounds__(kDcThreads)
    delta_rule_chunk_kernel(const float* __restrict__ q, const float* __restrict__ k,
                            const float* __restrict__ v, const float* __restrict__ g,
                            const float* __restrict__ beta, const StepDev* step, int layer,
                            float* __restrict__ out, int64_t T, int64_t nk, int64_t nv, int64_t dk,
                            int64_t dv, int cols, bool qk_l2) {
  extern __shared__ float dcs[];
  constexpr int C = kDcChunk;
  const int r = blockIdx.z;  // row r: its own sequence of T tokens
  q += r * T * nk * dk;
  k += r * T * nk * dk;
  v += r * T * nv * dv;
  g += r * T * nv;
  beta += r * T * nv;
  out += r * T * nv * dv;
  step += r;
  const int dki = static_cast<int>(dk), pk = dki + 1, pc = cols + 1;
  float* Ks = dcs;               // [C][pk]
  float* Qs = Ks + C * pk;       // [C][pk]
  float* Ws = Qs + C * pk;       // [C][pk]
  float* Us = Ws + C * pk;       // [C][pc]: V, then U, then V'
  float* As = Us + C * pc;       // [C][C + 1]: A (strictly lower)
  float* Ps = As + C * (C + 1);  // [C][C + 1]: (Q Kᵀ ⊙ Γ), lower with the diagonal
  float* Ss = Ps + C * (C + 1);  // [dk][cols]: the state slice
  float* gam = Ss + dki * cols;  // [C] cumulative log decay
  float* egs = gam + C;          // [C] e^γ
  float* fts = egs + C;          // [C] e^{γ_c − γ_t}
  float* bts = fts + C;          // [C] β
  const int tid = threadIdx.x, nth = blockDim.x;
  const int h = blockIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * cols;
  const int64_t kh = h / (nv / nk);
  float* S = step->layers[layer].recurrent + static_cast<int64_t>(h) * dk * dv;
  pdl_begin(__func__);
  for (int idx = tid; idx < dki * cols; idx += nth)
    Ss[idx] = S[(idx / cols) * dv + col0 + idx % cols];
  for (int64_t c0 = 0; c0 < T; c0 += C) {
    const int c = static_cast<int>(T - c0 < C ? T - c0 : C);
    // Load the chunk (the previous chunk's last phase ended with a barrier).
    for (int t = 0; t < c; ++t) {
      const int64_t off = ((c0 + t) * nk + kh) * dk;
      for (int x = tid; x < 2 * dki; x += nth) {
        if (x < dki)
          Ks[t * pk + x] = k[off + x];
        else
          Qs[t * pk + (x - dki)] = q[off + (x - dki)];
      }
      const int64_t voff = ((c0 + t) * nv + h) * dv + col0;
      for (int j = tid; j < cols; j += nth) Us[t * pc + j] = v[voff + j];
    }
    if (tid < c) {
      gam[tid] = g[(c0 + tid) * nv + h];
      bts[tid] = beta[(c0 + tid) * nv + h];
    }
    __syncthreads();
    delta_chunk_decay(Ks, Qs, pk, c, c, dki, qk_l2, gam, egs, fts);
    // A, Q Kᵀ ⊙ Γ, and the right-hand sides β V and β e^γ K.
    for (int idx = tid; idx < c * c; idx += nth) {
      const int t = idx / c, s = idx % c;
      float a = 0.f, p = 0.f;
      if (s <= t) delta_chunk_pair(Ks, Qs, pk, t, s, dki, gam, bts, a, p);
      As[t * (C + 1) + s] = a;
      Ps[t * (C + 1) + s] = p;
    }
    for (int idx = tid; idx < c * (dki + cols); idx += nth) {
      const int t = idx / (dki + cols), x = idx % (dki + cols);
      if (x < dki)
        Ws[t * pk + x] = bts[t] * egs[t] * Ks[t * pk + x];
      else
        Us[t * pc + (x - dki)] *= bts[t];
    }
    __syncthreads();
    // (I + A) [W | U] = [β e^γ K | β V], row by row (forward substitution).
    for (int t = 1; t < c; ++t) {
      const float* at = As + t * (C + 1);
      for (int x = tid; x < dki + cols; x += nth) {
        if (x < dki) {
          float w = Ws[t * pk + x];
          for (int s = 0; s < t; ++s) w = fmaf(-at[s], Ws[s * pk + x], w);
          Ws[t * pk + x] = w;
        } else {
          const int j = x - dki;
          float u = Us[t * pc + j];
          for (int s = 0; s < t; ++s) u = fmaf(-at[s], Us[s * pc + j], u);
          Us[t * pc + j] = u;
        }
      }
      __syncthreads();
    }
    // V' = U − W S (in place: each thread its own (t, j)).
    for (int idx = tid; idx < c * cols; idx += nth) {
      const int t = idx / cols, j = idx % cols;
      const float* wt = Ws + t * pk;
      float acc = Us[t * pc + j];
      for (int i = 0; i < dki; ++i) acc = fmaf(-wt[i], Ss[i * cols + j], acc);
      Us[t * pc + j] = acc;
    }
    __syncthreads();
    // O = diag(e^γ) Q S + (Q Kᵀ ⊙ Γ) V'.
    for (int idx = tid; idx < c * cols; idx += nth) {
      const int t = idx / cols, j = idx % cols;
      const float* qt = Qs + t * pk;
      float qs = 0.f;
      for (int i = 0; i < dki; ++i) qs = fmaf(qt[i], Ss[i * cols + j], qs);
      float acc = egs[t] * qs;
      const float* pt = Ps + t * (C + 1);
      for (int s = 0; s <= t; ++s) acc = fmaf(pt[s], Us[s * pc + j], acc);
      out[((c0 + t) * nv + h) * dv + col0 + j] = acc;
    }
    __syncthreads();
    // S ← e^{γ_c} S + Σ_t e^{γ_c − γ_t} k_t V'_tᵀ.
    const float ec = egs[c - 1];
    for (int idx = tid; idx < dki * cols; idx += nth) {
      const int i = idx / cols, j = idx % cols;
      float acc = ec * Ss[idx];
      for (int t = 0; t < c; ++t) acc = fmaf(fts[t] * Ks[t * pk + i], Us[t * pc + j], acc);
      Ss[idx] = acc;
    }
    __syncthreads();
  }
  for (int idx = tid; idx < dki * cols; idx += nth)
    S[(idx / cols) * dv + col0 + idx % cols] = Ss[idx];
}

// Note [two-pass chunked delta rule]
// delta_rule_chunk_kernel (Note [chunked delta rule]) walks a prompt's chunks in sequence and, per
// chunk, builds A, solves the triangular system and forms W and U before it can touch the state:
// all of it on the sequential path, recomputed by each of a head's column blocks. Only V' = U - W
// S, the output and the state update depend on the state. So a range of the prompt runs in two
// kernels:
//  1. delta_wy_kernel, one block per (chunk, value head), all chunks at once: q, k normalised (when
//     qk_l2), γ, A, P = (Q Kᵀ ⊙ Γ) with the diagonal, the solve (I + A) [W | U] = [β e^γ K | β V]
//     (each thread owns whole columns: column x of row t needs only column x of the rows before,
//     so the solve has no barrier), Q' = diag(e^γ) Q and K' = diag(e^{γ_c - γ}) K. Written to a
//     scratch area per (chunk, head): W, Q', K' (C x d_k), U (C x d_v), P (C x C), e^{γ_c}; rows
//     past a short last chunk are zeros.
//  2. delta_wy_state_kernel, one block per (value head, block of kDwCols value columns), the state
//     slice in shared memory, per chunk: V' = U - W S, O = Q' S + P V', S <- e^{γ_c} S + K'ᵀ V'.
//     The products read their rows as float4 broadcasts (all lanes of a warp share a row) and
//     the state by column, so shared-memory wavefronts, not the FMAs, set the pace.
// The prompt goes through in ranges whose scratch fits the space the caller lends (the attention
// q buffer, free while a DeltaNet layer runs). Same maths as the one-pass kernel (fp32, the same
// order within each dot product), other summation order across the two passes; tested against
// the CPU chunked form (CudaDeltaRuleTest).
constexpr int kDwChunk = 32;  // tokens per chunk
constexpr int kDwCols = 32;   // value columns per state block
constexpr int kDwThreads = 256;
// delta_wy_state_kernel's thread map: thread (tq, j), tq < 8, takes rows tq + 8 r (r < 4) of a
// chunk and d_k / 8 state rows of column j.
static_assert(kDwThreads == 8 * kDwCols && kDwChunk == 4 * 8, "delta_wy_state_kernel thread map");

/// Floats of scratch per (chunk, head): W, Q', K', U, P, e^{γ_c} (padded to 4).
__host__ __device__ inline int64_t delta_wy_floats(int64_t dk, int64_t dv) {
  return kDwChunk * (3 * dk + dv) + kDwChunk * kDwChunk + 4;
}
size_t delta_wy_smem(int64_t dk, int64_t dv) {
  const int64_t p = std::max(dk, dv) + 1;
  return static_cast<size_t>(2 * kDwChunk * p + kDwChunk * (kDwChunk + 1) + 4 * kDwChunk) *
         sizeof(float);
}
size_t delta_wy_state_smem(int64_t dk) {
  return static_cast<size_t>(dk * kDwCols + 3 * kDwChunk * dk + kDwChunk * (kDwCols + 1) +
                             kDwChunk * kDwChunk + 4) *
         sizeof(float);
}

/// Pass 1 over chunks [0, gridDim.x) of the range that starts at token t0 (n tokens in it).
__global__ void __launch_bounds__(kDwThreads)
    delta_wy_kernel(const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ v, const float* __restrict__ g,
                    const float* __restrict__ beta, int64_t t0, int64_t n, int64_t nk, int64_t nv,
                    int64_t dk, int64_t dv, bool qk_l2, float* __restrict__ scr) {
  extern __shared__ float wys[];
  constexpr int C = kDwChunk;
  const int dki = static_cast<int>(dk), dvi = static_cast<int>(dv);
  const int p = (dki > dvi ? dki : dvi) + 1;
  float* Ks = wys;         // [C][p]: K, then W
  float* Xs = Ks + C * p;  // [C][p]: Q, then U
  float* As = Xs + C * p;  // [C][C + 1]: A (strictly lower)
  float* gam = As + C * (C + 1);
  float* egs = gam + C;
  float* fts = egs + C;
  float* bts = fts + C;
  const int tid = threadIdx.x, nth = blockDim.x;
  const int64_t ch = blockIdx.x, h = blockIdx.y, kh = h / (nv / nk);
  const int64_t c0 = t0 + ch * C;
  const int c = static_cast<int>(min(static_cast<int64_t>(C), t0 + n - c0));
  float* out = scr + (ch * nv + h) * delta_wy_floats(dk, dv);
  float* Wg = out;
  float* Qg = Wg + C * dk;
  float* Kg = Qg + C * dk;
  float* Ug = Kg + C * dk;
  float* Pg = Ug + C * dv;
  pdl_begin(__func__);
  for (int t = 0; t < C; ++t) {
    const int64_t off = ((c0 + t) * nk + kh) * dk;
    for (int x = tid; x < dki; x += nth) {
      Ks[t * p + x] = t < c ? k[off + x] : 0.f;
      Xs[t * p + x] = t < c ? q[off + x] : 0.f;
    }
  }
  if (tid < C) {
    gam[tid] = tid < c ? g[(c0 + tid) * nv + h] : 0.f;
    bts[tid] = tid < c ? beta[(c0 + tid) * nv + h] : 0.f;
  }
  __syncthreads();
  delta_chunk_decay(Ks, Xs, p, c, C, dki, qk_l2, gam, egs, fts);
  if (tid == 0) {  // e^{γ_c}, then 3 floats of padding
    float* ec = out + C * (3 * dk + dv) + C * C;
    ec[0] = egs[c - 1];
    ec[1] = ec[2] = ec[3] = 0.f;
  }
  // A and P = Q Kᵀ ⊙ Γ (lower with the diagonal; zero elsewhere and past c).
  for (int idx = tid; idx < C * C; idx += nth) {
    const int t = idx / C, s = idx % C;
    float a = 0.f, pv = 0.f;
    if (s <= t && t < c) delta_chunk_pair(Ks, Xs, p, t, s, dki, gam, bts, a, pv);
    As[t * (C + 1) + s] = a;
    Pg[idx] = pv;
  }
  // Q' = e^γ Q and K' = e^{γ_c - γ} K.
  for (int idx = tid; idx < C * dki; idx += nth) {
    const int t = idx / dki, i = idx % dki;
    Qg[idx] = egs[t] * Xs[t * p + i];
    Kg[idx] = fts[t] * Ks[t * p + i];
  }
  __syncthreads();  // Q read: its rows take V
  for (int t = 0; t < C; ++t) {
    const int64_t voff = ((c0 + t) * nv + h) * dv;
    for (int j = tid; j < dvi; j += nth) Xs[t * p + j] = t < c ? bts[t] * v[voff + j] : 0.f;
  }
  for (int idx = tid; idx < C * dki; idx += nth) {
    const int t = idx / dki, i = idx % dki;
    Ks[t * p + i] *= bts[t] * egs[t];
  }
  __syncthreads();
  // (I + A) [W | U] = [β e^γ K | β V]: each thread owns whole columns (column x of row t needs
  // only column x of the rows before it, so no barrier inside), solved in place.
  for (int x = tid; x < dki + dvi; x += nth) {
    float* col = x < dki ? Ks + x : Xs + (x - dki);
    for (int t = 1; t < c; ++t) {
      const float* at = As + t * (C + 1);
      float w = col[t * p];
      for (int s = 0; s < t; ++s) w = fmaf(-at[s], col[s * p], w);
      col[t * p] = w;
    }
    if (x < dki) {
      for (int t = 0; t < C; ++t) Wg[t * dk + x] = col[t * p];
    } else {
      for (int t = 0; t < C; ++t) Ug[t * dv + (x - dki)] = col[t * p];
    }
  }
}

/// Pass 2 over the range's `chunks` chunks: block (head, kDwCols value columns), state in shared
/// memory, tokens [t0, t0 + n).
__global__ void __launch_bounds__(kDwThreads)
    delta_wy_state_kernel(const float* __restrict__ scr, const StepDev* step, int layer,
                          float* __restrict__ o, int64_t t0, int64_t n, int64_t chunks, int64_t nv,
                          int64_t dk, int64_t dv) {
  extern __shared__ float dws[];
  constexpr int C = kDwChunk, CB = kDwCols;
  const int dki = static_cast<int>(dk);
  float* Ss = dws;                // [dk][CB]
  float* Ws = Ss + dki * CB;      // [C][dk]
  float* Qs = Ws + C * dki;       // [C][dk]
  float* Ks = Qs + C * dki;       // [C][dk]
  float* Vs = Ks + C * dki;       // [C][CB + 1]: U, then V'
  float* Ps = Vs + C * (CB + 1);  // [C][C]
  float* ecs = Ps + C * C;
  const int tid = threadIdx.x, nth = blockDim.x;
  const int64_t h = blockIdx.x, col0 = static_cast<int64_t>(blockIdx.y) * CB;
  float* S = step->layers[layer].recurrent + h * dk * dv;
  const int64_t F = delta_wy_floats(dk, dv);
  pdl_begin(__func__);
  for (int idx = tid; idx < dki * CB; idx += nth) Ss[idx] = S[(idx / CB) * dv + col0 + idx % CB];
  // Thread (tq, j): rows t = tq + 8 r (r < 4) of column j for V' and O, and state rows
  // [tq·d_k/8, (tq + 1)·d_k/8) of column j.
  const int j = tid % CB, tq = tid / CB;  // 256 threads: tq < 8
  const int rows_s = dki / 8;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const float* src = scr + (ch * nv + h) * F;
    {
      const float4* s4 = reinterpret_cast<const float4*>(src);
      float4* d4 = reinterpret_cast<float4*>(Ws);
      for (int idx = tid; idx < 3 * C * dki / 4; idx += nth) d4[idx] = s4[idx];
      const float* ug = src + 3 * C * dk;
      for (int idx = tid; idx < C * CB; idx += nth)
        Vs[(idx / CB) * (CB + 1) + idx % CB] = ug[(idx / CB) * dv + col0 + idx % CB];
      const float4* p4 = reinterpret_cast<const float4*>(src + C * (3 * dk + dv));
      float4* pd = reinterpret_cast<float4*>(Ps);
      for (int idx = tid; idx < C * C / 4 + 1; idx += nth) pd[idx] = p4[idx];  // P, then e^{γ_c}
    }
    __syncthreads();
    // V' = U - W S and Q' S for rows t = tq + 8 r.
    float aw[4] = {0.f, 0.f, 0.f, 0.f}, aq[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < dki; i += 4) {
      const float s0 = Ss[(i + 0) * CB + j], s1 = Ss[(i + 1) * CB + j];
      const float s2 = Ss[(i + 2) * CB + j], s3 = Ss[(i + 3) * CB + j];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int t = tq + 8 * r;
        const float4 w = *reinterpret_cast<const float4*>(Ws + t * dki + i);
        const float4 qv = *reinterpret_cast<const float4*>(Qs + t * dki + i);
        aw[r] = fmaf(w.x, s0, aw[r]);
        aw[r] = fmaf(w.y, s1, aw[r]);
        aw[r] = fmaf(w.z, s2, aw[r]);
        aw[r] = fmaf(w.w, s3, aw[r]);
        aq[r] = fmaf(qv.x, s0, aq[r]);
        aq[r] = fmaf(qv.y, s1, aq[r]);
        aq[r] = fmaf(qv.z, s2, aq[r]);
        aq[r] = fmaf(qv.w, s3, aq[r]);
      }
    }
    // Each thread turns its own U entries into V' (no barrier before: nobody else reads them in
    // this phase, and S is not written until the update below).
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int t = tq + 8 * r;
      Vs[t * (CB + 1) + j] -= aw[r];
    }
    __syncthreads();
    // O = Q' S + P V' (rows past the range are not written).
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int t = tq + 8 * r;
      const float* pt = Ps + t * C;
      float acc = aq[r];
      for (int s = 0; s <= t; ++s) acc = fmaf(pt[s], Vs[s * (CB + 1) + j], acc);
      const int64_t tok = t0 + ch * C + t;
      if (tok < t0 + n) o[(tok * nv + h) * dv + col0 + j] = acc;
    }
    // S <- e^{γ_c} S + K'ᵀ V' for this thread's rows i = tq·rows_s + r, four at a time (K' rows
    // as float4 broadcasts) where d_k allows.
    const float ec = ecs[0];
    const int i0 = tq * rows_s;
    if (rows_s % 4 == 0) {
      for (int r = 0; r < rows_s; r += 4) {
        float a0 = ec * Ss[(i0 + r) * CB + j], a1 = ec * Ss[(i0 + r + 1) * CB + j];
        float a2 = ec * Ss[(i0 + r + 2) * CB + j], a3 = ec * Ss[(i0 + r + 3) * CB + j];
        for (int t = 0; t < C; ++t) {
          const float vt = Vs[t * (CB + 1) + j];
          const float4 kv = *reinterpret_cast<const float4*>(Ks + t * dki + i0 + r);
          a0 = fmaf(kv.x, vt, a0);
          a1 = fmaf(kv.y, vt, a1);
          a2 = fmaf(kv.z, vt, a2);
          a3 = fmaf(kv.w, vt, a3);
        }
        Ss[(i0 + r) * CB + j] = a0;
        Ss[(i0 + r + 1) * CB + j] = a1;
        Ss[(i0 + r + 2) * CB + j] = a2;
        Ss[(i0 + r + 3) * CB + j] = a3;
      }
    } else {
      for (int r = 0; r < rows_s; ++r) {
        const int i = i0 + r;
        float acc = ec * Ss[i * CB + j];
        for (int t = 0; t < C; ++t) acc = fmaf(Ks[t * dki + i], Vs[t * (CB + 1) + j], acc);
        Ss[i * CB + j] = acc;
      }
    }
    __syncthreads();  // S updated, staging buffers free
  }
  for (int idx = tid; idx < dki * CB; idx += nth) S[(idx / CB) * dv + col0 + idx % CB] = Ss[idx];
}

// Note [early loads]
// The stamps (Note [kernel stamps]) put the delta rule at ~10 µs and the split merge at ~9 µs per
// layer of a decode step: not their bytes (a few KB) but their chain of dependent round trips to
// L2, each load issued after the barrier or reduction before it, though its address depends on
// neither. With early loads on, each kernel issues every load whose address it knows at the start
// (the delta rule: v, g, beta, z and the norm weight with q and k; the merge: m, l, the first
// splits' o and the gate together), so the chain is one round trip then arithmetic. Same sums in
// the same order: bit-identical outputs (CudaOps.EarlyLoadsAreBitIdentical).
// TIDAL_CUDA_EARLY_LOADS=1 (off until measured on a GPU).
std::atomic<bool> g_early_loads{[] {
  const char* e = std::getenv("TIDAL_CUDA_EARLY_LOADS");
  return e != nullptr && std::string_view(e) == "1";
}()};

// 0: the staged kernel; 1: the one-pass chunked kernel; 2 (the default): the two-pass chunked
// form where the caller lends scratch (else the staged kernel). TIDAL_CUDA_DELTA_CHUNKED=0 / 1 / 2.
std::atomic<int> g_delta_mode{[] {
  const char* e = std::getenv("TIDAL_CUDA_DELTA_CHUNKED");
  // Anything but 0, 1 or 2: the default.
  return e != nullptr && (e[0] == '0' || e[0] == '1' || e[0] == '2') && e[1] == '\0' ? e[0] - '0'
                                                                                     : 2;
}()};

__global__ void rms_norm_gated_kernel(const float* x, const float* z, int64_t ld_z, int64_t rpt,
                                      const float* w, float* y, int64_t rows, int64_t dim,
                                      float eps) {
  pdl_begin(__func__);
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (r >= rows) return;
  float ss = 0.f;
  for (int64_t i = lane; i < dim; i += kWarp) ss += x[r * dim + i] * x[r * dim + i];
  ss = warp_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
  const float* zr = z + (r / rpt) * ld_z + (r % rpt) * dim;
  for (int64_t i = lane; i < dim; i += kWarp)
    y[r * dim + i] = w[i] * (x[r * dim + i] * inv) * siluf_(zr[i]);
}

// ---------------------------------------------------------------------------------------- router

/// Warp per token.
template <int kMaxPer>  // ceil(E / 32) rounded up to a power of two
__global__ void moe_route_kernel(const float* logits, int64_t ld, int64_t T, int64_t E, int64_t k,
                                 bool renorm, int32_t* ids, float* weights) {
  pdl_begin(__func__);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (t >= T) return;
  route_row<kMaxPer>(logits + t * ld, E, k, renorm, ids + t * k, weights + t * k);
}

__global__ void read_probe_kernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // practically never: keeps the loads
}

}  // namespace

__global__ void gpu_sleep_kernel(int64_t ns) {
  const long long t0 = clock64();
  // clock64 counts SM cycles; ~1 cycle per ns at the ~1-2 GHz clocks of current GPUs is enough
  // here.
  while (clock64() - t0 < ns) __nanosleep(1000);
}

void gpu_sleep(int64_t ns, cudaStream_t s) { gpu_sleep_kernel<<<1, 1, 0, s>>>(ns); }

void read_probe(const void* p, size_t bytes, unsigned* sink, int blocks, cudaStream_t s) {
  read_probe_kernel<<<blocks, 512, 0, s>>>(static_cast<const uint4*>(p), bytes / 16, sink);
}

namespace {
std::atomic<int> g_pdl{-1};  // -1: not decided yet
}  // namespace

namespace {
/// The device has programmatic dependent launch and the kernels were compiled for it: a build for
/// sm_86 running on an H100 through PTX JIT has no griddepcontrol instructions in its kernels.
bool pdl_supported() {
  int dev = 0, major = 0;
  cudaFuncAttributes fa{};
  const bool ok =
      cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      major >= 9 &&
      cudaFuncGetAttributes(&fa, gemv_kernel<WFormat::kBF16, 1, GemvIn::kPlain>) == cudaSuccess &&
      fa.ptxVersion >= 90;
  if (!ok) cudaGetLastError();  // only what these queries may have left
  return ok;
}
}  // namespace

bool pdl_enabled() {
  int v = g_pdl.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("TIDAL_CUDA_PDL");
    v = !(e && std::string(e) == "0") && pdl_supported() ? 1 : 0;
    g_pdl.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_early_loads(bool on) { g_early_loads.store(on, std::memory_order_relaxed); }
bool early_loads() { return g_early_loads.load(std::memory_order_relaxed); }
void set_delta_rule_mode(int mode) {
  g_delta_mode.store(mode >= 0 && mode <= 2 ? mode : 0, std::memory_order_relaxed);
}
int delta_rule_mode() { return g_delta_mode.load(std::memory_order_relaxed); }
bool delta_rule_two_pass_applies(int64_t T, int64_t rows, int64_t nk, int64_t nv, int64_t dk,
                                 int64_t dv, const void* scratch, size_t scratch_bytes) {
  if (T < 2 || rows != 1 || scratch == nullptr || nk < 1 || nv % nk != 0 || dv % kDwCols != 0 ||
      dk % 8 != 0 || dk > 256 || dv > 256 || reinterpret_cast<uintptr_t>(scratch) % 16 != 0)
    return false;
  if (scratch_bytes < static_cast<size_t>(nv * delta_wy_floats(dk, dv)) * sizeof(float))
    return false;  // not even one chunk
  // Shared memory past 48 KB as far as this device allows (set once, for the largest shape).
  static const int optin = [] {
    int dev = 0, v = 48 * 1024;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      cudaGetLastError();
      v = 48 * 1024;
    }
    const bool ok =
        allow_smem(delta_wy_kernel, std::min<size_t>(delta_wy_smem(256, 256), v)) &&
        allow_smem(delta_wy_state_kernel, std::min<size_t>(delta_wy_state_smem(256), v));
    return ok ? v : 48 * 1024;
  }();
  return std::max(delta_wy_smem(dk, dv), delta_wy_state_smem(dk)) <= static_cast<size_t>(optin);
}
size_t delta_rule_scratch_bytes(int64_t T, int64_t nv, int64_t dk, int64_t dv) {
  const int64_t chunks = (T + kDwChunk - 1) / kDwChunk;
  return static_cast<size_t>(chunks * nv * delta_wy_floats(dk, dv)) * sizeof(float);
}

void set_pdl_enabled(bool on) {
  g_pdl.store(on && pdl_supported() ? 1 : 0, std::memory_order_relaxed);
}

namespace {
KernelStamp* g_stamp_buf = nullptr;
int g_stamp_buf_cap = 0;
void stamp_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("kernel stamps: ") + what + ": " + cudaGetErrorString(e));
}
}  // namespace

void stamps_begin(int capacity) {
  capacity = std::max(capacity, 1);
  if (capacity > g_stamp_buf_cap) {
    if (g_stamp_buf) stamp_check(cudaFree(g_stamp_buf), "cudaFree");
    g_stamp_buf = nullptr;
    g_stamp_buf_cap = 0;
    stamp_check(cudaMalloc(reinterpret_cast<void**>(&g_stamp_buf),
                           static_cast<size_t>(capacity) * sizeof(KernelStamp)),
                "cudaMalloc");
    g_stamp_buf_cap = capacity;
  }
  const unsigned zero = 0, cap = static_cast<unsigned>(capacity);
  stamp_check(cudaDeviceSynchronize(), "synchronize");
  stamp_check(cudaMemcpyToSymbol(g_stamp_n, &zero, sizeof(zero)), "reset count");
  stamp_check(cudaMemcpyToSymbol(c_stamp_cap, &cap, sizeof(cap)), "set capacity");
  stamp_check(cudaMemcpyToSymbol(c_stamps, &g_stamp_buf, sizeof(g_stamp_buf)), "set buffer");
  // A copy from pageable memory may return before it lands; kernels on other streams must see it.
  stamp_check(cudaDeviceSynchronize(), "synchronize");
}

std::vector<KernelStamp> stamps_end() {
  std::vector<KernelStamp> out;
  stamp_check(cudaDeviceSynchronize(), "synchronize");
  KernelStamp* cur = nullptr;
  stamp_check(cudaMemcpyFromSymbol(&cur, c_stamps, sizeof(cur)), "read buffer");
  if (!cur) return out;
  KernelStamp* off = nullptr;
  stamp_check(cudaMemcpyToSymbol(c_stamps, &off, sizeof(off)), "clear buffer");
  stamp_check(cudaDeviceSynchronize(), "synchronize");
  unsigned n = 0, cap = 0;
  stamp_check(cudaMemcpyFromSymbol(&n, g_stamp_n, sizeof(n)), "read count");
  stamp_check(cudaMemcpyFromSymbol(&cap, c_stamp_cap, sizeof(cap)), "read capacity");
  out.resize(std::min(n, cap));
  if (!out.empty())
    stamp_check(
        cudaMemcpy(out.data(), cur, out.size() * sizeof(KernelStamp), cudaMemcpyDeviceToHost),
        "copy stamps");
  std::sort(out.begin(), out.end(),
            [](const KernelStamp& a, const KernelStamp& b) { return a.release_ns < b.release_ns; });
  return out;
}

size_t DevMatrix::bytes() const {
  const size_t n = static_cast<size_t>(rows * cols);
  switch (format) {
    case WFormat::kF32:
      return n * 4;
    case WFormat::kBF16:
      return n * 2;
    default:
      return n + static_cast<size_t>(rows) * 4;
  }
}

namespace {
void gemv_dispatch(const GemvParams& p, int64_t m, cudaStream_t s) {
  if (m <= 0 || p.w.rows == 0) return;
  switch (p.w.format) {
    case WFormat::kF32:
      gemv_launch<WFormat::kF32>(p, m, s);
      break;
    case WFormat::kBF16:
      gemv_launch<WFormat::kBF16>(p, m, s);
      break;
    case WFormat::kI8:
      gemv_launch<WFormat::kI8>(p, m, s);
      break;
  }
}
}  // namespace

void gemv(const DevMatrix& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t m,
          bool accumulate, cudaStream_t s, const float* x_up, const float* out_gate,
          int64_t ld_gate) {
  GemvParams p;
  p.w = w;
  p.x = x;
  p.ldx = ldx;
  p.y = y;
  p.ldy = ldy;
  p.xu = x_up;
  p.out_gate = out_gate;
  p.ld_gate = ld_gate;
  p.accumulate = accumulate;
  gemv_dispatch(p, m, s);
}

namespace {
/// One row's GEMV with its input x' = rms_norm(x) ⊙ norm_w (or x when norm_w is null).
GemvParams row_params(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                      bool zero_centred, float* y) {
  GemvParams p;
  p.w = w;
  p.x = x;
  p.y = y;
  p.norm_w = norm_w;
  p.eps = eps;
  p.zero_centred = zero_centred;
  return p;
}
}  // namespace

void gemv_rms_norm(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                   bool zero_centred, float* y, bool accumulate, cudaStream_t s) {
  GemvParams p = row_params(w, x, norm_w, eps, zero_centred, y);
  p.accumulate = accumulate;
  gemv_dispatch(p, 1, s);
}

bool gemv_gdn_in(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                 bool zero_centred, float* y, const GdnConvEpilogue& e, cudaStream_t s) {
  if (w.rows == 0) return true;
  if (!e.conv_w || !e.step || e.C > e.ba_row || e.ba_row + 2 * e.nv > w.rows) return false;
  GemvParams p = row_params(w, x, norm_w, eps, zero_centred, y);
  p.gdn = e;
  return gemv_stream_only(p, s);
}

bool gemv_route(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                bool zero_centred, float* y, const RouteTail& r, cudaStream_t s) {
  if (!r.sync || !r.ids || !r.weights || r.E < 1 || r.E > 1024 || r.k < 1 || r.k > r.E ||
      r.k > kWarp || w.rows < r.E || w.cols == 0 || w.cols > kStreamMaxK || stream_off())
    return false;
  GemvParams p = row_params(w, x, norm_w, eps, zero_centred, y);
  p.route = r;
  p.vec = reinterpret_cast<uintptr_t>(w.data) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(norm_w) % 16 == 0 && w.cols % 16 == 0;
  if (!p.vec) return false;
  const size_t smem = static_cast<size_t>(w.cols) * 4;
  auto go = [&](auto f) {
    constexpr WFormat F = decltype(f)::value;
    if (norm_w)
      stream_launch<F, GemvIn::kNormed, false, true>(p, smem, s);
    else
      stream_launch<F, GemvIn::kPlain, false, true>(p, smem, s);
    return true;
  };
  switch (w.format) {
    case WFormat::kF32:
      return go(std::integral_constant<WFormat, WFormat::kF32>{});
    case WFormat::kBF16:
      return go(std::integral_constant<WFormat, WFormat::kBF16>{});
    case WFormat::kI8:
      return go(std::integral_constant<WFormat, WFormat::kI8>{});
  }
  return false;
}

bool gemv_gated_norm(const DevMatrix& w, const float* o, const float* z, const float* norm_w,
                     int64_t group, float eps, float* y, bool accumulate, cudaStream_t s) {
  if (w.rows == 0) return true;
  GemvParams p;
  p.w = w;
  p.x = o;
  p.xu = z;
  p.norm_w = norm_w;
  p.group = group;
  p.eps = eps;
  p.y = y;
  p.accumulate = accumulate;
  if (group <= 0) return false;
  return gemv_stream_only(p, s);
}

void weight_to_bf16(const DevMatrix& w, uint16_t* dst, cudaStream_t s) {
  launch(weight_convert_kernel, grid_stride_blocks(w.rows * w.cols), 256, 0, s, w, dst, nullptr);
}
void weight_to_f32(const DevMatrix& w, float* dst, cudaStream_t s) {
  launch(weight_convert_kernel, grid_stride_blocks(w.rows * w.cols), 256, 0, s, w, nullptr, dst);
}
void f32_to_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t rows, int64_t cols,
                 cudaStream_t s) {
  if (rows * cols == 0) return;
  launch(f32_to_bf16_kernel, grid_stride_blocks(rows * cols), 256, 0, s, x, ldx, y, rows, cols);
}

void f32_to_bf16_split(const float* x, int64_t ldx, uint16_t* hi, uint16_t* lo, int64_t rows,
                       int64_t cols, cudaStream_t s) {
  if (rows * cols == 0) return;
  launch(f32_to_bf16_split_kernel, grid_stride_blocks(rows * cols), 256, 0, s, x, ldx, hi, lo, rows,
         cols);
}

void embed(const DevMatrix& table, const int32_t* ids, int64_t T, float* out, cudaStream_t s) {
  if (T == 0) return;
  launch(embed_kernel, static_cast<unsigned>(T), 256, 0, s, table, ids, out);
}

void rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows,
              int64_t dim, float eps, bool zero_centred, cudaStream_t s) {
  if (rows == 0) return;
  if (dim <= 16 * 256)
    launch(rms_norm_reg_kernel, static_cast<unsigned>(rows), 256, 0, s, x, ldx, w, y, ldy, dim, eps,
           zero_centred, nullptr, nullptr, nullptr, nullptr, 0);
  else
    launch(rms_norm_kernel, static_cast<unsigned>(rows), 256, 0, s, x, ldx, w, y, ldy, dim, eps,
           zero_centred, nullptr, nullptr, nullptr, nullptr, 0);
}

void add_rms_norm(float* x, const float* y, const float* w, float* xn, int64_t rows, int64_t dim,
                  float eps, bool zero_centred, cudaStream_t s, const float* hs, const float* gate,
                  int64_t ld_gate) {
  if (rows == 0) return;
  if (dim <= 16 * 256)
    launch(rms_norm_reg_kernel, static_cast<unsigned>(rows), 256, 0, s, x, dim, w, xn, dim, dim,
           eps, zero_centred, x, y, hs, gate, ld_gate);
  else
    launch(rms_norm_kernel, static_cast<unsigned>(rows), 256, 0, s, x, dim, w, xn, dim, dim, eps,
           zero_centred, x, y, hs, gate, ld_gate);
}

void silu_mul(const float* g, const float* u, int64_t ld, float* h, int64_t T, int64_t I,
              cudaStream_t s) {
  if (T * I == 0) return;
  launch(silu_mul_kernel, grid_stride_blocks(T * I), 256, 0, s, g, u, ld, h, T, I);
}

void attn_prep(const AttnPrepArgs& a, cudaStream_t s) {
  if (a.T == 0) return;
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(a.nh + 2 * a.nkv));
  launch(attn_prep_kernel, grid, 256, static_cast<size_t>(a.d) * sizeof(float), s, a);
}

int attention_max_splits(int64_t T, int64_t nkv, int sm_count, int per_sm_arg) {
  // Splits per SM (over all KV heads and tokens); the minimum keys per split is decided inside the
  // kernels' chunking. TIDAL_ATTN_SPLITS_PER_SM overrides the default 16 for tuning.
  static const int64_t per_sm = [] {
    const char* e = std::getenv("TIDAL_ATTN_SPLITS_PER_SM");
    const int64_t v = e ? std::atoll(e) : 0;
    return v >= 1 && v <= 64 ? v : int64_t{0};
  }();
  // Decode: 2 per SM, one wave of the tensor-core kernel at its 2 resident blocks per SM (the
  // SIMT tile kernel, 3 resident, measured best at 3 of 3..24 at 4K-128K context on the H100;
  // tests/bench/bench_cuda.cpp sweeps both); more splits for the warp kernel's short prefill
  // chunks.
  const int64_t f = per_sm_arg > 0 ? per_sm_arg : per_sm ? per_sm : (T == 1 ? 2 : 16);
  const int64_t want = (static_cast<int64_t>(sm_count) * f) / std::max<int64_t>(1, T * nkv);
  return static_cast<int>(std::clamp<int64_t>(want, 1, kMaxSplits));
}

size_t attention_workspace_floats(int64_t T, int64_t nh, int64_t d, int max_splits) {
  return static_cast<size_t>(T * nh * max_splits) * static_cast<size_t>(d + 2);
}

bool attention_uses_tensor_cores(const AttentionArgs& a) {
  return a.tensor_cores && (mma_applies(a) || attention_prefill_applies(a));
}

void attention(const AttentionArgs& a, cudaStream_t s) {
  if (a.T == 0) return;
  if (a.tensor_cores && attention_prefill(a, s)) return;  // no splits, no combine
  const int64_t group = a.nh / a.nkv;
  const int dpl = a.d <= 32 ? 1 : a.d <= 64 ? 2 : a.d <= 128 ? 4 : 8;
  // Rows per warp: the GQA group (a power of two, ≤ 16), with at most 64 registers of q.
  int R = 1;
  while (R < group && R < 16 && R * 2 * dpl <= 64) R *= 2;
  const int subsets = static_cast<int>((group + R - 1) / R);
  const int splits = a.max_splits;
  const dim3 grid(static_cast<unsigned>((splits + kAttnWarps - 1) / kAttnWarps),
                  static_cast<unsigned>(a.T), static_cast<unsigned>(a.nkv * subsets));
  // The tensor-core and tile kernels' minimum keys per split: the caller's,
  // TIDAL_ATTN_MIN_SPLIT_KEYS (tuning), or two tiles.
  static const int64_t env_min_keys = [] {
    const char* e = std::getenv("TIDAL_ATTN_MIN_SPLIT_KEYS");
    const int64_t v = e ? std::atoll(e) : 0;
    return v >= kTileKeys && v <= (int64_t{1} << 20) ? v / kTileKeys * kTileKeys : int64_t{0};
  }();
  AttentionArgs b = a;
  if (b.min_split_keys <= 0)
    b.min_split_keys = env_min_keys ? env_min_keys : kTileMinSplitKeys;
  else  // whole tiles, like the environment's value
    b.min_split_keys = std::max<int64_t>(kTileKeys, b.min_split_keys / kTileKeys * kTileKeys);
  int64_t min_keys = kMinSplitKeys;
  if ((b.tensor_cores && attention_mma(b, s)) || (!b.fused_prep && attention_tile(b, s)))
    min_keys = b.min_split_keys;
  else if (b.fused_prep)
    throw std::invalid_argument(
        "attention: fused_prep needs the tensor-core decode kernel (attention_uses_tensor_cores)");
  else if (a.kv_f32)
    attention_dispatch<float>(a, dpl, R, subsets, splits, grid, s);
  else
    attention_dispatch<uint16_t>(a, dpl, R, subsets, splits, grid, s);
  const dim3 cgrid(static_cast<unsigned>(a.T), static_cast<unsigned>(a.nh),
                   static_cast<unsigned>((a.d + kWarp - 1) / kWarp));
  launch(early_loads() ? attention_combine_early_kernel : attention_combine_kernel, cgrid, 256, 0,
         s, b, splits, min_keys);
}

void gdn_split_next(const float* p, const float* ba, int64_t ld, float* mixed, float* z, float* b,
                    float* a, int64_t T, int64_t nk, int64_t nv, int64_t dk, int64_t dv,
                    cudaStream_t s) {
  if (T == 0) return;
  launch(gdn_split_next_kernel, static_cast<unsigned>(T), 256, 0, s, p, ba, ld, mixed, z, b, a, nk,
         nv, dk, dv);
}

void causal_conv1d_silu(const float* src, int64_t ld_src, int64_t T, int64_t C, int64_t K,
                        const float* weight, const StepDev* step, int layer, float* dst,
                        cudaStream_t s) {
  const int64_t ld = ld_src ? ld_src : C;
  if (T >= 2 * kConvSeg) {  // T ≥ K − 1 as well (K ≤ 8)
    const dim3 grid(static_cast<unsigned>(blocks_for(C, 128)),
                    static_cast<unsigned>((T + kConvSeg - 1) / kConvSeg));
    launch(conv1d_seg_kernel, grid, 128, 0, s, src, ld, T, C, K, weight, step, layer, dst);
    launch(conv1d_state_kernel, blocks_for(C, 128), 128, 0, s, src, ld, T, C, K, step, layer);
    return;
  }
  launch(conv1d_kernel, blocks_for(C, 128), 128, 0, s, src, ld, T, C, K, weight, step, layer, dst);
}

void gdn_conv_prep_step(const float* src, const float* conv_w, const StepDev* step, int layer,
                        int64_t K, const float* b, const float* a, const float* A_log,
                        const float* dt_bias, float* q, float* k, float* v, float* beta, float* g,
                        int64_t nk, int64_t nv, int64_t dk, int64_t dv, cudaStream_t s,
                        int64_t rows, int64_t ld_src, int64_t ld_ba) {
  if (rows == 0) return;
  const int threads = static_cast<int>((std::max(dk, dv) + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(2 * nk + nv), static_cast<unsigned>(rows));
  launch(gdn_conv_prep_step_kernel, grid, threads, 0, s, src, conv_w, step, layer, K, b, a, A_log,
         dt_bias, q, k, v, beta, g, nk, nv, dk, dv, ld_src, ld_ba);
}

void gdn_prep(const float* u, const float* b, const float* a, int64_t ld_ba, const float* A_log,
              const float* dt_bias, float* q, float* k, float* v, float* beta, float* g, int64_t T,
              int64_t nk, int64_t nv, int64_t dk, int64_t dv, cudaStream_t s) {
  if (T == 0) return;
  launch(gdn_prep_kernel, static_cast<unsigned>(T), 256, 0, s, u, b, a, ld_ba ? ld_ba : nv, A_log,
         dt_bias, q, k, v, beta, g, nk, nv, dk, dv);
}

void delta_rule(const float* q, const float* k, const float* v, const float* g, const float* beta,
                const StepDev* step, int layer, float* out, int64_t T, int64_t nk, int64_t nv,
                int64_t dk, int64_t dv, cudaStream_t s, int64_t rows, bool l2norm_qk,
                float* scratch, size_t scratch_bytes) {
  if (rows == 0) return;
  const int rpt = dk % 32 == 0 && dk >= 64 ? 32 : 16;  // rows per thread; dk / rpt ≤ 8 lanes
  const int CB = static_cast<int>(std::min<int64_t>(32, dv));
  const int RG = static_cast<int>(dk / rpt);
  const int mode = g_delta_mode.load(std::memory_order_relaxed);
  if (mode == 2 && delta_rule_two_pass_applies(T, rows, nk, nv, dk, dv, scratch, scratch_bytes)) {
    // Note [two-pass chunked delta rule]
    const int64_t max_chunks = static_cast<int64_t>(
        scratch_bytes / (static_cast<size_t>(nv * delta_wy_floats(dk, dv)) * sizeof(float)));
    const size_t smem1 = delta_wy_smem(dk, dv), smem2 = delta_wy_state_smem(dk);
    for (int64_t t0 = 0; t0 < T;) {
      const int64_t n = std::min(T - t0, max_chunks * kDwChunk);
      const int64_t chunks = (n + kDwChunk - 1) / kDwChunk;
      launch(delta_wy_kernel, dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(nv)),
             kDwThreads, smem1, s, q, k, v, g, beta, t0, n, nk, nv, dk, dv, l2norm_qk, scratch);
      launch(delta_wy_state_kernel,
             dim3(static_cast<unsigned>(nv), static_cast<unsigned>(dv / kDwCols)), kDwThreads,
             smem2, s, static_cast<const float*>(scratch), step, layer, out, t0, n, chunks, nv, dk,
             dv);
      t0 += n;
    }
    return;
  }
  if (T >= 2 && mode == 1 && (dv % kDcCols == 0 || dv < kDcCols)) {  // Note [chunked delta rule]
    const int cols = static_cast<int>(std::min<int64_t>(dv, kDcCols));
    const size_t smem = delta_rule_chunk_smem(dk, cols);
    // The largest shared memory it can need (d_k = 256, 32 columns: ~145 KB), set once; a device
    // that cannot give it runs the staged kernel below for anything over 48 KB.
    static const bool big_smem =
        allow_smem(delta_rule_chunk_kernel, delta_rule_chunk_smem(256, kDcCols));
    const bool ok = smem <= 48 * 1024 || (big_smem && dk <= 256);
    if (ok) {
      const dim3 grid(static_cast<unsigned>(nv), static_cast<unsigned>(dv / cols),
                      static_cast<unsigned>(rows));
      launch(delta_rule_chunk_kernel, grid, kDcThreads, smem, s, q, k, v, g, beta, step, layer, out,
             T, nk, nv, dk, dv, cols, l2norm_qk);
      return;
    }
  }
  if (T >= 2 && dk % rpt == 0 && (RG & (RG - 1)) == 0) {  // Note [delta rule over a prompt]
    const int cbp = dv % 16 == 0 ? 16 : CB;
    const dim3 grid(static_cast<unsigned>(nv), static_cast<unsigned>(dv / cbp),
                    static_cast<unsigned>(rows));
    const size_t smem = delta_rule_prefill_smem(dk, cbp);
    static const bool big_smem =  // up to d_k = 256 with 16 columns: ~68 KB
        allow_smem(delta_rule_prefill_kernel<32>, 96 * 1024) &&
        allow_smem(delta_rule_prefill_kernel<16>, 96 * 1024);
    if (smem <= 48 * 1024 || big_smem) {
      if (rpt == 32)
        launch(delta_rule_prefill_kernel<32>, grid, cbp * RG, smem, s, q, k, v, g, beta, step,
               layer, out, T, nk, nv, dk, dv, cbp, l2norm_qk);
      else
        launch(delta_rule_prefill_kernel<16>, grid, cbp * RG, smem, s, q, k, v, g, beta, step,
               layer, out, T, nk, nv, dk, dv, cbp, l2norm_qk);
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(nv), static_cast<unsigned>(dv / CB),
                  static_cast<unsigned>(rows));
  const size_t smem = static_cast<size_t>(2 * dk) * sizeof(float);
  if (rpt == 32)
    launch(early_loads() ? delta_rule_kernel<32, false, true> : delta_rule_kernel<32, false, false>,
           grid, CB * RG, smem, s, q, k, v, g, beta, step, layer, out, T, nk, nv, dk, dv, CB,
           nullptr, 0, nullptr, 0.f, l2norm_qk);
  else
    launch(early_loads() ? delta_rule_kernel<16, false, true> : delta_rule_kernel<16, false, false>,
           grid, CB * RG, smem, s, q, k, v, g, beta, step, layer, out, T, nk, nv, dk, dv, CB,
           nullptr, 0, nullptr, 0.f, l2norm_qk);
}

bool delta_rule_normed(const float* q, const float* k, const float* v, const float* g,
                       const float* beta, const StepDev* step, int layer, const float* z,
                       int64_t ld_z, const float* w, float eps, float* out, int64_t T, int64_t nk,
                       int64_t nv, int64_t dk, int64_t dv, cudaStream_t s, int64_t rows,
                       bool l2norm_qk) {
  const int rpt = dk % 32 == 0 && dk >= 64 ? 32 : 16;
  const int RG = static_cast<int>(dk / rpt);
  if (dv * RG > 1024 || dv % 32 != 0) return false;
  if (rows == 0) return true;
  const dim3 grid(static_cast<unsigned>(nv), 1, static_cast<unsigned>(rows));
  const size_t smem = static_cast<size_t>(2 * dk) * sizeof(float);
  const int CB = static_cast<int>(dv);
  if (rpt == 32)
    launch(early_loads() ? delta_rule_kernel<32, true, true> : delta_rule_kernel<32, true, false>,
           grid, CB * RG, smem, s, q, k, v, g, beta, step, layer, out, T, nk, nv, dk, dv, CB, z,
           ld_z, w, eps, l2norm_qk);
  else
    launch(early_loads() ? delta_rule_kernel<16, true, true> : delta_rule_kernel<16, true, false>,
           grid, CB * RG, smem, s, q, k, v, g, beta, step, layer, out, T, nk, nv, dk, dv, CB, z,
           ld_z, w, eps, l2norm_qk);
  return true;
}

void rms_norm_gated(const float* x, const float* z, int64_t ld_z, int64_t rows_per_token,
                    const float* w, float* y, int64_t rows, int64_t dim, float eps,
                    cudaStream_t s) {
  if (rows == 0) return;
  launch(rms_norm_gated_kernel, blocks_for(rows, 8), 256, 0, s, x, z,
         ld_z ? ld_z : rows_per_token * dim, rows_per_token, w, y, rows, dim, eps);
}

void moe_route(const float* logits, int64_t ld, int64_t T, int64_t E, int64_t k, bool renormalise,
               int32_t* ids, float* weights, cudaStream_t s) {
  if (T == 0) return;
  const int64_t per = (E + kWarp - 1) / kWarp;
  const dim3 grid(blocks_for(T, 8)), block(256);
  const int64_t l = ld ? ld : E;
  if (per <= 2)
    launch(moe_route_kernel<2>, grid, block, 0, s, logits, l, T, E, k, renormalise, ids, weights);
  else if (per <= 4)
    launch(moe_route_kernel<4>, grid, block, 0, s, logits, l, T, E, k, renormalise, ids, weights);
  else if (per <= 8)
    launch(moe_route_kernel<8>, grid, block, 0, s, logits, l, T, E, k, renormalise, ids, weights);
  else if (per <= 16)
    launch(moe_route_kernel<16>, grid, block, 0, s, logits, l, T, E, k, renormalise, ids, weights);
  else
    launch(moe_route_kernel<32>, grid, block, 0, s, logits, l, T, E, k, renormalise, ids, weights);
}

}  // namespace tidal::kernels::cuda
