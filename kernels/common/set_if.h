// SPDX-License-Identifier: Apache-2.0
/// \file set_if.h
/// \brief Stores a value only where it differs from what is there.
///
/// On a per-call hot path, memory that other cores read on every call (a job's fields, the
/// decode hand-off's per-call arrays) should not be written when nothing changes: a store that
/// changes nothing still takes the cache line back from every core that holds it (Note [A call's
/// setup leaves the workers' lines alone] in kernels/cpu/moe_experts.cpp).
#pragma once

#include <cstring>
#include <type_traits>

namespace tidal::kernels {

/// dst = v unless dst already holds v. Floats compare by their bits (-0 and +0 differ, a NaN
/// equals itself), so the stored value is always exactly v.
template <class T, class V>
inline void set_if(T& dst, V v) {
  const T w = static_cast<T>(v);
  if constexpr (std::is_floating_point_v<T>) {
    if (std::memcmp(&dst, &w, sizeof w) != 0) dst = w;
  } else if (dst != w) {
    dst = w;
  }
}

}  // namespace tidal::kernels
