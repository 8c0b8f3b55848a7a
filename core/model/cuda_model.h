// SPDX-License-Identifier: Apache-2.0
/// \file cuda_model.h
/// \brief The GPU side of the model (device="cuda"): embeddings, attention and Gated DeltaNet
/// layers, routers, shared experts, final norm and lm_head resident in VRAM; routed experts run
/// through RoutedExperts on the host between GPU segments. Decode steps replay CUDA graphs.
/// See docs/architecture.md "CUDA backend".
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/config/model_config.h"
#include "core/model/routed_experts.h"
#include "core/model/routing_control.h"
#include "core/model/sequence_state.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/linear.h"

namespace tidal::core {

struct LayerWeights;
struct ForwardProfile;
enum class LogitsMode : uint8_t;

/// Options of the CUDA backend (RuntimeOptions carries them from the user).
struct CudaOptions {
  int device = 0;
  /// Format of the GPU-resident matrices: "bf16" (as the checkpoint; F32 stays F32) or "int8"
  /// (weight-only, one fp32 scale per output row).
  std::string weights = "bf16";
  /// Prefill GEMMs (more than 8 tokens): "bf16x2" (BF16 tensor cores on activations split into
  /// two BF16 terms: near-fp32 products), "bf16" (one term: fastest, activations rounded) or
  /// "fp32" (CUDA cores, and an fp32 KV cache: the mode that matches the CPU engine). Decode
  /// projections always use fp32 activations.
  std::string precision = "bf16x2";
  /// VRAM tidal may use, bytes; 0 = what the device has free at load.
  uint64_t memory_limit = 0;
  /// KV cache elements: "bf16" (default, half the memory) or "fp32" (implied by precision "fp32").
  std::string kv_dtype = "bf16";
  bool graphs = true;  ///< replay decode steps from CUDA graphs
  /// One-token decode: residual adds in the epilogues of the GEMVs that produce them and each
  /// RMSNorm inside the GEMV that consumes it (staged once per block by the streaming GEMV), so
  /// no norm kernel runs between them (false: the separate fused residual + norm kernel).
  /// TIDAL_CUDA_FUSE=0 turns it off (docs/performance.md compares both).
  bool fuse_decode = env_flag("TIDAL_CUDA_FUSE", true);
  /// Decode attention on tensor cores (Note [tensor-core decode attention]); TIDAL_CUDA_ATTN_TC=0
  /// selects the CUDA-core kernel.
  bool attention_tensor_cores = env_flag("TIDAL_CUDA_ATTN_TC", true);
  /// One-token DeltaNet decode: the delta rule in column blocks (4x the blocks) and its gated
  /// output norm staged by out_proj's streaming GEMV (true), or one block per value head with the
  /// norm inside (false). Both measured the same decode step on an H100 (docs/performance.md), so
  /// the simpler one is the default; TIDAL_CUDA_GDN_SPLIT=1 selects the other.
  bool deltanet_split = env_flag("TIDAL_CUDA_GDN_SPLIT", false);
  /// One-token decode: the router's top-k run by the MoE in-projection's streaming GEMV (its last
  /// block; Note [Router in the MoE in-projection] in kernels/cuda/ops.cu) instead of a kernel of
  /// its own (or a side stream). TIDAL_CUDA_ROUTE_IN_GEMV.
  bool route_in_gemv = env_flag("TIDAL_CUDA_ROUTE_IN_GEMV", false);
  /// Fused GPU-only decode: the router's top-k on a side stream beside the shared expert (true)
  /// or in line on the main stream. TIDAL_CUDA_SIDE_ROUTE.
  bool side_route = env_flag("TIDAL_CUDA_SIDE_ROUTE", true);
  /// One-token DeltaNet decode (qwen3_5_moe row layout): the causal conv, SiLU, beta and g applied
  /// by the in-projection's streaming GEMV to the rows it produces, q/k L2 norms by the delta rule
  /// (Note [DeltaNet conv in the GEMV]); false: the separate conv + prep kernel.
  /// TIDAL_CUDA_GDN_CONV=0 turns it off.
  bool deltanet_conv_in_gemv = env_flag("TIDAL_CUDA_GDN_CONV", true);
  /// One-token decode on the tensor-core attention kernel: q/k norms, RoPE and the cache write
  /// done by the attention kernel (Note [attention prep in the decode kernel]); false: attn_prep
  /// first. TIDAL_CUDA_ATTN_PREP=0 turns it off.
  bool attention_prep_in_kernel = env_flag("TIDAL_CUDA_ATTN_PREP", true);
  /// The environment variable `name` as an integer, `fallback` when unset or not a number.
  static int64_t env_int(const char* name, int64_t fallback);
  /// VRAM expert cache (Note [VRAM expert cache] in cuda_model.cpp), for one-token decode with
  /// packed host experts: slots of whole experts, -1 = as many as the budget leaves after the
  /// weights, workspaces and a KV cache of kv_reserve_tokens (capped at every expert), 0 = off
  /// (the default; Runtime sets it from Runtime.load(gpu_expert_slots=...), benchmarks that build
  /// the model directly from TIDAL_CUDA_EXPERT_SLOTS).
  int64_t expert_slots = env_int("TIDAL_CUDA_EXPERT_SLOTS", 0);
  /// "lru", "lfu" (decayed counts) or "static" (LFU over the first 256 decode steps, then frozen).
  std::string expert_cache_policy = "lfu";
  /// Most expert copies queued or in flight at once (each step's misses beyond it stay on the
  /// CPU without being admitted). TIDAL_CUDA_EXPERT_FILLS overrides it.
  int64_t expert_fills = env_int("TIDAL_CUDA_EXPERT_FILLS", 16);
  /// Lookahead prefetch (Note [Lookahead prefetch] in cuda_model.cpp): at each MoE layer the host
  /// predicts the next MoE layer's experts (its router on this layer's normed input) and copies up
  /// to this many of the predicted misses into prefetch slots, which the GPU computes from once
  /// they land. 0 (the default: measured slower, docs/performance.md 2026-12-07) turns it off;
  /// TIDAL_CUDA_EXPERT_PREFETCH.
  int64_t expert_prefetch = env_int("TIDAL_CUDA_EXPERT_PREFETCH", 0);
  /// Highest ISA of the host-side projections (the lookahead router; Runtime: its cpu_isa).
  kernels::Isa host_isa = kernels::cpu::linear_default_isa();
  /// Tokens of KV cache the automatic slot count leaves room for (Runtime: max_context if set).
  int64_t kv_reserve_tokens = 32768;
  /// The environment variable `name` as a flag ("1" on, "0" off), `fallback` when unset.
  static bool env_flag(const char* name, bool fallback);
  int64_t max_chunk = 512;  ///< tokens per GPU pass; longer inputs run in chunks
  /// Prefill expert streaming (Note [Prefill expert streaming] in cuda_model.cpp): a prompt of at
  /// least the threshold computes its routed experts on the GPU, each MoE layer's packed experts
  /// copied to VRAM whole (the next layer's while this one computes), in equal chunks of at most
  /// the stream chunk (it replaces max_chunk when longer), so each layer's experts cross PCIe once
  /// per chunk. -1 (the default): on where it fits the budget and the cost model says it pays,
  /// chunk and threshold chosen at load (Note [Measuring the stream threshold]); 0: off; 1: on.
  /// TIDAL_CUDA_PREFILL_STREAM; TIDAL_CUDA_STREAM_CHUNK and TIDAL_CUDA_STREAM_MIN_TOKENS override
  /// the chunk length and the threshold (-1: chosen).
  int64_t prefill_stream = env_int("TIDAL_CUDA_PREFILL_STREAM", -1);
  int64_t stream_min_tokens = env_int("TIDAL_CUDA_STREAM_MIN_TOKENS", -1);
  int64_t stream_chunk = env_int("TIDAL_CUDA_STREAM_CHUNK", -1);
  /// Experts decoded to BF16 at once (their VRAM workspace) while streaming.
  int64_t stream_group = env_int("TIDAL_CUDA_STREAM_GROUP", 16);
  int64_t initial_context = 1024;  ///< first KV capacity of a sequence (grows by doubling)
};

/// Host-visible view of the model weights the GPU part uploads.
struct HostWeights {
  kernels::WeightView embed_tokens, lm_head;
  const std::vector<float>* final_norm = nullptr;
  const std::vector<LayerWeights>* layers = nullptr;
  std::vector<float> rope_inv_freq;
  float rope_scale = 1.0f;
};

/// The VRAM expert cache since load (Note [VRAM expert cache]).
struct GpuExpertCacheStats {
  int64_t slots = 0;  ///< 0: no cache
  std::string policy;
  uint64_t slot_bytes = 0;
  int64_t gpu_pairs = 0;  ///< routed (token, expert) pairs computed from a slot
  int64_t cpu_pairs = 0;  ///< ... on the host (not resident, or a one-token step without it)
  int64_t fills = 0;      ///< experts copied into a slot (completed)
  uint64_t bytes_in = 0;  ///< their bytes (prefetch copies included)
  /// Lookahead prefetch: slots per buffer (two buffers), experts copied, and routed pairs the GPU
  /// computed from a prefetch slot (the copies the prediction got right).
  int64_t prefetch_slots = 0, prefetched = 0, prefetch_hits = 0;
  std::vector<int64_t> layer_gpu_pairs, layer_cpu_pairs;  ///< per layer
  /// Per layer: misses admitted (copied in, bytes: fills · slot_bytes) and experts they evicted.
  std::vector<int64_t> layer_fills, layer_evictions;
  /// Prefill expert streaming (Note [Prefill expert streaming]): MoE layers computed from
  /// streamed experts, their (token, expert) pairs, and the packed bytes copied for them.
  int64_t stream_layers = 0, stream_pairs = 0;
  /// Expert groups run in padded batches (Note [Padded expert batches]).
  int64_t stream_padded_groups = 0;
  uint64_t stream_bytes = 0;
};

/// VRAM use in bytes.
struct GpuMemoryReport {
  std::string device;
  uint64_t weights = 0, kv_cache = 0, deltanet_state = 0, workspaces = 0;
  uint64_t expert_cache = 0;  ///< expert slots (+ their table and workspaces)
  uint64_t free = 0, total = 0, limit = 0;
  uint64_t weights_bf16_equivalent = 0;  ///< the same matrices at BF16 (to compare int8)
};

struct DeviceSequenceState;

class StepTrace;

class CudaModel {
 public:
  /// Uploads the weights and plans every workspace. `experts` may be null (the routed experts
  /// are skipped: GPU-only benchmarks). Throws InvalidArgument / OutOfMemory / Unsupported.
  CudaModel(const ModelConfig& cfg, const HostWeights& w, RoutedExperts* experts,
            RoutingControl* routing, const CudaOptions& opts, kernels::Executor& ex);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;
  /// Where forward calls add their spans while it records (Note [Step trace]); may be null.
  void set_trace(StepTrace* trace);

  std::shared_ptr<DeviceSequenceState> new_state();
  /// One decode step of B ≤ max_batch() sequences (Model::forward_batch): logits (B, vocab).
  void forward_batch(std::span<SequenceState* const> states, std::span<const int64_t> ids,
                     std::vector<float>& logits, kernels::Executor& ex, ForwardProfile* profile);
  /// Grows the KV cache of `state` to hold `tokens` tokens (OutOfMemory: unchanged).
  void reserve(SequenceState& state, int64_t tokens);
  /// Most sequences forward_batch takes at once.
  int64_t max_batch() const;
  void forward(std::span<const int64_t> ids, SequenceState& state, LogitsMode mode,
               std::vector<float>& logits, kernels::Executor& ex, ForwardProfile* profile);

  /// DeltaNet conv / recurrent states of `state` to host vectors (one pair per layer; empty for
  /// attention layers), and back (empty vectors: zero state).
  void download_linear_states(const SequenceState& state, std::vector<std::vector<float>>& conv,
                              std::vector<std::vector<float>>& rec) const;
  void upload_linear_states(SequenceState& state, const std::vector<std::vector<float>>* conv,
                            const std::vector<std::vector<float>>* rec) const;

  GpuMemoryReport memory_report() const;
  GpuExpertCacheStats expert_cache_stats() const;
  /// Sizes and allocates the VRAM expert cache once the routed experts are packed (else at the
  /// first forward); OutOfMemory for an explicit slot count over the budget.
  void init_expert_cache(kernels::Executor& ex);
  void reset_expert_cache_stats();
  std::string device_name() const;
  /// The one-token decode path in use: attention kernel, programmatic dependent launch, fusion.
  std::string decode_kernels() const;
  /// Prefill expert streaming as set up at load: off (and why), or the chunk length, the shortest
  /// prompt that streams and the rates measured for the choice (Note [Measuring the stream
  /// threshold]).
  std::string prefill_stream_plan() const;
  /// With TIDAL_CUDA_PROFILE=1: GPU seconds per op label over the uncaptured forwards so far.
  std::map<std::string, double> profile_seconds() const;
  /// Device bytes of one sequence's state (KV capacity + DeltaNet states).
  static uint64_t state_bytes(const DeviceSequenceState& s);
  /// Testing/benchmarks: pretend `state` already holds `n` tokens (KV contents left as they are,
  /// capacity grown as needed).
  void set_length(SequenceState& state, int64_t n);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tidal::core
