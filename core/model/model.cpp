// SPDX-License-Identifier: Apache-2.0
/// \file model.cpp
/// \brief Weight binding and the forward pass: embedding, decoder layers (gated attention, Gated
/// DeltaNet, MoE with shared expert), final norm and lm_head. fp32 activations throughout.
#include "core/model/model.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "core/error.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gated_delta_net.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/moe_router.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope.h"

namespace tidal::core {
namespace kc = kernels::cpu;
using kernels::Executor;
using kernels::WeightView;

struct Model::Rope {
  kc::RopeTable table;
};

// L2-normalisation epsilon of the DeltaNet q/k (fixed in transformers, not rms_norm_eps).
constexpr float kL2NormEps = 1e-6f;

Model::~Model() = default;

Model::Model(const ModelConfig& cfg, const Checkpoint& ck, std::shared_ptr<RoutedExperts> experts,
             const CudaOptions* cuda, kernels::Executor* ex)
    : cfg_(cfg),
      owned_(std::make_shared<OwnedWeights>()),
      experts_(std::move(experts)),
      routing_(std::make_shared<RoutingControl>(cfg.num_hidden_layers, cfg.num_experts,
                                                cfg.num_experts_per_tok)) {
  WeightLoader ld(ck, owned_);
  const auto& c = cfg_;
  const std::string P = c.weight_prefix;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const std::string hv = fmt::format("vocab_size={}, hidden_size={}", V, H);
  embed_tokens_ = ld.matrix(P + "embed_tokens.weight", V, H, hv);
  final_norm_ = ld.vector_f32(P + "norm.weight", {H}, fmt::format("hidden_size={}", H));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_tokens_;
  } else {
    lm_head_ = ld.matrix("lm_head.weight", V, H, hv + ", tie_word_embeddings=false");
  }
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, d = c.head_dim;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights w;
    w.type = c.layer_types[l];
    const std::string L = fmt::format("{}layers.{}.", P, l);
    const std::string hs = fmt::format("hidden_size={}", H);
    w.input_layernorm = ld.vector_f32(L + "input_layernorm.weight", {H}, hs);
    w.post_attention_layernorm = ld.vector_f32(L + "post_attention_layernorm.weight", {H}, hs);
    if (w.type == LayerType::kFullAttention) {
      const std::string why = fmt::format(
          "hidden_size={}, num_attention_heads={}, num_key_value_heads={}, head_dim={}{}", H, nh,
          nkv, d, c.is_hybrid() ? ", query and gate per head" : "");
      auto& a = w.attn;
      a.q_proj = ld.matrix(L + "self_attn.q_proj.weight", nh * d * (c.is_hybrid() ? 2 : 1), H, why);
      a.k_proj = ld.matrix(L + "self_attn.k_proj.weight", nkv * d, H, why);
      a.v_proj = ld.matrix(L + "self_attn.v_proj.weight", nkv * d, H, why);
      a.o_proj = ld.matrix(L + "self_attn.o_proj.weight", H, nh * d, why);
      a.q_norm = ld.vector_f32(L + "self_attn.q_norm.weight", {d}, why);
      a.k_norm = ld.vector_f32(L + "self_attn.k_norm.weight", {d}, why);
    } else {
      const int64_t nk = c.linear_num_key_heads, nv = c.linear_num_value_heads,
                    dk = c.linear_key_head_dim, dv = c.linear_value_head_dim,
                    K = c.linear_conv_kernel_dim, C = c.linear_conv_channels();
      const std::string why = fmt::format(
          "hidden_size={}, linear_num_key_heads={}, linear_num_value_heads={}, "
          "linear_key_head_dim={}, "
          "linear_value_head_dim={}, linear_conv_kernel_dim={}",
          H, nk, nv, dk, dv, K);
      auto& g = w.gdn;
      const std::string A = L + "linear_attn.";
      if (c.family == ArchFamily::kQwen3Next) {
        g.in_proj_qkvz = ld.matrix(A + "in_proj_qkvz.weight", 2 * nk * dk + 2 * nv * dv, H, why);
        g.in_proj_ba = ld.matrix(A + "in_proj_ba.weight", 2 * nv, H, why);
      } else {
        g.in_proj_qkv = ld.matrix(A + "in_proj_qkv.weight", C, H, why);
        g.in_proj_z = ld.matrix(A + "in_proj_z.weight", nv * dv, H, why);
        g.in_proj_b = ld.matrix(A + "in_proj_b.weight", nv, H, why);
        g.in_proj_a = ld.matrix(A + "in_proj_a.weight", nv, H, why);
      }
      g.conv1d = ld.vector_f32(A + "conv1d.weight", {C, 1, K}, why);
      g.dt_bias = ld.vector_f32(A + "dt_bias", {nv}, why);
      g.A_log = ld.vector_f32(A + "A_log", {nv}, why);
      g.norm = ld.vector_f32(A + "norm.weight", {dv}, why);
      g.out_proj = ld.matrix(A + "out_proj.weight", H, nv * dv, why);
    }
    auto& m = w.mlp;
    m.is_moe = c.layer_is_moe[l];
    if (m.is_moe) {
      const std::string why = fmt::format("hidden_size={}, num_experts={}", H, c.num_experts);
      m.router = ld.matrix(L + "mlp.gate.weight", c.num_experts, H, why);
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t Is = c.shared_expert_intermediate_size;
        const std::string sw =
            fmt::format("hidden_size={}, shared_expert_intermediate_size={}", H, Is);
        m.shared_gate_proj = ld.matrix(L + "mlp.shared_expert.gate_proj.weight", Is, H, sw);
        m.shared_up_proj = ld.matrix(L + "mlp.shared_expert.up_proj.weight", Is, H, sw);
        m.shared_down_proj = ld.matrix(L + "mlp.shared_expert.down_proj.weight", H, Is, sw);
        m.shared_expert_gate = ld.vector_f32(L + "mlp.shared_expert_gate.weight", {1, H}, sw);
      }
    } else {
      const int64_t I = c.intermediate_size;
      const std::string why =
          fmt::format("hidden_size={}, intermediate_size={} (dense MLP layer)", H, I);
      m.gate_proj = ld.matrix(L + "mlp.gate_proj.weight", I, H, why);
      m.up_proj = ld.matrix(L + "mlp.up_proj.weight", I, H, why);
      m.down_proj = ld.matrix(L + "mlp.down_proj.weight", H, I, why);
    }
    layers_.push_back(std::move(w));
  }
  auto rope = std::make_shared<Rope>();
  const auto& r = c.rope;
  rope->table =
      r.rope_type == "yarn"
          ? kc::rope_table_yarn(r.rope_theta, c.rotary_dim, r.factor,
                                r.original_max_position_embeddings, r.beta_fast, r.beta_slow,
                                r.truncate, r.attention_factor, r.mscale, r.mscale_all_dim)
          : kc::rope_table_default(r.rope_theta, c.rotary_dim);
  rope_ = rope;
  if (cuda) {
#if TIDAL_WITH_CUDA
    HostWeights hw;
    hw.embed_tokens = embed_tokens_;
    hw.lm_head = lm_head_;
    hw.final_norm = &final_norm_;
    hw.layers = &layers_;
    hw.rope_inv_freq = rope->table.inv_freq;
    hw.rope_scale = rope->table.attention_factor;
    TIDAL_ASSERT(ex != nullptr, "the CUDA model needs an executor");
    cuda_ = std::make_unique<CudaModel>(cfg_, hw, experts_.get(), routing_.get(), *cuda, *ex);
    cuda_->set_trace(trace_.get());
#else
    throw InvalidArgument(
        "device=\"cuda\": this build of tidal has no CUDA support (built without nvcc); use "
        "device=\"cpu\"");
#endif
  }
}

SequenceState Model::new_state() const {
  SequenceState s;
  s.layers.resize(layers_.size());
#if TIDAL_WITH_CUDA
  if (cuda_) {
    s.device = cuda_->new_state();
    return s;
  }
#endif
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].type == LayerType::kLinearAttention) {
      s.layers[l].conv.assign(
          static_cast<size_t>((cfg_.linear_conv_kernel_dim - 1) * cfg_.linear_conv_channels()),
          0.f);
      s.layers[l].recurrent.assign(
          static_cast<size_t>(cfg_.linear_num_value_heads * cfg_.linear_key_head_dim *
                              cfg_.linear_value_head_dim),
          0.f);
    }
  }
  return s;
}

namespace {

void norm_rows(const float* x, const std::vector<float>& w, float* y, int64_t T, int64_t dim,
               int64_t ld, float eps, kc::NormScale scale) {
  for (int64_t t = 0; t < T; ++t)
    kc::rms_norm_row(x + t * ld, w.data(), y + t * ld, dim, eps, scale);
}

/// out (T, H) = down( silu(gate x) ⊙ up x ).
void swiglu(const float* x, int64_t T, const WeightView& gate, const WeightView& up,
            const WeightView& down, float* out, Executor& ex, kernels::Isa isa) {
  const int64_t I = gate.rows;
  std::vector<float> g(static_cast<size_t>(T * I)), u(static_cast<size_t>(T * I));
  kc::linear(x, T, gate, g.data(), ex, false, isa);
  kc::linear(x, T, up, u.data(), ex, false, isa);
  for (int64_t i = 0; i < T * I; ++i) g[i] = kc::silu(g[i]) * u[i];
  kc::linear(g.data(), T, down, out, ex, false, isa);
}

}  // namespace

void Model::attention_layer(const LayerWeights& w, LayerState& ls, int64_t pos0, const float* xn,
                            int64_t T, float* out, Executor& ex) const {
  const auto& c = cfg_;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, d = c.head_dim;
  const bool gated = c.is_hybrid();
  const auto scale = gated ? kc::NormScale::kZeroCentred : kc::NormScale::kPlain;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t qw = w.attn.q_proj.rows;  // nh·d, or 2·nh·d with the gate
  std::vector<float> qg(static_cast<size_t>(T * qw));
  kc::linear(xn, T, w.attn.q_proj, qg.data(), ex, false, cpu_isa_);
  // q: (T, nh, d) rows of stride nh·d; gate: (T, nh·d). The hybrid q_proj packs [q_h | gate_h] per
  // head.
  std::vector<float> q(static_cast<size_t>(T * nh * d)),
      gate(gated ? static_cast<size_t>(T * nh * d) : 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nh; ++h) {
      const float* src = qg.data() + t * qw + h * d * (gated ? 2 : 1);
      std::copy(src, src + d, q.data() + (t * nh + h) * d);
      if (gated) std::copy(src + d, src + 2 * d, gate.data() + (t * nh + h) * d);
    }
  const size_t old = ls.k_cache.size();
  ls.k_cache.resize(old + static_cast<size_t>(T * nkv * d));
  ls.v_cache.resize(old + static_cast<size_t>(T * nkv * d));
  float* k_new = ls.k_cache.data() + old;
  float* v_new = ls.v_cache.data() + old;
  kc::linear(xn, T, w.attn.k_proj, k_new, ex, false, cpu_isa_);
  kc::linear(xn, T, w.attn.v_proj, v_new, ex, false, cpu_isa_);
  norm_rows(q.data(), w.attn.q_norm, q.data(), T * nh, d, d, eps, scale);
  norm_rows(k_new, w.attn.k_norm, k_new, T * nkv, d, d, eps, scale);
  kc::rope_apply(q.data(), T, nh * d, nh, d, pos0, rope_->table);
  kc::rope_apply(k_new, T, nkv * d, nkv, d, pos0, rope_->table);
  std::vector<float> o(static_cast<size_t>(T * nh * d));
  kc::AttentionArgs args;
  args.q = q.data();
  args.ld_q = nh * d;
  args.k_cache = ls.k_cache.data();
  args.v_cache = ls.v_cache.data();
  args.dst = o.data();
  args.num_q = T;
  args.q_pos0 = pos0;
  args.num_heads = nh;
  args.num_kv_heads = nkv;
  args.head_dim = d;
  args.scale = 1.0f / std::sqrt(static_cast<float>(d));
  kc::attention(args, ex);
  if (gated)
    for (size_t i = 0; i < o.size(); ++i) o[i] *= kc::sigmoid(gate[i]);
  kc::linear(o.data(), T, w.attn.o_proj, out, ex, false, cpu_isa_);
}

void Model::delta_net_layer(const LayerWeights& w, LayerState& ls, const float* xn, int64_t T,
                            float* out, Executor& ex) const {
  const auto& c = cfg_;
  const auto& g = w.gdn;
  const int64_t nk = c.linear_num_key_heads, nv = c.linear_num_value_heads,
                dk = c.linear_key_head_dim, dv = c.linear_value_head_dim, rho = nv / nk,
                C = c.linear_conv_channels(), K = c.linear_conv_kernel_dim;
  std::vector<float> m(static_cast<size_t>(T * C)), z(static_cast<size_t>(T * nv * dv)),
      b(static_cast<size_t>(T * nv)), a(static_cast<size_t>(T * nv));
  if (c.family == ArchFamily::kQwen3Next) {
    // Per key head g: [q_g | k_g | v_{gρ..gρ+ρ−1} | z_{gρ..}]; in_proj_ba per key head: [b(ρ) |
    // a(ρ)].
    const int64_t gw = 2 * dk + 2 * rho * dv;
    std::vector<float> p(static_cast<size_t>(T * nk * gw)), ba(static_cast<size_t>(T * 2 * nv));
    kc::linear(xn, T, g.in_proj_qkvz, p.data(), ex, false, cpu_isa_);
    kc::linear(xn, T, g.in_proj_ba, ba.data(), ex, false, cpu_isa_);
    for (int64_t t = 0; t < T; ++t) {
      const float* pt = p.data() + t * nk * gw;
      float* mt = m.data() + t * C;
      for (int64_t kh = 0; kh < nk; ++kh) {
        const float* grp = pt + kh * gw;
        std::copy(grp, grp + dk, mt + kh * dk);
        std::copy(grp + dk, grp + 2 * dk, mt + nk * dk + kh * dk);
        for (int64_t j = 0; j < rho; ++j) {
          const int64_t vh = kh * rho + j;
          std::copy(grp + 2 * dk + j * dv, grp + 2 * dk + (j + 1) * dv, mt + 2 * nk * dk + vh * dv);
          std::copy(grp + 2 * dk + rho * dv + j * dv, grp + 2 * dk + rho * dv + (j + 1) * dv,
                    z.data() + (t * nv + vh) * dv);
          b[t * nv + vh] = ba[t * 2 * nv + 2 * rho * kh + j];
          a[t * nv + vh] = ba[t * 2 * nv + 2 * rho * kh + rho + j];
        }
      }
    }
  } else {
    kc::linear(xn, T, g.in_proj_qkv, m.data(), ex, false, cpu_isa_);
    kc::linear(xn, T, g.in_proj_z, z.data(), ex, false, cpu_isa_);
    kc::linear(xn, T, g.in_proj_b, b.data(), ex, false, cpu_isa_);
    kc::linear(xn, T, g.in_proj_a, a.data(), ex, false, cpu_isa_);
  }
  std::vector<float> u(static_cast<size_t>(T * C));
  kc::causal_conv1d_silu(m.data(), T, C, K, g.conv1d.data(), ls.conv.data(), u.data(), ex);
  std::vector<float> q(static_cast<size_t>(T * nk * dk)), k(q.size()),
      v(static_cast<size_t>(T * nv * dv));
  const float qscale = 1.0f / std::sqrt(static_cast<float>(dk));
  for (int64_t t = 0; t < T; ++t) {
    const float* ut = u.data() + t * C;
    for (int64_t kh = 0; kh < nk; ++kh) {
      for (int which = 0; which < 2; ++which) {
        const float* src = ut + which * nk * dk + kh * dk;
        float* dst = (which == 0 ? q.data() : k.data()) + (t * nk + kh) * dk;
        double ss = 0.0;
        for (int64_t i = 0; i < dk; ++i) ss += static_cast<double>(src[i]) * src[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss) + kL2NormEps);
        const float f = which == 0 ? inv * qscale : inv;
        for (int64_t i = 0; i < dk; ++i) dst[i] = src[i] * f;
      }
    }
    std::copy(ut + 2 * nk * dk, ut + C, v.data() + t * nv * dv);
  }
  std::vector<float> beta(static_cast<size_t>(T * nv)), gl(static_cast<size_t>(T * nv));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nv; ++h) {
      beta[t * nv + h] = kc::sigmoid(b[t * nv + h]);
      gl[t * nv + h] = -std::exp(g.A_log[h]) * kc::softplus(a[t * nv + h] + g.dt_bias[h]);
    }
  std::vector<float> o(static_cast<size_t>(T * nv * dv));
  kc::DeltaRuleArgs args;
  args.q = q.data();
  args.k = k.data();
  args.v = v.data();
  args.g = gl.data();
  args.beta = beta.data();
  args.state = ls.recurrent.data();
  args.out = o.data();
  args.num_tokens = T;
  args.num_k_heads = nk;
  args.num_v_heads = nv;
  args.d_k = dk;
  args.d_v = dv;
  if (T == 1)
    kc::delta_rule_recurrent(args, ex);
  else
    kc::delta_rule_chunked(args, ex);
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t r = 0; r < T * nv; ++r)
    kc::rms_norm_gated_row(o.data() + r * dv, z.data() + r * dv, g.norm.data(), o.data() + r * dv,
                           dv, eps);
  kc::linear(o.data(), T, g.out_proj, out, ex, false, cpu_isa_);
}

void Model::mlp_block(int64_t layer, const MlpWeights& w, const float* xn, int64_t T, float* out,
                      Executor& ex, ForwardProfile* profile, std::vector<int32_t>* routed,
                      float* deferred, int64_t defer) const {
  const int64_t H = cfg_.hidden_size;
  if (!w.is_moe) {
    TraceSpan span(trace_.get(), "dense_mlp", "cpu_dense", layer);
    swiglu(xn, T, w.gate_proj, w.up_proj, w.down_proj, out, ex, cpu_isa_);
    return;
  }
  const int64_t E = cfg_.num_experts, k = cfg_.num_experts_per_tok;
  StepTrace* tr = trace_.get();
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> weights(static_cast<size_t>(T * k));
  {
    TraceSpan span(tr, "router", "cpu_dense", layer);
    std::vector<float> logits(static_cast<size_t>(T * E));
    kc::linear(xn, T, w.router, logits.data(), ex, false, cpu_isa_);
    kc::moe_route(logits.data(), T, E, k, cfg_.norm_topk_prob, ids.data(), weights.data());
    if (routing_->active())
      routing_->on_route(layer, logits.data(), T, cfg_.norm_topk_prob, ids.data(), weights.data());
  }
  if (routed) *routed = ids;
  std::fill(out, out + T * H, 0.f);
  {
    TraceSpan span(tr, "routed_experts", "cpu_experts", layer);
    const auto t0 =
        profile ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    if (deferred != nullptr && defer > 0 && defer < k) {
      // Note [Expert deferral study]: the last `defer` of each token's ranked experts go to
      // `deferred`, the others to `out`.
      const int64_t kn = k - defer;
      std::vector<int32_t> ids_now(static_cast<size_t>(T * kn)),
          ids_later(static_cast<size_t>(T * defer));
      std::vector<float> w_now(ids_now.size()), w_later(ids_later.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const bool now = j < kn;
          (now ? ids_now[t * kn + j] : ids_later[t * defer + j - kn]) = ids[t * k + j];
          (now ? w_now[t * kn + j] : w_later[t * defer + j - kn]) = weights[t * k + j];
        }
      std::fill(deferred, deferred + T * H, 0.f);
      experts_->forward(layer, xn, T, ids_now.data(), w_now.data(), kn, out, ex);
      experts_->forward(layer, xn, T, ids_later.data(), w_later.data(), defer, deferred, ex);
    } else {
      experts_->forward(layer, xn, T, ids.data(), weights.data(), k, out, ex);
    }
    if (profile)
      profile->routed_experts +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (cfg_.shared_expert_intermediate_size > 0) {
    TraceSpan span(tr, "shared_expert", "cpu_dense", layer);
    std::vector<float> hs(static_cast<size_t>(T * H));
    swiglu(xn, T, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, hs.data(), ex,
           cpu_isa_);
    for (int64_t t = 0; t < T; ++t) {
      float dot = 0.f;
      for (int64_t i = 0; i < H; ++i) dot += w.shared_expert_gate[i] * xn[t * H + i];
      const float s = kc::sigmoid(dot);
      for (int64_t i = 0; i < H; ++i) out[t * H + i] += s * hs[t * H + i];
    }
  }
}

// Note [Router lookahead]
// While MoE layer l computes, layer l+1's experts can be predicted from the hidden state l already
// has: layer l+1's router applied to the residual stream after layer l's attention, normed with
// layer l+1's post-attention norm. Layer l+1's real input differs by layer l's MLP output and
// layer l+1's attention output; the residual stream changes slowly, so most of the top-k
// survives. The prediction is what a prefetcher would copy to the VRAM expert cache during layer
// l (issue 7); here it is measured: RoutingControl counts, per layer, predicted ids, routed ids
// and routed ids that were predicted (precision = hits / predicted, recall = hits / routed).
// Off by default (one more norm and router matvec per MoE layer). The GPU path does the same on
// the host (CudaModel::Impl::lookahead_after).
void Model::predict_experts(size_t next, const float* x, int64_t R, int64_t kp,
                            std::vector<int32_t>& pred, Executor& ex) const {
  const LayerWeights& w = layers_[next];
  const int64_t H = cfg_.hidden_size, E = cfg_.num_experts;
  const auto scale = cfg_.is_hybrid() ? kc::NormScale::kZeroCentred : kc::NormScale::kPlain;
  std::vector<float> xn(static_cast<size_t>(R * H)), logits(static_cast<size_t>(R * E));
  norm_rows(x, w.post_attention_layernorm, xn.data(), R, H, H,
            static_cast<float>(cfg_.rms_norm_eps), scale);
  kc::linear(xn.data(), R, w.mlp.router, logits.data(), ex, false, cpu_isa_);
  pred.resize(static_cast<size_t>(R * kp));
  top_k_ids(logits.data(), R, E, kp, pred.data());
}

size_t Model::state_bytes(const SequenceState& state) {
  size_t n = 0;
#if TIDAL_WITH_CUDA
  if (state.device) n += CudaModel::state_bytes(*state.device);
#endif
  for (const auto& l : state.layers)
    n += (l.k_cache.size() + l.v_cache.size() + l.conv.size() + l.recurrent.size()) * sizeof(float);
  return n;
}

void Model::cpu_layers(std::span<SequenceState* const> states, int64_t T,
                       std::span<const int64_t> ids, std::vector<float>& x, std::vector<float>& xn,
                       Executor& ex, ForwardProfile* profile) const {
  const auto& c = cfg_;
  const int64_t R = static_cast<int64_t>(ids.size()), H = c.hidden_size;
  const auto scale = c.is_hybrid() ? kc::NormScale::kZeroCentred : kc::NormScale::kPlain;
  const float eps = static_cast<float>(c.rms_norm_eps);
  x.resize(static_cast<size_t>(R * H));
  xn.resize(x.size());
  std::vector<float> y(x.size());
  for (int64_t t = 0; t < R; ++t)
    for (int64_t i = 0; i < H; ++i) x[t * H + i] = embed_tokens_.at(ids[t], i);
  // Note [Expert deferral study]
  // KTransformers defers part of a layer's CPU expert output by one layer so the GPU need not wait
  // for it: the next layer runs on a residual stream without it, and it is added after that layer.
  // TIDAL_STUDY_DEFER_EXPERTS=n does exactly that here, on the CPU path only, with each token's n
  // lowest-ranked routed experts, so that tests/bench/deferral_study.py can measure what it does
  // to the model's outputs before any GPU pipeline is built for it (docs/performance.md).
  static const int64_t defer_n = [] {
    const char* e = std::getenv("TIDAL_STUDY_DEFER_EXPERTS");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t{0};
  }();
  std::vector<float> def_cur, def_prev;
  bool have_prev = false;
  // Note [Router lookahead]: predictions for the next MoE layer, made one layer early.
  const bool lookahead = routing_->lookahead();
  const int64_t kp = lookahead ? routing_->lookahead_k() : 0;
  std::vector<int32_t> pred, next_pred, routed;
  bool have_pred = false;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& w = layers_[l];
    norm_rows(x.data(), w.input_layernorm, xn.data(), R, H, H, eps, scale);
    for (size_t s = 0; s < states.size(); ++s) {  // token mixer: each sequence on its own state
      SequenceState& st = *states[s];
      const float* in = xn.data() + static_cast<int64_t>(s) * T * H;
      float* out = y.data() + static_cast<int64_t>(s) * T * H;
      const bool attn = w.type == LayerType::kFullAttention;
      TraceSpan span(trace_.get(), attn ? "attention" : "deltanet", "cpu_dense",
                     static_cast<int64_t>(l));
      if (attn)
        attention_layer(w, st.layers[l], st.num_tokens, in, T, out, ex);
      else
        delta_net_layer(w, st.layers[l], in, T, out, ex);
    }
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    norm_rows(x.data(), w.post_attention_layernorm, xn.data(), R, H, H, eps, scale);
    const bool predict_next = lookahead && l + 1 < layers_.size() && layers_[l + 1].mlp.is_moe;
    if (predict_next) {
      TraceSpan span(trace_.get(), "router_lookahead", "cpu_dense", static_cast<int64_t>(l + 1));
      predict_experts(l + 1, x.data(), R, kp, next_pred, ex);
    }
    const bool check = have_pred && w.mlp.is_moe;
    const bool defer_here = defer_n > 0 && w.mlp.is_moe && l + 1 < layers_.size();
    if (defer_here) def_cur.resize(x.size());
    mlp_block(static_cast<int64_t>(l), w.mlp, xn.data(), R, y.data(), ex, profile,
              check ? &routed : nullptr, defer_here ? def_cur.data() : nullptr,
              defer_here ? defer_n : 0);  // all rows
    if (check)
      routing_->add_lookahead(static_cast<int64_t>(l), pred.data(), kp, routed.data(),
                              c.num_experts_per_tok, R);
    std::swap(pred, next_pred);
    have_pred = predict_next;
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    if (have_prev) {  // the previous MoE layer's deferred experts, one layer late
      for (size_t i = 0; i < x.size(); ++i) x[i] += def_prev[i];
      have_prev = false;
    }
    if (defer_here) {
      std::swap(def_prev, def_cur);
      have_prev = true;
    }
  }
  for (auto* st : states) st->num_tokens += T;
}

void Model::forward(std::span<const int64_t> ids, SequenceState& state, LogitsMode mode,
                    std::vector<float>& logits, Executor& ex, ForwardProfile* profile) const {
  const auto t_start = std::chrono::steady_clock::now();
  struct AddTotal {
    ForwardProfile* p;
    std::chrono::steady_clock::time_point t0;
    ~AddTotal() {
      if (p)
        p->total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  } add_total{profile, t_start};
  TraceSpan step_span(trace_.get(), "forward", "step");
  const auto& c = cfg_;
  const int64_t T = static_cast<int64_t>(ids.size()), H = c.hidden_size;
  TIDAL_ASSERT(state.layers.size() == layers_.size(), "sequence state has {} layers, model {}",
               state.layers.size(), layers_.size());
  if (T == 0) {
    logits.clear();
    return;
  }
#if TIDAL_WITH_CUDA
  if (cuda_) {
    TIDAL_ASSERT(state.device != nullptr, "a CPU sequence state given to the CUDA model");
    cuda_->forward(ids, state, mode, logits, ex, profile);
    return;
  }
#endif
  const auto scale = c.is_hybrid() ? kc::NormScale::kZeroCentred : kc::NormScale::kPlain;
  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<float> x, xn;
  SequenceState* one[] = {&state};
  cpu_layers(one, T, ids, x, xn, ex, profile);
  if (mode == LogitsMode::kNone) {
    logits.clear();
    return;
  }
  const int64_t first = mode == LogitsMode::kAll ? 0 : T - 1;
  const int64_t rows = T - first;
  TraceSpan span(trace_.get(), "lm_head", "cpu_dense");
  norm_rows(x.data() + first * H, final_norm_, xn.data(), rows, H, H, eps, scale);
  logits.resize(static_cast<size_t>(rows * c.vocab_size));
  kc::linear(xn.data(), rows, lm_head_, logits.data(), ex, false, cpu_isa_);
}

void Model::reserve(SequenceState& state, int64_t tokens) const {
#if TIDAL_WITH_CUDA
  if (cuda_) cuda_->reserve(state, tokens);
#endif
  (void)state;
  (void)tokens;
}

int64_t Model::max_batch() const {
#if TIDAL_WITH_CUDA
  if (cuda_) return cuda_->max_batch();
#endif
  return std::numeric_limits<int64_t>::max();
}

void Model::forward_batch(std::span<SequenceState* const> states, std::span<const int64_t> ids,
                          std::vector<float>& logits, Executor& ex, ForwardProfile* profile) const {
  const auto t_start = std::chrono::steady_clock::now();
  TraceSpan step_span(trace_.get(), "forward_batch", "step");
  const auto& c = cfg_;
  const int64_t B = static_cast<int64_t>(ids.size()), H = c.hidden_size;
  TIDAL_ASSERT(states.size() == ids.size(), "{} states for {} tokens", states.size(), ids.size());
  for (int64_t b = 0; b < B; ++b) {
    TIDAL_ASSERT(states[b] != nullptr && states[b]->layers.size() == layers_.size(),
                 "bad sequence state in a batch");
    for (int64_t o = 0; o < b; ++o)
      TIDAL_ASSERT(states[o] != states[b], "one sequence twice in a batch");
  }
  if (B == 0) {
    logits.clear();
    return;
  }
#if TIDAL_WITH_CUDA
  if (cuda_) {
    for (auto* s : states) TIDAL_ASSERT(s->device != nullptr, "a CPU sequence state given to CUDA");
    cuda_->forward_batch(states, ids, logits, ex, profile);
    if (profile)
      profile->total +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    return;
  }
#endif
  const auto scale = c.is_hybrid() ? kc::NormScale::kZeroCentred : kc::NormScale::kPlain;
  const float eps = static_cast<float>(c.rms_norm_eps);
  std::vector<float> x, xn;
  cpu_layers(states, 1, ids, x, xn, ex, profile);
  TraceSpan span(trace_.get(), "lm_head", "cpu_dense");
  norm_rows(x.data(), final_norm_, xn.data(), B, H, H, eps, scale);
  logits.resize(static_cast<size_t>(B * c.vocab_size));
  kc::linear(xn.data(), B, lm_head_, logits.data(), ex, false, cpu_isa_);
  if (profile)
    profile->total +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
}

void Model::save_linear_states(const SequenceState& state, std::vector<std::vector<float>>& conv,
                               std::vector<std::vector<float>>& rec) const {
#if TIDAL_WITH_CUDA
  if (cuda_) {
    cuda_->download_linear_states(state, conv, rec);
    return;
  }
#endif
  conv.clear();
  rec.clear();
  for (const auto& l : state.layers) {
    conv.push_back(l.conv);
    rec.push_back(l.recurrent);
  }
}

void Model::restore_linear_states(SequenceState& state, const std::vector<std::vector<float>>* conv,
                                  const std::vector<std::vector<float>>* rec) const {
#if TIDAL_WITH_CUDA
  if (cuda_) {
    cuda_->upload_linear_states(state, conv, rec);
    return;
  }
#endif
  const SequenceState fresh = conv && rec ? SequenceState{} : new_state();
  for (size_t l = 0; l < state.layers.size(); ++l) {
    state.layers[l].conv = conv ? (*conv)[l] : fresh.layers[l].conv;
    state.layers[l].recurrent = rec ? (*rec)[l] : fresh.layers[l].recurrent;
  }
}

void Model::truncate_kv(SequenceState& state, int64_t n) const {
  // The GPU KV cache keeps its capacity; positions >= n are simply overwritten later.
  const auto row = static_cast<size_t>(cfg_.num_key_value_heads * cfg_.head_dim);
  for (auto& l : state.layers) {
    if (l.k_cache.empty()) continue;
    l.k_cache.resize(static_cast<size_t>(n) * row);
    l.v_cache.resize(static_cast<size_t>(n) * row);
  }
  state.num_tokens = n;
}

}  // namespace tidal::core
