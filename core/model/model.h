// SPDX-License-Identifier: Apache-2.0
/// \file model.h
/// \brief The model graph of the three Qwen MoE families on the CPU (model-spec §3), explicit per
/// layer.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/config/model_config.h"
#include "core/model/cuda_model.h"
#include "core/model/routed_experts.h"
#include "core/model/routing_control.h"
#include "core/model/sequence_state.h"
#include "core/model/step_trace.h"
#include "core/model/weight_loader.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/linear.h"

namespace tidal::core {

struct AttentionWeights {
  kernels::WeightView q_proj, k_proj, v_proj, o_proj;
  std::vector<float> q_norm, k_norm;
};

struct DeltaNetWeights {
  kernels::WeightView in_proj_qkvz, in_proj_ba;                      // qwen3_next
  kernels::WeightView in_proj_qkv, in_proj_z, in_proj_b, in_proj_a;  // qwen3_5_moe
  kernels::WeightView out_proj;
  std::vector<float> conv1d;  // (channels, kernel)
  std::vector<float> dt_bias, A_log, norm;
};

struct MlpWeights {
  bool is_moe = false;
  kernels::WeightView router;  // mlp.gate  [E, H]
  kernels::WeightView shared_gate_proj, shared_up_proj, shared_down_proj;
  std::vector<float> shared_expert_gate;              // [H]
  kernels::WeightView gate_proj, up_proj, down_proj;  // dense layers
};

struct LayerWeights {
  LayerType type = LayerType::kFullAttention;
  std::vector<float> input_layernorm, post_attention_layernorm;
  AttentionWeights attn;
  DeltaNetWeights gdn;
  MlpWeights mlp;
};

/// Where forward calls spent their time, in seconds (added to, never reset by the model).
struct ForwardProfile {
  double routed_experts = 0.0;  ///< inside RoutedExperts::forward (CPU experts today)
  double total = 0.0;           ///< the whole forward call
};

/// Which rows of logits a forward call produces.
enum class LogitsMode : uint8_t { kNone, kLast, kAll };

class Model {
 public:
  /// Binds and checks every non-expert tensor of `ck` (routed experts are the `experts` object's).
  /// With `cuda`, the non-expert weights are uploaded to the GPU and forward runs there.
  Model(const ModelConfig& cfg, const Checkpoint& ck, std::shared_ptr<RoutedExperts> experts,
        const CudaOptions* cuda = nullptr, kernels::Executor* ex = nullptr);
  ~Model();

  const ModelConfig& config() const { return cfg_; }

  /// A fresh per-sequence state (empty KV cache, zero DeltaNet states).
  SequenceState new_state() const;

  /// Runs `ids` (already range-checked) through the model after the tokens already in `state`, and
  /// appends them to it. logits: (rows, vocab_size), rows = ids.size() (kAll), 1 (kLast) or 0.
  void forward(std::span<const int64_t> ids, SequenceState& state, LogitsMode mode,
               std::vector<float>& logits, kernels::Executor& ex,
               ForwardProfile* profile = nullptr) const;

  /// One decode step of B independent sequences: token ids[b] is appended to *states[b] (each at
  /// its own position). The token mixers (attention, DeltaNet) run per sequence on its own state;
  /// every MoE layer takes all B rows as one batch, so an expert's weights are read once for all
  /// the sequences routed to it. logits: (B, vocab_size). States must be distinct.
  void forward_batch(std::span<SequenceState* const> states, std::span<const int64_t> ids,
                     std::vector<float>& logits, kernels::Executor& ex,
                     ForwardProfile* profile = nullptr) const;

  /// Makes room for `tokens` tokens in `state` (the GPU KV cache grows; nothing on the CPU).
  /// Throws OutOfMemory, leaving the state as it was.
  void reserve(SequenceState& state, int64_t tokens) const;
  /// Most sequences forward_batch takes at once (the GPU's workspaces bound it; unbounded on the
  /// CPU).
  int64_t max_batch() const;

  /// Routing record / replay (benchmarks, cache studies); shared by all sequences of this model.
  RoutingControl& routing() const { return *routing_; }
  /// The timeline of forward calls while recording (Note [Step trace]); shared by all sequences.
  StepTrace& trace() const { return *trace_; }

  /// Bytes of `state` (KV cache + DeltaNet conv and recurrent states), host or device.
  static size_t state_bytes(const SequenceState& state);

  /// DeltaNet conv and recurrent states, one pair per layer (empty for attention layers).
  void save_linear_states(const SequenceState& state, std::vector<std::vector<float>>& conv,
                          std::vector<std::vector<float>>& rec) const;
  /// Restores saved states; null: zero states.
  void restore_linear_states(SequenceState& state, const std::vector<std::vector<float>>* conv,
                             const std::vector<std::vector<float>>* rec) const;
  /// Cuts the KV cache to `n` tokens and sets num_tokens = n (DeltaNet states are the caller's).
  void truncate_kv(SequenceState& state, int64_t n) const;

  /// The GPU part (device="cuda"), or null.
  CudaModel* cuda() const { return cuda_.get(); }

  /// Highest ISA of the dense CPU projections (kernels::cpu::linear); default
  /// linear_default_isa(). Runtime sets its cpu_isa here.
  void set_cpu_isa(kernels::Isa isa) { cpu_isa_ = isa; }
  kernels::Isa cpu_isa() const { return cpu_isa_; }

 private:
  void attention_layer(const LayerWeights& w, LayerState& ls, int64_t pos0, const float* xn,
                       int64_t T, float* out, kernels::Executor& ex) const;
  void delta_net_layer(const LayerWeights& w, LayerState& ls, const float* xn, int64_t T,
                       float* out, kernels::Executor& ex) const;
  /// The decoder layers on the CPU for states.size() sequences of T tokens each (ids: their rows,
  /// one sequence after the other): embeddings into x, token mixers per sequence on its own state,
  /// every MLP on all rows at once; x holds the last hidden states, num_tokens advance by T.
  void cpu_layers(std::span<SequenceState* const> states, int64_t T, std::span<const int64_t> ids,
                  std::vector<float>& x, std::vector<float>& xn, kernels::Executor& ex,
                  ForwardProfile* profile) const;
  /// `routed`, when given, receives the T x top_k expert ids the layer used (MoE layers only).
  /// `deferred`, when given (MoE layers only), receives the weighted output of each token's
  /// `defer` last-ranked routed experts instead of `out` (Note [Expert deferral study]).
  void mlp_block(int64_t layer, const MlpWeights& w, const float* xn, int64_t T, float* out,
                 kernels::Executor& ex, ForwardProfile* profile,
                 std::vector<int32_t>* routed = nullptr, float* deferred = nullptr,
                 int64_t defer = 0) const;
  /// Note [Router lookahead]: layer `next`'s router on the residual stream `x` (R rows) normed
  /// with layer `next`'s post-attention norm; the kp highest logits per row into `pred`.
  void predict_experts(size_t next, const float* x, int64_t R, int64_t kp,
                       std::vector<int32_t>& pred, kernels::Executor& ex) const;

  ModelConfig cfg_;
  kernels::Isa cpu_isa_ = kernels::cpu::linear_default_isa();
  std::shared_ptr<OwnedWeights> owned_;
  std::shared_ptr<RoutedExperts> experts_;
  std::shared_ptr<RoutingControl> routing_;
  std::shared_ptr<StepTrace> trace_ = std::make_shared<StepTrace>();
  kernels::WeightView embed_tokens_, lm_head_;
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
  struct Rope;
  std::shared_ptr<const Rope> rope_;
  std::unique_ptr<CudaModel> cuda_;
};

}  // namespace tidal::core
