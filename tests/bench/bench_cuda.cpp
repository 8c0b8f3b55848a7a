// SPDX-License-Identifier: Apache-2.0
/// \file bench_cuda.cpp
/// \brief GPU benchmark of the pinned layers on real Qwen3.6-35B-A3B shapes (random weights: speed
/// depends on shapes and bytes). Prints JSON lines:
///   - "hbm": the measured read bandwidth (a streaming-read kernel over 2 GiB, best of 10) and the
///     device-to-device copy bandwidth; every ratio below is against the measured read figure;
///   - "kernel": per-kernel time and achieved bandwidth (projections in BF16 and INT8, attention
///     decode at 1K / 32K / 128K context, DeltaNet recurrent step, norms, router);
///   - "decode_step": one decode step of the full 40-layer model with the routed experts excluded,
///     at a given context, with and without CUDA graphs, against the time to read the
///     GPU-resident bytes once at the measured bandwidth: wall time of forward() ("ms") and, with
///     graphs, GPU time between CUDA events around the step on the stream ("gpu_ms");
///   - "decode_gemv_chain", "gemv_stream_shape", "deltanet_decode_chain": parts of the step chained
///     in graphs (--gemv-only: the bandwidth probe and the GEMV parts only); --profile-step: one
///     eager step between cudaProfilerStart/Stop, for Nsight Compute;
///   - "decode_gemv_chain_persistent": the GEMV chain in one cooperative kernel with grid barriers
///     (an experiment for a persistent decode kernel, tests/bench/persistent_chain.cu).
/// Usage: tidal_bench_cuda [--contexts 1024,32768,131072] [--step-context 4096] [--weights
/// bf16,int8] [--only-step | --no-step | --gemv-only | --profile-step] [--stamps] [--default-only]
///   - --default-only: the decode step in today's default mode only (graphs, PDL, fused).
///   - --stamps: "decode_step_stamps", the default step's kernels in release order from a graph
///     replay (Note [Kernel stamps] in kernels/cuda/ops.cu), each kernel's share of the step's
///     critical path (the gap to the next kernel's release), and those shares summed per kernel
///     name; the median share over 5 stamped steps.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/model/cuda_model.h"
#include "core/model/model.h"
#include "core/model/routing_control.h"
#include "core/model/step_trace.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cuda/ops.h"
#include "persistent_chain.h"

namespace {
namespace kc = tidal::kernels::cuda;
using tidal::kernels::DType;
using tidal::kernels::WeightView;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fmt::print(stderr, "CUDA error in {}: {}\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

__attribute__((unused)) double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Median of `reps` timings (seconds) of fn on stream `s`, measured with events.
double time_gpu(const std::function<void()>& fn, int reps = 20, cudaStream_t s = nullptr) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();  // warm-up
  cudaDeviceSynchronize();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, s);
    fn();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

__attribute__((unused)) void fill_random(void* p, size_t bytes, uint32_t seed) {
  // Random BF16 pairs of small magnitude (|w| ~ 1/128), generated on the host in chunks.
  std::vector<uint16_t> h(std::min<size_t>(bytes / 2, size_t{1} << 24));
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.f, 1.0f / 128);
  for (auto& x : h) x = tidal::kernels::f32_to_bf16(d(g));
  for (size_t off = 0; off < bytes; off += h.size() * 2)
    check(cudaMemcpy(static_cast<char*>(p) + off, h.data(), std::min(h.size() * 2, bytes - off),
                     cudaMemcpyHostToDevice),
          "fill");
}

const char* kConfig35b = R"({
  "model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40,
  "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320,
  "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
  "shared_expert_intermediate_size": 512, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
  "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
  "full_attention_interval": 4, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
  "tie_word_embeddings": false,
  "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}})";

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  size_t p = 0;
  while (p < s.size()) {
    const size_t q = s.find(',', p);
    v.push_back(std::stoll(s.substr(p, q - p)));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> contexts = {1024, 32768, 131072};
  int64_t step_ctx = 4096;
  std::vector<std::string> wfmts = {"bf16", "int8"};
  bool only_step = false, no_step = false, profile_step = false, gemv_only = false, stamps = false,
       default_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only-step")
      only_step = true;
    else if (a == "--gemv-only")  // bandwidth probe, GEMV chain and per-shape GEMV streams only
      gemv_only = true;
    else if (a == "--profile-step")  // one eager default-mode step between cudaProfilerStart/Stop
      only_step = profile_step = true;
    else if (a == "--no-step")
      no_step = true;
    else if (a == "--stamps")  // the default step's kernel timeline (Note [Kernel stamps])
      stamps = true;
    else if (a == "--default-only")  // the step with today's defaults only (graphs, PDL, fused)
      default_only = true;
    else if (a == "--contexts" && i + 1 < argc)
      contexts = parse_list(argv[++i]);
    else if (a == "--step-context" && i + 1 < argc)
      step_ctx = std::stoll(argv[++i]);
    else if (a == "--weights" && i + 1 < argc) {
      wfmts.clear();
      std::string s = argv[++i];
      size_t p = 0;
      while (p <= s.size()) {
        const size_t q = s.find(',', p);
        wfmts.push_back(s.substr(p, q == std::string::npos ? std::string::npos : q - p));
        if (q == std::string::npos) break;
        p = q + 1;
      }
    } else {
      fmt::print(
          stderr,
          "usage: {} [--contexts A,B] [--step-context N] [--weights bf16,int8] "
          "[--only-step | --no-step | --gemv-only | --profile-step] [--stamps] [--default-only]\n",
          argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  const std::string dev = fmt::format("{} (sm_{}{}, {} SMs)", prop.name, prop.major, prop.minor,
                                      prop.multiProcessorCount);

  // ---------------------------------------------------------------- measured bandwidth
  const size_t probe_bytes = size_t{2} << 30;
  void *buf = nullptr, *buf2 = nullptr;
  unsigned* sink = nullptr;
  check(cudaMalloc(&buf, probe_bytes), "probe alloc");
  check(cudaMalloc(&buf2, probe_bytes), "probe alloc");
  check(cudaMalloc(&sink, 4), "sink");
  cudaMemset(buf, 1, probe_bytes);
  const double t_read = time_gpu(
      [&] { kc::read_probe(buf, probe_bytes, sink, prop.multiProcessorCount * 8, nullptr); }, 10);
  const double t_copy =
      time_gpu([&] { cudaMemcpyAsync(buf2, buf, probe_bytes, cudaMemcpyDeviceToDevice); }, 10);
  const double bw = probe_bytes / t_read;
  fmt::print("{}\n", nlohmann::json{{"bench", "hbm"},
                                    {"device", dev},
                                    {"read_GBps", bw / 1e9},
                                    {"d2d_copy_GBps", 2.0 * probe_bytes / t_copy / 1e9}}
                         .dump());
  cudaFree(buf2);
  cudaFree(buf);

  // Launch floor: an empty kernel replayed from a CUDA graph, 200 in a row (each waits for the
  // previous one, like the ops of a decode step).
  {
    cudaStream_t st;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    cudaGraph_t g;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    for (int i = 0; i < 200; ++i) kc::gpu_sleep(0, st);
    cudaStreamEndCapture(st, &g);
    cudaGraphExec_t ge;
    check(cudaGraphInstantiate(&ge, g, 0), "graph");
    const double t = time_gpu([&] { cudaGraphLaunch(ge, st); }, 10, st);
    fmt::print("{}\n", nlohmann::json{{"bench", "graph_kernel_floor"},
                                      {"us_per_empty_kernel", t * 1e6 / 200}}
                           .dump());
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  }

  // The decode step's projections alone: every GEMV of the 40 layers and the lm_head, each on
  // its own weights (no L2 reuse), chained on one stream as the step chains them and replayed from
  // a graph, with and without programmatic dependent launch. Its time against the bytes at the
  // measured bandwidth says how much of the step is weight streaming and how much is everything
  // between the projections.
  if (!only_step) {
    struct Shape {
      int64_t rows, cols;
      bool gated;
    };
    std::vector<Shape> chain;
    for (int l = 0; l < 40; ++l) {
      if (l % 4 == 3) {
        chain.push_back({9216, 2048, false});  // attention q+gate | k | v
        chain.push_back({2048, 4096, false});  // o_proj
      } else {
        chain.push_back({12352, 2048, false});  // DeltaNet qkv | z | b | a
        chain.push_back({2048, 4096, false});   // out_proj
      }
      chain.push_back({1284, 2048, false});  // router | shared gate | shared up | gate logit
      chain.push_back({2048, 512, true});    // shared down (SwiGLU input)
    }
    chain.push_back({248320, 2048, false});  // lm_head
    double bytes = 0;
    std::vector<void*> mats;
    for (const auto& c : chain) {
      void* p = nullptr;
      check(cudaMalloc(&p, static_cast<size_t>(c.rows * c.cols) * 2), "chain weights");
      cudaMemset(p, 0, static_cast<size_t>(c.rows * c.cols) * 2);
      mats.push_back(p);
      bytes += static_cast<double>(c.rows * c.cols) * 2;
    }
    float *xa = nullptr, *xb = nullptr;
    check(cudaMalloc(&xa, 248320 * 4), "chain x");
    check(cudaMalloc(&xb, 248320 * 4), "chain y");
    cudaMemset(xa, 0, 248320 * 4);
    cudaStream_t st;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    for (bool pdl : {true, false}) {
      kc::set_pdl_enabled(pdl);
      cudaGraph_t g;
      cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
      for (size_t i = 0; i < chain.size(); ++i) {
        const auto& c = chain[i];
        const kc::DevMatrix m{mats[i], nullptr, kc::WFormat::kBF16, c.rows, c.cols};
        // ping-pong the activations so each GEMV depends on the one before
        float* in = i % 2 ? xb : xa;
        float* out = i % 2 ? xa : xb;
        kc::gemv(m, in, c.cols, out, c.rows, 1, false, st, c.gated ? in + 512 : nullptr);
      }
      cudaStreamEndCapture(st, &g);
      cudaGraphExec_t ge;
      check(cudaGraphInstantiate(&ge, g, 0), "chain graph");
      const double t = time_gpu([&] { cudaGraphLaunch(ge, st); }, 10, st);
      fmt::print("{}\n", nlohmann::json{{"bench", "decode_gemv_chain"},
                                        {"model", "qwen3.6-35b-a3b shape, 40 layers + lm_head"},
                                        {"gemvs", chain.size()},
                                        {"pdl", kc::pdl_enabled()},
                                        {"ms", t * 1e3},
                                        {"bytes", bytes},
                                        {"of_measured_bw", bytes / t / bw}}
                             .dump());
      cudaGraphExecDestroy(ge);
      cudaGraphDestroy(g);
    }
    kc::set_pdl_enabled(true);
    // The same chain in one persistent cooperative kernel with a grid barrier between GEMVs
    // (Note [persistent GEMV chain experiment] in persistent_chain.cu; the shared expert's SwiGLU
    // input left out), at the occupancy limit and at one block per SM.
    std::vector<tidal::bench::ChainGemv> pc;
    for (size_t i = 0; i < chain.size(); ++i) pc.push_back({mats[i], chain[i].rows, chain[i].cols});
    for (int bps : {0, 1}) {
      const auto r = tidal::bench::persistent_gemv_chain(pc, xa, xb, 10, bps, st);
      fmt::print("{}\n",
                 nlohmann::json{{"bench", "decode_gemv_chain_persistent"},
                                {"model", "qwen3.6-35b-a3b shape, 40 layers + lm_head"},
                                {"gemvs", chain.size()},
                                {"ran", r.ran},
                                {"blocks", r.blocks},
                                {"ms", r.ms},
                                {"bytes", bytes},
                                {"of_measured_bw", r.ms > 0 ? bytes / (r.ms * 1e-3) / bw : 0.0},
                                {"barrier_us", r.barrier_us}}
                     .dump());
    }
    cudaStreamDestroy(st);
    for (void* p : mats) cudaFree(p);
    cudaFree(xa);
    cudaFree(xb);
  }

  // Each projection shape on its own, as the decode step runs it: launches of one shape chained
  // in a graph (each reads the previous one's output), cycling over copies of the weights that
  // together exceed L2 (so no launch finds its matrix cached), time per launch. Unlike one
  // event-timed launch, this includes the overlap a chain gets (programmatic dependent launch)
  // and leaves out the event and launch overheads a step does not pay.
  if (!only_step) {
    struct Proj {
      const char* name;
      int64_t rows, cols;
      bool gated;
    };
    const Proj projs[] = {{"gdn in [qkv|z|b|a]", 12352, 2048, false},
                          {"attn in [q+gate|k|v]", 9216, 2048, false},
                          {"o_proj / out_proj", 2048, 4096, false},
                          {"mlp in [router|shared gate|up|shared_expert_gate]", 1284, 2048, false},
                          {"shared down (SwiGLU input)", 2048, 512, true}};
    float *xa = nullptr, *xb = nullptr;
    check(cudaMalloc(&xa, 16384 * 4), "x");
    check(cudaMalloc(&xb, 16384 * 4), "y");
    cudaMemset(xa, 0, 16384 * 4);
    cudaMemset(xb, 0, 16384 * 4);
    cudaStream_t st;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    for (const auto& f : wfmts)
      for (const auto& p : projs) {
        kc::DevMatrix m;
        m.rows = p.rows;
        m.cols = p.cols;
        m.format = f == "int8" ? kc::WFormat::kI8 : kc::WFormat::kBF16;
        const size_t bytes = m.bytes();
        const size_t copies = std::max<size_t>(8, (size_t{512} << 20) / bytes);
        std::vector<void*> ws(copies);
        float* sc = nullptr;
        check(cudaMalloc(&sc, p.rows * 4), "sc");
        cudaMemset(sc, 0, p.rows * 4);
        for (auto& w : ws) {
          check(cudaMalloc(&w, bytes), "w");
          cudaMemset(w, 0, bytes);
        }
        cudaGraph_t g;
        cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
        for (size_t i = 0; i < copies; ++i) {
          m.data = ws[i];
          m.scale = f == "int8" ? sc : nullptr;
          float* in = i % 2 ? xb : xa;
          float* out = i % 2 ? xa : xb;
          kc::gemv(m, in, p.cols, out, p.rows, 1, false, st, p.gated ? in + 512 : nullptr);
        }
        cudaStreamEndCapture(st, &g);
        cudaGraphExec_t ge;
        check(cudaGraphInstantiate(&ge, g, 0), "shape graph");
        const double t =
            time_gpu([&] { cudaGraphLaunch(ge, st); }, 10, st) / static_cast<double>(copies);
        fmt::print("{}\n",
                   nlohmann::json{{"bench", "gemv_stream_shape"},
                                  {"weights", f},
                                  {"shape", fmt::format("{} [{}x{}]", p.name, p.rows, p.cols)},
                                  {"launches", copies},
                                  {"us", t * 1e6},
                                  {"bytes", bytes},
                                  {"of_measured_bw", static_cast<double>(bytes) / t / bw}}
                       .dump());
        cudaGraphExecDestroy(ge);
        cudaGraphDestroy(g);
        for (auto& w : ws) cudaFree(w);
        cudaFree(sc);
      }
    cudaStreamDestroy(st);
    cudaFree(xa);
    cudaFree(xb);
  }
  if (gemv_only) return 0;

  auto report = [&](const std::string& name, const std::string& shape, double t, double bytes) {
    fmt::print("{}\n", nlohmann::json{{"bench", "kernel"},
                                      {"kernel", name},
                                      {"shape", shape},
                                      {"us", t * 1e6},
                                      {"bytes", bytes},
                                      {"GBps", bytes / t / 1e9},
                                      {"of_measured_bw", bytes / t / bw}}
                           .dump());
  };

  if (!only_step) {
    // ---------------------------------------------------------------- projections (decode GEMV)
    struct Proj {
      const char* name;
      int64_t rows, cols;
    };
    // The stacked projections the model runs (core/model/cuda_model.cpp, GpuLayer).
    const Proj projs[] = {{"attn in [q+gate|k|v]", 9216, 2048},
                          {"attn.o_proj", 2048, 4096},
                          {"gdn in [qkv|z|b|a]", 12352, 2048},
                          {"gdn.out_proj", 2048, 4096},
                          {"mlp in [router|shared gate|up|shared_expert_gate]", 1284, 2048},
                          {"shared down", 2048, 512},
                          {"lm_head", 248320, 2048}};
    float *x = nullptr, *y = nullptr;
    check(cudaMalloc(&x, 8 * 8192 * 4), "x");
    check(cudaMalloc(&y, 8 * 248320 * 4), "y");
    cudaMemset(x, 0, 8 * 8192 * 4);
    for (const auto& p : projs)
      for (const auto& f : wfmts) {
        kc::DevMatrix m;
        m.rows = p.rows;
        m.cols = p.cols;
        m.format = f == "int8" ? kc::WFormat::kI8 : kc::WFormat::kBF16;
        void* w = nullptr;
        float* sc = nullptr;
        const size_t bytes = m.bytes();
        check(cudaMalloc(&w, bytes), "w");
        fill_random(w, static_cast<size_t>(p.rows * p.cols) * (f == "int8" ? 1 : 2), 7);
        if (f == "int8") {
          check(cudaMalloc(&sc, p.rows * 4), "sc");
          cudaMemset(sc, 0, p.rows * 4);
        }
        m.data = w;
        m.scale = sc;
        for (int64_t M : {1, 4}) {
          const double t = time_gpu([&] { kc::gemv(m, x, p.cols, y, p.rows, M, false, nullptr); });
          report(fmt::format("gemv {} M={}", f, M),
                 fmt::format("{} [{}x{}]", p.name, p.rows, p.cols), t, static_cast<double>(bytes));
        }
        cudaFree(w);
        cudaFree(sc);
      }

    // ---------------------------------------------------------------- attention decode
    {
      const int64_t nh = 16, nkv = 2, d = 256;
      for (int64_t ctx : contexts) {
        const size_t kv_bytes = static_cast<size_t>(ctx * nkv * d) * 2;
        uint16_t *kc_ = nullptr, *vc_ = nullptr;
        check(cudaMalloc(&kc_, kv_bytes), "k");
        check(cudaMalloc(&vc_, kv_bytes), "v");
        fill_random(kc_, kv_bytes, 1);
        fill_random(vc_, kv_bytes, 2);
        kc::LayerStateDev ls{kc_, vc_, nullptr, nullptr};
        kc::LayerStateDev* dls = nullptr;
        kc::StepDev* dstep = nullptr;
        cudaMalloc(&dls, sizeof ls);
        cudaMemcpy(dls, &ls, sizeof ls, cudaMemcpyHostToDevice);
        const kc::StepDev st{ctx - 1, dls};
        cudaMalloc(&dstep, sizeof st);
        cudaMemcpy(dstep, &st, sizeof st, cudaMemcpyHostToDevice);
        float *q = nullptr, *o = nullptr, *gate = nullptr, *part = nullptr;
        const int splits = kc::attention_max_splits(1, nkv, prop.multiProcessorCount);
        cudaMalloc(&q, nh * d * 4);
        cudaMalloc(&o, nh * d * 4);
        cudaMalloc(&gate, nh * d * 4);
        cudaMalloc(&part,
                   kc::attention_workspace_floats(
                       1, nh, d, kc::attention_max_splits(1, nkv, prop.multiProcessorCount, 8)) *
                       4);
        cudaMemset(q, 0, nh * d * 4);
        cudaMemset(gate, 0, nh * d * 4);
        kc::AttentionArgs a;
        a.q = q;
        a.gate = gate;
        a.out = o;
        a.partial = part;
        a.step = dstep;
        a.T = 1;
        a.nh = nh;
        a.nkv = nkv;
        a.d = d;
        a.max_splits = splits;
        a.scale = 1.0f / 16;
        const double t = time_gpu([&] { kc::attention(a, nullptr); });
        report("attention decode (+combine, gate)",
               fmt::format("ctx={} nh=16 nkv=2 d=256 bf16 KV", ctx), t,
               2.0 * static_cast<double>(kv_bytes));
        // The tensor-core kernel against the SIMT tile kernel, over splits per SM.
        for (bool tc : {true, false})
          for (int per_sm : {1, 2, 3, 4, 6, 8}) {
            a.tensor_cores = tc;
            a.max_splits = kc::attention_max_splits(1, nkv, prop.multiProcessorCount, per_sm);
            const double ts = time_gpu([&] { kc::attention(a, nullptr); });
            report(fmt::format("attention decode sweep {}", tc ? "tensor-core" : "simt-tile"),
                   fmt::format("ctx={} splits/SM={} splits={}", ctx, per_sm, a.max_splits), ts,
                   2.0 * static_cast<double>(kv_bytes));
          }
        a.tensor_cores = true;
        cudaFree(kc_);
        cudaFree(vc_);
        cudaFree(dls);
        cudaFree(dstep);
        cudaFree(q);
        cudaFree(o);
        cudaFree(gate);
        cudaFree(part);
      }
    }

    // ---------------------------------------------------------------- DeltaNet decode step
    {
      const int64_t nk = 16, nv = 32, dk = 128, dv = 128, C = 2 * nk * dk + nv * dv;
      float *S = nullptr, *conv = nullptr, *buf3 = nullptr;
      const size_t sbytes = static_cast<size_t>(nv * dk * dv) * 4;
      cudaMalloc(&S, sbytes);
      cudaMalloc(&conv, 3 * C * 4);
      cudaMalloc(&buf3, 16 * C * 4);
      cudaMemset(S, 0, sbytes);
      cudaMemset(conv, 0, 3 * C * 4);
      cudaMemset(buf3, 0, 16 * C * 4);
      kc::LayerStateDev ls{nullptr, nullptr, conv, S};
      kc::LayerStateDev* dls = nullptr;
      kc::StepDev* dstep = nullptr;
      cudaMalloc(&dls, sizeof ls);
      cudaMemcpy(dls, &ls, sizeof ls, cudaMemcpyHostToDevice);
      const kc::StepDev st{0, dls};
      cudaMalloc(&dstep, sizeof st);
      cudaMemcpy(dstep, &st, sizeof st, cudaMemcpyHostToDevice);
      float* b = buf3;
      const double t = time_gpu([&] {
        kc::delta_rule(b, b + C, b + 2 * C, b + 3 * C, b + 4 * C, dstep, 0, b + 5 * C, 1, nk, nv,
                       dk, dv, nullptr);
      });
      report("delta_rule decode", "nv=32 dk=dv=128 fp32 state", t,
             2.0 * static_cast<double>(sbytes));
      const double tc = time_gpu(
          [&] { kc::causal_conv1d_silu(b, 0, 1, C, 4, b + 2 * C, dstep, 0, b + 4 * C, nullptr); });
      report("conv1d decode", "C=8192 K=4", tc, static_cast<double>(C) * 4 * (3 * 2 + 4 + 2));
      // The DeltaNet part of a decode step between its projections, as the step runs it: conv +
      // norms (gdn_conv_prep_step) then the delta rule with its gated norm, for 30 layers each on
      // its own state (60 MB, past L2), chained in a graph. Time per layer.
      {
        const int nl = 30;
        std::vector<float*> states(nl), convs(nl);
        std::vector<kc::LayerStateDev> lsv(nl);
        for (int l = 0; l < nl; ++l) {
          check(cudaMalloc(&states[l], sbytes), "state");
          check(cudaMalloc(&convs[l], 3 * C * 4), "conv");
          cudaMemset(states[l], 0, sbytes);
          cudaMemset(convs[l], 0, 3 * C * 4);
          lsv[l] = kc::LayerStateDev{nullptr, nullptr, convs[l], states[l]};
        }
        kc::LayerStateDev* dl = nullptr;
        kc::StepDev* ds = nullptr;
        cudaMalloc(&dl, nl * sizeof(kc::LayerStateDev));
        cudaMemcpy(dl, lsv.data(), nl * sizeof(kc::LayerStateDev), cudaMemcpyHostToDevice);
        const kc::StepDev st2{0, dl};
        cudaMalloc(&ds, sizeof st2);
        cudaMemcpy(ds, &st2, sizeof st2, cudaMemcpyHostToDevice);
        float* wbuf = nullptr;  // conv weights, norm weight, A_log, dt_bias, z, src, q, k, v, ...
        check(cudaMalloc(&wbuf, 32 * C * 4), "gdn buffers");
        cudaMemset(wbuf, 0, 32 * C * 4);
        float *cw = wbuf, *src = wbuf + 4 * C, *z = wbuf + 6 * C, *gq = wbuf + 8 * C,
              *gk = wbuf + 10 * C, *gv = wbuf + 12 * C, *be = wbuf + 14 * C, *gg = wbuf + 15 * C,
              *nwt = wbuf + 16 * C, *al = wbuf + 17 * C, *dtb = wbuf + 18 * C, *go = wbuf + 20 * C;
        // out_proj of each layer (BF16, 2048 x 4096), so both variants end where the layer's
        // token mixer ends.
        const int64_t H = 2048;
        std::vector<void*> outw(nl);
        for (auto& p : outw) {
          check(cudaMalloc(&p, static_cast<size_t>(H * nv * dv) * 2), "out_proj");
          cudaMemset(p, 0, static_cast<size_t>(H * nv * dv) * 2);
        }
        float* hx = nullptr;
        check(cudaMalloc(&hx, H * 4), "x");
        cudaMemset(hx, 0, H * 4);
        cudaStream_t st3;
        cudaStreamCreateWithFlags(&st3, cudaStreamNonBlocking);
        // split: the delta rule in column blocks, its gated norm staged by out_proj's streaming
        // GEMV (today's decode); head: one block per value head with the norm inside, then
        // out_proj (the decode before).
        for (const bool split : {true, false}) {
          cudaGraph_t g;
          cudaStreamBeginCapture(st3, cudaStreamCaptureModeThreadLocal);
          for (int l = 0; l < nl; ++l) {
            const kc::DevMatrix om{outw[l], nullptr, kc::WFormat::kBF16, H, nv * dv};
            kc::gdn_conv_prep_step(src, cw, ds, l, 4, src + C, src + C + nv, al, dtb, gq, gk, gv,
                                   be, gg, nk, nv, dk, dv, st3);
            if (split) {
              kc::delta_rule(gq, gk, gv, gg, be, ds, l, go, 1, nk, nv, dk, dv, st3);
              if (!kc::gemv_gated_norm(om, go, z, nwt, dv, 1e-6f, hx, true, st3)) {
                kc::rms_norm_gated(go, z, nv * dv, nv, nwt, go, nv, dv, 1e-6f, st3);
                kc::gemv(om, go, nv * dv, hx, H, 1, true, st3);
              }
            } else {
              kc::delta_rule_normed(gq, gk, gv, gg, be, ds, l, z, nv * dv, nwt, 1e-6f, go, 1, nk,
                                    nv, dk, dv, st3);
              kc::gemv(om, go, nv * dv, hx, H, 1, true, st3);
            }
          }
          cudaStreamEndCapture(st3, &g);
          cudaGraphExec_t ge;
          check(cudaGraphInstantiate(&ge, g, 0), "gdn graph");
          const double tl = time_gpu([&] { cudaGraphLaunch(ge, st3); }, 10, st3) / nl;
          const double lb = 2.0 * sbytes + static_cast<double>(H * nv * dv) * 2;
          fmt::print("{}\n",
                     nlohmann::json{{"bench", "deltanet_decode_chain"},
                                    {"variant", split ? "split delta rule, norm in out_proj"
                                                      : "delta rule per head with norm, out_proj"},
                                    {"layers", nl},
                                    {"us_per_layer", tl * 1e6},
                                    {"bytes_per_layer", lb},
                                    {"bytes_at_measured_bw_us", lb / bw * 1e6}}
                         .dump());
          cudaGraphExecDestroy(ge);
          cudaGraphDestroy(g);
        }
        for (auto& p : outw) cudaFree(p);
        cudaFree(hx);
        cudaStreamDestroy(st3);
        for (int l = 0; l < nl; ++l) {
          cudaFree(states[l]);
          cudaFree(convs[l]);
        }
        cudaFree(dl);
        cudaFree(ds);
        cudaFree(wbuf);
      }
      cudaFree(S);
      cudaFree(conv);
      cudaFree(buf3);
      cudaFree(dls);
      cudaFree(dstep);
    }

  }  // !only_step

  if (no_step) return 0;
  // ---------------------------------------------------------------- full decode step
  const int64_t nh = 16, nkv = 2, d = 256;
  const auto cfg = tidal::core::ModelConfig::from_json(nlohmann::json::parse(kConfig35b), "35b");
  auto ex = tidal::kernels::make_tbb_executor(8);
  // Host weights: every matrix views one shared random BF16 buffer (values do not matter).
  const int64_t H = cfg.hidden_size;
  size_t biggest = static_cast<size_t>(cfg.vocab_size * H);
  std::vector<uint16_t> host(biggest);
  {
    std::mt19937 g(3);
    std::normal_distribution<float> dd(0.f, 1.0f / 128);
    std::vector<uint16_t> pat(1 << 20);
    for (auto& v : pat) v = tidal::kernels::f32_to_bf16(dd(g));
    for (size_t i = 0; i < host.size(); i += pat.size())
      std::memcpy(host.data() + i, pat.data(), std::min(pat.size(), host.size() - i) * 2);
  }
  auto view = [&](int64_t r, int64_t c) { return WeightView{host.data(), DType::kBF16, r, c}; };
  std::vector<tidal::core::LayerWeights> layers(static_cast<size_t>(cfg.num_hidden_layers));
  const int64_t nk = cfg.linear_num_key_heads, nv = cfg.linear_num_value_heads,
                dk = cfg.linear_key_head_dim, dv = cfg.linear_value_head_dim,
                C = cfg.linear_conv_channels();
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    auto& w = layers[l];
    w.type = cfg.layer_types[l];
    w.input_layernorm.assign(H, 0.f);
    w.post_attention_layernorm.assign(H, 0.f);
    if (w.type == tidal::core::LayerType::kFullAttention) {
      w.attn.q_proj = view(2 * nh * d, H);
      w.attn.k_proj = view(nkv * d, H);
      w.attn.v_proj = view(nkv * d, H);
      w.attn.o_proj = view(H, nh * d);
      w.attn.q_norm.assign(d, 0.f);
      w.attn.k_norm.assign(d, 0.f);
    } else {
      w.gdn.in_proj_qkv = view(C, H);
      w.gdn.in_proj_z = view(nv * dv, H);
      w.gdn.in_proj_b = view(nv, H);
      w.gdn.in_proj_a = view(nv, H);
      w.gdn.out_proj = view(H, nv * dv);
      w.gdn.conv1d.assign(static_cast<size_t>(C * 4), 0.1f);
      w.gdn.dt_bias.assign(nv, 0.f);
      w.gdn.A_log.assign(nv, 0.f);
      w.gdn.norm.assign(dv, 1.f);
    }
    w.mlp.is_moe = true;
    w.mlp.router = view(cfg.num_experts, H);
    w.mlp.shared_gate_proj = view(cfg.shared_expert_intermediate_size, H);
    w.mlp.shared_up_proj = view(cfg.shared_expert_intermediate_size, H);
    w.mlp.shared_down_proj = view(H, cfg.shared_expert_intermediate_size);
    w.mlp.shared_expert_gate.assign(H, 0.f);
  }
  std::vector<float> final_norm(H, 0.f);
  (void)nk;
  (void)dk;
  for (const auto& f : wfmts) {
    // CUDA graphs with everything on; without the fused decode GEMVs; without programmatic
    // dependent launch and tensor-core attention either (the CUDA backend as it was, today's
    // defaults); then launches one by one.
    struct Mode {
      bool graphs, pdl, fuse;
    };
    std::vector<Mode> modes = {Mode{true, true, true}, Mode{true, true, false},
                               Mode{true, false, false}, Mode{false, true, true}};
    // --profile-step: today's default decode (fused), eager, so a kernel profiler (ncu
    // --profile-from-start off) sees exactly one step's kernels.
    if (profile_step) modes = {Mode{false, true, true}};
    if (default_only && !profile_step) modes = {Mode{true, true, true}};
    for (const Mode mode : modes) {
      const bool graphs = mode.graphs, pdl = mode.pdl;
      kc::set_pdl_enabled(pdl);
      tidal::core::HostWeights hw;
      hw.embed_tokens = view(cfg.vocab_size, H);
      hw.lm_head = view(cfg.vocab_size, H);
      hw.final_norm = &final_norm;
      hw.layers = &layers;
      for (int64_t i = 0; i < cfg.rotary_dim / 2; ++i)
        hw.rope_inv_freq.push_back(std::pow(1e7f, -2.0f * i / cfg.rotary_dim));
      tidal::core::RoutingControl routing(cfg.num_hidden_layers, cfg.num_experts,
                                          cfg.num_experts_per_tok);
      tidal::core::CudaOptions o;
      o.weights = f;
      o.graphs = graphs;
      o.fuse_decode = mode.fuse;
      o.attention_tensor_cores = mode.pdl;  // the new decode: PDL and tensor-core attention
      tidal::core::CudaModel model(cfg, hw, nullptr, &routing, o, *ex);
      tidal::core::SequenceState st;
      st.layers.resize(layers.size());
      st.device = model.new_state();
      model.set_length(st, step_ctx);
      const auto rep = model.memory_report();
      std::vector<float> logits;
      const int64_t tok[1] = {42};
      std::vector<double> ts;
      for (int i = 0; i < 30; ++i) {
        st.num_tokens = step_ctx;  // every step at the same context
        const bool prof = profile_step && i == 29;
        if (prof) cudaProfilerStart();
        const auto t0 = std::chrono::steady_clock::now();
        model.forward(tok, st, tidal::core::LogitsMode::kLast, logits, *ex, nullptr);
        if (prof) cudaProfilerStop();
        ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      if (graphs && pdl && mode.fuse &&
          !profile_step) {  // prefill: 2048 tokens from an empty sequence, in the
                            // model's 512-token chunks
        std::vector<int64_t> prompt(2048);
        for (size_t i = 0; i < prompt.size(); ++i)
          prompt[i] = static_cast<int64_t>((i * 7919) % 248000);
        std::vector<double> tp;
        for (int r = 0; r < 4; ++r) {
          tidal::core::SequenceState ps;
          ps.layers.resize(layers.size());
          ps.device = model.new_state();
          const auto t0 = std::chrono::steady_clock::now();
          model.forward(prompt, ps, tidal::core::LogitsMode::kLast, logits, *ex, nullptr);
          tp.push_back(
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(tp.begin() + 1, tp.end());
        const double t = tp[2];
        // Dense FLOPs per token: 2 · (every resident weight but the embedding table), + attention.
        const double flops = 2.0 *
                             (static_cast<double>(rep.weights_bf16_equivalent) / 2.0 -
                              static_cast<double>(cfg.vocab_size * H)) *
                             2048.0;
        fmt::print("{}\n",
                   nlohmann::json{{"bench", "prefill"},
                                  {"model", "qwen3.6-35b-a3b shape, routed experts excluded"},
                                  {"weights", f},
                                  {"precision", "bf16x2"},
                                  {"tokens", 2048},
                                  {"ms", t * 1e3},
                                  {"tokens_per_s", 2048.0 / t},
                                  {"dense_TFLOPs", flops / t / 1e12}}
                       .dump());
      }
      if (!graphs) {  // TIDAL_CUDA_PROFILE=1: GPU time per op label, per step
        const auto prof = model.profile_seconds();
        if (!prof.empty()) {
          nlohmann::json pj;
          for (const auto& [k, v] : prof) pj[k] = v / static_cast<double>(ts.size()) * 1e6;
          fmt::print("{}\n", nlohmann::json{{"bench", "decode_step_profile_us"},
                                            {"weights", f},
                                            {"context", step_ctx},
                                            {"ops", pj}}
                                 .dump());
        }
      }
      // GPU time of a step: CUDA events around the step's graph on the stream (the step trace's
      // GPU track, Note [Step trace]), median of 15 steps; the wall time above adds the host's
      // graph launch and the wait for the logits.
      double gpu_ms = 0;
      if (graphs) {
        tidal::core::StepTrace trace;
        model.set_trace(&trace);
        trace.start();
        for (int i = 0; i < 15; ++i) {
          st.num_tokens = step_ctx;
          model.forward(tok, st, tidal::core::LogitsMode::kLast, logits, *ex, nullptr);
        }
        const auto j = nlohmann::json::parse(trace.stop_json());
        model.set_trace(nullptr);
        std::vector<double> g;
        for (const auto& e : j["traceEvents"])
          if (e.value("name", "") == "gpu_segment") g.push_back(e["dur"].get<double>() * 1e-3);
        if (!g.empty()) {
          std::sort(g.begin(), g.end());
          gpu_ms = g[g.size() / 2];
        }
      }
      if (stamps && graphs && pdl && mode.fuse) {
        // Five stamped steps; per kernel position the median share and entry lead.
        std::vector<std::vector<kc::KernelStamp>> runs;
        for (int i = 0; i < 5; ++i) {
          st.num_tokens = step_ctx;
          kc::stamps_begin(4096);
          model.forward(tok, st, tidal::core::LogitsMode::kLast, logits, *ex, nullptr);
          runs.push_back(kc::stamps_end());
        }
        const size_t n = runs[0].size();
        bool same = true;
        for (const auto& r : runs) same = same && r.size() == n;
        auto median = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          return v.empty() ? 0.0 : v[v.size() / 2];
        };
        nlohmann::json ks = nlohmann::json::array();
        std::map<std::string, std::pair<int, double>> by_name;
        double span = 0;
        for (size_t k = 0; k + 1 < n && same; ++k) {
          std::vector<double> share, lead;
          for (const auto& r : runs) {
            share.push_back(static_cast<double>(r[k + 1].release_ns - r[k].release_ns) * 1e-3);
            lead.push_back(static_cast<double>(r[k].release_ns - r[k].entry_ns) * 1e-3);
          }
          const auto& s0 = runs[0][k];
          const double sh = median(share);
          span += sh;
          nlohmann::json row = {s0.name, s0.blocks, s0.threads, std::round(sh * 100) / 100,
                                std::round(median(lead) * 100) / 100};
          // Stages the kernel marked itself (stamp_mark): µs after its release, median.
          nlohmann::json marks = nlohmann::json::array();
          for (int j = 0; j < 3 && s0.mark_ns[j] != 0; ++j) {
            std::vector<double> m;
            for (const auto& r : runs)
              if (r[k].mark_ns[j] != 0)
                m.push_back(static_cast<double>(r[k].mark_ns[j] - r[k].release_ns) * 1e-3);
            marks.push_back(std::round(median(m) * 100) / 100);
          }
          if (!marks.empty()) row.push_back(marks);
          ks.push_back(row);
          auto& b = by_name[fmt::format("{} x{}", s0.name, s0.blocks)];
          b.first += 1;
          b.second += sh;
        }
        nlohmann::json sum = nlohmann::json::array();
        std::vector<std::pair<double, std::string>> order;
        for (const auto& [k, v] : by_name) order.push_back({v.second, k});
        std::sort(order.rbegin(), order.rend());
        for (const auto& [tot, k] : order)
          sum.push_back({k, by_name[k].first, std::round(tot * 10) / 10});
        fmt::print("{}\n", nlohmann::json{{"bench", "decode_step_stamps"},
                                          {"weights", f},
                                          {"context", step_ctx},
                                          {"kernels", n},
                                          {"same_count_in_every_step", same},
                                          {"first_to_last_release_us", span},
                                          {"by_kernel", sum},
                                          {"columns",
                                           "name, blocks, threads, share_us, lead_us[, marks_us]"},
                                          {"timeline", ks}}
                               .dump());
      }
      std::sort(ts.begin() + 3, ts.end());
      const double t = ts[3 + (ts.size() - 3) / 2];
      // Bytes one step must read: every resident weight except the embedding table (one row), the
      // KV cache up to the context, DeltaNet states read and written.
      int64_t n_attn = 0;
      for (auto lt : cfg.layer_types) n_attn += lt == tidal::core::LayerType::kFullAttention;
      const double embed_bytes =
          static_cast<double>(cfg.vocab_size * H) * (f == "int8" ? 1.0 : 2.0);
      const double kv = static_cast<double>(n_attn * step_ctx * nkv * d * 2 * 2);
      const double state = static_cast<double>(rep.deltanet_state) * 2.0;
      const double bytes = static_cast<double>(rep.weights) - embed_bytes + kv + state;
      fmt::print("{}\n", nlohmann::json{{"bench", "decode_step"},
                                        {"model", "qwen3.6-35b-a3b shape, routed experts excluded"},
                                        {"weights", f},
                                        {"graphs", graphs},
                                        {"pdl", kc::pdl_enabled()},
                                        {"fused_decode", mode.fuse},
                                        {"context", step_ctx},
                                        {"ms", t * 1e3},
                                        {"bytes_read", bytes},
                                        {"weights_bytes", rep.weights},
                                        {"workspaces_bytes", rep.workspaces},
                                        {"kv_bytes_at_context", kv},
                                        {"bytes_at_measured_bw_ms", bytes / bw * 1e3},
                                        {"ratio_to_bandwidth_time", t / (bytes / bw)},
                                        {"gpu_ms", gpu_ms},
                                        {"gpu_ratio_to_bandwidth_time",
                                         gpu_ms > 0 ? gpu_ms * 1e-3 / (bytes / bw) : 0.0}}
                             .dump());
    }
  }
  return 0;
}
