# SPDX-License-Identifier: Apache-2.0
"""Test tolerances in one place (house-style section 3)."""

# Golden logits vs transformers (both fp32 on the same BF16 weights): the bound. Measured max
# difference on the fixtures: ~2e-4 (DeltaNet chunk math reordered vs transformers' chunk kernel).
GOLDEN_LOGITS_ATOL = 1e-3
# Chunked prefill vs one-shot prefill inside tidal: only the DeltaNet chunk boundaries move (fp32
# reassociation of the triangular solve and of the decays). Typical positions agree to ~1e-5; the
# worst of the 131 x 320 logits of the 8-layer qwen3_next fixture differs by 2.4e-4 (measured), so the
# bound is 2x that, still 4x tighter than the transformers bound.
CHUNKED_PREFILL_ATOL = 5e-4

# device="cuda" vs transformers (fp32 activations on BF16 weights), max |logits difference| by
# gpu_precision. Measured worst case over the five fixtures on the H100 (pytest -s prints
# "[cuda-measure]" lines; docs/performance.md "CUDA backend"), bounds about 2x that:
#   fp32:   fp32 GEMMs and KV cache; differs from transformers by summation order only.
#   bf16x2: activations split into two BF16 terms for prefill GEMMs, KV cache in BF16 (rel. 2^-9 per
#           key/value): the cache rounding dominates.
#   bf16:   one BF16 term per activation: rel. 2^-9 per GEMM input. The random-weight fixtures have
#           logit margins down to 1e-3, below that error, so only this bound is checked (no top-1).
#   fp32_vs_cpu: the fp32 mode against tidal's CPU engine (same math, other summation order).
CUDA_LOGITS_ATOL = {"fp32": 1e-3, "bf16x2": 5e-2, "bf16": 2.0, "fp32_vs_cpu": 1e-3}
# One-shot vs chunked prefill on the GPU (default bf16x2): chunking changes which projections run
# through cuBLAS (> 8 tokens) or the fp32 GEMV, and the summation order.
CUDA_CHUNKED_ATOL = 5e-3
