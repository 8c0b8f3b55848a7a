// SPDX-License-Identifier: Apache-2.0
/// \file bindings.h
/// \brief Declarations shared by the bind_<component>.cpp files of the _tidal module.
#pragma once

#include <pybind11/pybind11.h>

namespace tidal::python {
void bind_config(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
void bind_offload(pybind11::module_& m);
}  // namespace tidal::python
