// SPDX-License-Identifier: Apache-2.0
/// \file experts.h
/// \brief Routed experts on the GPU, from the host's packed layout (Note [Expert weight layout
/// tidal_n16_v1] in kernels/cpu/expert_gemm_pack.cpp), so an expert copied byte for byte from
/// host RAM into a VRAM cache slot runs as it is. One-token decode: the router's ids and weights
/// stay on the device; each routed expert that a slot holds is computed and added, the others are
/// left to the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tidal::kernels::cuda {

/// One packed matrix's layout (the fields of kernels::cpu::PackedLayout the GPU needs).
/// dtype: 0 BF16, 1 INT8, 2 INT4.
struct ExpertMatrixLayout {
  int dtype = 0;
  int64_t n = 0, k = 0, group = 0, k_pad = 0, num_tiles = 0, num_groups = 0, group_bytes = 0,
          data_bytes = 0, tile_bytes = 0;
  int64_t bytes() const { return num_tiles * tile_bytes; }
};

/// The routed experts of one MoE layer for one token whose ids a VRAM slot holds.
struct GpuExpertsArgs {
  ExpertMatrixLayout gate_up;      ///< gate and up: n = I, k = H
  ExpertMatrixLayout down;         ///< n = H, k = I
  const int32_t* ids = nullptr;    ///< top_k router ids (device)
  const float* weights = nullptr;  ///< top_k router weights (device)
  int top_k = 0;
  int64_t num_experts = 0;
  /// Slot of each expert of this layer, -1 where none holds it (device, num_experts entries).
  const int32_t* slot_of = nullptr;
  /// Slot s holds gate at slots + s·slot_bytes, up at + gate_up.bytes(), down at
  /// + 2·gate_up.bytes().
  const uint8_t* slots = nullptr;
  int64_t slot_bytes = 0;
  const float* x = nullptr;  ///< the token's normed hidden state, k = H floats
  float* y = nullptr;    ///< += Σ over resident routed experts of weight · expert(x), H floats
  float* hid = nullptr;  ///< workspace, top_k · I floats
};

/// Max top_k and H of gpu_experts_decode.
constexpr int kMaxGpuTopK = 16;
constexpr int64_t kMaxGpuExpertK = 8192;

/// y += Σ_i [slot_of[ids[i]] ≥ 0] · weights[i] · down(silu(gate x) ⊙ up x) for one token: two
/// launches (gate/up by 16-row tiles, then down by 16-row tiles over the resident experts in the
/// order of ids). Returns false (nothing launched) for a shape it does not take.
bool gpu_experts_decode(const GpuExpertsArgs& a, cudaStream_t s);
/// Whether gpu_experts_decode takes this shape (layouts, top_k, slot size; pointers unchecked).
bool gpu_experts_supported(const GpuExpertsArgs& a);

/// y[i] += x[i], i < n.
void add_vector(float* y, const float* x, int64_t n, cudaStream_t s);

// Prefill expert streaming (Note [Prefill expert streaming] in core/model/cuda_model.cpp): a
// layer's packed experts are copied to VRAM whole, decoded to BF16 and multiplied with cuBLAS
// over the tokens routed to each, rows grouped by expert.

/// dst (row-major L.n x L.k BF16, row stride L.k) = the packed matrix at `packed`, element for
/// element as kernels::cpu::packed_value decodes it, rounded to BF16 (nearest even). Where L.k is
/// a multiple of 2 (BF16), 4 (INT8) or 8 (INT4), each row's values go out in one 4/8/16-byte
/// store: dst (and a batch's strides, in bytes) must then be aligned to that size.
void dequant_expert_matrix(const ExpertMatrixLayout& L, const uint8_t* packed, uint16_t* dst,
                           cudaStream_t s);
/// Many matrices of one layout in one launch: for expert e < experts and matrix m < mats, the
/// packed matrix at src + e·src_stride + m·mat_src_stride (bytes) to dst + e·dst_stride +
/// m·mat_dst_stride (BF16 elements). A streamed layer's gate and up (mats 2) or down (mats 1),
/// a group of experts at a time. experts · mats ≤ 65535.
struct DequantBatch {
  const uint8_t* src = nullptr;
  uint16_t* dst = nullptr;
  int64_t experts = 1, mats = 1;
  int64_t src_stride = 0, mat_src_stride = 0, dst_stride = 0, mat_dst_stride = 0;
};
void dequant_expert_matrices(const ExpertMatrixLayout& L, const DequantBatch& b, cudaStream_t s);
/// Whether dequant_expert_matrix takes this layout (dtype 0-2, 64-byte blocks).
bool dequant_supported(const ExpertMatrixLayout& L);
/// dst[r] (BF16, h values) = x[rows[r]] (fp32 rows of stride ldx), r < nrows. With `lo`, also
/// lo[r] = BF16(x[rows[r]] - dst[r]): hi + lo carry ~16 mantissa bits (gpu_precision="bf16x2").
void gather_rows_bf16(const float* x, int64_t ldx, const int32_t* rows, int64_t nrows, int64_t h,
                      uint16_t* dst, cudaStream_t s, uint16_t* lo = nullptr);
/// dst[r][j] (BF16, rows x i) = silu(gu[r][j]) * gu[r][i + j] for fp32 rows gu of 2i values;
/// with `lo`, the remainder as above.
void silu_mul_bf16(const float* gu, int64_t rows, int64_t i, uint16_t* dst, cudaStream_t s,
                   uint16_t* lo = nullptr);
/// dst[rows[r]] = src[r] (rows of h floats) for r < n where rows[r] >= 0; a row of -1 is skipped.
void scatter_rows(const float* src, const int32_t* rows, int64_t n, int64_t h, float* dst,
                  cudaStream_t s);
/// Note [Grouped expert GEMM] (experts.cu): every expert of a streamed group in one launch.
/// For each tile (expert e, rows r0 .. r1), out[r][c] (+)= Σ_j x[r][j] · w_e[c][j] for
/// r0 ≤ r < r1, c < m: x holds BF16 rows of k (row stride k), w_e = w + e·m·k a row-major
/// m x k BF16 matrix, out fp32 rows of m. A tile covers at most kGroupedGemmRows rows. x, w, out
/// and packed must be 16-byte aligned (cudaMalloc's are), as must packed_stride and mat_bytes.
struct GroupedGemmArgs {
  const uint16_t* x = nullptr;
  const uint16_t* w = nullptr;
  float* out = nullptr;
  const int32_t* tiles = nullptr;  ///< device: ntiles triples (e, r0, r1)
  int64_t ntiles = 0, m = 0, k = 0;
  bool accumulate = false;  ///< add to out instead of overwriting it
  /// Packed INT4 weights instead of w (Note [Grouped expert GEMM from packed INT4]): expert e's
  /// rows c < m lie in matrix c / mat_rows at packed + e·packed_stride + (c / mat_rows)·mat_bytes,
  /// each in the host's packed layout (tile_bytes, data_bytes and group of its layout).
  const uint8_t* packed = nullptr;
  int64_t packed_stride = 0, mat_rows = 0, mat_bytes = 0, tile_bytes = 0, data_bytes = 0, group = 0;
  /// The packed source: expert e's first matrix of layout L at p + e·stride, the next (up after
  /// gate) L.bytes() after it.
  void set_packed(const uint8_t* p, int64_t stride, const ExpertMatrixLayout& L) {
    w = nullptr;
    packed = p;
    packed_stride = stride;
    mat_rows = L.n;
    mat_bytes = L.bytes();
    tile_bytes = L.tile_bytes;
    data_bytes = L.data_bytes;
    group = L.group;
  }
};
constexpr int64_t kGroupedGemmRows = 128;
/// Whether grouped_expert_gemm takes an m x k weight (m and k multiples of 8: 16-byte rows) on
/// this device (its 80 KiB of shared memory per block; call before grouped_expert_gemm).
bool grouped_expert_gemm_supported(int64_t m, int64_t k);
/// Whether grouped_expert_gemm takes `mats` stacked matrices of layout L from their packed INT4
/// bytes (rows a multiple of 128, groups of a multiple of 32 columns) on this device.
bool grouped_expert_gemm_int4_supported(const ExpertMatrixLayout& L, int64_t mats);
void grouped_expert_gemm(const GroupedGemmArgs& a, cudaStream_t s);
/// The tiles of experts 0 .. experts-1 whose rows are off[e] .. off[e+1] (experts + 1 offsets):
/// Σ_e ceil((off[e+1] - off[e]) / kGroupedGemmRows) triples, returned; the first max_tiles of them
/// are written to tiles (a count over max_tiles means the list did not fit). Experts with no row
/// have none.
int64_t grouped_expert_gemm_tiles(const int64_t* off, int64_t experts, int32_t* tiles,
                                  int64_t max_tiles);
/// y[t] = Σ_j w[t·k + j] · out[pos[t·k + j]] (rows of h floats), t < T: each token's routed
/// experts' rows, summed in routing order (deterministic).
void combine_routed(const float* out, const int32_t* pos, const float* w, int64_t T, int k,
                    int64_t h, float* y, cudaStream_t s);

}  // namespace tidal::kernels::cuda
