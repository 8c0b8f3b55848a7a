// SPDX-License-Identifier: Apache-2.0
/// \file module.cpp
/// \brief The _tidal extension module: error translation and the bound types.
#include <pybind11/pybind11.h>

#include <string>

#include "core/error.h"
#include "python/bindings/bindings.h"
#ifdef TIDAL_WITH_CUDA
#include "kernels/cuda/device_info.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_tidal, m) {
  m.doc() = "tidal native engine (use the `tidal` package)";
  m.attr("__version__") = TIDAL_VERSION;
  // tidal.FormatError: a malformed or truncated checkpoint/config; a ValueError for callers.
  static py::exception<tidal::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const tidal::FormatError& e) {
      py::set_error(format_error, e.what());
    } catch (const tidal::FileNotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const tidal::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const tidal::Unsupported& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    } catch (const tidal::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const tidal::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  m.def(
      "cuda_devices",
      []() {
        py::list out;
#ifdef TIDAL_WITH_CUDA
        for (int i = 0; i < tidal::kernels::cuda::device_count(); ++i)
          out.append(tidal::kernels::cuda::device_description(i));
#endif
        return out;
      },
      "Descriptions of the CUDA devices this build can use (empty: none, or built without CUDA).");
  m.attr("built_with_cuda") =
#ifdef TIDAL_WITH_CUDA
      true;
#else
      false;
#endif
  tidal::python::bind_config(m);
  tidal::python::bind_runtime(m);
}
