// SPDX-License-Identifier: Apache-2.0
/// \file executor_tbb.cpp
/// \brief Executor implementation on a TBB task arena.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <thread>

#include "kernels/common/executor.h"

namespace tidal::kernels {
namespace {

class TbbExecutor final : public Executor {
 public:
  explicit TbbExecutor(int num_threads) : arena_(num_threads) {}
  int num_threads() const override { return arena_.max_concurrency(); }
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
};

}  // namespace

std::unique_ptr<Executor> make_tbb_executor(int num_threads) {
  if (num_threads <= 0)
    num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<TbbExecutor>(num_threads);
}

}  // namespace tidal::kernels
