// SPDX-License-Identifier: Apache-2.0
/// \file moe_experts.cpp
/// \brief The fused MoE expert op: tokens grouped per expert, activations prepared once per
/// (token, expert) slot, then two parallel phases over (expert, row tile) work items.
///
/// Note [Two-phase expert schedule]
/// Phase 1 splits every active expert's gate/up matrices into 16-row tiles: one work item is one
/// (expert, tile), so at decode (1 token, 8-10 experts, I = 512) there are 256-320 items for the
/// threads to share, and each item streams 2 contiguous tiles once for all the expert's tokens.
/// Phase 2, small batches (decode): work items (expert, pair of 16-row tiles of H) write
/// y[slot] = down h, so each thread streams long contiguous runs of one expert's down matrix; then
/// dst[t] += Σ w·y over t's slots in ascending expert id. Large batches (prefill): a work item is a
/// block of tile pairs of H and loops over the active experts in ascending id, adding w·y into its
/// columns of dst, so each expert's activations are reused from L2 across the block and no slot-
/// major output buffer (S x H floats) is written. Both schedules do the same additions in the same
/// order per output (tested bit-identical): no two items write the same output, and the results
/// do not depend on the thread count. Between the phases silu(g)·u is prepared as the down
/// projection's activations.
///
/// Note [Per-expert hand-off]
/// At decode the barrier between the phases costs the slowest thread's lag plus a serial
/// preparation of h. Where the executor can run one share per thread at once
/// (Executor::try_run_concurrent: the spinning executor), decode runs as one job: thread i takes
/// the i-th contiguous share of the phase 1 items, then the i-th share of the phase 2 items. Each
/// expert counts its finished gate/up tiles; the thread that finishes the last one prepares the
/// expert's h and raises its ready flag, and a phase 2 item waits only for its own expert's flag.
/// Shares of both phases follow expert order, so a thread mostly waits for itself and its
/// neighbours. A thread whose share of a phase is done takes items from the back of the other
/// threads' shares (one atomic word per share holds its [front, back)), so one slow core (a
/// shared machine's noise) does not hold up the call. The slot outputs reach dst by column
/// blocks (Note [Column blocks finish the call]). The arithmetic is that of the two-phase path,
/// item for item and column for column (tested bitwise); TIDAL_EXPERT_DATAFLOW=0 turns it off.
///
/// Note [Column blocks finish the call]
/// A phase 2 item of the hand-off is (expert, block of down_tiles / 2 tile pairs of H): 8 tiles
/// by default (34 KiB of INT4 down weights at I = 512, the bytes of one gate/up item). With 2
/// tiles, phase 2 of an INT4 35B-A3B call at 16 threads took 42-45 µs, with 4 39-41, with 8
/// 37-40 (thirteenth session, two interleaved repetitions; docs/performance.md). Each
/// column block counts its finished items; the thread whose item brings the count to the number
/// of active experts adds the block's slot outputs into dst, per token in ascending expert id
/// (the same additions as reduce_slots). The call then ends when its last item does: no thread
/// waits for all. Before, every thread waited at a spin barrier after its last item and then
/// added its share of the columns: the twelfth session's trace of an INT4 35B-A3B call at 16
/// threads put ~3 µs in the barrier (the slowest thread's lag) and 2-3.5 µs in the sum, 3-4% of
/// the call, on the critical path. With the barrier instead (same binary, interleaved processes)
/// INT4 read 0.759 of the bandwidth against 0.804 (fourteenth session, medians of 3); the barrier
/// is gone.
/// A serial sum over 8-10 slots written by other cores cost ~5 µs per call at 16 threads, which
/// is why neither form leaves the sum to the calling thread.
///
/// Note [The token's row inside the job]
/// A one-token hand-off call reads the token's row in place (Note [One token reads its own
/// row]). Preparing it (int8 groups of 2048 values) took ~1.7 µs on the calling thread before the
/// job was dispatched, and the workers then needed ~1.5 µs to start: ~3 µs of a ~156 µs INT4
/// call (twelfth session's trace) in which no expert byte moved. Here share 0 prepares the row
/// inside the job and raises a flag; meanwhile every share prefetches the first 4 KiB of its
/// first gate and up tiles into L2 (the kernels' software prefetch runs 4 KiB ahead, so those
/// lines were demand misses) and then waits for the flag. With the row prepared before the job,
/// INT4 read 0.796 of the bandwidth against 0.804 (fourteenth session, medians of 3); that form
/// is gone.
///
/// Note [Stealing half a share]
/// A thread out of work used to take one item at a time from the back of another share. Each
/// stolen item then started a new stream, just below the previous one in memory: the kernels'
/// software prefetch runs ahead (upwards) into lines already taken, so the first 4 KiB of every
/// stolen tile (a down tile is 4.25 KiB at I = 512) came as demand misses, and owner and thief
/// took turns on the share's atomic word for every item. Now the thief moves the back half of the
/// share (the middle item included) into its own range with one compare-and-swap and streams it
/// upwards like its own work; others may take from that range in turn. Only the owner stores
/// into its range, and only while the range is empty; the word is the whole state of a range, so
/// a compare-and-swap that finds the value it loaded is right whatever happened in between.
/// Single steals read 0.792 of the bandwidth against 0.804 (fourteenth session, medians of 3) and
/// are gone.
///
/// Note [A call's setup leaves the workers' lines alone]
/// Before a hand-off call's job starts, the calling thread used to reset every expert's done count
/// and ready flag, every column block's count, both phases' item range of every thread, the
/// stolen-item counters and the row flag: ~60 cache lines at 16 threads, each last written or
/// read by a worker, so each store first had to take its line back from another core. The
/// thirteenth and fourteenth sessions' traces put ~1.9 µs between the op's entry and the job's
/// dispatch, and ~0.9 µs more before the caller's own share began (the job's publishing waits
/// for those stores). Now nothing needs resetting: the item that completes a count sets it back
/// to 0 for the next call; flags hold the call's number (`epoch_`) instead of 1; the stolen-item
/// counters carry it in their high half (add_for_call); each share writes its own two ranges
/// when it starts (init_range), and the per-call arrays the workers read are written only where a
/// value changed (set_if; one-token calls keep slot rows, counts and offsets). A range word
/// carries a 16-bit tag of its call, so a thread out of work still takes items from a share
/// whose thread has not started yet: it reads a range of another call as that share's whole
/// [front, back) and moves the back half out with one compare-and-swap, after which the owner's
/// init_range leaves the range alone (HandOffStealsFromASlowThreadAndStaysExact). Tags cycle
/// through 65535 values, and a call whose shares all ran leaves every range in [0, 2T) with its
/// tag, so after it no range carries the next call's tag. Where the last call was not such a call
/// (its job declined, as on TBB, or threw), some ranges may keep an older tag that could come
/// round again (HandOffRangeTagsComeRound), and where T changed, the others keep theirs: then the
/// caller sets every range to no call first. After a call whose share threw (abort_), the next
/// call also resets the counts as before. The only row flag is that of a row prepared inside the
/// job; share 0 prepares it before it writes its own ranges.
/// TIDAL_EXPERT_LOCAL_SETUP=0 (set_local_setup(false)) makes the caller store every count,
/// flag and range again, for comparison. Measured (fifteenth session, INT4 and INT8 35B-A3B calls
/// at 16 threads, 2 interleaved processes per setting on one host): the op's entry came 1.6-2.8 µs
/// before the dispatch against 2.5-3.0 µs with the caller's resets; the op's time moved inside
/// that host's noise (its read probe gave 115-155 GB/s between processes).
///
/// Note [Phase 2's first lines]
/// The kernels' software prefetch runs 4 KiB ahead of their loads, so the first 4 KiB of every
/// new stream are demand misses: a thread's first phase 2 item, and the first item of every range
/// it steals. With the hand-off on (TIDAL_EXPERT_DOWN_AHEAD=0 turns this off), a thread asks L2
/// for those 64 lines (for a stolen gate/up item, of both tiles) before it starts the item, and a
/// thread whose next down item waits for its expert's h spends the wait asking L2 for that item's
/// weights, 8 lines per poll. Prefetches only: the arithmetic is unchanged. On the fifteenth
/// session's one (noisy) host, 2 processes each, the op did not separate from the form without
/// (INT4 against the larger probe: 0.713 and 0.772 with, 0.795 and 0.735 without); kept on for the
/// reason above, to be measured again on a quieter host.
///
/// Note [NUMA expert placement]
/// On a machine of several NUMA nodes (several sockets) decode is bound by memory bandwidth, and a
/// core reads its own node's memory at full speed, another node's over the socket link at a
/// fraction of it. So each node holds a contiguous range of every MoE layer's experts
/// (expert_numa_node: node n holds experts [n·E/N, (n+1)·E/N)), the store binds those pages to it
/// before they are first written (ExpertStore, Note [Packed experts on their NUMA nodes]), and in
/// the hand-off job the threads of node n split the items of node n's active experts among
/// themselves (NumaShares), then take from their own node's shares, and from other nodes' last.
/// Whole experts rather than row blocks of every expert: row blocks would keep every token's work
/// even across nodes, but they need a page range per (expert, matrix, node), i.e. ~60-150k memory
/// areas for the 35B-A3B / 80B-A3B shapes, against Linux's default limit of 65530 mappings per
/// process, and they break the 2 MiB transparent huge pages into 4 KiB ones. Whole-expert ranges
/// are one area per (layer, node) and keep the huge pages; the cost is that a token's 8-10
/// experts fall unevenly on the nodes, which the stealing evens out with some remote reads. One
/// node (the desktop tidal targets, the GPU test machine): the shares, order and memory are
/// exactly those without this note. Not measured on a multi-socket machine yet; prefill (the
/// guided split) and the executor without concurrent shares (TBB) do not order by node. Share 0
/// runs on the calling thread, which is not pinned (with a GPU it is the GPU thread, Note [A core
/// for the GPU thread]): it counts as the node of the first core of the spread order, which no
/// worker takes, so where the OS runs it elsewhere its items are read across the link; asking
/// the caller's node per call (sched_getcpu) is the next refinement.
#include "kernels/cpu/moe_experts.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels/common/set_if.h"
#include "kernels/cpu/expert_gemm_ref.h"
#include "kernels/cpu/rms_norm.h"

namespace tidal::kernels::cpu {
namespace {

// Slots prepared per parallel task: a few µs of work each. Up to kSerialSlots slots (decode) are
// prepared on the calling thread: cheaper than waking the workers.
constexpr int64_t kSlotsPerTask = 8;
constexpr int64_t kSerialSlots = 32;

// Note [Grouping a few slots]
// Grouping the slots per expert by counting over all E experts (256-512) cost ~1.3 µs of a
// one-token call on the development machine, before any worker starts: a pass over E counts and
// a loop-carried prefix sum. Up to kSparseSlots slots (one to four decode tokens) are instead
// sorted by expert id directly (insertion sort, O(S²) but S ≤ 32), which gives the same slot
// order: 0.5 µs from entry to grouped there. On the GPU machine entry to grouped stayed at
// ~1 µs either way (thirteenth session): there the caller's metadata misses dominate.
constexpr int64_t kSparseSlots = 32;

// Note [A ring of token rows]
// Every thread reads a one-token call's row (Note [One token reads its own row]), so at the next
// call each cache line of that row sits in up to 16 cores' caches, and writing the row again
// first takes every line back from all of them: on the GPU machine preparing the 2048-value row
// took 1.0-1.4 µs on the calling thread (thirteenth session's trace) against 0.4 µs with 2
// threads. A call writes the next of kRowRing rows instead: a row written kRowRing - 1 calls
// ago, whose lines the cores have since pushed out of their L2 with ~3 calls of weights (~2.5
// MiB per core at 16 threads).
constexpr int64_t kRowRing = 4;

// Waiting for another thread's share (Note [Per-expert hand-off]): spin briefly, then yield, so
// that an oversubscribed machine still runs the thread being waited for.
inline void wait_a_little(int spins) {
  if (spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

// Prefetches `lines` cache lines from p into L2.
inline void prefetch_l2(const uint8_t* p, int64_t lines) {
#if defined(__x86_64__) || defined(__i386__)
  for (int64_t l = 0; l < lines; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(p + 64 * l), _MM_HINT_T1);
#else
  (void)p;
  (void)lines;
#endif
}

// Note [The token's row ahead]
// A one-token call's first serial work on the token is share 0 preparing its row (Note [The
// token's row inside the job]) while 15 threads wait for it: it reads the input row (8 KiB at
// H = 2048; in a hybrid decode step written by a copy from the GPU, so in no cache) and writes
// the next ring row (Note [A ring of token rows]), whose lines other cores read some calls ago.
// On the GPU machine that took 1.4 µs (fifteenth session's trace) for ~0.3 µs of arithmetic. With
// this on, run() first asks for the input row's lines and, with PREFETCHW where the CPU has it,
// for ownership of the ring row's lines, so that they arrive while the routing is grouped (1-3
// µs). Prefetches only: results unchanged. Off by default (TIDAL_EXPERT_ROW_AHEAD=1 turns it on):
// on the development machine's 2 threads (sixteenth session) the preparation took the same
// 0.7-1.3 µs either way (its hot arithmetic alone is 0.5-0.7 µs there, and the benchmark's input
// row is hot) while the 160 prefetches added ~0.3 µs before the dispatch. To be measured on the
// GPU machine, where 15 cores share the ring row's lines.
// Asks for ownership of [p, p + bytes) (PREFETCHW; only where cpu_features().prfchw).
void prefetch_for_write(const void* p, int64_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
  const auto* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) asm volatile("prefetchw %0" : : "m"(c[o]));
#else
  (void)p;
  (void)bytes;
#endif
}

// The lines that the kernels' software prefetch does not cover at the start of a stream: it runs
// 4 KiB ahead of the loads (kPrefetchBytes in expert_gemm_avx512.cpp).
constexpr int64_t kAheadLines = 64;

// Note [A call's setup leaves the workers' lines alone]: a count of this call in one word, the
// call's number (low 32 bits) in the high half, so that no one resets it between calls.
void add_for_call(std::atomic<uint64_t>& c, int64_t epoch, int64_t n) {
  const uint64_t tag = static_cast<uint64_t>(epoch) << 32;
  uint64_t v = c.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t base = (v & ~uint64_t{0xffffffffu}) == tag ? (v & 0xffffffffu) : 0;
    if (c.compare_exchange_weak(v, tag | (base + static_cast<uint64_t>(n)),
                                std::memory_order_relaxed))
      return;
  }
}
// The count add_for_call kept for call `epoch` (0 where no item of that call was counted).
int64_t count_for_call(const std::atomic<uint64_t>& c, int64_t epoch) {
  const uint64_t v = c.load(std::memory_order_relaxed);
  return (v >> 32) == (static_cast<uint64_t>(epoch) & 0xffffffffu)
             ? static_cast<int64_t>(v & 0xffffffffu)
             : 0;
}

// Note [Prefill down: the next expert ahead]
// Prefill phase 2 runs, per task, every active expert in turn against the task's few tile pairs
// of H: per expert a few short weight streams (16 KB per INT8 pair at K = 512) and the expert's
// activation rows, which other threads wrote in L3. The L2 streamer needs a few misses to pick
// up each short stream, and every AMX tile load that misses stalls the in-order tile unit: at
// 2048 tokens phase 2 read its bytes at ~0.6x the rate of phase 1, whose streams are long (the
// thirteenth session's call 1: INT8 10.9 ms for a third of the bytes against 12.5 ms for two
// thirds). So while a task adds expert j's products into dst, row by row, it asks L2 for expert
// j + 1's tiles of its columns and activation rows, a few lines per row, so that they are there
// when j + 1 starts. Prefetches only: the arithmetic is unchanged. Measured (fourteenth session,
// 2048 tokens, 16 threads, two interleaved repetitions): INT8 phase 2 7.6-7.7 ms against 8.2 ms
// without; BF16 10.4-12.6 against 10.5-10.6 ms, no gain beyond that host's noise.
class LineAhead {
 public:
  void clear() { n_ = cur_ = 0, off_ = 0, total_ = 0; }
  void add(const void* p, int64_t bytes) {
    if (p == nullptr || bytes <= 0 || n_ == kSpans) return;
    const auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    const auto b = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
    spans_[n_++] = {reinterpret_cast<const uint8_t*>(a), static_cast<int64_t>((b - a + 63) / 64)};
    total_ += spans_[n_ - 1].lines;
  }
  int64_t total() const { return total_; }
  // The next `lines` lines into L2.
  void issue(int64_t lines) {
    while (lines > 0 && cur_ < n_) {
      const int64_t take = std::min(lines, spans_[cur_].lines - off_);
      prefetch_l2(spans_[cur_].p + 64 * off_, take);
      lines -= take;
      off_ += take;
      if (off_ == spans_[cur_].lines) ++cur_, off_ = 0;
    }
  }

 private:
  struct Span {
    const uint8_t* p;
    int64_t lines;
  };
  static constexpr int kSpans = 8;
  Span spans_[kSpans];
  int n_ = 0, cur_ = 0;
  int64_t off_ = 0, total_ = 0;
};

// The bytes of rows [row0, row0 + count) of an activation buffer.
void add_rows(LineAhead& ahead, const ActBuffer& b, int64_t row0, int64_t count) {
  const ActRows r = b.rows(row0);
  ahead.add(r.f32, count * b.ld * 4);
  ahead.add(r.bf16, count * b.ld * 2);
  ahead.add(r.bf16_lo, count * b.ld * 2);
  ahead.add(r.q, count * b.ld);
  ahead.add(r.q_scale, count * b.ld_group * 4);
  ahead.add(r.q_sum, count * b.ld_group * 4);
}

// A work range [front, back) in one atomic word with the tag of its call (Note [A call's setup
// leaves the workers' lines alone]): tag in the top 16 bits, back in the next 24, front in the
// low 24.
constexpr int kRangeBits = 24;
constexpr uint64_t kRangeMask = (uint64_t{1} << kRangeBits) - 1;
uint64_t pack_range(uint64_t tag, int64_t front, int64_t back) {
  return (tag << (2 * kRangeBits)) | (static_cast<uint64_t>(back) << kRangeBits) |
         static_cast<uint64_t>(front);
}
uint64_t range_tag(uint64_t v) { return v >> (2 * kRangeBits); }
int64_t range_front(uint64_t v) { return static_cast<int64_t>(v & kRangeMask); }
int64_t range_back(uint64_t v) { return static_cast<int64_t>((v >> kRangeBits) & kRangeMask); }
// Call tags cycle through [0, kNoTag); kNoTag marks a range of no call.
constexpr uint64_t kNoTag = 0xffff;
uint64_t call_tag(int64_t epoch) { return static_cast<uint64_t>(epoch) % kNoTag; }

}  // namespace

void NumaShares::set(const int* share_node, int shares, int nodes) {
  nodes = std::max(1, nodes);
  node_.assign(static_cast<size_t>(std::max(0, shares)), 0);
  rank_.assign(node_.size(), 0);
  count_.assign(static_cast<size_t>(nodes), 0);
  for (int i = 0; i < shares; ++i) {
    const int n = share_node[i] >= 0 && share_node[i] < nodes ? share_node[i] : 0;
    node_[static_cast<size_t>(i)] = n;
    rank_[static_cast<size_t>(i)] = count_[static_cast<size_t>(n)]++;
  }
}

void NumaShares::split(const int64_t* node_begin, int64_t* out) const {
  const int T = shares(), N = nodes();
  bool by_node = true;
  for (int n = 0; n < N; ++n)
    if (node_begin[n + 1] > node_begin[n] && count_[static_cast<size_t>(n)] == 0) by_node = false;
  for (int i = 0; i < T; ++i) {
    int64_t b = node_begin[0], len = node_begin[N] - node_begin[0], r = i, c = T;
    if (by_node) {
      const int n = node_[static_cast<size_t>(i)];
      b = node_begin[n];
      len = node_begin[n + 1] - node_begin[n];
      r = rank_[static_cast<size_t>(i)];
      c = count_[static_cast<size_t>(n)];
    }
    out[2 * i] = b + len * r / c;
    out[2 * i + 1] = b + len * (r + 1) / c;
  }
}

int64_t MoeExperts::last_stolen() const { return count_for_call(stolen_, epoch_); }
int64_t MoeExperts::last_remote_stolen() const { return count_for_call(remote_stolen_, epoch_); }

void MoeExperts::init_range(Range& r, uint64_t tag, int64_t front, int64_t back) {
  uint64_t v = r.v.load(std::memory_order_acquire);
  while (range_tag(v) != tag)
    if (r.v.compare_exchange_weak(v, pack_range(tag, front, back), std::memory_order_acq_rel))
      return;
}

// The owner's next item (from the front), or -1 when the range is empty.
int64_t MoeExperts::take_front(Range& r) {
  uint64_t v = r.v.load(std::memory_order_acquire);
  for (;;) {
    const int64_t f = range_front(v), b = range_back(v);
    if (f >= b) return -1;
    if (r.v.compare_exchange_weak(v, pack_range(range_tag(v), f + 1, b), std::memory_order_acq_rel))
      return f;
  }
}

bool MoeExperts::take_back_half(Range& r, uint64_t tag, int64_t front, int64_t back, int64_t& b0,
                                int64_t& b1) {
  uint64_t v = r.v.load(std::memory_order_acquire);
  for (;;) {
    // A range still of an earlier call: its owner has not started; [front, back) is its share.
    const bool current = range_tag(v) == tag;
    const int64_t f = current ? range_front(v) : front, b = current ? range_back(v) : back;
    if (f >= b) return false;
    const int64_t m = b - (b - f + 1) / 2;  // the back half, the middle item included
    if (r.v.compare_exchange_weak(v, pack_range(tag, f, m), std::memory_order_acq_rel)) {
      b0 = m;
      b1 = b;
      return true;
    }
  }
}

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <class Fn>
void for_slots(Executor& ex, int64_t S, const Fn& fn) {
  if (S <= kSerialSlots) {
    for (int64_t s = 0; s < S; ++s) fn(s);
    return;
  }
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t s = b0 * kSlotsPerTask; s < std::min(S, b1 * kSlotsPerTask); ++s) fn(s);
  };
  // std::ref: a std::function holds a reference_wrapper in place (a capturing lambda larger than
  // its small buffer would be heap-allocated on every call: no allocation per token).
  ex.parallel_for((S + kSlotsPerTask - 1) / kSlotsPerTask, 1, std::ref(body));
}

// A knob that is on unless the environment variable is "0" (read once per process by the
// callers' statics).
bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr || std::string(e) != "0";
}

}  // namespace

bool MoeExperts::default_even_split() {
  static const bool on = env_on("TIDAL_EXPERT_EVEN");
  return on;
}

bool MoeExperts::default_own_row() {
  static const bool on = env_on("TIDAL_EXPERT_OWN_ROW");
  return on;
}

bool MoeExperts::default_dataflow() {
  static const bool on = env_on("TIDAL_EXPERT_DATAFLOW");
  return on;
}

namespace {
// 2, 4, 8 or 16: the largest of those not above `tiles` (2 below 2).
int round_down_tiles(int tiles) { return tiles >= 16 ? 16 : tiles >= 8 ? 8 : tiles >= 4 ? 4 : 2; }
}  // namespace

int MoeExperts::default_down_tiles() {
  static const int n = [] {
    const char* e = std::getenv("TIDAL_EXPERT_DOWN_TILES");
    return round_down_tiles(e == nullptr ? 8 : std::atoi(e));
  }();
  return n;
}

void MoeExperts::set_down_tiles(int tiles) { down_tiles_ = round_down_tiles(tiles); }

bool MoeExperts::default_local_setup() {
  static const bool on = env_on("TIDAL_EXPERT_LOCAL_SETUP");
  return on;
}

bool MoeExperts::default_down_ahead() {
  static const bool on = env_on("TIDAL_EXPERT_DOWN_AHEAD");
  return on;
}

bool MoeExperts::default_row_ahead() {
  static const bool on = [] {
    const char* e = std::getenv("TIDAL_EXPERT_ROW_AHEAD");
    return e != nullptr && std::string(e) == "1";
  }();
  return on;
}

bool MoeExperts::default_prefill_ahead() {
  static const bool on = env_on("TIDAL_EXPERT_PREFILL_AHEAD");
  return on;
}

int MoeExperts::default_prefill_pairs() {
  static const int n = [] {
    const char* e = std::getenv("TIDAL_EXPERT_PREFILL_PAIRS");
    return e == nullptr ? 0 : std::max(0, std::atoi(e));
  }();
  return n;
}

Approximation MoeExperts::default_approximation() {
  static const Approximation a = [] {
    const char* e = std::getenv("TIDAL_EXPERT_AMX_BF16");
    return parse_approximation(e == nullptr ? "" : e);
  }();
  return a;
}

std::string MoeExperts::last_variants() const {
  std::string s = used_small_ ? used_small_ : "";
  if (used_large_) {
    if (!s.empty()) s += '+';
    s += used_large_;
  }
  return s;
}

void MoeExperts::run(const MoeExpertsArgs& a, Executor& ex) {
  const int64_t E = a.num_experts, M = a.m, K = a.top_k;
  const PackedLayout& lgu = *a.gate_up;
  const PackedLayout& ldn = *a.down;
  const int64_t H = ldn.n, I = lgu.n;
  used_small_ = used_large_ = nullptr;
  used_dataflow_ = false;
  if (M <= 0 || K <= 0) return;
  const int64_t t_entry = trace_on_ ? now_ns() : 0;
  // Note [The token's row ahead]: the row this call reads, and the ring row it will write.
  if (M == 1 && row_ahead_) {
    prefetch_l2(reinterpret_cast<const uint8_t*>(a.src), (lgu.k * 4 + 63) / 64);
    const ActBuffer& b = tok_small_;
    const int64_t next = (row_turn_ + 1) % kRowRing;
    if (cpu_features().prfchw && b.kind == ActKind::kInt8Groups && b.num_rows > next &&
        b.k == lgu.k) {
      prefetch_for_write(b.q.data() + next * b.ld, b.k_pad);
      prefetch_for_write(b.q_scale.data() + next * b.ld_group, b.num_groups * 4);
      prefetch_for_write(b.q_sum.data() + next * b.ld_group, b.num_groups * 4);
    }
  }

  // Group (token, weight) slots per expert, experts ascending, tokens ascending within one.
  const int64_t S = M * K;
  for (int64_t s = 0; s < S; ++s) {
    const int32_t e = a.ids[s];
    if (e < 0 || e >= E)
      throw std::invalid_argument("moe_experts: expert id " + std::to_string(e) + " of token " +
                                  std::to_string(s / K) + " is outside [0, " + std::to_string(E) +
                                  ")");
  }
  slot_token_.resize(static_cast<size_t>(S));
  slot_weight_.resize(static_cast<size_t>(S));
  slot_row_.resize(static_cast<size_t>(S));
  count_.resize(static_cast<size_t>(E));
  offset_.resize(static_cast<size_t>(E + 1));
  if (S <= kSparseSlots) {
    // Note [Grouping a few slots]: the slots in (expert, token) order by a stable insertion
    // sort; count_ and offset_ are written for the active experts only (nothing reads the
    // others').
    fill_.resize(static_cast<size_t>(S));
    for (int64_t s = 0; s < S; ++s) {
      int64_t k = s;
      for (; k > 0 && a.ids[fill_[k - 1]] > a.ids[s]; --k) fill_[k] = fill_[k - 1];
      fill_[k] = s;
    }
    // The workers read these arrays: set_if (Note [A call's setup leaves the workers' lines
    // alone]).
    size_t na = 0;
    for (int64_t k = 0; k < S;) {
      const int32_t e = a.ids[fill_[k]];
      int64_t n = 0;
      for (; k + n < S && a.ids[fill_[k + n]] == e; ++n) {
        set_if(slot_token_[k + n], fill_[k + n] / K);
        set_if(slot_weight_[k + n], a.weights[fill_[k + n]]);
      }
      if (na < active_.size())
        set_if(active_[na], e);
      else
        active_.push_back(e);
      ++na;
      count_[e] = n;
      offset_[e] = k;
      offset_[e + 1] = k + n;
      k += n;
    }
    active_.resize(na);
  } else {
    active_.clear();
    std::fill(count_.begin(), count_.end(), 0);
    for (int64_t s = 0; s < S; ++s) ++count_[static_cast<size_t>(a.ids[s])];
    offset_[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      offset_[e + 1] = offset_[e] + count_[e];
      if (count_[e] > 0) active_.push_back(e);
    }
    fill_.assign(offset_.begin(), offset_.end() - 1);
    for (int64_t t = 0; t < M; ++t)
      for (int64_t i = 0; i < K; ++i) {
        const int64_t s = fill_[a.ids[t * K + i]]++;
        slot_token_[s] = t;
        slot_weight_[s] = a.weights[t * K + i];
      }
  }

  // Kernel per expert: the large-m variant (AMX) where it accepts the expert's token count.
  const ExpertDType dt = lgu.dtype;
  const ExpertGemmVariant& small = select_expert_gemm(dt, isa_, 1);
  const ExpertGemmVariant* large_v =
      &select_expert_gemm(dt, isa_, kMaxRowsPerCall, &lgu, approximation_);
  if (!large_v->supports(ldn)) large_v = &small;
  const ExpertGemmVariant& large = *large_v;
  const int64_t num_active = static_cast<int64_t>(active_.size());
  large_.resize(static_cast<size_t>(num_active));
  row0_.resize(static_cast<size_t>(num_active));
  jcount_.resize(static_cast<size_t>(num_active));
  joffset_.resize(static_cast<size_t>(num_active));
  int64_t rows_small = 0, rows_large = 0;
  for (int64_t j = 0; j < num_active; ++j) {
    const int64_t e = active_[j], c = count_[e];
    const bool big = &large != &small && c >= large.min_rows;
    set_if(large_[j], big);
    int64_t& rows = big ? rows_large : rows_small;
    set_if(row0_[j], rows);
    set_if(jcount_[j], c);
    set_if(joffset_[j], offset_[e]);
    for (int64_t s = offset_[e]; s < offset_[e + 1]; ++s)
      set_if(slot_row_[s], rows + (s - offset_[e]));
    rows += c;
    (big ? used_large_ : used_small_) = big ? large.name : small.name;
  }
  auto slot_is_large = [&](int64_t s) {
    // Experts are few; find the expert of slot s by binary search over active offsets.
    const int64_t j = std::upper_bound(active_.begin(), active_.end(), s,
                                       [&](int64_t v, int64_t e) { return v < offset_[e + 1]; }) -
                      active_.begin();
    return large_[j] != 0;
  };

  // Phase 1 activations.
  double t0 = profile_ ? now_seconds() : 0.0;
  auto lap = [&](int i) {
    if (!profile_) return;
    const double t = now_seconds();
    phase_s_[i] = t - t0;
    t0 = t;
  };
  // Each token is prepared once (per kind in use), then copied to its K expert slots.
  const bool any_small = rows_small > 0, any_large = rows_large > 0;
  // Note [One token reads its own row]: with one token every expert's phase 1 input is that
  // token's row, so the experts read it in place instead of K copies. The copies were the bulk of
  // a decode call's serial preparation: K rows (16 KiB at H = 2048) whose cache lines every worker
  // had read in the previous call, so each write first took the line back from another core.
  // Only where each expert has the one slot (a router may not repeat an id within a token, but
  // the op allows it: then the copies are needed). set_own_row(false) or TIDAL_EXPERT_OWN_ROW=0
  // keeps the copies (for comparison).
  const bool own_row = own_row_ && M == 1 && num_active == K && !any_large && !small.whole_tiles();
  // The per-token rows are only copied from: no spare rows (ActBuffer::reserve).
  // Note [A ring of token rows]: a one-token call read in place writes the next of kRowRing rows.
  const bool ring = own_row;
  const int64_t x_row = ring ? (row_turn_ = (row_turn_ + 1) % kRowRing) : 0;
  if (any_small) tok_small_.reserve(small.act, lgu, ring ? kRowRing : M, isa_, false);
  if (any_large) tok_large_.reserve(large.act, lgu, M, isa_, false);
  if (!own_row) act_small_.reserve(small.act, lgu, rows_small, isa_, small.whole_tiles());
  if (any_large) act_large_.reserve(large.act, lgu, rows_large, isa_, large.whole_tiles());
  const bool decode = even_split_ && M <= 16;
  const bool slot_major = S * H <= slot_major_limit_;
  // Decode on an executor whose shares run at once: one job, phase 2 of an expert starting as
  // soon as its own gate/up tiles are done. See Note [Per-expert hand-off].
  // Only where every expert runs the small variant: AMX BF16 (2+ tokens, opt-in) reads whole
  // 16-row activation tiles, i.e. rows of the next expert that another thread may be preparing.
  // (Work items are numbered in 24 bits: pack_range.)
  const bool hand_off =
      decode && slot_major && dataflow_ && rows_large == 0 && ex.num_threads() > 1 &&
      num_active * std::max(lgu.num_tiles, ldn.num_tiles) < static_cast<int64_t>(kRangeMask);
  // Note [The token's row inside the job]: one token read in place is prepared by share 0 of
  // the hand-off job while the other threads wake up.
  const bool late_row = hand_off && own_row;
  const int64_t t_grouped = trace_on_ ? now_ns() : 0;
  if (!late_row)
    for_slots(ex, M, [&](int64_t t) {
      if (any_small) tok_small_.prepare(t + x_row, a.src + t * a.ld_src);
      if (any_large) tok_large_.prepare(t, a.src + t * a.ld_src);
    });
  const int64_t t_prepared = trace_on_ && !late_row ? now_ns() : 0;
  if (!own_row)
    for_slots(ex, S, [&](int64_t s) {
      const bool big = slot_is_large(s);
      (big ? act_large_ : act_small_)
          .copy_row(slot_row_[s], big ? tok_large_ : tok_small_, slot_token_[s]);
    });
  lap(0);
  const bool vec_silu = isa_ >= Isa::kAvx2;

  // Phase 1: h = silu(gate x) * up x per (expert, 16-row tile of I). See Note [Two-phase expert
  // schedule].
  hidden_.resize(static_cast<size_t>(S * I));
  const int64_t tiles_i = lgu.num_tiles;
  auto phase1 = [&](int64_t w0, int64_t w1) {
    alignas(64) float g[kMaxRowsPerCall * kTileRows], u[kMaxRowsPerCall * kTileRows];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t j = w / tiles_i, tile = w % tiles_i, e = active_[j];
      const bool big = large_[j];
      const ExpertGemmVariant& v = big ? large : small;
      const ActBuffer& buf = big ? act_large_ : own_row ? tok_small_ : act_small_;
      const int64_t buf_row0 = own_row ? x_row : row0_[j];
      const uint8_t* gt = a.experts[e].gate + tile * lgu.tile_bytes;
      const uint8_t* ut = a.experts[e].up + tile * lgu.tile_bytes;
      const int64_t col0 = tile * kTileRows, ncol = std::min(kTileRows, I - col0);
      for (int64_t c0 = 0; c0 < jcount_[j]; c0 += kMaxRowsPerCall) {
        const int64_t mc = std::min(kMaxRowsPerCall, jcount_[j] - c0);
        v.run_pair(lgu, gt, ut, buf.rows(buf_row0 + c0), mc, g, u);
        for (int64_t i = 0; i < mc; ++i) {
          float* h = hidden_.data() + (joffset_[j] + c0 + i) * I + col0;
          if (vec_silu) {
            if (isa_ >= Isa::kAvx512)
              avx512::silu_mul(g + i * kTileRows, u + i * kTileRows, h, ncol);
            else
              avx2::silu_mul(g + i * kTileRows, u + i * kTileRows, h, ncol);
          } else {
            for (int64_t r = 0; r < ncol; ++r)
              h[r] = silu(g[i * kTileRows + r]) * u[i * kTileRows + r];
          }
        }
      }
    }
  };
  // Phase 2 activations of active expert j: silu(g)·u of its slots.
  auto prepare_hidden = [&](int64_t j) {
    ActBuffer& buf = large_[j] ? hid_large_ : hid_small_;
    for (int64_t s = joffset_[j]; s < joffset_[j] + jcount_[j]; ++s)
      buf.prepare(slot_row_[s], hidden_.data() + s * I);
  };
  const int64_t pairs = (ldn.num_tiles + 1) / 2;
  // Phase 2, small batches: work items (expert, pair of 16-row tiles of H), so that each thread
  // streams long contiguous runs of one expert's down matrix (per-column blocks over all experts
  // made 8 short streams per item at decode); outputs go to y[slot] and are added to dst by
  // reduce_slots.
  auto phase2_slots = [&](int64_t w0, int64_t w1) {
    alignas(64) float y0[kMaxRowsPerCall * kTileRows], y1[kMaxRowsPerCall * kTileRows];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t j = w / pairs, tile = 2 * (w % pairs), e = active_[j];
      const bool big = large_[j];
      const ExpertGemmVariant& v = big ? large : small;
      const ActBuffer& buf = big ? hid_large_ : hid_small_;
      const bool two = tile + 1 < ldn.num_tiles;
      const int64_t col0 = tile * kTileRows, ncol = std::min(2 * kTileRows, H - col0);
      const int64_t n0 = std::min(kTileRows, ncol), n1 = ncol - n0;
      const uint8_t* t0 = a.experts[e].down + tile * ldn.tile_bytes;
      for (int64_t c0 = 0; c0 < jcount_[j]; c0 += kMaxRowsPerCall) {
        const int64_t mc = std::min(kMaxRowsPerCall, jcount_[j] - c0);
        const ActRows rows = buf.rows(row0_[j] + c0);
        if (two)
          v.run_pair(ldn, t0, t0 + ldn.tile_bytes, rows, mc, y0, y1);
        else
          v.run(ldn, t0, rows, mc, y0);
        for (int64_t i = 0; i < mc; ++i) {
          float* y = slot_out_.data() + (joffset_[j] + c0 + i) * H + col0;
          std::copy(y0 + i * kTileRows, y0 + i * kTileRows + n0, y);
          std::copy(y1 + i * kTileRows, y1 + i * kTileRows + n1, y + kTileRows);
        }
      }
    }
  };
  // dst[t] += Σ w · y over t's slots in ascending expert id: the same operations, in the same
  // order, as the column-block path below, so both give identical results.
  auto order_token_slots = [&] {
    token_slots_.resize(static_cast<size_t>(M * K));
    fill_.assign(static_cast<size_t>(M), 0);
    for (int64_t j = 0; j < num_active; ++j)
      for (int64_t s = joffset_[j]; s < joffset_[j] + jcount_[j]; ++s) {
        const int64_t t = slot_token_[s];
        set_if(token_slots_[t * K + fill_[t]++], s);
      }
  };
  auto reduce_block = [&](int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* d = a.dst + t * a.ld_dst;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t s = token_slots_[t * K + i];
        const float wgt = slot_weight_[s];
        const float* y = slot_out_.data() + s * H;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) d[c] += wgt * y[c];
      }
    }
  };
  auto reduce_tokens = [&](int64_t t0, int64_t t1) { reduce_block(t0, t1, 0, H); };
  auto reduce_slots = [&] {
    order_token_slots();
    if (M <= 4)
      reduce_tokens(0, M);
    else
      ex.parallel_for(M, 1, std::ref(reduce_tokens));
  };
  if (hand_off) {
    hid_small_.reserve(small.act, ldn, rows_small, isa_, small.whole_tiles());
    if (rows_large > 0) hid_large_.reserve(large.act, ldn, rows_large, isa_, large.whole_tiles());
    slot_out_.resize(static_cast<size_t>(S * H));
    // Note [A call's setup leaves the workers' lines alone]: the counters return to 0 through
    // the items that complete them, flags carry the call's number, and each share writes its own
    // ranges. Only after a call whose share threw (abort_), or with set_local_setup(false), does
    // the caller reset them here.
    const int T = ex.num_threads();
    const int64_t epoch = ++epoch_;
    const bool local = local_setup_;
    const bool reset_all = abort_.load(std::memory_order_relaxed);
    if (reset_all) abort_.store(false, std::memory_order_relaxed);
    if (flags_cap_ < num_active) {
      done_ = std::make_unique<std::atomic<int64_t>[]>(static_cast<size_t>(num_active));
      ready_ = std::make_unique<std::atomic<int64_t>[]>(static_cast<size_t>(num_active));
      flags_cap_ = num_active;
      for (int64_t j = 0; j < num_active; ++j) {
        done_[j].store(0, std::memory_order_relaxed);
        ready_[j].store(0, std::memory_order_relaxed);
      }
    }
    if (!local || reset_all)
      for (int64_t j = 0; j < (reset_all ? flags_cap_ : num_active); ++j) {
        done_[j].store(0, std::memory_order_relaxed);
        ready_[j].store(0, std::memory_order_relaxed);
      }
    order_token_slots();
    // Phase 2 items: (expert, block of down_tiles_ / 2 tile pairs of H).
    const int64_t dn_pairs = down_tiles_ / 2, dn_blocks = (pairs + dn_pairs - 1) / dn_pairs;
    if (col_done_cap_ < dn_blocks) {
      col_done_ = std::make_unique<Counter[]>(static_cast<size_t>(dn_blocks));
      col_done_cap_ = dn_blocks;
    }
    if (!local || reset_all)
      for (int64_t b = 0; b < (reset_all ? col_done_cap_ : dn_blocks); ++b)
        col_done_[b].n.store(0, std::memory_order_relaxed);
    // Item ranges [front, back) per thread and phase: the owner takes from the front, a thread
    // that has run out takes from the back of the others' (Note [Per-expert hand-off]).
    if (ranges_cap_ < 2 * T) {
      ranges_ = std::make_unique<Range[]>(static_cast<size_t>(2 * T));  // of no call
      ranges_cap_ = 2 * T;
    }
    // A call whose every share ran tags ranges [0, 2T) with its tag, so that after it no range
    // carries the next call's tag. Where the last call was not such a call (its job declined or
    // threw, so some ranges may hold older tags, one of which could come round again), or T
    // changed, every range is set to no call first.
    const uint64_t tag = call_tag(epoch);
    if (ranges_threads_ != T || tagged_epoch_ != epoch - 1) {
      for (int q = 0; q < ranges_cap_; ++q)
        ranges_[q].v.store(pack_range(kNoTag, 0, 0), std::memory_order_relaxed);
      ranges_threads_ = T;
    }
    // Shares by NUMA node (Note [NUMA expert placement]): active_ ascends, so the items of each
    // node's experts are contiguous; with one node, share i is [n·i/T, n·(i+1)/T).
    const int N = std::max(1, a.numa_nodes);
    // (Recomputed when the executor or node count changes; the vectors keep their capacity, so
    // a thread alternating between executors of one size does not allocate.)
    if (numa_ex_ != &ex || numa_.shares() != T || numa_.nodes() != N) {
      share_node_.assign(static_cast<size_t>(T), 0);
      for (int i = 0; i < T; ++i)
        share_node_[static_cast<size_t>(i)] = N > 1 ? ex.node_of_share(i) : 0;
      numa_.set(share_node_.data(), T, N);
      numa_ex_ = &ex;
    }
    node_first_.resize(static_cast<size_t>(N + 1));
    node_items_.resize(static_cast<size_t>(N + 1));
    share_items_.resize(static_cast<size_t>(4 * T));
    share_scratch_.resize(static_cast<size_t>(4 * T));
    for (int n = 0, j = 0; n <= N; ++n) {
      const int64_t first = first_expert_of_node(n, E, N);
      while (j < num_active && active_[j] < first) ++j;
      node_first_[static_cast<size_t>(n)] = j;
    }
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t per = phase == 0 ? tiles_i : dn_blocks;
      for (int n = 0; n <= N; ++n) node_items_[static_cast<size_t>(n)] = node_first_[n] * per;
      int64_t* items = share_scratch_.data() + phase * 2 * T;
      numa_.split(node_items_.data(), items);
      for (int q = 0; q < 2 * T; ++q) set_if(share_items_[phase * 2 * T + q], items[q]);
      if (!local)
        for (int i = 0; i < T; ++i)
          ranges_[phase * T + i].v.store(pack_range(tag, items[2 * i], items[2 * i + 1]),
                                         std::memory_order_relaxed);
    }
    // Tracing (set_trace): share i's marks at trace_[i · kTracePoints + point].
    const bool tr = trace_on_;
    if (tr) trace_.assign(static_cast<size_t>((T + 1) * kTracePoints), 0);
    auto mark = [&](int i, int point) {
      if (tr) trace_[static_cast<size_t>(i * kTracePoints + point)] = now_ns();
    };
    auto gate_up_item = [&](int64_t w) {
      phase1(w, w + 1);
      // The thread that completes expert j's tiles resets its count for the next call, prepares
      // its phase 2 activations and raises its flag (the call's number).
      const int64_t j = w / tiles_i;
      if (done_[j].fetch_add(1, std::memory_order_acq_rel) + 1 == tiles_i) {
        done_[j].store(0, std::memory_order_relaxed);
        prepare_hidden(j);
        ready_[j].store(epoch, std::memory_order_release);
      }
    };
    // A share that throws raises `abort_`, so that no other share waits for its work forever;
    // the executor hands the exception to the caller.
    if (!local) {
      stolen_.store(0, std::memory_order_relaxed);
      remote_stolen_.store(0, std::memory_order_relaxed);
    }
    const bool ahead = down_ahead_;
    // Where item w of a phase starts (phase 0: its gate tile), and its bytes.
    auto item_bytes = [&](int phase, int64_t w, int64_t& bytes) -> const uint8_t* {
      if (phase == 0) {
        const int64_t e = active_[w / tiles_i], tile = w % tiles_i;
        bytes = lgu.tile_bytes;
        return a.experts[e].gate + tile * lgu.tile_bytes;
      }
      const int64_t e = active_[w / dn_blocks], b = w % dn_blocks;
      const int64_t t0 = 2 * b * dn_pairs, t1 = std::min(ldn.num_tiles, t0 + 2 * dn_pairs);
      bytes = (t1 - t0) * ldn.tile_bytes;
      return a.experts[e].down + t0 * ldn.tile_bytes;
    };
    auto first_lines = [&](int phase, int64_t w) {
      int64_t bytes = 0;
      const uint8_t* p = item_bytes(phase, w, bytes);
      const int64_t lines = std::min<int64_t>(kAheadLines, bytes / 64);
      prefetch_l2(p, lines);
      if (phase == 0)  // and the same lines of its up tile
        prefetch_l2(a.experts[active_[w / tiles_i]].up + (w % tiles_i) * lgu.tile_bytes, lines);
    };
    auto down_item = [&](int64_t w, int i) {
      const int64_t j = w / dn_blocks, b = w % dn_blocks;
      if (ready_[j].load(std::memory_order_acquire) != epoch) {
        const int64_t t0 = tr ? now_ns() : 0;
        // Note [Phase 2's first lines]: while expert j's h is not ready, this item's weights
        // into L2, a few lines per poll.
        int64_t bytes = 0, issued = 0;
        const uint8_t* p = item_bytes(1, w, bytes);
        const int64_t lines = ahead ? bytes / 64 : 0;
        // (Polls that prefetch do not count towards wait_a_little's yielding.)
        for (int spins = 0; ready_[j].load(std::memory_order_acquire) != epoch;) {
          if (abort_.load(std::memory_order_relaxed)) return;
          if (issued < lines) {
            const int64_t n = std::min<int64_t>(8, lines - issued);
            prefetch_l2(p + 64 * issued, n);
            issued += n;
            continue;
          }
          wait_a_little(spins++);
        }
        if (tr) trace_[static_cast<size_t>(i * kTracePoints + kWaitNs)] += now_ns() - t0;
      }
      const int64_t p0 = b * dn_pairs, p1 = std::min(pairs, p0 + dn_pairs);
      phase2_slots(j * pairs + p0, j * pairs + p1);
      // Note [Column blocks finish the call]: the item that completes column block b (its last
      // expert) resets its count for the next call and adds the block's slot outputs into dst.
      // (A call whose share threw leaves dst with the blocks completed before the throw.)
      if (col_done_[b].n.fetch_add(1, std::memory_order_acq_rel) + 1 == num_active &&
          !abort_.load(std::memory_order_relaxed)) {
        col_done_[b].n.store(0, std::memory_order_relaxed);
        const int64_t t0 = tr ? now_ns() : 0;
        reduce_block(0, M, p0 * 2 * kTileRows, std::min(H, p1 * 2 * kTileRows));
        if (tr) trace_[static_cast<size_t>(i * kTracePoints + kReduceNs)] += now_ns() - t0;
      }
    };
    // Only a row prepared inside the job is waited for (row_ready_ holds the call's number).
    if (late_row && !local) row_ready_.store(0, std::memory_order_relaxed);
    auto share = [&](int i) {
      mark(i, kShareStart);
      try {
        if (late_row && i == 0) {  // first: every share waits for it
          tok_small_.prepare(x_row, a.src);
          row_ready_.store(epoch, std::memory_order_release);
          if (tr) trace_[static_cast<size_t>(T * kTracePoints + 4)] = now_ns();
        }
        // This share's own ranges (Note [A call's setup leaves the workers' lines alone]),
        // unless a thread out of work got there first.
        if (local)
          for (int phase = 0; phase < 2; ++phase)
            init_range(ranges_[phase * T + i], tag, share_items_[phase * 2 * T + 2 * i],
                       share_items_[phase * 2 * T + 2 * i + 1]);
        // The first lines of this share's first gate/up tiles, ahead of the kernel's own
        // software prefetch (which starts kPrefetchBytes in), while the row is prepared.
        const int64_t w0 = share_items_[2 * i];
        if (late_row && w0 < share_items_[2 * i + 1]) first_lines(0, w0);
        for (int spins = 0; late_row && row_ready_.load(std::memory_order_acquire) != epoch;
             ++spins) {
          if (abort_.load(std::memory_order_relaxed)) break;  // share 0 threw: the call fails
          wait_a_little(spins);
        }
        int64_t stolen = 0, remote_stolen = 0;
        for (int phase = 0; phase < 2; ++phase) {
          Range* r = ranges_.get() + phase * T;
          // Note [Phase 2's first lines]: the first lines of this share's first down item.
          if (phase == 1 && ahead) {
            const uint64_t v = r[i].v.load(std::memory_order_relaxed);
            if (range_front(v) < range_back(v)) first_lines(1, range_front(v));
          }
          for (int64_t w; (w = take_front(r[i])) >= 0;)
            phase == 0 ? gate_up_item(w) : down_item(w, i);
          mark(i, phase == 0 ? kOwnGateUpDone : kOwnDownDone);
          // Others' shares: on this thread's node first (Note [NUMA expert placement]).
          for (int remote = 0; remote < (numa_.nodes() > 1 ? 2 : 1); ++remote)
            for (int q = 1; q < T; ++q) {
              const int k = (i + q) % T;
              if ((numa_.node(k) != numa_.node(i)) != (remote == 1)) continue;  // this pass's nodes
              // Note [Stealing half a share]: the back half moves to this thread's own (empty)
              // range, where others may take from it in turn; then look again from the nearest
              // share.
              int64_t b0, b1;
              const int64_t* own = share_items_.data() + phase * 2 * T + 2 * k;
              if (!take_back_half(r[k], tag, own[0], own[1], b0, b1)) continue;
              stolen += b1 - b0;
              if (remote == 1) remote_stolen += b1 - b0;
              r[i].v.store(pack_range(tag, b0, b1), std::memory_order_release);
              if (ahead) first_lines(phase, b0);
              for (int64_t w; (w = take_front(r[i])) >= 0;)
                phase == 0 ? gate_up_item(w) : down_item(w, i);
              q = 0;
            }
          mark(i, phase == 0 ? kGateUpDone : kDownDone);
        }
        if (stolen > 0) add_for_call(stolen_, epoch, stolen);
        if (remote_stolen > 0) add_for_call(remote_stolen_, epoch, remote_stolen);
      } catch (...) {
        abort_.store(true, std::memory_order_relaxed);
        throw;
      }
      // Every column block was added by the item that completed it (Note [Column blocks finish
      // the call]); the two marks stay in the trace's format.
      mark(i, kBarrierDone);
      mark(i, kReduceDone);
    };
    if (tr) {
      trace_[static_cast<size_t>(T * kTracePoints)] = t_entry;
      trace_[static_cast<size_t>(T * kTracePoints + 3)] = t_grouped;
      if (!late_row) trace_[static_cast<size_t>(T * kTracePoints + 4)] = t_prepared;
      mark(T, 1);
    }
    if (ex.try_run_concurrent(T, std::ref(share))) {
      mark(T, 2);
      used_dataflow_ = true;
      tagged_epoch_ = epoch;  // every share ran: ranges [0, 2T) carry this call's tag
      lap(1);
      phase_s_[2] = phase_s_[3] = 0.0;  // one job: all of it counts as phase 1
      return;
    }
    if (late_row) tok_small_.prepare(x_row, a.src);  // the two phases below read it
  }

  // Decode-sized calls: every item costs the same; one contiguous share per thread (long runs of
  // consecutive tiles) unless TIDAL_EXPERT_EVEN=0. Prefill: experts differ in token count:
  // stealing.
  if (decode)
    ex.parallel_for_even(num_active * tiles_i, std::ref(phase1));
  else
    ex.parallel_for(num_active * tiles_i, 1, std::ref(phase1));

  lap(1);
  // Phase 2 activations.
  hid_small_.reserve(small.act, ldn, rows_small, isa_, small.whole_tiles());
  if (rows_large > 0) hid_large_.reserve(large.act, ldn, rows_large, isa_, large.whole_tiles());
  auto prepare_hidden_range = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) prepare_hidden(j);
  };
  if (num_active > 1 && S > kSerialSlots)
    ex.parallel_for(num_active, 1, std::ref(prepare_hidden_range));
  else
    prepare_hidden_range(0, num_active);
  lap(2);

  // Default limit 1 Mi outputs = 4 MiB, e.g. 512 slots of H = 2048 (64 tokens of top-8).
  if (slot_major) {
    slot_out_.resize(static_cast<size_t>(S * H));
    if (decode)
      ex.parallel_for_even(num_active * pairs, std::ref(phase2_slots));
    else
      ex.parallel_for(num_active * pairs, 1, std::ref(phase2_slots));
    reduce_slots();
    lap(3);
    return;
  }

  // Phase 2: dst[t] += w · down h over blocks of column-tile pairs of H, experts ascending. A task
  // takes a block of pairs so that each expert's activations (A tiles) are read once per block
  // from L3 and then reused from L2 across its pairs: with one pair per task, 64 tasks each
  // re-read every expert's activations (18 MB at 2048 tokens). One block per thread: every block
  // runs the same experts with the same token counts, so the blocks cost the same. At 2048 tokens
  // and 16 threads (4 pairs per task) phase 2 took 7.0-7.1 ms (INT8) and 9.5-9.8 ms (BF16)
  // against 7.6-7.7 and 10.4-12.6 ms with two blocks per thread (fourteenth session).
  const int64_t per_task =
      prefill_pairs_ > 0 ? std::min<int64_t>(pairs, prefill_pairs_)
                         : std::max<int64_t>(1, (pairs + ex.num_threads() - 1) / ex.num_threads());
  const int64_t blocks = (pairs + per_task - 1) / per_task;
  const bool ahead_on = prefill_ahead_;
  auto phase2 = [&](int64_t b0, int64_t b1) {
    alignas(64) float y0[kMaxRowsPerCall * kTileRows], y1[kMaxRowsPerCall * kTileRows];
    LineAhead ahead;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t q0 = blk * per_task, q1 = std::min(pairs, q0 + per_task);
      for (int64_t j = 0; j < num_active; ++j) {
        const int64_t e = active_[j];
        const bool big = large_[j];
        const ExpertGemmVariant& v = big ? large : small;
        const ActBuffer& buf = big ? hid_large_ : hid_small_;
        // Note [Prefill down: the next expert ahead]: expert j + 1's tiles and rows, spread over
        // this expert's rows of every pair.
        ahead.clear();
        int64_t per_row = 0;
        if (ahead_on && j + 1 < num_active) {
          const int64_t e1 = active_[j + 1];
          const int64_t first = 2 * q0, last = std::min(2 * q1, ldn.num_tiles);
          ahead.add(a.experts[e1].down + first * ldn.tile_bytes, (last - first) * ldn.tile_bytes);
          add_rows(ahead, large_[j + 1] ? hid_large_ : hid_small_, row0_[j + 1], count_[e1]);
          const int64_t steps = std::max<int64_t>(1, count_[e] * (q1 - q0));
          per_row = (ahead.total() + steps - 1) / steps;
        }
        for (int64_t c0 = 0; c0 < count_[e]; c0 += kMaxRowsPerCall) {
          const int64_t mc = std::min(kMaxRowsPerCall, count_[e] - c0);
          const ActRows rows = buf.rows(row0_[j] + c0);
          for (int64_t p = q0; p < q1; ++p) {
            const int64_t tile = 2 * p;
            const bool two = tile + 1 < ldn.num_tiles;
            const int64_t col0 = tile * kTileRows, ncol = std::min(2 * kTileRows, H - col0);
            const uint8_t* t0 = a.experts[e].down + tile * ldn.tile_bytes;
            if (two)
              v.run_pair(ldn, t0, t0 + ldn.tile_bytes, rows, mc, y0, y1);
            else
              v.run(ldn, t0, rows, mc, y0);
            const int64_t n0 = std::min(kTileRows, ncol), n1 = ncol - n0;
            for (int64_t i = 0; i < mc; ++i) {
              if (per_row > 0) ahead.issue(per_row);
              const int64_t s = offset_[e] + c0 + i;
              float* d = a.dst + slot_token_[s] * a.ld_dst + col0;
              const float wgt = slot_weight_[s];
              const float* ya = y0 + i * kTileRows;
              const float* yb = y1 + i * kTileRows;
#pragma omp simd
              for (int64_t r = 0; r < n0; ++r) d[r] += wgt * ya[r];
#pragma omp simd
              for (int64_t r = 0; r < n1; ++r) d[kTileRows + r] += wgt * yb[r];
            }
          }
        }
      }
    }
  };
  ex.parallel_for(blocks, 1, std::ref(phase2));
  lap(3);
}

void moe_experts_ref(const MoeExpertsArgs& a) {
  const PackedLayout& lgu = *a.gate_up;
  const PackedLayout& ldn = *a.down;
  const int64_t H = ldn.n, I = lgu.n, K = a.top_k;
  const ExpertDType dt = lgu.dtype;
  const ActKind kind = dt == ExpertDType::kBF16 ? ActKind::kF32 : ActKind::kInt8Groups;
  const TileKernelFn fn = dt == ExpertDType::kBF16 ? ref::tile_f32 : ref::tile_int8_groups;
  ActBuffer x, h;
  x.reserve(kind, lgu, 1);
  h.reserve(kind, ldn, 1);
  std::vector<float> g(static_cast<size_t>(lgu.num_tiles * kTileRows)), u(g.size()),
      hid(static_cast<size_t>(I)), y(static_cast<size_t>(ldn.num_tiles * kTileRows));
  std::vector<std::pair<int32_t, float>> routed(static_cast<size_t>(K));
  for (int64_t t = 0; t < a.m; ++t) {
    for (int64_t i = 0; i < K; ++i) routed[i] = {a.ids[t * K + i], a.weights[t * K + i]};
    std::sort(routed.begin(), routed.end(),
              [](const auto& p, const auto& q) { return p.first < q.first; });
    x.prepare(0, a.src + t * a.ld_src);
    for (const auto& [e, w] : routed) {
      if (e < 0 || e >= a.num_experts)
        throw std::invalid_argument("moe_experts_ref: expert id out of range");
      for (int64_t tile = 0; tile < lgu.num_tiles; ++tile) {
        fn(lgu, a.experts[e].gate + tile * lgu.tile_bytes, x.rows(0), 1, g.data() + tile * 16);
        fn(lgu, a.experts[e].up + tile * lgu.tile_bytes, x.rows(0), 1, u.data() + tile * 16);
      }
      for (int64_t c = 0; c < I; ++c) hid[c] = silu(g[c]) * u[c];
      h.prepare(0, hid.data());
      for (int64_t tile = 0; tile < ldn.num_tiles; ++tile)
        fn(ldn, a.experts[e].down + tile * ldn.tile_bytes, h.rows(0), 1, y.data() + tile * 16);
      float* d = a.dst + t * a.ld_dst;
      for (int64_t c = 0; c < H; ++c) d[c] += w * y[c];
    }
  }
}

}  // namespace tidal::kernels::cpu
