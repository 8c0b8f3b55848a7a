// SPDX-License-Identifier: Apache-2.0
/// \file core_pinning.h
/// \brief Binding worker threads one per physical core with hwloc (Note [Worker pinning] in
/// executor_tbb.cpp), shared by both executors.
#pragma once

#include <hwloc.h>

namespace tidal::kernels {

/// The machine's cores, loaded once per executor. Inactive (bind() does nothing) with
/// TIDAL_PIN_THREADS=0, when hwloc cannot load the topology, or when `threads` plus `reserved`
/// exceeds the cores (`reserved`: cores other busy threads need, e.g. the one driving a GPU; see
/// Note [A core for the GPU thread] in core/runtime/runtime.cpp).
class CorePinning {
 public:
  explicit CorePinning(int threads, int reserved = 0);
  ~CorePinning();
  CorePinning(const CorePinning&) = delete;
  CorePinning& operator=(const CorePinning&) = delete;
  bool active() const { return cores_ > 0; }
  /// Binds the calling thread to the first hardware thread of core `index` mod the core count;
  /// best effort (a refusal is harmless).
  void bind(int index) const;

 private:
  hwloc_topology_t topo_ = nullptr;
  int cores_ = 0;
};

}  // namespace tidal::kernels
