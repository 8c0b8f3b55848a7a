// SPDX-License-Identifier: Apache-2.0
/// \file cuda_model.cpp
/// \brief Weight upload, workspace plan, the GPU forward pass (segments between host expert calls)
/// and decode-step CUDA graphs. Kernels: kernels/cuda/ops.h.
#include "core/model/cuda_model.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "core/error.h"
#include "core/model/model.h"
#include "core/model/step_trace.h"
#include "kernels/cpu/linear.h"
#include "kernels/cuda/experts.h"
#include "kernels/cuda/experts_layout.h"
#include "kernels/cuda/ops.h"
#include "offload/expert_cache.h"
#include "offload/expert_cost.h"
#include "offload/expert_schedule.h"

namespace tidal::core {
namespace kc = kernels::cuda;
using kc::DevMatrix;
using kc::WFormat;

namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  if (e == cudaErrorMemoryAllocation)
    throw OutOfMemory(fmt::format("CUDA out of memory during {}", what));
  throw InternalError(fmt::format("CUDA error during {}: {}", what, cudaGetErrorString(e)));
}
void cublas_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw InternalError(fmt::format("cuBLAS error {} during {}", static_cast<int>(s), what));
}
constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
/// The bytes of a matrix's elements (an INT8 matrix's row scales are elsewhere).
int64_t weight_data_bytes(const DevMatrix& w) {
  if (w.data == nullptr) return 0;
  const int64_t esz = w.format == WFormat::kF32 ? 4 : w.format == WFormat::kBF16 ? 2 : 1;
  return w.rows * w.cols * esz;
}
double gib(uint64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0); }

}  // namespace

struct DeviceSequenceState {
  CudaModel::Impl* owner = nullptr;
  std::vector<kc::LayerStateDev> table;  // host copy
  kc::LayerStateDev* d_table = nullptr;
  int64_t capacity = 0;  // KV tokens
  uint64_t kv_bytes = 0, linear_bytes = 0;
  ~DeviceSequenceState();
};

struct GpuLayer {
  LayerType type = LayerType::kFullAttention;
  const float* in_norm = nullptr;
  const float* post_norm = nullptr;
  // Projections of the same input are stacked by rows and run as one GEMV / GEMM:
  //   attention  in = [q (with gate) | k | v]
  //   deltanet   in = [qkv | z | b | a]  (qwen3_5_moe)  or  [qkvz | ba]  (qwen3_next)
  //   moe mlp    in = [router | shared gate | shared up | shared_expert_gate]
  //   dense mlp  in = [gate | up]
  DevMatrix mix, o, out;  // token mixer: stacked input projections, output projection
  DevMatrix mlp_in, down;
  const float *q_norm = nullptr, *k_norm = nullptr;
  const float *conv = nullptr, *dt_bias = nullptr, *A_log = nullptr, *gnorm = nullptr;
  bool is_moe = false;
};

struct CudaModel::Impl {
  ModelConfig cfg;
  CudaOptions opts;
  RoutedExperts* experts = nullptr;
  RoutingControl* routing = nullptr;
  StepTrace* trace = nullptr;
  // Note [Step trace] on the GPU: while a traced forward runs (tr_step), each GPU segment (on the
  // compute stream) and each batch of host-to-device expert copies (on its copy stream) is
  // bracketed by CUDA events; tr_end places them on the GPU and copy tracks, timed from tr_ev0
  // (recorded on the compute stream at the forward's start, whose host time is tr_ev0_t), once
  // they have finished. Tracing so waits for the step's demand fills at its end instead of at the
  // next step's start: a trace is for inspecting steps.
  struct GpuSpan {
    cudaEvent_t a = nullptr, b = nullptr;
    const char* name = nullptr;
    const char* cat = nullptr;
    int track = StepTrace::kGpu;
    int64_t layer = -1;
  };
  StepTrace* tr_step = nullptr;
  cudaEvent_t tr_ev0 = nullptr;
  StepTrace::Clock::time_point tr_ev0_t{};
  std::vector<GpuSpan> tr_spans;
  std::vector<cudaEvent_t> tr_pool;  // free events (timing enabled)
  cudaEvent_t tr_event() {
    if (tr_pool.empty()) {
      cudaEvent_t e = nullptr;
      cuda_check(cudaEventCreate(&e), "trace event");
      return e;
    }
    cudaEvent_t e = tr_pool.back();
    tr_pool.pop_back();
    return e;
  }
  /// At a forward's start: records tr_ev0 if the trace is on.
  void tr_begin() {
    tr_step = trace != nullptr && trace->on() ? trace : nullptr;
    if (tr_step == nullptr) return;
    if (tr_ev0 == nullptr) cuda_check(cudaEventCreate(&tr_ev0), "trace event");
    cuda_check(cudaEventRecord(tr_ev0, stream), "trace event");
    tr_ev0_t = StepTrace::Clock::now();
  }
  /// Opens a span of work enqueued on `s` (returns its index, -1 when not tracing) and closes it.
  int tr_span_begin(cudaStream_t s, const char* name, const char* cat, int track, int64_t layer) {
    if (tr_step == nullptr) return -1;
    GpuSpan g;
    g.name = name;
    g.cat = cat;
    g.track = track;
    g.layer = layer;
    g.a = tr_event();
    tr_spans.push_back(g);  // owned by tr_spans from here (tr_end returns it to the pool)
    cuda_check(cudaEventRecord(g.a, s), "trace event");
    return static_cast<int>(tr_spans.size()) - 1;
  }
  void tr_span_end(int i, cudaStream_t s) {
    if (i < 0) return;
    tr_spans[static_cast<size_t>(i)].b = tr_event();
    cuda_check(cudaEventRecord(tr_spans[static_cast<size_t>(i)].b, s), "trace event");
  }
  int tr_copy_begin(cudaStream_t s, const char* name, int64_t layer) {
    return tr_span_begin(s, name, "copies", StepTrace::kCopy, layer);
  }
  /// After the forward (or its failure, with `ok` false: nothing added): waits for the traced
  /// spans to finish and adds them to their tracks.
  void tr_end(bool ok) {
    // From the trace's origin now (a trace restarted during the forward drops the spans).
    const double ev0_us = tr_step != nullptr ? tr_step->us(tr_ev0_t) : -1.0;
    if (tr_step != nullptr && ok && ev0_us >= 0 && !tr_spans.empty()) {
      cuda_check(cudaEventSynchronize(tr_ev0), "trace event");
      for (const auto& g : tr_spans) {
        if (g.b == nullptr) continue;
        float t0 = 0.f, t1 = 0.f;
        cuda_check(cudaEventSynchronize(g.b), "trace event");
        cuda_check(cudaEventElapsedTime(&t0, tr_ev0, g.a), "trace event");
        cuda_check(cudaEventElapsedTime(&t1, tr_ev0, g.b), "trace event");
        t0 = std::max(t0, 0.f);
        tr_step->add_us(g.name, g.cat, ev0_us + 1e3 * t0, 1e3 * std::max(t1 - t0, 0.f), g.track,
                        g.layer);
      }
    }
    for (const auto& g : tr_spans) {
      if (!ok && g.b != nullptr) cudaEventSynchronize(g.b);  // not reused while pending
      tr_pool.push_back(g.a);
      if (g.b != nullptr) tr_pool.push_back(g.b);
    }
    tr_spans.clear();
    tr_step = nullptr;
    if (!ok) cudaGetLastError();  // after a failed step: leave no error for the next launch check
  }
  int sm_count = 1;
  std::string name;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  mutable std::mutex mu;  // one forward at a time (shared workspaces)

  // weights
  char* wbase = nullptr;
  uint64_t weight_bytes = 0, weight_bf16_bytes = 0;
  DevMatrix embed, lm_head;
  const float* final_norm = nullptr;
  const float* inv_freq = nullptr;
  float rope_scale = 1.0f;
  std::vector<GpuLayer> layers;

  // workspaces (one allocation)
  char* ws = nullptr;
  uint64_t ws_bytes = 0;
  int64_t Tmax = 0;
  float *x = nullptr, *xn = nullptr, *y = nullptr, *hs = nullptr;
  // qb: the attention q rows; also the two-pass delta rule's scratch while a DeltaNet layer runs
  // (no attention then; Note [two-pass chunked delta rule]). qb_bytes: its planned size.
  float *qb = nullptr, *gate = nullptr, *ao = nullptr;
  size_t qb_bytes = 0;
  float* partial = nullptr;
  int attn_splits_decode = 1;
  float *mixed = nullptr, *zb = nullptr, *bb = nullptr, *ab = nullptr, *u = nullptr, *gq = nullptr,
        *gk = nullptr, *gv = nullptr, *beta = nullptr, *gg = nullptr, *go = nullptr,
        *proj = nullptr;
  float *rw = nullptr, *hmid = nullptr, *logits = nullptr;
  int32_t *ids = nullptr, *rids = nullptr;
  uint16_t* act16 = nullptr;
  void* wscratch = nullptr;
  size_t wscratch_elems = 0;
  int64_t logits_rows = 1;
  kc::StepDev* d_step = nullptr;
  /// One counter per layer for gemv_route (Note [Router in the MoE in-projection]), zeroed when
  /// allocated; each launch leaves it zero.
  unsigned* d_sync = nullptr;
  /// The workspaces for chunks of T tokens: total bytes, each pointer's share, and the sizes
  /// that depend on T (Note [Measuring the stream threshold] re-plans them for streaming).
  struct WorkspacePlan {
    size_t bytes = 0;
    std::vector<std::pair<void**, size_t>> parts;
    int64_t logits_rows = 1, max_batch = 1;
    size_t wscratch_elems = 0;
  };
  WorkspacePlan plan_workspaces(int64_t T);
  static constexpr size_t kBlasWorkspace = size_t{32} << 20;  // counted in ws_bytes
  /// Frees the workspaces and pinned staging (and the graphs that hold their addresses), then
  /// allocates them for chunks of T tokens from `p` (Tmax = T, ws_bytes = p.bytes + cuBLAS's).
  void allocate_workspaces(const WorkspacePlan& p, int64_t T);
  void replan_workspaces(int64_t T) { allocate_workspaces(plan_workspaces(T), T); }
  /// A KV cache of kv_reserve_tokens (at most the model's context) for every attention layer.
  uint64_t kv_reserve_bytes() const;

  // pinned host staging
  void* pinned = nullptr;
  int32_t* h_ids = nullptr;
  kc::StepDev* h_step = nullptr;
  float *h_xn = nullptr, *h_out = nullptr, *h_w = nullptr, *h_rlogits = nullptr,
        *h_logits = nullptr;
  int32_t* h_rids = nullptr;
  cudaEvent_t ev_d2h = nullptr;
  // The router beside the shared expert when no host call waits for its ids (GPU-only fused
  // decode): forked onto `side`, joined after the shared expert, before proj is rewritten.
  cudaStream_t side = nullptr;
  cudaEvent_t ev_fork = nullptr, ev_join = nullptr;
  bool side_pending = false;
  /// The main stream waits for the router forked onto `side` (if one is).
  void join_side() {
    if (!side_pending) return;
    side_pending = false;
    cuda_check(cudaEventRecord(ev_join, side), "event record");
    cuda_check(cudaStreamWaitEvent(stream, ev_join), "stream wait");
  }

  // Note [VRAM expert cache]
  // One-token decode with packed host experts keeps a pool of whole experts in VRAM, copied byte
  // for byte from host RAM (kernels/cuda/experts.h runs the host's layout), placed by
  // offload::ExpertSlotCache. A table [layer][expert] -> slot (or -1) on the device says what the
  // GPU computes: after the router, the step's graph runs every routed expert the table holds into
  // `yg` while the host computes the others (its sum reaches y at the next segment, then y += yg).
  // The host splits each layer's experts by the same table (`vx_htable`, the copy uploaded at the
  // step's start and left alone until the step ends), so no expert is computed twice or not at all.
  // A miss is admitted (at most `expert_fills` copies queued or in flight) into a slot the policy
  // frees; its old expert leaves the next step's table, and the copy is issued at the next step's
  // start, after that table is uploaded on the compute stream, on a copy stream that waits for
  // the upload: the GPU may still read the old expert during the step that admitted the new one,
  // never after its copy starts. The copy runs beside that step and enters the table at the step
  // after. offload::ExpertCacheSchedule makes every one of these decisions (Note [Expert cache
  // schedule]); this class moves the bytes. Under routing control (replay) the host may rewrite a
  // layer's ids after the GPU routed, so the cached experts are launched once it has, from the
  // host's ids (uploaded first), still beside the host's experts. Prefill and batched decode
  // compute every expert on the host (prefill: unless streamed, Note [Prefill expert streaming]).
  // If starting a step fails (a CUDA error while uploading the table or issuing copies), the cache
  // is abandoned: every expert goes to the host from then on, and the one-token graphs, captured
  // with the GPU expert kernels, are dropped so they are captured again without them (vx_abandon).
  bool vx_tried = false, vx_on = false, vx_step = false;
  kc::GpuExpertsArgs vx;
  int32_t* vx_dtable = nullptr;  // device [layers][E]
  int32_t* vx_htable = nullptr;  // pinned: what the device table holds this step
  std::unique_ptr<offload::ExpertCacheSchedule> vx_sched;
  cudaStream_t vx_copy = nullptr;
  cudaEvent_t vx_ev_table = nullptr;
  std::vector<cudaEvent_t> vx_running;  // recorded after the copies issued at this step's start
  std::vector<cudaEvent_t> vx_events;   // free
  std::vector<void*> vx_registered;     // page-locked layer ranges of the host store
  // Note [Lookahead prefetch]: slots per buffer, their copy stream, one event per layer (the
  // main stream waits for it before that layer's cached experts), two pinned staging rows.
  int64_t vx_pf = 0;
  int vx_pf_row = 0;
  cudaStream_t vx_pf_copy = nullptr;
  std::vector<cudaEvent_t> vx_ev_pf;
  int32_t* vx_pf_rows = nullptr;
  void vx_prefetch_after(int64_t layer, kernels::Executor& ex);
  /// Copies a fill's expert (gate, up, down as the host packed them) into its slot on `on`.
  void copy_expert(const offload::ExpertCacheSchedule::Fill& f, cudaStream_t on);
  uint64_t vx_bytes = 0;
  float* yg = nullptr;
  std::vector<int32_t> vx_ids, vx_host;
  std::vector<float> vx_w;
  GpuExpertCacheStats vx_stats;
  mutable std::mutex vx_mu;  // vx_stats: read by stats() while a forward (holding mu) runs
  void vx_init(kernels::Executor& ex);
  void vx_init_impl(kernels::Executor& ex);
  void vx_begin_step();
  void vx_begin_step_impl();
  /// Layer `layer`'s routed experts on the host (those the table does not hold, when vx_step).
  void host_experts(int64_t layer, int64_t T, kernels::Executor& ex);
  /// One token: yg = the routed experts of `layer` that the table holds, from rids / rw / xn.
  void cached_experts(int64_t layer);
  void vx_free();
  void vx_end_step() {
    if (!vx_step) return;
    vx_step = false;
    vx_sched->end_step();
  }
  /// After a failure inside vx_begin_step: the schedule and the device may disagree, so the
  /// cache is no longer used (see the Note).
  void vx_abandon() {
    vx_on = vx_step = false;
    cudaStreamSynchronize(stream);
    if (vx_copy) cudaStreamSynchronize(vx_copy);
    if (vx_pf_copy) cudaStreamSynchronize(vx_pf_copy);
    cudaGetLastError();
    for (auto g : graphs) cudaGraphExecDestroy(g);
    graphs.clear();
  }
  /// A forward that threw: let the stream finish what it was given (so the pinned table is free
  /// to rewrite), then end the step.
  void step_failed() {
    cudaStreamSynchronize(stream);
    // Prefetch copies and table rows queued for a layer the failed step never reached must land
    // before the next step's table upload (and before their staging rows are rewritten).
    if (vx_pf_copy) cudaStreamSynchronize(vx_pf_copy);
    for (cudaStream_t l : px_lane)  // streamed experts' GEMMs forked before the failure
      if (l) cudaStreamSynchronize(l);
    cudaGetLastError();
    vx_end_step();
  }

  // Note [Prefill expert streaming]
  // A long prompt reads every routed expert many times over, and the host computes those
  // products at a fraction of the GPU's rate: llama.cpp copies each layer's experts to the GPU for
  // large batches instead. With prefill streaming (CudaOptions::prefill_stream; chosen at load,
  // Note [Measuring the stream threshold]) a prompt whose chunks are at least the threshold long
  // does the same for each of its chunks (chunks as equal as ceil division makes them, of at most
  // the stream chunk, so no short last chunk pays a whole pass of expert copies; with streaming
  // on, every prompt runs in chunks of up to that length). Each MoE layer's packed experts (one
  // contiguous range of the host store, page-locked) are copied whole into one of two VRAM buffers
  // on their own stream: the first MoE layer's at the chunk's start, layer L+1's when layer L's
  // experts are enqueued (once the buffer's previous layer is done with it), so the copies run
  // beside the attention, DeltaNet and expert work. At layer L the router's ids come to the host
  // (the one wait per layer), which sorts the (token, expert) pairs by expert and uploads the
  // order; the GPU gathers the normed rows in that order as BF16, decodes stream_group experts at a
  // time to BF16 from the packed layout (kernels/cuda/experts.h), runs gate/up and down as cuBLAS
  // BF16 GEMMs (fp32 accumulate) over each expert's rows, and sums each token's k rows in routing
  // order into y (deterministic). The shared expert and everything after are unchanged. Chunks grow
  // to stream_chunk tokens, so the experts cross PCIe once per stream_chunk tokens: 17 GB per 4096
  // tokens for the 35B-A3B at INT4, ~0.3 s at 55 GB/s. Routing control works (its rewritten ids
  // and weights are what gets uploaded). On by default where it fits and pays (Note [Measuring the
  // stream threshold]); measured in docs/performance.md (ninth session).
  bool px_on = false, px_step = false;
  int64_t px_stride = 0, px_layer_bytes = 0, px_group = 16, px_rows_max = 0;
  // Note [Padded expert batches]: TIDAL_CUDA_STREAM_BATCHED=1; one group's scratch rows and the
  // padded lists' capacity, per layer each group's padded rows per expert and its list offset.
  bool px_pad = false;
  int64_t px_pad_rows = 0, px_plist_cap = 0;  // scratch rows for one group; padded-list capacity
  std::vector<int64_t> px_gn, px_goff;        // per group: padded rows per expert (0: per expert)
  uint16_t *px_pxs = nullptr, *px_pxs_lo = nullptr, *px_pact = nullptr, *px_pact_lo = nullptr;
  float *px_phb = nullptr, *px_pout = nullptr;
  int32_t *px_ptok = nullptr, *px_pdst = nullptr;      // device: each padded row's token, its row
  int32_t *h_px_ptok = nullptr, *h_px_pdst = nullptr;  // pinned
  kc::ExpertMatrixLayout px_gu, px_dn;
  uint8_t* px_stage[2] = {nullptr, nullptr};
  int px_stage_layer[2] = {-1, -1};
  cudaEvent_t px_ev_filled[2] = {nullptr, nullptr}, px_ev_free[2] = {nullptr, nullptr};
  cudaStream_t px_copy = nullptr;
  uint16_t *px_xs = nullptr, *px_wgu = nullptr, *px_wdn = nullptr, *px_act = nullptr;
  // gpu_precision "bf16x2" (or "fp32") with BF16 experts: the rows' and activations' remainders
  // (Note [Two-term activations in streamed experts]); null otherwise.
  uint16_t *px_xs_lo = nullptr, *px_act_lo = nullptr;
  bool px_split = false;
  // Note [Expert GEMMs on lanes]: streams, cuBLAS handles (each its own workspace) and events
  // that run the experts of a group side by side.
  static constexpr int kPxLanes = 8;  // at most; px_lanes in use (TIDAL_CUDA_STREAM_LANES, 4)
  static constexpr size_t kPxLaneWorkspace = size_t{8} << 20;
  int px_lanes = 4;
  cudaStream_t px_lane[kPxLanes] = {};
  cublasHandle_t px_lane_blas[kPxLanes] = {};
  void* px_lane_ws[kPxLanes] = {};
  cudaEvent_t px_ev_fork = nullptr, px_ev_lane[kPxLanes] = {};
  /// `experts` experts' gate/up and down from the packed layout at `src` (a layer's stage buffer)
  /// to BF16 in px_wgu / px_wdn, on the stream.
  void px_dequant(const uint8_t* src, int64_t experts);
  /// out = x · W^T for `ne` of the group's BF16 experts from its expert `first` (gate_up: px_wgu,
  /// 2I x H; else px_wdn, H x I), n rows each (expert j's rows at x + j·n·K, its output at
  /// out + j·n·M), plus x_lo's rows accumulated where given (two-term activations): a plain
  /// GEMM for one expert, one strided-batched call for several, on handle h's stream.
  void px_gemm(cublasHandle_t h, bool gate_up, int64_t first, int64_t ne, int64_t n,
               const uint16_t* x, const uint16_t* x_lo, float* out);
  // Note [Grouped expert GEMM] (kernels/cuda/experts.cu): a group's experts in one launch per
  // GEMM (the default where the shapes allow it; TIDAL_CUDA_STREAM_GEMM=cublas runs them per
  // expert on the lanes). Per layer, each group's tiles (triples) at px_tgoff[g] of px_tiles,
  // px_tgn[g] of them; h_px_tiles is their pinned staging, px_tiles_cap triples each.
  bool px_grouped = false;
  // Note [Grouped expert GEMM from packed INT4]: INT4 experts multiplied from the stage buffer's
  // packed bytes, every expert of the layer in one launch per GEMM (no BF16 copy, no groups);
  // TIDAL_CUDA_STREAM_GEMM=bf16 decodes them to BF16 per group first.
  bool px_fused = false;
  int32_t *px_tiles = nullptr, *h_px_tiles = nullptr;
  int64_t px_tiles_cap = 0;
  std::vector<int64_t> px_tgoff, px_tgn;
  /// out (+)= x · W^T over the tiles (px_tiles + 3·t0, nt of them) of the group's experts in
  /// px_wgu (gate_up) or px_wdn, and x_lo's rows accumulated where given; with `packed` (a
  /// stage buffer), of the layer's packed INT4 experts there instead (px_fused).
  void px_grouped_gemm(bool gate_up, int64_t t0, int64_t nt, const uint16_t* x,
                       const uint16_t* x_lo, float* out, const uint8_t* packed = nullptr);
  void px_fork();  // the lanes wait for what the stream has queued
  void px_join();  // the stream waits for what the lanes have queued
  float *px_hb = nullptr, *px_out = nullptr;
  int32_t *px_rows = nullptr, *px_pos = nullptr;      // device
  int32_t *h_px_rows = nullptr, *h_px_pos = nullptr;  // pinned
  std::vector<int64_t> px_count, px_off;
  std::vector<int> px_moe_index;  // per layer: its index among MoE layers, -1 for dense
  std::vector<int> px_next_moe;   // per layer: the next MoE layer after it, -1 if none
  uint64_t px_bytes = 0;
  bool host_registered = false;
  void px_init(kernels::Executor& ex);
  /// Note [Measuring the stream threshold]: the shortest prompt the cost model streams (-1: none).
  int64_t px_measure(kernels::Executor& ex);
  int64_t px_min_tokens = -1;
  std::string px_plan = "off", px_rates;  // for describe()
  /// Issues the copy of `layer`'s experts into its buffer unless the buffer holds it already.
  void px_issue(int layer);
  /// Layer `layer`'s routed experts for T rows of xn on the GPU into y (Note above).
  void px_layer(int layer, int64_t T, int64_t W);
  void px_free();
  /// Page-locks the host store, one MoE layer's range per registration, from anonymous memory
  /// (Note [Packed experts out of the file mapping] in offload/expert_store.cpp). Once.
  void register_host_store(kernels::Executor& ex);

  bool route_ctl = false;  // routing control active for this forward (read once)
  // Note [Router lookahead] on the GPU path: the host has each MoE layer's normed input xn_L
  // (for its experts); x / rms(x) is shared by every norm of the same residual, so the next MoE
  // layer's router input as the CPU engine predicts it (its post-attention norm of the same
  // residual) is xn_L scaled per element by that norm's weight over layer L's ((1 + w) for
  // zero-centred norms). One router matvec per token on the host; counted when the next
  // layer's ids arrive. Measurement only (rt.set_router_lookahead); skipped where a weight of
  // layer L's norm is zero, and in streamed prefill (no xn on the host).
  const std::vector<LayerWeights>* host_layers = nullptr;
  std::vector<float> la_x, la_logits;
  // Per layer L: the next router's input from L's normed input, xn_L · (w_next / w_L) elementwise
  // (computed once; the weights do not change), for the MoE layer `next` (-1: not yet), empty
  // where no element-wise ratio exists (a zero weight of L's norm).
  struct NormRatio {
    int64_t next = -1;
    std::vector<float> f;
  };
  std::vector<NormRatio> la_ratio;
  std::vector<int32_t> la_pred;
  int64_t la_layer = -1, la_k = 0;
  void lookahead_after(int64_t layer, int64_t T, kernels::Executor& ex);
  /// The top `kp` experts per token of MoE layer `next`, predicted from this layer's normed
  /// input (h_xn) through the next router, into `pred`; false where no prediction is possible.
  bool predict_next(int64_t layer, size_t next, int64_t T, int64_t kp, kernels::Executor& ex,
                    std::vector<int32_t>& pred);
  std::vector<int32_t> pf_pred;  // the prefetch's prediction (la_pred is the measurement's)
  /// The router's ids and weights for T rows to h_rids / h_w (and, under routing control, its
  /// logits, the first E of each row of `proj`, W wide, to h_rlogits), on the stream.
  void routing_to_host(int64_t T, int64_t W) {
    const int64_t k = cfg.num_experts_per_tok, E = cfg.num_experts;
    cuda_check(cudaMemcpyAsync(h_rids, rids, static_cast<size_t>(T * k) * 4, cudaMemcpyDeviceToHost,
                               stream),
               "copy to host");
    cuda_check(
        cudaMemcpyAsync(h_w, rw, static_cast<size_t>(T * k) * 4, cudaMemcpyDeviceToHost, stream),
        "copy to host");
    if (route_ctl)
      cuda_check(cudaMemcpy2DAsync(h_rlogits, static_cast<size_t>(E) * 4, proj,
                                   static_cast<size_t>(W) * 4, static_cast<size_t>(E) * 4,
                                   static_cast<size_t>(T), cudaMemcpyDeviceToHost, stream),
                 "copy to host");
  }

  // decode graphs: one per segment (routed experts run on the host between segments)
  std::vector<cudaGraphExec_t> graphs;  // T = 1, captured on first use
  // Batched decode (forward_batch): rows are independent sequences, d_step[r] is row r's state.
  // Graphs per batch size, captured on first use.
  bool batched = false;
  int64_t max_batch = 1;
  std::map<int64_t, std::vector<cudaGraphExec_t>> batch_graphs;

  std::atomic<uint64_t> kv_bytes{0}, linear_bytes{0};
  void* blas_ws = nullptr;
  ~Impl();

  // TIDAL_CUDA_PROFILE=1: events between the ops of uncaptured forwards, time per op label.
  bool profiling = false;
  std::vector<cudaEvent_t> prof_events;
  std::vector<const char*> prof_labels;
  size_t prof_n = 0;
  std::map<std::string, double> prof_seconds;
  void mark(const char* label) {
    if (!profiling) return;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &cap);
    if (cap != cudaStreamCaptureStatusNone) return;
    if (prof_n == prof_events.size()) {
      cudaEvent_t e;
      cudaEventCreate(&e);
      prof_events.push_back(e);
      prof_labels.push_back(nullptr);
    }
    cudaEventRecord(prof_events[prof_n], stream);
    prof_labels[prof_n++] = label;
  }
  void prof_collect() {  // after a stream sync
    for (size_t i = 1; i < prof_n; ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, prof_events[i - 1], prof_events[i]);
      prof_seconds[prof_labels[i]] += ms * 1e-3;
    }
    prof_n = 0;
  }

  // ---------------------------------------------------------------------------- helpers
  void linear(const DevMatrix& w, const float* xin, int64_t ldx, float* yout, int64_t ldy,
              int64_t T, bool acc = false) {
    if (norm_pending && xin == xn) {  // the deferred RMSNorm of x, inside this projection
      TIDAL_ASSERT(T == 1, "a deferred norm is only for one-token decode");
      kc::gemv_rms_norm(w, x, norm_pending, static_cast<float>(cfg.rms_norm_eps), cfg.is_hybrid(),
                        yout, acc, stream);
      norm_pending = nullptr;
      return;
    }
    if (T <= kc::kMaxGemvRows || batched) {
      // Batched decode stays on the fp32-activation GEMV (slices of kMaxGemvRows rows), so a
      // sequence's logits do not depend on how many others share its step.
      for (int64_t r0 = 0; r0 < T; r0 += kc::kMaxGemvRows)
        kc::gemv(w, xin + r0 * ldx, ldx, yout + r0 * ldy, ldy,
                 std::min<int64_t>(kc::kMaxGemvRows, T - r0), acc, stream);
      return;
    }
    const float one = 1.0f, beta_v = acc ? 1.0f : 0.0f;
    const int64_t K = w.cols;
    const bool fp32 = opts.precision == "fp32", split = opts.precision == "bf16x2";
    uint16_t* act_lo = act16 + T * K;
    if (split)
      kc::f32_to_bf16_split(xin, ldx, act16, act_lo, T, K, stream);
    else if (!fp32)
      kc::f32_to_bf16(xin, ldx, act16, T, K, stream);
    const WFormat want = fp32 ? WFormat::kF32 : WFormat::kBF16;
    const int64_t slice_rows =
        w.format == want ? w.rows : std::max<int64_t>(1, static_cast<int64_t>(wscratch_elems) / K);
    for (int64_t n0 = 0; n0 < w.rows; n0 += slice_rows) {
      const int64_t n = std::min(slice_rows, w.rows - n0);
      DevMatrix ws_m = w;
      const void* wp;
      if (w.format == want) {
        wp = static_cast<const char*>(w.data) + n0 * K * (fp32 ? 4 : 2);
      } else {
        const size_t esz = w.format == WFormat::kF32 ? 4 : w.format == WFormat::kBF16 ? 2 : 1;
        ws_m.data = static_cast<const char*>(w.data) + n0 * K * esz;
        ws_m.scale = w.scale ? w.scale + n0 : nullptr;
        ws_m.rows = n;
        if (fp32)
          kc::weight_to_f32(ws_m, static_cast<float*>(wscratch), stream);
        else
          kc::weight_to_bf16(ws_m, static_cast<uint16_t*>(wscratch), stream);
        wp = wscratch;
      }
      if (fp32)
        cublas_check(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                 static_cast<int>(T), static_cast<int>(K), &one,
                                 static_cast<const float*>(wp), static_cast<int>(K), xin,
                                 static_cast<int>(ldx), &beta_v, yout + n0, static_cast<int>(ldy)),
                     "cublasSgemm");
      else
        for (int part = 0; part < (split ? 2 : 1); ++part) {  // hi, then + lo
          const float b = part == 0 ? beta_v : 1.0f;
          cublas_check(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                    static_cast<int>(T), static_cast<int>(K), &one, wp, CUDA_R_16BF,
                                    static_cast<int>(K), part == 0 ? act16 : act_lo, CUDA_R_16BF,
                                    static_cast<int>(K), &b, yout + n0, CUDA_R_32F,
                                    static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmEx");
        }
    }
  }

  /// gpu_precision="fp32" keeps the KV cache in fp32 (the mode that matches the CPU engine).
  bool kv_f32() const { return opts.precision == "fp32" || opts.kv_dtype == "fp32"; }
  // What the next fused "residual + norm" adds to x: y, and sigmoid(gate) · hs (shared expert).
  const float* pend_y = nullptr;
  const float* pend_hs = nullptr;
  const float* pend_gate = nullptr;
  int64_t pend_ld = 0;
  void pend(const float* yy, const float* h = nullptr, const float* g = nullptr, int64_t ld = 0) {
    pend_y = yy;
    pend_hs = h;
    pend_gate = g;
    pend_ld = ld;
  }
  /// Fused one-token decode (CudaOptions::fuse_decode): the GEMVs add their outputs to x
  /// themselves, and a norm with nothing pending is left to the next projection of xn.
  bool fused = false;
  const float* norm_pending = nullptr;  // norm weight of the RMSNorm that projection applies
  /// xn = rms_norm(x + what is pending) · w; with `fused`, nothing pending and `materialise`
  /// false, only recorded for the next linear() of xn (Note [norm inside the GEMV]).
  void residual_norm(const float* w, int64_t T, bool materialise = false) {
    TIDAL_ASSERT(norm_pending == nullptr, "a deferred norm was not consumed");
    if (fused && !materialise && !pend_y && !pend_hs) {
      norm_pending = w;
      return;
    }
    kc::add_rms_norm(x, pend_y, w, xn, T, cfg.hidden_size, static_cast<float>(cfg.rms_norm_eps),
                     cfg.is_hybrid(), stream, pend_hs, pend_gate, pend_ld);
    pend(nullptr);
    mark("residual + norm");
  }
  /// Where a token mixer's output projection goes: added to x in the GEMV (fused), or to y for
  /// the next residual + norm.
  void mixer_out(const DevMatrix& w, const float* in, int64_t ld_in, int64_t T) {
    if (fused) {
      linear(w, in, ld_in, x, cfg.hidden_size, T, true);
      pend(nullptr);
    } else {
      linear(w, in, ld_in, y, cfg.hidden_size, T);
      pend(y);
    }
  }
  bool experts_on_host(const GpuLayer& L) const { return L.is_moe && experts != nullptr; }

  /// Enqueues layers [l0, l1) for T tokens. `first`: the forward's first segment; otherwise the
  /// previous segment's last layer's routed output waits in h_out (and yg) and is added first.
  void enqueue_layers(size_t l0, size_t l1, int64_t T, bool first);
  void enqueue_attention(const GpuLayer& L, int layer, int64_t T);
  void enqueue_deltanet(const GpuLayer& L, int layer, int64_t T);
  /// MLP of layer l into y; for MoE layers with host experts, stops after the D2H copies and the
  /// shared expert (y = 0 then; h_out is added by finish_moe).
  void enqueue_mlp(const GpuLayer& L, int layer, int64_t T);
  void enqueue_final(int64_t T, LogitsMode mode);
  std::vector<std::pair<size_t, size_t>> segments() const;
  /// Enqueues segment s of a forward of T rows; the last one ends with the final norm and, for
  /// kLast, the lm_head of the last row (of every row when batched) copied to h_logits.
  void enqueue_segment(size_t s, int64_t T, LogitsMode cm, bool use_graph);
  /// Runs every segment (from `graphs`, captured on first use, when not null) with the routed
  /// experts on the host in between.
  void run_segments(int64_t T, LogitsMode cm, std::vector<cudaGraphExec_t>* graphs,
                    kernels::Executor& ex, ForwardProfile* profile);
  std::vector<std::pair<size_t, size_t>> segs;  // segments(), fixed after load
  void ensure_capacity(DeviceSequenceState& s, int64_t need);
  void free_state(DeviceSequenceState& s);
};

DeviceSequenceState::~DeviceSequenceState() {
  if (owner) owner->free_state(*this);
}

void CudaModel::Impl::free_state(DeviceSequenceState& s) {
  for (auto& t : s.table) {
    cudaFree(t.k_cache);
    cudaFree(t.v_cache);
    cudaFree(t.conv);
    cudaFree(t.recurrent);
  }
  cudaFree(s.d_table);
  kv_bytes -= s.kv_bytes;
  linear_bytes -= s.linear_bytes;
  s.table.clear();
}

void CudaModel::Impl::ensure_capacity(DeviceSequenceState& s, int64_t need) {
  if (need <= s.capacity) return;
  const int64_t row = cfg.num_key_value_heads * cfg.head_dim;
  int64_t cap = std::max<int64_t>(s.capacity * 2, std::max<int64_t>(need, opts.initial_context));
  cap = (cap + 255) / 256 * 256;
  const size_t esz = kv_f32() ? 4 : 2;
  const size_t bytes = static_cast<size_t>(cap * row) * esz;
  size_t n_attn = 0;
  for (const auto& L : layers) n_attn += L.type == LayerType::kFullAttention;
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  const uint64_t used = weight_bytes + ws_bytes + kv_bytes + linear_bytes + vx_bytes + px_bytes;
  const uint64_t add = 2 * n_attn * bytes - s.kv_bytes;
  TIDAL_CHECK(opts.memory_limit == 0 || used + add <= opts.memory_limit, OutOfMemory,
              "a {}-token KV cache needs {:.2f} GiB more VRAM, over the gpu_memory limit of {:.2f} "
              "GiB ({:.2f} GiB in use{}){}",
              cap, gib(add), gib(opts.memory_limit), gib(used),
              vx_bytes ? fmt::format(", {:.2f} GiB of it the expert cache", gib(vx_bytes)) : "",
              vx_bytes ? "; a smaller gpu_expert_slots or a max_context leaves room" : "");
  // Allocate every new buffer first: on failure the sequence keeps its old cache intact.
  std::vector<void*> fresh;
  for (size_t i = 0; i < 2 * n_attn; ++i) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      for (void* q : fresh) cudaFree(q);
      throw OutOfMemory(
          fmt::format("CUDA out of memory growing a KV cache to {} tokens ({:.2f} GiB)", cap,
                      gib(2 * n_attn * bytes)));
    }
    fresh.push_back(p);
  }
  size_t next = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    if (layers[l].type != LayerType::kFullAttention) continue;
    auto& t = s.table[l];
    for (void** p : {&t.k_cache, &t.v_cache}) {
      void* nb = fresh[next++];
      if (*p && s.capacity > 0)
        cuda_check(cudaMemcpyAsync(nb, *p, static_cast<size_t>(s.capacity * row) * esz,
                                   cudaMemcpyDeviceToDevice, stream),
                   "KV cache growth");
      cuda_check(cudaStreamSynchronize(stream), "KV cache growth");
      cudaFree(*p);
      *p = nb;
    }
  }
  kv_bytes += 2 * n_attn * bytes - s.kv_bytes;
  s.kv_bytes = 2 * n_attn * bytes;
  s.capacity = cap;
  cuda_check(cudaMemcpyAsync(s.d_table, s.table.data(), s.table.size() * sizeof(kc::LayerStateDev),
                             cudaMemcpyHostToDevice, stream),
             "state table upload");
  cuda_check(cudaStreamSynchronize(stream), "state table upload");
}

std::vector<std::pair<size_t, size_t>> CudaModel::Impl::segments() const {
  std::vector<std::pair<size_t, size_t>> seg;
  size_t start = 0;
  for (size_t l = 0; l < layers.size(); ++l)
    if (experts_on_host(layers[l])) {
      seg.emplace_back(start, l + 1);
      start = l + 1;
    }
  seg.emplace_back(start, layers.size());  // the last one also runs the final norm + lm_head
  return seg;
}

// ------------------------------------------------------------------ VRAM expert cache

void CudaModel::Impl::vx_init(kernels::Executor& ex) {
  vx_tried = true;
  try {
    px_init(ex);
    vx_init_impl(ex);
  } catch (...) {
    px_free();
    vx_free();  // nothing half-made stays allocated or counted
    vx_on = false;
    vx_bytes = 0;
    throw;
  }
}

uint64_t CudaModel::Impl::kv_reserve_bytes() const {
  int64_t n_attn = 0;
  for (const auto& g : layers) n_attn += g.type == LayerType::kFullAttention;
  const int64_t reserve = std::min<int64_t>(opts.kv_reserve_tokens, cfg.max_position_embeddings);
  return static_cast<uint64_t>(2 * n_attn * reserve * cfg.num_key_value_heads * cfg.head_dim) *
         (kv_f32() ? 4 : 2);
}

void CudaModel::Impl::vx_init_impl(kernels::Executor& ex) {
  if (experts == nullptr || opts.expert_slots == 0) return;
  kernels::cpu::PackedLayout gu, dn;
  if (!experts->packed_layouts(gu, dn)) return;
  const int64_t E = cfg.num_experts, k = cfg.num_experts_per_tok, H = cfg.hidden_size;
  vx.gate_up = kc::gpu_layout(gu);
  vx.down = kc::gpu_layout(dn);
  vx.slot_bytes = static_cast<int64_t>(align_up(static_cast<size_t>(2 * gu.bytes() + dn.bytes())));
  vx.top_k = static_cast<int>(k);
  vx.num_experts = E;
  if (E <= 0 || !kc::gpu_experts_supported(vx)) return;  // every expert stays on the host
  int64_t moe_layers = 0;
  for (const auto& L : layers) moe_layers += experts_on_host(L);
  const int64_t L = static_cast<int64_t>(layers.size());
  const uint64_t side = align_up(static_cast<size_t>(L * E) * 4) +
                        align_up(static_cast<size_t>(k * gu.n) * 4) +
                        align_up(static_cast<size_t>(H) * 4);
  int64_t slots = opts.expert_slots;
  if (slots < 0) {  // what the budget leaves after a KV cache of kv_reserve_tokens
    const uint64_t used = weight_bytes + ws_bytes + px_bytes +
                          std::max<uint64_t>(kv_bytes, kv_reserve_bytes()) + linear_bytes + side +
                          (uint64_t{256} << 20);
    slots = used < opts.memory_limit ? static_cast<int64_t>((opts.memory_limit - used) /
                                                            static_cast<uint64_t>(vx.slot_bytes))
                                     : 0;
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const uint64_t avail =
        free_b > side + (uint64_t{256} << 20) ? free_b - side - (uint64_t{256} << 20) : 0;
    slots = std::min<int64_t>(slots,
                              static_cast<int64_t>(avail / static_cast<uint64_t>(vx.slot_bytes)));
  }
  // Lookahead prefetch needs the routers on the host (Note [Lookahead prefetch]); at most top_k
  // experts per layer are predicted. Its two buffers come out of what the budget leaves
  // (automatic slots: none where the budget holds every expert, since then nothing is ever
  // missing, or where it holds no more than the buffers) or on top of a given count.
  int64_t pf = host_layers != nullptr
                   ? std::clamp<int64_t>(opts.expert_prefetch, 0, std::max<int64_t>(1, k))
                   : 0;
  if (opts.expert_slots < 0) {
    if (slots >= moe_layers * E || slots <= 2 * pf) pf = 0;
    slots -= 2 * pf;
  }
  slots = std::min(slots, moe_layers * E);
  if (slots <= 0) return;
  const uint64_t bytes = static_cast<uint64_t>((slots + 2 * pf) * vx.slot_bytes);
  if (opts.expert_slots > 0) {
    const uint64_t used = weight_bytes + ws_bytes + px_bytes + kv_bytes + linear_bytes;
    TIDAL_CHECK(
        opts.memory_limit == 0 || used + bytes + side <= opts.memory_limit, OutOfMemory,
        "{} expert cache slots (+ {} for lookahead prefetch) need {:.2f} GiB of VRAM, over the "
        "gpu_memory limit of {:.2f} GiB ({:.2f} GiB in use)",
        slots, 2 * pf, gib(bytes + side), gib(opts.memory_limit), gib(used));
  }
  uint8_t* slot_mem = nullptr;
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&slot_mem), bytes), "expert cache slots");
  vx.slots = slot_mem;
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&vx_dtable), static_cast<size_t>(L * E) * 4),
             "expert cache table");
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&vx.hid), static_cast<size_t>(k * gu.n) * 4),
             "expert cache workspace");
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&yg), static_cast<size_t>(H) * 4),
             "expert cache workspace");
  cuda_check(cudaMallocHost(reinterpret_cast<void**>(&vx_htable), static_cast<size_t>(L * E) * 4),
             "expert cache table");
  std::fill(vx_htable, vx_htable + L * E, -1);
  cuda_check(
      cudaMemcpy(vx_dtable, vx_htable, static_cast<size_t>(L * E) * 4, cudaMemcpyHostToDevice),
      "expert cache table");
  cuda_check(cudaStreamCreateWithFlags(&vx_copy, cudaStreamNonBlocking), "stream creation");
  cuda_check(cudaEventCreateWithFlags(&vx_ev_table, cudaEventDisableTiming), "event creation");
  vx_sched = std::make_unique<offload::ExpertCacheSchedule>(
      L, E, slots, offload::parse_cache_policy(opts.expert_cache_policy),
      std::max<int64_t>(1, opts.expert_fills), 0.98, 256, pf);
  vx_pf = pf;
  if (pf > 0) {
    cuda_check(cudaStreamCreateWithFlags(&vx_pf_copy, cudaStreamNonBlocking), "stream creation");
    cuda_check(
        cudaMallocHost(reinterpret_cast<void**>(&vx_pf_rows), static_cast<size_t>(2 * E) * 4),
        "expert prefetch rows");
    vx_ev_pf.assign(static_cast<size_t>(L), nullptr);
    for (auto& e : vx_ev_pf) {
      cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event creation");
      cuda_check(cudaEventRecord(e, vx_pf_copy), "event record");  // complete: nothing to wait for
    }
    cuda_check(cudaStreamSynchronize(vx_pf_copy), "expert prefetch");
  }
  register_host_store(ex);
  vx_bytes = bytes + side;
  std::lock_guard lock(vx_mu);
  vx_stats = {};
  vx_stats.slots = slots;
  vx_stats.policy = opts.expert_cache_policy;
  vx_stats.slot_bytes = static_cast<uint64_t>(vx.slot_bytes);
  vx_stats.prefetch_slots = pf;
  vx_stats.layer_gpu_pairs.assign(static_cast<size_t>(L), 0);
  vx_stats.layer_cpu_pairs.assign(static_cast<size_t>(L), 0);
  vx_stats.layer_fills.assign(static_cast<size_t>(L), 0);
  vx_stats.layer_evictions.assign(static_cast<size_t>(L), 0);
  vx_on = true;
}

void CudaModel::Impl::vx_begin_step() {
  try {
    vx_begin_step_impl();
  } catch (...) {
    vx_abandon();
    throw;
  }
}

void CudaModel::Impl::copy_expert(const offload::ExpertCacheSchedule::Fill& f, cudaStream_t on) {
  const auto v = experts->packed_expert(f.layer, f.expert);
  TIDAL_ASSERT(v.gate && v.up && v.down, "no packed bytes for expert {} of layer {}", f.expert,
               f.layer);
  uint8_t* dst = const_cast<uint8_t*>(vx.slots) + static_cast<int64_t>(f.slot) * vx.slot_bytes;
  const size_t gub = static_cast<size_t>(vx.gate_up.bytes()),
               dnb = static_cast<size_t>(vx.down.bytes());
  cuda_check(cudaMemcpyAsync(dst, v.gate, gub, cudaMemcpyHostToDevice, on), "expert copy");
  cuda_check(cudaMemcpyAsync(dst + gub, v.up, gub, cudaMemcpyHostToDevice, on), "expert copy");
  cuda_check(cudaMemcpyAsync(dst + 2 * gub, v.down, dnb, cudaMemcpyHostToDevice, on),
             "expert copy");
}

void CudaModel::Impl::vx_begin_step_impl() {
  // The copies issued at the last step's start have landed: they ran beside that step (at most
  // expert_fills experts, ~1 ms over PCIe against a step of several), so this wait is normally
  // over at once; waiting rather than polling keeps which experts the GPU computes, and so the
  // results, a function of the routing alone (graphs and eager launches agree bitwise).
  for (cudaEvent_t e : vx_running) {
    cuda_check(cudaEventSynchronize(e), "expert copy");
    vx_events.push_back(e);
  }
  vx_running.clear();
  const int64_t kept = vx_sched->fills_kept();
  const auto& issue = vx_sched->begin_step();
  const auto& table = vx_sched->table();
  if (vx_sched->table_changed()) {  // the last upload ended with the last step
    std::copy(table.begin(), table.end(), vx_htable);
    cuda_check(
        cudaMemcpyAsync(vx_dtable, vx_htable, table.size() * 4, cudaMemcpyHostToDevice, stream),
        "expert cache table");
  }
  {
    std::lock_guard lock(vx_mu);
    vx_stats.fills += vx_sched->fills_kept() - kept;
    vx_stats.bytes_in +=
        issue.size() * static_cast<uint64_t>(2 * vx.gate_up.bytes() + vx.down.bytes());
  }
  if (issue.empty()) return;
  // The copies start once this step's table (without the experts they replace) is in place.
  cuda_check(cudaEventRecord(vx_ev_table, stream), "event record");
  cuda_check(cudaStreamWaitEvent(vx_copy, vx_ev_table), "stream wait");
  const int span = tr_copy_begin(vx_copy, "expert_fills", -1);
  for (const auto& f : issue) copy_expert(f, vx_copy);
  tr_span_end(span, vx_copy);
  if (vx_events.empty()) {
    cudaEvent_t e = nullptr;
    cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event creation");
    vx_events.push_back(e);
  }
  vx_running.push_back(vx_events.back());  // one event after the step's copies
  vx_events.pop_back();
  cuda_check(cudaEventRecord(vx_running.back(), vx_copy), "event record");
}

bool CudaModel::Impl::predict_next(int64_t layer, size_t next, int64_t T, int64_t kp,
                                   kernels::Executor& ex, std::vector<int32_t>& pred) {
  const int64_t H = cfg.hidden_size, E = cfg.num_experts;
  if (host_layers == nullptr || next >= layers.size() || !experts_on_host(layers[next]))
    return false;
  la_ratio.resize(layers.size());
  NormRatio& r = la_ratio[static_cast<size_t>(layer)];
  if (r.next != static_cast<int64_t>(next)) {
    r.next = static_cast<int64_t>(next);
    r.f.clear();
    const auto& wl = (*host_layers)[static_cast<size_t>(layer)].post_attention_layernorm;
    const auto& wn = (*host_layers)[next].post_attention_layernorm;
    if (static_cast<int64_t>(wl.size()) == H && static_cast<int64_t>(wn.size()) == H) {
      const bool zc = cfg.is_hybrid();  // zero-centred norms scale by 1 + w
      r.f.resize(static_cast<size_t>(H));
      for (int64_t i = 0; i < H && !r.f.empty(); ++i) {
        const float a = zc ? 1.f + wl[i] : wl[i], b = zc ? 1.f + wn[i] : wn[i];
        if (a == 0.f)
          r.f.clear();
        else
          r.f[i] = b / a;
      }
    }
  }
  if (r.f.empty()) return false;
  la_x.resize(static_cast<size_t>(T * H));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i) la_x[t * H + i] = h_xn[t * H + i] * r.f[i];
  la_logits.resize(static_cast<size_t>(T * E));
  kernels::cpu::linear(la_x.data(), T, (*host_layers)[next].mlp.router, la_logits.data(), ex, false,
                       opts.host_isa);
  pred.resize(static_cast<size_t>(T * kp));
  top_k_ids(la_logits.data(), T, E, kp, pred.data());
  return true;
}

void CudaModel::Impl::lookahead_after(int64_t layer, int64_t T, kernels::Executor& ex) {
  const int64_t k = cfg.num_experts_per_tok, E = cfg.num_experts;
  if (la_layer == layer)  // predicted one MoE layer ago: count against this layer's ids
    routing->add_lookahead(layer, la_pred.data(), la_k, h_rids, k, T);
  la_layer = -1;
  const size_t next = static_cast<size_t>(layer) + 1;
  la_k = routing->lookahead_k();
  if (la_k <= 0 || la_k > E) la_k = k;
  if (predict_next(layer, next, T, la_k, ex, la_pred)) la_layer = static_cast<int64_t>(next);
}

// Note [Lookahead prefetch]
// Issue 7's router lookahead turned into copies. One-token decode with the expert cache: when
// layer L's router ids and normed input reach the host, and before it computes L's experts, the
// host applies the next MoE layer's router to that input (scaled by the ratio of the two layers'
// norm weights, as Note [Router lookahead] measures it) and takes its top k. Of those, the ones
// the step's table does not hold get prefetch slots (offload::ExpertCacheSchedule::prefetch, up
// to expert_prefetch of them, at most top_k, two buffers outside the policy's pool; automatic
// slots keep none for them where the budget holds every expert), their bytes are copied on their
// own stream (`vx_pf_copy`, beside the demand fills on `vx_copy`, so they are not ordered behind
// them; the copy engines share the link), then the layer's table row, and an event per layer is
// recorded after. The step's graph waits for that event (an external event wait node) just
// before the layer's cached experts, so the copies run beside the host's experts of L and the
// GPU's work of the next layer up to its router; a layer nothing was prefetched for waits for an
// event long complete. The host records a layer's event before it launches the segment holding
// the wait, and not again until the step has ended, so the wait sees this step's record whether
// the node reads the event at launch or when it runs (keep it so). A failed step synchronizes
// the prefetch stream too, so no row copy lands after the next step's table upload. The host splits
// the next layer by the same row, so a correct prediction moves an expert from the host to the
// GPU in the same step, and a wrong one costs its copy only. Host RAM is read once per copied
// expert either way, during the wait for the next router that leaves it idle otherwise; so this
// pays only if the predictions are mostly right and the copy lands before the GPU needs it.
// Buffer reuse is safe: the buffer of layer m_j is handed out again for m_{j+2}, which the host
// predicts after it saw m_{j+1}'s router ids, recorded after m_j's cached experts on the stream.
void CudaModel::Impl::vx_prefetch_after(int64_t layer, kernels::Executor& ex) {
  size_t next = static_cast<size_t>(layer) + 1;
  while (next < layers.size() && !experts_on_host(layers[next])) ++next;
  const int64_t k = cfg.num_experts_per_tok, E = cfg.num_experts;
  if (!predict_next(layer, next, 1, k, ex, pf_pred)) return;
  const auto& fills = vx_sched->prefetch(static_cast<int64_t>(next), pf_pred.data(), k);
  if (fills.empty()) return;
  const int span = tr_copy_begin(vx_pf_copy, "expert_prefetch", static_cast<int64_t>(next));
  for (const auto& f : fills) copy_expert(f, vx_pf_copy);
  int32_t* row = vx_pf_rows + vx_pf_row * E;
  vx_pf_row ^= 1;
  const auto& table = vx_sched->table();
  std::copy(table.begin() + static_cast<int64_t>(next) * E,
            table.begin() + static_cast<int64_t>(next + 1) * E, row);
  cuda_check(cudaMemcpyAsync(vx_dtable + static_cast<int64_t>(next) * E, row,
                             static_cast<size_t>(E) * 4, cudaMemcpyHostToDevice, vx_pf_copy),
             "expert prefetch");
  tr_span_end(span, vx_pf_copy);
  cuda_check(cudaEventRecord(vx_ev_pf[next], vx_pf_copy), "event record");
  std::lock_guard lock(vx_mu);
  vx_stats.prefetched += static_cast<int64_t>(fills.size());
  vx_stats.bytes_in +=
      fills.size() * static_cast<uint64_t>(2 * vx.gate_up.bytes() + vx.down.bytes());
}

void CudaModel::Impl::cached_experts(int64_t layer) {
  const int64_t E = cfg.num_experts;
  cuda_check(cudaMemsetAsync(yg, 0, static_cast<size_t>(cfg.hidden_size) * 4, stream), "memset");
  kc::GpuExpertsArgs a = vx;
  a.ids = rids;
  a.weights = rw;
  a.top_k = static_cast<int>(cfg.num_experts_per_tok);
  a.num_experts = E;
  a.slot_of = vx_dtable + layer * E;
  a.x = xn;
  a.y = yg;
  TIDAL_ASSERT(kc::gpu_experts_decode(a, stream), "GPU experts refused a checked shape");
  mark("mlp: cached routed experts");
}

void CudaModel::Impl::host_experts(int64_t layer, int64_t T, kernels::Executor& ex) {
  const int64_t k = cfg.num_experts_per_tok, H = cfg.hidden_size;
  std::fill(h_out, h_out + T * H, 0.f);
  if (!vx_step) {
    experts->forward(layer, h_xn, T, h_rids, h_w, k, h_out, ex);
    if (vx_on) {
      std::lock_guard lock(vx_mu);
      vx_stats.cpu_pairs += T * k;
      vx_stats.layer_cpu_pairs[static_cast<size_t>(layer)] += T * k;
    }
    return;
  }
  // One token: the schedule splits the routed experts by this step's table (the GPU computes the
  // others into yg) and admits misses.
  const int64_t ph0 = vx_sched->prefetch_hits();
  const auto& cl = vx_sched->cache().stats()[static_cast<size_t>(layer)];
  const int64_t ad0 = cl.admitted, ev0 = cl.evictions;
  const int64_t on_gpu = vx_sched->route(layer, h_rids, k, vx_host);
  const int64_t admitted = cl.admitted - ad0, evicted = cl.evictions - ev0;
  vx_ids.clear();
  vx_w.clear();
  for (const int32_t i : vx_host) {
    vx_ids.push_back(h_rids[i]);
    vx_w.push_back(h_w[i]);
  }
  const int64_t on_cpu = static_cast<int64_t>(vx_ids.size());
  if (on_cpu > 0) experts->forward(layer, h_xn, 1, vx_ids.data(), vx_w.data(), on_cpu, h_out, ex);
  std::lock_guard lock(vx_mu);
  vx_stats.cpu_pairs += on_cpu;
  vx_stats.gpu_pairs += on_gpu;
  vx_stats.layer_cpu_pairs[static_cast<size_t>(layer)] += on_cpu;
  vx_stats.layer_gpu_pairs[static_cast<size_t>(layer)] += on_gpu;
  vx_stats.prefetch_hits += vx_sched->prefetch_hits() - ph0;
  vx_stats.layer_fills[static_cast<size_t>(layer)] += admitted;
  vx_stats.layer_evictions[static_cast<size_t>(layer)] += evicted;
}

namespace {
/// MemAvailable from /proc/meminfo (bytes), or 0 where it cannot be read.
uint64_t available_host_bytes() {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return 0;
  char line[256];
  uint64_t kb = 0;
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1) break;
  std::fclose(f);
  return kb * 1024;
}
}  // namespace

void CudaModel::Impl::register_host_store(kernels::Executor& ex) {
  if (host_registered || experts == nullptr) return;
  host_registered = true;
  if (experts->packed_region_file_backed()) {
    // A second copy of the experts must fit in what the OS has available (the file's pages
    // become reclaimable once copied); else no page-locking: copies stage through the driver.
    if (available_host_bytes() < experts->packed_region().second + (uint64_t{1} << 30)) return;
    try {
      experts->copy_packed_to_anonymous(ex);
    } catch (const OutOfMemory&) {
      return;  // no room after all: unregistered, as above
    }
  }
  for (const auto& [p, n] : experts->packed_layer_regions()) {
    if (cudaHostRegister(p, n, cudaHostRegisterDefault) != cudaSuccess) {
      cudaGetLastError();  // copies then stage through the driver: correct, slower
      for (void* r : vx_registered) cudaHostUnregister(r);
      vx_registered.clear();
      return;
    }
    vx_registered.push_back(p);
  }
}

void CudaModel::Impl::px_init(kernels::Executor& ex) {
  if (px_on) return;
  if (opts.prefill_stream == 0 || experts == nullptr) {
    px_plan = experts == nullptr ? "off: no routed experts on the host"
                                 : "off (TIDAL_CUDA_PREFILL_STREAM=0)";
    return;
  }
  if (opts.prefill_stream < 0 && opts.precision == "fp32") {  // streaming computes in BF16
    px_plan = "off: gpu_precision=\"fp32\" keeps the routed experts' products on the host";
    return;
  }
  TIDAL_CHECK(opts.stream_chunk < 0 || opts.stream_chunk >= 16, InvalidArgument,
              "prefill expert streaming: TIDAL_CUDA_STREAM_CHUNK must be >= 16, got {}",
              opts.stream_chunk);
  TIDAL_CHECK(opts.stream_group >= 1, InvalidArgument,
              "prefill expert streaming: TIDAL_CUDA_STREAM_GROUP must be >= 1, got {}",
              opts.stream_group);
  px_plan = "off: the experts are not packed in a layout the GPU decodes";
  kernels::cpu::PackedLayout gu, dn;
  if (!experts->packed_layouts(gu, dn)) return;
  const auto ggu = kc::gpu_layout(gu), gdn = kc::gpu_layout(dn);
  if (!kc::dequant_supported(ggu) || !kc::dequant_supported(gdn)) return;
  const int64_t E = cfg.num_experts, H = cfg.hidden_size, I = gu.n, k = cfg.num_experts_per_tok;
  if (E <= 0 || gu.k != H || dn.n != H || dn.k != I) return;
  // Each layer's experts must be one range with a fixed stride (gate, up, down in order).
  int64_t stride = -1;
  const int L = static_cast<int>(layers.size());
  px_moe_index.assign(static_cast<size_t>(L), -1);
  px_next_moe.assign(static_cast<size_t>(L), -1);
  int moe = 0;
  for (int l = 0; l < L; ++l) {
    if (!experts_on_host(layers[static_cast<size_t>(l)])) continue;
    px_moe_index[static_cast<size_t>(l)] = moe++;
    const auto e0 = experts->packed_expert(l, 0);
    if (e0.gate == nullptr) return;
    if (stride < 0)
      stride = E > 1 ? experts->packed_expert(l, 1).gate - e0.gate : gu.bytes() * 2 + dn.bytes();
    for (int64_t e = 0; e < E; ++e) {
      const auto v = experts->packed_expert(l, e);
      if (v.gate != e0.gate + e * stride || v.up != v.gate + gu.bytes() ||
          v.down != v.up + gu.bytes())
        return;  // not the store's contiguous layout: prefill stays on the host
    }
  }
  for (int l = L - 2; l >= 0; --l)
    px_next_moe[static_cast<size_t>(l)] = px_moe_index[static_cast<size_t>(l + 1)] >= 0
                                              ? l + 1
                                              : px_next_moe[static_cast<size_t>(l + 1)];
  if (moe == 0 || stride < 2 * gu.bytes() + dn.bytes() || stride % 16 != 0) return;
  px_stride = stride;
  px_layer_bytes = E * stride;
  px_gu = ggu;
  px_dn = gdn;
  px_group = std::clamp<int64_t>(opts.stream_group, 1, E);
  // VRAM for streaming chunks of T tokens: two layers of experts, a group's BF16 weights, and
  // the routed rows' activations.
  // Note [Two-term activations in streamed experts]
  // The host computes BF16 experts with two BF16 terms per activation (hi + lo, ~16 mantissa
  // bits), as the GPU's own prefill GEMMs do under gpu_precision="bf16x2"; one term (2^-9) moved
  // the golden models' logits 0.04-0.77 from transformers' where the bound is 0.01. So with BF16
  // experts and a precision other than "bf16", the gathered rows and the SwiGLU activations carry
  // a remainder and each GEMM runs twice (hi, then lo accumulated): twice the expert GEMMs, which
  // are ~10% of a streamed layer beside its copy. INT4/INT8 experts keep one term: their weights
  // are rounded to BF16 here, and the host quantises activations to int8 per group.
  px_split = opts.precision != "bf16" && ggu.dtype == 0 && gdn.dtype == 0;
  px_lanes = static_cast<int>(
      std::clamp<int64_t>(CudaOptions::env_int("TIDAL_CUDA_STREAM_LANES", 4), 1, kPxLanes));
  px_pad = CudaOptions::env_flag("TIDAL_CUDA_STREAM_BATCHED", false);
  {
    const char* g = std::getenv("TIDAL_CUDA_STREAM_GEMM");
    const std::string mode = g != nullptr ? g : "";
    TIDAL_CHECK(mode.empty() || mode == "cublas" || mode == "bf16" || mode == "int4",
                InvalidArgument,
                "TIDAL_CUDA_STREAM_GEMM={} is not one of cublas, bf16, int4 (or unset)", mode);
    px_grouped = mode != "cublas" && kc::grouped_expert_gemm_supported(2 * I, H) &&
                 kc::grouped_expert_gemm_supported(H, I);
    px_fused = px_grouped && mode != "bf16" && !px_pad &&
               kc::grouped_expert_gemm_int4_supported(ggu, 2) &&
               kc::grouped_expert_gemm_int4_supported(gdn, 1);
    TIDAL_CHECK(mode != "int4" || px_fused, InvalidArgument,
                "TIDAL_CUDA_STREAM_GEMM=int4: the experts' GEMMs from packed INT4 need INT4 "
                "experts whose matrices have whole 128-row blocks (gate/up {} x {}, down {} x "
                "{}, expert dtype {}), a device with 80 KiB of shared memory per block, and "
                "TIDAL_CUDA_STREAM_BATCHED off",
                ggu.n, ggu.k, gdn.n, gdn.k, ggu.dtype == 2 ? "int4" : "not int4");
  }
  const int64_t ngroups = (E + px_group - 1) / px_group;
  // Note [Padded expert batches]: one group's padded rows, at most half the chunk's pairs.
  auto pad_rows = [&](int64_t T) { return px_pad ? std::max<int64_t>(px_group, T * k / 2) : 0; };
  auto px_sizes = [&](int64_t T) {
    const size_t R = static_cast<size_t>(T * k), S = static_cast<size_t>(pad_rows(T)),
                 L = static_cast<size_t>(ngroups) * S;
    return std::array<size_t, 20>{static_cast<size_t>(px_layer_bytes),
                                  static_cast<size_t>(px_layer_bytes),
                                  px_fused ? 0 : static_cast<size_t>(px_group * 2 * I * H) * 2,
                                  px_fused ? 0 : static_cast<size_t>(px_group * H * I) * 2,
                                  R * static_cast<size_t>(H) * 2,
                                  R * static_cast<size_t>(2 * I) * 4,
                                  R * static_cast<size_t>(I) * 2,
                                  R * static_cast<size_t>(H) * 4,
                                  R * 4,
                                  R * 4,
                                  px_split ? R * static_cast<size_t>(H) * 2 : 0,
                                  px_split ? R * static_cast<size_t>(I) * 2 : 0,
                                  S * static_cast<size_t>(H) * 2,
                                  px_split ? S * static_cast<size_t>(H) * 2 : 0,
                                  S * static_cast<size_t>(2 * I) * 4,
                                  S * static_cast<size_t>(I) * 2,
                                  px_split ? S * static_cast<size_t>(I) * 2 : 0,
                                  S * static_cast<size_t>(H) * 4,
                                  L * 4,
                                  L * 4};
  };
  auto px_total = [&](int64_t T) {
    uint64_t t = static_cast<uint64_t>(px_lanes) * kPxLaneWorkspace;
    for (const size_t b : px_sizes(T)) t += align_up(b);
    return t;
  };
  // Note [Measuring the stream threshold]
  // Streaming is on by default where it fits and pays (TIDAL_CUDA_PREFILL_STREAM=0 turns it off,
  // =1 forces it). Its chunk length: TIDAL_CUDA_STREAM_CHUNK, or the longest of 8192, 4096,
  // 2048 and 1024 tokens whose extra VRAM (workspaces for chunks that long, plus the buffers
  // above) takes at most 3/4 of what the budget leaves for the expert cache after the weights and
  // a KV cache of kv_reserve_tokens (and after the slots gpu_expert_slots=N asks for), and no
  // longer than that context needs. The cache is the one that gives way: at full depth the cache
  // with 1662 slots instead of 4074 hits 40% against 41% and decodes as fast (140 against 138
  // tok/s), while 8192-token chunks make an 8K prompt 8.5x faster (docs/performance.md, ninth
  // session). Each layer's experts cross PCIe once per chunk, so longer chunks pay less per
  // token. A failure while setting it up (out of memory) leaves automatic streaming off; forced,
  // it is the load's error. A prompt streams when its chunks (equal, of at most the chunk length)
  // are at least the threshold long.
  const uint64_t cur_ws = ws_bytes;
  uint64_t room = 0;
  {
    const uint64_t used = weight_bytes + cur_ws + std::max<uint64_t>(kv_bytes, kv_reserve_bytes()) +
                          linear_bytes + (uint64_t{256} << 20);
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const uint64_t limit = opts.memory_limit == 0 ? used + free_b : opts.memory_limit;
    room = limit > used ? std::min<uint64_t>(limit - used, free_b) : 0;
  }
  const bool forced = opts.prefill_stream > 0;
  // Slots asked for by number (gpu_expert_slots=N) come first: streaming takes from what is left.
  if (opts.expert_slots > 0) {
    const uint64_t want =
        static_cast<uint64_t>(opts.expert_slots + 2 * std::max<int64_t>(0, opts.expert_prefetch)) *
            static_cast<uint64_t>(stride) +
        (uint64_t{64} << 20);
    room = room > want ? room - want : 0;
  }
  std::vector<int64_t> lengths;
  if (opts.stream_chunk > 0) {
    lengths = {opts.stream_chunk};
  } else {  // no longer than the context needs: the shortest of them that holds it at most
    const int64_t ctx = std::min<int64_t>(opts.kv_reserve_tokens, cfg.max_position_embeddings);
    for (const int64_t T : {8192, 4096, 2048, 1024})
      if (T == 1024 || T / 2 < ctx) lengths.push_back(T);
  }
  int64_t Tc = 0;
  uint64_t need = 0;
  // An explicit chunk length is the chunk length; the automatic ones never shorten max_chunk.
  auto target = [&](int64_t T) { return opts.stream_chunk > 0 ? T : std::max(T, Tmax); };
  for (const int64_t T : lengths) {
    const int64_t Tw = target(T);
    const uint64_t ws_new = plan_workspaces(Tw).bytes + kBlasWorkspace;
    need = (ws_new > cur_ws ? ws_new - cur_ws : 0) + px_total(Tw);
    const bool fits = forced ? need <= room : need <= room / 4 * 3;
    if (fits) {
      Tc = T;
      break;
    }
  }
  TIDAL_CHECK(!forced || Tc > 0, OutOfMemory,
              "prefill expert streaming (TIDAL_CUDA_PREFILL_STREAM=1) needs {:.2f} GiB of VRAM for "
              "chunks of {} tokens (two layers of experts and workspaces), but the gpu_memory "
              "budget leaves {:.2f} GiB; a smaller TIDAL_CUDA_STREAM_CHUNK, or no streaming, fits",
              gib(need), lengths.back(), gib(room));
  if (Tc == 0) {
    px_plan = fmt::format(
        "off: chunks of {} tokens need {:.2f} GiB of VRAM, more than 3/4 of the {:.2f} GiB the "
        "budget leaves for the expert cache",
        lengths.back(), gib(need), gib(room));
    return;
  }
  try {
    if (target(Tc) != Tmax) replan_workspaces(target(Tc));
    px_rows_max = Tmax * k;
    px_pad_rows = pad_rows(Tmax);
    px_plist_cap = ngroups * px_pad_rows;
    const auto bytes = px_sizes(Tmax);
    const uint64_t total = px_total(Tmax);
    void** ptrs[20] = {
        reinterpret_cast<void**>(&px_stage[0]), reinterpret_cast<void**>(&px_stage[1]),
        reinterpret_cast<void**>(&px_wgu),      reinterpret_cast<void**>(&px_wdn),
        reinterpret_cast<void**>(&px_xs),       reinterpret_cast<void**>(&px_hb),
        reinterpret_cast<void**>(&px_act),      reinterpret_cast<void**>(&px_out),
        reinterpret_cast<void**>(&px_rows),     reinterpret_cast<void**>(&px_pos),
        reinterpret_cast<void**>(&px_xs_lo),    reinterpret_cast<void**>(&px_act_lo),
        reinterpret_cast<void**>(&px_pxs),      reinterpret_cast<void**>(&px_pxs_lo),
        reinterpret_cast<void**>(&px_phb),      reinterpret_cast<void**>(&px_pact),
        reinterpret_cast<void**>(&px_pact_lo),  reinterpret_cast<void**>(&px_pout),
        reinterpret_cast<void**>(&px_ptok),     reinterpret_cast<void**>(&px_pdst)};
    for (int i = 0; i < 20; ++i)
      if (bytes[static_cast<size_t>(i)] > 0)
        cuda_check(cudaMalloc(ptrs[i], bytes[static_cast<size_t>(i)]), "prefill expert streaming");
    const size_t R = static_cast<size_t>(px_rows_max);
    cuda_check(cudaMallocHost(reinterpret_cast<void**>(&h_px_rows), R * 4),
               "pinned host allocation");
    if (px_pad) {
      const size_t L = static_cast<size_t>(px_plist_cap) * 4;
      cuda_check(cudaMallocHost(reinterpret_cast<void**>(&h_px_ptok), L), "pinned host allocation");
      cuda_check(cudaMallocHost(reinterpret_cast<void**>(&h_px_pdst), L), "pinned host allocation");
    }
    cuda_check(cudaMallocHost(reinterpret_cast<void**>(&h_px_pos), R * 4),
               "pinned host allocation");
    if (px_grouped) {  // tiles: at most one partial tile per expert beyond R / tile rows
      px_tiles_cap = px_rows_max / kc::kGroupedGemmRows + E + 1;
      const size_t tb = static_cast<size_t>(px_tiles_cap) * 12;
      cuda_check(cudaMalloc(reinterpret_cast<void**>(&px_tiles), tb), "prefill expert streaming");
      cuda_check(cudaMallocHost(reinterpret_cast<void**>(&h_px_tiles), tb),
                 "pinned host allocation");
    }
    cuda_check(cudaStreamCreateWithFlags(&px_copy, cudaStreamNonBlocking), "stream creation");
    for (int b = 0; b < 2; ++b) {
      cuda_check(cudaEventCreateWithFlags(&px_ev_filled[b], cudaEventDisableTiming),
                 "event creation");
      cuda_check(cudaEventCreateWithFlags(&px_ev_free[b], cudaEventDisableTiming),
                 "event creation");
    }
    cuda_check(cudaEventCreateWithFlags(&px_ev_fork, cudaEventDisableTiming), "event creation");
    for (int j = 0; j < px_lanes; ++j) {
      cuda_check(cudaStreamCreateWithFlags(&px_lane[j], cudaStreamNonBlocking), "stream creation");
      cuda_check(cudaEventCreateWithFlags(&px_ev_lane[j], cudaEventDisableTiming),
                 "event creation");
      cublas_check(cublasCreate(&px_lane_blas[j]), "cublasCreate");
      cublas_check(cublasSetStream(px_lane_blas[j], px_lane[j]), "cublasSetStream");
      cuda_check(cudaMalloc(&px_lane_ws[j], kPxLaneWorkspace), "cuBLAS workspace");
      cublas_check(cublasSetWorkspace(px_lane_blas[j], px_lane_ws[j], kPxLaneWorkspace),
                   "cublasSetWorkspace");
    }
    px_count.assign(static_cast<size_t>(E), 0);
    px_off.assign(static_cast<size_t>(E) + 1, 0);
    px_bytes = total;
    px_on = true;
    register_host_store(ex);
    px_min_tokens = px_measure(ex);
    if (opts.stream_min_tokens >= 0)
      px_min_tokens = opts.stream_min_tokens;
    else if (forced && px_min_tokens < 0)
      px_min_tokens = std::min<int64_t>(Tmax, 1024);  // forced on: chunks of 1024 and more
    if (px_min_tokens < 0) {  // streaming never pays on this machine: the VRAM goes back
      px_plan = fmt::format("off: {}", px_rates);
      px_free();
      if (Tmax != opts.max_chunk) replan_workspaces(opts.max_chunk);
      return;
    }
  } catch (const std::exception& e) {
    if (forced) throw;
    // Automatic: a failure setting streaming up (a transient out-of-memory) leaves it off, with
    // the default workspaces (planned again also where a re-plan failed halfway).
    px_free();
    if (Tmax != opts.max_chunk || ws == nullptr || pinned == nullptr)
      replan_workspaces(opts.max_chunk);
    px_plan = fmt::format("off: setting it up failed ({})", e.what());
    return;
  }
  px_plan = fmt::format("{}: chunks of up to {} tokens, streamed from {} tokens a chunk; {}",
                        forced ? "on" : "auto", Tmax, px_min_tokens, px_rates);
}

// Note [Measuring the stream threshold] (continued)
// Once the buffers exist, px_measure times, on this machine: one MoE layer's packed experts
// copied into a stage buffer (pinned host to device, the faster of two), the host expert engine
// on that layer for E/k tokens (every expert one token: one pass over the weights) and for 16
// times as many (16 tokens per expert: its matrix products), and one expert group's BF16 GEMMs
// on the GPU at the chunk's tokens per expert. Those rates go into the cost model
// (offload::min_stream_tokens, Note [Streaming a prefill chunk]), whose answer is the shortest
// prompt that streams: ~0.1 s at load for the 35B-A3B shape. The routing is synthetic (token t's
// i-th expert is (t·k + i) mod E) and the inputs zeros: the kernels' time does not depend on the
// values. TIDAL_CUDA_STREAM_MIN_TOKENS overrides the threshold.
int64_t CudaModel::Impl::px_measure(kernels::Executor& ex) {
  const int64_t E = cfg.num_experts, H = cfg.hidden_size, k = cfg.num_experts_per_tok;
  const int64_t I = px_gu.n;
  int first = -1;
  for (size_t l = 0; l < layers.size() && first < 0; ++l)
    if (px_moe_index[l] >= 0) first = static_cast<int>(l);
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  struct Events {  // destroyed on every way out
    cudaEvent_t &a, &b;
    ~Events() {
      if (a) cudaEventDestroy(a);
      if (b) cudaEventDestroy(b);
    }
  } events{t0, t1};
  cuda_check(cudaEventCreate(&t0), "event creation");
  cuda_check(cudaEventCreate(&t1), "event creation");
  auto elapsed = [&] {
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, t0, t1), "event timing");
    return static_cast<double>(ms) * 1e-3;
  };
  const uint8_t* src = experts->packed_expert(first, 0).gate;
  double copy_s = 1e30;
  for (int rep = 0; rep < 2; ++rep) {
    cuda_check(cudaEventRecord(t0, px_copy), "event record");
    cuda_check(cudaMemcpyAsync(px_stage[0], src, static_cast<size_t>(px_layer_bytes),
                               cudaMemcpyHostToDevice, px_copy),
               "expert copy");
    cuda_check(cudaEventRecord(t1, px_copy), "event record");
    cuda_check(cudaEventSynchronize(t1), "event wait");
    copy_s = std::min(copy_s, elapsed());
  }
  // One group's dequant + gate/up + down GEMMs at the chunk's mean tokens per expert (from packed
  // INT4, px_group experts' GEMMs in one launch each: in the layer all E go in one, at a rate the
  // profile put within 10% of this one's, docs/performance.md, eleventh session).
  const int64_t n =
      std::max<int64_t>(1, std::min<int64_t>(Tmax * k / E, px_pad ? px_pad_rows : Tmax * k));
  // g experts of n rows each within the row buffers (Tmax·k rows).
  const int64_t g = std::max<int64_t>(
      1, std::min<int64_t>({px_group, E, Tmax * k / n, px_pad ? px_pad_rows / n : px_group}));
  cuda_check(cudaMemsetAsync(px_xs, 0, static_cast<size_t>(g * n * H) * 2, stream), "memset");
  cuda_check(cudaMemsetAsync(px_act, 0, static_cast<size_t>(g * n * I) * 2, stream), "memset");
  // (padded: g·n <= px_pad_rows)
  int64_t nt_measure = 0;       // the g experts' tiles, n rows each
  if (px_grouped && !px_pad) {  // (fused: the first g experts of the stage buffer)
    std::vector<int64_t> off(static_cast<size_t>(g) + 1);
    for (int64_t e = 0; e <= g; ++e) off[static_cast<size_t>(e)] = e * n;
    nt_measure = kc::grouped_expert_gemm_tiles(off.data(), g, h_px_tiles, px_tiles_cap);
    TIDAL_ASSERT(nt_measure <= px_tiles_cap, "{} expert GEMM tiles, room for {}", nt_measure,
                 px_tiles_cap);
    cuda_check(cudaMemcpyAsync(px_tiles, h_px_tiles, static_cast<size_t>(nt_measure) * 12,
                               cudaMemcpyHostToDevice, stream),
               "copy to device");
  }
  double gemm_s = 1e30;
  for (int rep = 0; rep < 2; ++rep) {
    cuda_check(cudaEventRecord(t0, stream), "event record");
    if (!px_fused) px_dequant(px_stage[0], g);
    if (px_fused) {  // as px_layer runs them (Note [Grouped expert GEMM from packed INT4])
      px_grouped_gemm(true, 0, nt_measure, px_xs, nullptr, px_hb, px_stage[0]);
      px_grouped_gemm(false, 0, nt_measure, px_act, nullptr, px_out, px_stage[0]);
    } else if (px_pad) {  // as px_layer runs them (Note [Padded expert batches])
      px_gemm(blas, true, 0, g, n, px_xs, px_split ? px_xs : nullptr, px_phb);
      px_gemm(blas, false, 0, g, n, px_act, px_split ? px_act : nullptr, px_pout);
    } else if (px_grouped) {  // as px_layer runs them (Note [Grouped expert GEMM])
      px_grouped_gemm(true, 0, nt_measure, px_xs, px_split ? px_xs : nullptr, px_hb);
      px_grouped_gemm(false, 0, nt_measure, px_act, px_split ? px_act : nullptr, px_out);
    } else {  // as px_layer runs them (Note [Expert GEMMs on lanes])
      px_fork();
      for (int64_t e = 0; e < g; ++e) {
        cublasHandle_t h = px_lane_blas[e % px_lanes];
        px_gemm(h, true, e, 1, n, px_xs + e * n * H, px_split ? px_xs : nullptr,
                px_hb + e * n * 2 * I);
        px_gemm(h, false, e, 1, n, px_act + e * n * I, px_split ? px_act : nullptr,
                px_out + e * n * H);
      }
      px_join();
    }
    cuda_check(cudaEventRecord(t1, stream), "event record");
    cuda_check(cudaEventSynchronize(t1), "event wait");
    gemm_s = std::min(gemm_s, elapsed());
  }
  // The host expert engine on the first MoE layer.
  auto host = [&](int64_t T) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i) {
        h_rids[t * k + i] = static_cast<int32_t>((t * k + i) % E);
        h_w[t * k + i] = 1.f / static_cast<float>(k);
      }
    std::fill(h_xn, h_xn + T * H, 0.f);
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      std::fill(h_out, h_out + T * H, 0.f);
      const auto a = std::chrono::steady_clock::now();
      experts->forward(first, h_xn, T, h_rids, h_w, k, h_out, ex);
      best = std::min(best,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
    }
    return best;
  };
  const int64_t T1 = std::min(Tmax, (E + k - 1) / k), T2 = std::min(Tmax, 16 * T1);
  const double h1 = host(T1), h2 = host(T2);
  offload::ExpertCostInputs in;
  const double fpt = 2.0 * 3.0 * static_cast<double>(H) * static_cast<double>(I);
  in.expert_bytes = static_cast<double>(px_stride);
  in.flops_per_token = fpt;
  in.pcie_bytes_per_s = static_cast<double>(px_layer_bytes) / copy_s;
  in.cpu_bytes_per_s = static_cast<double>(std::min(E, T1 * k)) * in.expert_bytes / h1;
  in.cpu_flops_per_s = static_cast<double>(T2 * k) * fpt / h2;
  in.gpu_flops_per_s = static_cast<double>(g * n) * fpt / gemm_s;
  const int64_t t = offload::min_stream_tokens(in, E, k, Tmax);
  px_rates = fmt::format(
      "measured: PCIe {:.1f} GB/s, CPU experts {:.1f} GB/s and {:.3f} TFLOP/s, GPU experts "
      "{:.3f} TFLOP/s; the cost model streams {}",
      in.pcie_bytes_per_s * 1e-9, in.cpu_bytes_per_s * 1e-9, in.cpu_flops_per_s * 1e-12,
      in.gpu_flops_per_s * 1e-12,
      t < 0 ? fmt::format("no chunk of up to {} tokens", Tmax) : fmt::format("from {} tokens", t));
  return t;
}

void CudaModel::Impl::px_issue(int layer) {
  if (layer < 0) return;
  const int b = px_moe_index[static_cast<size_t>(layer)] & 1;
  if (px_stage_layer[b] == layer) return;
  const uint8_t* src = experts->packed_expert(layer, 0).gate;
  // The buffer's previous layer is done with it (a never-recorded event: nothing to wait for).
  cuda_check(cudaStreamWaitEvent(px_copy, px_ev_free[b]), "stream wait");
  const int span = tr_copy_begin(px_copy, "stream_layer", layer);
  cuda_check(cudaMemcpyAsync(px_stage[b], src, static_cast<size_t>(px_layer_bytes),
                             cudaMemcpyHostToDevice, px_copy),
             "expert copy");
  tr_span_end(span, px_copy);
  cuda_check(cudaEventRecord(px_ev_filled[b], px_copy), "event record");
  px_stage_layer[b] = layer;
  std::lock_guard lock(vx_mu);
  vx_stats.stream_bytes += static_cast<uint64_t>(px_layer_bytes);
}

void CudaModel::Impl::px_layer(int layer, int64_t T, int64_t W) {
  const int64_t k = cfg.num_experts_per_tok, E = cfg.num_experts, H = cfg.hidden_size;
  const int64_t I = px_gu.n, R = T * k;
  const int buf = px_moe_index[static_cast<size_t>(layer)] & 1;
  routing_to_host(T, W);
  cuda_check(cudaEventRecord(ev_d2h, stream), "event record");
  px_issue(layer);  // normally issued a layer ago
  cuda_check(cudaEventSynchronize(ev_d2h), "event wait");
  if (route_ctl) routing->on_route(layer, h_rlogits, T, cfg.norm_topk_prob, h_rids, h_w);
  // (token, expert) pairs sorted by expert: row r of the sorted order is token h_px_rows[r];
  // pair p (token p / k, its p % k-th expert) is row h_px_pos[p].
  std::fill(px_count.begin(), px_count.end(), 0);
  for (int64_t p = 0; p < R; ++p) {
    const int32_t e = h_rids[p];
    TIDAL_CHECK(e >= 0 && e < E, InvalidArgument,
                "routed expert id {} of layer {} is outside [0, {})", e, layer, E);
    ++px_count[static_cast<size_t>(e)];
  }
  px_off[0] = 0;
  for (int64_t e = 0; e < E; ++e)
    px_off[static_cast<size_t>(e) + 1] =
        px_off[static_cast<size_t>(e)] + px_count[static_cast<size_t>(e)];
  {
    std::vector<int64_t> cur(px_off.begin(), px_off.end() - 1);
    for (int64_t p = 0; p < R; ++p) {
      const int64_t r = cur[static_cast<size_t>(h_rids[p])]++;
      h_px_rows[r] = static_cast<int32_t>(p / k);
      h_px_pos[p] = static_cast<int32_t>(r);
    }
  }
  cuda_check(cudaMemcpyAsync(px_rows, h_px_rows, static_cast<size_t>(R) * 4, cudaMemcpyHostToDevice,
                             stream),
             "copy to device");
  // Note [Padded expert batches]: the groups whose experts, padded to the group's longest, fit
  // one group's scratch; each padded row's token and its row in the unpadded layout (-1: padding).
  const int64_t ngroups = (E + px_group - 1) / px_group;
  bool need_rows = !px_pad;  // the unpadded rows, for groups that run per expert
  if (px_pad) {
    px_gn.assign(static_cast<size_t>(ngroups), 0);
    px_goff.assign(static_cast<size_t>(ngroups), 0);
    int64_t plist = 0;
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t e0 = g * px_group, e1 = std::min(E, e0 + px_group);
      int64_t nmax = 0;
      for (int64_t e = e0; e < e1; ++e) nmax = std::max(nmax, px_count[static_cast<size_t>(e)]);
      const int64_t real = px_off[static_cast<size_t>(e1)] - px_off[static_cast<size_t>(e0)];
      // Per expert where the padding does not fit the scratch or would be most of the work.
      if (nmax == 0 || (e1 - e0) * nmax > px_pad_rows || (e1 - e0) * nmax > 4 * real) {
        need_rows = need_rows || real > 0;
        continue;
      }
      px_gn[static_cast<size_t>(g)] = nmax;
      px_goff[static_cast<size_t>(g)] = plist;
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t i = 0; i < nmax; ++i) {
          const int64_t idx = plist + (e - e0) * nmax + i;
          const bool is_row = i < px_count[static_cast<size_t>(e)];
          const int64_t r = px_off[static_cast<size_t>(e)] + i;
          h_px_ptok[idx] = is_row ? h_px_rows[r] : 0;  // padding reads token 0, is never stored
          h_px_pdst[idx] = is_row ? static_cast<int32_t>(r) : -1;
        }
      plist += (e1 - e0) * nmax;
    }
    if (plist > 0) {
      cuda_check(cudaMemcpyAsync(px_ptok, h_px_ptok, static_cast<size_t>(plist) * 4,
                                 cudaMemcpyHostToDevice, stream),
                 "copy to device");
      cuda_check(cudaMemcpyAsync(px_pdst, h_px_pdst, static_cast<size_t>(plist) * 4,
                                 cudaMemcpyHostToDevice, stream),
                 "copy to device");
    }
  }
  if (px_fused) {  // every expert's tiles, one list (Note [Grouped expert GEMM from packed INT4])
    const int64_t nt = kc::grouped_expert_gemm_tiles(px_off.data(), E, h_px_tiles, px_tiles_cap);
    TIDAL_ASSERT(nt <= px_tiles_cap, "layer {}: {} expert GEMM tiles, room for {}", layer, nt,
                 px_tiles_cap);
    px_tgoff.assign(1, 0);
    px_tgn.assign(1, nt);
    if (nt > 0)
      cuda_check(cudaMemcpyAsync(px_tiles, h_px_tiles, static_cast<size_t>(nt) * 12,
                                 cudaMemcpyHostToDevice, stream),
                 "copy to device");
  } else if (px_grouped) {  // each group's tiles (Note [Grouped expert GEMM]); padded: none
    px_tgoff.assign(static_cast<size_t>(ngroups), 0);
    px_tgn.assign(static_cast<size_t>(ngroups), 0);
    int64_t nt = 0;
    for (int64_t g = 0; g < ngroups; ++g) {
      if (px_pad && px_gn[static_cast<size_t>(g)] > 0) continue;
      const int64_t e0 = g * px_group, e1 = std::min(E, e0 + px_group);
      // Experts local to the group (its weights start at px_wgu), rows of the whole layer.
      const int64_t n =
          kc::grouped_expert_gemm_tiles(px_off.data() + e0, e1 - e0, h_px_tiles + 3 * nt,
                                        std::max<int64_t>(0, px_tiles_cap - nt));
      px_tgoff[static_cast<size_t>(g)] = nt;
      px_tgn[static_cast<size_t>(g)] = n;
      nt += n;
    }
    TIDAL_ASSERT(nt <= px_tiles_cap, "layer {}: {} expert GEMM tiles, room for {}", layer, nt,
                 px_tiles_cap);
    if (nt > 0)
      cuda_check(cudaMemcpyAsync(px_tiles, h_px_tiles, static_cast<size_t>(nt) * 12,
                                 cudaMemcpyHostToDevice, stream),
                 "copy to device");
  }
  cuda_check(
      cudaMemcpyAsync(px_pos, h_px_pos, static_cast<size_t>(R) * 4, cudaMemcpyHostToDevice, stream),
      "copy to device");
  cuda_check(cudaMemcpyAsync(rw, h_w, static_cast<size_t>(R) * 4, cudaMemcpyHostToDevice, stream),
             "copy to device");
  // The next layer's experts, beside this one (after the small uploads above, so they do not
  // queue behind it on a shared copy engine).
  px_issue(px_next_moe[static_cast<size_t>(layer)]);
  if (need_rows) kc::gather_rows_bf16(xn, H, px_rows, R, H, px_xs, stream, px_xs_lo);
  cuda_check(cudaStreamWaitEvent(stream, px_ev_filled[buf]), "stream wait");
  mark("mlp: streamed experts' copy wait (row gather included)");
  const uint8_t* stage = px_stage[buf];
  int64_t padded = 0;  // groups in padded batches
  if (px_fused) {      // every expert from its packed bytes, one launch per GEMM
    px_grouped_gemm(true, 0, px_tgn[0], px_xs, nullptr, px_hb, stage);
    mark("mlp: streamed experts' gate/up GEMM");
    kc::silu_mul_bf16(px_hb, R, I, px_act, stream);
    mark("mlp: streamed experts' SwiGLU");
    px_grouped_gemm(false, 0, px_tgn[0], px_act, nullptr, px_out, stage);
    mark("mlp: streamed experts' down GEMM");
  }
  for (int64_t e0 = 0; e0 < (px_fused ? 0 : E); e0 += px_group) {
    const int64_t e1 = std::min(E, e0 + px_group);
    if (px_off[static_cast<size_t>(e1)] == px_off[static_cast<size_t>(e0)]) continue;
    // The group's gate and up, then its down, each one launch (experts with no token too: at
    // the chunk sizes that stream, nearly every expert has some).
    px_dequant(stage + e0 * px_stride, e1 - e0);
    mark("mlp: streamed experts' dequant");
    if (px_pad && px_gn[static_cast<size_t>(e0 / px_group)] > 0) {
      // One strided-batched call per GEMM (and term) for the group, in its padded scratch, then
      // its real rows into the unpadded layout (Note [Padded expert batches]).
      const size_t g = static_cast<size_t>(e0 / px_group);
      const int64_t n = px_gn[g], ne = e1 - e0, rows = ne * n;
      kc::gather_rows_bf16(xn, H, px_ptok + px_goff[g], rows, H, px_pxs, stream,
                           px_split ? px_pxs_lo : nullptr);
      px_gemm(blas, true, 0, ne, n, px_pxs, px_split ? px_pxs_lo : nullptr, px_phb);
      kc::silu_mul_bf16(px_phb, rows, I, px_pact, stream, px_split ? px_pact_lo : nullptr);
      px_gemm(blas, false, 0, ne, n, px_pact, px_split ? px_pact_lo : nullptr, px_pout);
      kc::scatter_rows(px_pout, px_pdst + px_goff[g], rows, H, px_out, stream);
      ++padded;
      continue;
    }
    if (px_grouped) {  // one launch per GEMM (and term) for the group's experts
      const size_t g = static_cast<size_t>(e0 / px_group);
      const int64_t ra = px_off[static_cast<size_t>(e0)], rb = px_off[static_cast<size_t>(e1)];
      px_grouped_gemm(true, px_tgoff[g], px_tgn[g], px_xs, px_split ? px_xs_lo : nullptr, px_hb);
      mark("mlp: streamed experts' gate/up GEMM");
      kc::silu_mul_bf16(px_hb + ra * 2 * I, rb - ra, I, px_act + ra * I, stream,
                        px_split ? px_act_lo + ra * I : nullptr);
      mark("mlp: streamed experts' SwiGLU");
      px_grouped_gemm(false, px_tgoff[g], px_tgn[g], px_act, px_split ? px_act_lo : nullptr,
                      px_out);
      mark("mlp: streamed experts' down GEMM");
      continue;
    }
    px_fork();
    int lane = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t n = px_count[static_cast<size_t>(e)], r0 = px_off[static_cast<size_t>(e)];
      if (n == 0) continue;
      cublasHandle_t h = px_lane_blas[lane++ % px_lanes];
      // hb[r0 .. r0+n) (rows of 2I) = xs rows · [gate; up]^T (+ the lo rows', accumulated)
      px_gemm(h, true, e - e0, 1, n, px_xs + r0 * H, px_split ? px_xs_lo + r0 * H : nullptr,
              px_hb + r0 * 2 * I);
    }
    px_join();
    const int64_t ra = px_off[static_cast<size_t>(e0)], rb = px_off[static_cast<size_t>(e1)];
    kc::silu_mul_bf16(px_hb + ra * 2 * I, rb - ra, I, px_act + ra * I, stream,
                      px_split ? px_act_lo + ra * I : nullptr);
    px_fork();
    lane = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t n = px_count[static_cast<size_t>(e)], r0 = px_off[static_cast<size_t>(e)];
      if (n == 0) continue;
      cublasHandle_t h = px_lane_blas[lane++ % px_lanes];
      // out[r0 .. r0+n) (rows of H) = act rows · down^T (+ the lo rows', accumulated)
      px_gemm(h, false, e - e0, 1, n, px_act + r0 * I, px_split ? px_act_lo + r0 * I : nullptr,
              px_out + r0 * H);
    }
    px_join();  // the next group's dequant overwrites these weights
  }
  cuda_check(cudaEventRecord(px_ev_free[buf], stream), "event record");
  kc::combine_routed(px_out, px_pos, rw, T, static_cast<int>(k), H, y, stream);
  mark("mlp: streamed routed experts");
  std::lock_guard lock(vx_mu);
  ++vx_stats.stream_layers;
  vx_stats.stream_padded_groups += padded;
  vx_stats.stream_pairs += R;
}

// Note [Padded expert batches]
// The per-expert GEMMs of a streamed layer are 512 cuBLAS calls (256 experts, gate/up and down)
// of ~256 rows each at 8192-token chunks: the lanes (Note [Expert GEMMs on lanes]) moved the
// load's measured GEMM rate only from 57 to 62 TFLOP/s, so the calls' cost on the host, not the
// SMs, looks like the bound. With TIDAL_CUDA_STREAM_BATCHED=1 a group of px_group experts whose
// rows, padded to its longest expert's count, fit one group's scratch (half the chunk's pairs)
// runs as one strided-batched call per GEMM: its rows are gathered padded (expert e's at
// (e - e0)·n; padding rows read token 0), the products and SwiGLU run on the scratch, and the real
// rows are scattered into the unpadded layout (padding rows are marked -1 and never stored), so
// the combine and every other group are unchanged. A group too skewed for the scratch, or whose
// padding would be over 3/4 of its rows, runs per expert on the lanes (and only then are the
// unpadded rows gathered). The scratch is per group, not per layer: trained routers are skewed (a
// group of tidal-mini's pads to ~2x its pairs), and a per-layer padded layout would have to hold
// several times the pairs. Off by default until measured on a GPU.

// Note [Expert GEMMs on lanes]
// One expert's GEMMs at prefill chunk sizes are small: 2I x n x H with n ~ T·k/E (256 rows at
// 8192 tokens of the 35B-A3B) gives cuBLAS 16-32 tiles for the GPU's 132 SMs, and one after
// another on the stream they ran at 57 TFLOP/s (the load's measurement, H100). So a group's experts
// go round-robin on px_lanes streams (TIDAL_CUDA_STREAM_LANES, default 4; 1 runs them one after
// another on one lane), each with its own cuBLAS handle and workspace (a handle's
// workspace must not be shared by kernels in flight on two streams); the main stream forks to the
// lanes after the group's dequant and joins them before the SwiGLU, and again around the down
// GEMMs (the next group's dequant overwrites the BF16 weights they read). Each expert's rows are
// its own, so the lanes write disjoint rows and the result does not depend on the order.
void CudaModel::Impl::px_dequant(const uint8_t* src, int64_t experts) {
  const int64_t H = cfg.hidden_size, I = px_gu.n;
  kc::DequantBatch dq;
  dq.src = src;
  dq.src_stride = px_stride;
  dq.experts = experts;
  dq.mats = 2;
  dq.mat_src_stride = px_gu.bytes();
  dq.dst = px_wgu;
  dq.dst_stride = 2 * I * H;
  dq.mat_dst_stride = I * H;
  kc::dequant_expert_matrices(px_gu, dq, stream);
  dq.src += 2 * px_gu.bytes();
  dq.mats = 1;
  dq.mat_src_stride = 0;
  dq.dst = px_wdn;
  dq.dst_stride = H * I;
  dq.mat_dst_stride = 0;
  kc::dequant_expert_matrices(px_dn, dq, stream);
}

void CudaModel::Impl::px_gemm(cublasHandle_t h, bool gate_up, int64_t first, int64_t ne, int64_t n,
                              const uint16_t* x, const uint16_t* x_lo, float* out) {
  const int64_t H = cfg.hidden_size, I = px_gu.n;
  const int64_t M = gate_up ? 2 * I : H, K = gate_up ? H : I;
  const uint16_t* w = (gate_up ? px_wgu : px_wdn) + first * M * K;
  const float one = 1.f, zero = 0.f;
  for (int term = 0; term < (x_lo != nullptr ? 2 : 1); ++term) {
    const uint16_t* xt = term ? x_lo : x;
    const float* beta = term ? &one : &zero;  // the remainder accumulates onto the first term
    if (ne == 1)
      cublas_check(
          cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M), static_cast<int>(n),
                       static_cast<int>(K), &one, w, CUDA_R_16BF, static_cast<int>(K), xt,
                       CUDA_R_16BF, static_cast<int>(K), beta, out, CUDA_R_32F, static_cast<int>(M),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
    else
      cublas_check(
          cublasGemmStridedBatchedEx(
              h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M), static_cast<int>(n),
              static_cast<int>(K), &one, w, CUDA_R_16BF, static_cast<int>(K), M * K, xt,
              CUDA_R_16BF, static_cast<int>(K), n * K, beta, out, CUDA_R_32F, static_cast<int>(M),
              n * M, static_cast<int>(ne), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx");
  }
}

void CudaModel::Impl::px_grouped_gemm(bool gate_up, int64_t t0, int64_t nt, const uint16_t* x,
                                      const uint16_t* x_lo, float* out, const uint8_t* packed) {
  const int64_t H = cfg.hidden_size, I = px_gu.n;
  kc::GroupedGemmArgs a;
  a.w = gate_up ? px_wgu : px_wdn;
  if (packed != nullptr)  // gate and up (I rows each) or down (H rows) of each expert
    a.set_packed(packed + (gate_up ? 0 : 2 * px_gu.bytes()), px_stride, gate_up ? px_gu : px_dn);
  a.out = out;
  a.tiles = px_tiles + 3 * t0;
  a.ntiles = nt;
  a.m = gate_up ? 2 * I : H;
  a.k = gate_up ? H : I;
  for (int term = 0; term < (x_lo != nullptr ? 2 : 1); ++term) {
    a.x = term ? x_lo : x;
    a.accumulate = term == 1;  // the remainder adds onto the first term
    kc::grouped_expert_gemm(a, stream);
  }
}

void CudaModel::Impl::px_fork() {
  cuda_check(cudaEventRecord(px_ev_fork, stream), "event record");
  for (int j = 0; j < px_lanes; ++j)
    cuda_check(cudaStreamWaitEvent(px_lane[j], px_ev_fork), "stream wait");
}

void CudaModel::Impl::px_join() {
  for (int j = 0; j < px_lanes; ++j) {
    cuda_check(cudaEventRecord(px_ev_lane[j], px_lane[j]), "event record");
    cuda_check(cudaStreamWaitEvent(stream, px_ev_lane[j]), "stream wait");
  }
}

void CudaModel::Impl::px_free() {
  if (px_copy) cudaStreamSynchronize(px_copy);
  for (int b = 0; b < 2; ++b) {
    if (px_ev_filled[b]) cudaEventDestroy(px_ev_filled[b]);
    if (px_ev_free[b]) cudaEventDestroy(px_ev_free[b]);
    px_ev_filled[b] = px_ev_free[b] = nullptr;
    cudaFree(px_stage[b]);
    px_stage[b] = nullptr;
    px_stage_layer[b] = -1;
  }
  if (px_copy) cudaStreamDestroy(px_copy);
  px_copy = nullptr;
  for (int j = 0; j < kPxLanes; ++j) {
    if (px_lane[j]) cudaStreamSynchronize(px_lane[j]);
    if (px_lane_blas[j]) cublasDestroy(px_lane_blas[j]);
    if (px_lane[j]) cudaStreamDestroy(px_lane[j]);
    if (px_ev_lane[j]) cudaEventDestroy(px_ev_lane[j]);
    cudaFree(px_lane_ws[j]);
    px_lane[j] = nullptr;
    px_lane_blas[j] = nullptr;
    px_ev_lane[j] = nullptr;
    px_lane_ws[j] = nullptr;
  }
  if (px_ev_fork) cudaEventDestroy(px_ev_fork);
  px_ev_fork = nullptr;
  for (void* p :
       {static_cast<void*>(px_wgu), static_cast<void*>(px_wdn), static_cast<void*>(px_xs),
        static_cast<void*>(px_hb), static_cast<void*>(px_act), static_cast<void*>(px_out),
        static_cast<void*>(px_rows), static_cast<void*>(px_pos), static_cast<void*>(px_xs_lo),
        static_cast<void*>(px_act_lo), static_cast<void*>(px_pxs), static_cast<void*>(px_pxs_lo),
        static_cast<void*>(px_phb), static_cast<void*>(px_pact), static_cast<void*>(px_pact_lo),
        static_cast<void*>(px_pout), static_cast<void*>(px_ptok), static_cast<void*>(px_pdst)})
    cudaFree(p);
  px_wgu = px_wdn = px_xs = px_act = px_xs_lo = px_act_lo = nullptr;
  px_pxs = px_pxs_lo = px_pact = px_pact_lo = nullptr;
  px_phb = px_pout = nullptr;
  px_ptok = px_pdst = nullptr;
  if (h_px_ptok) cudaFreeHost(h_px_ptok);
  if (h_px_pdst) cudaFreeHost(h_px_pdst);
  h_px_ptok = h_px_pdst = nullptr;
  px_hb = px_out = nullptr;
  px_rows = px_pos = nullptr;
  if (h_px_rows) cudaFreeHost(h_px_rows);
  cudaFree(px_tiles);
  if (h_px_tiles) cudaFreeHost(h_px_tiles);
  px_tiles = h_px_tiles = nullptr;
  px_tiles_cap = 0;
  if (h_px_pos) cudaFreeHost(h_px_pos);
  h_px_rows = h_px_pos = nullptr;
  px_bytes = 0;
  px_on = px_step = false;
  cudaGetLastError();
}

void CudaModel::Impl::vx_free() {
  if (vx_copy) cudaStreamSynchronize(vx_copy);
  if (vx_pf_copy) {
    cudaStreamSynchronize(vx_pf_copy);
    cudaStreamDestroy(vx_pf_copy);
    vx_pf_copy = nullptr;
  }
  for (auto e : vx_ev_pf)
    if (e != nullptr) cudaEventDestroy(e);
  vx_ev_pf.clear();
  if (vx_pf_rows) cudaFreeHost(vx_pf_rows);
  vx_pf_rows = nullptr;
  vx_pf = 0;
  for (auto e : vx_running) vx_events.push_back(e);
  for (auto e : vx_events) cudaEventDestroy(e);
  vx_events.clear();
  vx_running.clear();
  if (vx_ev_table) cudaEventDestroy(vx_ev_table);
  if (vx_copy) cudaStreamDestroy(vx_copy);
  cudaFree(const_cast<uint8_t*>(vx.slots));
  cudaFree(vx_dtable);
  cudaFree(vx.hid);
  cudaFree(yg);
  if (vx_htable) cudaFreeHost(vx_htable);
  vx_ev_table = nullptr;
  vx_copy = nullptr;
  vx.slots = nullptr;
  vx.hid = nullptr;
  vx_dtable = nullptr;
  yg = nullptr;
  vx_htable = nullptr;
  cudaGetLastError();
}

void CudaModel::Impl::enqueue_attention(const GpuLayer& L, int layer, int64_t T) {
  const auto& c = cfg;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, d = c.head_dim;
  const bool gated = c.is_hybrid();
  const int64_t W = L.mix.rows, qw = nh * d * (gated ? 2 : 1);
  linear(L.mix, xn, c.hidden_size, proj, W, T);
  mark("attn: in-proj [q|k|v]");
  // Batched decode: row r is its own sequence (one token, its own state and position).
  const int64_t nseq = batched ? T : 1, Tr = batched ? 1 : T;
  kc::AttnPrepArgs p;
  p.ld = W;
  p.q_norm = L.q_norm;
  p.k_norm = L.k_norm;
  p.inv_freq = inv_freq;
  p.rope_scale = rope_scale;
  p.layer = layer;
  p.T = Tr;
  p.nh = nh;
  p.nkv = nkv;
  p.d = d;
  p.rotary_dim = c.rotary_dim;
  p.eps = static_cast<float>(c.rms_norm_eps);
  p.zero_centred = gated;
  p.gated = gated;
  p.kv_f32 = kv_f32();
  kc::AttentionArgs a;
  a.layer = layer;
  a.T = Tr;
  a.nh = nh;
  a.nkv = nkv;
  a.d = d;
  a.max_splits = Tr == 1 ? attn_splits_decode : kc::attention_max_splits(Tr, nkv, sm_count);
  a.scale = 1.0f / std::sqrt(static_cast<float>(d));
  a.kv_f32 = kv_f32();
  a.tensor_cores = opts.attention_tensor_cores;
  a.partial = partial;  // reused row after row: the launches are ordered on the stream
  // One-token decode: the norms, RoPE and cache write inside the tensor-core attention kernel
  // (Note [attention prep in the decode kernel]); otherwise attn_prep first.
  a.fused_prep =
      fused && nseq == 1 && opts.attention_prep_in_kernel && kc::attention_uses_tensor_cores(a);
  for (int64_t r = 0; r < nseq; ++r) {
    p.qg = proj + r * W;
    p.k = p.qg + qw;
    p.v = p.qg + qw + nkv * d;
    p.q = qb + r * nh * d;
    p.gate = gate + r * nh * d;
    p.step = d_step + r;
    if (a.fused_prep)
      a.prep = p;
    else
      kc::attn_prep(p, stream);
  }
  if (!a.fused_prep) mark("attn: norms, rope, cache write");
  for (int64_t r = 0; r < nseq; ++r) {
    a.q = qb + r * nh * d;
    a.gate = gated ? gate + r * nh * d : nullptr;
    a.out = ao + r * nh * d;
    a.step = d_step + r;
    kc::attention(a, stream);
  }
  mark("attn: attention + combine");
  mixer_out(L.o, ao, nh * d, T);
  mark("attn: o_proj");
}

void CudaModel::Impl::enqueue_deltanet(const GpuLayer& L, int layer, int64_t T) {
  const auto& c = cfg;
  const int64_t H = c.hidden_size, nk = c.linear_num_key_heads, nv = c.linear_num_value_heads,
                dk = c.linear_key_head_dim, dv = c.linear_value_head_dim,
                C = c.linear_conv_channels(), K = c.linear_conv_kernel_dim;
  const int64_t W = L.mix.rows;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float *src = proj, *z = proj + C, *b = proj + C + nv * dv, *a = b + nv;
  // One-token decode on the [qkv | z | b | a] layout: conv, SiLU, beta and g in the projection's
  // epilogue (Note [DeltaNet conv in the GEMV]); q and k stay unnormalised for the delta rule.
  bool conv_done = false;
  if (fused && opts.deltanet_conv_in_gemv && c.family != ArchFamily::kQwen3Next) {
    kc::GdnConvEpilogue e;
    e.conv_w = L.conv;
    e.step = d_step;
    e.layer = layer;
    e.C = C;
    e.K = K;
    e.ba_row = C + nv * dv;
    e.nv = nv;
    e.A_log = L.A_log;
    e.dt_bias = L.dt_bias;
    conv_done = kc::gemv_gdn_in(L.mix, norm_pending ? x : xn, norm_pending, eps, cfg.is_hybrid(),
                                proj, e, stream);
    if (conv_done) norm_pending = nullptr;
  }
  if (!conv_done) linear(L.mix, xn, H, proj, W, T);
  mark(conv_done ? "gdn: in-proj [qkv|z|b|a] + conv1d, beta, g" : "gdn: in-proj [qkv|z|b|a]");
  int64_t ld_src = W, ld_z = W, ld_ba = W;
  if (c.family == ArchFamily::kQwen3Next) {
    const int64_t pw = 2 * nk * dk + 2 * nv * dv;
    kc::gdn_split_next(proj, proj + pw, W, mixed, zb, bb, ab, T, nk, nv, dk, dv, stream);
    src = mixed;
    z = zb;
    b = bb;
    a = ab;
    ld_src = C;
    ld_z = nv * dv;
    ld_ba = nv;
  }
  // Batched decode: row r is its own sequence (one token on its own conv and recurrent state).
  const int64_t nseq = batched ? T : 1, Tr = batched ? 1 : T;
  // The delta rule's inputs: the epilogue's rows in proj, or the prep kernels' buffers.
  const float *dq = gq, *dk_ = gk, *dvv = gv, *dbeta = beta, *dg = gg;
  if (conv_done) {
    dq = proj;
    dk_ = proj + nk * dk;
    dvv = proj + 2 * nk * dk;
    dbeta = b;
    dg = a;
  } else if (Tr == 1 && std::max(dk, dv) <= 1024) {  // decode: conv + norms in one kernel
    kc::gdn_conv_prep_step(src, L.conv, d_step, layer, K, b, a, L.A_log, L.dt_bias, gq, gk, gv,
                           beta, gg, nk, nv, dk, dv, stream, nseq, ld_src, ld_ba);
    mark("gdn: conv1d + l2norm, beta, g");
  } else {
    for (int64_t r = 0; r < nseq; ++r)
      kc::causal_conv1d_silu(src + r * ld_src, ld_src, Tr, C, K, L.conv, d_step + r, layer,
                             u + r * C, stream);
    mark("gdn: conv1d");
    kc::gdn_prep(u, b, a, ld_ba, L.A_log, L.dt_bias, gq, gk, gv, beta, gg, T, nk, nv, dk, dv,
                 stream);
    mark("gdn: l2norm, beta, g");
  }
  // One-token decode: the delta rule in column blocks (4x the blocks of one per value head) and
  // its gated output norm applied by out_proj's streaming GEMV while it stages its input row.
  if (T == 1 && !batched && opts.deltanet_split) {
    kc::delta_rule(dq, dk_, dvv, dg, dbeta, d_step, layer, go, 1, nk, nv, dk, dv, stream, 1,
                   conv_done);
    mark("gdn: delta rule");
    float* dst = fused ? x : y;
    if (kc::gemv_gated_norm(L.out, go, z, L.gnorm, dv, eps, dst, fused, stream)) {
      pend(fused ? nullptr : y);
      mark("gdn: gated norm + out_proj");
      return;
    }
    kc::rms_norm_gated(go, z, ld_z, nv, L.gnorm, go, nv, dv, eps,
                       stream);  // shape it does not take
    mark("gdn: gated norm");
  } else if (Tr == 1 &&
             kc::delta_rule_normed(dq, dk_, dvv, dg, dbeta, d_step, layer, z, ld_z, L.gnorm, eps,
                                   go, Tr, nk, nv, dk, dv, stream, nseq, conv_done)) {
    mark("gdn: delta rule + gated norm");
  } else {
    // The attention q buffer is free while a DeltaNet layer runs: the two-pass chunked delta
    // rule's scratch (Note [two-pass chunked delta rule]).
    kc::delta_rule(dq, dk_, dvv, dg, dbeta, d_step, layer, go, Tr, nk, nv, dk, dv, stream, nseq,
                   conv_done, qb, qb ? qb_bytes : 0);
    mark("gdn: delta rule");
    kc::rms_norm_gated(go, z, ld_z, nv, L.gnorm, go, T * nv, dv, eps, stream);
    mark("gdn: gated norm");
  }
  mixer_out(L.out, go, nv * dv, T);
  mark("gdn: out_proj");
}

void CudaModel::Impl::enqueue_mlp(const GpuLayer& L, int layer, int64_t T) {
  const auto& c = cfg;
  const int64_t H = c.hidden_size;
  const int64_t W = L.mlp_in.rows;
  const int64_t k = c.num_experts_per_tok;
  // One-token decode: the router's top-k by the in-projection's last block (Note [Router in the
  // MoE in-projection]).
  bool routed_in_gemv = false;
  if (L.is_moe && T == 1 && !batched && opts.route_in_gemv) {
    kc::RouteTail rt;
    rt.E = c.num_experts;
    rt.k = k;
    rt.renorm = c.norm_topk_prob;
    rt.ids = rids;
    rt.weights = rw;
    rt.sync = d_sync + layer;
    const bool pending = norm_pending != nullptr;
    routed_in_gemv =
        kc::gemv_route(L.mlp_in, pending ? x : xn, norm_pending, static_cast<float>(c.rms_norm_eps),
                       c.is_hybrid(), proj, rt, stream);
    if (routed_in_gemv) norm_pending = nullptr;
  }
  if (!routed_in_gemv) linear(L.mlp_in, xn, H, proj, W, T);
  mark(routed_in_gemv ? "mlp: in-proj [router|shared] + router top-k"
                      : "mlp: in-proj [router|shared]");
  // SwiGLU: down(silu(gate) ⊙ up), the product fused into the GEMV for decode.
  auto swiglu_down = [&](const float* gu, int64_t I, float* dst) {
    if (fused) {  // x += [sigmoid(gate) ·] down(silu(g) ⊙ u)
      const float* g = dst == hs ? gu + 2 * I : nullptr;  // the shared expert's gate logit
      kc::gemv(L.down, gu, W, x, H, 1, true, stream, gu + I, g, W);
    } else if (T <= kc::kMaxGemvRows || batched) {
      for (int64_t r0 = 0; r0 < T; r0 += kc::kMaxGemvRows)
        kc::gemv(L.down, gu + r0 * W, W, dst + r0 * H, H,
                 std::min<int64_t>(kc::kMaxGemvRows, T - r0), false, stream, gu + r0 * W + I);
    } else {
      kc::silu_mul(gu, gu + I, W, hmid, T, I, stream);
      linear(L.down, hmid, I, dst, H, T);
    }
  };
  const int64_t E = L.is_moe ? c.num_experts : 0;
  if (!L.is_moe) {
    swiglu_down(proj, L.down.cols, y);
    pend(fused ? nullptr : y);
    return;
  }
  if (routed_in_gemv) {
    // the ids and weights are written
  } else if (fused && !experts && opts.side_route) {  // nothing on this stream reads the ids: route
                                                      // beside the shared expert
    cuda_check(cudaEventRecord(ev_fork, stream), "event record");
    cuda_check(cudaStreamWaitEvent(side, ev_fork), "stream wait");
    kc::moe_route(proj, W, T, E, k, c.norm_topk_prob, rids, rw, side);
    side_pending = true;  // joined after the shared expert, before anything rewrites proj
  } else {
    kc::moe_route(proj, W, T, E, k, c.norm_topk_prob, rids, rw, stream);
    mark("mlp: router top-k");
  }
  if (experts && px_step) {
    px_layer(layer, T, W);  // routed experts on the GPU, into y
  } else if (experts) {
    cuda_check(
        cudaMemcpyAsync(h_xn, xn, static_cast<size_t>(T * H) * 4, cudaMemcpyDeviceToHost, stream),
        "copy to host");
    routing_to_host(T, W);
    // Inside a captured decode graph an external event record becomes a node the host waits on.
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cuda_check(cudaStreamIsCapturing(stream, &cap), "capture status");
    cuda_check(cap == cudaStreamCaptureStatusActive
                   ? cudaEventRecordWithFlags(ev_d2h, stream, cudaEventRecordExternal)
                   : cudaEventRecord(ev_d2h, stream),
               "event record");
    // The resident routed experts, while the host computes the others. Under routing control
    // the host may rewrite the ids: they run once it has (run_segments), from its ids.
    if (vx_step && !route_ctl) {
      if (vx_pf > 0)  // this layer's prefetch copies (Note [Lookahead prefetch])
        cuda_check(cap == cudaStreamCaptureStatusActive
                       ? cudaStreamWaitEvent(stream, vx_ev_pf[static_cast<size_t>(layer)],
                                             cudaEventWaitExternal)
                       : cudaStreamWaitEvent(stream, vx_ev_pf[static_cast<size_t>(layer)]),
                   "stream wait");
      cached_experts(layer);
    }
  }
  // The shared expert runs on the GPU while the host computes the routed experts.
  // The MLP output reaches x in the next fused residual + norm: routed experts in y (copied from
  // the host at the start of the next segment; none in the GPU-only benchmark) plus the gated
  // shared expert. proj (the gate logit) is not overwritten before then.
  const float* routed = experts ? y : nullptr;
  if (c.shared_expert_intermediate_size > 0) {
    const int64_t Is = c.shared_expert_intermediate_size;
    swiglu_down(proj + E, Is, hs);
    mark("mlp: shared down (SwiGLU fused)");
    join_side();
    if (fused)
      pend(routed);
    else
      pend(routed, hs, proj + E + 2 * Is, W);
  } else {
    join_side();
    pend(routed);
  }
}

void CudaModel::Impl::enqueue_layers(size_t l0, size_t l1, int64_t T, bool first) {
  const int64_t H = cfg.hidden_size;
  if (first) {
    pend(nullptr);
  } else if (!px_step) {  // routed output of the previous segment's last layer (pending since
                          // its MLP; streamed experts wrote it to y already)
    cuda_check(
        cudaMemcpyAsync(y, h_out, static_cast<size_t>(T * H) * 4, cudaMemcpyHostToDevice, stream),
        "copy to device");
    if (vx_step) kc::add_vector(y, yg, T * H, stream);  // + the cached experts' sum
  }
  for (size_t l = l0; l < l1; ++l) {
    const GpuLayer& L = layers[l];
    residual_norm(L.in_norm, T);
    if (L.type == LayerType::kFullAttention)
      enqueue_attention(L, static_cast<int>(l), T);
    else
      enqueue_deltanet(L, static_cast<int>(l), T);
    residual_norm(L.post_norm, T, experts_on_host(L));  // host experts read xn
    enqueue_mlp(L, static_cast<int>(l), T);
  }
}

void CudaModel::Impl::enqueue_final(int64_t T, LogitsMode mode) {
  if (mode == LogitsMode::kNone) return;                    // x is not needed after this forward
  residual_norm(final_norm, T, mode != LogitsMode::kLast);  // xn (all T rows for kAll)
}

int64_t CudaOptions::env_int(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  return *end == '\0' && v >= 0 ? static_cast<int64_t>(v) : fallback;
}

bool CudaOptions::env_flag(const char* name, bool fallback) {
  const char* e = std::getenv(name);
  if (e && std::string(e) == "1") return true;
  if (e && std::string(e) == "0") return false;
  return fallback;
}

// The device workspaces for chunks of T tokens (Tmax): their total and where each one goes;
// nothing is allocated (allocate_workspaces does that).
CudaModel::Impl::WorkspacePlan CudaModel::Impl::plan_workspaces(int64_t T) {
  WorkspacePlan p;
  const auto& c = cfg;
  const int64_t H = c.hidden_size;
  auto W = [&](auto** ptr, size_t bytes) {
    p.parts.emplace_back(reinterpret_cast<void**>(ptr), bytes);
    p.bytes += align_up(bytes);
  };
  const size_t f = 4;
  W(&x, T * H * f);
  W(&xn, T * H * f);
  W(&y, T * H * f);
  W(&hs, T * H * f);
  W(&ids, T * 4);
  int64_t Wmax = 1;  // widest stacked projection output
  for (const auto& g : layers) Wmax = std::max({Wmax, g.mix.rows, g.mlp_in.rows});
  W(&proj, T * Wmax * f);
  int64_t Kmax = std::max<int64_t>(H, c.num_attention_heads * c.head_dim);
  bool has_attention = false;
  for (const auto& g : layers) has_attention = has_attention || g.type == LayerType::kFullAttention;
  if (has_attention) {
    const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, d = c.head_dim;
    W(&qb, T * nh * d * f);
    W(&gate, T * nh * d * f);
    W(&ao, T * nh * d * f);
    // Shorter chunks use more splits: the worst case over every chunk length.
    size_t pf = 0;
    for (int64_t t = 1; t <= T; ++t)
      pf = std::max(
          pf, kc::attention_workspace_floats(t, nh, d, kc::attention_max_splits(t, nkv, sm_count)));
    W(&partial, pf * f);
  }
  if (c.is_hybrid()) {
    const int64_t nk = c.linear_num_key_heads, nv = c.linear_num_value_heads,
                  dk = c.linear_key_head_dim, dv = c.linear_value_head_dim,
                  C = c.linear_conv_channels();
    if (c.family == ArchFamily::kQwen3Next) {  // de-interleaved projections
      W(&mixed, T * C * f);
      W(&zb, T * nv * dv * f);
      W(&bb, T * nv * f);
      W(&ab, T * nv * f);
    }
    W(&u, T * C * f);
    W(&gq, T * nk * dk * f);
    W(&gk, T * nk * dk * f);
    W(&gv, T * nv * dv * f);
    W(&beta, T * nv * f);
    W(&gg, T * nv * f);
    W(&go, T * nv * dv * f);
    Kmax = std::max(Kmax, nv * dv);
  }
  int64_t Imax = 1;  // widest SwiGLU intermediate (down projection input)
  for (const auto& g : layers) Imax = std::max(Imax, g.down.cols);
  Kmax = std::max(Kmax, Imax);
  const int64_t k = std::max<int64_t>(1, c.num_experts_per_tok);
  W(&rids, T * k * 4);
  W(&rw, T * k * f);
  W(&hmid, T * Imax * f);
  // logits in row blocks of at most 64 MiB
  p.logits_rows = std::clamp<int64_t>((int64_t{64} << 20) / (c.vocab_size * 4), 1, T);
  W(&logits, static_cast<size_t>(p.logits_rows * c.vocab_size) * f);
  W(&act16, static_cast<size_t>(2 * T * Kmax) * 2);  // hi and lo halves
  // Weight conversion scratch for prefill GEMMs whose weights are not in the GEMM's format.
  {
    const WFormat want = opts.precision == "fp32" ? WFormat::kF32 : WFormat::kBF16;
    int64_t most = 0;
    auto see = [&](const DevMatrix& d) {
      if (d.rows && d.format != want) most = std::max(most, d.rows * d.cols);
    };
    see(lm_head);
    for (const auto& g : layers)
      for (const DevMatrix* d : {&g.mix, &g.o, &g.out, &g.mlp_in, &g.down}) see(*d);
    p.wscratch_elems = static_cast<size_t>(std::min<int64_t>(most, int64_t{16} << 20));
    p.wscratch_elems = std::max(p.wscratch_elems, static_cast<size_t>(Kmax));
    W(&wscratch, p.wscratch_elems * (want == WFormat::kF32 ? 4 : 2));
  }
  // Batched decode: up to 64 sequences a step, their logits in one block.
  p.max_batch = std::min<int64_t>({64, p.logits_rows, T});
  W(&d_step, static_cast<size_t>(p.max_batch) * sizeof(kc::StepDev));
  W(&d_sync, static_cast<size_t>(std::max<int64_t>(1, cfg.num_hidden_layers)) * sizeof(unsigned));
  return p;
}

void CudaModel::Impl::allocate_workspaces(const WorkspacePlan& p, int64_t T) {
  if (stream) cuda_check(cudaStreamSynchronize(stream), "workspace reallocation");
  for (auto g : graphs) cudaGraphExecDestroy(g);  // they hold the old workspace addresses
  graphs.clear();
  for (auto& [n, gs] : batch_graphs)
    for (auto g : gs) cudaGraphExecDestroy(g);
  batch_graphs.clear();
  cudaFree(ws);
  ws = nullptr;
  if (pinned) cudaFreeHost(pinned);
  pinned = nullptr;
  for (const auto& part : p.parts) *part.first = nullptr;  // nothing dangles if an allocation fails
  h_step = nullptr;
  h_ids = nullptr;
  h_xn = h_out = h_w = h_rlogits = h_logits = nullptr;
  h_rids = nullptr;
  Tmax = T;
  ws_bytes = p.bytes + kBlasWorkspace;
  logits_rows = p.logits_rows;
  max_batch = p.max_batch;
  wscratch_elems = p.wscratch_elems;
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&ws), p.bytes), "workspace allocation");
  size_t off = 0;
  qb_bytes = 0;
  for (auto& [ptr, bytes] : p.parts) {
    *ptr = ws + off;
    off += align_up(bytes);
    if (ptr == reinterpret_cast<void**>(&qb)) qb_bytes = bytes;
  }
  cuda_check(cudaMemset(d_sync, 0,
                        static_cast<size_t>(std::max<int64_t>(1, cfg.num_hidden_layers)) *
                            sizeof(unsigned)),
             "workspace counters");
  // The memset runs on the legacy stream, which the model's non-blocking stream does not wait for.
  cuda_check(cudaDeviceSynchronize(), "workspace counters");
  // Pinned staging.
  const auto& c = cfg;
  const size_t f = 4, H = static_cast<size_t>(c.hidden_size), Tz = static_cast<size_t>(T),
               k = static_cast<size_t>(std::max<int64_t>(1, c.num_experts_per_tok)),
               E = static_cast<size_t>(std::max<int64_t>(1, c.num_experts));
  const size_t pin = align_up(static_cast<size_t>(max_batch) * sizeof(kc::StepDev)) +
                     align_up(Tz * 4) + 2 * align_up(Tz * H * f) + 2 * align_up(Tz * k * 4) +
                     align_up(Tz * E * f) +
                     align_up(static_cast<size_t>(logits_rows * c.vocab_size) * f);
  cuda_check(cudaMallocHost(&pinned, pin), "pinned host allocation");
  char* hp = static_cast<char*>(pinned);
  auto take = [&](size_t bytes) {
    char* r = hp;
    hp += align_up(bytes);
    return r;
  };
  h_step =
      reinterpret_cast<kc::StepDev*>(take(static_cast<size_t>(max_batch) * sizeof(kc::StepDev)));
  h_ids = reinterpret_cast<int32_t*>(take(Tz * 4));
  h_xn = reinterpret_cast<float*>(take(Tz * H * f));
  h_out = reinterpret_cast<float*>(take(Tz * H * f));
  h_rids = reinterpret_cast<int32_t*>(take(Tz * k * 4));
  h_w = reinterpret_cast<float*>(take(Tz * k * 4));
  h_rlogits = reinterpret_cast<float*>(take(Tz * E * f));
  h_logits = reinterpret_cast<float*>(take(static_cast<size_t>(logits_rows * c.vocab_size) * f));
}

CudaModel::CudaModel(const ModelConfig& cfg, const HostWeights& hw, RoutedExperts* experts,
                     RoutingControl* routing, const CudaOptions& opts, kernels::Executor& ex)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  m.opts = opts;
  m.profiling = CudaOptions::env_flag("TIDAL_CUDA_PROFILE", false);
  m.experts = experts;
  m.routing = routing;
  m.host_layers = hw.layers;
  TIDAL_CHECK(opts.weights == "bf16" || opts.weights == "int8", InvalidArgument,
              "gpu_weights must be \"bf16\" or \"int8\", got \"{}\"", opts.weights);
  TIDAL_CHECK(opts.precision == "bf16x2" || opts.precision == "bf16" || opts.precision == "fp32",
              InvalidArgument, "gpu_precision must be \"bf16x2\", \"bf16\" or \"fp32\", got \"{}\"",
              opts.precision);
  TIDAL_CHECK(opts.kv_dtype == "bf16" || opts.kv_dtype == "fp32", InvalidArgument,
              "kv_cache_dtype must be \"bf16\" or \"fp32\", got \"{}\"", opts.kv_dtype);
  TIDAL_CHECK(opts.max_chunk >= 16, InvalidArgument, "max_chunk must be >= 16");
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess) {
    cudaGetLastError();
    ndev = 0;
  }
  TIDAL_CHECK(ndev > 0, InvalidArgument,
              "device=\"cuda\" was requested but no CUDA device is available on this machine; use "
              "device=\"cpu\"");
  TIDAL_CHECK(opts.device >= 0 && opts.device < ndev, InvalidArgument,
              "device=\"cuda:{}\": this machine has {} CUDA device(s)", opts.device, ndev);
  cuda_check(cudaSetDevice(opts.device), "cudaSetDevice");
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, opts.device), "cudaGetDeviceProperties");
  m.sm_count = prop.multiProcessorCount;
  m.name = prop.name;
  size_t free_b = 0, total_b = 0;
  cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  TIDAL_CHECK(opts.memory_limit <= total_b, InvalidArgument,
              "gpu_memory={:.2f} GiB is more than the {:.2f} GiB of {}", gib(opts.memory_limit),
              gib(total_b), m.name);
  if (m.opts.memory_limit == 0) m.opts.memory_limit = free_b;
  TIDAL_CHECK(cfg.head_dim <= 256 && (cfg.head_dim <= 32 || cfg.head_dim % 8 == 0), Unsupported,
              "the CUDA attention kernels need head_dim <= 32 or a multiple of 8 up to 256 (vector "
              "loads of the KV cache), got {}",
              cfg.head_dim);
  if (cfg.is_hybrid()) {
    const int64_t dk = cfg.linear_key_head_dim, dv = cfg.linear_value_head_dim;
    // delta_rule: a block holds min(32, d_v) columns × (d_k / rows-per-thread) lanes per column;
    // lanes of one column reduce by shuffles, so a block of fewer than 32 threads needs one lane
    // per column (d_k = 16).
    const bool ok = (dk == 16 || dk == 32 || dk == 64 || dk == 128 || dk == 256) &&
                    (dv % 32 == 0 || (dk == 16 && dv <= 32)) && cfg.linear_conv_kernel_dim <= 8;
    TIDAL_CHECK(ok, Unsupported,
                "the CUDA DeltaNet kernel needs linear_key_head_dim in {{16, 32, 64, 128, 256}}, "
                "linear_value_head_dim a multiple of 32 (or <= 32 with linear_key_head_dim 16), "
                "linear_conv_kernel_dim <= 8; got {}, {}, {}",
                dk, dv, cfg.linear_conv_kernel_dim);
  }
  TIDAL_CHECK(cfg.num_experts <= 1024 && cfg.num_experts_per_tok <= 16, Unsupported,
              "the CUDA router supports up to 1024 experts and top-16");

  // ------------------------------------------------------------------ weight upload plan
  const bool int8 = opts.weights == "int8";
  struct Up {
    const void* src;
    size_t bytes;
    std::vector<char> conv;  // converted host data when not uploaded as-is
    size_t off = 0;
  };
  std::vector<Up> ups;
  auto push_raw = [&](const void* p, size_t bytes) {
    ups.push_back({p, bytes, {}, 0});
    return ups.size() - 1;
  };
  struct MatRef {
    DevMatrix* dst;
    size_t data_up, scale_up;
  };
  std::vector<MatRef> mats;
  std::vector<std::pair<const float**, size_t>> vecs;
  auto add_vec = [&](const float** dst, const std::vector<float>& v) {
    vecs.emplace_back(dst, push_raw(v.data(), v.size() * 4));
  };
  // One matrix, or several stacked by rows (projections of the same input run as one GEMV) with
  // zero rows up to a multiple of 4, so every part's output stays 16-byte aligned. Quantised when
  // int8.
  auto add_mat = [&](DevMatrix* dst, std::vector<kernels::WeightView> parts) {
    const int64_t cols = parts[0].cols;
    int64_t rows = 0;
    for (auto& p : parts) rows += p.rows;
    m.weight_bf16_bytes += static_cast<uint64_t>(rows * cols) * 2;
    if (parts.size() > 1) rows = (rows + 3) / 4 * 4;
    dst->rows = rows;
    dst->cols = cols;
    if (int8) {
      dst->format = WFormat::kI8;
      Up q{nullptr, static_cast<size_t>(rows * cols), {}, 0};
      Up s{nullptr, static_cast<size_t>(rows) * 4, {}, 0};
      q.conv.resize(q.bytes);
      s.conv.resize(s.bytes);
      auto* qd = reinterpret_cast<int8_t*>(q.conv.data());
      auto* sd = reinterpret_cast<float*>(s.conv.data());
      int64_t r0 = 0;
      for (auto& p : parts) {
        ex.parallel_for(p.rows, 16, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) {
            float mx = 0.f;
            for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(p.at(r, c)));
            const float sc = mx > 0.f ? mx / 127.0f : 1.0f;
            sd[r0 + r] = sc;
            for (int64_t c = 0; c < cols; ++c)
              qd[(r0 + r) * cols + c] =
                  static_cast<int8_t>(std::clamp(std::nearbyint(p.at(r, c) / sc), -127.0f, 127.0f));
          }
        });
        r0 += p.rows;
      }
      ups.push_back(std::move(q));
      const size_t qi = ups.size() - 1;
      ups.push_back(std::move(s));
      mats.push_back({dst, qi, ups.size() - 1});
      return;
    }
    // BF16 when every part is BF16 or an fp32 vector holding BF16 values (norm-like gate rows).
    bool all_bf16 = true;
    for (auto& p : parts) {
      if (p.dtype == kernels::DType::kBF16) continue;
      for (int64_t r = 0; r < p.rows && all_bf16; ++r)
        for (int64_t c = 0; c < cols && all_bf16; ++c)
          all_bf16 = kernels::bf16_to_f32(kernels::f32_to_bf16(p.at(r, c))) == p.at(r, c);
    }
    dst->format = all_bf16 ? WFormat::kBF16 : WFormat::kF32;
    if (parts.size() == 1 &&
        parts[0].dtype == (all_bf16 ? kernels::DType::kBF16 : kernels::DType::kF32)) {
      mats.push_back({dst,
                      push_raw(parts[0].data, parts[0].dtype == kernels::DType::kBF16
                                                  ? static_cast<size_t>(rows * cols) * 2
                                                  : static_cast<size_t>(rows * cols) * 4),
                      SIZE_MAX});
      return;
    }
    const size_t esz = all_bf16 ? 2 : 4;
    Up u{nullptr, static_cast<size_t>(rows * cols) * esz, {}, 0};
    u.conv.resize(u.bytes);
    size_t off = 0;
    for (auto& p : parts) {
      if (all_bf16 && p.dtype == kernels::DType::kBF16) {
        std::memcpy(u.conv.data() + off, p.data, static_cast<size_t>(p.rows * cols) * 2);
      } else if (all_bf16) {
        auto* b = reinterpret_cast<uint16_t*>(u.conv.data() + off);
        for (int64_t r = 0; r < p.rows; ++r)
          for (int64_t c = 0; c < cols; ++c) b[r * cols + c] = kernels::f32_to_bf16(p.at(r, c));
      } else {
        auto* f = reinterpret_cast<float*>(u.conv.data() + off);
        for (int64_t r = 0; r < p.rows; ++r)
          for (int64_t c = 0; c < cols; ++c) f[r * cols + c] = p.at(r, c);
      }
      off += static_cast<size_t>(p.rows * cols) * esz;
    }
    ups.push_back(std::move(u));
    mats.push_back({dst, ups.size() - 1, SIZE_MAX});
  };

  add_mat(&m.embed, {hw.embed_tokens});
  if (cfg.tie_word_embeddings && !int8)
    mats.push_back({&m.lm_head, mats.back().data_up, SIZE_MAX});  // shares the upload
  else
    add_mat(&m.lm_head, {hw.lm_head});
  if (cfg.tie_word_embeddings && !int8) {
    m.lm_head.rows = m.embed.rows;
    m.lm_head.cols = m.embed.cols;
    m.lm_head.format = m.embed.format;
  }
  add_vec(&m.final_norm, *hw.final_norm);
  std::vector<float> inv(hw.rope_inv_freq);
  if (inv.empty()) inv.push_back(0.f);
  add_vec(&m.inv_freq, inv);
  m.rope_scale = hw.rope_scale;
  const auto& HL = *hw.layers;
  m.layers.resize(HL.size());
  for (size_t l = 0; l < HL.size(); ++l) {
    const LayerWeights& w = HL[l];
    GpuLayer& g = m.layers[l];
    g.type = w.type;
    add_vec(&g.in_norm, w.input_layernorm);
    add_vec(&g.post_norm, w.post_attention_layernorm);
    if (w.type == LayerType::kFullAttention) {
      add_mat(&g.mix, {w.attn.q_proj, w.attn.k_proj, w.attn.v_proj});
      add_mat(&g.o, {w.attn.o_proj});
      add_vec(&g.q_norm, w.attn.q_norm);
      add_vec(&g.k_norm, w.attn.k_norm);
    } else {
      const auto& d = w.gdn;
      if (cfg.family == ArchFamily::kQwen3Next)
        add_mat(&g.mix, {d.in_proj_qkvz, d.in_proj_ba});
      else
        add_mat(&g.mix, {d.in_proj_qkv, d.in_proj_z, d.in_proj_b, d.in_proj_a});
      add_mat(&g.out, {d.out_proj});
      add_vec(&g.conv, d.conv1d);
      add_vec(&g.dt_bias, d.dt_bias);
      add_vec(&g.A_log, d.A_log);
      add_vec(&g.gnorm, d.norm);
    }
    g.is_moe = w.mlp.is_moe;
    if (g.is_moe) {
      if (cfg.shared_expert_intermediate_size > 0) {
        kernels::WeightView sgv{w.mlp.shared_expert_gate.data(), kernels::DType::kF32, 1,
                                cfg.hidden_size};
        add_mat(&g.mlp_in, {w.mlp.router, w.mlp.shared_gate_proj, w.mlp.shared_up_proj, sgv});
        add_mat(&g.down, {w.mlp.shared_down_proj});
      } else {
        add_mat(&g.mlp_in, {w.mlp.router});
      }
    } else {
      add_mat(&g.mlp_in, {w.mlp.gate_proj, w.mlp.up_proj});
      add_mat(&g.down, {w.mlp.down_proj});
    }
  }
  size_t total = 0;
  for (auto& u : ups) {
    u.off = total;
    total += align_up(u.bytes);
  }
  m.weight_bytes = total;

  // ------------------------------------------------------------------ workspace plan
  const auto& c = cfg;
  const int64_t T = m.opts.max_chunk;
  m.attn_splits_decode =
      kc::attention_max_splits(1, std::max<int64_t>(1, c.num_key_value_heads), m.sm_count);
  const Impl::WorkspacePlan wplan = m.plan_workspaces(T);
  m.ws_bytes = wplan.bytes + Impl::kBlasWorkspace;

  const uint64_t need = m.weight_bytes + m.ws_bytes;
  TIDAL_CHECK(
      need <= m.opts.memory_limit, OutOfMemory,
      "the GPU part of this model needs {:.2f} GiB (weights {:.2f} GiB{}, workspaces {:.2f} "
      "GiB) but the VRAM budget is {:.2f} GiB ({} has {:.2f} GiB free){}",
      gib(need), gib(m.weight_bytes), int8 ? " as int8" : "", gib(m.ws_bytes),
      gib(m.opts.memory_limit), m.name, gib(free_b),
      int8 ? "" : "; gpu_weights=\"int8\" halves the weights");

  cuda_check(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "stream creation");
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&m.wbase), total), "weight allocation");
  for (auto& u : ups)
    cuda_check(cudaMemcpy(m.wbase + u.off, u.conv.empty() ? u.src : u.conv.data(), u.bytes,
                          cudaMemcpyHostToDevice),
               "weight upload");
  for (auto& mr : mats) {
    mr.dst->data = m.wbase + ups[mr.data_up].off;
    if (mr.scale_up != SIZE_MAX)
      mr.dst->scale = reinterpret_cast<const float*>(m.wbase + ups[mr.scale_up].off);
  }
  for (auto& [dst, ui] : vecs) *dst = reinterpret_cast<const float*>(m.wbase + ups[ui].off);

  m.allocate_workspaces(wplan, T);
  cublas_check(cublasCreate(&m.blas), "cublasCreate");
  cublas_check(cublasSetStream(m.blas, m.stream), "cublasSetStream");
  cuda_check(cudaMalloc(&m.blas_ws, Impl::kBlasWorkspace), "cuBLAS workspace");
  cublas_check(cublasSetWorkspace(m.blas, m.blas_ws, Impl::kBlasWorkspace), "cublasSetWorkspace");

  cuda_check(cudaEventCreateWithFlags(&m.ev_d2h, cudaEventDisableTiming), "event creation");
  cuda_check(cudaStreamCreateWithFlags(&m.side, cudaStreamNonBlocking), "stream creation");
  cuda_check(cudaEventCreateWithFlags(&m.ev_fork, cudaEventDisableTiming), "event creation");
  cuda_check(cudaEventCreateWithFlags(&m.ev_join, cudaEventDisableTiming), "event creation");
  m.segs = m.segments();
}

CudaModel::~CudaModel() = default;

// Frees whatever was created, also when the constructor threw halfway (impl_ is destroyed then).
CudaModel::Impl::~Impl() {
  if (stream) cudaStreamSynchronize(stream);
  for (auto g : graphs) cudaGraphExecDestroy(g);
  for (auto& [n, gs] : batch_graphs)
    for (auto g : gs) cudaGraphExecDestroy(g);
  if (blas) cublasDestroy(blas);
  if (ev_d2h) cudaEventDestroy(ev_d2h);
  if (ev_fork) cudaEventDestroy(ev_fork);
  if (ev_join) cudaEventDestroy(ev_join);
  if (side) cudaStreamDestroy(side);
  vx_free();
  px_free();
  for (void* r : vx_registered) cudaHostUnregister(r);
  for (auto e : prof_events) cudaEventDestroy(e);
  for (auto e : tr_pool) cudaEventDestroy(e);
  for (const auto& g : tr_spans) {
    cudaEventDestroy(g.a);
    if (g.b != nullptr) cudaEventDestroy(g.b);
  }
  if (tr_ev0) cudaEventDestroy(tr_ev0);
  if (stream) cudaStreamDestroy(stream);
  cudaFree(wbase);
  cudaFree(ws);
  cudaFree(blas_ws);
  cudaFreeHost(pinned);
}

std::string CudaModel::device_name() const { return impl_->name; }

std::string CudaModel::prefill_stream_plan() const {
  return impl_->px_plan;  // written at load (init_expert_cache), before any forward
}

std::string CudaModel::decode_kernels() const {
  const Impl& m = *impl_;
  bool tc = false;
  if (m.cfg.num_attention_heads > 0 && m.cfg.num_key_value_heads > 0) {
    kc::AttentionArgs a;
    a.T = 1;
    a.nh = m.cfg.num_attention_heads;
    a.nkv = m.cfg.num_key_value_heads;
    a.d = m.cfg.head_dim;
    a.kv_f32 = m.kv_f32();
    a.tensor_cores = m.opts.attention_tensor_cores;
    tc = kc::attention_uses_tensor_cores(a);
  }
  return fmt::format(
      "attention on {}, programmatic launch {}, fused norms {}, DeltaNet {}, router {}",
      tc ? "tensor cores" : "CUDA cores", kc::pdl_enabled() ? "on" : "off",
      m.opts.fuse_decode ? "on" : "off",
      m.opts.deltanet_split ? "split (norm in out_proj)" : "block per head",
      m.opts.route_in_gemv ? "in the in-projection's last block"
      : m.opts.side_route  ? "on a side stream"
                           : "in line");
}

std::map<std::string, double> CudaModel::profile_seconds() const { return impl_->prof_seconds; }

std::shared_ptr<DeviceSequenceState> CudaModel::new_state() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto s = std::make_shared<DeviceSequenceState>();
  s->owner = &m;
  s->table.resize(m.layers.size());
  cuda_check(cudaMalloc(reinterpret_cast<void**>(&s->d_table),
                        s->table.size() * sizeof(kc::LayerStateDev)),
             "state table allocation");
  const auto& c = m.cfg;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    if (m.layers[l].type != LayerType::kLinearAttention) continue;
    const size_t cb =
        static_cast<size_t>((c.linear_conv_kernel_dim - 1) * c.linear_conv_channels()) * 4;
    const size_t rb = static_cast<size_t>(c.linear_num_value_heads * c.linear_key_head_dim *
                                          c.linear_value_head_dim) *
                      4;
    auto& t = s->table[l];
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&t.conv), std::max<size_t>(cb, 4)),
               "DeltaNet state");
    s->linear_bytes += cb;
    m.linear_bytes += cb;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&t.recurrent), rb), "DeltaNet state");
    s->linear_bytes += rb;
    m.linear_bytes += rb;
    // On the compute stream (non-blocking: the legacy default stream would not order them).
    cuda_check(cudaMemsetAsync(t.conv, 0, std::max<size_t>(cb, 4), m.stream), "state reset");
    cuda_check(cudaMemsetAsync(t.recurrent, 0, rb, m.stream), "state reset");
  }
  cuda_check(
      cudaMemcpyAsync(s->d_table, s->table.data(), s->table.size() * sizeof(kc::LayerStateDev),
                      cudaMemcpyHostToDevice, m.stream),
      "state table upload");
  cuda_check(cudaStreamSynchronize(m.stream), "state creation");
  return s;
}

uint64_t CudaModel::state_bytes(const DeviceSequenceState& s) {
  return s.kv_bytes + s.linear_bytes;
}

void CudaModel::set_length(SequenceState& state, int64_t n) {
  std::lock_guard lock(impl_->mu);
  impl_->ensure_capacity(*state.device, n + 1);
  state.num_tokens = n;
}

void CudaModel::forward(std::span<const int64_t> ids, SequenceState& state, LogitsMode mode,
                        std::vector<float>& logits, kernels::Executor& ex,
                        ForwardProfile* profile) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  const auto& c = m.cfg;
  const int64_t total = static_cast<int64_t>(ids.size()), H = c.hidden_size, V = c.vocab_size;
  auto& ds = *state.device;
  m.ensure_capacity(ds, state.num_tokens + total);
  if (mode == LogitsMode::kAll)
    logits.resize(static_cast<size_t>(total * V));
  else if (mode == LogitsMode::kLast)
    logits.resize(static_cast<size_t>(V));
  else
    logits.clear();
  if (!m.vx_tried) m.vx_init(ex);
  // Note [Prefill expert streaming]: a prompt streams in chunks as equal as ceil division makes
  // them (no short last one paying a whole pass of copies), when they are at least the threshold
  // long: a 10000-token prompt with 8192-token chunks runs as 5000 + 5000.
  const int64_t nchunks = (total + m.Tmax - 1) / m.Tmax;
  const int64_t even = (total + nchunks - 1) / nchunks;
  const bool stream = m.px_on && even >= std::max<int64_t>(2, m.px_min_tokens);
  const int64_t chunk = stream ? even : m.Tmax;
  for (int64_t c0 = 0; c0 < total; c0 += chunk) {
    const int64_t T = std::min(chunk, total - c0);
    const bool last_chunk = c0 + T == total;
    const LogitsMode cm = mode == LogitsMode::kAll                  ? LogitsMode::kAll
                          : last_chunk && mode == LogitsMode::kLast ? LogitsMode::kLast
                                                                    : LogitsMode::kNone;
    for (int64_t t = 0; t < T; ++t) m.h_ids[t] = static_cast<int32_t>(ids[c0 + t]);
    m.h_step->pos0 = state.num_tokens;
    m.h_step->layers = ds.d_table;
    cuda_check(
        cudaMemcpyAsync(m.d_step, m.h_step, sizeof(kc::StepDev), cudaMemcpyHostToDevice, m.stream),
        "step upload");
    cuda_check(cudaMemcpyAsync(m.ids, m.h_ids, static_cast<size_t>(T) * 4, cudaMemcpyHostToDevice,
                               m.stream),
               "ids upload");
    // Routing control is read once per chunk: the graph, the host's split of the experts and
    // on_route must agree for the whole step.
    m.route_ctl = m.experts && m.routing->active();
    // A streamed chunk (prefill expert streaming) is never captured, even of one token: its
    // layers wait on the host mid-segment.
    const bool use_graph =
        m.opts.graphs && T == 1 && cm == LogitsMode::kLast && !m.route_ctl && !stream;
    m.batched = false;
    m.vx_step = m.vx_on && T == 1;
    m.px_step = stream;
    try {
      m.tr_begin();
      if (m.vx_step) m.vx_begin_step();
      if (m.px_step)  // the first MoE layer's experts, while the layers before it run
        for (size_t l = 0; l < m.layers.size(); ++l)
          if (m.px_moe_index[l] >= 0) {
            m.px_issue(static_cast<int>(l));
            break;
          }
      m.run_segments(T, cm, use_graph ? &m.graphs : nullptr, ex, profile);
      m.tr_end(true);
    } catch (...) {
      m.step_failed();
      m.tr_end(false);
      throw;
    }
    m.vx_end_step();
    if (cm == LogitsMode::kAll) {
      for (int64_t r0 = 0; r0 < T; r0 += m.logits_rows) {
        const int64_t r = std::min(m.logits_rows, T - r0);
        m.linear(m.lm_head, m.xn + r0 * H, H, m.logits, V, r);
        cuda_check(cudaMemcpyAsync(m.h_logits, m.logits, static_cast<size_t>(r * V) * 4,
                                   cudaMemcpyDeviceToHost, m.stream),
                   "logits download");
        cuda_check(cudaStreamSynchronize(m.stream), "forward");
        std::memcpy(logits.data() + (c0 + r0) * V, m.h_logits, static_cast<size_t>(r * V) * 4);
      }
    }
    cuda_check(cudaStreamSynchronize(m.stream), "forward");
    if (m.profiling) m.prof_collect();
    if (cm == LogitsMode::kLast) std::memcpy(logits.data(), m.h_logits, static_cast<size_t>(V) * 4);
    state.num_tokens += T;
  }
}

void CudaModel::Impl::enqueue_segment(size_t s, int64_t T, LogitsMode cm, bool use_graph) {
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size;
  fused = opts.fuse_decode && T == 1 && !batched;
  norm_pending = nullptr;  // a segment never starts with one (left over only by a failed capture)
  side_pending = false;
  if (s == 0) {
    if (profiling && !use_graph)  // host runs ahead, so events time kernels, not launches
      kc::gpu_sleep(int64_t{30} * 1000 * 1000, stream);
    mark("start");
    kc::embed(embed, ids, T, x, stream);
    mark("embedding");
  }
  enqueue_layers(segs[s].first, segs[s].second, T, s == 0);
  if (s + 1 == segs.size()) {
    enqueue_final(T, cm);
    if (cm == LogitsMode::kLast) {
      const int64_t rows = batched ? T : 1;
      linear(lm_head, xn + (T - rows) * H, H, logits, V, rows);
      mark("lm_head");
      cuda_check(cudaMemcpyAsync(h_logits, logits, static_cast<size_t>(rows * V) * 4,
                                 cudaMemcpyDeviceToHost, stream),
                 "logits download");
    }
  }
}

void CudaModel::Impl::run_segments(int64_t T, LogitsMode cm, std::vector<cudaGraphExec_t>* graphs,
                                   kernels::Executor& ex, ForwardProfile* profile) {
  la_layer = -1;  // no prediction carries over from another forward
  if (graphs && graphs->empty()) {
    try {
      for (size_t s = 0; s < segs.size(); ++s) {
        cudaGraph_t g = nullptr;
        cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
        try {
          enqueue_segment(s, T, cm, true);
        } catch (...) {
          try {
            join_side();  // rejoin a forked router, or the capture cannot end
          } catch (...) {
          }
          cudaStreamEndCapture(stream, &g);  // leave capture mode, drop the partial graph
          if (g) cudaGraphDestroy(g);
          cudaGetLastError();
          throw;
        }
        cuda_check(cudaStreamEndCapture(stream, &g), "capture");
        cudaGraphExec_t e = nullptr;
        const cudaError_t ie = cudaGraphInstantiate(&e, g, 0);
        cudaGraphDestroy(g);
        cuda_check(ie, "graph instantiation");
        graphs->push_back(e);
      }
    } catch (...) {
      for (auto e : *graphs) cudaGraphExecDestroy(e);
      graphs->clear();
      throw;
    }
  }
  // Note [Step trace]: while recording (tr_begin), CUDA events around each segment give the GPU
  // track (tr_end adds it).
  StepTrace* tr = tr_step;
  for (size_t s = 0; s < segs.size(); ++s) {
    const int64_t last_layer = static_cast<int64_t>(segs[s].second) - 1;
    const int seg_span = tr_span_begin(stream, "gpu_segment", "gpu", StepTrace::kGpu, last_layer);
    {
      TraceSpan span(tr, "gpu_launch", "gpu", last_layer);
      if (graphs)
        cuda_check(cudaGraphLaunch((*graphs)[s], stream), "graph launch");
      else
        enqueue_segment(s, T, cm, false);
      cuda_check(cudaGetLastError(), "kernel launch");
    }
    tr_span_end(seg_span, stream);
    if (s + 1 < segs.size() &&
        !px_step) {  // routed experts of layer segs[s].second - 1 on the host
      const int64_t layer = last_layer;
      {
        TraceSpan span(tr, "wait_router_ids", "waits", layer);
        cuda_check(cudaEventSynchronize(ev_d2h), "event wait");
      }
      if (route_ctl) routing->on_route(layer, h_rlogits, T, cfg.norm_topk_prob, h_rids, h_w);
      if (vx_step && route_ctl) {
        // The host may have rewritten the ids: the cached experts run from its ids, uploaded
        // now, beside the host's experts (no graphs under routing control, so this is eager).
        const int64_t k = cfg.num_experts_per_tok;
        cuda_check(cudaMemcpyAsync(rids, h_rids, static_cast<size_t>(T * k) * 4,
                                   cudaMemcpyHostToDevice, stream),
                   "copy to device");
        cuda_check(cudaMemcpyAsync(rw, h_w, static_cast<size_t>(T * k) * 4, cudaMemcpyHostToDevice,
                                   stream),
                   "copy to device");
        cached_experts(layer);
      }
      if (vx_step && !route_ctl && vx_pf > 0 && T == 1) {
        TraceSpan pspan(tr, "prefetch", "cpu_experts", layer);
        vx_prefetch_after(layer, ex);
      }
      TraceSpan span(tr, "routed_experts", "cpu_experts", layer);
      const auto t0 = std::chrono::steady_clock::now();
      host_experts(layer, T, ex);
      if (routing->lookahead()) lookahead_after(layer, T, ex);
      if (profile)
        profile->routed_experts +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }
}

void CudaModel::set_trace(StepTrace* trace) { impl_->trace = trace; }

void CudaModel::reserve(SequenceState& state, int64_t tokens) {
  std::lock_guard lock(impl_->mu);
  impl_->ensure_capacity(*state.device, tokens);
}

int64_t CudaModel::max_batch() const { return impl_->max_batch; }

void CudaModel::forward_batch(std::span<SequenceState* const> states, std::span<const int64_t> ids,
                              std::vector<float>& logits, kernels::Executor& ex,
                              ForwardProfile* profile) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  // First: it may plan the workspaces and staging again (Note [Measuring the stream threshold]).
  if (!m.vx_tried) m.vx_init(ex);
  const int64_t B = static_cast<int64_t>(ids.size()), V = m.cfg.vocab_size;
  TIDAL_CHECK(B >= 1 && B <= m.max_batch, InvalidArgument,
              "a batch of {} sequences (this model takes 1 to {} per step on the GPU)", B,
              m.max_batch);
  for (auto* st : states) m.ensure_capacity(*st->device, st->num_tokens + 1);
  for (int64_t r = 0; r < B; ++r) {
    m.h_ids[r] = static_cast<int32_t>(ids[r]);
    m.h_step[r].pos0 = states[r]->num_tokens;
    m.h_step[r].layers = states[r]->device->d_table;
  }
  cuda_check(cudaMemcpyAsync(m.d_step, m.h_step, static_cast<size_t>(B) * sizeof(kc::StepDev),
                             cudaMemcpyHostToDevice, m.stream),
             "step upload");
  cuda_check(
      cudaMemcpyAsync(m.ids, m.h_ids, static_cast<size_t>(B) * 4, cudaMemcpyHostToDevice, m.stream),
      "ids upload");
  m.route_ctl = m.experts && m.routing->active();  // read once: see forward()
  const bool use_graph = m.opts.graphs && !m.route_ctl;
  m.batched = B > 1;  // one row: the ordinary decode step (and its graphs)
  std::vector<cudaGraphExec_t>* graphs = !use_graph ? nullptr
                                         : B == 1   ? &m.graphs
                                                    : &m.batch_graphs[B];
  m.vx_step = m.vx_on && B == 1;
  m.px_step = false;
  try {
    m.tr_begin();
    if (m.vx_step) m.vx_begin_step();
    m.run_segments(B, LogitsMode::kLast, graphs, ex, profile);
    m.tr_end(true);
  } catch (...) {
    m.batched = false;
    m.step_failed();
    m.tr_end(false);
    throw;
  }
  m.vx_end_step();
  m.batched = false;
  cuda_check(cudaStreamSynchronize(m.stream), "forward");
  if (m.profiling) m.prof_collect();
  logits.resize(static_cast<size_t>(B * V));
  std::memcpy(logits.data(), m.h_logits, static_cast<size_t>(B * V) * 4);
  for (auto* st : states) st->num_tokens += 1;
}

void CudaModel::download_linear_states(const SequenceState& state,
                                       std::vector<std::vector<float>>& conv,
                                       std::vector<std::vector<float>>& rec) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  const auto& c = m.cfg;
  conv.assign(m.layers.size(), {});
  rec.assign(m.layers.size(), {});
  for (size_t l = 0; l < m.layers.size(); ++l) {
    if (m.layers[l].type != LayerType::kLinearAttention) continue;
    conv[l].resize(static_cast<size_t>((c.linear_conv_kernel_dim - 1) * c.linear_conv_channels()));
    rec[l].resize(static_cast<size_t>(c.linear_num_value_heads * c.linear_key_head_dim *
                                      c.linear_value_head_dim));
    const auto& t = state.device->table[l];
    cuda_check(cudaMemcpyAsync(conv[l].data(), t.conv, conv[l].size() * 4, cudaMemcpyDeviceToHost,
                               m.stream),
               "state download");
    cuda_check(cudaMemcpyAsync(rec[l].data(), t.recurrent, rec[l].size() * 4,
                               cudaMemcpyDeviceToHost, m.stream),
               "state download");
    cuda_check(cudaStreamSynchronize(m.stream), "state download");
  }
}

void CudaModel::upload_linear_states(SequenceState& state,
                                     const std::vector<std::vector<float>>* conv,
                                     const std::vector<std::vector<float>>* rec) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  const auto& c = m.cfg;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    if (m.layers[l].type != LayerType::kLinearAttention) continue;
    const auto& t = state.device->table[l];
    const size_t cb =
        static_cast<size_t>((c.linear_conv_kernel_dim - 1) * c.linear_conv_channels()) * 4;
    const size_t rb = static_cast<size_t>(c.linear_num_value_heads * c.linear_key_head_dim *
                                          c.linear_value_head_dim) *
                      4;
    if (conv)
      cuda_check(cudaMemcpyAsync(t.conv, (*conv)[l].data(), cb, cudaMemcpyHostToDevice, m.stream),
                 "state upload");
    else
      cuda_check(cudaMemsetAsync(t.conv, 0, cb, m.stream), "state reset");
    if (rec)
      cuda_check(
          cudaMemcpyAsync(t.recurrent, (*rec)[l].data(), rb, cudaMemcpyHostToDevice, m.stream),
          "state upload");
    else
      cuda_check(cudaMemsetAsync(t.recurrent, 0, rb, m.stream), "state reset");
    cuda_check(cudaStreamSynchronize(m.stream), "state upload");  // the host vectors may go away
  }
}

void CudaModel::init_expert_cache(kernels::Executor& ex) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  if (!m.vx_tried) m.vx_init(ex);
}

GpuExpertCacheStats CudaModel::expert_cache_stats() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.vx_mu);  // not mu: a forward holds that for its whole step
  return m.vx_stats;
}

void CudaModel::reset_expert_cache_stats() {
  Impl& m = *impl_;
  std::lock_guard lock(m.vx_mu);
  m.vx_stats.gpu_pairs = m.vx_stats.cpu_pairs = m.vx_stats.fills = 0;
  m.vx_stats.bytes_in = 0;
  m.vx_stats.prefetched = m.vx_stats.prefetch_hits = 0;
  m.vx_stats.stream_layers = m.vx_stats.stream_pairs = m.vx_stats.stream_padded_groups = 0;
  m.vx_stats.stream_bytes = 0;
  std::fill(m.vx_stats.layer_gpu_pairs.begin(), m.vx_stats.layer_gpu_pairs.end(), 0);
  std::fill(m.vx_stats.layer_cpu_pairs.begin(), m.vx_stats.layer_cpu_pairs.end(), 0);
  std::fill(m.vx_stats.layer_fills.begin(), m.vx_stats.layer_fills.end(), 0);
  std::fill(m.vx_stats.layer_evictions.begin(), m.vx_stats.layer_evictions.end(), 0);
}

GpuMemoryReport CudaModel::memory_report() const {
  const Impl& m = *impl_;
  GpuMemoryReport r;
  r.device = m.name;
  r.weights = m.weight_bytes;
  r.weights_bf16_equivalent = m.weight_bf16_bytes;
  r.kv_cache = m.kv_bytes;
  r.deltanet_state = m.linear_bytes;
  r.workspaces = m.ws_bytes + m.px_bytes;
  r.expert_cache = m.vx_bytes;
  size_t f = 0, t = 0;
  cudaMemGetInfo(&f, &t);
  r.free = f;
  r.total = t;
  r.limit = m.opts.memory_limit;
  return r;
}

}  // namespace tidal::core
