// SPDX-License-Identifier: Apache-2.0
/// \file attention.h
/// \brief Causal grouped-query attention of new query tokens against a KV cache (model-spec §3.3).
#pragma once

#include <cstdint>

#include "kernels/common/executor.h"

namespace tidal::kernels::cpu {

/// q: (num_q, num_heads, head_dim), row stride ld_q. k_cache, v_cache: (num_kv_tokens,
/// num_kv_heads, head_dim) contiguous; query t sits at position q_pos0 + t and sees cache rows [0,
/// q_pos0 + t]. dst: (num_q, num_heads * head_dim) contiguous. Query head h reads KV head h /
/// (num_heads / num_kv_heads).
struct AttentionArgs {
  const float* q = nullptr;
  int64_t ld_q = 0;
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  float* dst = nullptr;
  int64_t num_q = 0;
  int64_t q_pos0 = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  float scale = 1.0f;
};

/// fp32 softmax(q·kᵀ · scale) · v, one task per (token, head).
void attention(const AttentionArgs& args, Executor& ex);

}  // namespace tidal::kernels::cpu
