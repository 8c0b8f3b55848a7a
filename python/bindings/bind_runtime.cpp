// SPDX-License-Identifier: Apache-2.0
/// \file bind_runtime.cpp
/// \brief Runtime, Sequence and GenerationResult; arrays cross as numpy buffers; compute releases
/// the GIL.
#include <fmt/ranges.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>

#include "core/checkpoint/gguf_model.h"
#include "core/checkpoint/gguf_reader.h"
#include "core/error.h"
#include "core/runtime/runtime.h"
#include "kernels/cpu/weight_decode.h"
#include "offload/expert_store.h"
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

/// A 1-D float32 row of logits (copied when it is not already float32 contiguous).
std::vector<float> to_row(const py::object& obj) {
  py::array a;
  try {
    a = py::array::ensure(obj);
  } catch (const py::error_already_set&) {
  }
  TIDAL_CHECK(a && a.ndim() == 1 && a.size() > 0, InvalidArgument,
              "logits must be a non-empty 1-D array of floats");
  auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
  return std::vector<float>(f.data(), f.data() + f.size());
}

py::array_t<float> row_to_numpy(std::vector<float>&& v) {
  const auto n = static_cast<int64_t>(v.size());
  auto* heap = new std::vector<float>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return py::array_t<float>({n}, heap->data(), owner);
}

runtime::SamplingParams make_sampling(float temperature, int64_t top_k, float top_p, float min_p,
                                      float repetition_penalty, float presence_penalty,
                                      float frequency_penalty, const py::object& seed) {
  runtime::SamplingParams sp;
  sp.temperature = temperature;
  sp.top_k = top_k;
  sp.top_p = top_p;
  sp.min_p = min_p;
  sp.repetition_penalty = repetition_penalty;
  sp.presence_penalty = presence_penalty;
  sp.frequency_penalty = frequency_penalty;
  sp.seed = to_seed(seed);
  sp.validate();
  return sp;
}

py::dict stats_dict(const runtime::RuntimeStats& s) {
  py::dict d;
  d["prefill_tokens"] = s.prefill_tokens;
  d["decode_tokens"] = s.decode_tokens;
  d["prefill_seconds"] = s.prefill_seconds;
  d["decode_seconds"] = s.decode_seconds;
  d["routed_expert_seconds"] = s.routed_expert_seconds;
  d["dense_seconds"] = s.dense_seconds;
  d["sample_seconds"] = s.sample_seconds;
  d["forward_calls"] = s.forward_calls;
  d["live_sequences"] = s.live_sequences;
  d["state_bytes"] = s.state_bytes;
  d["checkpoint_bytes"] = s.checkpoint_bytes;
  d["weight_bytes"] = s.weight_bytes;
  d["expert_bytes"] = s.expert_bytes;
  d["checkpoint_file_bytes"] = s.checkpoint_file_bytes;
  d["weights_populated"] = s.weights_populated;
  d["load_seconds"] = s.load_seconds;
  d["expert_reads"] = s.expert_reads;
  d["expert_pairs"] = s.expert_pairs;
  d["lookahead_predicted"] = s.lookahead_predicted;
  d["lookahead_routed"] = s.lookahead_routed;
  d["lookahead_hits"] = s.lookahead_hits;
  d["lookahead_on"] = s.lookahead_on;
  d["gpu_expert_slots"] = s.gpu_expert_slots;
  d["gpu_expert_policy"] = s.gpu_expert_policy;
  d["gpu_expert_pairs"] = s.gpu_expert_pairs;
  d["host_expert_pairs"] = s.host_expert_pairs;
  d["gpu_expert_fills"] = s.gpu_expert_fills;
  d["gpu_expert_bytes_in"] = s.gpu_expert_bytes_in;
  d["gpu_expert_prefetch_slots"] = s.gpu_expert_prefetch_slots;
  d["gpu_expert_prefetched"] = s.gpu_expert_prefetched;
  d["gpu_expert_prefetch_hits"] = s.gpu_expert_prefetch_hits;
  d["layer_gpu_expert_pairs"] = s.layer_gpu_expert_pairs;
  d["layer_host_expert_pairs"] = s.layer_host_expert_pairs;
  d["layer_gpu_expert_fills"] = s.layer_gpu_expert_fills;
  d["layer_gpu_expert_evictions"] = s.layer_gpu_expert_evictions;
  d["gpu_expert_slot_bytes"] = s.gpu_expert_slot_bytes;
  d["gpu_streamed_layers"] = s.gpu_streamed_layers;
  d["gpu_streamed_padded_groups"] = s.gpu_streamed_padded_groups;
  d["gpu_streamed_pairs"] = s.gpu_streamed_pairs;
  d["gpu_streamed_bytes"] = s.gpu_streamed_bytes;
  return d;
}

}  // namespace

void bind_runtime(py::module_& m) {
  using runtime::Sampler;
  py::class_<Sampler>(m, "Sampler",
                      "Token selection state of one generation: penalties, filters, seeded RNG.")
      .def(py::init([](float temperature, int64_t top_k, float top_p, float min_p,
                       float repetition_penalty, float presence_penalty, float frequency_penalty,
                       const py::object& seed, const py::object& prompt_ids) {
             const auto sp = make_sampling(temperature, top_k, top_p, min_p, repetition_penalty,
                                           presence_penalty, frequency_penalty, seed);
             const auto ids = to_ids(prompt_ids);
             return std::make_unique<Sampler>(sp, ids);
           }),
           py::kw_only(), py::arg("temperature") = 0.0f, py::arg("top_k") = 0,
           py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
           py::arg("presence_penalty") = 0.0f, py::arg("frequency_penalty") = 0.0f,
           py::arg("seed") = py::none(), py::arg("prompt_ids") = py::list())
      .def(
          "sample", [](Sampler& s, const py::object& logits) { return s.sample(to_row(logits)); },
          py::arg("logits"), "Pick a token from one row of logits and record it.")
      .def("accept", &Sampler::accept, py::arg("token_id"),
           "Record a token as generated without sampling it.")
      .def(
          "penalized",
          [](const Sampler& s, const py::object& logits) {
            return row_to_numpy(s.penalized(to_row(logits)));
          },
          py::arg("logits"), "The logits after repetition/presence/frequency penalties.")
      .def(
          "probabilities",
          [](const Sampler& s, const py::object& logits) {
            return row_to_numpy(s.probabilities(to_row(logits)));
          },
          py::arg("logits"),
          "The distribution sample() draws from (after penalties and filters); empty when "
          "greedy.");

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
      .def(
          "step",
          [](Sequence& s, const py::object& ids_obj, Sampler& sampler) {
            const auto ids = to_ids(ids_obj);
            py::gil_scoped_release release;
            return s.step(ids, sampler);
          },
          py::arg("token_ids"), py::arg("sampler"),
          "Append token_ids and return the next token picked by `sampler` (not yet appended).")
      .def(
          "prefill",
          [](Sequence& s, const py::object& ids_obj) {
            const auto ids = to_ids(ids_obj);
            py::gil_scoped_release release;
            s.prefill(ids);
          },
          py::arg("token_ids"), "Append token_ids without computing logits.")
      .def("checkpoint", &Sequence::checkpoint, py::call_guard<py::gil_scoped_release>(),
           "Save the DeltaNet states at the current length so truncate() can return here.")
      .def("truncate", &Sequence::truncate, py::arg("num_tokens"),
           py::call_guard<py::gil_scoped_release>(),
           "Roll back to at most num_tokens; returns the new length (exact for attention-only "
           "models, else the latest checkpoint at or before it).")
      .def_property_readonly("checkpoint_positions",
                             [](const Sequence& s) {
                               py::gil_scoped_release release;  // waits for a running step
                               return s.checkpoint_positions();
                             })
      .def_property_readonly("num_tokens",
                             [](const Sequence& s) {
                               py::gil_scoped_release release;
                               return s.num_tokens();
                             })
      .def("reset_controls", &Sequence::reset_controls,
           "Clear a pending cancel() and the deadline (before a new request on this sequence).")
      .def("cancel", &Sequence::cancel,
           "Make the call waiting or running on this sequence (or else the next one) raise "
           "tidal.Cancelled. Safe from any thread; returns at once.")
      .def("set_deadline", &Sequence::set_deadline, py::arg("seconds"),
           "Calls after `seconds` from now raise TimeoutError (0: no deadline).");

  using runtime::Scheduler;
  py::class_<Scheduler::Admission>(m, "Admission",
                                   "One admitted request of the batching scheduler.")
      .def("release", &Scheduler::Admission::release, "Free the slot (idempotent).");

  py::class_<Runtime, std::shared_ptr<Runtime>>(m, "Runtime", "A loaded model.")
      .def_static(
          "load",
          [](const std::filesystem::path& path, const std::string& device, int num_threads,
             bool populate, const std::string& expert_dtype, int64_t expert_group_size,
             const std::string& cpu_isa, const std::string& expert_cache,
             const py::object& progress, uint64_t gpu_memory, const std::string& gpu_weights,
             const std::string& gpu_precision, bool cuda_graphs, const std::string& kv_cache_dtype,
             int64_t max_context, int64_t gpu_expert_slots, const std::string& gpu_expert_policy) {
            runtime::RuntimeOptions o;
            o.device = device;
            o.num_threads = num_threads;
            o.populate = populate;
            o.expert_dtype = expert_dtype;
            o.expert_group_size = expert_group_size;
            o.cpu_isa = cpu_isa;
            o.expert_cache = expert_cache;
            o.gpu_memory = gpu_memory;
            o.gpu_weights = gpu_weights;
            o.gpu_precision = gpu_precision;
            o.cuda_graphs = cuda_graphs;
            o.kv_cache_dtype = kv_cache_dtype;
            o.max_context = max_context;
            o.gpu_expert_slots = gpu_expert_slots;
            o.gpu_expert_policy = gpu_expert_policy;
            runtime::LoadProgress cb;
            if (!progress.is_none()) {
              cb = [progress](uint64_t done, uint64_t total) {
                py::gil_scoped_acquire acquire;
                progress(done, total);
              };
            }
            py::gil_scoped_release release;
            return Runtime::load(path, o, cb);
          },
          py::arg("path"), py::kw_only(), py::arg("device") = "cpu", py::arg("num_threads") = 0,
          py::arg("populate") = true, py::arg("expert_dtype") = "auto",
          py::arg("expert_group_size") = 0, py::arg("cpu_isa") = "auto",
          py::arg("expert_cache") = "auto", py::arg("progress") = py::none(),
          py::arg("gpu_memory") = 0, py::arg("gpu_weights") = "bf16",
          py::arg("gpu_precision") = "bf16x2", py::arg("cuda_graphs") = true,
          py::arg("kv_cache_dtype") = "bf16", py::arg("max_context") = 0,
          py::arg("gpu_expert_slots") = 0, py::arg("gpu_expert_policy") = "lfu",
          "Load a checkpoint directory. progress(done_bytes, total_bytes) is called while the "
          "dense weights are read into RAM and the routed experts are packed.")
      .def("describe", &Runtime::describe, "What runs: ISA, expert format, kernels, threads.")
      .def_property_readonly(
          "max_context", [](const Runtime& r) { return r.options().max_context; },
          "Tokens one sequence may hold (0: no limit of tidal's own).")
      .def(
          "stats", [](const Runtime& r) { return stats_dict(r.stats()); },
          "Counters since load or reset_stats() (tokens, seconds, bytes) as a dict.")
      .def("reset_stats", &Runtime::reset_stats)
      .def(
          "enable_batching",
          [](Runtime& r, int64_t max_batch, int64_t max_requests, int64_t prefill_chunk,
             double batch_wait) {
            runtime::SchedulerOptions o;
            o.max_batch = max_batch;
            o.max_requests = max_requests;
            o.prefill_chunk = prefill_chunk;
            o.batch_wait = batch_wait;
            r.enable_batching(o);
          },
          py::kw_only(), py::arg("max_batch") = 32, py::arg("max_requests") = 16,
          py::arg("prefill_chunk") = 512, py::arg("batch_wait") = 0.003,
          "Route every sequence's forward calls through the batching scheduler: one-token steps "
          "of concurrent sequences run as one batch through each MoE layer, prompts in chunks of "
          "prefill_chunk tokens between decode steps.")
      .def(
          "forward_batch",
          [](const Runtime& r, const std::vector<std::shared_ptr<Sequence>>& seqs,
             const py::object& ids_obj) {
            const auto ids = to_ids(ids_obj);
            std::vector<Sequence*> raw;
            for (const auto& s : seqs) raw.push_back(s.get());
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              out = r.forward_batch(raw, ids);
            }
            const auto rows = static_cast<int64_t>(raw.size());
            return to_numpy(std::move(out), rows, rows ? r.config().vocab_size : 0);
          },
          py::arg("sequences"), py::arg("token_ids"),
          "One decode step of several sequences at once: token_ids[b] is appended to "
          "sequences[b]; returns float32 logits (B, vocab). Each MoE layer runs all B rows as one "
          "batch.")
      .def(
          "gpu_profile",
          [](const Runtime& r) {
            std::map<std::string, double> out;
#if TIDAL_WITH_CUDA
            if (r.model().cuda()) out = r.model().cuda()->profile_seconds();
#endif
            return out;
          },
          "With TIDAL_CUDA_PROFILE=1 at load and cuda_graphs=False: GPU seconds per op label over "
          "the forwards so far (empty on the CPU).")
      .def_property_readonly("batching", [](const Runtime& r) { return r.scheduler() != nullptr; })
      .def(
          "try_admit",
          [](Runtime& r) {
            Scheduler* s = r.scheduler();
            TIDAL_CHECK(s != nullptr, InvalidArgument, "batching is off (enable_batching)");
            return s->try_admit();
          },
          py::keep_alive<0, 1>(),  // the slot keeps its runtime (and scheduler) alive
          "A slot for one more request, or tidal.Busy when max_requests are running.")
      .def(
          "scheduler_stats",
          [](const Runtime& r) {
            py::dict d;
            const Scheduler* s = r.scheduler();
            if (!s) return d;
            const auto st = s->stats();
            d["decode_steps"] = st.decode_steps;
            d["decode_rows"] = st.decode_rows;
            d["max_rows"] = st.max_rows;
            d["prefill_chunks"] = st.prefill_chunks;
            d["admitted"] = st.admitted;
            d["rejected"] = st.rejected;
            d["active_requests"] = st.active_requests;
            d["cancelled"] = st.cancelled;
            d["deadline_exceeded"] = st.deadline_exceeded;
            d["failed"] = st.failed;
            d["queued"] = st.queued;
            d["max_batch"] = s->options().max_batch;
            d["max_requests"] = s->options().max_requests;
            return d;
          },
          "Counters of the batching scheduler (empty while batching is off).")
      .def("memory_report", &Runtime::memory_report,
           "VRAM use in bytes (device=\"cuda\"): weights, kv_cache, deltanet_state, workspaces, "
           "used, free, total, limit.")
      .def(
          "start_routing_record", [](const Runtime& r) { r.model().routing().start_recording(); },
          "Record the experts every MoE router chooses from now on (one sequence at a time).")
      .def(
          "stop_routing_record",
          [](const Runtime& r) {
            int64_t tokens = 0;
            auto ids = r.model().routing().stop_recording(tokens);
            const auto& c = r.config();
            auto* heap = new std::vector<int32_t>(std::move(ids));
            py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int32_t>*>(p); });
            return py::array_t<int32_t>({tokens, c.num_hidden_layers, c.num_experts_per_tok},
                                        heap->data(), owner);
          },
          "Stop recording; int32 (tokens, num_hidden_layers, top_k) expert ids, -1 for dense "
          "layers.")
      .def(
          "set_routing_replay",
          [](const Runtime& r, const py::array& trace) {
            const auto& c = r.config();
            TIDAL_CHECK(trace.ndim() == 3 && trace.shape(1) == c.num_hidden_layers &&
                            trace.shape(2) == c.num_experts_per_tok,
                        InvalidArgument,
                        "routing trace must have shape (tokens, {}, {}) (num_hidden_layers, "
                        "num_experts_per_tok), got ndim {}",
                        c.num_hidden_layers, c.num_experts_per_tok, trace.ndim());
            TIDAL_CHECK(trace.dtype().kind() == 'i' || trace.dtype().kind() == 'u', InvalidArgument,
                        "routing trace must hold integers");
            auto a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(trace);
            r.model().routing().set_replay(std::vector<int32_t>(a.data(), a.data() + a.size()),
                                           static_cast<int64_t>(trace.shape(0)));
          },
          py::arg("trace"),
          "Replace the routers' choice by trace rows (looped); weights are the router's "
          "probabilities of the replayed experts.")
      .def(
          "clear_routing_replay", [](const Runtime& r) { r.model().routing().clear_replay(); },
          "Route with the routers again.")
      .def(
          "start_trace", [](const Runtime& r) { r.model().trace().start(); },
          "Record a timeline of the forward calls from now on (Note [Step trace]).")
      .def(
          "stop_trace", [](const Runtime& r) { return r.model().trace().stop_json(); },
          "Stop recording; the timeline as Chrome trace JSON (a str).")
      .def(
          "set_router_lookahead",
          [](const Runtime& r, bool on, int64_t predict_k) {
            r.model().routing().set_lookahead(on, predict_k);
          },
          py::arg("on"), py::arg("predict_k") = 0,
          "Predict each MoE layer's experts one layer early and count hits (stats()); "
          "predict_k experts per token, 0 = top_k.")
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
             float temperature, int64_t top_k, float top_p, float min_p, float repetition_penalty,
             float presence_penalty, float frequency_penalty, const py::object& seed,
             std::vector<int64_t> stop_token_ids) {
            const auto ids = to_ids(ids_obj);
            runtime::GenerationConfig g;
            g.max_new_tokens = max_new_tokens;
            g.sampling = make_sampling(temperature, top_k, top_p, min_p, repetition_penalty,
                                       presence_penalty, frequency_penalty, seed);
            g.stop_token_ids = std::move(stop_token_ids);
            py::gil_scoped_release release;
            return rt.generate(ids, g);
          },
          py::arg("token_ids"), py::kw_only(), py::arg("max_new_tokens") = 32,
          py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
          py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
          py::arg("presence_penalty") = 0.0f, py::arg("frequency_penalty") = 0.0f,
          py::arg("seed") = py::none(), py::arg("stop_token_ids") = std::vector<int64_t>{},
          "Token-level generation loop in C++ (the tidal.Runtime wrapper adds text, streaming "
          "and stop strings).")
      .def("new_sequence",
           [](const std::shared_ptr<Runtime>& rt) { return std::make_shared<Sequence>(rt); });

  // Note [Pre-packed experts] (offload/expert_store.h): tidal.synth writes benchmark models whose
  // routed experts are packed directly, layer by layer.
  struct PyPackedWriter {
    std::unique_ptr<offload::PackedExpertsWriter> w;
    int64_t experts, inter, hidden;
  };
  py::class_<PyPackedWriter>(m, "PackedExpertsWriter",
                             "Writes a pre-packed routed-experts file for a config.json: "
                             "add_layer(gate_up [E, 2I, H], down [E, H, I]) per MoE layer "
                             "(float32, or uint16 holding BF16 bits), then finish().")
      .def(py::init([](const std::filesystem::path& path, const std::filesystem::path& config,
                       const std::string& dtype, int64_t group_size, int num_threads) {
             const auto cfg = core::ModelConfig::from_file(config);
             kernels::cpu::ExpertDType dt;
             try {
               dt = kernels::cpu::parse_expert_dtype(dtype);
             } catch (const std::invalid_argument&) {
               throw InvalidArgument(
                   fmt::format("expert dtype must be bf16, int8 or int4, got \"{}\"", dtype));
             }
             return PyPackedWriter{std::make_unique<offload::PackedExpertsWriter>(
                                       path, cfg, dt, group_size, num_threads),
                                   cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size};
           }),
           py::arg("path"), py::arg("config"), py::arg("dtype"), py::arg("group_size") = 0,
           py::arg("num_threads") = 0)
      .def(
          "add_layer",
          [](PyPackedWriter& pw, const py::array& gate_up, const py::array& down) {
            auto dtype_of = [](const py::array& a, const char* what) {
              TIDAL_CHECK(a.flags() & py::array::c_style, InvalidArgument,
                          "{} must be C-contiguous", what);
              if (a.dtype().is(py::dtype::of<float>())) return kernels::DType::kF32;
              TIDAL_CHECK(a.dtype().is(py::dtype::of<uint16_t>()), InvalidArgument,
                          "{} must be float32 or uint16 (BF16 bits)", what);
              return kernels::DType::kBF16;
            };
            const auto dt = dtype_of(gate_up, "gate_up");
            TIDAL_CHECK(dtype_of(down, "down") == dt, InvalidArgument,
                        "gate_up and down must have the same dtype");
            auto shape = [](const py::array& a) {
              return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
            };
            const std::vector<int64_t> want_gu{pw.experts, 2 * pw.inter, pw.hidden},
                want_dn{pw.experts, pw.hidden, pw.inter};
            TIDAL_CHECK(shape(gate_up) == want_gu, InvalidArgument,
                        "gate_up has shape [{}], expected [{}]", fmt::join(shape(gate_up), ", "),
                        fmt::join(want_gu, ", "));
            TIDAL_CHECK(shape(down) == want_dn, InvalidArgument,
                        "down has shape [{}], expected [{}]", fmt::join(shape(down), ", "),
                        fmt::join(want_dn, ", "));
            py::gil_scoped_release release;
            pw.w->add_layer(gate_up.data(), down.data(), dt);
          },
          py::arg("gate_up"), py::arg("down"))
      .def("finish", [](PyPackedWriter& pw) { pw.w->finish(); })
      .def_property_readonly("layers_written",
                             [](const PyPackedWriter& pw) { return pw.w->layers_written(); })
      .def_property_readonly("layers_expected",
                             [](const PyPackedWriter& pw) { return pw.w->layers_expected(); });

  m.def(
      "read_gguf",
      [](const std::filesystem::path& path) {
        std::unique_ptr<core::GgufFile> f;
        {
          py::gil_scoped_release release;
          f = std::make_unique<core::GgufFile>(path);
        }
        static const char* kTypeNames[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                           "bool", "string", "array", "u64", "i64", "f64"};
        py::dict types;
        for (const auto& [k, t] : f->metadata_types()) {
          std::string name = kTypeNames[static_cast<uint32_t>(t)];
          if (t == core::GgufValueType::kArray)
            name +=
                std::string("[") + kTypeNames[static_cast<uint32_t>(f->array_types().at(k))] + "]";
          types[py::str(k)] = name;
        }
        py::list tensors;
        for (const auto& t : f->tensors()) {
          py::dict d;
          d["name"] = t.name;
          d["type"] = t.type;
          d["type_name"] = std::string(core::ggml_type_info(t.type)->name);
          d["shape"] = t.shape();
          d["offset"] = t.offset;
          d["nbytes"] = t.nbytes;
          tensors.append(d);
        }
        py::dict out;
        out["version"] = f->version();
        out["alignment"] = f->alignment();
        out["data_offset"] = f->data_offset();
        // Metadata as Python objects: floats keep NaN/Inf, strings that are not UTF-8 come as
        // bytes.
        std::function<py::object(const nlohmann::json&)> to_py =
            [&](const nlohmann::json& j) -> py::object {
          switch (j.type()) {
            case nlohmann::json::value_t::boolean:
              return py::bool_(j.get<bool>());
            case nlohmann::json::value_t::number_integer:
              return py::int_(j.get<int64_t>());
            case nlohmann::json::value_t::number_unsigned:
              return py::int_(j.get<uint64_t>());
            case nlohmann::json::value_t::number_float:
              return py::float_(j.get<double>());
            case nlohmann::json::value_t::string: {
              const auto& s = j.get_ref<const std::string&>();
              PyObject* u =
                  PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
              if (u != nullptr) return py::reinterpret_steal<py::object>(u);
              PyErr_Clear();
              return py::bytes(s);
            }
            case nlohmann::json::value_t::array: {
              py::list l;
              for (const auto& x : j) l.append(to_py(x));
              return l;
            }
            default:
              return py::none();
          }
        };
        py::dict meta;
        for (const auto& [k, v] : f->metadata().items()) meta[py::str(k)] = to_py(v);
        out["metadata"] = meta;
        out["types"] = types;
        out["tensors"] = tensors;
        return out;
      },
      py::arg("path"),
      "Parse a GGUF file (header, metadata, tensor infos; every field checked against the file). "
      "tidal.gguf.read wraps it.");
  m.def(
      "decode_ggml",
      [](py::bytes data, int32_t type, int64_t n) {
        namespace kc = kernels::cpu;
        TIDAL_CHECK(kc::ggml_decodable(type), Unsupported, "ggml type {} cannot be decoded", type);
        TIDAL_CHECK(n >= 0 && n % kc::ggml_block_values(type) == 0, InvalidArgument,
                    "n={} is not a multiple of the {} block ({})", n, kc::ggml_type_name(type),
                    kc::ggml_block_values(type));
        const std::string_view b = data;
        TIDAL_CHECK(b.size() == kc::ggml_row_bytes(type, n), InvalidArgument,
                    "{} values of {} take {} bytes, got {}", n, kc::ggml_type_name(type),
                    kc::ggml_row_bytes(type, n), b.size());
        py::array_t<float> out(n);
        kc::decode_ggml_row(type, b.data(), n, out.mutable_data());
        return out;
      },
      py::arg("data"), py::arg("type"), py::arg("n"),
      "Decode n values of ggml block type `type` (tests: against the gguf package).");
  m.def(
      "quantize_fp8_blocks",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> w, int64_t block) {
        TIDAL_CHECK(w.ndim() >= 2, InvalidArgument, "w must have at least 2 dimensions, got {}",
                    w.ndim());
        TIDAL_CHECK(block > 0, InvalidArgument, "block must be positive, got {}", block);
        const int64_t rows = w.shape(w.ndim() - 2), cols = w.shape(w.ndim() - 1);
        const int64_t lead = rows * cols == 0 ? 0 : w.size() / (rows * cols);
        std::vector<py::ssize_t> cshape(w.shape(), w.shape() + w.ndim());
        std::vector<py::ssize_t> sshape(cshape);
        sshape[sshape.size() - 2] = (rows + block - 1) / block;
        sshape[sshape.size() - 1] = (cols + block - 1) / block;
        py::array_t<uint8_t> codes(cshape);
        py::array_t<float> scales(sshape);
        const float* src = w.data();
        uint8_t* c = codes.mutable_data();
        float* s = scales.mutable_data();
        const int64_t per_s = sshape[sshape.size() - 2] * sshape[sshape.size() - 1];
        {
          // One task per (matrix, block row), on plain threads.
          py::gil_scoped_release release;
          const int64_t brows = (rows + block - 1) / block, gc = (cols + block - 1) / block;
          const int64_t tasks = lead * brows;
          std::atomic<int64_t> next{0};
          auto work = [&] {
            for (int64_t t = next++; t < tasks; t = next++) {
              const int64_t i = t / brows, r0 = (t % brows) * block;
              const size_t off = static_cast<size_t>(i * rows * cols + r0 * cols);
              kernels::cpu::quantize_fp8_blocks(src + off, std::min(block, rows - r0), cols, block,
                                                c + off, s + i * per_s + (r0 / block) * gc);
            }
          };
          const int64_t n =
              std::clamp<int64_t>(tasks / 4, 1, std::max(1u, std::thread::hardware_concurrency()));
          std::vector<std::thread> pool;
          for (int64_t w = 1; w < n; ++w) pool.emplace_back(work);
          work();
          for (auto& t : pool) t.join();
        }
        return py::make_tuple(codes, scales);
      },
      py::arg("w"), py::arg("block") = 128,
      "Block-wise FP8 E4M3 quantisation of the last two dims: (codes uint8, scale_inv float32).");
  m.def(
      "gguf_config",
      [](const std::filesystem::path& path) {
        core::GgufModel gm;
        {
          py::gil_scoped_release release;
          gm = core::open_gguf_model(path);
        }
        return gm.config.dump();
      },
      py::arg("path"), "The Hugging Face config (JSON text) tidal derives from a GGUF model.");
  m.def(
      "checkpoint_tensor",
      [](const std::filesystem::path& path, const std::string& name) {
        namespace kc = kernels::cpu;
        core::GgufModel gm;
        std::unique_ptr<core::Checkpoint> ck;
        if (std::filesystem::is_regular_file(path) && path.extension() == ".gguf") {
          gm = core::open_gguf_model(path);
          ck = std::move(gm.checkpoint);
        } else {
          ck = core::Checkpoint::open(path);
        }
        const core::TensorInfo* t = ck->find(name);
        TIDAL_CHECK(t != nullptr, InvalidArgument, "checkpoint \"{}\" has no tensor \"{}\"",
                    path.string(), name);
        const int64_t cols = t->shape.empty() ? 1 : t->shape.back();
        const int64_t rows = t->numel() / std::max<int64_t>(cols, 1);
        const int64_t per = t->shape.size() == 3 ? t->shape[1] : rows;  // rows of one expert
        py::array_t<float> out(t->shape);
        float* o = out.mutable_data();
        for (int64_t e = 0; e < rows / std::max<int64_t>(per, 1); ++e) {
          kc::MatrixSource m;
          m.rows = per;
          m.cols = cols;
          m.ld = cols;
          if (t->ggml_type >= 0) {
            m.ggml_type = t->ggml_type;
            m.row_bytes = kc::ggml_row_bytes(t->ggml_type, cols);
            m.data = t->data + e * per * m.row_bytes;
          } else {
            m.dtype = t->dtype;
            TIDAL_CHECK(t->dtype == kernels::DType::kF32 || t->dtype == kernels::DType::kBF16 ||
                            t->dtype == kernels::DType::kF16 || t->dtype == kernels::DType::kF8E4M3,
                        Unsupported, "tensor \"{}\" has dtype {}", name, t->dtype_name);
            m.data = t->data + e * per * cols * kernels::dtype_size(t->dtype);
            if (t->dtype == kernels::DType::kF8E4M3) {
              const core::TensorInfo* sc = ck->find(core::fp8_scale_name(name));
              TIDAL_CHECK(sc != nullptr, FormatError, "no block scales for \"{}\"", name);
              m.block = ck->fp8_block();
              m.scale_ld = (cols + m.block - 1) / m.block;
              m.scale_inv = sc->data + e * ((per + m.block - 1) / m.block) * m.scale_ld *
                                           kernels::dtype_size(sc->dtype);
              m.scale_dtype = sc->dtype;
            }
          }
          for (int64_t r = 0; r < per; ++r) m.decode_row(r, o + (e * per + r) * cols);
        }
        return out;
      },
      py::arg("path"), py::arg("name"),
      "One tensor as tidal loads it (GGUF: under its Hugging Face name, values restored; FP8: "
      "dequantised), as float32. For tests.");
  m.def(
      "measure_read_bandwidth",
      [](size_t bytes, int num_threads, int repeats) {
        py::gil_scoped_release release;
        return runtime::measure_read_bandwidth(bytes, num_threads, repeats);
      },
      py::arg("bytes") = size_t{1} << 30, py::arg("num_threads") = 0, py::arg("repeats") = 3,
      "Host memory read bandwidth in bytes/s (threads sum slices of a buffer; best of repeats).");
  m.def(
      "inspect_checkpoint",
      [](const std::filesystem::path& path) {
        TIDAL_CHECK(std::filesystem::exists(path), FileNotFound, "model path \"{}\" does not exist",
                    path.string());
        core::ModelConfig cfg;
        std::unique_ptr<core::Checkpoint> ck;
        if (std::filesystem::is_regular_file(path) && path.extension() == ".gguf") {
          core::GgufModel gm = core::open_gguf_model(path, /*decode=*/false);
          cfg = core::ModelConfig::from_json(gm.config, path.string());
          ck = std::move(gm.checkpoint);
        } else {
          TIDAL_CHECK(std::filesystem::exists(path / "config.json"), FileNotFound,
                      "model directory \"{}\" has no config.json", path.string());
          cfg = core::ModelConfig::from_file(path / "config.json");
          ck = core::Checkpoint::open(path);
        }
        py::list tensors;
        for (const auto& name : ck->names()) {
          const core::TensorInfo* t = ck->find(name);
          py::dict d;
          d["name"] = t->name;
          d["dtype"] = t->dtype_name;
          d["shape"] = t->shape;
          d["nbytes"] = t->nbytes;
          d["file"] = t->file;
          tensors.append(d);
        }
        return py::make_tuple(cfg, tensors);
      },
      py::arg("path"),
      "(ModelConfig, [ {name, dtype, shape, nbytes, file} ]) of a checkpoint directory, from its "
      "config and safetensors headers only (no weights are read).");
}

}  // namespace tidal::python
