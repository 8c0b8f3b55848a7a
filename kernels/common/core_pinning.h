// SPDX-License-Identifier: Apache-2.0
/// \file core_pinning.h
/// \brief Binding worker threads one per physical core with hwloc (Note [Worker pinning] in
/// executor_tbb.cpp), shared by both executors.
#pragma once

#include <hwloc.h>

#include <cstddef>
#include <vector>

namespace tidal::kernels {

/// The order in which workers take cores (Note [NUMA spread] in core_pinning.cpp): given the
/// cores (hwloc logical indices) of each NUMA node, every prefix of the result draws from the
/// nodes about in proportion to their core counts (the node furthest behind its share next, ties
/// to the lower node). One node: its cores in order.
std::vector<int> spread_core_order(const std::vector<std::vector<int>>& cores_by_node);

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
  /// Binds the calling thread to the first hardware thread of the `index`-th core of
  /// core_order() (mod the core count); best effort (a refusal is harmless).
  void bind(int index) const;
  /// NUMA nodes that hold cores (1 where hwloc reports none, and whenever pinning is off), and
  /// the spread core order.
  int numa_nodes() const { return nodes_; }
  const std::vector<int>& core_order() const { return order_; }
  /// The NUMA node (0-based, among those with cores) that bind(index) places a thread on.
  int node_of(int index) const;
  /// hwloc's OS index of each node (only with 2+ nodes; empty otherwise).
  const std::vector<unsigned>& node_os_indices() const { return node_os_; }
  /// Binds the pages of [addr, addr + len) to NUMA node `node` (0-based, as node_of) with
  /// hwloc_set_area_membind (BIND without STRICT: on Linux a preference, so a full node falls back
  /// rather than failing): pages touched later are allocated there; with `migrate`, pages already
  /// resident move there too. False where nothing was bound: one node (there is nothing
  /// to choose), pinning inactive, or the system refused (a synthetic topology, no mbind).
  bool bind_memory(void* addr, size_t len, int node, bool migrate) const;

 private:
  hwloc_topology_t topo_ = nullptr;
  int cores_ = 0;
  int nodes_ = 1;
  std::vector<int> order_;         // core logical indices, spread over the nodes
  std::vector<int> node_of_core_;  // by core logical index
  std::vector<unsigned> node_os_;  // hwloc os_index of each node (only with 2+ nodes)
};

}  // namespace tidal::kernels
