// SPDX-License-Identifier: Apache-2.0
/// \file executor_spin.cpp
/// \brief An executor of persistent, pinned worker threads that spin between jobs.
///
/// Note [Spinning workers]
/// A decode step calls the expert op once per MoE layer, and the op runs two parallel phases of
/// 60-100 µs each; between calls the GPU (or the CPU's own attention) works for tens of µs. With
/// TBB, each phase starts by requesting workers into the arena and ends by releasing them; on the
/// GPU machine's 16-core VM the phase times (97 + 68 µs for 9 + 4.4 MB of int4 experts, 92 and
/// 65 GB/s against 150 GB/s of plain reads) left tens of µs per phase unexplained by the bytes.
/// Here the workers stay on their cores and poll one generation counter (with `pause`), so a job
/// reaches every worker within a cache-line transfer and the caller learns of its end the same
/// way; no system call and no allocation per job. A worker that has seen no job for
/// TIDAL_SPIN_US (default 2000 µs: longer than the GPU's share of a layer, shorter than a human
/// pause) sleeps on a futex and is woken by the next job, so an idle runtime
/// costs no CPU. A waiting worker polls with `pause` for the first 50 µs (the next job of a step
/// usually comes sooner) and then yields its core between polls (sched_yield): on an otherwise idle
/// core that returns at once, but the process's other threads (the GPU-driving thread, CUDA's,
/// the server's event loop) get the core when they need it; pure spinning for 2 ms made a
/// 2-core CI machine's server test lose its race. Where the pool has more threads than the
/// cores it may use, the workers yield from the start and poll only 20 µs.
///
/// A mailbox line per worker (the caller storing into 15 lines, each polled by one worker, and
/// each worker reporting its end on a line of its own) measured worse than the one generation word
/// and counter here (fifteenth session, 16 threads, 8 processes): share 0 had the token's row ready
/// 3.1-3.4 µs after the dispatch against 2.1-2.6 µs, and the caller saw the job's end 0.8 µs after
/// the last share against 0.6 µs. It is gone again.
///
/// Jobs: `parallel_for_even` gives thread i the i-th contiguous share (the caller is thread 0);
/// `parallel_for` hands out guided chunks (half the remaining work divided by the threads, at
/// least `grain`) from an atomic counter; `try_run_concurrent` runs n functions on n threads at
/// once, so they may wait on each other. A call made from inside a job runs on the calling thread
/// alone (and `try_run_concurrent` declines it); a call from another application thread while a
/// job runs waits for that job to end. After fork() the child has no workers: do not use an
/// executor made before the fork there.
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels/common/core_pinning.h"
#include "kernels/common/executor.h"
#include "kernels/common/set_if.h"

namespace tidal::kernels {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Polling starts with `pause` for this long after a job (consecutive jobs of one step), then
// yields the core between polls (Note [Spinning workers]). TIDAL_SPIN_PAUSE_US overrides it (a
// benchmark knob: yielding costs a system call per poll, which is slow in some virtual machines).
const int64_t kPauseNs = [] {
  const char* e = std::getenv("TIDAL_SPIN_PAUSE_US");
  return (e != nullptr && *e != '\0' ? std::max<long long>(0, std::atoll(e)) : 50) * 1000;
}();

int64_t default_spin_us() {
  const char* e = std::getenv("TIDAL_SPIN_US");
  if (e != nullptr && *e != '\0') return std::max<long long>(0, std::atoll(e));
  return 2000;
}

// The futex calls behind a sleeping worker: the kernel compares *word with `expected` atomically
// with going to sleep, which is all the sleepers protocol needs (no waiter pool in between).
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

thread_local const void* t_inside = nullptr;

// Workers of every spinning executor that are polling for a job right now (wait_for_idle_workers).
std::atomic<int> g_polling{0};  // the executor whose job this thread is running

class SpinExecutor final : public Executor {
 public:
  SpinExecutor(int num_threads, int64_t spin_us, int reserved_cores)
      : n_(std::max(1, num_threads)),
        oversubscribed_(n_ > usable_cpus()),
        spin_ns_((oversubscribed_ ? std::min<int64_t>(spin_us, 20) : spin_us) * 1000),
        pins_(n_, reserved_cores) {
    workers_.reserve(static_cast<size_t>(n_ - 1));
    try {
      for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { worker(i); });
    } catch (...) {  // no thread left joinable: std::system_error reaches the caller
      shut_down();
      throw;
    }
  }

  ~SpinExecutor() override { shut_down(); }

  int num_threads() const override { return n_; }
  const char* name() const override { return "spin"; }
  bool pinned() const override { return n_ > 1 && pins_.active(); }
  int numa_nodes() const override { return pinned() ? pins_.numa_nodes() : 1; }
  // Share i runs on worker i (share 0 on the calling thread, which no worker's core takes: the
  // first core of the spread order is left to it).
  int node_of_share(int i) const override { return pinned() ? pins_.node_of(i) : 0; }
  bool bind_memory(void* addr, size_t len, int node, bool migrate) override {
    return pinned() && pins_.bind_memory(addr, len, node, migrate);
  }

  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    if (n <= grain || n_ == 1 || !begin_job()) {
      fn(0, n);
      return;
    }
    set_if(mode_, Mode::kGuided);
    set_if(range_fn_, &fn);
    set_if(items_, n);
    set_if(grain_, grain);
    next_.store(0, std::memory_order_relaxed);
    run_job();
  }

  void parallel_for_even(int64_t n, const std::function<void(int64_t, int64_t)>& fn) override {
    if (n <= 0) return;
    if (n == 1 || n_ == 1 || !begin_job()) {
      fn(0, n);
      return;
    }
    set_if(mode_, Mode::kEven);
    set_if(range_fn_, &fn);
    set_if(items_, n);
    run_job();
  }

  bool try_run_concurrent(int n, const std::function<void(int)>& fn) override {
    if (n <= 0) return true;
    if (n > n_ || !begin_job()) return false;
    set_if(mode_, Mode::kConcurrent);
    set_if(index_fn_, &fn);
    set_if(items_, n);
    run_job();
    return true;
  }

 private:
  enum class Mode { kEven, kGuided, kConcurrent };

  // Takes the pool for one job, or returns false (nested call, or another thread's job running).
  void shut_down() {
    stop_.store(true, std::memory_order_seq_cst);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(gen_);
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  // Takes the pool for one job; false for a call from inside one of its jobs (run inline). A
  // second application thread waits for the running job to end, then has every worker for its
  // own: its work runs as parallel as before, jobs of the two interleaving.
  bool begin_job() {
    if (t_inside == this) return false;
    for (int spins = 0;; ++spins) {
      bool expected = false;
      if (busy_.compare_exchange_weak(expected, true, std::memory_order_acquire)) return true;
      if (spins < 64)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }

  void run_job() {
    remaining_.store(n_ - 1, std::memory_order_relaxed);
    // seq_cst with the workers' sleepers_ increment: either this load sees a sleeper, or the
    // sleeper's wait sees the new generation (Note [Spinning workers]).
    gen_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(gen_);
    t_inside = this;
    run_share(0);
    t_inside = nullptr;
    while (remaining_.load(std::memory_order_acquire) != 0) {
      if (oversubscribed_)
        std::this_thread::yield();
      else
        cpu_relax();
    }
    std::exception_ptr err;
    if (error_) std::swap(err, error_);
    busy_.store(false, std::memory_order_release);
    if (err) std::rethrow_exception(err);
  }

  void run_share(int i) {
    try {
      switch (mode_) {
        case Mode::kEven: {
          const int64_t b = items_ * i / n_, e = items_ * (i + 1) / n_;
          if (b < e) (*range_fn_)(b, e);
          break;
        }
        case Mode::kGuided: {
          const int64_t n = items_;
          int64_t c = next_.load(std::memory_order_relaxed);
          while (c < n) {
            const int64_t take = std::max(grain_, (n - c) / (2 * static_cast<int64_t>(n_)));
            const int64_t e = std::min(n, c + take);
            if (next_.compare_exchange_weak(c, e, std::memory_order_relaxed)) {
              (*range_fn_)(c, e);
              c = next_.load(std::memory_order_relaxed);
            }
          }
          break;
        }
        case Mode::kConcurrent:
          if (i < items_) (*index_fn_)(i);
          break;
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void worker(int i) {
    pins_.bind(i);
    // Generation 0 is the pool's state before any job; reading gen_ here instead would miss a job
    // published before this thread got going.
    uint32_t seen = 0;
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        g_polling.fetch_add(1, std::memory_order_relaxed);
        const int64_t t0 = now_ns();
        bool polite = oversubscribed_;
        for (uint32_t spins = 1; g == seen; ++spins) {
          if (polite)
            std::this_thread::yield();
          else
            cpu_relax();
          if ((spins & 255) == 0 && !polite) polite = now_ns() - t0 > kPauseNs;
          if ((spins & 255) == 0 && now_ns() - t0 > spin_ns_) {
            g_polling.fetch_sub(1, std::memory_order_relaxed);
            sleepers_.fetch_add(1, std::memory_order_seq_cst);
            futex_wait(gen_, seen);
            sleepers_.fetch_sub(1, std::memory_order_seq_cst);
            g_polling.fetch_add(1, std::memory_order_relaxed);
          }
          g = gen_.load(std::memory_order_acquire);
        }
        g_polling.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      t_inside = this;
      run_share(i);
      t_inside = nullptr;
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }

  const int n_;
  const bool oversubscribed_;
  const int64_t spin_ns_;
  CorePinning pins_;  // Note [Worker pinning] (executor_tbb.cpp): worker i on the i-th core of the
                      // spread order
  std::vector<std::thread> workers_;

  // The job: written by the caller before gen_ is bumped, read by workers after they see it.
  Mode mode_ = Mode::kEven;
  const std::function<void(int64_t, int64_t)>* range_fn_ = nullptr;
  const std::function<void(int)>* index_fn_ = nullptr;
  int64_t items_ = 0, grain_ = 1;
  std::exception_ptr error_;
  std::mutex error_mu_;

  alignas(64) std::atomic<uint32_t> gen_{0};
  alignas(64) std::atomic<int> remaining_{0};
  alignas(64) std::atomic<int64_t> next_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  alignas(64) std::atomic<bool> busy_{false};
  std::atomic<bool> stop_{false};
};

}  // namespace

std::unique_ptr<Executor> make_spin_executor(int num_threads, int64_t spin_us, int reserved_cores) {
  if (num_threads <= 0)
    num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<SpinExecutor>(num_threads, spin_us < 0 ? default_spin_us() : spin_us,
                                        reserved_cores);
}

bool wait_for_idle_workers(std::chrono::milliseconds max_wait) {
  const auto end = std::chrono::steady_clock::now() + max_wait;
  while (g_polling.load(std::memory_order_relaxed) > 0) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

std::unique_ptr<Executor> make_executor(int num_threads, int reserved_cores) {
  const char* e = std::getenv("TIDAL_EXECUTOR");
  const std::string kind = e != nullptr && *e != '\0' ? e : "spin";
  if (kind == "tbb") return make_tbb_executor(num_threads, reserved_cores);
  if (kind != "spin")
    throw std::invalid_argument("TIDAL_EXECUTOR=" + kind + ": expected \"spin\" or \"tbb\"");
  return make_spin_executor(num_threads, -1, reserved_cores);
}

}  // namespace tidal::kernels
