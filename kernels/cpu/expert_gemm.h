// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm.h
/// \brief Packed routed-expert weights (BF16 / INT8 / INT4 with group-wise scales) and the tile
/// micro-kernels that multiply them by a few token rows, one variant per CPU ISA.
///
/// See Note [Expert weight layout tidal_n16_v1] in expert_gemm_pack.cpp for the byte layout.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/common/cpu_features.h"
#include "kernels/common/dtype.h"
#include "kernels/cpu/weight_decode.h"

namespace tidal::kernels::cpu {

/// Weight formats of routed experts.
///  - kBF16: bfloat16, no scales.
///  - kINT8: symmetric int8 in [-127, 127], one fp16 scale per (row, group of `group` columns).
///  - kINT4: symmetric int4 in [-8, 7], one fp16 scale per (row, group).
enum class ExpertDType : uint8_t { kBF16, kINT8, kINT4 };

std::string_view expert_dtype_name(ExpertDType dt);  ///< "bf16", "int8", "int4"
/// Parses "bf16" / "int8" / "int4"; throws std::invalid_argument naming the accepted values.
ExpertDType parse_expert_dtype(std::string_view s);

/// Output rows per tile: one zmm of fp32 results, one AMX B-tile width.
constexpr int64_t kTileRows = 16;
/// Columns are padded to this for BF16: one AMX BF16 B tile spans 16 pairs = 32 columns.
constexpr int64_t kBf16ColAlign = 32;
/// Group sizes a quantised format may use.
constexpr int kGroupSizes[] = {32, 64, 128};
/// Token rows one micro-kernel call handles (AMX: passes of 32 tokens over one dequantised tile).
constexpr int64_t kMaxRowsPerCall = 128;
/// Default quantisation group: INT4 64 (4.25 bits per weight), INT8 128 (8.125 bits). Group 32
/// costs INT4 decode a third of its speed on the GPU machine's Xeon (52% of read bandwidth against
/// 80% at 64: one scale epilogue per 256 bytes), while the KL divergence of the golden models
/// against bf16 moves by less than 10% between 32 and 128 (docs/performance.md).
constexpr int64_t default_group_size(ExpertDType dtype) {
  return dtype == ExpertDType::kINT4 ? 64 : dtype == ExpertDType::kINT8 ? 128 : 0;
}
/// Layout name and version, stored in packed caches.
constexpr std::string_view kExpertLayoutName = "tidal_n16_v1";

/// The layout of one packed matrix W `[n, k]` (n outputs, k inputs), tile-major.
struct PackedLayout {
  ExpertDType dtype = ExpertDType::kBF16;
  int64_t n = 0, k = 0;
  int64_t group = 0;        ///< quantisation group along k (k_pad for BF16)
  int64_t k_pad = 0;        ///< k rounded up to the group (INT) or to kBf16ColAlign (BF16)
  int64_t num_tiles = 0;    ///< ceil(n / kTileRows)
  int64_t num_groups = 0;   ///< k_pad / group
  int64_t group_bytes = 0;  ///< bytes of one group's weights within a tile
  int64_t data_bytes = 0;   ///< weight bytes of one tile
  int64_t tile_bytes = 0;   ///< data + fp16 scales, padded to 64 bytes
  int64_t bytes() const { return num_tiles * tile_bytes; }
};

/// The layout of an `[n, k]` matrix in `dtype` with quantisation group `group` (ignored for BF16).
/// Throws std::invalid_argument for a group size other than 32/64/128 or non-positive sizes.
PackedLayout make_layout(ExpertDType dtype, int64_t n, int64_t k, int64_t group);

/// Quantises and packs W `[n, k]` (row-major, row stride `ld` elements, BF16 or F32) into `dst`
/// (`layout.bytes()` bytes, 64-byte aligned); tiles [tile0, tile1) only, so callers can split the
/// work. Padding rows and columns are zero.
void pack_weights(const PackedLayout& layout, const void* src, DType src_dtype, int64_t ld,
                  uint8_t* dst, int64_t tile0, int64_t tile1);

/// pack_weights() for any MatrixSource (weight_decode.h): plain sources as above; Q8_0 / Q4_0
/// into an INT8 (or, for Q4_0, INT4) layout of group 32 copy their integers and fp16 scales
/// exactly; everything else is decoded to fp32 row by row and quantised.
void pack_weights_from(const PackedLayout& layout, const MatrixSource& src, uint8_t* dst,
                       int64_t tile0, int64_t tile1);
/// Whether pack_weights_from() keeps `src`'s values exactly (a plain source: always).
bool pack_is_exact(const PackedLayout& layout, const MatrixSource& src);

/// One decoded weight: its value, and for INT formats the integer and the scale.
struct PackedValue {
  float value = 0.f;
  int32_t q = 0;
  float scale = 1.f;
};
/// Decodes element (row, col) of a packed matrix (tests, reference kernels).
PackedValue packed_value(const PackedLayout& layout, const uint8_t* packed, int64_t row,
                         int64_t col);

/// How a variant wants its activation rows prepared.
///  - kF32: fp32, zero-padded to k_pad.
///  - kBf16Split: x ≈ hi + lo, both bf16 (error ≲ 2⁻¹⁷|x|), zero-padded.
///  - kInt8Groups: per group g: scale s_g = max|x|/127, q = round(x / s_g) in [-127, 127], and
///    sum_g = Σ q (used to undo the unsigned weight offset).
///  - kBf16: x rounded to bf16 (relative error ≤ 2⁻⁸), zero-padded.
enum class ActKind : uint8_t { kF32, kBf16Split, kInt8Groups, kBf16 };

/// How far a variant's results may stray from the reference (Note [AMX BF16 is opt-in]).
///  - kExact: fp32 reassociation only (INT variants: bit-identical integer sums).
///  - kSplit: bf16 products of hi + lo activations, ~2⁻¹⁷ relative per activation.
///  - kBf16Activations: activations rounded to bf16 (≤ 2⁻⁸), as transformers in bf16, llama.cpp's
///    bf16 vec_dot and KTransformers' AMX kernels compute.
enum class Approximation : uint8_t { kExact = 0, kSplit = 1, kBf16Activations = 2 };
/// Parses TIDAL_EXPERT_AMX_BF16-style values: "0"/"" → kExact, "1"/"split" → kSplit, "bf16" →
/// kBf16Activations; anything else throws std::invalid_argument naming the accepted values.
Approximation parse_approximation(std::string_view s);

/// kInt8Groups: 127 / max|x| of a group, or 0 for an all-zero group. A group whose maximum is below
/// 127 / FLT_MAX (where the inverse would be infinite) is quantised as zero too: `amax` is set to
/// 0, so its scale is 0. Every ISA's preparation calls this (bit-identical results). `static`: each
/// translation unit, compiled with its own ISA flags, keeps its own copy (no ODR merge of a copy
/// built with AVX-512 into the scalar path).
static inline float act_inverse_scale(float& amax) {
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  if (inv > 3.40282347e38f) {  // +inf: amax < 127 / FLT_MAX
    amax = 0.f;
    return 0.f;
  }
  return inv;
}

/// Prepared activation rows for one micro-kernel call (row i at base + i * ld).
struct ActRows {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;     ///< the hi part of kBf16Split
  const uint16_t* bf16_lo = nullptr;  ///< kBf16Split
  const int8_t* q = nullptr;          ///< kInt8Groups
  const float* q_scale = nullptr;     ///< kInt8Groups, [num_groups] per row
  const int32_t* q_sum = nullptr;     ///< kInt8Groups, [num_groups] per row
  int64_t ld = 0;                     ///< elements between rows of f32/bf16/bf16_lo/q
  int64_t ld_group = 0;               ///< elements between rows of q_scale/q_sum

  /// The rows from `i0` on.
  ActRows shifted(int64_t i0) const {
    ActRows r = *this;
    if (r.f32) r.f32 += i0 * ld;
    if (r.bf16) r.bf16 += i0 * ld;
    if (r.bf16_lo) r.bf16_lo += i0 * ld;
    if (r.q) r.q += i0 * ld;
    if (r.q_scale) r.q_scale += i0 * ld_group;
    if (r.q_sum) r.q_sum += i0 * ld_group;
    return r;
  }
};

/// Bytes of workspace one prepared row of `kind` needs for `layout` (see ActBuffer).
struct ActBuffer {
  /// Sizes the buffer for `rows` rows of `kind` prepared for `layout`; reuses capacity. `isa`
  /// picks the preparation code (results are bit-identical at every ISA).
  /// With `zero_spare`, the kTileRows rows after `rows` are zeroed for kernels that read whole
  /// tiles (ExpertGemmVariant::whole_tiles); others skip that memset (33 KB for K = 2048, a few
  /// µs per decode call).
  void reserve(ActKind kind, const PackedLayout& layout, int64_t rows, Isa isa = Isa::kRef,
               bool zero_spare = true);
  /// Prepares row `row` from x[0, layout.k) (layout as passed to reserve).
  void prepare(int64_t row, const float* x);
  /// Copies row `src_row` of `src` (same kind and layout) into row `row`.
  void copy_row(int64_t row, const ActBuffer& src, int64_t src_row);
  /// The rows [row0, ...) as kernel arguments.
  ActRows rows(int64_t row0) const;

  ActKind kind = ActKind::kF32;
  Isa isa = Isa::kRef;
  int64_t k = 0, k_pad = 0, group = 0, num_groups = 0, ld = 0, ld_group = 0, num_rows = 0;
  std::vector<float> f32;
  std::vector<uint16_t> bf16, bf16_lo;
  std::vector<int8_t> q;
  std::vector<float> q_scale;
  std::vector<int32_t> q_sum;
};

/// dst[i * 16 + r] = Σ_c W[tile * 16 + r][c] · act_i[c] for i < m ≤ kMaxRowsPerCall, r < 16,
/// computed from one packed tile. Rows of a padded tile beyond n give 0. For AMX variants
/// `act` must have readable (zero) rows up to the next multiple of 16 above m.
using TileKernelFn = void (*)(const PackedLayout& layout, const uint8_t* tile, const ActRows& act,
                              int64_t m, float* dst);
/// The same for two tiles against the same activations (dst0 from tile0, dst1 from tile1).
using TileKernel2Fn = void (*)(const PackedLayout& layout, const uint8_t* tile0,
                               const uint8_t* tile1, const ActRows& act, int64_t m, float* dst0,
                               float* dst1);

/// One micro-kernel variant.
struct ExpertGemmVariant {
  const char* name;  ///< e.g. "avx512_vnni_int8"
  Isa isa;           ///< lowest ISA it needs
  ExpertDType dtype;
  ActKind act;
  int64_t min_rows;  ///< it declines calls with fewer token rows (AMX is for prefill)
  TileKernelFn run;
  TileKernel2Fn run2 = nullptr;  ///< optional: two tiles in one pass (AMX)
  int64_t group_multiple = 1;    ///< it needs the quantisation group to be a multiple of this
  /// How far its results may differ from the reference (AMX BF16: see Note [AMX BF16 is
  /// opt-in]); selected only when the caller allows at least this.
  Approximation approximation = Approximation::kExact;

  /// Whether it reads whole 16-row activation tiles (AMX), so the rows past the call's token
  /// rows must be readable zeros (ActBuffer::reserve's `zero_spare`).
  bool whole_tiles() const { return isa == Isa::kAmx; }

  /// Whether it runs matrices of `layout` (the group size condition).
  bool supports(const PackedLayout& layout) const { return layout.group % group_multiple == 0; }

  /// run2 when the variant has it, else run twice.
  void run_pair(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1) const {
    if (run2 != nullptr) {
      run2(l, t0, t1, a, m, d0, d1);
    } else {
      run(l, t0, a, m, d0);
      run(l, t1, a, m, d1);
    }
  }
};

/// Every variant built into this binary, best first, reference variants last.
const std::vector<ExpertGemmVariant>& expert_gemm_variants();

/// The best variant for `dtype` at `max_isa` that accepts `rows` token rows and, when given,
/// `layout`, and approximates no more than `allowed` (never fails: the reference accepts
/// everything).
const ExpertGemmVariant& select_expert_gemm(ExpertDType dtype, Isa max_isa, int64_t rows,
                                            const PackedLayout* layout = nullptr,
                                            Approximation allowed = Approximation::kExact);

}  // namespace tidal::kernels::cpu
