// SPDX-License-Identifier: Apache-2.0
/// \file executor_tbb.cpp
/// \brief Executor implementation on a TBB task arena whose worker threads are pinned to physical
/// cores with hwloc.
///
/// Note [Worker pinning]
/// Each TBB worker thread, the first time it enters the arena, is bound to one physical core (its
/// first hardware thread): cores are handed out in order from core 1 (of CorePinning's order,
/// spread over NUMA nodes: Note [NUMA spread] in core_pinning.cpp), so the expert kernels'
/// per-thread streams do not migrate and two workers do not share a core's caches and
/// prefetchers. TBB calls the observer every time a worker joins the arena (that can be every
/// parallel job), so later entries cost one thread-local check: no allocation or syscall per job.
/// The application's own thread (it joins as the arena's master) is left unpinned. Pinning is
/// skipped when the arena has more threads than the machine has cores, or with
/// TIDAL_PIN_THREADS=0.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>
#include <tbb/task_scheduler_observer.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "kernels/common/core_pinning.h"
#include "kernels/common/executor.h"

namespace tidal::kernels {
namespace {

class CorePinner final : public tbb::task_scheduler_observer {
 public:
  CorePinner(tbb::task_arena& arena, int threads, int reserved)
      : tbb::task_scheduler_observer(arena), cores_(threads, reserved) {
    if (cores_.active()) observe(true);
  }
  ~CorePinner() override { observe(false); }
  bool active() const { return cores_.active(); }
  int numa_nodes() const { return cores_.active() ? cores_.numa_nodes() : 1; }
  bool bind_memory(void* addr, size_t len, int node, bool migrate) const {
    return cores_.bind_memory(addr, len, node, migrate);
  }
  void on_scheduler_entry(bool is_worker) override {
    if (is_worker) cores_.bind(tbb::this_task_arena::current_thread_index());
  }

 private:
  CorePinning cores_;
};

class TbbExecutor final : public Executor {
 public:
  TbbExecutor(int num_threads, int reserved)
      : arena_(num_threads), pinner_(arena_, num_threads, reserved) {}
  ~TbbExecutor() override = default;
  int num_threads() const override { return arena_.max_concurrency(); }
  const char* name() const override { return "tbb"; }
  bool pinned() const override { return pinner_.active(); }
  int numa_nodes() const override { return pinner_.numa_nodes(); }
  bool bind_memory(void* addr, size_t len, int node, bool migrate) override {
    return pinner_.bind_memory(addr, len, node, migrate);
  }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n <= grain || arena_.max_concurrency() == 1) {
      fn(0, n);
      return;
    }
    arena_.execute([&] {
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, grain),
                        [&](const tbb::blocked_range<int64_t>& r) { fn(r.begin(), r.end()); });
    });
  }

 private:
  tbb::task_arena arena_;
  CorePinner pinner_;
};

}  // namespace

std::unique_ptr<Executor> make_tbb_executor(int num_threads, int reserved_cores) {
  if (num_threads <= 0)
    num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<TbbExecutor>(num_threads, reserved_cores);
}

}  // namespace tidal::kernels
