// SPDX-License-Identifier: Apache-2.0
/// \file core_pinning.cpp
/// \brief CorePinning: hwloc topology and per-core thread binding.
#include "kernels/common/core_pinning.h"

#include <cstdlib>
#include <cstring>

namespace tidal::kernels {

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
}

CorePinning::~CorePinning() {
  if (topo_ != nullptr) hwloc_topology_destroy(topo_);
}

void CorePinning::bind(int index) const {
  if (!active() || index < 0) return;
  hwloc_obj_t core =
      hwloc_get_obj_by_type(topo_, HWLOC_OBJ_CORE, static_cast<unsigned>(index % cores_));
  if (core == nullptr || core->cpuset == nullptr) return;
  hwloc_bitmap_t set = hwloc_bitmap_dup(core->cpuset);
  hwloc_bitmap_singlify(set);
  hwloc_set_cpubind(topo_, set, HWLOC_CPUBIND_THREAD);  // best effort: a refusal is harmless
  hwloc_bitmap_free(set);
}

}  // namespace tidal::kernels
