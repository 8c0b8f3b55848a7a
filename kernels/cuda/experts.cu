// SPDX-License-Identifier: Apache-2.0
/// \file experts.cu
/// \brief Routed experts from VRAM cache slots, one-token decode (experts.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>

#include "kernels/cuda/experts.h"

namespace tidal::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTileRows = 16;

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float siluf(float x) { return x / (1.0f + expf(-x)); }

// Two INT4 values (nibbles lo, hi of q + 8) times the scale, as a BF16 pair.
__device__ __forceinline__ __nv_bfloat162 int4_pair(uint32_t lo, uint32_t hi, float scale) {
  return __floats2bfloat162_rn(static_cast<float>(static_cast<int>(lo) - 8) * scale,
                               static_cast<float>(static_cast<int>(hi) - 8) * scale);
}

// Note [GPU experts from the packed layout]
// The host packs a matrix in tiles of 16 rows (Note [Expert weight layout tidal_n16_v1]); within
// a tile every 64-byte block holds 4 bytes per row, so a 16-byte load at offset 16·u holds rows
// 4(u % 4) .. 4(u % 4) + 3 of block u / 4: two BF16 columns, four INT8 columns or eight INT4
// columns (low nibbles the block's first quad, high nibbles its second) of each row. A block of
// 128 threads walks one tile with such loads: thread t always holds the same four rows (t % 4),
// sums its columns against the input row in shared memory, and applies the fp16 group scale per
// load (one group per 64-byte block). Lanes of equal t % 4 are then added by shuffles and the four
// warps through shared memory. Quantised weights are stored unsigned (q + 128, q + 8): the
// offset is subtracted per element.
template <int DT>
__device__ __forceinline__ void tile_dot(const ExpertMatrixLayout& L, const uint8_t* tile,
                                         const float* xs, float acc[4]) {
  const uint4* w = reinterpret_cast<const uint4*>(tile);
  const int64_t nu = L.data_bytes / 16;
  const int q = threadIdx.x & 3;
  const __half* sc = reinterpret_cast<const __half*>(tile + L.data_bytes);
  const int64_t bpg = L.group_bytes / 64;  // 64-byte blocks per group (INT formats)
  for (int64_t u = threadIdx.x; u < nu; u += kThreads) {
    const uint4 v = __ldg(w + u);
    const uint32_t r4[4] = {v.x, v.y, v.z, v.w};
    const int64_t b = u >> 2;
    if constexpr (DT == 0) {
      const float x0 = xs[2 * b], x1 = xs[2 * b + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        acc[i] = fmaf(bf16_lo(r4[i]), x0, fmaf(bf16_hi(r4[i]), x1, acc[i]));
    } else if constexpr (DT == 1) {
      const int64_t g = b / bpg, c0 = g * L.group + (b % bpg) * 4;
      const float x0 = xs[c0], x1 = xs[c0 + 1], x2 = xs[c0 + 2], x3 = xs[c0 + 3];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t r = r4[i];
        float s = static_cast<float>(static_cast<int>(r & 0xff) - 128) * x0;
        s = fmaf(static_cast<float>(static_cast<int>((r >> 8) & 0xff) - 128), x1, s);
        s = fmaf(static_cast<float>(static_cast<int>((r >> 16) & 0xff) - 128), x2, s);
        s = fmaf(static_cast<float>(static_cast<int>(r >> 24) - 128), x3, s);
        acc[i] = fmaf(s, __half2float(sc[g * kTileRows + 4 * q + i]), acc[i]);
      }
    } else {
      const int64_t g = b / bpg, c0 = g * L.group + (b % bpg) * 8;
      float xl[4], xh[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        xl[c] = xs[c0 + c];
        xh[c] = xs[c0 + 4 + c];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t r = r4[i];
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t byte = (r >> (8 * c)) & 0xff;
          s = fmaf(static_cast<float>(static_cast<int>(byte & 0xf) - 8), xl[c], s);
          s = fmaf(static_cast<float>(static_cast<int>(byte >> 4) - 8), xh[c], s);
        }
        acc[i] = fmaf(s, __half2float(sc[g * kTileRows + 4 * q + i]), acc[i]);
      }
    }
  }
}

/// The 16 row sums of a tile from every thread's acc[4] (rows 4(t % 4) + i), into out[16] in
/// shared memory; every thread calls it.
__device__ __forceinline__ void tile_reduce(float acc[4], float (*red)[kTileRows], float* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    for (int o = 4; o < 32; o <<= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  if (lane < 4)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][4 * lane + i] = acc[i];
  __syncthreads();
  if (threadIdx.x < kTileRows) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

template <int DT>
__device__ void tile_rows(const ExpertMatrixLayout& L, const uint8_t* tile, const float* xs,
                          float (*red)[kTileRows], float* out) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  tile_dot<DT>(L, tile, xs, acc);
  tile_reduce(acc, red, out);
}

/// Input row v (k floats) into shared xs, zero up to k_pad.
__device__ void stage(const float* v, int64_t k, int64_t k_pad, float* xs) {
  for (int64_t j = threadIdx.x; j < k_pad; j += kThreads) xs[j] = j < k ? v[j] : 0.f;
  __syncthreads();
}

/// Slot of routed expert i, or -1 (not resident, or an id outside the layer).
__device__ __forceinline__ int32_t slot_of(const GpuExpertsArgs& a, int i) {
  const int32_t e = a.ids[i];
  return e >= 0 && e < a.num_experts ? a.slot_of[e] : -1;
}

/// grid (gate_up tiles, top_k): hid[i][rows of the tile] = silu(gate x) ⊙ up x for resident i.
template <int DT>
__global__ void __launch_bounds__(kThreads) experts_gate_up_kernel(const GpuExpertsArgs a) {
  extern __shared__ float xs[];
  __shared__ float red[kThreads / 32][kTileRows];
  __shared__ float g[kTileRows], u[kTileRows];
  const int i = blockIdx.y;
  const int32_t s = slot_of(a, i);
  if (s < 0) return;
  const ExpertMatrixLayout& L = a.gate_up;
  stage(a.x, L.k, L.k_pad, xs);
  const uint8_t* gate = a.slots + s * a.slot_bytes + blockIdx.x * L.tile_bytes;
  tile_rows<DT>(L, gate, xs, red, g);
  tile_rows<DT>(L, gate + L.num_tiles * L.tile_bytes, xs, red, u);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTileRows + threadIdx.x;
  if (threadIdx.x < kTileRows && row < L.n)
    a.hid[i * L.n + row] = siluf(g[threadIdx.x]) * u[threadIdx.x];
}

/// grid (down tiles): y[rows of the tile] += Σ over resident i, in order, weight_i · down_i hid_i.
template <int DT>
__global__ void __launch_bounds__(kThreads) experts_down_kernel(const GpuExpertsArgs a) {
  extern __shared__ float xs[];
  __shared__ float red[kThreads / 32][kTileRows];
  __shared__ float d[kTileRows];
  const ExpertMatrixLayout& L = a.down;
  float sum = 0.f;  // thread r < 16: row r of the tile
  bool any = false;
  for (int i = 0; i < a.top_k; ++i) {
    const int32_t s = slot_of(a, i);
    if (s < 0) continue;
    any = true;
    stage(a.hid + i * L.k, L.k, L.k_pad, xs);
    const uint8_t* tile = a.slots + s * a.slot_bytes +
                          2 * a.gate_up.num_tiles * a.gate_up.tile_bytes +
                          blockIdx.x * L.tile_bytes;
    tile_rows<DT>(L, tile, xs, red, d);
    if (threadIdx.x < kTileRows) sum = fmaf(a.weights[i], d[threadIdx.x], sum);
  }
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTileRows + threadIdx.x;
  if (any && threadIdx.x < kTileRows && row < L.n) a.y[row] += sum;
}

template <int DT>
void launch_experts(const GpuExpertsArgs& a, cudaStream_t s) {
  const size_t smem_gu = static_cast<size_t>(a.gate_up.k_pad) * sizeof(float);
  const size_t smem_dn = static_cast<size_t>(a.down.k_pad) * sizeof(float);
  experts_gate_up_kernel<DT>
      <<<dim3(static_cast<unsigned>(a.gate_up.num_tiles), a.top_k), kThreads, smem_gu, s>>>(a);
  experts_down_kernel<DT><<<static_cast<unsigned>(a.down.num_tiles), kThreads, smem_dn, s>>>(a);
}

__global__ void add_vector_kernel(float* y, const float* x, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

}  // namespace

void add_vector(float* y, const float* x, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  add_vector_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(y, x, n);
}

bool gpu_experts_supported(const GpuExpertsArgs& a) {
  const ExpertMatrixLayout &gu = a.gate_up, &dn = a.down;
  return a.top_k > 0 && a.top_k <= kMaxGpuTopK && gu.dtype == dn.dtype && gu.dtype >= 0 &&
         gu.dtype <= 2 && gu.k_pad <= kMaxGpuExpertK && dn.k_pad <= kMaxGpuExpertK &&
         dn.k == gu.n && gu.data_bytes % 64 == 0 && dn.data_bytes % 64 == 0 &&
         (gu.dtype == 0 || (gu.group_bytes % 64 == 0 && dn.group_bytes % 64 == 0)) &&
         gu.k == dn.n && a.slot_bytes % 16 == 0 && a.slot_bytes >= gu.bytes() * 2 + dn.bytes();
}

bool gpu_experts_decode(const GpuExpertsArgs& a, cudaStream_t s) {
  if (!gpu_experts_supported(a)) return false;
  const ExpertMatrixLayout& gu = a.gate_up;
  if (gu.dtype == 0)
    launch_experts<0>(a, s);
  else if (gu.dtype == 1)
    launch_experts<1>(a, s);
  else
    launch_experts<2>(a, s);
  return true;
}

namespace {

// One 16-byte unit per thread (Note [GPU experts from the packed layout]): rows 4(u % 4) .. +3 of
// 64-byte block u / 4, decoded and written to their columns of the row-major BF16 matrix.
template <int DT>
// blockIdx.z: matrix z % mats of expert z / mats (DequantBatch).
__global__ void dequant_kernel(const ExpertMatrixLayout L, const DequantBatch d_) {
  const int64_t tile = blockIdx.y;
  const int64_t nu = L.data_bytes / 16;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= nu) return;
  const int64_t e = blockIdx.z / d_.mats, m = blockIdx.z % d_.mats;
  const uint8_t* packed = d_.src + e * d_.src_stride + m * d_.mat_src_stride;
  __nv_bfloat16* dst =
      reinterpret_cast<__nv_bfloat16*>(d_.dst) + e * d_.dst_stride + m * d_.mat_dst_stride;
  const uint8_t* t = packed + tile * L.tile_bytes;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(t) + u);
  const uint32_t r4[4] = {v.x, v.y, v.z, v.w};
  const int q = static_cast<int>(u & 3);
  const int64_t b = u >> 2;
  const __half* sc = reinterpret_cast<const __half*>(t + L.data_bytes);
  const int64_t bpg = DT == 0 ? 1 : L.group_bytes / 64;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = tile * kTileRows + 4 * q + i;
    if (row >= L.n) continue;
    __nv_bfloat16* d = dst + row * L.k;
    const uint32_t r = r4[i];
    if constexpr (DT == 0) {
      const int64_t c = 2 * b;
      if (L.k % 2 == 0 && c + 2 <= L.k) {  // the two BF16 values as they are, one 4-byte store
        *reinterpret_cast<uint32_t*>(d + c) = r;
        continue;
      }
      if (c < L.k) d[c] = __float2bfloat16_rn(bf16_lo(r));
      if (c + 1 < L.k) d[c + 1] = __float2bfloat16_rn(bf16_hi(r));
    } else {
      const int64_t g = b / bpg;
      const float scale = __half2float(sc[g * kTileRows + 4 * q + i]);
      if constexpr (DT == 1) {
        const int64_t c0 = g * L.group + (b % bpg) * 4;
        if (L.k % 4 == 0 && c0 + 4 <= L.k) {  // the row's 4 values in one 8-byte store
          __nv_bfloat162 p[2];
#pragma unroll
          for (int c = 0; c < 2; ++c)
            p[c] = __floats2bfloat162_rn(
                static_cast<float>(static_cast<int>((r >> (16 * c)) & 0xff) - 128) * scale,
                static_cast<float>(static_cast<int>((r >> (16 * c + 8)) & 0xff) - 128) * scale);
          *reinterpret_cast<uint2*>(d + c0) = *reinterpret_cast<const uint2*>(p);
          continue;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (c0 + c < L.k)
            d[c0 + c] = __float2bfloat16_rn(
                static_cast<float>(static_cast<int>((r >> (8 * c)) & 0xff) - 128) * scale);
      } else {
        const int64_t c0 = g * L.group + (b % bpg) * 8;
        if (L.k % 8 == 0 && c0 + 8 <= L.k) {  // the row's 8 values in one 16-byte store
          __nv_bfloat162 p[4];  // columns c0 .. c0+3: low nibbles of bytes 0..3; c0+4 ..: high
#pragma unroll
          for (int c = 0; c < 4; c += 2) {
            const uint32_t b0 = (r >> (8 * c)) & 0xff, b1 = (r >> (8 * c + 8)) & 0xff;
            p[c / 2] = int4_pair(b0 & 0xf, b1 & 0xf, scale);
            p[2 + c / 2] = int4_pair(b0 >> 4, b1 >> 4, scale);
          }
          *reinterpret_cast<uint4*>(d + c0) = *reinterpret_cast<const uint4*>(p);
          continue;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t byte = (r >> (8 * c)) & 0xff;
          if (c0 + c < L.k)
            d[c0 + c] =
                __float2bfloat16_rn(static_cast<float>(static_cast<int>(byte & 0xf) - 8) * scale);
          if (c0 + 4 + c < L.k)
            d[c0 + 4 + c] =
                __float2bfloat16_rn(static_cast<float>(static_cast<int>(byte >> 4) - 8) * scale);
        }
      }
    }
  }
}

// v as BF16 into hi[o], and where lo is given, the rest (v - hi, rounded) into lo[o].
__device__ __forceinline__ void store_bf16_split(float v, __nv_bfloat16* hi, __nv_bfloat16* lo,
                                                 int64_t o) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  hi[o] = h;
  if (lo != nullptr) lo[o] = __float2bfloat16_rn(v - __bfloat162float(h));
}

__global__ void gather_rows_kernel(const float* x, int64_t ldx, const int32_t* rows, int64_t h,
                                   __nv_bfloat16* dst, __nv_bfloat16* lo) {
  const int64_t r = blockIdx.x;
  const float* src = x + static_cast<int64_t>(rows[r]) * ldx;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
    store_bf16_split(src[j], dst, lo, r * h + j);
}

__global__ void silu_mul_bf16_kernel(const float* gu, int64_t i, __nv_bfloat16* dst,
                                     __nv_bfloat16* lo) {
  const int64_t r = blockIdx.x;
  const float* g = gu + r * 2 * i;
  for (int64_t j = threadIdx.x; j < i; j += blockDim.x)
    store_bf16_split(siluf(g[j]) * g[i + j], dst, lo, r * i + j);
}

__global__ void scatter_rows_kernel(const float* src, const int32_t* rows, int64_t h, float* dst) {
  const int64_t r = blockIdx.x;
  const int32_t to = rows[r];
  if (to < 0) return;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x)
    dst[static_cast<int64_t>(to) * h + j] = src[r * h + j];
}

__global__ void combine_routed_kernel(const float* out, const int32_t* pos, const float* w, int k,
                                      int64_t h, float* y) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < k; ++j)
      s = fmaf(w[t * k + j], out[static_cast<int64_t>(pos[t * k + j]) * h + c], s);
    y[t * h + c] = s;
  }
}

// Note [Grouped expert GEMM]
// A streamed layer's experts each get ~T·k/E rows (256 at 8192-token chunks of the 35B-A3B):
// one cuBLAS call per expert and matrix is 512 launches per layer whose small grids leave most
// SMs idle between them (57-62 TFLOP/s measured at load on an H100, Note [Expert GEMMs on
// lanes]). Here one launch covers many experts: the host lists tiles of up to 128 rows of one
// expert (grouped_expert_gemm_tiles), and block (tile, column block) computes 128 rows x 128
// columns of that expert's product with BF16 tensor-core MMAs (WMMA 16x16x16, fp32
// accumulators): 8 warps as 2 x 4, each 64 x 32 (4 x 2 fragments). The k dimension goes in steps
// of 32 through a 4-stage cp.async ring in shared memory (rows padded to 40 elements, so the
// fragment loads' rows start in different banks); rows past the tile's end and columns past k or
// m are zero filled. Each warp writes its fragments through a 1 KiB staging area, so only the
// tile's own rows (< r1) are stored: the next rows belong to the next expert.
//
// Note [Grouped expert GEMM from packed INT4]
// With INT4 experts the weights need not be decoded to BF16 in VRAM first (a pass that wrote
// 1.6 GB per layer of the 35B-A3B and took 38 of 556 ms of an 8K prefill): the ring holds each
// k step's packed bytes as copied from the host (Note [Expert weight layout tidal_n16_v1]: per
// 16-row tile, 64-byte blocks of 8 columns x 16 rows, then fp16 scales per group and row), 256
// bytes of data and 32 of scales per row tile, a quarter of the BF16 tile. Each warp decodes the
// 32 rows it multiplies (lane = row: four 4-byte words, 32 values, times the row's scale) into its
// own BF16 tile, so the decode needs no block-wide barrier; the two warps that share columns both
// decode them. Needs groups of a multiple of 32 columns (one scale per k step) and matrices whose
// rows are whole column blocks (a block's 128 rows lie in gate or in up).
namespace gg {
constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kLd = kBK + 8, kThreadsG = 256;
// BF16 weights: A and B tiles per stage.
constexpr int kStageElems = (kBM + kBN) * kLd;
constexpr int kSmemBytes = kStages * kStageElems * 2;  // 80 KiB: needs the opt-in
// Packed INT4 weights: A tile + 8 row tiles' data (256 B) and scales (32 B) per stage, then each
// warp's decoded 32 x kLd BF16 tile.
constexpr int kRawBytes = (kBN / 16) * (256 + 32);
constexpr int kStageBytesQ = kBM * kLd * 2 + kRawBytes;
constexpr int kSmemBytesQ = kStages * kStageBytesQ + 8 * 32 * kLd * 2;
static_assert(kBM == kGroupedGemmRows, "a tile is one block's rows");
static_assert(kStageBytesQ % 128 == 0, "stages stay 128-byte aligned");
}  // namespace gg

__device__ __forceinline__ void cp_async16(void* smem, const void* g, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool kInt4>
__global__ void __launch_bounds__(gg::kThreadsG) grouped_gemm_kernel(GroupedGemmArgs a) {
  using namespace gg;
  namespace w = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char gg_smem[];
  const int32_t* tile = a.tiles + 3 * static_cast<int64_t>(blockIdx.x);
  const int64_t e = tile[0], r0 = tile[1], r1 = tile[2];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBN, K = a.k, M = a.m;
  const __nv_bfloat16* X = reinterpret_cast<const __nv_bfloat16*>(a.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t KT = (K + kBK - 1) / kBK;
  constexpr int kStage = kInt4 ? kStageBytesQ : kStageElems * 2;  // bytes per stage
  auto a_tile = [&](int stage) {
    return reinterpret_cast<__nv_bfloat16*>(gg_smem + stage * kStage);
  };
  // kInt4: the packed matrix (gate or up) that holds this block's rows, and its first row tile.
  const __nv_bfloat16* Wm = nullptr;
  const uint8_t* P = nullptr;
  if constexpr (kInt4) {
    const int64_t mat = m0 / a.mat_rows;
    P = a.packed + e * a.packed_stride + mat * a.mat_bytes +
        ((m0 - mat * a.mat_rows) / 16) * a.tile_bytes;
  } else {
    Wm = reinterpret_cast<const __nv_bfloat16*>(a.w) + e * M * K;
  }
  auto load = [&](int stage, int64_t kt) {
    __nv_bfloat16* As = a_tile(stage);
    const int64_t k0 = kt * kBK;
    for (int c = tid; c < kBM * 4; c += kThreadsG) {
      const int row = c >> 2, part = c & 3;
      const int64_t gr = r0 + row, kc = k0 + part * 8;
      const bool ok = gr < r1 && kc < K;
      cp_async16(As + row * kLd + part * 8, X + (ok ? gr * K + kc : r0 * K), ok ? 16 : 0);
    }
    if constexpr (kInt4) {
      // Row tile j's four data blocks of this k step (256 B), then its 16 scales of the step's
      // group (32 B).
      uint8_t* raw = reinterpret_cast<uint8_t*>(As + kBM * kLd);
      if (tid < (kBN / 16) * 18) {
        const int j = tid < 128 ? tid / 16 : (tid - 128) / 2;
        const uint8_t* t = P + j * a.tile_bytes;
        if (tid < 128)
          cp_async16(raw + tid * 16, t + kt * 256 + (tid % 16) * 16, 16);
        else
          cp_async16(raw + 2048 + (tid - 128) * 16,
                     t + a.data_bytes + (k0 / a.group) * 32 + (tid % 2) * 16, 16);
      }
    } else {
      __nv_bfloat16* Bs = As + kBM * kLd;
      for (int c = tid; c < kBN * 4; c += kThreadsG) {
        const int row = c >> 2, part = c & 3;
        const int64_t gc = m0 + row, kc = k0 + part * 8;
        const bool ok = gc < M && kc < K;
        cp_async16(Bs + row * kLd + part * 8, Wm + (ok ? gc * K + kc : 0), ok ? 16 : 0);
      }
    }
  };
  // kInt4: this warp's decoded rows (wn·32 .. +32 of the block's columns).
  __nv_bfloat16* Bw =
      reinterpret_cast<__nv_bfloat16*>(gg_smem + kStages * kStageBytesQ) + warp * 32 * kLd;
  w::fragment<w::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) w::fill_fragment(acc[i][j], 0.f);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (for this thread) ...
    __syncthreads();               // ... for every thread, and stage kt - 1 is consumed
    if (kt + kStages - 1 < KT)
      load(static_cast<int>((kt + kStages - 1) % kStages), kt + kStages - 1);
    cp_async_commit();
    const __nv_bfloat16* As = a_tile(static_cast<int>(kt % kStages));
    const __nv_bfloat16* Bs;
    int ldb;
    if constexpr (kInt4) {
      // Lane l decodes row wn·32 + l: row tile 2·wn + l / 16, row l % 16 within it.
      const uint8_t* raw = reinterpret_cast<const uint8_t*>(As + kBM * kLd);
      const int j = 2 * wn + lane / 16, rr = lane % 16;
      const float scale =
          __half2float(*reinterpret_cast<const __half*>(raw + 2048 + j * 32 + rr * 2));
      __nv_bfloat16* dst = Bw + lane * kLd;
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        const uint32_t v = *reinterpret_cast<const uint32_t*>(raw + j * 256 + blk * 64 + rr * 4);
        __nv_bfloat162 p[4];  // columns 8·blk + 0..3: low nibbles of bytes 0..3; + 4..7: high
        p[0] = int4_pair(v & 0xf, (v >> 8) & 0xf, scale);
        p[1] = int4_pair((v >> 16) & 0xf, (v >> 24) & 0xf, scale);
        p[2] = int4_pair((v >> 4) & 0xf, (v >> 12) & 0xf, scale);
        p[3] = int4_pair((v >> 20) & 0xf, (v >> 28) & 0xf, scale);
        *reinterpret_cast<uint4*>(dst + blk * 8) = *reinterpret_cast<const uint4*>(p);
      }
      __syncwarp();
      Bs = Bw;
      ldb = 0;  // the warp's own rows start at 0
    } else {
      Bs = As + kBM * kLd;
      ldb = wn * 32;
    }
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, __nv_bfloat16, w::row_major> fa[4];
      w::fragment<w::matrix_b, 16, 16, 16, __nv_bfloat16, w::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) w::load_matrix_sync(fb[j], Bs + (ldb + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) w::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if constexpr (kInt4) __syncwarp();  // the fragments are loaded before Bw is written again
  }
  cp_async_wait<0>();
  __syncthreads();
  float* st = reinterpret_cast<float*>(gg_smem) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      w::store_matrix_sync(st, acc[i][j], 16, w::mem_row_major);
      __syncwarp();
      for (int q = lane; q < 64; q += 32) {
        const int rr = q >> 2, c4 = (q & 3) * 4;
        const int64_t gr = r0 + wm * 64 + i * 16 + rr, gc = m0 + wn * 32 + j * 16 + c4;
        if (gr >= r1 || gc >= M) continue;  // m % 8 == 0: a quad is all in or all out
        float4 v = *reinterpret_cast<const float4*>(st + rr * 16 + c4);
        float4* o = reinterpret_cast<float4*>(a.out + gr * M + gc);
        if (a.accumulate) {
          const float4 p = *o;
          v.x += p.x;
          v.y += p.y;
          v.z += p.z;
          v.w += p.w;
        }
        *o = v;
      }
      __syncwarp();
    }
}

}  // namespace

bool dequant_supported(const ExpertMatrixLayout& L) {
  return L.dtype >= 0 && L.dtype <= 2 && L.data_bytes % 64 == 0 && L.num_tiles > 0 &&
         L.num_tiles <= 65535 &&  // grid y
         (L.dtype == 0 || (L.group_bytes % 64 == 0 && L.group > 0));
}

void dequant_expert_matrices(const ExpertMatrixLayout& L, const DequantBatch& b, cudaStream_t s) {
  if (b.experts <= 0 || b.mats <= 0) return;
  const int64_t nu = L.data_bytes / 16;
  const dim3 grid(static_cast<unsigned>((nu + kThreads - 1) / kThreads),
                  static_cast<unsigned>(L.num_tiles), static_cast<unsigned>(b.experts * b.mats));
  if (L.dtype == 0)
    dequant_kernel<0><<<grid, kThreads, 0, s>>>(L, b);
  else if (L.dtype == 1)
    dequant_kernel<1><<<grid, kThreads, 0, s>>>(L, b);
  else
    dequant_kernel<2><<<grid, kThreads, 0, s>>>(L, b);
}

void dequant_expert_matrix(const ExpertMatrixLayout& L, const uint8_t* packed, uint16_t* dst,
                           cudaStream_t s) {
  DequantBatch b;
  b.src = packed;
  b.dst = dst;
  dequant_expert_matrices(L, b, s);
}

void gather_rows_bf16(const float* x, int64_t ldx, const int32_t* rows, int64_t nrows, int64_t h,
                      uint16_t* dst, cudaStream_t s, uint16_t* lo) {
  if (nrows <= 0) return;
  gather_rows_kernel<<<static_cast<unsigned>(nrows), 256, 0, s>>>(
      x, ldx, rows, h, reinterpret_cast<__nv_bfloat16*>(dst), reinterpret_cast<__nv_bfloat16*>(lo));
}

void silu_mul_bf16(const float* gu, int64_t rows, int64_t i, uint16_t* dst, cudaStream_t s,
                   uint16_t* lo) {
  if (rows <= 0) return;
  silu_mul_bf16_kernel<<<static_cast<unsigned>(rows), 256, 0, s>>>(
      gu, i, reinterpret_cast<__nv_bfloat16*>(dst), reinterpret_cast<__nv_bfloat16*>(lo));
}

void scatter_rows(const float* src, const int32_t* rows, int64_t n, int64_t h, float* dst,
                  cudaStream_t s) {
  if (n <= 0) return;
  scatter_rows_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(src, rows, h, dst);
}

void combine_routed(const float* out, const int32_t* pos, const float* w, int64_t T, int k,
                    int64_t h, float* y, cudaStream_t s) {
  if (T <= 0) return;
  combine_routed_kernel<<<static_cast<unsigned>(T), 256, 0, s>>>(out, pos, w, k, h, y);
}

namespace {
// The rings are over the 48 KiB default: opted into once, where the device allows it (every
// architecture tidal builds for does: sm_86 and up allow 99 KiB and more).
bool grouped_smem_ok() {
  static const bool ok = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        v < std::max(gg::kSmemBytes, gg::kSmemBytesQ) ||
        cudaFuncSetAttribute(grouped_gemm_kernel<false>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             gg::kSmemBytes) != cudaSuccess ||
        cudaFuncSetAttribute(grouped_gemm_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             gg::kSmemBytesQ) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return true;
  }();
  return ok;
}
}  // namespace

bool grouped_expert_gemm_supported(int64_t m, int64_t k) {
  return grouped_smem_ok() && m > 0 && k > 0 && m % 8 == 0 && k % 8 == 0 &&
         (m + gg::kBN - 1) / gg::kBN <= 65535;
}

bool grouped_expert_gemm_int4_supported(const ExpertMatrixLayout& L, int64_t mats) {
  // The packed INT4 layout as make_layout builds it: 8 columns per 64-byte block (group_bytes =
  // 8·group), the scales ([num_groups][16] fp16) after the data, one group per k step at most.
  return grouped_smem_ok() && L.dtype == 2 && mats >= 1 && L.n % gg::kBN == 0 && L.k % 8 == 0 &&
         L.group > 0 && L.group % gg::kBK == 0 && L.group_bytes == 8 * L.group &&
         L.num_groups * L.group_bytes == L.data_bytes && L.num_groups * L.group >= L.k &&
         L.data_bytes % 256 == 0 && L.tile_bytes >= L.data_bytes + 32 * L.num_groups &&
         L.tile_bytes % 16 == 0 && L.num_tiles * 16 == L.n && L.n * mats / gg::kBN <= 65535;
}

void grouped_expert_gemm(const GroupedGemmArgs& a, cudaStream_t s) {
  if (a.ntiles <= 0) return;
  const dim3 grid(static_cast<unsigned>(a.ntiles),
                  static_cast<unsigned>((a.m + gg::kBN - 1) / gg::kBN));
  if (a.packed != nullptr)
    grouped_gemm_kernel<true><<<grid, gg::kThreadsG, gg::kSmemBytesQ, s>>>(a);
  else
    grouped_gemm_kernel<false><<<grid, gg::kThreadsG, gg::kSmemBytes, s>>>(a);
}

int64_t grouped_expert_gemm_tiles(const int64_t* off, int64_t experts, int32_t* tiles,
                                  int64_t max_tiles) {
  int64_t n = 0;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t r = off[e]; r < off[e + 1]; r += kGroupedGemmRows) {
      if (n < max_tiles) {
        tiles[3 * n] = static_cast<int32_t>(e);
        tiles[3 * n + 1] = static_cast<int32_t>(r);
        tiles[3 * n + 2] = static_cast<int32_t>(off[e + 1]);
      }
      ++n;
    }
  return n;
}

}  // namespace tidal::kernels::cuda
