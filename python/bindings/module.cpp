// SPDX-License-Identifier: Apache-2.0
/// \file module.cpp
/// \brief The _tidal extension module: error translation and the bound types.
#include <pybind11/pybind11.h>

#include <string>

#include "core/error.h"
#include "core/runtime/scheduler.h"
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
  // tidal.Busy / tidal.Cancelled: the batching scheduler (RuntimeErrors).
  static py::exception<tidal::Busy> busy(m, "Busy", PyExc_RuntimeError);
  static py::exception<tidal::Cancelled> cancelled(m, "Cancelled", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const tidal::FormatError& e) {
      py::set_error(format_error, e.what());
    } catch (const tidal::Busy& e) {
      py::set_error(busy, e.what());
    } catch (const tidal::Cancelled& e) {
      py::set_error(cancelled, e.what());
    } catch (const tidal::DeadlineExceeded& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
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
  m.def(
      "measure_gpu_bandwidth",
      [](int device, size_t bytes, int repeats) {
        py::dict d;
#ifdef TIDAL_WITH_CUDA
        tidal::kernels::cuda::Bandwidth bw;
        {
          py::gil_scoped_release release;
          if (device < 0 || device >= tidal::kernels::cuda::device_count())
            throw tidal::InvalidArgument(
                "measure_gpu_bandwidth: no CUDA device " + std::to_string(device) + " (" +
                std::to_string(tidal::kernels::cuda::device_count()) + " visible)");
          bw = tidal::kernels::cuda::measure_bandwidth(device, bytes, repeats);
        }
        d["hbm_read_bytes_per_s"] = bw.hbm_read;
        d["pinned_h2d_bytes_per_s"] = bw.h2d_pinned;
        d["pinned_d2h_bytes_per_s"] = bw.d2h_pinned;
#else
        (void)device;
        (void)bytes;
        (void)repeats;
        throw tidal::Unsupported("measure_gpu_bandwidth: this tidal was built without CUDA");
#endif
        return d;
      },
      py::arg("device") = 0, py::arg("bytes") = size_t{256} << 20, py::arg("repeats") = 5,
      "Measured HBM read and pinned host<->device copy bandwidths of a CUDA device, bytes/s.");
  m.attr("built_with_cuda") =
#ifdef TIDAL_WITH_CUDA
      true;
#else
      false;
#endif
  tidal::python::bind_config(m);
  tidal::python::bind_runtime(m);
  tidal::python::bind_offload(m);
}
