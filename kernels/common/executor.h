// SPDX-License-Identifier: Apache-2.0
/// \file executor.h
/// \brief The one threading interface kernels see: a parallel_for over an index range.
#pragma once

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
  /// Calls fn(begin, end) on disjoint sub-ranges covering [0, n); blocks until all are done.
  /// `grain` is the smallest sub-range worth a task.
  virtual void parallel_for(int64_t n, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& fn) = 0;
  /// As parallel_for, for items of equal cost: each thread gets one contiguous share of [0, n)
  /// (no work stealing, no further splitting).
  virtual void parallel_for_even(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    parallel_for(n, 1, fn);
  }
};

/// Runs everything on the calling thread (tests, references).
class SerialExecutor final : public Executor {
 public:
  int num_threads() const override { return 1; }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    if (n > 0) fn(0, n);
  }
};

/// An executor backed by a TBB task arena of `num_threads` workers (0 = all hardware threads).
std::unique_ptr<Executor> make_tbb_executor(int num_threads);

}  // namespace tidal::kernels
