// SPDX-License-Identifier: Apache-2.0
/// \file executor.h
/// \brief The one threading interface kernels see: a parallel_for over an index range.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace tidal::kernels {

/// Runs index ranges in parallel. Kernels never create threads themselves.
class Executor {
 public:
  virtual ~Executor() = default;
  /// Number of worker threads work is spread over.
  virtual int num_threads() const = 0;
  /// "spin", "tbb" or "serial" (Runtime.describe()["cpu_executor"]).
  virtual const char* name() const = 0;
  /// Whether its workers are pinned one per core (CorePinning; Runtime.describe()["cpu_pinned"]).
  virtual bool pinned() const { return false; }
  /// NUMA nodes its pinned workers are spread over (Note [NUMA spread]); 1 when not pinned.
  virtual int numa_nodes() const { return 1; }
  /// The NUMA node (0-based, < numa_nodes()) that share i of try_run_concurrent runs on; 0 when
  /// not known. Note [NUMA expert placement] (kernels/cpu/moe_experts.cpp).
  virtual int node_of_share(int i) const {
    (void)i;
    return 0;
  }
  /// Binds [addr, addr + len) to NUMA node `node` (CorePinning::bind_memory); false where nothing
  /// was bound (one node, not pinned, refused).
  virtual bool bind_memory(void* addr, size_t len, int node, bool migrate) {
    (void)addr;
    (void)len;
    (void)node;
    (void)migrate;
    return false;
  }
  /// Calls fn(begin, end) on disjoint sub-ranges covering [0, n); blocks until all are done.
  /// `grain` is the smallest sub-range worth a task.
  virtual void parallel_for(int64_t n, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn) = 0;
  /// As parallel_for, for items of equal cost: each thread gets one contiguous share of [0, n)
  /// (no work stealing, no further splitting).
  virtual void parallel_for_even(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    parallel_for(n, 1, fn);
  }
  /// Runs fn(i) for every i in [0, n) on n different threads at the same time, so the calls may
  /// wait on each other, and returns true; or returns false having run nothing, where that cannot
  /// be promised (an executor without dedicated threads, n > num_threads(), a call from inside a
  /// job).
  virtual bool try_run_concurrent(int n, const std::function<void(int)>& fn) {
    (void)n;
    (void)fn;
    return false;
  }
};

/// Runs everything on the calling thread (tests, references).
class SerialExecutor final : public Executor {
 public:
  int num_threads() const override { return 1; }
  const char* name() const override { return "serial"; }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    if (n > 0) fn(0, n);
  }
};

/// An executor backed by a TBB task arena of `num_threads` workers (0 = all hardware threads).
/// Workers are pinned one per core unless `num_threads + reserved_cores` exceeds the cores
/// (CorePinning).
std::unique_ptr<Executor> make_tbb_executor(int num_threads, int reserved_cores = 0);

/// An executor of `num_threads` threads (the caller plus num_threads - 1 pinned workers) that
/// spin between jobs for `spin_us` µs (< 0: TIDAL_SPIN_US, default 2000) and then sleep. See
/// Note [Spinning workers] in executor_spin.cpp.
std::unique_ptr<Executor> make_spin_executor(int num_threads, int64_t spin_us = -1,
                                             int reserved_cores = 0);

/// Waits, up to `max_wait`, until no worker of any spinning executor is polling for work (all
/// asleep or busy), and says whether that happened. For measurements that need every core to
/// themselves (the host read-bandwidth probe): pollers would share the cores with its threads.
bool wait_for_idle_workers(std::chrono::milliseconds max_wait);

/// The runtime's executor: the spinning one, or TBB's with TIDAL_EXECUTOR=tbb. Throws
/// std::invalid_argument for another value of TIDAL_EXECUTOR. `reserved_cores`: cores that other
/// busy threads need (CorePinning).
std::unique_ptr<Executor> make_executor(int num_threads, int reserved_cores = 0);

}  // namespace tidal::kernels
