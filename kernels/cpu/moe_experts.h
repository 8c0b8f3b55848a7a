// SPDX-License-Identifier: Apache-2.0
/// \file moe_experts.h
/// \brief The fused routed-expert op of one MoE layer on the CPU:
/// dst[t] += Σ_i w[t,i] · down_e( silu(gate_e x_t) ⊙ up_e x_t ), e = ids[t,i], over packed
/// experts, all experts of the layer as one parallel job.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/executor.h"
#include "kernels/cpu/expert_gemm.h"

namespace tidal::kernels::cpu {

/// The packed matrices of one expert: gate and up `[I, H]` (layout `gate_up`), down `[H, I]`.
struct PackedExpert {
  const uint8_t* gate = nullptr;
  const uint8_t* up = nullptr;
  const uint8_t* down = nullptr;
};

struct MoeExpertsArgs {
  const PackedLayout* gate_up = nullptr;  ///< layout of gate/up: n = I, k = H
  const PackedLayout* down = nullptr;     ///< layout of down: n = H, k = I
  const PackedExpert* experts = nullptr;  ///< [num_experts]
  int64_t num_experts = 0;
  const float* src = nullptr;  ///< (m, H), row stride ld_src
  int64_t ld_src = 0;
  int64_t m = 0;                   ///< tokens
  const int32_t* ids = nullptr;    ///< (m, top_k) expert ids in [0, num_experts)
  const float* weights = nullptr;  ///< (m, top_k) router weights
  int64_t top_k = 0;
  float* dst = nullptr;  ///< (m, H), row stride ld_dst; accumulated into
  int64_t ld_dst = 0;
  /// NUMA nodes the experts are placed over, in contiguous expert ranges (expert_numa_node); the
  /// executor's share i runs on its node_of_share(i). 1: no placement. Note [NUMA expert
  /// placement] in moe_experts.cpp.
  int numa_nodes = 1;
};

/// Note [NUMA expert placement]: the node of expert e of E over `nodes` nodes (contiguous
/// ranges: node n holds experts [first_expert_of_node(n), first_expert_of_node(n + 1))).
inline int expert_numa_node(int64_t e, int64_t E, int nodes) {
  return nodes <= 1 || E <= 0 ? 0 : static_cast<int>(e * nodes / E);
}
inline int64_t first_expert_of_node(int n, int64_t E, int nodes) {
  return nodes <= 1 ? (n <= 0 ? 0 : E) : (static_cast<int64_t>(n) * E + nodes - 1) / nodes;
}

/// One contiguous share of work items per thread, items laid out node-major (Note [NUMA expert
/// placement]): set() takes the node of each share (allocates); split() then gives share i an
/// even part of its node's items, in share order, without allocating. With one node it is the
/// plain even split; where a node with items has no share, too.
class NumaShares {
 public:
  /// `share_node[i]` in [0, nodes) (other values count as node 0).
  void set(const int* share_node, int shares, int nodes);
  /// `node_begin`: nodes + 1 offsets (node n's items are [node_begin[n], node_begin[n + 1]));
  /// writes share i's [begin, end) to out[2i], out[2i + 1].
  void split(const int64_t* node_begin, int64_t* out) const;
  int shares() const { return static_cast<int>(node_.size()); }
  int nodes() const { return static_cast<int>(count_.size()); }
  int node(int i) const { return node_[static_cast<size_t>(i)]; }

 private:
  std::vector<int> node_, rank_, count_;
};

/// The op with its workspace (reused across calls: after the largest call nothing is allocated).
/// Not thread-safe: one instance per concurrent caller.
class MoeExperts {
 public:
  /// `isa`: highest ISA its kernels may use (resolve_isa()).
  explicit MoeExperts(Isa isa) : isa_(isa) {}

  /// Runs the op. Each token's expert outputs are added in ascending expert id, so results do
  /// not depend on the thread count. Throws std::invalid_argument for an expert id out of range.
  void run(const MoeExpertsArgs& args, Executor& ex);

  Isa isa() const { return isa_; }
  /// Lets run() pick approximate variants (AMX BF16, Note [AMX BF16 is opt-in]): `on` allows the
  /// hi + lo split. Default: the TIDAL_EXPERT_AMX_BF16 environment variable (0, 1/split, bf16).
  void set_allow_approximate(bool on) {
    approximation_ = on ? Approximation::kSplit : Approximation::kExact;
  }
  /// The most approximate variant run() may pick.
  void set_approximation(Approximation a) { approximation_ = a; }
  /// Phase 2 runs per expert into slot-major outputs up to this many (slot, column) outputs, per
  /// column block above (tests set it to cover both schedules).
  void set_slot_major_limit(int64_t outputs) { slot_major_limit_ = outputs; }
  void set_isa(Isa isa) { isa_ = isa; }
  /// Decode as one job with a per-expert hand-off between the phases where the executor allows
  /// (Note [Per-expert hand-off]). Default: on unless TIDAL_EXPERT_DATAFLOW=0.
  void set_dataflow(bool on) { dataflow_ = on; }
  /// Whether the last run took the hand-off path.
  bool last_dataflow() const { return used_dataflow_; }
  /// Hand-off phase 2: 16-row tiles of H per work item (2, 4, 8 or 16; other values are rounded
  /// down to one of those, 2 at least). Default: TIDAL_EXPERT_DOWN_TILES, else 8.
  void set_down_tiles(int tiles);
  int down_tiles() const { return down_tiles_; }
  /// Prefill phase 2 (Note [Prefill down: the next expert ahead]): on (the default unless
  /// TIDAL_EXPERT_PREFILL_AHEAD=0), while a task adds one expert's down products into dst it
  /// prefetches into L2 the next expert's down tiles of the task's columns and its activation
  /// rows.
  void set_prefill_ahead(bool on) { prefill_ahead_ = on; }
  /// Prefill phase 2: tile pairs of H per task; 0 (the default unless
  /// TIDAL_EXPERT_PREFILL_PAIRS is set) picks one block per thread, ceil(pairs / threads).
  void set_prefill_pairs(int pairs) { prefill_pairs_ = pairs < 0 ? 0 : pairs; }
  /// Items the last hand-off run took from other threads' shares. An item counts once per move
  /// (Note [Stealing half a share]), so one moved on from a thief's range counts twice.
  int64_t last_stolen() const;
  /// Of those, the items taken from shares on another NUMA node (Note [NUMA expert placement]);
  /// an item moved on from a thief's range counts by the node of that thief.
  int64_t last_remote_stolen() const;
  /// Hand-off setup (Note [A call's setup leaves the workers' lines alone]): on (the default
  /// unless TIDAL_EXPERT_LOCAL_SETUP=0), the caller writes no counter, flag or range that the
  /// workers used in the last call; off, it resets them all before the job (for comparison).
  void set_local_setup(bool on) { local_setup_ = on; }
  /// Hand-off (Note [Phase 2's first lines]): on (the default unless TIDAL_EXPERT_DOWN_AHEAD=0),
  /// a thread asks L2 for the first lines of its first phase 2 item and of every range it
  /// steals, and for the item's weights while it waits for the expert's h.
  void set_down_ahead(bool on) { down_ahead_ = on; }
  /// One-token calls (Note [The token's row ahead]): on (off by default; TIDAL_EXPERT_ROW_AHEAD=1),
  /// run() first asks for the token's input row and, for writing, the ring row it will prepare.
  void set_row_ahead(bool on) { row_ahead_ = on; }
  /// Advances the op's count of hand-off calls by n, as n declined calls would (for tests: a work
  /// range's 16-bit call tag comes round every 65535 calls; Note [A call's setup leaves the
  /// workers' lines alone]).
  void skip_calls(int64_t n) { epoch_ += n; }
  /// The item shares of the last hand-off run: [phase][thread][begin, end) (4 × threads values).
  const std::vector<int64_t>& last_share_items() const { return share_items_; }
  /// A one-token call reads the token's row in place (Note [One token reads its own row]).
  /// Default: on unless TIDAL_EXPERT_OWN_ROW=0.
  void set_own_row(bool on) { own_row_ = on; }
  /// Names of the tile kernels the last run used (e.g. "avx512_vnni_int4+amx_int4").
  std::string last_variants() const;
  /// With profiling on, run() records the wall time of its phases: prepare x, gate/up, prepare
  /// h, down (seconds of the last call).
  void set_profile(bool on) { profile_ = on; }
  const double* phase_seconds() const { return phase_s_; }
  /// With tracing on, a hand-off run records per share (thread) when it reached each point of
  /// its job, in steady-clock nanoseconds (TraceAt), plus the run's own marks at index
  /// kTracePoints · shares (run entry, job dispatch, job return, routing grouped, token rows
  /// prepared). Off by default: no clock reads.
  enum TraceAt : int {
    kShareStart,     // the share's job began on its thread
    kOwnGateUpDone,  // its own phase 1 items done
    kGateUpDone,     // phase 1 items taken from others done too
    kWaitNs,         // (a duration) time spent waiting for experts' h in phase 2
    kOwnDownDone,    // its own phase 2 items done
    kDownDone,       // phase 2 items taken from others done too
    kBarrierDone,    // = kDownDone (kept in the format: the call once ended at a barrier)
    kReduceDone,     // = kDownDone (column blocks are added by the items that complete them)
    kReduceNs,       // (a duration) time spent adding column blocks into dst
    kTracePoints
  };
  void set_trace(bool on) { trace_on_ = on; }
  const std::vector<int64_t>& last_trace() const { return trace_; }
  /// The variants of the last run as static strings (null where unused); no allocation.
  const char* used_small() const { return used_small_; }
  const char* used_large() const { return used_large_; }

 private:
  Isa isa_;
  Approximation approximation_ = default_approximation();
  int64_t slot_major_limit_ = int64_t{1} << 20;
  bool profile_ = false;
  bool trace_on_ = false;
  std::vector<int64_t> trace_;
  static Approximation default_approximation();
  bool even_split_ = default_even_split();
  static bool default_even_split();
  bool own_row_ = default_own_row();
  static bool default_own_row();
  bool dataflow_ = default_dataflow();
  bool used_dataflow_ = false;
  static bool default_dataflow();
  int down_tiles_ = default_down_tiles();
  static int default_down_tiles();
  int64_t row_turn_ = 0;  // Note [A ring of token rows]: the row the last call wrote
  bool prefill_ahead_ = default_prefill_ahead();
  static bool default_prefill_ahead();
  int prefill_pairs_ = default_prefill_pairs();
  static int default_prefill_pairs();
  bool local_setup_ = default_local_setup();
  static bool default_local_setup();
  bool down_ahead_ = default_down_ahead();
  static bool default_down_ahead();
  bool row_ahead_ = default_row_ahead();
  static bool default_row_ahead();
  int64_t epoch_ = 0;         // hand-off calls so far: the number of the current one
  int64_t tagged_epoch_ = 0;  // the last hand-off call whose every share ran (ranges' tags)
  double phase_s_[4] = {};
  const char* used_small_ = nullptr;
  const char* used_large_ = nullptr;
  // Workspace.
  std::vector<int64_t> count_, offset_, fill_, active_, row0_, slot_token_, slot_row_;
  std::vector<int64_t> jcount_, joffset_;  // count_ and offset_ per active expert (its index j)
  std::vector<float> slot_weight_, hidden_, slot_out_;
  std::vector<int64_t> token_slots_;
  std::vector<uint8_t> large_;  // per active expert: 1 if it runs the large-m variant
  ActBuffer tok_small_, tok_large_, act_small_, act_large_, hid_small_, hid_large_;
  // Per active expert (hand-off): gate/up tiles done, phase 2 activations ready.
  std::unique_ptr<std::atomic<int64_t>[]> done_;
  std::unique_ptr<std::atomic<int64_t>[]> ready_;  // the call's number once h is ready
  int64_t flags_cap_ = 0;
  std::atomic<bool> abort_{false};                 // a share threw (hand-off)
  alignas(64) std::atomic<int64_t> row_ready_{0};  // the call's number once its token row is ready
  // Items taken from others' shares (hand-off), and those from shares on another NUMA node, with
  // the call's number (add_for_call).
  alignas(64) std::atomic<uint64_t> stolen_{0};
  std::atomic<uint64_t> remote_stolen_{0};
  struct alignas(64) Range {
    // The call's tag and [front, back) of a share (pack_range); at first of no call (tag 0xffff).
    std::atomic<uint64_t> v{uint64_t{0xffff} << 48};
  };
  std::unique_ptr<Range[]> ranges_;  // per phase and thread (hand-off)
  int ranges_cap_ = 0;
  int ranges_threads_ = 0;  // the thread count of the last hand-off call
  struct alignas(64) Counter {
    std::atomic<int64_t> n{0};
  };
  std::unique_ptr<Counter[]> col_done_;  // per phase 2 column block: items done (hand-off)
  int64_t col_done_cap_ = 0;
  // Note [NUMA expert placement]: the shares' nodes (kept while the executor and node count
  // stay), the first active expert of each node, and the shares' item ranges.
  NumaShares numa_;
  const Executor* numa_ex_ = nullptr;
  std::vector<int> share_node_;
  std::vector<int64_t> node_first_, node_items_, share_items_, share_scratch_;
  // Gives r the share [front, back) of the call tagged `tag` unless r is already the call's.
  static void init_range(Range& r, uint64_t tag, int64_t front, int64_t back);
  static int64_t take_front(Range& r);
  // Moves the back half of r, [b0, b1), out of it (r as [front, back) where it is not yet of the
  // call tagged `tag`); false when r is empty.
  static bool take_back_half(Range& r, uint64_t tag, int64_t front, int64_t back, int64_t& b0,
                             int64_t& b1);
};

/// Scalar reference of the op: token by token, experts in ascending id, reference tile kernels
/// with the activations prepared as kF32 (BF16 weights) or kInt8Groups (INT8/INT4).
void moe_experts_ref(const MoeExpertsArgs& args);

}  // namespace tidal::kernels::cpu
