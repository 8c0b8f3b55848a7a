// SPDX-License-Identifier: Apache-2.0
/// \file bind_runtime.cpp
/// \brief Runtime, Sequence and GenerationResult; arrays cross as numpy buffers; compute releases
/// the GIL.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include "core/error.h"
#include "core/runtime/runtime.h"
#include "python/bindings/bindings.h"

namespace py = pybind11;

namespace tidal::python {
namespace {
using runtime::Runtime;

/// Any 1-D integer array-like -> int64 ids, with a clear error otherwise.
std::vector<int64_t> to_ids(const py::object& obj) {
  TIDAL_CHECK(
      !py::isinstance<py::str>(obj) && !py::isinstance<py::bytes>(obj), InvalidArgument,
      "token_ids must be a sequence of integer token ids, got a string (tokenize the text first)");
  py::array a;
  try {
    a = py::array::ensure(obj);
  } catch (const py::error_already_set&) {
  }
  TIDAL_CHECK(a && a.ndim() == 1, InvalidArgument,
              "token_ids must be a 1-D sequence of integers, got {}",
              std::string(py::str(py::type::of(obj).attr("__name__"))));
  const char kind = a.dtype().kind();
  TIDAL_CHECK(a.size() == 0 || kind == 'i' || kind == 'u', InvalidArgument,
              "token_ids must be integers, got an array of dtype {}",
              std::string(py::str(a.dtype())));
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  return std::vector<int64_t>(arr.data(), arr.data() + arr.size());
}

py::array_t<float> to_numpy(std::vector<float>&& v, int64_t rows, int64_t cols) {
  auto* heap = new std::vector<float>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return py::array_t<float>({rows, cols}, heap->data(), owner);
}

std::optional<uint64_t> to_seed(const py::object& seed) {
  if (seed.is_none()) return std::nullopt;
  TIDAL_CHECK(py::isinstance<py::int_>(seed), InvalidArgument, "seed must be an int >= 0 or None");
  const py::int_ v(seed);
  const bool in_range =
      v >= py::int_(0) && v < py::int_(py::reinterpret_steal<py::object>(
                                  PyLong_FromString("18446744073709551616", nullptr, 10)));
  TIDAL_CHECK(in_range, InvalidArgument, "seed must be in [0, 2**64), got {}",
              std::string(py::str(v)));
  return v.cast<uint64_t>();
}

}  // namespace

void bind_runtime(py::module_& m) {
  using runtime::GenerationResult;
  using runtime::Sequence;
  py::class_<GenerationResult>(m, "GenerationResult", "Output of Runtime.generate.")
      .def_readonly("token_ids", &GenerationResult::token_ids, "The new tokens (prompt excluded).")
      .def_readonly("finish_reason", &GenerationResult::finish_reason, "'length' or 'stop'.")
      .def_readonly("prompt_tokens", &GenerationResult::prompt_tokens)
      .def_readonly("prefill_seconds", &GenerationResult::prefill_seconds)
      .def_readonly("decode_seconds", &GenerationResult::decode_seconds)
      .def("__repr__", [](const GenerationResult& r) {
        return "GenerationResult(num_tokens=" + std::to_string(r.token_ids.size()) +
               ", finish_reason='" + r.finish_reason + "')";
      });

  py::class_<Sequence, std::shared_ptr<Sequence>>(
      m, "Sequence", "One sequence with its own KV cache and DeltaNet state.")
      .def(
          "forward",
          [](Sequence& s, const py::object& ids_obj, bool all_logits) {
            const auto ids = to_ids(ids_obj);
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              out = s.forward(ids, all_logits);
            }
            const int64_t rows = all_logits ? static_cast<int64_t>(ids.size()) : 1;
            const int64_t cols = rows ? static_cast<int64_t>(out.size()) / rows : 0;
            return to_numpy(std::move(out), rows, cols);
          },
          py::arg("token_ids"), py::arg("all_logits") = true,
          "Append token_ids to the sequence; returns float32 logits (n, vocab) for every new "
          "token, or (1, vocab).")
      .def_property_readonly("num_tokens", &Sequence::num_tokens);

  py::class_<Runtime, std::shared_ptr<Runtime>>(m, "Runtime", "A loaded model.")
      .def_static(
          "load",
          [](const std::filesystem::path& path, const std::string& device, int num_threads) {
            runtime::RuntimeOptions o;
            o.device = device;
            o.num_threads = num_threads;
            py::gil_scoped_release release;
            return Runtime::load(path, o);
          },
          py::arg("path"), py::kw_only(), py::arg("device") = "cpu", py::arg("num_threads") = 0)
      .def_property_readonly("config", &Runtime::config,
                             py::return_value_policy::reference_internal)
      .def_property_readonly("num_threads", &Runtime::num_threads)
      .def_property_readonly("device", [](const Runtime& r) { return r.options().device; })
      .def(
          "logits",
          [](const Runtime& rt, const py::object& ids_obj) {
            const auto ids = to_ids(ids_obj);
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              out = rt.logits(ids);
            }
            return to_numpy(std::move(out), static_cast<int64_t>(ids.size()),
                            rt.config().vocab_size);
          },
          py::arg("token_ids"))
      .def(
          "generate",
          [](const Runtime& rt, const py::object& ids_obj, int64_t max_new_tokens,
             float temperature, int64_t top_k, float top_p, float min_p, const py::object& seed,
             std::vector<int64_t> stop_token_ids) {
            const auto ids = to_ids(ids_obj);
            runtime::GenerationConfig g;
            g.max_new_tokens = max_new_tokens;
            g.sampling.temperature = temperature;
            g.sampling.top_k = top_k;
            g.sampling.top_p = top_p;
            g.sampling.min_p = min_p;
            g.sampling.seed = to_seed(seed);
            g.stop_token_ids = std::move(stop_token_ids);
            py::gil_scoped_release release;
            return rt.generate(ids, g);
          },
          py::arg("token_ids"), py::kw_only(), py::arg("max_new_tokens") = 32,
          py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
          py::arg("min_p") = 0.0f, py::arg("seed") = py::none(),
          py::arg("stop_token_ids") = std::vector<int64_t>{})
      .def("new_sequence",
           [](const std::shared_ptr<Runtime>& rt) { return std::make_shared<Sequence>(rt); });
}

}  // namespace tidal::python
