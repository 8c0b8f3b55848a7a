// SPDX-License-Identifier: Apache-2.0
/// \file step_trace.cpp
/// \brief Chrome trace JSON of forward calls.
///
/// Note [Step trace]
/// `rt.trace(path)` (Python) starts a StepTrace; every forward call inside the block adds spans:
/// - device="cpu" (Model::cpu_layers): per layer the token mixer (attention or deltanet), the
///   router, the routed experts and the shared expert; then the final norm and lm_head; the whole
///   call as one "forward" span. All on the calling thread's track (the executor's workers run
///   inside them); each application thread has its own.
/// - device="cuda" (CudaModel::forward): per GPU segment (the layers between two host expert calls)
///   the host's launch, its wait for the router ids ("waits"), and the routed experts on the CPU;
///   the segments' GPU execution from CUDA events on the GPU track. GPU times are placed from the
///   moment the step's first event was recorded on the host, so the GPU track is shifted by the
///   launch queue's delay (microseconds). The expert copies (the VRAM cache's demand fills at a
///   step's start, lookahead prefetches, prefill streaming's layer copies) are timed with CUDA
///   events on their streams and go on the copy track, placed the same way.
/// Names and categories are static strings; recording takes a mutex per span (tens of spans per
/// layer and step), so it is meant for inspecting a few steps, not for production serving.
#include "core/model/step_trace.h"

#include <atomic>
#include <nlohmann/json.hpp>
#include <set>

namespace tidal::core {
namespace {

// The calling thread's track: 3, 4, ... in the order threads first record (1 is the GPU, 2 the
// expert copies).
int host_track() {
  static std::atomic<int> next{3};
  thread_local const int tid = next.fetch_add(1, std::memory_order_relaxed);
  return tid;
}

}  // namespace

void StepTrace::start() {
  std::lock_guard lock(mu_);
  events_.clear();
  origin_ = Clock::now();
  on_.store(true, std::memory_order_release);
}

std::string StepTrace::stop_json() {
  std::vector<Event> ev;
  {
    std::lock_guard lock(mu_);
    on_.store(false, std::memory_order_release);
    ev.swap(events_);
  }
  nlohmann::json events = nlohmann::json::array();
  std::set<int> tracks = {kGpu};
  for (const auto& e : ev) tracks.insert(e.track);
  for (int t : tracks)
    events.push_back(
        {{"name", "thread_name"},
         {"ph", "M"},
         {"pid", 1},
         {"tid", t},
         {"args",
          {{"name", t == kGpu    ? std::string("GPU stream")
                    : t == kCopy ? std::string("expert copies (host to GPU)")
                                 : "host thread " + std::to_string(t - 2) + " (forward calls)"}}}});
  for (const auto& e : ev) {
    nlohmann::json j = {{"name", e.name}, {"cat", e.cat}, {"ph", "X"},     {"ts", e.ts},
                        {"dur", e.dur},   {"pid", 1},     {"tid", e.track}};
    if (e.layer >= 0) j["args"] = {{"layer", e.layer}};
    events.push_back(std::move(j));
  }
  return nlohmann::json{{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}}.dump();
}

double StepTrace::us(Clock::time_point t) const {
  std::lock_guard lock(mu_);
  return std::chrono::duration<double, std::micro>(t - origin_).count();
}

void StepTrace::add(const char* name, const char* cat, Clock::time_point t0, Clock::time_point t1,
                    int track, int64_t layer) {
  const int tid = track == kHost ? host_track() : track;
  std::lock_guard lock(mu_);
  if (!on_.load(std::memory_order_relaxed) || t0 < origin_) return;  // a span from before start()
  events_.push_back({name, cat, std::chrono::duration<double, std::micro>(t0 - origin_).count(),
                     std::chrono::duration<double, std::micro>(t1 - t0).count(), tid, layer});
}

void StepTrace::add_us(const char* name, const char* cat, double ts_us, double dur_us, int track,
                       int64_t layer) {
  if (track == kHost) track = host_track();
  std::lock_guard lock(mu_);
  if (!on_.load(std::memory_order_relaxed)) return;
  events_.push_back({name, cat, ts_us, dur_us, track, layer});
}

size_t StepTrace::size() const {
  std::lock_guard lock(mu_);
  return events_.size();
}

}  // namespace tidal::core
