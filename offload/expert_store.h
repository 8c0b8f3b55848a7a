// SPDX-License-Identifier: Apache-2.0
/// \file expert_store.h
/// \brief Host expert store: the routed experts of every MoE layer, packed at load into the CPU
/// expert engine's format (BF16 / INT8 / INT4, kernels/cpu/expert_gemm.h) in host RAM, and
/// computed there by the fused MoE op. Accepts both checkpoint layouts (per-expert tensors and
/// fused 3-D tensors, model-spec §4).
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config/model_config.h"
#include "core/model/routed_experts.h"
#include "core/model/weight_loader.h"
#include "kernels/common/cpu_features.h"
#include "kernels/common/dtype.h"
#include "kernels/cpu/moe_experts.h"

namespace tidal::offload {

/// How the experts are packed and run.
struct ExpertStoreOptions {
  kernels::cpu::ExpertDType dtype = kernels::cpu::ExpertDType::kBF16;
  int64_t group_size = 0;  ///< 0: the dtype's default (int8: 128, int4: 64)
  kernels::Isa isa = kernels::Isa::kRef;
  /// Directory of the packed-expert cache (empty: no cache). See Note [Packed expert cache].
  std::filesystem::path cache_dir;
};

// Note [Pre-packed experts]
// A checkpoint may carry its routed experts already packed (config.json "tidal_packed_experts":
// file, dtype, group_size, layout) instead of as tensors: a file in the packed-expert cache's
// format (4 KiB header holding the key, then every MoE layer's experts in load order) whose key has
// no source files. `python -m tidal.synth --expert-dtype int4|int8` writes them, so benchmark
// models whose BF16 form would not fit the disk or RAM (a 35B-A3B is 70 GB in BF16, an 80B-A3B 160
// GB) exist at all. Loading maps the file (like a cache hit); the requested expert_dtype must be
// the file's ("auto" takes it).

class ExpertStore final : public core::RoutedExperts {
 public:
  /// Locates and checks every routed expert of `cfg` in `ck` (presence, dtype and shape), or the
  /// pre-packed experts file `cfg.packed_experts` names. Nothing is packed yet.
  ExpertStore(const core::ModelConfig& cfg, const core::Checkpoint& ck);
  ~ExpertStore() override;
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  /// Bytes of the routed experts in the checkpoint, and once packed as `dtype` / `group_size`.
  uint64_t source_bytes() const { return source_bytes_; }
  uint64_t packed_bytes(kernels::cpu::ExpertDType dtype, int64_t group_size) const;

  /// Packs every expert (layer by layer, tiles in parallel on `ex`), then lets the kernel drop the
  /// checkpoint pages just read, so peak memory stays near the packed size. `progress` receives
  /// the source bytes done so far.
  void pack(const ExpertStoreOptions& opts, kernels::Executor& ex,
            const std::function<void(uint64_t)>& progress);

  void forward(int64_t layer, const float* src, int64_t num_tokens, const int32_t* ids,
               const float* weights, int64_t top_k, float* dst, kernels::Executor& ex) override;

  bool packed_layouts(kernels::cpu::PackedLayout& gate_up,
                      kernels::cpu::PackedLayout& down) const override;
  PackedExpertView packed_expert(int64_t layer, int64_t expert) const override;
  std::pair<void*, size_t> packed_region() const override { return {region_, region_bytes_}; }
  std::vector<std::pair<void*, size_t>> packed_layer_regions() const override;
  bool packed_region_file_backed() const override { return region_ != nullptr && file_backed_; }
  void copy_packed_to_anonymous(kernels::Executor& ex) override;

  const ExpertStoreOptions& options() const { return opts_; }
  /// Where the packed experts' pages are (Note [Packed experts on their NUMA nodes]): "one node",
  /// "bound to N nodes" (a preference, as Linux applies hwloc's BIND), "no routed experts", or
  /// "not bound: <why>".
  const std::string& numa_placement() const { return numa_state_; }
  /// The checkpoint's expert formats ("BF16", "Q4_K+Q6_K", "F8_E4M3").
  std::string source_format() const;
  /// Whether the experts are stored quantised (GGUF blocks, FP8) rather than as BF16/F16/F32.
  bool quantized_source() const;
  /// Whether they are GGUF blocks (of any ggml type but F32/F16/BF16).
  bool ggml_source() const;
  /// Whether packing as `dtype` / `group` keeps every source value exactly (GGUF Q8_0 -> INT8
  /// group 32, Q4_0 -> INT4/INT8 group 32); false for pre-packed experts.
  bool exact_pack(kernels::cpu::ExpertDType dtype, int64_t group) const;
  /// True when the checkpoint's experts are pre-packed (Note [Pre-packed experts]).
  bool prepacked() const { return !prepacked_file_.empty(); }
  /// What the cache did at load: "off", "hit", "written", or "not written: <reason>".
  const std::string& cache_state() const { return cache_state_; }
  const std::filesystem::path& cache_file() const { return cache_file_; }
  uint64_t resident_bytes() const { return region_bytes_; }
  /// Tile kernels of the most recent forward call ("avx512_vnni_int4", "...+amx_int4").
  std::string last_kernels() const;
  /// Since load: expert weight reads (distinct experts per forward call and layer: each is read
  /// from RAM once per call however many tokens route to it) and (token, expert) pairs computed.
  /// reads < pairs is what batching tokens (prefill, or many sequences per decode step) saves.
  uint64_t expert_reads() const { return reads_.load(std::memory_order_relaxed); }
  uint64_t expert_pairs() const { return pairs_.load(std::memory_order_relaxed); }

 private:
  struct Source {
    kernels::cpu::MatrixSource gate, up, down;
  };
  std::vector<std::string> source_formats_;
  int64_t hidden_ = 0, inter_ = 0, num_experts_ = 0;
  uint64_t source_bytes_ = 0;
  std::shared_ptr<core::OwnedWeights> owned_;
  std::vector<std::vector<Source>> sources_;  // empty for dense layers; cleared after pack()
  std::vector<std::pair<const std::byte*, size_t>> mapped_;  // checkpoint ranges per layer
  std::vector<size_t> mapped_layer_;                         // layer of each range
  ExpertStoreOptions opts_;
  kernels::cpu::PackedLayout gate_up_, down_;
  std::vector<std::vector<kernels::cpu::PackedExpert>> packed_;
  void* region_ = nullptr;  // packed experts (inside the mapping below)
  size_t region_bytes_ = 0;
  void* mapping_ = nullptr;  // anonymous memory, or the cache file's mapping
  bool file_backed_ = false;
  size_t mapping_bytes_ = 0;
  std::string cache_state_ = "off";
  std::filesystem::path cache_file_;
  std::vector<std::string> source_files_;  // checkpoint files holding routed experts
  std::filesystem::path checkpoint_dir_;
  std::filesystem::path prepacked_file_;
  kernels::cpu::ExpertDType prepacked_dtype_ = kernels::cpu::ExpertDType::kBF16;
  int64_t prepacked_group_ = 0;
  int numa_nodes_ = 1;  // nodes the experts' pages are bound over (1: none)
  std::string numa_state_ = "one node";
  void place_on_numa_nodes(kernels::Executor& ex, const uint8_t* base, bool migrate);
  std::string cache_key() const;
  bool load_cache(const std::function<void(uint64_t)>& progress);
  void write_cache();
  std::atomic<const char*> last_small_{nullptr}, last_large_{nullptr};
  std::atomic<uint64_t> reads_{0}, pairs_{0};
};

/// A page range of the packed region and the NUMA node it goes to.
struct NodePageRange {
  size_t begin = 0, end = 0;  ///< byte offsets from the region's start, multiples of `page`
  int node = 0;
};
/// Note [Packed experts on their NUMA nodes]: the ranges of a packed region whose MoE layers start
/// at `layer_offsets` (bytes from the region's start, a page-aligned address), each `experts`
/// experts of `per_expert` bytes: node n gets experts [first_expert_of_node(n),
/// first_expert_of_node(n + 1)) of every layer. Every boundary rounds down to `page` and the last
/// layer's end up, so the ranges are disjoint; empty ones are left out. One node: nothing.
std::vector<NodePageRange> numa_page_ranges(const std::vector<size_t>& layer_offsets,
                                            size_t per_expert, int64_t experts, int nodes,
                                            size_t page);

/// Writes a pre-packed experts file (Note [Pre-packed experts]) for `cfg`: one add_layer() per MoE
/// layer in order, with that layer's experts as fused tensors (gate_up [E, 2I, H], down [E, H, I];
/// BF16 or F32, row-major), then finish(). The file appears under its name only when complete.
class PackedExpertsWriter {
 public:
  PackedExpertsWriter(const std::filesystem::path& path, const core::ModelConfig& cfg,
                      kernels::cpu::ExpertDType dtype, int64_t group_size, int num_threads = 0);
  ~PackedExpertsWriter();
  PackedExpertsWriter(const PackedExpertsWriter&) = delete;
  PackedExpertsWriter& operator=(const PackedExpertsWriter&) = delete;
  void add_layer(const void* gate_up, const void* down, kernels::DType src_dtype);
  void finish();
  int64_t layers_written() const { return written_; }
  int64_t layers_expected() const { return moe_layers_; }

 private:
  std::filesystem::path path_, tmp_;
  int fd_ = -1;
  int64_t hidden_, inter_, experts_, moe_layers_ = 0, written_ = 0;
  kernels::cpu::PackedLayout gate_up_, down_;
  std::unique_ptr<kernels::Executor> ex_;
  std::vector<uint8_t> buf_;
};

}  // namespace tidal::offload
