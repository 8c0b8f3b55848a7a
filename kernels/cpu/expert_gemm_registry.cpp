// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_registry.cpp
/// \brief The ordered list of expert tile-kernel variants (best first, reference last) and the
/// selection walk over it.
#include <stdexcept>
#include <string>

#include "kernels/cpu/expert_gemm_ref.h"

namespace tidal::kernels::cpu {
namespace {

// Below these token counts per expert the AVX-512 kernels beat AMX, which computes whole 16-token
// blocks. Single-thread micro-benchmark on the GPU machine's Xeon (tidal_bench_experts --micro,
// docs/results/cpu-experts-2026-11-23/micro.jsonl; K = 2048, weights in L2): INT8 VNNI 1.0 us per
// 16-row tile at 4 tokens, 2.1 us at 8; AMX (two tiles per call) 3.3 us at 16 tokens, 7.1 at 32,
// 15.9 at 64, i.e. 1.7 / 3.5 / 8.0 us per tile against ~4.2 / 8.4 / 17 for VNNI.
constexpr int64_t kAmxMinRowsBf16 = 2;
constexpr int64_t kAmxMinRowsInt = 16;
// Note [AMX BF16 is opt-in]
// AMX tdpbf16ps with hi + lo activations agrees with the fp32 kernels to ~1e-5 per dot product, but
// on the GPU machine's Xeon the 8-layer random-init qwen3_next golden model's prefill logits then
// moved 1.4e-3 from transformers (bound 1e-3) and 1.5e-3 from token-by-token decoding (bound
// 5e-4), against 1.2e-4 with the fp32 kernels: its near-tied routers amplify the difference. The
// INT8/INT4 AMX path is bit-identical to VNNI and always on; BF16 AMX runs when the caller allows
// approximate kernels: the hi + lo kernel at Approximation::kSplit (MoeExperts::
// set_allow_approximate, TIDAL_EXPERT_AMX_BF16=1 or split), the bf16-activation kernel
// (amx_bf16_act, one product per tile) at kBf16Activations (set_approximation,
// TIDAL_EXPERT_AMX_BF16=bf16).
// tdpbsud B tiles span 64 columns: the INT groups must be multiples of 64.
constexpr int64_t kAmxIntGroup = 64;

}  // namespace

Approximation parse_approximation(std::string_view s) {
  if (s.empty() || s == "0") return Approximation::kExact;
  if (s == "1" || s == "split") return Approximation::kSplit;
  if (s == "bf16") return Approximation::kBf16Activations;
  throw std::invalid_argument("TIDAL_EXPERT_AMX_BF16: unknown value '" + std::string(s) +
                              "' (accepted: 0, 1 or split, bf16)");
}

const std::vector<ExpertGemmVariant>& expert_gemm_variants() {
  using enum ExpertDType;
  static const std::vector<ExpertGemmVariant> v = {
      {"amx_bf16_act", Isa::kAmx, kBF16, ActKind::kBf16, kAmxMinRowsBf16, amx::tile_bf16_act,
       amx::tile2_bf16_act, 1, Approximation::kBf16Activations},
      {"amx_bf16", Isa::kAmx, kBF16, ActKind::kBf16Split, kAmxMinRowsBf16, amx::tile_bf16,
       amx::tile2_bf16, 1, Approximation::kSplit},
      {"amx_int8", Isa::kAmx, kINT8, ActKind::kInt8Groups, kAmxMinRowsInt, amx::tile_int8,
       amx::tile2_int8, kAmxIntGroup},
      {"amx_int4", Isa::kAmx, kINT4, ActKind::kInt8Groups, kAmxMinRowsInt, amx::tile_int4,
       amx::tile2_int4, kAmxIntGroup},
      {"avx512_bf16", Isa::kAvx512, kBF16, ActKind::kF32, 1, avx512::tile_bf16},
      {"avx512_vnni_int8", Isa::kAvx512, kINT8, ActKind::kInt8Groups, 1, avx512::tile_int8,
       avx512::tile2_int8},
      {"avx512_vnni_int4", Isa::kAvx512, kINT4, ActKind::kInt8Groups, 1, avx512::tile_int4,
       avx512::tile2_int4},
      {"avx2_bf16", Isa::kAvx2, kBF16, ActKind::kF32, 1, avx2::tile_bf16},
      {"avx2_int8", Isa::kAvx2, kINT8, ActKind::kInt8Groups, 1, avx2::tile_int8},
      {"avx2_int4", Isa::kAvx2, kINT4, ActKind::kInt8Groups, 1, avx2::tile_int4},
      {"ref_bf16", Isa::kRef, kBF16, ActKind::kF32, 1, ref::tile_f32},
      {"ref_int8", Isa::kRef, kINT8, ActKind::kInt8Groups, 1, ref::tile_int8_groups},
      {"ref_int4", Isa::kRef, kINT4, ActKind::kInt8Groups, 1, ref::tile_int8_groups},
  };
  return v;
}

const ExpertGemmVariant& select_expert_gemm(ExpertDType dtype, Isa max_isa, int64_t rows,
                                            const PackedLayout* layout, Approximation allowed) {
  for (const auto& v : expert_gemm_variants()) {
    if (v.dtype != dtype || static_cast<int>(v.isa) > static_cast<int>(max_isa)) continue;
    if (rows < v.min_rows) continue;
    if (layout != nullptr && !v.supports(*layout)) continue;
    if (static_cast<int>(v.approximation) > static_cast<int>(allowed)) continue;
    return v;
  }
  throw std::logic_error("no expert_gemm variant for this dtype");  // unreachable: ref accepts all
}

}  // namespace tidal::kernels::cpu
