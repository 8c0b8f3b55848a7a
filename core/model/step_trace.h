// SPDX-License-Identifier: Apache-2.0
/// \file step_trace.h
/// \brief A timeline of forward calls (host spans, GPU segments, CPU experts, waits) as Chrome
/// trace JSON, for chrome://tracing or ui.perfetto.dev. See Note [Step trace] in step_trace.cpp.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace tidal::core {

class StepTrace {
 public:
  using Clock = std::chrono::steady_clock;
  /// Tracks (Chrome trace "tid"s): kHost stands for the calling thread (each application thread
  /// gets its own tid, 3 and up, so concurrent forward calls do not interleave on one track), kGpu
  /// for the GPU stream (tid 1), kCopy for the host-to-device expert copies (tid 2: the VRAM
  /// expert cache's fills and prefetches, prefill streaming's layer copies).
  enum Track : int { kHost = 0, kGpu = 1, kCopy = 2 };

  /// Starts recording (drops earlier events); the origin of the timeline is now.
  void start();
  /// Stops recording; returns {"traceEvents": [...], "displayTimeUnit": "ms"}. Events are complete
  /// events ("ph": "X") with ts / dur in µs from start(); `cat` is one of step, gpu, cpu_dense,
  /// cpu_experts, waits, copies; args.layer where the span belongs to one layer. Spans that began
  /// before start() are dropped.
  std::string stop_json();
  /// Recording (a lock-free check, so the model pays one atomic load per span otherwise).
  bool on() const { return on_.load(std::memory_order_acquire); }

  void add(const char* name, const char* cat, Clock::time_point t0, Clock::time_point t1,
           int track = kHost, int64_t layer = -1);
  /// An event at `ts_us` from the origin (GPU times measured with CUDA events).
  void add_us(const char* name, const char* cat, double ts_us, double dur_us, int track,
              int64_t layer = -1);
  /// Microseconds from the origin to `t`.
  double us(Clock::time_point t) const;
  /// Events recorded so far (tests).
  size_t size() const;

 private:
  struct Event {
    const char* name;  // static strings only
    const char* cat;
    double ts, dur;
    int track;
    int64_t layer;
  };
  mutable std::mutex mu_;
  std::vector<Event> events_;
  Clock::time_point origin_{};
  std::atomic<bool> on_{false};
};

/// Records [construction, destruction) as one event when `trace` is on; a no-op otherwise.
class TraceSpan {
 public:
  TraceSpan(StepTrace* trace, const char* name, const char* cat, int64_t layer = -1)
      : trace_(trace != nullptr && trace->on() ? trace : nullptr),
        name_(name),
        cat_(cat),
        layer_(layer) {
    if (trace_) t0_ = StepTrace::Clock::now();
  }
  ~TraceSpan() {
    if (trace_) trace_->add(name_, cat_, t0_, StepTrace::Clock::now(), StepTrace::kHost, layer_);
  }
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  StepTrace* trace_;
  const char* name_;
  const char* cat_;
  int64_t layer_;
  StepTrace::Clock::time_point t0_{};
};

}  // namespace tidal::core
