// SPDX-License-Identifier: Apache-2.0
/// \file bind_offload.cpp
/// \brief The VRAM expert cache's slot bookkeeping (offload/expert_cache.h) for Python: policy
/// studies on routing traces and the tests that hold it to tidal.cache_sim.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "offload/expert_cache.h"
#include "offload/expert_schedule.h"
#include "python/bindings/bindings.h"

namespace py = pybind11;

namespace tidal::python {
namespace {

py::dict stats_dict(const offload::CacheLayerStats& s) {
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["evictions"] = s.evictions;
  d["admitted"] = s.admitted;
  d["bytes_in"] = s.bytes_in;
  d["not_admitted"] = s.not_admitted;
  return d;
}

}  // namespace

void bind_offload(py::module_& m) {
  using offload::ExpertSlotCache;
  py::class_<ExpertSlotCache>(
      m, "ExpertSlotCache",
      "Slot bookkeeping of the VRAM expert cache: which (layer, expert) is in which slot, which "
      "slot a miss takes, per-layer counters (docs/architecture.md, Note [Expert cache policies]).")
      .def(py::init([](int64_t layers, int64_t experts, int64_t slots, const std::string& policy,
                       double decay, uint64_t expert_bytes) {
             return ExpertSlotCache(layers, experts, slots, offload::parse_cache_policy(policy),
                                    decay, expert_bytes);
           }),
           py::arg("layers"), py::arg("experts"), py::arg("slots"), py::arg("policy") = "lru",
           py::arg("decay") = 0.98, py::arg("expert_bytes") = 0)
      .def(
          "lookup",
          [](ExpertSlotCache& c, int64_t layer, const std::vector<int64_t>& experts) {
            std::vector<int32_t> slots;
            c.lookup(layer, experts, slots);
            return slots;
          },
          py::arg("layer"), py::arg("experts"),
          "Each expert's slot, -1 for a miss; counts hits and misses, pins the hits.")
      .def(
          "admit",
          [](ExpertSlotCache& c, int64_t layer, int64_t expert) {
            const auto a = c.admit(layer, expert);
            return py::make_tuple(a.slot, a.evicted_layer, a.evicted_expert);
          },
          py::arg("layer"), py::arg("expert"),
          "(slot, evicted_layer, evicted_expert) for a missed expert, -1 where none.")
      .def("access", &ExpertSlotCache::access, py::arg("layer"), py::arg("expert"),
           "lookup, then admit on a miss; True for a hit.")
      .def("next_token", &ExpertSlotCache::next_token)
      .def("release_pins", &ExpertSlotCache::release_pins)
      .def("set_resident", &ExpertSlotCache::set_resident, py::arg("keys"),
           "The slots hold exactly these (layer, expert) keys, in order.")
      .def("slot_of", &ExpertSlotCache::slot_of, py::arg("layer"), py::arg("expert"))
      .def("expert_in", &ExpertSlotCache::expert_in, py::arg("slot"))
      .def("reset_stats", &ExpertSlotCache::reset_stats)
      .def("stats",
           [](const ExpertSlotCache& c) {
             py::list out;
             for (const auto& s : c.stats()) out.append(stats_dict(s));
             return out;
           })
      .def("total", [](const ExpertSlotCache& c) { return stats_dict(c.total()); })
      .def_property_readonly("slots", &ExpertSlotCache::slots)
      .def_property_readonly("resident", &ExpertSlotCache::resident)
      .def_property_readonly("policy", [](const ExpertSlotCache& c) {
        return std::string(offload::cache_policy_name(c.policy()));
      });

  using offload::ExpertCacheSchedule;
  py::class_<ExpertCacheSchedule>(
      m, "ExpertCacheSchedule",
      "The VRAM expert cache's step rules (Note [Expert cache schedule]): which routed experts of "
      "a decode step the GPU computes, admissions, when copies are issued and land.")
      .def(py::init([](int64_t layers, int64_t experts, int64_t slots, const std::string& policy,
                       int64_t max_fills, double decay, int64_t static_steps) {
             return std::make_unique<ExpertCacheSchedule>(layers, experts, slots,
                                                          offload::parse_cache_policy(policy),
                                                          max_fills, decay, static_steps);
           }),
           py::arg("layers"), py::arg("experts"), py::arg("slots"), py::arg("policy") = "lfu",
           py::arg("max_fills") = 16, py::arg("decay") = 0.98, py::arg("static_steps") = 256)
      .def(
          "begin_step",
          [](ExpertCacheSchedule& s) {
            py::list out;
            for (const auto& f : s.begin_step())
              out.append(py::make_tuple(f.slot, f.layer, f.expert));
            return out;
          },
          "Starts a step: the copies to issue now, as (slot, layer, expert).")
      .def(
          "route",
          [](ExpertCacheSchedule& s, int64_t layer, const std::vector<int32_t>& ids) {
            std::vector<int32_t> host;
            const int64_t gpu = s.route(layer, ids.data(), static_cast<int64_t>(ids.size()), host);
            return py::make_tuple(gpu, host);
          },
          py::arg("layer"), py::arg("ids"),
          "(number the GPU computes, positions the host computes) for one layer's routed ids.")
      .def("end_step", &ExpertCacheSchedule::end_step)
      .def_property_readonly("fills_issued", &ExpertCacheSchedule::fills_issued)
      .def_property_readonly("fills_kept", &ExpertCacheSchedule::fills_kept)
      .def_property_readonly("slots", &ExpertCacheSchedule::slots)
      .def_property_readonly("frozen", &ExpertCacheSchedule::frozen);
}

}  // namespace tidal::python
