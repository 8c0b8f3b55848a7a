// SPDX-License-Identifier: Apache-2.0
/// \file runtime.cpp
/// \brief Runtime loading (config, checkpoint, placement of experts in the host store), logits,
/// generation.
#include "core/runtime/runtime.h"

#include <hwloc.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "core/error.h"
#include "offload/expert_store.h"
#ifdef TIDAL_WITH_CUDA
#include "kernels/cuda/device_info.h"
#endif

namespace tidal::runtime {
namespace fs = std::filesystem;

int physical_core_count() {
  hwloc_topology_t topo;
  int n = 0;
  if (hwloc_topology_init(&topo) == 0) {
    if (hwloc_topology_load(topo) == 0) n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    hwloc_topology_destroy(topo);
  }
  return n > 0 ? n : 1;
}

void GenerationConfig::validate() const {
  TIDAL_CHECK(max_new_tokens >= 0, InvalidArgument, "max_new_tokens must be >= 0, got {}",
              max_new_tokens);
  sampling.validate();
}

namespace {
void check_device(const std::string& device) {
  if (device == "cpu") return;
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#ifdef TIDAL_WITH_CUDA
    const int n = kernels::cuda::device_count();
    TIDAL_CHECK(n > 0, InvalidArgument,
                "device=\"{}\" was requested but no CUDA device is available on this machine; "
                "use device=\"cpu\"",
                device);
    throw Unsupported(
        fmt::format("device=\"{}\": the CUDA backend is not implemented yet (found {}); use "
                    "device=\"cpu\"",
                    device, kernels::cuda::device_description(0)));
#else
    throw Unsupported(
        fmt::format("device=\"{}\": this build of tidal has no CUDA support (built without nvcc); "
                    "use device=\"cpu\"",
                    device));
#endif
  }
  throw InvalidArgument(fmt::format("device must be \"cpu\" or \"cuda\", got \"{}\"", device));
}
}  // namespace

std::shared_ptr<Runtime> Runtime::load(const fs::path& path, const RuntimeOptions& opts) {
  check_device(opts.device);
  TIDAL_CHECK(opts.num_threads >= 0, InvalidArgument,
              "num_threads must be >= 0 (0 = one per physical core), got {}", opts.num_threads);
  const int max_threads = 4 * static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  TIDAL_CHECK(opts.num_threads <= max_threads, InvalidArgument,
              "num_threads={} is more than 4x the {} hardware threads of this machine",
              opts.num_threads, max_threads / 4);
  TIDAL_CHECK(fs::exists(path), FileNotFound, "model path \"{}\" does not exist", path.string());
  TIDAL_CHECK(fs::is_directory(path), InvalidArgument,
              "model path \"{}\" must be a checkpoint directory (config.json + *.safetensors)",
              path.string());
  const fs::path cfg_path = path / "config.json";
  TIDAL_CHECK(fs::exists(cfg_path), FileNotFound, "model directory \"{}\" has no config.json",
              path.string());
  auto rt = std::shared_ptr<Runtime>(new Runtime());
  rt->opts_ = opts;
  const core::ModelConfig cfg = core::ModelConfig::from_file(cfg_path);
  rt->checkpoint_ = core::Checkpoint::open(path);
  // Experts first: every tensor is checked before any compute, and the expert store owns the routed
  // experts.
  auto experts = std::make_shared<offload::ExpertStore>(cfg, *rt->checkpoint_);
  rt->model_ = std::make_unique<core::Model>(cfg, *rt->checkpoint_, std::move(experts));
  rt->executor_ =
      kernels::make_tbb_executor(opts.num_threads > 0 ? opts.num_threads : physical_core_count());
  return rt;
}

void Runtime::check_token_ids(std::span<const int64_t> ids, bool non_empty) const {
  TIDAL_CHECK(!non_empty || !ids.empty(), InvalidArgument,
              "token_ids is empty: give at least one token");
  const int64_t V = config().vocab_size;
  for (size_t i = 0; i < ids.size(); ++i)
    TIDAL_CHECK(ids[i] >= 0 && ids[i] < V, InvalidArgument,
                "token_ids[{}] = {} is out of range [0, {}) (vocab_size)", i, ids[i], V);
}

std::vector<float> Runtime::logits(std::span<const int64_t> ids) const {
  check_token_ids(ids, true);
  core::SequenceState st = model_->new_state();
  std::vector<float> out;
  model_->forward(ids, st, core::LogitsMode::kAll, out, *executor_);
  return out;
}

GenerationResult Runtime::generate(std::span<const int64_t> prompt,
                                   const GenerationConfig& gen) const {
  check_token_ids(prompt, true);
  gen.validate();
  GenerationResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  res.finish_reason = "length";
  if (gen.max_new_tokens == 0) return res;
  using clock = std::chrono::steady_clock;
  Sampler sampler(gen.sampling);
  core::SequenceState st = model_->new_state();
  std::vector<float> logits;
  auto t0 = clock::now();
  model_->forward(prompt, st, core::LogitsMode::kLast, logits, *executor_);
  auto t1 = clock::now();
  res.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t i = 0; i < gen.max_new_tokens; ++i) {
    const int64_t tok = sampler.sample(logits);
    res.token_ids.push_back(tok);
    if (std::find(gen.stop_token_ids.begin(), gen.stop_token_ids.end(), tok) !=
        gen.stop_token_ids.end()) {
      res.finish_reason = "stop";
      break;
    }
    if (i + 1 == gen.max_new_tokens) break;
    const int64_t one[1] = {tok};
    model_->forward(one, st, core::LogitsMode::kLast, logits, *executor_);
  }
  res.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return res;
}

Sequence::Sequence(std::shared_ptr<const Runtime> rt)
    : rt_(std::move(rt)), state_(rt_->model().new_state()) {}

std::vector<float> Sequence::forward(std::span<const int64_t> ids, bool all_logits) {
  rt_->check_token_ids(ids, true);
  std::vector<float> out;
  rt_->model().forward(ids, state_, all_logits ? core::LogitsMode::kAll : core::LogitsMode::kLast,
                       out, rt_->executor());
  return out;
}

}  // namespace tidal::runtime
