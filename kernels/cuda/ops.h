// SPDX-License-Identifier: Apache-2.0
/// \file ops.h
/// \brief CUDA kernels of the GPU-pinned layers (norms, projections, attention, Gated DeltaNet,
/// router). Launchers enqueue on a stream and never synchronise; fp32 activations, BF16 / F32 /
/// INT8 (per-row scale) weights, BF16 KV cache, fp32 DeltaNet state. CPU references:
/// kernels/cpu/*. This header is plain C++17 (it is included from .cu and .cpp files).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace tidal::kernels::cuda {

/// Weight formats on the GPU.
enum class WFormat : uint8_t { kF32, kBF16, kI8 };

/// A `[rows, cols]` row-major weight in device memory. kI8: `scale` holds one fp32 per row
/// (weight-only symmetric quantisation, w = q · scale[row]).
struct DevMatrix {
  const void* data = nullptr;
  const float* scale = nullptr;
  WFormat format = WFormat::kBF16;
  int64_t rows = 0, cols = 0;
  size_t bytes() const;
};

/// Programmatic dependent launch (Note [programmatic dependent launch] in ops.cu) for later
/// launches: on where the device and the build have it (sm_90+), unless TIDAL_CUDA_PDL=0;
/// `set_pdl_enabled` switches it. Graphs keep what they were captured with.
bool pdl_enabled();
void set_pdl_enabled(bool on);

/// One kernel's stamp (Note [Kernel stamps] in ops.cu): %globaltimer when block 0 reached the
/// dependency wait and when the wait released it, the grid's blocks and threads per block, and
/// the kernel's name (__func__, cut to 47 characters).
struct KernelStamp {
  unsigned long long entry_ns = 0, release_ns = 0;
  /// Points inside the kernel that it marks itself (stamp_mark; 0: not marked): the delta rule and
  /// the split merge mark their stages (Note [Kernel stamps]).
  unsigned long long mark_ns[3] = {};
  unsigned blocks = 0, threads = 0;
  char name[48] = {};
};
/// Turns stamps on for up to `capacity` kernels (a device buffer; the count restarts at zero).
/// Every kernel launched after this (graph replays included) records one until `stamps_end`.
/// Throws std::runtime_error on a CUDA error.
void stamps_begin(int capacity);
/// Synchronises the device, turns stamps off and returns them in release order (at most the
/// capacity; the rest were dropped). Empty when stamps were not on.
std::vector<KernelStamp> stamps_end();
/// The one-token delta rule and the split-attention merge with every load issued up front (Note
/// [early loads] in ops.cu; bit-identical). Default from TIDAL_CUDA_EARLY_LOADS (unset: off).
/// Read when a kernel is launched: graphs captured before a change keep what they captured.
void set_early_loads(bool on);
bool early_loads();
/// The delta rule over a prompt: 0 the staged token-by-token kernel, 1 the one-pass chunked
/// kernel (Note [chunked delta rule]), 2 the two-pass chunked form (Note [two-pass chunked delta
/// rule]; the default: 20% faster end to end at 8K tokens than the staged kernel). Default from
/// TIDAL_CUDA_DELTA_CHUNKED (unset: 2).
void set_delta_rule_mode(int mode);
int delta_rule_mode();

/// Rows of activations the GEMV kernel takes at once; more rows go to cuBLAS (gemm.h).
constexpr int64_t kMaxGemvRows = 8;

/// The GEMVs read their weights before waiting for the kernel before them (Note [programmatic
/// dependent launch]): a weight written by the immediately preceding kernel on the stream (a
/// dequantised scratch copy, say) needs a plain launch or an event in between.
/// y(m, n) [+]= x(m, k) · Wᵀ for m ≤ kMaxGemvRows: fp32 activations, fp32 accumulation, the weight
/// read once (the decode projection; bandwidth bound). With `x_up`, the input is
/// silu(x) ⊙ x_up (the SwiGLU product fused into the down projection; same row stride).
/// `out_gate`: each output row m is scaled by sigmoid(out_gate[m · ld_gate]) before it is stored
/// or added (the shared expert's gate, with `accumulate` its residual add).
void gemv(const DevMatrix& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t m,
          bool accumulate, cudaStream_t s, const float* x_up = nullptr,
          const float* out_gate = nullptr, int64_t ld_gate = 0);
/// y [+]= W · (rms_norm(x) ⊙ norm_w) for one row x of w.cols values (⊙ (1 + norm_w) when
/// `zero_centred`): the RMSNorm folded into the projection that consumes it (Note [norm inside
/// the GEMV] in ops.cu), so the normalised row is never written.
void gemv_rms_norm(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                   bool zero_centred, float* y, bool accumulate, cudaStream_t s);
/// y [+]= W · gated_norm(o, z) for one row o of w.cols values: each group of `group` values is
/// RMS-normalised, times norm_w (`group` values) and silu(z) (the DeltaNet output norm, model-spec
/// §3.4, as rms_norm_gated), applied while the streaming GEMV stages its input row (Note
/// [streaming GEMV] in ops.cu), so the delta rule need not hold a whole value head per block.
/// Returns false, launching nothing, where the streaming GEMV does not take the shape (the caller
/// runs rms_norm_gated, then gemv).
bool gemv_gated_norm(const DevMatrix& w, const float* o, const float* z, const float* norm_w,
                     int64_t group, float eps, float* y, bool accumulate, cudaStream_t s);

/// The DeltaNet decode step's per-channel work, applied by the in-projection's GEMV to the rows it
/// produces (Note [DeltaNet conv in the GEMV] in ops.cu), for the [qkv | z | b | a] row layout of
/// qwen3_5_moe: rows c < C are conv channels, y[c] = silu(Σ_j conv_w[c, j] · window_j) over the
/// layer's conv state and the new value, and the state shifts by one; rows ba_row + h (h < nv) are
/// beta = sigmoid(b); rows ba_row + nv + h are g = −exp(A_log[h]) · softplus(a + dt_bias[h]); the
/// z rows between stay as they are. q and k come out unnormalised (the delta rule's `l2norm_qk`).
struct StepDev;
struct GdnConvEpilogue {
  const float* conv_w = nullptr;  ///< (C, K)
  const StepDev* step = nullptr;  ///< the conv state: step->layers[layer].conv, (K − 1, C)
  int layer = 0;
  int64_t C = 0, K = 0;
  int64_t ba_row = 0, nv = 0;
  const float* A_log = nullptr;
  const float* dt_bias = nullptr;
};
/// y = W · x' with the epilogue above, one row, where x' = rms_norm(x) ⊙ norm_w (⊙ (1 + norm_w)
/// when `zero_centred`) or x itself when norm_w is null. Returns false, launching nothing, where
/// the streaming GEMV does not take the shape or K > 16 (the caller runs the GEMV, then
/// gdn_conv_prep_step). Reads the conv state before the programmatic-launch wait, as
/// gdn_conv_prep_step does.
bool gemv_gdn_in(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                 bool zero_centred, float* y, const GdnConvEpilogue& e, cudaStream_t s);

/// The router's top-k run by the MoE in-projection's streaming GEMV (Note [Router in the MoE
/// in-projection] in ops.cu): over its output's first E values, k ids and weights (renormalised
/// when `renorm`). `sync`: a counter that is zero between launches (the caller zeroes it once).
struct RouteTail {
  int64_t E = 0, k = 0;
  bool renorm = false;
  int32_t* ids = nullptr;
  float* weights = nullptr;
  unsigned* sync = nullptr;
};
/// y = W · x' for one row, x' = rms_norm(x) ⊙ norm_w (⊙ (1 + norm_w) when `zero_centred`) or x
/// when norm_w is null, then moe_route over y[0, r.E) in the same launch (the block that finishes
/// last routes). Returns false, launching nothing, where the streaming GEMV does not take the
/// shape, r.E > 1024, r.k > min(32, E) or W has fewer than E rows; the caller then runs the GEMV
/// and moe_route.
bool gemv_route(const DevMatrix& w, const float* x, const float* norm_w, float eps,
                bool zero_centred, float* y, const RouteTail& r, cudaStream_t s);

/// hi = BF16(x), lo = BF16(x − hi): x = hi + lo to ~16 significant bits, so a BF16 GEMM on each
/// half (summed) gives near-fp32 products against BF16 weights (gpu_precision="bf16x2").
void f32_to_bf16_split(const float* x, int64_t ldx, uint16_t* hi, uint16_t* lo, int64_t rows,
                       int64_t cols, cudaStream_t s);
/// dst = W as BF16 (kF32 rounded, kI8 dequantised) or as F32; for the cuBLAS prefill path.
void weight_to_bf16(const DevMatrix& w, uint16_t* dst, cudaStream_t s);
void weight_to_f32(const DevMatrix& w, float* dst, cudaStream_t s);
/// y (rows, cols) = BF16(x) with row strides; round to nearest even.
void f32_to_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t rows, int64_t cols,
                 cudaStream_t s);

/// out (T, H) = table[ids[t]] in fp32 (any WFormat).
void embed(const DevMatrix& table, const int32_t* ids, int64_t T, float* out, cudaStream_t s);

/// y = rms_norm(x) · w (plain) or · (1 + w) (zero_centred), one row of `dim` per row.
void rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows,
              int64_t dim, float eps, bool zero_centred, cudaStream_t s);
/// x += y + sigmoid(gate[t · ld_gate]) · hs, then xn = rms_norm(x): the residual add (and the gated
/// shared expert) fused with the next norm. y and hs may be null.
void add_rms_norm(float* x, const float* y, const float* w, float* xn, int64_t rows, int64_t dim,
                  float eps, bool zero_centred, cudaStream_t s, const float* hs = nullptr,
                  const float* gate = nullptr, int64_t ld_gate = 0);
/// h (T, I) = silu(g) ⊙ u, with g and u of row stride ld (g and u may be halves of one buffer).
void silu_mul(const float* g, const float* u, int64_t ld, float* h, int64_t T, int64_t I,
              cudaStream_t s);
/// Where a sequence's state lives on the GPU, one entry per layer (unused pointers null). Kept in
/// device memory and read by the kernels, so a captured CUDA graph serves any sequence and any
/// position: the host rewrites this block before each replay, never the graph.
struct LayerStateDev {
  void* k_cache = nullptr;  ///< (capacity, num_kv_heads, head_dim), BF16 (or fp32: kv_f32)
  void* v_cache = nullptr;
  float* conv = nullptr;       ///< (K − 1, channels)
  float* recurrent = nullptr;  ///< (num_v_heads, d_k, d_v)
};
struct StepDev {
  int64_t pos0 = 0;  ///< tokens already in the sequence
  LayerStateDev* layers = nullptr;
};

/// Attention input prep, one block per (token, head): q heads get q_norm and RoPE (into q, (T,
/// nh, d)) and, when `gated`, their gate half copied to gate (T, nh·d); k heads get k_norm and
/// RoPE, v heads are copied, both written as BF16 into the KV cache of `layer` at pos0 + t.
struct AttnPrepArgs {
  const float* qg = nullptr;  ///< q_proj output (T, nh·d·(gated ? 2 : 1)), [q_h | gate_h] per head
  const float* k = nullptr;   ///< (T, nkv·d)
  const float* v = nullptr;
  int64_t ld = 0;  ///< row stride of qg, k and v (0: each contiguous); one stacked q|k|v output
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* inv_freq = nullptr;  ///< rotary_dim / 2 frequencies
  float rope_scale = 1.0f;          ///< attention_factor of YaRN (1 otherwise)
  float* q = nullptr;
  float* gate = nullptr;
  const StepDev* step = nullptr;
  int layer = 0;
  int64_t T = 0, nh = 0, nkv = 0, d = 0, rotary_dim = 0;
  float eps = 1e-6f;
  bool zero_centred = false, gated = false;
  bool kv_f32 = false;  ///< the cache holds fp32 (gpu_precision="fp32") instead of BF16
};
void attn_prep(const AttnPrepArgs& a, cudaStream_t s);

/// Causal GQA attention of T new tokens (positions pos0..pos0+T−1) over the BF16 KV cache of
/// `layer`, flash style (online softmax, fp32), split over the keys into at most `max_splits`
/// parts that a second kernel combines; the combine applies the sigmoid output gate when given.
/// A prompt chunk with enough rows runs on tensor cores in one kernel instead, without splits
/// (Note [tensor-core prefill attention] in ops.cu).
/// `partial` is workspace of attention_workspace_floats(T, nh, d, max_splits) floats.
struct AttentionArgs {
  const float* q = nullptr;     ///< (T, nh, d)
  const float* gate = nullptr;  ///< (T, nh·d) or null
  float* out = nullptr;         ///< (T, nh·d)
  float* partial = nullptr;
  const StepDev* step = nullptr;
  int layer = 0;
  int64_t T = 0, nh = 0, nkv = 0, d = 0;
  int max_splits = 1;
  float scale = 1.0f;
  bool kv_f32 = false;
  /// One-token decode over a BF16 cache on tensor cores where it applies (head_dim 64/128/256,
  /// GQA group ≤ 16; Note [tensor-core decode attention]); false: the SIMT kernels (tests and
  /// the benchmark compare the two).
  bool tensor_cores = true;
  /// Keys a split covers at least (tensor-core and tile kernels); 0: TIDAL_ATTN_MIN_SPLIT_KEYS or
  /// 64.
  int64_t min_split_keys = 0;
  /// One-token decode where the tensor-core kernel runs (attention_uses_tensor_cores): q's norm
  /// and RoPE and the new key/value's cache write done by the attention kernel itself from
  /// `prep` (its qg/k/v, norm, RoPE and step fields; prep.q and prep.gate are not written, the
  /// combine reads the gate from qg) instead of attn_prep (Note [attention prep in the decode
  /// kernel] in ops.cu).
  bool fused_prep = false;
  AttnPrepArgs prep;
};
void attention(const AttentionArgs& a, cudaStream_t s);
/// Whether `attention(a)` runs a tensor-core kernel: the decode kernel (T = 1) or the prefill
/// kernel (T ≥ 2, GQA group dividing 64, T·nh·d ≥ 65536); tests check which kernel they test.
bool attention_uses_tensor_cores(const AttentionArgs& a);
size_t attention_workspace_floats(int64_t T, int64_t nh, int64_t d, int max_splits);
/// The split count used for T tokens (enough blocks to fill `sm_count` SMs); `per_sm` > 0
/// overrides the splits per SM (benchmark sweeps).
int attention_max_splits(int64_t T, int64_t nkv, int sm_count, int per_sm = 0);

/// qwen3_next's interleaved projections to the flat layout of qwen3_5_moe: p (T, nk·(2dk+2ρdv))
/// and ba (T, 2nv) -> mixed (T, C), z (T, nv·dv), b (T, nv), a (T, nv).
void gdn_split_next(const float* p, const float* ba, int64_t ld, float* mixed, float* z, float* b,
                    float* a, int64_t T, int64_t nk, int64_t nv, int64_t dk, int64_t dv,
                    cudaStream_t s);

/// Causal depthwise conv1d over T tokens with the (K − 1)-token history of layer `layer` (updated),
/// then SiLU: dst (T, C).
void causal_conv1d_silu(const float* src, int64_t ld_src, int64_t T, int64_t C, int64_t K,
                        const float* weight, const StepDev* step, int layer, float* dst,
                        cudaStream_t s);

/// From the conv output u (T, C): q, k (T, nk, dk) L2-normalised (q also × dk^−½), v (T, nv, dv);
/// beta = sigmoid(b), g = −exp(A_log) · softplus(a + dt_bias) (T, nv).
void gdn_prep(const float* u, const float* b, const float* a, int64_t ld_ba, const float* A_log,
              const float* dt_bias, float* q, float* k, float* v, float* beta, float* g, int64_t T,
              int64_t nk, int64_t nv, int64_t dk, int64_t dv, cudaStream_t s);

/// Decode step (T = 1) of causal_conv1d_silu + gdn_prep in one kernel (block per head); b and a
/// are (nv) vectors. `rows` > 1: batched decode, row r is its own sequence (state step[r]) with
/// src, b and a at row strides ld_src, ld_ba and outputs packed by row.
/// Reads the layer's state before the programmatic-launch wait (Note [programmatic dependent
/// launch]): the kernel just before it on the stream must not write that state (run another
/// kernel, a copy or a sync in between, as a forward always does).
void gdn_conv_prep_step(const float* src, const float* conv_w, const StepDev* step, int layer,
                        int64_t K, const float* b, const float* a, const float* A_log,
                        const float* dt_bias, float* q, float* k, float* v, float* beta, float* g,
                        int64_t nk, int64_t nv, int64_t dk, int64_t dv, cudaStream_t s,
                        int64_t rows = 1, int64_t ld_src = 0, int64_t ld_ba = 0);

/// delta_rule with the gated output norm fused (block per value head): out = w · rms_norm(o) ·
/// silu(z), z row t at z + t · ld_z. False (nothing launched) when a head does not fit one block.
/// `rows` > 1: that many sequences of T tokens each, packed one after the other (state step[r]).
/// Reads the layer's state before the programmatic-launch wait (Note [programmatic dependent
/// launch]): the kernel just before it on the stream must not write that state (run another
/// kernel, a copy or a sync in between, as a forward always does).
bool delta_rule_normed(const float* q, const float* k, const float* v, const float* g,
                       const float* beta, const StepDev* step, int layer, const float* z,
                       int64_t ld_z, const float* w, float eps, float* out, int64_t T, int64_t nk,
                       int64_t nv, int64_t dk, int64_t dv, cudaStream_t s, int64_t rows = 1,
                       bool l2norm_qk = false);

/// Gated delta rule over T tokens on the fp32 state of `layer` (model-spec §3.4), token by token
/// with the state in registers: out (T, nv, dv); T ≥ 2 runs the mode of set_delta_rule_mode: the
/// two-pass chunked form where delta_rule_two_pass_applies, else the tokens staged in chunks
/// through shared memory (Note [delta rule over a prompt] in ops.cu); mode 1 the one-pass chunked
/// kernel (Note [chunked delta rule]). d_k and d_v ≤ 256, multiples of 16.
/// `rows` > 1: that many sequences of T tokens each, packed one after the other (state step[r]).
/// `l2norm_qk`: q and k are raw conv outputs (gemv_gdn_in), L2-normalised here (q also scaled by
/// 1/sqrt(d_k)), as gdn_conv_prep_step would; the same flag on delta_rule_normed.
/// Reads the layer's state before the programmatic-launch wait (Note [programmatic dependent
/// launch]): the kernel just before it on the stream must not write that state (run another
/// kernel, a copy or a sync in between, as a forward always does).
/// `scratch` (`scratch_bytes`): device memory the two-pass chunked form may use (Note [two-pass
/// chunked delta rule]; set_delta_rule_mode(2)): the prompt runs in ranges whose scratch fits
/// (delta_rule_scratch_bytes per range); without it, or for one token, the kernels above run.
void delta_rule(const float* q, const float* k, const float* v, const float* g, const float* beta,
                const StepDev* step, int layer, float* out, int64_t T, int64_t nk, int64_t nv,
                int64_t dk, int64_t dv, cudaStream_t s, int64_t rows = 1, bool l2norm_qk = false,
                float* scratch = nullptr, size_t scratch_bytes = 0);
/// Scratch bytes for a range of T tokens of the two-pass chunked delta rule.
size_t delta_rule_scratch_bytes(int64_t T, int64_t nv, int64_t dk, int64_t dv);
/// Whether delta_rule in mode 2 runs the two-pass form for this call: T ≥ 2, one sequence, d_v a
/// multiple of 32 and d_k of 8 (both ≤ 256), 16-byte aligned scratch for at least one chunk (it
/// must not alias the inputs or `out`), and shared memory the device can give. Else: staged.
bool delta_rule_two_pass_applies(int64_t T, int64_t rows, int64_t nk, int64_t nv, int64_t dk,
                                 int64_t dv, const void* scratch, size_t scratch_bytes);

/// y = w · rms_norm(x) · silu(z), rows of dim (the DeltaNet output norm).
/// z row r sits at z + (r / rows_per_token) · ld_z + (r % rows_per_token) · dim.
void rms_norm_gated(const float* x, const float* z, int64_t ld_z, int64_t rows_per_token,
                    const float* w, float* y, int64_t rows, int64_t dim, float eps, cudaStream_t s);

/// Router: softmax over E logits per token, top-k (ties to the lower id), optional renormalisation.
/// ids (T, k), weights (T, k). E ≤ 1024, k ≤ 16.
void moe_route(const float* logits, int64_t ld, int64_t T, int64_t E, int64_t k, bool renormalise,
               int32_t* ids, float* weights, cudaStream_t s);

/// Keeps the stream busy for about `ns` nanoseconds (profiling: lets the host queue the work behind
/// it, so events between kernels time the GPU, not the launches).
void gpu_sleep(int64_t ns, cudaStream_t s);

/// Reads `bytes` (a multiple of 16) with 16-byte loads over `blocks` blocks and folds them into
/// *sink: the HBM read-bandwidth probe of the benchmarks.
void read_probe(const void* p, size_t bytes, unsigned* sink, int blocks, cudaStream_t s);

}  // namespace tidal::kernels::cuda
