// SPDX-License-Identifier: Apache-2.0
/// \file moe_router.h
/// \brief MoE routing (model-spec §3.5): fp32 softmax over all experts, top-k, optional
/// renormalisation.
#pragma once

#include <cstdint>

namespace tidal::kernels::cpu {

/// For each of num_tokens rows of logits (num_tokens, num_experts): ids (num_tokens, top_k) in
/// descending probability (ties: lower expert id first), weights (num_tokens, top_k) = p_i, or
/// p_i / Σ_top-k p when `renormalise`.
void moe_route(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
               bool renormalise, int32_t* ids, float* weights);

}  // namespace tidal::kernels::cpu
