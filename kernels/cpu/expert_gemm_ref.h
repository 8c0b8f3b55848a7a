// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_ref.h
/// \brief Scalar reference tile kernels of expert_gemm.h, and the declarations of the ISA variants
/// (each defined in its own file, compiled with that ISA's flags only).
#pragma once

#include "kernels/cpu/expert_gemm.h"

namespace tidal::kernels::cpu {
namespace ref {
/// BF16 weights, fp32 activations (kF32): Σ w·x in fp64.
void tile_f32(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
/// INT8/INT4 weights, kInt8Groups activations: Σ_g s_w s_x Σ_{c∈g} q_w q_x (exact integer sums).
void tile_int8_groups(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
                      float* dst);
}  // namespace ref

namespace avx2 {
void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
/// h[i] = silu(g[i]) · u[i], vectorised exp (~2 ulp), as avx512::silu_mul.
void silu_mul(const float* g, const float* u, float* h, int64_t n);
/// ActBuffer::prepare for kInt8Groups, bit-identical to the scalar code (group 32, 64 or 128).
void prepare_int8(const float* x, int64_t k, int64_t group, int64_t num_groups, int8_t* q,
                  float* scale, int32_t* sum);
}  // namespace avx2

namespace avx512 {
void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
/// Two tiles against the same activations: one pass at one token (Note [Two tiles per pass at
/// decode]), two single passes otherwise; the same results either way.
void tile2_int8(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1);
void tile2_int4(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1);
/// h[i] = silu(g[i]) · u[i], vectorised exp (~2 ulp).
void silu_mul(const float* g, const float* u, float* h, int64_t n);
/// ActBuffer::prepare for kBf16Split (hi into dst, lo; lo null: kBf16) and kInt8Groups,
/// bit-identical to the scalar code.
void prepare_bf16(const float* x, int64_t k, int64_t k_pad, uint16_t* dst, uint16_t* lo);
void prepare_int8(const float* x, int64_t k, int64_t group, int64_t num_groups, int8_t* q,
                  float* scale, int32_t* sum);
}  // namespace avx512

namespace amx {
/// Process-wide knobs of the AMX kernels, for benchmarks and tests; results do not depend on
/// them. The INT group epilogue one group late (Note [AMX group epilogue one group late]; default
/// on, TIDAL_AMX_LATE_EPILOGUE=0 turns it off), and software prefetch of the weight stream `ahead`
/// bytes ahead (0: none, the default; TIDAL_AMX_PREFETCH) into L1, or L2 with `l2`
/// (TIDAL_AMX_PREFETCH_L2=1).
void set_late_epilogue(bool on);
bool late_epilogue();
void set_prefetch(int64_t ahead, bool l2);
/// BF16 with kBf16Split activations (tile_bf16) or kBf16 (tile_bf16_act); INT8/INT4 with
/// kInt8Groups (groups of 64 or 128).
void tile_bf16(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_bf16_act(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m,
                   float* dst);
void tile_int8(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
void tile_int4(const PackedLayout& l, const uint8_t* tile, const ActRows& a, int64_t m, float* dst);
/// Two tiles against the same activations (gate and up, or two adjacent down tiles).
void tile2_bf16(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1);
void tile2_bf16_act(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                    int64_t m, float* d0, float* d1);
void tile2_int8(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1);
void tile2_int4(const PackedLayout& l, const uint8_t* t0, const uint8_t* t1, const ActRows& a,
                int64_t m, float* d0, float* d1);
}  // namespace amx

}  // namespace tidal::kernels::cpu
