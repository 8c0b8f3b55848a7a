// SPDX-License-Identifier: Apache-2.0
// ExpertStore's packed region out of a file mapping (Note [Packed experts out of the file
// mapping]): after a packed-expert cache hit the experts live in the cache file's mapping; the
// copy into anonymous memory must leave every result bit-identical and the per-layer ranges the
// VRAM expert cache registers must tile the region.
#include "offload/expert_store.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"
#include "core/config/model_config.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/moe_experts.h"
#include "tolerances.h"

namespace tidal::offload {
namespace {

constexpr int64_t kH = 64, kI = 32, kE = 8, kLayers = 3;

struct Tiny {
  core::ModelConfig cfg;
  std::vector<std::vector<uint16_t>> data;
  std::unique_ptr<core::Checkpoint> ck;
};

Tiny make_tiny(const std::filesystem::path& dir) {
  Tiny t;
  nlohmann::json m{{"model_type", "qwen3_moe"},   {"vocab_size", 10},
                   {"hidden_size", kH},           {"num_hidden_layers", kLayers},
                   {"num_attention_heads", 4},    {"num_key_value_heads", 2},
                   {"num_experts", kE},           {"num_experts_per_tok", 2},
                   {"moe_intermediate_size", kI}, {"norm_topk_prob", true}};
  t.cfg = core::ModelConfig::from_json(m, "config.json");
  std::vector<core::TensorInfo> ts;
  uint32_t seed = 7;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    const int64_t n = shape[0] * shape[1] * shape[2];
    const auto v = test::random_vec(static_cast<size_t>(n), seed++, 0.2f);
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = kernels::f32_to_bf16(v[i]);
    t.data.push_back(std::move(b));
    core::TensorInfo ti;
    ti.name = name;
    ti.dtype = kernels::DType::kBF16;
    ti.dtype_name = "BF16";
    ti.shape = std::move(shape);
    ti.data = reinterpret_cast<const std::byte*>(t.data.back().data());
    ti.nbytes = static_cast<size_t>(n) * 2;
    ti.file = "model.safetensors";
    ts.push_back(std::move(ti));
  };
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".mlp.experts.";
    add(pre + "gate_up_proj", {kE, 2 * kI, kH});
    add(pre + "down_proj", {kE, kH, kI});
  }
  t.ck = core::Checkpoint::from_tensors(dir, std::move(ts), nullptr);
  return t;
}

// An empty directory for a test's checkpoint and packed-expert cache.
std::filesystem::path fresh_dir(const char* name) {
  const auto dir = std::filesystem::path(testing::TempDir()) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// Group-32 experts of `dtype`, cached under dir/cache.
ExpertStoreOptions cached(kernels::cpu::ExpertDType dtype, const std::filesystem::path& dir) {
  ExpertStoreOptions o;
  o.dtype = dtype;
  o.group_size = 32;
  o.cache_dir = dir / "cache";
  return o;
}

// Every MoE layer's routed-expert output for T tokens (top-k ids and weights), one vector per
// layer.
std::vector<std::vector<float>> forward_layers(ExpertStore& s, kernels::Executor& ex,
                                               const std::vector<float>& x,
                                               const std::vector<int32_t>& ids,
                                               const std::vector<float>& w, int64_t T, int64_t k) {
  std::vector<std::vector<float>> out;
  for (int64_t l = 0; l < kLayers; ++l) {
    out.emplace_back(static_cast<size_t>(T * kH), 0.f);
    s.forward(l, x.data(), T, ids.data(), w.data(), k, out.back().data(), ex);
  }
  return out;
}

TEST(ExpertStore, PackedExpertsMoveOutOfTheCacheFileUnchanged) {
  const auto dir = fresh_dir("tidal_expert_store_test");
  auto t = make_tiny(dir);
  auto ex = kernels::make_tbb_executor(2);
  const ExpertStoreOptions o = cached(kernels::cpu::ExpertDType::kINT8, dir);
  ExpertStore first(t.cfg, *t.ck);
  first.pack(o, *ex, {});
  ASSERT_EQ(first.cache_state(), "written");
  EXPECT_FALSE(first.packed_region_file_backed());  // packed into anonymous memory
  ExpertStore store(t.cfg, *t.ck);
  store.pack(o, *ex, {});
  ASSERT_EQ(store.cache_state(), "hit");
  ASSERT_TRUE(store.packed_region_file_backed());

  const int64_t T = 5, k = 2;
  const auto x = test::random_vec(static_cast<size_t>(T * kH), 99);
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> w(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<int32_t>((i * 5 + i / 2) % kE);
    w[i] = 0.25f + 0.125f * static_cast<float>(i % 3);
  }
  auto run = [&](ExpertStore& s) { return forward_layers(s, *ex, x, ids, w, T, k); };
  const auto before = run(store);
  EXPECT_EQ(before, run(first));  // the cache file holds what was packed
  const auto old_region = store.packed_region();
  store.copy_packed_to_anonymous(*ex);
  EXPECT_FALSE(store.packed_region_file_backed());
  const auto region = store.packed_region();
  EXPECT_EQ(region.second, old_region.second);
  EXPECT_NE(region.first, old_region.first);
  const auto after = run(store);
  EXPECT_EQ(before, after);
  double norm = 0;
  for (const auto& v : after)
    for (float f : v) norm += std::fabs(f);
  EXPECT_GT(norm, 0.0);  // the experts did produce something

  // Per-layer ranges: one per MoE layer, in order, tiling the region; each expert inside its own.
  const auto layers = store.packed_layer_regions();
  ASSERT_EQ(layers.size(), static_cast<size_t>(kLayers));
  auto* p = static_cast<uint8_t*>(region.first);
  size_t total = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    EXPECT_EQ(static_cast<uint8_t*>(layers[l].first), p + total) << "layer " << l;
    for (int64_t e = 0; e < kE; ++e) {
      const auto v = store.packed_expert(static_cast<int64_t>(l), e);
      const auto* lo = static_cast<const uint8_t*>(layers[l].first);
      EXPECT_GE(v.gate, lo);
      EXPECT_LT(v.down, lo + layers[l].second);
    }
    total += layers[l].second;
  }
  EXPECT_EQ(total, region.second);
  store.copy_packed_to_anonymous(*ex);  // already anonymous: nothing moves
  EXPECT_EQ(store.packed_region().first, region.first);
  std::filesystem::remove_all(dir);
}

// Note [Packed experts on their NUMA nodes]: page ranges per (layer, node), page-aligned,
// disjoint and in order, tiling the region's pages; node n's range holds experts
// [first_expert_of_node(n), ...) of its layer.
TEST(ExpertStore, NumaPageRangesFollowTheExpertRanges) {
  const size_t page = 4096, per = 3000;
  const std::vector<size_t> layers{0, 10 * per, 20 * per};
  const size_t region = 30 * per;
  EXPECT_TRUE(numa_page_ranges(layers, per, 10, 1, page).empty());
  for (int nodes : {2, 3}) {
    const auto r = numa_page_ranges(layers, per, 10, nodes, page);
    ASSERT_FALSE(r.empty());
    size_t at = 0;
    for (const auto& x : r) {
      EXPECT_EQ(x.begin % page, 0u);
      EXPECT_EQ(x.end % page, 0u);
      EXPECT_EQ(x.begin, at) << "nodes " << nodes;  // disjoint, contiguous, in order
      at = x.end;
      // Every page that lies wholly inside one expert is on that expert's node.
      for (size_t pg = x.begin; pg < x.end; pg += page) {
        const size_t first = pg / per, last = (pg + page - 1) / per;  // experts, all layers
        if (first == last && last < 30) {
          EXPECT_EQ(kernels::cpu::expert_numa_node(static_cast<int64_t>(first % 10), 10, nodes),
                    x.node)
              << "page at " << pg;
        }
      }
    }
    EXPECT_EQ(at, (region + page - 1) / page * page);  // the whole region, last page included
  }
}

// An executor over a real one that reports two NUMA nodes and records the binding requests (as
// if the system granted them, or refusing them).
class TwoNodes final : public kernels::Executor {
 public:
  TwoNodes(kernels::Executor& inner, bool grant) : inner_(inner), grant_(grant) {}
  struct Call {
    const uint8_t* addr;
    size_t len;
    int node;
    bool migrate;
  };
  std::vector<Call> calls;
  int num_threads() const override { return inner_.num_threads(); }
  const char* name() const override { return "two-nodes"; }
  int numa_nodes() const override { return 2; }
  int node_of_share(int i) const override { return i % 2; }
  bool bind_memory(void* addr, size_t len, int node, bool migrate) override {
    calls.push_back({static_cast<const uint8_t*>(addr), len, node, migrate});
    return grant_;
  }
  void parallel_for(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn) override {
    inner_.parallel_for(n, grain, fn);
  }
  bool try_run_concurrent(int n, const std::function<void(int)>& fn) override {
    return inner_.try_run_concurrent(n, fn);
  }

 private:
  kernels::Executor& inner_;
  bool grant_;
};

// On two nodes the store binds each layer's expert ranges before packing (fresh region), with
// migration for a cache hit's file pages, and again before copying them into anonymous memory;
// the results stay bit-identical to one node's. A refusal is reported and changes nothing else.
TEST(ExpertStore, BindsExpertRangesToNumaNodes) {
  const auto dir = fresh_dir("tidal_expert_store_numa");
  auto t = make_tiny(dir);
  auto spin = kernels::make_spin_executor(3);
  const ExpertStoreOptions o = cached(kernels::cpu::ExpertDType::kINT4, dir);
  ExpertStore one(t.cfg, *t.ck);
  one.pack(o, *spin, {});
  EXPECT_EQ(one.numa_placement(), "one node");

  const int64_t T = 3, k = 2;
  const auto x = test::random_vec(static_cast<size_t>(T * kH), 5);
  std::vector<int32_t> ids{0, 7, 3, 4, 6, 1};
  std::vector<float> w{0.5f, 0.25f, 0.75f, 0.125f, 0.5f, 0.5f};
  auto run = [&](ExpertStore& s, kernels::Executor& ex) {
    return forward_layers(s, ex, x, ids, w, T, k);
  };
  const auto want = run(one, *spin);

  auto check_calls = [&](const TwoNodes& ex, const void* base, size_t bytes, bool migrate) {
    ASSERT_EQ(ex.calls.size(), static_cast<size_t>(2 * kLayers));
    const auto* b = static_cast<const uint8_t*>(base);
    for (size_t i = 0; i < ex.calls.size(); ++i) {
      const auto& c = ex.calls[i];
      EXPECT_EQ(c.node, static_cast<int>(i % 2));
      EXPECT_EQ(c.migrate, migrate);
      EXPECT_GE(c.addr, b);
      EXPECT_LE(c.addr + c.len, b + (bytes + 4095) / 4096 * 4096);
    }
  };
  // Packing drops the source pages it read (MADV_DONTNEED), which zeroes this test's in-memory
  // checkpoint: each pack from the source gets its own.
  auto t2 = make_tiny(dir), t3 = make_tiny(dir);
  TwoNodes fresh_ex(*spin, true);
  ExpertStore fresh(t2.cfg, *t2.ck);
  ExpertStoreOptions no_cache = o;
  no_cache.cache_dir.clear();
  fresh.pack(no_cache, fresh_ex, {});
  EXPECT_EQ(fresh.numa_placement(), "bound to 2 nodes");
  check_calls(fresh_ex, fresh.packed_region().first, fresh.packed_region().second, false);
  EXPECT_EQ(run(fresh, fresh_ex), want);

  TwoNodes hit_ex(*spin, true);
  ExpertStore hit(t.cfg, *t.ck);
  hit.pack(o, hit_ex, {});
  ASSERT_EQ(hit.cache_state(), "hit");
  check_calls(hit_ex, hit.packed_region().first, hit.packed_region().second, true);
  EXPECT_EQ(run(hit, hit_ex), want);
  hit_ex.calls.clear();
  hit.copy_packed_to_anonymous(hit_ex);
  check_calls(hit_ex, hit.packed_region().first, hit.packed_region().second, false);
  EXPECT_EQ(run(hit, hit_ex), want);

  TwoNodes refused_ex(*spin, false);
  ExpertStore refused(t3.cfg, *t3.ck);
  refused.pack(no_cache, refused_ex, {});
  EXPECT_EQ(refused.numa_placement(), "not bound: the system refused 6 of 6 page ranges");
  EXPECT_EQ(run(refused, refused_ex), want);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tidal::offload
