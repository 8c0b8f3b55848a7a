// SPDX-License-Identifier: Apache-2.0
/// \file core_pinning.cpp
/// \brief CorePinning: hwloc topology and per-core thread binding.
///
/// Note [NUMA spread]
/// On a machine of several NUMA nodes (a multi-socket server), binding worker i to core i in
/// hwloc's order would put a run of fewer threads than cores on the first node alone, leaving the
/// other nodes' memory controllers idle while the expert kernels are bound by memory bandwidth.
/// Workers instead take cores in spread_core_order: every prefix of the order draws from the
/// nodes about in proportion to their core counts (each within a core or so of its share) (node 0,
/// node 1, node 0, node 1, ... for two equal sockets). On one node the order is hwloc's own, so
/// nothing changes there (the desktop tidal targets, and the GPU test machine). This is the first
/// step of NUMA placement; placing each node's share of the expert pages on that node and ordering
/// the decode items by node are the next (docs/architecture.md, "Where the next pieces go").
#include "kernels/common/core_pinning.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace tidal::kernels {

std::vector<int> spread_core_order(const std::vector<std::vector<int>>& cores_by_node) {
  std::vector<int> order;
  std::vector<size_t> taken(cores_by_node.size(), 0);
  size_t total = 0;
  for (const auto& c : cores_by_node) total += c.size();
  while (order.size() < total) {
    // The node furthest behind its share: the smallest (taken + 1/2) / cores.
    size_t best = cores_by_node.size();
    double best_key = 0;
    for (size_t n = 0; n < cores_by_node.size(); ++n) {
      const size_t c = cores_by_node[n].size();
      if (taken[n] >= c) continue;
      const double key = (static_cast<double>(taken[n]) + 0.5) / static_cast<double>(c);
      if (best == cores_by_node.size() || key < best_key) {
        best = n;
        best_key = key;
      }
    }
    order.push_back(cores_by_node[best][taken[best]++]);
  }
  return order;
}

CorePinning::CorePinning(int threads, int reserved) {
  const char* env = std::getenv("TIDAL_PIN_THREADS");
  if (env != nullptr && std::strcmp(env, "0") == 0) return;
  if (hwloc_topology_init(&topo_) != 0) {
    topo_ = nullptr;
    return;
  }
  if (hwloc_topology_load(topo_) != 0) {
    hwloc_topology_destroy(topo_);
    topo_ = nullptr;
    return;
  }
  const int cores = hwloc_get_nbobjs_by_type(topo_, HWLOC_OBJ_CORE);
  cores_ = cores > 0 && threads + reserved <= cores ? cores : 0;
  if (cores_ == 0) return;
  // Each core's NUMA node (Note [NUMA spread]); a core in no node, or no nodes: one node.
  const int nodes = hwloc_get_nbobjs_by_type(topo_, HWLOC_OBJ_NUMANODE);
  std::vector<std::vector<int>> by_node(static_cast<size_t>(std::max(nodes, 1)));
  node_of_core_.assign(static_cast<size_t>(cores), 0);
  bool all_placed = nodes > 1;
  for (int c = 0; c < cores && all_placed; ++c) {
    const hwloc_obj_t core = hwloc_get_obj_by_type(topo_, HWLOC_OBJ_CORE, static_cast<unsigned>(c));
    int node = -1;
    // The most local node holding the core: the smallest cpuset among those that include it
    // (memory attached to a whole package or machine, HBM or CXL, spans several nodes' cores).
    int best_weight = 0;
    for (int n = 0; n < nodes; ++n) {
      const hwloc_obj_t nn =
          hwloc_get_obj_by_type(topo_, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(n));
      if (core == nullptr || nn == nullptr || core->cpuset == nullptr || nn->cpuset == nullptr ||
          !hwloc_bitmap_isincluded(core->cpuset, nn->cpuset))
        continue;
      const int w = hwloc_bitmap_weight(nn->cpuset);
      if (node < 0 || w < best_weight) {
        node = n;
        best_weight = w;
      }
    }
    if (node < 0)
      all_placed = false;
    else {
      by_node[static_cast<size_t>(node)].push_back(c);
      node_of_core_[static_cast<size_t>(c)] = node;
    }
  }
  if (!all_placed) {
    by_node.assign(1, {});
    for (int c = 0; c < cores; ++c) by_node[0].push_back(c);
    node_of_core_.assign(static_cast<size_t>(cores), 0);
  }
  // Nodes without cores (memory-only) take no workers: renumber the others 0, 1, ...
  std::vector<std::vector<int>> with_cores;
  for (size_t n = 0; n < by_node.size(); ++n) {
    auto& v = by_node[n];
    if (v.empty()) continue;
    for (int c : v) node_of_core_[static_cast<size_t>(c)] = static_cast<int>(with_cores.size());
    with_cores.push_back(std::move(v));
    if (all_placed) {
      const hwloc_obj_t nn =
          hwloc_get_obj_by_type(topo_, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(n));
      node_os_.push_back(nn != nullptr ? nn->os_index : 0u);
    }
  }
  nodes_ = static_cast<int>(with_cores.size());
  if (nodes_ < 2) node_os_.clear();
  order_ = spread_core_order(with_cores);
}

int CorePinning::node_of(int index) const {
  if (!active() || index < 0) return 0;
  return node_of_core_[static_cast<size_t>(order_[static_cast<size_t>(index % cores_)])];
}

bool CorePinning::bind_memory(void* addr, size_t len, int node, bool migrate) const {
  if (!active() || nodes_ < 2 || node < 0 || node >= nodes_ || len == 0 ||
      node_os_.size() != static_cast<size_t>(nodes_))
    return false;
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  if (set == nullptr) return false;
  hwloc_bitmap_only(set, node_os_[static_cast<size_t>(node)]);
  const int flags = HWLOC_MEMBIND_BYNODESET | (migrate ? HWLOC_MEMBIND_MIGRATE : 0);
  const int rc = hwloc_set_area_membind(topo_, addr, len, set, HWLOC_MEMBIND_BIND, flags);
  hwloc_bitmap_free(set);
  return rc == 0;
}

CorePinning::~CorePinning() {
  if (topo_ != nullptr) hwloc_topology_destroy(topo_);
}

void CorePinning::bind(int index) const {
  if (!active() || index < 0) return;
  hwloc_obj_t core = hwloc_get_obj_by_type(
      topo_, HWLOC_OBJ_CORE, static_cast<unsigned>(order_[static_cast<size_t>(index % cores_)]));
  if (core == nullptr || core->cpuset == nullptr) return;
  hwloc_bitmap_t set = hwloc_bitmap_dup(core->cpuset);
  hwloc_bitmap_singlify(set);
  hwloc_set_cpubind(topo_, set, HWLOC_CPUBIND_THREAD);  // best effort: a refusal is harmless
  hwloc_bitmap_free(set);
}

}  // namespace tidal::kernels
