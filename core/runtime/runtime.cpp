// SPDX-License-Identifier: Apache-2.0
/// \file runtime.cpp
/// \brief Runtime loading (config, checkpoint, placement of experts in the host store), logits,
/// generation.
#include "core/runtime/runtime.h"

#include <fmt/ranges.h>
#include <hwloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <thread>

#include "core/checkpoint/gguf_model.h"
#include "core/error.h"
#include "kernels/cpu/expert_gemm.h"
#include "offload/expert_cache.h"
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

namespace {
using BwClock = std::chrono::steady_clock;
}  // namespace

double measure_read_bandwidth(size_t bytes, int num_threads, int repeats) {
  TIDAL_CHECK(bytes >= (size_t{1} << 20), InvalidArgument,
              "bandwidth buffer must be at least 1 MiB, got {} bytes", bytes);
  TIDAL_CHECK(repeats >= 1, InvalidArgument, "repeats must be >= 1, got {}", repeats);
  const int nt = num_threads > 0 ? num_threads : physical_core_count();
  // The runtime's workers poll for work for TIDAL_SPIN_US after each job: let them fall asleep, or
  // they share the cores with the probe's threads (a reading 10-20% low on the GPU machine).
  kernels::wait_for_idle_workers(std::chrono::milliseconds(200));
  const size_t n = bytes / sizeof(uint64_t);
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i;  // touch every page before timing
  double best = 0.0;
  std::atomic<uint64_t> sink{0};
  for (int r = 0; r < repeats; ++r) {
    std::vector<std::thread> threads;
    const auto t0 = BwClock::now();
    for (int t = 0; t < nt; ++t)
      threads.emplace_back([&, t] {
        const size_t b = n * static_cast<size_t>(t) / static_cast<size_t>(nt);
        const size_t e = n * static_cast<size_t>(t + 1) / static_cast<size_t>(nt);
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;  // independent sums: the loop vectorises
        size_t i = b;
        for (; i + 4 <= e; i += 4) {
          a0 += buf[i];
          a1 += buf[i + 1];
          a2 += buf[i + 2];
          a3 += buf[i + 3];
        }
        for (; i < e; ++i) a0 += buf[i];
        sink.fetch_add(a0 + a1 + a2 + a3, std::memory_order_relaxed);
      });
    for (auto& th : threads) th.join();
    const double s = std::chrono::duration<double>(BwClock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / s);
  }
  return best;
}

void GenerationConfig::validate() const {
  TIDAL_CHECK(max_new_tokens >= 0, InvalidArgument, "max_new_tokens must be >= 0, got {}",
              max_new_tokens);
  sampling.validate();
}

namespace {
/// Parses "cpu", "cuda" or "cuda:N"; returns the CUDA ordinal (-1 for the CPU). Throws for an
/// unknown device, a build without CUDA, or a machine without a GPU.
int check_device(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
    int ordinal = 0;
    if (device.size() > 5) {
      const std::string num = device.substr(5);
      TIDAL_CHECK(!num.empty() && num.size() < 4 &&
                      num.find_first_not_of("0123456789") == std::string::npos,
                  InvalidArgument, "device=\"{}\": expected \"cuda\" or \"cuda:N\"", device);
      ordinal = std::stoi(num);
    }
#ifdef TIDAL_WITH_CUDA
    const int n = kernels::cuda::device_count();
    TIDAL_CHECK(n > 0, InvalidArgument,
                "device=\"{}\" was requested but no CUDA device is available on this machine; "
                "use device=\"cpu\"",
                device);
    TIDAL_CHECK(ordinal < n, InvalidArgument, "device=\"{}\": this machine has {} CUDA device(s)",
                device, n);
    return ordinal;
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

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// Tensors the model never reads: the vision tower and the MTP head (not run yet).
bool unused_tensor(const std::string& name) {
  return name.rfind("mtp.", 0) == 0 || name.rfind("model.mtp.", 0) == 0 ||
         name.rfind("visual.", 0) == 0 || name.rfind("model.visual.", 0) == 0;
}

/// Routed-expert tensors: packed by the expert store, not memory-mapped for compute.
bool routed_expert_tensor(const std::string& name) {
  return name.find(".mlp.experts.") != std::string::npos;
}

// Note [Expert dtype choice]
// "auto" keeps the checkpoint's precision (bf16) when dense weights + packed experts fit in 90%
// of MemAvailable (which counts reclaimable page cache, so the checkpoint's own cached pages do
// not block it), else the most precise quantised format that fits. An explicit dtype that cannot
// fit is an OutOfMemory error naming the sizes, raised before anything is packed.

/// MemAvailable of /proc/meminfo in bytes (0 when unknown).
uint64_t available_memory() {
  // TIDAL_MEM_AVAILABLE (bytes) stands in for MemAvailable: the tests' way to load a small model
  // into "too little RAM" (tests/python/test_errors.py), and a user's to plan for less than is
  // free.
  if (const char* e = std::getenv("TIDAL_MEM_AVAILABLE"); e != nullptr && *e != '\0') {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(e, &end, 10);
    TIDAL_CHECK(end != nullptr && *end == '\0' && v > 0, InvalidArgument,
                "TIDAL_MEM_AVAILABLE must be a positive number of bytes, got \"{}\"", e);
    return v;
  }
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

/// Reads the pages of [p, p+n) into memory: MADV_POPULATE_READ where the kernel has it (5.14+),
/// else one load per page.
void populate_range(const std::byte* p, size_t n) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t b = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(p) + n;
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
  if (madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_READ) == 0) return;
  uint8_t acc = 0;
  for (uintptr_t a = b; a < e; a += page)
    acc = static_cast<uint8_t>(acc ^ *reinterpret_cast<const volatile uint8_t*>(a));
  static std::atomic<uint8_t> sink{0};  // keeps the loads
  sink.fetch_xor(acc, std::memory_order_relaxed);
}
}  // namespace

std::shared_ptr<Runtime> Runtime::load(const fs::path& path, const RuntimeOptions& opts,
                                       const LoadProgress& progress) {
  const auto t_load = Clock::now();
  const int cuda_ordinal = check_device(opts.device);
  {  // read by the expert op at its first call; a bad value must fail here, not mid-forward
    const char* amx = std::getenv("TIDAL_EXPERT_AMX_BF16");
    try {
      kernels::cpu::parse_approximation(amx == nullptr ? "" : amx);
    } catch (const std::invalid_argument& e) {
      throw InvalidArgument(e.what());
    }
  }
  TIDAL_CHECK(opts.num_threads >= 0, InvalidArgument,
              "num_threads must be >= 0 (0 = one per physical core), got {}", opts.num_threads);
  const int max_threads = 4 * static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  TIDAL_CHECK(opts.num_threads <= max_threads, InvalidArgument,
              "num_threads={} is more than 4x the {} hardware threads of this machine",
              opts.num_threads, max_threads / 4);
  TIDAL_CHECK(opts.max_context >= 0, InvalidArgument,
              "max_context must be >= 1 tokens (or unset), got {}", opts.max_context);
  TIDAL_CHECK(fs::exists(path), FileNotFound, "model path \"{}\" does not exist", path.string());
  const bool gguf = fs::is_regular_file(path) && path.extension() == ".gguf";
  TIDAL_CHECK(gguf || fs::is_directory(path), InvalidArgument,
              "model path \"{}\" must be a checkpoint directory (config.json + *.safetensors) or a "
              ".gguf file",
              path.string());
  auto rt = std::shared_ptr<Runtime>(new Runtime());
  rt->opts_ = opts;
  core::ModelConfig cfg;
  if (gguf) {  // Note [GGUF models] (core/checkpoint/gguf_model.cpp)
    core::GgufModel gm = core::open_gguf_model(path);
    cfg = core::ModelConfig::from_json(gm.config, path.string());
    rt->checkpoint_ = std::move(gm.checkpoint);
  } else {
    const fs::path cfg_path = path / "config.json";
    if (!fs::exists(cfg_path)) {
      std::vector<std::string> ggufs;
      for (const auto& e : fs::directory_iterator(path))
        if (e.path().extension() == ".gguf") ggufs.push_back(e.path().filename().string());
      std::sort(ggufs.begin(), ggufs.end());
      TIDAL_CHECK(ggufs.empty(), InvalidArgument,
                  "model directory \"{}\" has no config.json but holds GGUF files ({}): pass the "
                  ".gguf file itself (the first part of a split model)",
                  path.string(), fmt::join(ggufs, ", "));
      throw FileNotFound(fmt::format("model directory \"{}\" has no config.json", path.string()));
    }
    cfg = core::ModelConfig::from_file(cfg_path);
    rt->checkpoint_ = core::Checkpoint::open(path);
  }
  // Experts first: every tensor is checked before any compute, and the expert store owns the routed
  // experts.
  TIDAL_CHECK(opts.max_context <= cfg.max_position_embeddings, InvalidArgument,
              "max_context={} is longer than the model's context (max_position_embeddings = {})",
              opts.max_context, cfg.max_position_embeddings);
  auto experts = std::make_shared<offload::ExpertStore>(cfg, *rt->checkpoint_);
  rt->experts_ = experts;
  // Note [A core for the GPU thread]: with device="cuda" one core is kept for the thread that
  // drives the GPU (it spins in the CUDA driver while it waits for the router ids between the host
  // expert calls) and the driver's own threads. The default thread count is one less than the
  // physical cores, and workers are pinned only where the threads and that core fit. With 16
  // threads on 16 cores (workers pinned to cores 1-15, the calling thread unpinned), each decode
  // expert call of tidal-mini took 67 µs instead of 11, and the whole step 894 µs instead of 444
  // (H100 machine; docs/performance.md): most likely those threads preempted pinned workers, which
  // could not move, and the op's hand-offs waited for them. An explicit cpu_threads is kept
  // (unpinned when it leaves no core free).
  const int reserve = cuda_ordinal >= 0 ? 1 : 0;
  const int default_threads = std::max(1, physical_core_count() - reserve);
  rt->executor_ =
      kernels::make_executor(opts.num_threads > 0 ? opts.num_threads : default_threads, reserve);
  kernels::Isa cpu_isa;
  try {
    cpu_isa = kernels::resolve_isa(opts.cpu_isa);
  } catch (const std::invalid_argument& e) {
    throw InvalidArgument(e.what());
  }
  std::optional<core::CudaOptions> cuda;
  if (cuda_ordinal >= 0) {
    cuda.emplace();
    cuda->device = cuda_ordinal;
    cuda->host_isa = cpu_isa;
    cuda->weights = opts.gpu_weights;
    cuda->precision = opts.gpu_precision;
    cuda->memory_limit = opts.gpu_memory;
    cuda->graphs = opts.cuda_graphs;
    cuda->kv_dtype = opts.kv_cache_dtype;
    if (opts.max_context > 0) cuda->kv_reserve_tokens = opts.max_context;
    TIDAL_CHECK(opts.gpu_expert_slots >= -1, InvalidArgument,
                "gpu_expert_slots must be >= 0 (or None for what gpu_memory leaves), got {}",
                opts.gpu_expert_slots);
    (void)offload::parse_cache_policy(opts.gpu_expert_policy);  // InvalidArgument naming it
    cuda->expert_slots = opts.gpu_expert_slots;
    cuda->expert_cache_policy = opts.gpu_expert_policy;
  }
  rt->model_ = std::make_unique<core::Model>(cfg, *rt->checkpoint_, experts,
                                             cuda ? &*cuda : nullptr, rt->executor_.get());

  offload::ExpertStoreOptions eopts;
  eopts.isa = cpu_isa;
  rt->model_->set_cpu_isa(cpu_isa);  // the dense CPU projections too (Note [CPU linear])
  TIDAL_CHECK(opts.expert_group_size == 0 || opts.expert_group_size == 32 ||
                  opts.expert_group_size == 64 || opts.expert_group_size == 128,
              InvalidArgument, "expert_group_size must be 32, 64 or 128 (0: default), got {}",
              opts.expert_group_size);
  eopts.group_size = opts.expert_group_size;

  // Dense tensors stay memory-mapped (read into RAM below); routed experts are packed.
  std::vector<const core::TensorInfo*> used;
  uint64_t used_bytes = 0, all_bytes = 0;
  for (const auto& name : rt->checkpoint_->names()) {
    const core::TensorInfo* t = rt->checkpoint_->find(name);
    all_bytes += t->nbytes;
    if (unused_tensor(name) || routed_expert_tensor(name)) continue;
    used.push_back(t);
    used_bytes += t->nbytes;
  }
  const uint64_t avail = available_memory();
  // See Note [Expert dtype choice].
  const double gib = 1 << 30;
  auto need = [&](kernels::cpu::ExpertDType dt) {
    return used_bytes + experts->packed_bytes(dt, eopts.group_size);
  };
  auto fits = [&](kernels::cpu::ExpertDType dt) { return avail == 0 || need(dt) < avail / 10 * 9; };
  using kernels::cpu::ExpertDType;
  if (experts->prepacked() && opts.expert_dtype == "auto") {
    // Note [Pre-packed experts]: "auto" is the file's format; another one is refused by pack().
    eopts.dtype = kernels::cpu::parse_expert_dtype(cfg.packed_experts.dtype);
    if (eopts.group_size == 0) eopts.group_size = cfg.packed_experts.group_size;
    TIDAL_CHECK(fits(eopts.dtype), OutOfMemory,
                "the model needs {:.1f} GiB of RAM with its pre-packed {} experts, but {:.1f} GiB "
                "is available",
                static_cast<double>(need(eopts.dtype)) / gib, cfg.packed_experts.dtype,
                static_cast<double>(avail) / gib);
  } else if (opts.expert_dtype == "auto" && experts->quantized_source()) {
    // GGUF blocks and FP8 (Note [Expert dtype choice]): an exact repack where the source has one
    // (Q4_0 -> int4, Q8_0 -> int8, group 32), else int8, else int4. Other ggml types keep group 32,
    // their (sub-)block: requantising Q4_K_M to int8 g32 adds 4% to the logit error Q4_K_M itself
    // makes, g128 22% (tests/python/test_gguf_load.py). FP8 takes the default groups (64 and up run
    // on AMX): on tidal-mini int8 g128 and g32 are as close to BF16 (KL 0.0054 / 0.0055). BF16
    // would be bigger than the file the user chose.
    if (eopts.group_size == 0 && experts->ggml_source()) eopts.group_size = 32;
    const int64_t g = eopts.group_size;
    if (experts->exact_pack(ExpertDType::kINT4, g ? g : 32) && fits(ExpertDType::kINT4)) {
      eopts.dtype = ExpertDType::kINT4;
      eopts.group_size = g ? g : 32;
    } else if (experts->exact_pack(ExpertDType::kINT8, g ? g : 32) && fits(ExpertDType::kINT8)) {
      eopts.dtype = ExpertDType::kINT8;
      eopts.group_size = g ? g : 32;
    } else if (fits(ExpertDType::kINT8)) {
      eopts.dtype = ExpertDType::kINT8;
    } else if (fits(ExpertDType::kINT4)) {
      eopts.dtype = ExpertDType::kINT4;
    } else {
      throw OutOfMemory(fmt::format(
          "the model needs {:.1f} GiB of RAM even with int4 experts, but {:.1f} GiB is available",
          static_cast<double>(need(ExpertDType::kINT4)) / gib, static_cast<double>(avail) / gib));
    }
  } else if (opts.expert_dtype == "auto") {
    if (fits(ExpertDType::kBF16))
      eopts.dtype = ExpertDType::kBF16;
    else if (fits(ExpertDType::kINT8))
      eopts.dtype = ExpertDType::kINT8;
    else if (fits(ExpertDType::kINT4))
      eopts.dtype = ExpertDType::kINT4;
    else
      throw OutOfMemory(fmt::format(
          "the model needs {:.1f} GiB of RAM even with int4 experts, but {:.1f} GiB is available",
          static_cast<double>(need(ExpertDType::kINT4)) / gib, static_cast<double>(avail) / gib));
  } else {
    try {
      eopts.dtype = kernels::cpu::parse_expert_dtype(opts.expert_dtype);
      // GGUF blocks: group 32 (the blocks; exact for Q8_0 / Q4_0).
      if (eopts.group_size == 0 && eopts.dtype != ExpertDType::kBF16 && experts->ggml_source())
        eopts.group_size = 32;
    } catch (const std::invalid_argument&) {
      throw InvalidArgument(fmt::format("expert_dtype must be auto, bf16, int8 or int4, got \"{}\"",
                                        opts.expert_dtype));
    }
    TIDAL_CHECK(fits(eopts.dtype), OutOfMemory,
                "{} experts need {:.1f} GiB of RAM (with the dense weights), but {:.1f} GiB is "
                "available; use expert_dtype=\"int8\" or \"int4\" (or \"auto\")",
                kernels::cpu::expert_dtype_name(eopts.dtype),
                static_cast<double>(need(eopts.dtype)) / gib, static_cast<double>(avail) / gib);
  }

  // See Note [Packed expert cache] (offload/expert_store.cpp).
  if (experts->prepacked() && eopts.group_size == 0)
    eopts.group_size = cfg.packed_experts.group_size;  // an explicit dtype with the default group
  if (experts->prepacked()) {
    // The pre-packed file is mapped as it is; there is nothing to cache.
  } else if (opts.expert_cache == "auto") {
    // Not for GGUF experts: the int8 repack of a K-quant file is 1.75x its experts' size, so a
    // cache would read more from disk than the file and double the disk use, to save a decode that
    // runs at memory speed (docs/performance.md). FP8 experts are cached like BF16 ones (int8 g128
    // is about their size; a warm reload maps instead of decoding).
    if (eopts.dtype != ExpertDType::kBF16 && experts->source_bytes() >= (uint64_t{1} << 30) &&
        !experts->ggml_source()) {
      const fs::path dir = fs::is_directory(path) ? path : path.parent_path();
      if (access(dir.c_str(), W_OK) == 0) {
        eopts.cache_dir = dir / ".tidal-cache";
      } else {
        const char* xdg = std::getenv("XDG_CACHE_HOME");
        const char* home = std::getenv("HOME");
        const fs::path base = xdg && *xdg ? fs::path(xdg)
                              : home      ? fs::path(home) / ".cache"
                                          : fs::path();
        if (!base.empty())
          eopts.cache_dir =
              base / "tidal" /
              fmt::format("{:016x}", std::hash<std::string>{}(fs::absolute(dir).string()));
      }
    }
  } else if (opts.expert_cache != "off" && !opts.expert_cache.empty()) {
    eopts.cache_dir = opts.expert_cache;
  }

  // Bring the dense weights into RAM (progress in bytes) unless they cannot fit, then pack the
  // experts, streaming the checkpoint layer by layer.
  const uint64_t total = used_bytes + experts->source_bytes();
  const bool populate = opts.populate && (avail == 0 || used_bytes < avail / 10 * 9);
  uint64_t done = 0;
  if (progress) progress(0, total);
  if (populate) {
    constexpr size_t kChunk = size_t{64} << 20;
    for (const auto* t : used)
      for (size_t off = 0; off < t->nbytes; off += kChunk) {
        const size_t n = std::min(kChunk, t->nbytes - off);
        populate_range(t->data + off, n);
        done += n;
        if (progress) progress(done, total);
      }
  }
  done = used_bytes;
  experts->pack(eopts, *rt->executor_, [&](uint64_t d) {
    if (progress) progress(done + d, total);
  });
  if (progress) progress(total, total);
#if TIDAL_WITH_CUDA
  // The VRAM expert cache: slots sized and allocated, host experts registered for DMA, now (a
  // budget it cannot meet is a load error, not a first-request one).
  if (auto* g = rt->model_->cuda()) g->init_expert_cache(*rt->executor_);
  // The load's own expert calls (Note [Measuring the stream threshold]) are not the user's.
  rt->reads_base_ = experts->expert_reads();
  rt->pairs_base_ = experts->expert_pairs();
#endif
  rt->stats_.expert_bytes = experts->resident_bytes();
  rt->stats_.weight_bytes = used_bytes + experts->resident_bytes();
  rt->stats_.checkpoint_file_bytes = all_bytes;
  rt->stats_.weights_populated = populate;
  rt->stats_.load_seconds = seconds_since(t_load);
  return rt;
}

std::map<std::string, std::string> Runtime::describe() const {
  const auto& eo = experts_->options();
  std::map<std::string, std::string> d;
  d["device"] = opts_.device;
  d["cpu"] = kernels::cpu_features().brand;
  d["cpu_isa"] = std::string(kernels::isa_name(eo.isa));
  d["cpu_isa_best"] = std::string(kernels::isa_name(kernels::cpu_features().best));
  d["expert_dtype"] = std::string(kernels::cpu::expert_dtype_name(eo.dtype));
  d["expert_group_size"] =
      std::to_string(eo.dtype == kernels::cpu::ExpertDType::kBF16 ? 0 : eo.group_size);
  d["expert_layout"] = std::string(kernels::cpu::kExpertLayoutName);
  d["expert_kernels"] = experts_->last_kernels();
  d["expert_cache"] = experts_->cache_state();
  d["expert_numa"] = experts_->numa_placement();  // Note [Packed experts on their NUMA nodes]
  d["expert_source"] = experts_->prepacked() ? "pre-packed" : experts_->source_format();
  d["expert_cache_file"] = experts_->cache_file().string();
  d["threads"] = std::to_string(executor_->num_threads());
  d["cpu_executor"] = executor_->name();
  d["cpu_pinned"] = executor_->pinned() ? "yes" : "no";  // Note [A core for the GPU thread]
  d["cpu_numa_nodes"] = std::to_string(executor_->numa_nodes());  // Note [NUMA spread]
  if (const auto* g = model_->cuda()) {
    d["gpu"] = g->device_name();
    d["gpu_weights"] = opts_.gpu_weights;
    d["gpu_precision"] = opts_.gpu_precision;
    d["kv_cache_dtype"] = opts_.gpu_precision == "fp32" ? "fp32" : opts_.kv_cache_dtype;
    d["cuda_graphs"] = opts_.cuda_graphs ? "on" : "off";
    d["cuda_decode"] = g->decode_kernels();
    d["prefill_stream"] = g->prefill_stream_plan();
  }
  return d;
}

std::map<std::string, uint64_t> Runtime::memory_report() const {
  std::map<std::string, uint64_t> r;
  const auto* g = model_->cuda();
  TIDAL_CHECK(g != nullptr, InvalidArgument,
              "memory_report() describes VRAM; this runtime runs on device=\"{}\" (see stats())",
              opts_.device);
#if TIDAL_WITH_CUDA
  const core::GpuMemoryReport m = g->memory_report();
  r["weights"] = m.weights;
  r["weights_bf16_equivalent"] = m.weights_bf16_equivalent;
  r["kv_cache"] = m.kv_cache;
  r["deltanet_state"] = m.deltanet_state;
  r["workspaces"] = m.workspaces;
  r["expert_cache"] = m.expert_cache;
  r["used"] = m.weights + m.kv_cache + m.deltanet_state + m.workspaces + m.expert_cache;
  r["free"] = m.free;
  r["total"] = m.total;
  r["limit"] = m.limit;
#endif
  return r;
}

RuntimeStats Runtime::stats() const {
  std::lock_guard lock(stats_mu_);
  RuntimeStats s = stats_;
  if (experts_) {
    s.expert_reads = experts_->expert_reads() - reads_base_;
    s.expert_pairs = experts_->expert_pairs() - pairs_base_;
  }
  auto la = model().routing().lookahead_counts();
  s.lookahead_on = model().routing().lookahead();
  s.lookahead_predicted = std::move(la.predicted);
  s.lookahead_routed = std::move(la.routed);
  s.lookahead_hits = std::move(la.hits);
#if TIDAL_WITH_CUDA
  if (const auto* g = model().cuda()) {
    const core::GpuExpertCacheStats c = g->expert_cache_stats();
    s.gpu_expert_slots = c.slots;
    s.gpu_expert_policy = c.policy;
    s.gpu_expert_pairs = c.gpu_pairs;
    s.host_expert_pairs = c.cpu_pairs;
    s.gpu_expert_fills = c.fills;
    s.gpu_expert_bytes_in = c.bytes_in;
    s.gpu_expert_prefetch_slots = c.prefetch_slots;
    s.gpu_expert_prefetched = c.prefetched;
    s.gpu_expert_prefetch_hits = c.prefetch_hits;
    s.layer_gpu_expert_pairs = c.layer_gpu_pairs;
    s.layer_host_expert_pairs = c.layer_cpu_pairs;
    s.layer_gpu_expert_fills = c.layer_fills;
    s.layer_gpu_expert_evictions = c.layer_evictions;
    s.gpu_expert_slot_bytes = c.slot_bytes;
    s.gpu_streamed_layers = c.stream_layers;
    s.gpu_streamed_padded_groups = c.stream_padded_groups;
    s.gpu_streamed_pairs = c.stream_pairs;
    s.gpu_streamed_bytes = c.stream_bytes;
  }
#endif
  return s;
}

void Runtime::reset_stats() {
  std::lock_guard lock(stats_mu_);
  model().routing().reset_lookahead();
#if TIDAL_WITH_CUDA
  if (auto* g = model().cuda()) g->reset_expert_cache_stats();
#endif
  if (experts_) {
    reads_base_ = experts_->expert_reads();
    pairs_base_ = experts_->expert_pairs();
  }
  stats_.prefill_tokens = stats_.decode_tokens = 0;
  stats_.prefill_seconds = stats_.decode_seconds = 0;
  stats_.routed_expert_seconds = stats_.dense_seconds = stats_.sample_seconds = 0;
  stats_.forward_calls = 0;
}

void Runtime::record(int64_t tokens, const core::ForwardProfile& prof,
                     double sample_seconds) const {
  std::lock_guard lock(stats_mu_);
  const double t = prof.total + sample_seconds;
  if (tokens > 1) {
    stats_.prefill_tokens += tokens;
    stats_.prefill_seconds += t;
  } else {
    stats_.decode_tokens += tokens;
    stats_.decode_seconds += t;
  }
  stats_.routed_expert_seconds += prof.routed_experts;
  stats_.dense_seconds += prof.total - prof.routed_experts;
  stats_.sample_seconds += sample_seconds;
  ++stats_.forward_calls;
}

void Runtime::record_memory(int64_t live_delta, int64_t state_delta, int64_t saved_delta) const {
  std::lock_guard lock(stats_mu_);
  stats_.live_sequences += live_delta;
  stats_.state_bytes =
      static_cast<uint64_t>(static_cast<int64_t>(stats_.state_bytes) + state_delta);
  stats_.checkpoint_bytes =
      static_cast<uint64_t>(static_cast<int64_t>(stats_.checkpoint_bytes) + saved_delta);
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
  check_context(0, static_cast<int64_t>(ids.size()));
  core::SequenceState st = model_->new_state();
  std::vector<float> out;
  core::ForwardProfile prof;
  model_->forward(ids, st, core::LogitsMode::kAll, out, *executor_, &prof);
  record(static_cast<int64_t>(ids.size()), prof, 0.0);
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
  Sampler sampler(gen.sampling, prompt);
  core::SequenceState st = model_->new_state();
  std::vector<float> logits;
  auto t0 = clock::now();
  core::ForwardProfile prof;
  model_->forward(prompt, st, core::LogitsMode::kLast, logits, *executor_, &prof);
  record(static_cast<int64_t>(prompt.size()), prof, 0.0);
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
    core::ForwardProfile p1;
    model_->forward(one, st, core::LogitsMode::kLast, logits, *executor_, &p1);
    record(1, p1, 0.0);
  }
  res.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return res;
}

Sequence::Sequence(std::shared_ptr<const Runtime> rt)
    : rt_(std::move(rt)), state_(rt_->model().new_state()) {
  rt_->record_memory(1, 0, 0);
  std::lock_guard lock(mu_);
  account_locked(true);
}

Sequence::~Sequence() {
  if (Scheduler* sched = rt_->scheduler()) sched->forget(&state_);
  rt_->record_memory(-1, -static_cast<int64_t>(accounted_state_),
                     -static_cast<int64_t>(accounted_saved_));
}

void Sequence::account_locked(bool saved_changed) {
  const uint64_t st = core::Model::state_bytes(state_);
  uint64_t sv = accounted_saved_;
  if (saved_changed) {  // checkpoints change rarely: not recounted on every forward call
    sv = 0;
    for (const auto& s : saved_)
      for (size_t l = 0; l < s.conv.size(); ++l)
        sv += (s.conv[l].size() + s.recurrent[l].size()) * sizeof(float);
  }
  rt_->record_memory(0, static_cast<int64_t>(st) - static_cast<int64_t>(accounted_state_),
                     static_cast<int64_t>(sv) - static_cast<int64_t>(accounted_saved_));
  accounted_state_ = st;
  accounted_saved_ = sv;
}

void Runtime::check_context(int64_t held, int64_t adding) const {
  const int64_t limit = opts_.max_context;
  TIDAL_CHECK(limit == 0 || held + adding <= limit, InvalidArgument,
              "context full: the sequence holds {} tokens and {} more would pass max_context = {} "
              "(Runtime.load(max_context=...))",
              held, adding, limit);
}

int64_t Sequence::forward_locked(std::span<const int64_t> ids, core::LogitsMode mode,
                                 std::vector<float>& out, Sampler* sampler) {
  rt_->check_context(state_.num_tokens, static_cast<int64_t>(ids.size()));
  core::ForwardProfile prof;
  int64_t tok = -1;
  double sample_seconds = 0.0;
  if (Scheduler* sched = rt_->scheduler()) {
    tok = sched->run(state_, ids, mode, out, sampler, ctl_, prof, sample_seconds);
    rt_->record(static_cast<int64_t>(ids.size()), prof, sample_seconds);
    account_locked(false);
    return tok;
  }
  ctl_.check();
  rt_->model().forward(ids, state_, mode, out, rt_->executor(), &prof);
  if (sampler) {
    const auto t0 = Clock::now();
    tok = sampler->sample(out);
    sample_seconds = seconds_since(t0);
  }
  rt_->record(static_cast<int64_t>(ids.size()), prof, sample_seconds);
  account_locked(false);
  return tok;
}

std::vector<float> Sequence::forward(std::span<const int64_t> ids, bool all_logits) {
  rt_->check_token_ids(ids, true);
  std::lock_guard lock(mu_);
  std::vector<float> out;
  forward_locked(ids, all_logits ? core::LogitsMode::kAll : core::LogitsMode::kLast, out);
  return out;
}

void Sequence::prefill(std::span<const int64_t> ids) {
  rt_->check_token_ids(ids, false);
  if (ids.empty()) return;
  std::lock_guard lock(mu_);
  std::vector<float> out;
  forward_locked(ids, core::LogitsMode::kNone, out);
}

int64_t Sequence::step(std::span<const int64_t> ids, Sampler& sampler) {
  rt_->check_token_ids(ids, true);
  std::lock_guard lock(mu_);
  std::vector<float> logits;
  return forward_locked(ids, core::LogitsMode::kLast, logits, &sampler);
}

void Sequence::cancel() {
  ctl_.cancelled.store(true);
  if (Scheduler* sched = rt_->scheduler()) sched->poke();
}

void Sequence::reset_controls() {
  ctl_.cancelled.store(false);
  ctl_.deadline_ns.store(0);
}

void Sequence::set_deadline(double seconds) {
  TIDAL_CHECK(std::isfinite(seconds) && seconds >= 0, InvalidArgument,
              "a deadline must be a finite number of seconds >= 0, got {}", seconds);
  if (seconds == 0) {
    ctl_.deadline_ns.store(0);
    return;
  }
  const auto d = std::chrono::steady_clock::now() +
                 std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                     std::chrono::duration<double>(seconds));
  ctl_.deadline_ns.store(std::max<int64_t>(1, d.time_since_epoch().count()));
}

std::vector<float> Runtime::forward_batch(std::span<Sequence* const> seqs,
                                          std::span<const int64_t> ids) const {
  TIDAL_CHECK(seqs.size() == ids.size(), InvalidArgument, "{} sequences but {} token ids",
              seqs.size(), ids.size());
  TIDAL_CHECK(!seqs.empty(), InvalidArgument, "forward_batch needs at least one sequence");
  check_token_ids(ids, true);
  std::vector<Sequence*> order(seqs.begin(), seqs.end());
  std::sort(order.begin(), order.end());
  for (size_t i = 0; i < order.size(); ++i) {
    TIDAL_CHECK(order[i] != nullptr, InvalidArgument, "forward_batch: a sequence is None");
    TIDAL_CHECK(i == 0 || order[i] != order[i - 1], InvalidArgument,
                "forward_batch: the same sequence twice");
    TIDAL_CHECK(order[i]->rt_.get() == this, InvalidArgument,
                "forward_batch: a sequence of another runtime");
  }
  const auto B = static_cast<int64_t>(seqs.size());
  TIDAL_CHECK(B <= model_->max_batch(), InvalidArgument,
              "forward_batch: {} sequences, this model takes at most {} per step", B,
              model_->max_batch());
  std::vector<std::unique_lock<std::mutex>> locks;  // address order: no lock-order inversion
  for (Sequence* s : order) locks.emplace_back(s->mu_);
  for (Sequence* s : seqs) {
    s->ctl_.check();
    check_context(s->state_.num_tokens, 1);
  }
  std::vector<core::SequenceState*> states;
  for (Sequence* s : seqs) states.push_back(&s->state_);
  core::ForwardProfile prof;
  std::vector<float> logits;
  model_->forward_batch(states, ids, logits, *executor_, &prof);
  prof.total /= static_cast<double>(B);
  prof.routed_experts /= static_cast<double>(B);
  for (Sequence* s : seqs) {
    record(1, prof, 0.0);
    s->account_locked(false);
  }
  return logits;
}

void Runtime::enable_batching(const SchedulerOptions& opts) {
  opts.validate();
  std::lock_guard lock(sched_mu_);
  TIDAL_CHECK(scheduler_ == nullptr, InvalidArgument,
              "batching is already enabled on this runtime");
  scheduler_ = std::make_unique<Scheduler>(*this, opts);
  scheduler_ptr_.store(scheduler_.get());
}

int64_t Sequence::num_tokens() const {
  std::lock_guard lock(mu_);
  return state_.num_tokens;
}

std::vector<int64_t> Sequence::checkpoint_positions() const {
  std::lock_guard lock(mu_);
  std::vector<int64_t> out;
  for (const auto& s : saved_) out.push_back(s.num_tokens);
  return out;
}

void Sequence::checkpoint() {
  std::lock_guard lock(mu_);
  if (!rt_->config().is_hybrid()) return;  // attention-only: truncate() is exact without one
  if (!saved_.empty() && saved_.back().num_tokens == state_.num_tokens) return;
  Saved s;
  s.num_tokens = state_.num_tokens;
  rt_->model().save_linear_states(state_, s.conv, s.recurrent);
  saved_.push_back(std::move(s));
  if (saved_.size() > kMaxCheckpoints) saved_.pop_front();
  account_locked(true);
}

int64_t Sequence::truncate(int64_t n) {
  TIDAL_CHECK(n >= 0, InvalidArgument, "truncate: length must be >= 0, got {}", n);
  std::lock_guard lock(mu_);
  if (n >= state_.num_tokens) return state_.num_tokens;
  int64_t to = n;
  if (rt_->config().is_hybrid()) {
    while (!saved_.empty() && saved_.back().num_tokens > n) saved_.pop_back();
    if (saved_.empty()) {
      to = 0;
      rt_->model().restore_linear_states(state_, nullptr, nullptr);
    } else {
      const Saved& s = saved_.back();
      to = s.num_tokens;
      rt_->model().restore_linear_states(state_, &s.conv, &s.recurrent);
    }
  }
  rt_->model().truncate_kv(state_, to);
  account_locked(true);
  return to;
}

}  // namespace tidal::runtime
