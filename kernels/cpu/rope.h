// SPDX-License-Identifier: Apache-2.0
/// \file rope.h
/// \brief Partial rotary position embedding, rotate-half (NeoX) pairing (model-spec §3.3).
#pragma once

#include <cstdint>
#include <vector>

namespace tidal::kernels::cpu {

/// Rotary tables for `rotary_dim` dims: inv_freq (rotary_dim / 2) and the cos/sin scale α (YaRN).
struct RopeTable {
  std::vector<float> inv_freq;
  float attention_factor = 1.0f;
  int64_t rotary_dim = 0;
};

/// Default RoPE: inv_freq_i = θ^(−2i / r_d).
RopeTable rope_table_default(double theta, int64_t rotary_dim);

/// YaRN (static) as in transformers 5.x `_compute_yarn_parameters`; see model-spec §3.3 item 4.
/// `attention_factor` < 0 means "derive from factor / mscale / mscale_all_dim".
RopeTable rope_table_yarn(double theta, int64_t rotary_dim, double factor, double original_max_pos,
                          double beta_fast, double beta_slow, bool truncate,
                          double attention_factor, double mscale, double mscale_all_dim);

/// Rotates the first rotary_dim dims of each head of x (num_tokens, num_heads, head_dim), row
/// stride `ld` floats, token t at absolute position pos0 + t.
void rope_apply(float* x, int64_t num_tokens, int64_t ld, int64_t num_heads, int64_t head_dim,
                int64_t pos0, const RopeTable& table);

}  // namespace tidal::kernels::cpu
