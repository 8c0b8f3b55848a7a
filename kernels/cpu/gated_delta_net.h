// SPDX-License-Identifier: Apache-2.0
/// \file gated_delta_net.h
/// \brief Gated DeltaNet pieces (model-spec §3.4): causal depthwise conv with state, and the gated
/// delta rule in its recurrent (decode, definition) and chunked (prefill) forms.
#pragma once

#include <cstdint>

#include "kernels/common/executor.h"

namespace tidal::kernels::cpu {

/// Largest conv kernel the conv kernel keeps its per-channel history for on the stack (released
/// models use 4); the config parser rejects larger ones.
constexpr int64_t kMaxConvKernel = 16;

/// Causal depthwise conv1d + SiLU over `channels` channels with kernel `ksize`.
/// src (num_tokens, channels), dst (num_tokens, channels) (may not alias src), weight (channels,
/// ksize), state (ksize − 1, channels): the last ksize − 1 pre-conv inputs, oldest first; updated
/// in place.
void causal_conv1d_silu(const float* src, int64_t num_tokens, int64_t channels, int64_t ksize,
                        const float* weight, float* state, float* dst, Executor& ex);

/// Inputs of the gated delta rule for num_tokens tokens.
/// q, k: (num_tokens, num_k_heads, d_k), already l2-normalised (q also scaled by 1/sqrt(d_k));
/// v: (num_tokens, num_v_heads, d_v); g, beta: (num_tokens, num_v_heads) (g = log decay ≤ 0);
/// state: (num_v_heads, d_k, d_v) fp32, carried in and out; out: (num_tokens, num_v_heads, d_v).
/// Value head h uses key head h / (num_v_heads / num_k_heads).
struct DeltaRuleArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* g = nullptr;
  const float* beta = nullptr;
  float* state = nullptr;
  float* out = nullptr;
  int64_t num_tokens = 0;
  int64_t num_k_heads = 0;
  int64_t num_v_heads = 0;
  int64_t d_k = 0;
  int64_t d_v = 0;
};

/// Token-by-token recurrence (the definition): S ← e^g S; δ = β (v − Sᵀk); S ← S + k δᵀ; o = Sᵀ q.
void delta_rule_recurrent(const DeltaRuleArgs& args, Executor& ex);

/// Chunk size of the chunked form; the math is the same for any chunk size (transformers uses 64).
constexpr int64_t kDeltaRuleChunk = 64;

/// Chunked (WY) form of the same recurrence, for prefill; equal to the recurrent form up to fp32
/// rounding for any split of the tokens.
void delta_rule_chunked(const DeltaRuleArgs& args, Executor& ex);

}  // namespace tidal::kernels::cpu
