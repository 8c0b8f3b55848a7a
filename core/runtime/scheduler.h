// SPDX-License-Identifier: Apache-2.0
/// \file scheduler.h
/// \brief The request scheduler behind `tidal serve`: forward calls of many sequences run on one
/// Boost.Asio executor thread; single-token decode steps of all waiting sequences go through the
/// model as one batch (Model::forward_batch), prompts are prefilled in chunks between decode
/// steps. Cancellation, per-sequence deadlines and admission control (a bounded number of live
/// requests: Busy beyond it). See docs/architecture.md "Scheduler".
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_set>
#include <vector>

#include "core/error.h"
#include "core/model/model.h"
#include "core/runtime/sampler.h"

namespace tidal {
/// No room for another request (Python: tidal.Busy, a RuntimeError).
class Busy : public Error {
 public:
  using Error::Error;
};
/// The sequence was cancelled while a call on it waited or ran (Python: tidal.Cancelled).
class Cancelled : public Error {
 public:
  using Error::Error;
};
/// The sequence's deadline passed (Python: TimeoutError).
class DeadlineExceeded : public Error {
 public:
  using Error::Error;
};
}  // namespace tidal

namespace tidal::runtime {

class Runtime;

struct SchedulerOptions {
  int64_t max_batch = 32;       ///< sequences decoded together per step (capped by the model)
  int64_t max_requests = 16;    ///< admitted requests at once (try_admit); more get Busy
  int64_t prefill_chunk = 512;  ///< prompt tokens per turn; decode steps run between chunks
  /// Seconds a decode step waits for the other sequences of the last batch to send theirs, so they
  /// share one pass over the experts (the wait ends as soon as all of them are in).
  double batch_wait = 0.003;

  void validate() const;
};

struct SchedulerStats {
  int64_t decode_steps = 0;  ///< batched forward passes
  int64_t decode_rows = 0;   ///< sequences over all of them (rows / steps = mean batch)
  int64_t max_rows = 0;      ///< largest batch so far
  int64_t prefill_chunks = 0;
  int64_t admitted = 0, rejected = 0, active_requests = 0;
  int64_t cancelled = 0, deadline_exceeded = 0, failed = 0;
  int64_t queued = 0;  ///< forward calls waiting now
};

/// Per-sequence controls a waiting call checks (owned by the Sequence).
struct SequenceControl {
  std::atomic<bool> cancelled{false};
  std::atomic<int64_t> deadline_ns{0};  ///< steady_clock nanoseconds since epoch; 0: none
  /// Throws Cancelled (and clears the flag) or DeadlineExceeded.
  void check();
};

class Scheduler {
 public:
  Scheduler(const Runtime& rt, const SchedulerOptions& opts);
  /// Stops the executor thread; calls still waiting fail with Cancelled.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  /// One admitted request; releasing it (or destroying it) frees the slot.
  class Admission {
   public:
    explicit Admission(Scheduler* s) : s_(s) {}
    ~Admission() { release(); }
    Admission(const Admission&) = delete;
    Admission& operator=(const Admission&) = delete;
    void release();

   private:
    Scheduler* s_;
    std::atomic<bool> released_{false};
  };
  /// A slot for one more request, or Busy when max_requests are live.
  std::unique_ptr<Admission> try_admit();

  /// Runs `ids` through `state` (the caller holds the sequence's lock), as Model::forward, and
  /// with a sampler picks the next token from the last logits (returned; else -1). Blocks until
  /// done; one-token kLast calls are batched with other sequences. Throws Cancelled /
  /// DeadlineExceeded per `ctl`, or what the model threw for this call. `prof` and
  /// `sample_seconds` receive this call's share of the work.
  int64_t run(core::SequenceState& state, std::span<const int64_t> ids, core::LogitsMode mode,
              std::vector<float>& out, Sampler* sampler, SequenceControl& ctl,
              core::ForwardProfile& prof, double& sample_seconds);
  /// The sequence is gone: stop expecting its decode steps.
  void forget(const core::SequenceState* state);
  /// Wakes the executor so waiting calls re-check their controls (after a cancel).
  void poke();

  SchedulerStats stats() const;
  const SchedulerOptions& options() const { return opts_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Job;
  struct Impl;
  void post(std::function<void()> fn);
  void turn();  // executor thread only; never throws
  void turn_unsafe();
  void run_decode(std::vector<std::shared_ptr<Job>>& batch);
  void run_prefill_chunk(Job& job);
  bool check_job(Job& job);  // false: failed (cancelled / deadline) and finished

  const Runtime& rt_;
  SchedulerOptions opts_;
  int64_t max_batch_ = 1;
  std::unique_ptr<Impl> impl_;
  mutable std::mutex stats_mu_;
  SchedulerStats stats_;
  std::atomic<int64_t> active_{0};
};

}  // namespace tidal::runtime
