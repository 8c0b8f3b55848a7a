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
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/checkpoint/safetensors_reader.h"
#include "core/config/model_config.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
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

TEST(ExpertStore, PackedExpertsMoveOutOfTheCacheFileUnchanged) {
  const auto dir = std::filesystem::path(testing::TempDir()) / "tidal_expert_store_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto t = make_tiny(dir);
  auto ex = kernels::make_tbb_executor(2);
  ExpertStoreOptions o;
  o.dtype = kernels::cpu::ExpertDType::kINT8;
  o.group_size = 32;
  o.cache_dir = dir / "cache";
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
  auto run = [&](ExpertStore& s) {
    std::vector<std::vector<float>> out;
    for (int64_t l = 0; l < kLayers; ++l) {
      out.emplace_back(static_cast<size_t>(T * kH), 0.f);
      s.forward(l, x.data(), T, ids.data(), w.data(), k, out.back().data(), *ex);
    }
    return out;
  };
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

}  // namespace
}  // namespace tidal::offload
