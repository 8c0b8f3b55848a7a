// SPDX-License-Identifier: Apache-2.0
/// \file executor_test.cpp
/// \brief The executors: every index covered exactly once for odd sizes and grains, even shares
/// contiguous and in thread order, concurrent runs able to wait on each other, nested and
/// simultaneous calls, exceptions, and workers that went to sleep.
#include "kernels/common/executor.h"

#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/core_pinning.h"

namespace tidal::kernels {
namespace {

int sched_getaffinity_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
}

// Each index of [0, n) seen exactly once.
void expect_cover(Executor& ex, int64_t n, int64_t grain, bool even) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  std::function<void(int64_t, int64_t)> fn = [&](int64_t b, int64_t e) {
    ASSERT_LE(0, b);
    ASSERT_LE(b, e);
    ASSERT_LE(e, n);
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  };
  if (even)
    ex.parallel_for_even(n, fn);
  else
    ex.parallel_for(n, grain, fn);
  for (int64_t i = 0; i < n; ++i)
    ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1)
        << "index " << i << " of n=" << n << " grain=" << grain << " even=" << even;
}

TEST(SpinExecutor, CoversEveryIndexOnce) {
  for (int threads : {1, 2, 3, 5}) {
    auto ex = make_spin_executor(threads);
    EXPECT_EQ(ex->num_threads(), threads);
    for (int64_t n : {0, 1, 2, 3, 7, 16, 17, 100, 1001, 65537})
      for (int64_t grain : {1, 3, 64}) {
        expect_cover(*ex, n, grain, false);
        expect_cover(*ex, n, grain, true);
      }
  }
}

TEST(SpinExecutor, EvenSharesAreContiguousAndDistinctThreads) {
  auto ex = make_spin_executor(4);
  const int64_t n = 103;
  std::vector<int64_t> begin(4, -1), end(4, -1);
  std::vector<std::thread::id> who(4);
  std::atomic<int> calls{0};
  ex->parallel_for_even(n, [&](int64_t b, int64_t e) {
    const int k = calls.fetch_add(1);
    ASSERT_LT(k, 4);
    begin[k] = b;
    end[k] = e;
    who[k] = std::this_thread::get_id();
  });
  ASSERT_EQ(calls.load(), 4);  // one call per thread, each a contiguous share
  int64_t total = 0;
  for (int k = 0; k < 4; ++k) {
    total += end[k] - begin[k];
    EXPECT_GE(end[k] - begin[k], n / 4);
    EXPECT_LE(end[k] - begin[k], n / 4 + 1);
    for (int q = 0; q < k; ++q) EXPECT_NE(who[k], who[q]);
  }
  EXPECT_EQ(total, n);
}

TEST(SpinExecutor, ConcurrentRunsMayWaitOnEachOther) {
  // Every function waits until all have started: this finishes only if they run at once.
  for (int threads : {2, 3, 4}) {
    auto ex = make_spin_executor(threads);
    for (int round = 0; round < 50; ++round) {
      std::atomic<int> arrived{0};
      std::vector<int> ran(static_cast<size_t>(threads), 0);
      const bool ok = ex->try_run_concurrent(threads, [&](int i) {
        arrived.fetch_add(1);
        while (arrived.load() < threads) std::this_thread::yield();
        ran[static_cast<size_t>(i)] = 1;
      });
      ASSERT_TRUE(ok);
      for (int i = 0; i < threads; ++i) EXPECT_EQ(ran[static_cast<size_t>(i)], 1);
    }
    // More functions than threads cannot be promised.
    EXPECT_FALSE(ex->try_run_concurrent(threads + 1, [](int) { FAIL() << "must not run"; }));
  }
  // Executors without dedicated threads decline.
  SerialExecutor serial;
  EXPECT_FALSE(serial.try_run_concurrent(1, [](int) { FAIL() << "must not run"; }));
  auto tbb = make_tbb_executor(2);
  EXPECT_FALSE(tbb->try_run_concurrent(2, [](int) { FAIL() << "must not run"; }));
}

TEST(SpinExecutor, NestedCallsRunInline) {
  auto ex = make_spin_executor(3);
  std::atomic<int64_t> sum{0};
  ex->parallel_for(6, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      ex->parallel_for(10, 1, [&](int64_t b2, int64_t e2) {
        for (int64_t j = b2; j < e2; ++j) sum.fetch_add(i * 10 + j);
      });
      EXPECT_FALSE(ex->try_run_concurrent(2, [](int) { FAIL() << "must not run"; }));
    }
  });
  EXPECT_EQ(sum.load(), 59 * 60 / 2);
}

TEST(SpinExecutor, CallersOnSeveralThreads) {
  // Two application threads share one executor: each call completes, whole and correct.
  auto ex = make_spin_executor(3);
  auto caller = [&](int64_t seed, int64_t* out) {
    int64_t total = 0;
    for (int r = 0; r < 200; ++r) {
      std::atomic<int64_t> s{0};
      ex->parallel_for(257, 2, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) s.fetch_add(i + seed);
      });
      total += s.load();
    }
    *out = total;
  };
  int64_t a = 0, b = 0;
  std::thread t1(caller, 1, &a), t2(caller, 2, &b);
  t1.join();
  t2.join();
  EXPECT_EQ(a, 200 * (256 * 257 / 2 + 257 * 1));
  EXPECT_EQ(b, 200 * (256 * 257 / 2 + 257 * 2));
}

TEST(SpinExecutor, ASecondCallerWaitsForThePool) {
  // While one application thread's job runs, another thread's try_run_concurrent waits for it and
  // then runs on all threads at once (it is not declined, nor run on one thread).
  auto ex = make_spin_executor(2);
  std::atomic<bool> started{false}, release{false};
  std::thread first([&] {
    ex->parallel_for_even(2, [&](int64_t, int64_t) {
      started = true;
      while (!release) std::this_thread::yield();
    });
  });
  while (!started) std::this_thread::yield();
  std::atomic<int> arrived{0};
  std::thread second([&] {
    EXPECT_TRUE(ex->try_run_concurrent(2, [&](int) {
      arrived.fetch_add(1);
      while (arrived.load() < 2) std::this_thread::yield();
    }));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(arrived.load(), 0);  // still waiting for the first job
  release = true;
  first.join();
  second.join();
  EXPECT_EQ(arrived.load(), 2);
}

TEST(SpinExecutor, ExceptionsReachTheCaller) {
  auto ex = make_spin_executor(3);
  for (int thrower : {0, 1, 2}) {
    EXPECT_THROW(ex->try_run_concurrent(3,
                                        [&](int i) {
                                          if (i == thrower) throw std::runtime_error("boom");
                                        }),
                 std::runtime_error)
        << "thrower " << thrower;
  }
  EXPECT_THROW(ex->parallel_for_even(
                   9, [](int64_t b, int64_t) { throw std::invalid_argument(std::to_string(b)); }),
               std::invalid_argument);
  // The pool still works afterwards.
  expect_cover(*ex, 1000, 1, false);
}

TEST(SpinExecutor, SleepingWorkersWakeForTheNextJob) {
  // spin_us = 0: the workers sleep on the futex as soon as they see no job.
  auto ex = make_spin_executor(3, 0);
  for (int r = 0; r < 20; ++r) {
    std::this_thread::sleep_for(std::chrono::microseconds(r % 4 == 0 ? 2000 : 0));
    expect_cover(*ex, 333, 1, r % 2 == 0);
    std::atomic<int> arrived{0};
    ASSERT_TRUE(ex->try_run_concurrent(3, [&](int) {
      arrived.fetch_add(1);
      while (arrived.load() < 3) std::this_thread::yield();
    }));
  }
}

TEST(SpinExecutor, ManyJobsOfEveryKindInARow) {
  // Workers that poll and workers that sleep between jobs: every index once, concurrent shares,
  // exceptions, jobs of every kind one after another.
  for (int64_t spin_us : {int64_t{2000}, int64_t{0}})
    for (int threads : {1, 2, 3, 5}) {
      auto ex = make_spin_executor(threads, spin_us);
      for (int round = 0; round < 30; ++round) {
        expect_cover(*ex, 1 + round * 37, 1 + round % 3, round % 2 == 0);
        std::atomic<int> arrived{0};
        std::vector<int> ran(static_cast<size_t>(threads), 0);
        ASSERT_TRUE(ex->try_run_concurrent(threads, [&](int i) {
          arrived.fetch_add(1);
          while (arrived.load() < threads) std::this_thread::yield();
          ran[static_cast<size_t>(i)] = 1;
        }));
        for (int i = 0; i < threads; ++i) {
          EXPECT_EQ(ran[static_cast<size_t>(i)], 1)
              << "spin_us " << spin_us << " threads " << threads << " share " << i;
        }
        if (round % 10 == 9) {
          EXPECT_THROW(ex->try_run_concurrent(threads,
                                              [&](int i) {
                                                if (i == threads - 1)
                                                  throw std::runtime_error("boom");
                                              }),
                       std::runtime_error);
        }
      }
    }
}

TEST(SpinExecutor, IdleWorkersCanBeAwaited) {
  // Workers poll for 100 ms after a job, then sleep: a short wait sees them polling, a long one
  // sees them asleep (the read-bandwidth probe waits for that).
  // Two threads: on a machine with fewer CPUs than threads the pool polls only 20 µs.
  auto ex = make_spin_executor(2, 100000);
  expect_cover(*ex, 100, 1, true);
  if (sched_getaffinity_count() >= 2)
    EXPECT_FALSE(wait_for_idle_workers(std::chrono::milliseconds(5)));
  EXPECT_TRUE(wait_for_idle_workers(std::chrono::milliseconds(5000)));
  expect_cover(*ex, 100, 1, false);  // and they wake for the next job
  ex.reset();
  EXPECT_TRUE(wait_for_idle_workers(std::chrono::milliseconds(0)));
}

TEST(Executor, EnvironmentChoosesTheKind) {
  const char* old = std::getenv("TIDAL_EXECUTOR");
  const std::string saved = old ? old : "";
  setenv("TIDAL_EXECUTOR", "tbb", 1);
  EXPECT_FALSE(make_executor(2)->try_run_concurrent(2, [](int) {}));
  EXPECT_STREQ(make_executor(2)->name(), "tbb");
  setenv("TIDAL_EXECUTOR", "spin", 1);
  EXPECT_TRUE(make_executor(2)->try_run_concurrent(2, [](int) {}));
  EXPECT_STREQ(make_executor(2)->name(), "spin");
  setenv("TIDAL_EXECUTOR", "openmp", 1);
  try {
    make_executor(2);
    ADD_FAILURE() << "TIDAL_EXECUTOR=openmp was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("openmp"), std::string::npos) << e.what();
  }
  if (old)
    setenv("TIDAL_EXECUTOR", saved.c_str(), 1);
  else
    unsetenv("TIDAL_EXECUTOR");
}

// Note [A core for the GPU thread]: pinning is on only where the threads and the reserved cores
// fit the machine's cores; the affinity of a pinned worker is one CPU, of an unpinned one more.
TEST(CorePinning, ReservedCoresTurnPinningOff) {
  const char* old = std::getenv("TIDAL_PIN_THREADS");
  if (old != nullptr && std::string(old) == "0") GTEST_SKIP() << "TIDAL_PIN_THREADS=0 is set";
  const CorePinning probe(1);
  if (!probe.active()) GTEST_SKIP() << "hwloc cannot load this machine's topology";
  int cores = 0;
  for (int n = 1; n <= 4096 && CorePinning(n).active(); n *= 2) cores = n;  // a lower bound
  ASSERT_GE(cores, 1);
  EXPECT_TRUE(CorePinning(cores).active());
  EXPECT_FALSE(CorePinning(cores, cores).active());
  EXPECT_FALSE(CorePinning(1, 4096).active());
  // Through an executor: with every core reserved, a worker's affinity is not narrowed to one CPU.
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "one CPU";
  auto cpus_of_workers = [](std::unique_ptr<Executor> ex) {
    std::atomic<int> min_cpus{1 << 30};
    ex->try_run_concurrent(2, [&](int i) {
      if (i == 0) return;  // the caller is never pinned
      cpu_set_t set;
      CPU_ZERO(&set);
      sched_getaffinity(0, sizeof set, &set);
      min_cpus.store(CPU_COUNT(&set));
    });
    return min_cpus.load();
  };
  const int pinned = cpus_of_workers(make_spin_executor(2));
  if (pinned != 1)
    GTEST_SKIP() << "thread binding is refused here (affinity " << pinned << " CPUs)";
  EXPECT_GT(cpus_of_workers(make_spin_executor(2, -1, 4096)), 1);
}

}  // namespace
}  // namespace tidal::kernels

namespace tidal::kernels {
namespace {

// Note [NUMA spread]: every prefix of the order draws from the nodes in proportion to their
// cores; one node keeps hwloc's order.
TEST(CorePinning, SpreadOrderFollowsTheNodesShares) {
  EXPECT_EQ(spread_core_order({{0, 1, 2, 3}}), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(spread_core_order({{0, 1, 2}, {3, 4, 5}}), (std::vector<int>{0, 3, 1, 4, 2, 5}));
  // 4 + 2 cores: node 0 is never more than one core ahead of its two-thirds share.
  EXPECT_EQ(spread_core_order({{0, 1, 2, 3}, {4, 5}}), (std::vector<int>{0, 4, 1, 2, 5, 3}));
  EXPECT_EQ(spread_core_order({{}, {7, 8}}), (std::vector<int>{7, 8}));
  EXPECT_TRUE(spread_core_order({}).empty());
  // Four nodes of 8: the first 4 workers land on 4 different nodes, any 8 take 2 of each.
  std::vector<std::vector<int>> four(4);
  for (int n = 0; n < 4; ++n)
    for (int c = 0; c < 8; ++c) four[static_cast<size_t>(n)].push_back(8 * n + c);
  const auto o = spread_core_order(four);
  ASSERT_EQ(o.size(), 32u);
  for (size_t start = 0; start + 8 <= o.size(); start += 8) {
    int per[4] = {0, 0, 0, 0};
    for (size_t i = start; i < start + 8; ++i) ++per[o[i] / 8];
    for (int n = 0; n < 4; ++n) EXPECT_EQ(per[n], 2) << "block at " << start << ", node " << n;
  }
  EXPECT_EQ((std::vector<int>{o[0] / 8, o[1] / 8, o[2] / 8, o[3] / 8}),
            (std::vector<int>{0, 1, 2, 3}));
}

// A two-socket machine through hwloc's synthetic topology (HWLOC_SYNTHETIC): workers alternate
// between the sockets' nodes; node_of says where each one runs.
TEST(CorePinning, WorkersSpreadOverNumaNodes) {
  const char* pin = std::getenv("TIDAL_PIN_THREADS");
  if (pin != nullptr && std::string(pin) == "0") GTEST_SKIP() << "TIDAL_PIN_THREADS=0 is set";
  const char* old = std::getenv("HWLOC_SYNTHETIC");
  const std::string saved = old ? old : "";
  setenv("HWLOC_SYNTHETIC", "pack:2 numa:1 core:3 pu:2", 1);
  const CorePinning two(4);
  const CorePinning too_many(7);  // more threads than cores: no pinning, whatever the nodes
  setenv("HWLOC_SYNTHETIC", "pack:1 numa:1 core:4 pu:1", 1);
  const CorePinning one(4);
  if (old)
    setenv("HWLOC_SYNTHETIC", saved.c_str(), 1);
  else
    unsetenv("HWLOC_SYNTHETIC");
  // hwloc falls back to the real machine when a synthetic topology does not load.
  if (!two.active() || two.core_order().size() != 6 || one.core_order().size() != 4)
    GTEST_SKIP() << "hwloc did not load the synthetic topologies";
  EXPECT_EQ(two.numa_nodes(), 2);
  EXPECT_EQ(two.core_order(), (std::vector<int>{0, 3, 1, 4, 2, 5}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(two.node_of(i), i % 2) << "worker " << i;
  EXPECT_EQ(two.node_of(6), 0);                                     // wraps like bind()
  EXPECT_EQ(two.node_os_indices(), (std::vector<unsigned>{0, 1}));  // what bind_memory binds to
  EXPECT_FALSE(too_many.active());
  EXPECT_EQ(one.numa_nodes(), 1);
  EXPECT_TRUE(one.node_os_indices().empty());
  EXPECT_EQ(one.core_order(), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(one.node_of(3), 0);
  // Memory binding (Note [Packed experts on their NUMA nodes]): one node has nothing to choose,
  // and a node that does not exist is refused.
  alignas(4096) static char buf[8192];
  EXPECT_FALSE(one.bind_memory(buf, sizeof buf, 0, false));
  EXPECT_FALSE(two.bind_memory(buf, sizeof buf, 2, false));
  EXPECT_FALSE(two.bind_memory(buf, sizeof buf, -1, false));
}

}  // namespace
}  // namespace tidal::kernels
