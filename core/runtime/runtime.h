// SPDX-License-Identifier: Apache-2.0
/// \file runtime.h
/// \brief The user-facing engine: load a checkpoint, compute logits, generate; sequences with
/// explicit state.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"
#include "core/config/model_config.h"
#include "core/model/model.h"
#include "core/runtime/sampler.h"
#include "core/runtime/scheduler.h"
#include "kernels/common/executor.h"

namespace tidal::offload {
class ExpertStore;
}  // namespace tidal::offload

namespace tidal::runtime {

/// Called during loading with bytes done and bytes total (from the loading thread).
using LoadProgress = std::function<void(uint64_t done, uint64_t total)>;

struct RuntimeOptions {
  std::string device = "cpu";  ///< "cpu", "cuda" or "cuda:N"
  int num_threads = 0;         ///< 0: one per physical core
  /// Read every weight page into RAM while loading (with progress) when the weights fit in the
  /// memory available, so the first tokens do not stall on disk reads. Off: pages load lazily.
  bool populate = true;
  /// Routed-expert weight format: "auto" (bf16 when it fits in available RAM, else int8, else
  /// int4), "bf16", "int8" or "int4".
  std::string expert_dtype = "auto";
  int64_t expert_group_size = 0;  ///< INT8/INT4 quantisation group: 32, 64, 128 (0: default)
  /// Highest CPU ISA the expert kernels use: "auto" (the best this CPU has, capped by the
  /// TIDAL_CPU_ISA environment variable), "scalar", "avx2", "avx512" or "amx".
  std::string cpu_isa = "auto";
  /// Packed-expert cache: "auto" (int8/int4 experts of checkpoints with at least 1 GiB of
  /// experts: `<checkpoint>/.tidal-cache`, or `$XDG_CACHE_HOME/tidal` when that is not writable),
  /// "off", or a directory to use for any checkpoint and format.
  std::string expert_cache = "auto";
  // device="cuda" only:
  uint64_t gpu_memory = 0;           ///< VRAM budget in bytes (0: what is free at load)
  std::string gpu_weights = "bf16";  ///< GPU-resident matrices: "bf16" or "int8" (weight-only)
  std::string gpu_precision =
      "bf16x2";                         ///< prefill GEMMs: "bf16x2", "bf16" or "fp32" (CudaOptions)
  std::string kv_cache_dtype = "bf16";  ///< GPU KV cache: "bf16" or "fp32"
  bool cuda_graphs = true;              ///< replay decode steps from CUDA graphs
  /// Tokens one sequence may hold (prompt and generated): a forward call that would go past it
  /// throws InvalidArgument, before any work. 0: no limit of tidal's own (the model's
  /// max_position_embeddings is checked where prompts enter, as before). At most
  /// max_position_embeddings.
  int64_t max_context = 0;
  /// VRAM expert cache (Note [VRAM expert cache]): slots, -1 = what gpu_memory leaves, 0 = none
  /// (the default until the cache has been validated on a GPU); and its policy, "lfu" (decayed
  /// counts), "lru" or "static".
  int64_t gpu_expert_slots = 0;
  std::string gpu_expert_policy = "lfu";
};

/// Counters of one runtime since load (or reset_stats); times in seconds, sizes in bytes.
struct RuntimeStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;  ///< forward + sampling, per phase
  double routed_expert_seconds = 0;                ///< CPU routed-expert compute (all phases)
  double dense_seconds = 0;                        ///< everything else in forward calls
  double sample_seconds = 0;
  int64_t forward_calls = 0;
  int64_t live_sequences = 0;
  uint64_t state_bytes = 0;            ///< KV caches + DeltaNet states of live sequences
  uint64_t checkpoint_bytes = 0;       ///< saved DeltaNet states (Sequence::checkpoint)
  uint64_t weight_bytes = 0;           ///< dense tensors (memory-mapped) + packed experts
  uint64_t expert_bytes = 0;           ///< packed routed experts in host RAM
  uint64_t checkpoint_file_bytes = 0;  ///< every tensor of the checkpoint
  bool weights_populated = false;      ///< weights were read into RAM at load
  double load_seconds = 0;
  /// Routed experts since load or reset_stats: weight reads (distinct experts per forward call and
  /// MoE layer) and (token, expert) pairs computed; reads / pairs < 1 is the sharing batching gets.
  uint64_t expert_reads = 0, expert_pairs = 0;
  /// Router lookahead (Note [Router lookahead]), per layer since load or reset_stats: expert ids
  /// predicted one layer early, ids routed, routed ids that were predicted. All zero while off.
  std::vector<uint64_t> lookahead_predicted, lookahead_routed, lookahead_hits;
  bool lookahead_on = false;  ///< rt.set_router_lookahead(True) is in force
  /// VRAM expert cache (device="cuda", Note [VRAM expert cache]): its slots (0: none) and
  /// policy; routed (token, expert) pairs computed from a slot and on the host since load or
  /// reset_stats, per layer too; experts copied in and their bytes.
  int64_t gpu_expert_slots = 0;
  std::string gpu_expert_policy;
  int64_t gpu_expert_pairs = 0, host_expert_pairs = 0, gpu_expert_fills = 0;
  uint64_t gpu_expert_bytes_in = 0;
  /// Lookahead prefetch (TIDAL_CUDA_EXPERT_PREFETCH): slots per buffer, experts copied, and
  /// routed pairs computed from a prefetch slot.
  int64_t gpu_expert_prefetch_slots = 0, gpu_expert_prefetched = 0, gpu_expert_prefetch_hits = 0;
  std::vector<int64_t> layer_gpu_expert_pairs, layer_host_expert_pairs;
  /// Per layer: misses admitted into a slot (each copies slot_bytes) and experts they evicted.
  std::vector<int64_t> layer_gpu_expert_fills, layer_gpu_expert_evictions;
  uint64_t gpu_expert_slot_bytes = 0;
  /// Prefill expert streaming (device="cuda", TIDAL_CUDA_PREFILL_STREAM=1): MoE layers whose
  /// routed experts ran on the GPU from experts copied for the chunk, those pairs, those bytes.
  int64_t gpu_streamed_layers = 0, gpu_streamed_pairs = 0;
  /// Expert groups run in padded batches (TIDAL_CUDA_STREAM_BATCHED).
  int64_t gpu_streamed_padded_groups = 0;
  uint64_t gpu_streamed_bytes = 0;
};

struct GenerationConfig {
  int64_t max_new_tokens = 32;
  SamplingParams sampling;
  std::vector<int64_t> stop_token_ids;  ///< generation ends after emitting one of these

  void validate() const;
};

struct GenerationResult {
  std::vector<int64_t> token_ids;  ///< the new tokens only
  std::string finish_reason;       ///< "length" or "stop"
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

class Runtime;

/// One sequence: its own KV cache and DeltaNet states. Feed it tokens in chunks of any size.
/// Calls on one sequence are serialised; different sequences run concurrently.
class Sequence {
 public:
  explicit Sequence(std::shared_ptr<const Runtime> rt);
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  /// Appends `ids`; returns logits (rows, vocab) for every new token (all_logits) or only the last.
  std::vector<float> forward(std::span<const int64_t> ids, bool all_logits);
  /// Appends `ids` (non-empty) and picks the next token from the last logits with `sampler`
  /// (which records it). The picked token is not appended: feed it with the next call.
  int64_t step(std::span<const int64_t> ids, Sampler& sampler);
  /// Appends `ids` without computing logits (prefill of a prefix).
  void prefill(std::span<const int64_t> ids);

  /// Saves the DeltaNet states at the current position so truncate() can come back to it. At most
  /// kMaxCheckpoints are kept (the oldest is dropped).
  void checkpoint();
  /// Rolls the sequence back to at most `n` tokens and returns the new length: exactly `n` when
  /// the model has no DeltaNet layer (the KV cache is cut), otherwise the position of the latest
  /// checkpoint at or before `n` (0: a fresh state). The caller re-feeds tokens from there.
  int64_t truncate(int64_t n);
  int64_t num_tokens() const;
  std::vector<int64_t> checkpoint_positions() const;

  /// Makes the forward call waiting or running on this sequence (or, when none is, the next
  /// one) throw Cancelled. Any thread; does not wait for the sequence's lock. With batching on, a
  /// prompt being prefilled stops at the next chunk.
  void cancel();
  /// Forward calls after `seconds` from now throw DeadlineExceeded (0: no deadline).
  void set_deadline(double seconds);
  /// Clears a pending cancel and the deadline (a new request on a reused sequence).
  void reset_controls();

  static constexpr size_t kMaxCheckpoints = 8;

 private:
  friend class Runtime;  // forward_batch
  struct Saved {
    int64_t num_tokens = 0;
    std::vector<std::vector<float>> conv, recurrent;  // per layer (empty for attention layers)
  };
  /// Forward + counters; with a sampler, also picks the next token (returned; else -1).
  int64_t forward_locked(std::span<const int64_t> ids, core::LogitsMode mode,
                         std::vector<float>& out, Sampler* sampler = nullptr);
  /// Updates the runtime's memory counters; checkpoint bytes are recounted only when they changed.
  void account_locked(bool saved_changed);
  std::shared_ptr<const Runtime> rt_;
  core::SequenceState state_;
  std::deque<Saved> saved_;
  SequenceControl ctl_;
  mutable std::mutex mu_;
  uint64_t accounted_state_ = 0, accounted_saved_ = 0;
};

class Runtime : public std::enable_shared_from_this<Runtime> {
 public:
  /// Loads a checkpoint directory (config.json + safetensors). All validation happens here.
  static std::shared_ptr<Runtime> load(const std::filesystem::path& path,
                                       const RuntimeOptions& opts,
                                       const LoadProgress& progress = {});

  const core::ModelConfig& config() const { return model_->config(); }
  const RuntimeOptions& options() const { return opts_; }
  /// Throws InvalidArgument when a sequence holding `held` tokens may not take `adding` more
  /// (RuntimeOptions::max_context).
  void check_context(int64_t held, int64_t adding) const;
  int num_threads() const { return executor_->num_threads(); }

  /// Logits at every position of a fresh sequence: (ids.size(), vocab_size) row-major.
  std::vector<float> logits(std::span<const int64_t> ids) const;

  /// Prefills `prompt` and generates up to max_new_tokens tokens.
  GenerationResult generate(std::span<const int64_t> prompt, const GenerationConfig& gen) const;

  /// Throws InvalidArgument unless every id is in [0, vocab_size) (and, with `non_empty`, ids is
  /// not empty).
  void check_token_ids(std::span<const int64_t> ids, bool non_empty) const;

  const core::Model& model() const { return *model_; }
  kernels::Executor& executor() const { return *executor_; }

  RuntimeStats stats() const;
  /// What runs: device, cpu_isa, expert_dtype, expert_group_size, expert_kernels (the tile
  /// kernels of the last forward), cpu (brand string), threads.
  std::map<std::string, std::string> describe() const;
  /// VRAM use in bytes (device="cuda"): weights, weights_bf16_equivalent, kv_cache,
  /// deltanet_state, workspaces, used, free, total, limit. InvalidArgument on the CPU.
  std::map<std::string, uint64_t> memory_report() const;
  /// Zeroes the token and time counters (memory figures stay).
  void reset_stats();

  /// One decode step of several distinct sequences at once (Model::forward_batch): token ids[b]
  /// is appended to seqs[b]; returns logits (B, vocab). Direct, not through the scheduler.
  std::vector<float> forward_batch(std::span<Sequence* const> seqs,
                                   std::span<const int64_t> ids) const;

  /// Routes the forward calls of every sequence through a Scheduler from now on: one-token steps
  /// of concurrent sequences run as one batch, prompts in chunks. Once per runtime
  /// (InvalidArgument the second time).
  void enable_batching(const SchedulerOptions& opts);
  /// The scheduler, or null while batching is off.
  Scheduler* scheduler() const { return scheduler_ptr_.load(); }

 private:
  friend class Sequence;
  /// Adds one forward call (with its profile and sampling time) to the counters.
  void record(int64_t tokens, const core::ForwardProfile& prof, double sample_seconds) const;
  void record_memory(int64_t live_delta, int64_t state_delta, int64_t saved_delta) const;

  Runtime() = default;
  mutable std::mutex stats_mu_;
  mutable RuntimeStats stats_;
  uint64_t reads_base_ = 0, pairs_base_ = 0;  // expert counters at the last reset_stats
  RuntimeOptions opts_;
  std::unique_ptr<core::Checkpoint> checkpoint_;
  std::unique_ptr<core::Model> model_;
  std::unique_ptr<kernels::Executor> executor_;
  std::shared_ptr<offload::ExpertStore> experts_;
  std::mutex sched_mu_;
  std::unique_ptr<Scheduler> scheduler_;  // destroyed first (declared last): it uses the model
  std::atomic<Scheduler*> scheduler_ptr_{nullptr};
};

/// Physical cores of this machine (hwloc), at least 1.
int physical_core_count();

/// Host memory read bandwidth in bytes/s: `num_threads` threads (0: physical cores) each sum their
/// slice of a `bytes` buffer (already touched), best of `repeats` passes. The roofline for decoding
/// from RAM.
double measure_read_bandwidth(size_t bytes, int num_threads, int repeats);

}  // namespace tidal::runtime
