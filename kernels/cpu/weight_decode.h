// SPDX-License-Identifier: Apache-2.0
/// \file weight_decode.h
/// \brief Weights stored in formats tidal does not compute on directly: ggml block types (GGUF
/// files) and FP8 E4M3 with 128 x 128 block scales (official FP8 checkpoints). Rows are decoded to
/// fp32 here; the expert packer and the checkpoint readers build on these.
///
/// Block layouts follow ggml (ggml-common.h / ggml-quants.c); tests/python/test_gguf_blocks.py
/// checks every type against the `gguf` Python package's dequantisation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kernels/common/dtype.h"

namespace tidal::kernels::cpu {

/// ggml type ids (ggml.h: enum ggml_type) of the formats tidal can decode.
enum GgmlType : int32_t {
  kGgmlF32 = 0,
  kGgmlF16 = 1,
  kGgmlQ4_0 = 2,
  kGgmlQ4_1 = 3,
  kGgmlQ5_0 = 6,
  kGgmlQ5_1 = 7,
  kGgmlQ8_0 = 8,
  kGgmlQ2_K = 10,
  kGgmlQ3_K = 11,
  kGgmlQ4_K = 12,
  kGgmlQ5_K = 13,
  kGgmlQ6_K = 14,
  kGgmlBF16 = 30,
};

/// Whether decode_ggml_row() handles ggml type `type`.
bool ggml_decodable(int32_t type);
/// Values per block and bytes per block of a decodable type (0, 0 otherwise).
int64_t ggml_block_values(int32_t type);
int64_t ggml_block_bytes(int32_t type);
/// Bytes of a row of `n` values (n a multiple of the block).
inline size_t ggml_row_bytes(int32_t type, int64_t n) {
  return static_cast<size_t>(n / ggml_block_values(type) * ggml_block_bytes(type));
}
/// The type's ggml name ("Q4_K"), or "type <id>".
std::string_view ggml_type_name(int32_t type);

/// Decodes `n` values (a multiple of the block) of ggml type `type` at `src` into `dst`.
void decode_ggml_row(int32_t type, const void* src, int64_t n, float* dst);

/// Q8_0 and Q4_0 are symmetric with one fp16 scale per 32 values: the integers and the scale bits,
/// so they can be repacked into tidal's INT8/INT4 group-32 formats without loss. `q` receives n
/// integers (Q8_0: [-128, 127]; Q4_0: [-8, 7]), `scales` n / 32 fp16 bit patterns.
bool ggml_is_symmetric32(int32_t type);
void decode_ggml_symmetric32(int32_t type, const void* src, int64_t n, int8_t* q, uint16_t* scales);

/// FP8 E4M3 (float8_e4m3fn: no infinities, 0x7f / 0xff are NaN) bits -> float (exact).
float fp8_e4m3_to_f32(uint8_t bits);
/// float -> FP8 E4M3 bits, round to nearest even; magnitudes beyond 448 saturate to +-448, NaN
/// stays NaN.
uint8_t f32_to_fp8_e4m3(float f);
/// Block-wise FP8 quantisation as the official checkpoints store it: for each `block` x `block`
/// tile of W [rows, cols], s = max|w| / 448 (1 for an all-zero tile), codes = e4m3(w / s), and
/// scale_inv[r / block][c / block] = s (the factor that dequantises).
void quantize_fp8_blocks(const float* w, int64_t rows, int64_t cols, int64_t block, uint8_t* codes,
                         float* scale_inv);

/// A row-major matrix `[rows, cols]` in any format the packers read:
///  - plain: `dtype` kF32 / kBF16 / kF16, row stride `ld` elements;
///  - ggml: `ggml_type` >= 0, rows of ggml_row_bytes(cols) bytes at stride `row_bytes`;
///  - FP8: `dtype` kF8E4M3, stride `ld`, times `scale_inv[(r0 + r) / block][c / block]` (a grid
///    with `scale_ld` columns, F32 or BF16 per `scale_dtype`); `r0` is the row of this matrix
///    within the tensor the scale grid belongs to (an expert's slice of a fused tensor).
struct MatrixSource {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int32_t ggml_type = -1;
  int64_t rows = 0, cols = 0;
  int64_t ld = 0;        ///< elements between rows (plain, FP8)
  size_t row_bytes = 0;  ///< bytes between rows (ggml)
  const void* scale_inv = nullptr;
  DType scale_dtype = DType::kF32;
  int64_t scale_ld = 0, block = 128, r0 = 0;

  /// Decodes row `r` into dst[0, cols).
  void decode_row(int64_t r, float* dst) const;
  /// A plain view (no decoding needed).
  bool plain() const { return ggml_type < 0 && dtype != DType::kF8E4M3; }
  /// Rows [first, first + count) as a source of their own.
  MatrixSource row_slice(int64_t first, int64_t count) const;
};

}  // namespace tidal::kernels::cpu
