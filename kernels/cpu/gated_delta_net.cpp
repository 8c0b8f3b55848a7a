// SPDX-License-Identifier: Apache-2.0
/// \file gated_delta_net.cpp
/// \brief Causal conv1d with state and the gated delta rule (recurrent and chunked forms).
#include "kernels/cpu/gated_delta_net.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/rms_norm.h"

namespace tidal::kernels::cpu {

void causal_conv1d_silu(const float* src, int64_t num_tokens, int64_t channels, int64_t ksize,
                        const float* weight, float* state, float* dst, Executor& ex) {
  const int64_t hist = ksize - 1;
  // Value of pre-conv input at (relative) time s in [-hist, num_tokens) for channel c.
  auto input = [&](int64_t s, int64_t c) {
    return s >= 0 ? src[s * channels + c] : state[(hist + s) * channels + c];
  };
  ex.parallel_for(channels, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* w = weight + c * ksize;
      for (int64_t t = 0; t < num_tokens; ++t) {
        float acc = 0.f;
        for (int64_t j = 0; j < ksize; ++j) acc += w[j] * input(t - hist + j, c);
        dst[t * channels + c] = silu(acc);
      }
      // New state: the last `hist` inputs of [state; src], oldest first (read before overwriting).
      float buf[kMaxConvKernel];
      for (int64_t j = 0; j < hist; ++j) buf[j] = input(num_tokens - hist + j, c);
      for (int64_t j = 0; j < hist; ++j) state[j * channels + c] = buf[j];
    }
  });
}

void delta_rule_recurrent(const DeltaRuleArgs& a, Executor& ex) {
  const int64_t rho = a.num_v_heads / a.num_k_heads;
  const int64_t dk = a.d_k, dv = a.d_v;
  ex.parallel_for(a.num_v_heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> delta(static_cast<size_t>(dv));
    for (int64_t h = h0; h < h1; ++h) {
      float* S = a.state + h * dk * dv;  // [i][j]
      const int64_t kh = h / rho;
      for (int64_t t = 0; t < a.num_tokens; ++t) {
        const float* q = a.q + (t * a.num_k_heads + kh) * dk;
        const float* k = a.k + (t * a.num_k_heads + kh) * dk;
        const float* v = a.v + (t * a.num_v_heads + h) * dv;
        const float decay = std::exp(a.g[t * a.num_v_heads + h]);
        const float beta = a.beta[t * a.num_v_heads + h];
        for (int64_t x = 0; x < dk * dv; ++x) S[x] *= decay;
        for (int64_t j = 0; j < dv; ++j) {
          float mem = 0.f;
          for (int64_t i = 0; i < dk; ++i) mem += S[i * dv + j] * k[i];
          delta[j] = beta * (v[j] - mem);
        }
        for (int64_t i = 0; i < dk; ++i)
          for (int64_t j = 0; j < dv; ++j) S[i * dv + j] += k[i] * delta[j];
        float* o = a.out + (t * a.num_v_heads + h) * dv;
        for (int64_t j = 0; j < dv; ++j) {
          float acc = 0.f;
          for (int64_t i = 0; i < dk; ++i) acc += S[i * dv + j] * q[i];
          o[j] = acc;
        }
      }
    }
  });
}

// See model-spec §3.4 "Chunked prefill". Per chunk of c tokens with cumulative log decay γ:
//   A_ts = β_t (k_t·k_s) e^{γ_t−γ_s} (s < t);  (I + A) U = diag(β) V;  (I + A) W = diag(β e^γ) K
//   V' = U − W S;  O = diag(e^γ) Q S + (Q Kᵀ ⊙ Γ) V';  S ← e^{γ_c} S + Σ_t e^{γ_c−γ_t} k_t V'_tᵀ
void delta_rule_chunked(const DeltaRuleArgs& a, Executor& ex) {
  const int64_t rho = a.num_v_heads / a.num_k_heads;
  const int64_t dk = a.d_k, dv = a.d_v, C = kDeltaRuleChunk;
  ex.parallel_for(a.num_v_heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> gam(C), A(C * C), U(C * dv), W(C * dk), S_new(dk * dv);
    for (int64_t h = h0; h < h1; ++h) {
      float* S = a.state + h * dk * dv;
      const int64_t kh = h / rho;
      auto qrow = [&](int64_t t) { return a.q + (t * a.num_k_heads + kh) * dk; };
      auto krow = [&](int64_t t) { return a.k + (t * a.num_k_heads + kh) * dk; };
      auto vrow = [&](int64_t t) { return a.v + (t * a.num_v_heads + h) * dv; };
      for (int64_t c0 = 0; c0 < a.num_tokens; c0 += C) {
        const int64_t c = std::min(C, a.num_tokens - c0);
        float acc_g = 0.f;
        for (int64_t t = 0; t < c; ++t) {
          acc_g += a.g[(c0 + t) * a.num_v_heads + h];
          gam[t] = acc_g;
        }
        // A (strictly lower) and the two triangular solves, row by row (forward substitution).
        for (int64_t t = 0; t < c; ++t) {
          const float bt = a.beta[(c0 + t) * a.num_v_heads + h];
          const float* kt = krow(c0 + t);
          for (int64_t s = 0; s < t; ++s) {
            const float* ks = krow(c0 + s);
            float dot = 0.f;
            for (int64_t i = 0; i < dk; ++i) dot += kt[i] * ks[i];
            A[t * C + s] = bt * dot * std::exp(gam[t] - gam[s]);
          }
          float* u = &U[t * dv];
          float* w = &W[t * dk];
          const float* vt = vrow(c0 + t);
          const float eg = std::exp(gam[t]);
          for (int64_t j = 0; j < dv; ++j) u[j] = bt * vt[j];
          for (int64_t i = 0; i < dk; ++i) w[i] = bt * eg * kt[i];
          for (int64_t s = 0; s < t; ++s) {
            const float ats = A[t * C + s];
            const float* us = &U[s * dv];
            const float* ws = &W[s * dk];
            for (int64_t j = 0; j < dv; ++j) u[j] -= ats * us[j];
            for (int64_t i = 0; i < dk; ++i) w[i] -= ats * ws[i];
          }
        }
        // V' = U − W S, stored over U.
        for (int64_t t = 0; t < c; ++t) {
          float* u = &U[t * dv];
          const float* w = &W[t * dk];
          for (int64_t i = 0; i < dk; ++i) {
            const float wi = w[i];
            const float* Si = S + i * dv;
            for (int64_t j = 0; j < dv; ++j) u[j] -= wi * Si[j];
          }
        }
        // O = diag(e^γ) Q S + (Q Kᵀ ⊙ Γ) V'.
        for (int64_t t = 0; t < c; ++t) {
          const float* qt = qrow(c0 + t);
          float* o = a.out + ((c0 + t) * a.num_v_heads + h) * dv;
          const float eg = std::exp(gam[t]);
          for (int64_t j = 0; j < dv; ++j) o[j] = 0.f;
          for (int64_t i = 0; i < dk; ++i) {
            const float qi = qt[i] * eg;
            const float* Si = S + i * dv;
            for (int64_t j = 0; j < dv; ++j) o[j] += qi * Si[j];
          }
          for (int64_t s = 0; s <= t; ++s) {
            const float* ks = krow(c0 + s);
            float dot = 0.f;
            for (int64_t i = 0; i < dk; ++i) dot += qt[i] * ks[i];
            const float coef = dot * std::exp(gam[t] - gam[s]);
            const float* us = &U[s * dv];
            for (int64_t j = 0; j < dv; ++j) o[j] += coef * us[j];
          }
        }
        // S ← e^{γ_c} S + Σ_t e^{γ_c − γ_t} k_t V'_tᵀ.
        const float gc = gam[c - 1];
        const float ec = std::exp(gc);
        for (int64_t x = 0; x < dk * dv; ++x) S_new[x] = ec * S[x];
        for (int64_t t = 0; t < c; ++t) {
          const float* kt = krow(c0 + t);
          const float f = std::exp(gc - gam[t]);
          const float* us = &U[t * dv];
          for (int64_t i = 0; i < dk; ++i) {
            const float ki = f * kt[i];
            float* Si = &S_new[i * dv];
            for (int64_t j = 0; j < dv; ++j) Si[j] += ki * us[j];
          }
        }
        std::copy(S_new.begin(), S_new.end(), S);
      }
    }
  });
}

}  // namespace tidal::kernels::cpu
