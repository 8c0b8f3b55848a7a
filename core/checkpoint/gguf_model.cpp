// SPDX-License-Identifier: Apache-2.0
/// \file gguf_model.cpp
/// \brief GGUF (llama.cpp) model files as tidal checkpoints.
///
/// Note [GGUF models]
/// llama.cpp's converter (convert_hf_to_gguf.py, conversion/qwen.py) renames every tensor and
/// changes some values; python/tidal/gguf.py writes the same layout. Loading undoes it:
///  - names: token_embd -> embed_tokens, blk.N.attn_qkv -> layers.N.linear_attn.in_proj_qkv, ...
///    (kTensorMap below); stacked experts ffn_{gate,up,down}_exps become
///    layers.N.mlp.experts.{gate,up,down}_proj [E, rows, cols] and stay in the file, in their ggml
///    type, for the expert packer (offload/expert_store.cpp);
///  - hybrid models (qwen35moe, qwen3next) store RMSNorm weights as 1 + w (llama.cpp multiplies
///    by the weight): 1 is subtracted (not the DeltaNet output norm, which is stored as is);
///  - ssm_a = -exp(A_log): A_log = log(-ssm_a);
///  - qwen35moe orders DeltaNet value heads tiled ([v0 v2][v1 v3] for 2 key heads) where HF groups
///    them per key head ([v0 v1][v2 v3]): rows of in_proj_qkv's v part, in_proj_z, in_proj_a/b,
///    dt_bias, A_log, conv1d's v channels and columns of out_proj are put back;
///  - qwen3next splits in_proj_qkvz (per key head: q, k, v, z) into attn_qkv (all q | all k | all
///    v) and attn_gate (z): they are interleaved again;
///  - conv1d is stored [channels, kernel]; HF has [channels, 1, kernel].
/// Dense tensors that need no change and are F32/F16/BF16 are used in place (memory-mapped);
/// the others are decoded (ggml blocks) and changed at load, into BF16 for quantised matrices
/// (rounding: 2^-9 relative, far below the 4-8 bit step of the source) and F32 otherwise.
/// The metadata keys are llama.cpp's (src/llama-arch.cpp: LLM_KV_*), per architecture.
#include "core/checkpoint/gguf_model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <string_view>
#include <system_error>
#include <thread>

#include "core/checkpoint/gguf_reader.h"
#include "core/config/model_config.h"
#include "core/error.h"
#include "kernels/cpu/weight_decode.h"

namespace tidal::core {
namespace fs = std::filesystem;
using json = nlohmann::json;
namespace kc = kernels::cpu;

const std::vector<std::string>& gguf_architectures() {
  static const std::vector<std::string> a = {"qwen35moe", "qwen3next", "qwen3moe"};
  return a;
}

namespace {

struct Keep {
  std::vector<std::unique_ptr<GgufFile>> files;
  std::vector<std::unique_ptr<std::byte[]>> buffers;
};

// How a tensor's values change on the way back to HF (see the Note).
enum class Fix { kNone, kMinusOne, kLogNeg, kVRows1, kVRows, kVCols, kQkv, kConv };

struct Job {
  std::string hf;                      // HF name
  std::vector<const GgufTensor*> src;  // one, or two for qwen3next in_proj_qkvz
  std::vector<int64_t> shape;          // HF shape
  Fix fix = Fix::kNone;
  bool qkvz = false;
};

class Mapper {
 public:
  Mapper(const fs::path& path, Keep& keep) : path_(path), keep_(keep) {}

  void open_parts() {
    // "<stem>-0000K-of-0000N.gguf", parsed by hand: std::regex consults the global locale, which a
    // Python process may have set to one libstdc++'s regex compiler crashes on (seen on the GPU
    // machine with pytest).
    const std::string fname = path_.filename().string();
    auto digits = [](std::string_view v) {
      return v.size() == 5 &&
             std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; });
    };
    const std::string_view f(fname);
    const bool split = f.size() > 20 && f.substr(f.size() - 5) == ".gguf" &&
                       f.substr(f.size() - 20, 1) == "-" && digits(f.substr(f.size() - 19, 5)) &&
                       f.substr(f.size() - 14, 4) == "-of-" && digits(f.substr(f.size() - 10, 5));
    if (split) {
      const std::string stem(f.substr(0, f.size() - 20)), count(f.substr(f.size() - 10, 5));
      const int n = std::stoi(count), no = std::stoi(std::string(f.substr(f.size() - 19, 5)));
      TIDAL_CHECK(n >= 1, FormatError, "GGUF file \"{}\": bad split count in its name",
                  path_.string());
      TIDAL_CHECK(no == 1, InvalidArgument,
                  "GGUF file \"{}\" is part {} of a split model: load its first part ({}-00001-of-"
                  "{}.gguf)",
                  path_.string(), no, stem, count);
      for (int i = 1; i <= n; ++i) {
        const fs::path p =
            path_.parent_path() / fmt::format("{}-{:05d}-of-{}.gguf", stem, i, count);
        TIDAL_CHECK(fs::exists(p), FileNotFound,
                    "GGUF split model \"{}\": part {} of {} (\"{}\") is missing", path_.string(), i,
                    n, p.filename().string());
        parts_.push_back(p);
      }
    } else {
      parts_.push_back(path_);
    }
    for (const auto& p : parts_) keep_.files.push_back(std::make_unique<GgufFile>(p));
    index();
  }

  /// One file already parsed (from memory: tests and fuzzing).
  void use(std::unique_ptr<GgufFile> f) {
    parts_.push_back(path_);
    keep_.files.push_back(std::move(f));
    index();
  }

  void index() {
    const json& md = keep_.files[0]->metadata();
    const int64_t count = md.contains("split.count") && md["split.count"].is_number_integer()
                              ? md["split.count"].get<int64_t>()
                              : 1;
    TIDAL_CHECK(count == static_cast<int64_t>(parts_.size()), FormatError,
                "GGUF file \"{}\": its metadata says the model is split in {} parts, but {} "
                "found{}",
                path_.string(), count, parts_.size(),
                parts_.size() == 1 ? " (rename the parts name-0000K-of-0000N.gguf)" : "");
    for (const auto& f : keep_.files)
      for (const auto& t : f->tensors()) {
        auto [it, inserted] = tensors_.emplace(t.name, &t);
        TIDAL_CHECK(inserted, FormatError, "GGUF model \"{}\": tensor \"{}\" appears twice",
                    path_.string(), t.name);
        file_of_[&t] = f.get();
      }
  }

  const json& md() const { return keep_.files[0]->metadata(); }
  std::string where() const { return path_.string(); }

  size_t tensor_count() const { return tensors_.size(); }
  const GgufTensor* find(const std::string& n) const {
    auto it = tensors_.find(n);
    return it == tensors_.end() ? nullptr : it->second;
  }
  const GgufTensor& need(const std::string& n, const std::string& what) const {
    const GgufTensor* t = find(n);
    TIDAL_CHECK(t != nullptr, FormatError, "GGUF model \"{}\": tensor \"{}\" is missing ({})",
                where(), n, what);
    return *t;
  }
  std::string file_name(const GgufTensor& t) const {
    return fs::path(file_of_.at(&t)->name()).filename().string();
  }

  bool has_key(const std::string& k) const { return md().contains(k); }
  int64_t u(const std::string& k) const {
    TIDAL_CHECK(md().contains(k), FormatError, "GGUF file \"{}\": metadata key \"{}\" is missing",
                where(), k);
    const json& v = md().at(k);
    TIDAL_CHECK(v.is_number_integer(), FormatError,
                "GGUF file \"{}\": metadata \"{}\" should be an integer, got {}", where(), k,
                v.type_name());
    return v.get<int64_t>();
  }
  int64_t u(const std::string& k, int64_t dflt) const { return has_key(k) ? u(k) : dflt; }
  double f(const std::string& k, double dflt) const {
    if (!has_key(k)) return dflt;
    const json& v = md().at(k);
    TIDAL_CHECK(v.is_number(), FormatError, "GGUF file \"{}\": metadata \"{}\" should be a number",
                where(), k);
    return v.get<double>();
  }

  std::vector<fs::path> parts_;

 private:
  fs::path path_;
  Keep& keep_;
  std::map<std::string, const GgufTensor*> tensors_;
  std::map<const GgufTensor*, const GgufFile*> file_of_;
};

// Decodes a whole tensor to fp32 (row-major, `numel` values).
std::vector<float> decode_all(const GgufTensor& t) {
  const int64_t cols = t.ne.empty() ? 1 : t.ne[0];
  int64_t rows = 1;
  for (size_t i = 1; i < t.ne.size(); ++i) rows *= t.ne[i];
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const size_t rb = kc::ggml_row_bytes(static_cast<int32_t>(t.type), cols);
  for (int64_t r = 0; r < rows; ++r)
    kc::decode_ggml_row(static_cast<int32_t>(t.type), t.data + r * rb, cols, out.data() + r * cols);
  return out;
}

}  // namespace

namespace {
GgufModel build(Mapper& g, const std::shared_ptr<Keep>& keep, const fs::path& path, bool decode);
}  // namespace

GgufModel open_gguf_model(const fs::path& path, bool decode) {
  TIDAL_CHECK(fs::exists(path), FileNotFound, "GGUF file \"{}\" does not exist", path.string());
  auto keep = std::make_shared<Keep>();
  Mapper g(path, *keep);
  g.open_parts();
  return build(g, keep, path, decode);
}

GgufModel open_gguf_model(const std::byte* data, size_t size, const std::string& name,
                          bool decode) {
  auto keep = std::make_shared<Keep>();
  Mapper g(name, *keep);
  g.use(std::make_unique<GgufFile>(data, size, name));
  return build(g, keep, name, decode);
}

namespace {
GgufModel build(Mapper& g, const std::shared_ptr<Keep>& keep, const fs::path& path, bool decode) {
  GgufModel out;
  out.parts = g.parts_;
  const json& md = g.md();
  TIDAL_CHECK(md.contains("general.architecture") && md["general.architecture"].is_string(),
              FormatError, "GGUF file \"{}\": metadata \"general.architecture\" is missing",
              path.string());
  const std::string arch = md["general.architecture"].get<std::string>();
  out.architecture = arch;
  TIDAL_CHECK(std::find(gguf_architectures().begin(), gguf_architectures().end(), arch) !=
                  gguf_architectures().end(),
              Unsupported,
              "GGUF file \"{}\": architecture \"{}\" is not supported (tidal runs: {})",
              path.string(), arch, fmt::join(gguf_architectures(), ", "));
  const bool hybrid = arch != "qwen3moe";
  const std::string a = arch + ".";

  // ---- config -------------------------------------------------------------------------------
  json c = json::object();
  c["model_type"] = arch == "qwen35moe"   ? "qwen3_5_moe_text"
                    : arch == "qwen3next" ? "qwen3_next"
                                          : "qwen3_moe";
  // Qwen3.5/3.6 files from current llama.cpp append their MTP layers (nextn) to block_count; tidal
  // runs the main layers and leaves blk.L.. (MTP) out.
  const int64_t blocks = g.u(a + "block_count"), nextn = g.u(a + "nextn_predict_layers", 0);
  TIDAL_CHECK(
      blocks >= 1 && nextn >= 0 && nextn < blocks &&
          blocks <= static_cast<int64_t>(g.tensor_count()),
      FormatError,
      "GGUF file \"{}\": block_count {} (nextn_predict_layers {}) does not fit its {} tensors",
      path.string(), blocks, nextn, g.tensor_count());
  const int64_t L = blocks - nextn, H = g.u(a + "embedding_length");
  const int64_t heads = g.u(a + "attention.head_count");
  const GgufTensor& embd = g.need("token_embd.weight", "the token embedding");
  TIDAL_CHECK(embd.ne.size() == 2 && embd.ne[0] == H, FormatError,
              "GGUF model \"{}\": token_embd.weight is {} (ggml ne), expected [{}, vocab]",
              path.string(), fmt::join(embd.ne, ", "), H);
  c["vocab_size"] = g.u(a + "vocab_size", embd.ne[1]);
  c["hidden_size"] = H;
  c["num_hidden_layers"] = L;
  c["num_attention_heads"] = heads;
  c["num_key_value_heads"] = g.u(a + "attention.head_count_kv", heads);
  const int64_t head_dim = g.u(a + "attention.key_length", heads > 0 ? H / heads : 0);
  c["head_dim"] = head_dim;
  c["rms_norm_eps"] = g.f(a + "attention.layer_norm_rms_epsilon", 1e-6);
  c["max_position_embeddings"] = g.u(a + "context_length", 32768);
  json rope = json::object();
  rope["rope_theta"] = g.f(a + "rope.freq_base", 10000.0);
  rope["rope_type"] = "default";
  if (g.has_key(a + "rope.scaling.type")) {
    const json& st = md.at(a + "rope.scaling.type");
    const std::string type = st.is_string() ? st.get<std::string>() : "?";
    if (type == "yarn") {
      rope["rope_type"] = "yarn";
      rope["factor"] = g.f(a + "rope.scaling.factor", 1.0);
      rope["original_max_position_embeddings"] = g.u(a + "rope.scaling.original_context_length", 0);
    } else {
      TIDAL_CHECK(
          type == "none" || (type == "linear" && g.f(a + "rope.scaling.factor", 1.0) == 1.0),
          Unsupported, "GGUF file \"{}\": rope scaling \"{}\" is not supported", path.string(),
          type);
    }
  }
  if (hybrid && head_dim > 0)
    rope["partial_rotary_factor"] =
        static_cast<double>(g.u(a + "rope.dimension_count", head_dim / 4)) /
        static_cast<double>(head_dim);
  c["rope_parameters"] = rope;
  c["num_experts"] = g.u(a + "expert_count");
  c["num_experts_per_tok"] = g.u(a + "expert_used_count");
  c["moe_intermediate_size"] = g.u(a + "expert_feed_forward_length");
  if (g.has_key(a + "feed_forward_length")) c["intermediate_size"] = g.u(a + "feed_forward_length");
  c["norm_topk_prob"] = true;  // llama.cpp normalises the top-k weights of these models
  c["tie_word_embeddings"] = g.find("output.weight") == nullptr;
  int64_t nk = 0, nv = 0, dk = 0, dv = 0;
  std::vector<std::string> types;
  std::vector<int64_t> mlp_only;
  for (int64_t i = 0; i < L; ++i) {
    const std::string b = fmt::format("blk.{}.", i);
    types.push_back(!hybrid || g.find(b + "attn_q.weight") ? "full_attention" : "linear_attention");
    if (!g.find(b + "ffn_gate_exps.weight")) mlp_only.push_back(i);
  }
  if (hybrid) {
    c["shared_expert_intermediate_size"] = g.u(a + "expert_shared_feed_forward_length");
    c["linear_conv_kernel_dim"] = g.u(a + "ssm.conv_kernel");
    dk = g.u(a + "ssm.state_size");
    nk = g.u(a + "ssm.group_count");
    nv = g.u(a + "ssm.time_step_rank");
    TIDAL_CHECK(nk > 0 && nv > 0 && nv % nk == 0 && g.u(a + "ssm.inner_size") % nv == 0,
                FormatError,
                "GGUF file \"{}\": ssm.group_count {} / time_step_rank {} / inner_size {} do not "
                "describe whole DeltaNet heads",
                path.string(), nk, nv, g.u(a + "ssm.inner_size"));
    dv = g.u(a + "ssm.inner_size") / nv;
    c["linear_key_head_dim"] = dk;
    c["linear_num_key_heads"] = nk;
    c["linear_num_value_heads"] = nv;
    c["linear_value_head_dim"] = dv;
    c["layer_types"] = types;
    TIDAL_CHECK(mlp_only.empty(), Unsupported,
                "GGUF model \"{}\": layer {} has no routed experts (ffn_gate_exps); every layer "
                "of {} is MoE",
                path.string(), mlp_only.empty() ? 0 : mlp_only[0], arch);
  } else if (!mlp_only.empty()) {
    c["mlp_only_layers"] = mlp_only;
  }
  out.config = c;
  // Validates the whole config before tensors are touched (a bad value is a FormatError here).
  const ModelConfig cfg = ModelConfig::from_json(c, path.string());

  // ---- tensors ------------------------------------------------------------------------------
  const bool reorder = arch == "qwen35moe" && nk != nv;
  std::vector<Job> jobs;
  std::vector<TensorInfo> direct;
  const std::string P = cfg.weight_prefix;
  auto add = [&](const std::string& gguf, const std::string& hf, std::vector<int64_t> shape,
                 Fix fix = Fix::kNone) {
    const GgufTensor& t = g.need(gguf, "needed for " + hf);
    Job j{hf, {&t}, std::move(shape), fix};
    jobs.push_back(std::move(j));
  };
  const Fix norm = hybrid ? Fix::kMinusOne : Fix::kNone;
  const int64_t V = cfg.vocab_size, E = cfg.num_experts, I = cfg.moe_intermediate_size;
  add("token_embd.weight", P + "embed_tokens.weight", {V, H});
  add("output_norm.weight", P + "norm.weight", {H}, norm);
  if (g.find("output.weight")) add("output.weight", "lm_head.weight", {V, H});
  for (int64_t i = 0; i < L; ++i) {
    const std::string b = fmt::format("blk.{}.", i), h = fmt::format("{}layers.{}.", P, i);
    add(b + "attn_norm.weight", h + "input_layernorm.weight", {H}, norm);
    add(b + (hybrid ? "post_attention_norm.weight" : "ffn_norm.weight"),
        h + "post_attention_layernorm.weight", {H}, norm);
    if (cfg.layer_types[i] == LayerType::kFullAttention) {
      const int64_t q_rows = cfg.num_attention_heads * cfg.head_dim * (hybrid ? 2 : 1);
      const int64_t kv_rows = cfg.num_key_value_heads * cfg.head_dim;
      const std::string s = h + "self_attn.";
      add(b + "attn_q.weight", s + "q_proj.weight", {q_rows, H});
      add(b + "attn_k.weight", s + "k_proj.weight", {kv_rows, H});
      add(b + "attn_v.weight", s + "v_proj.weight", {kv_rows, H});
      add(b + "attn_output.weight", s + "o_proj.weight",
          {H, cfg.num_attention_heads * cfg.head_dim});
      add(b + "attn_q_norm.weight", s + "q_norm.weight", {cfg.head_dim}, norm);
      add(b + "attn_k_norm.weight", s + "k_norm.weight", {cfg.head_dim}, norm);
    } else {
      const std::string s = h + "linear_attn.";
      const int64_t conv = 2 * nk * dk + nv * dv, K = cfg.linear_conv_kernel_dim;
      if (arch == "qwen3next") {
        Job j{s + "in_proj_qkvz.weight",
              {&g.need(b + "attn_qkv.weight", "needed for in_proj_qkvz"),
               &g.need(b + "attn_gate.weight", "needed for in_proj_qkvz")},
              {2 * nk * dk + 2 * nv * dv, H},
              Fix::kNone,
              true};
        jobs.push_back(std::move(j));
        add(b + "ssm_ba.weight", s + "in_proj_ba.weight", {2 * nv, H});
      } else {
        add(b + "attn_qkv.weight", s + "in_proj_qkv.weight", {conv, H}, Fix::kQkv);
        add(b + "attn_gate.weight", s + "in_proj_z.weight", {nv * dv, H}, Fix::kVRows);
        add(b + "ssm_beta.weight", s + "in_proj_b.weight", {nv, H}, Fix::kVRows1);
        add(b + "ssm_alpha.weight", s + "in_proj_a.weight", {nv, H}, Fix::kVRows1);
      }
      add(b + "ssm_conv1d.weight", s + "conv1d.weight", {conv, 1, K}, Fix::kConv);
      add(b + "ssm_dt.bias", s + "dt_bias", {nv}, Fix::kVRows1);
      add(b + "ssm_a", s + "A_log", {nv}, Fix::kLogNeg);
      add(b + "ssm_norm.weight", s + "norm.weight", {dv});
      add(b + "ssm_out.weight", s + "out_proj.weight", {H, nv * dv}, Fix::kVCols);
    }
    const std::string m = h + "mlp.";
    if (cfg.layer_is_moe[i]) {
      add(b + "ffn_gate_inp.weight", m + "gate.weight", {E, H});
      for (const auto& [gn, hn, r, cc] :
           {std::tuple{"gate", "gate_proj", I, H}, std::tuple{"up", "up_proj", I, H},
            std::tuple{"down", "down_proj", H, I}}) {
        const std::string name = fmt::format("{}ffn_{}_exps.weight", b, gn);
        const GgufTensor& t = g.need(name, "routed experts");
        TensorInfo ti;
        ti.name = m + "experts." + hn;
        ti.source_name = name;
        ti.shape = t.shape();
        ti.data = t.data;
        ti.nbytes = t.nbytes;
        ti.file = g.file_name(t);
        const std::vector<int64_t> want{E, r, cc};
        TIDAL_CHECK(ti.shape == want, FormatError,
                    "GGUF model \"{}\": tensor \"{}\" has shape {}, expected [{}] (expert_count, "
                    "rows, columns)",
                    path.string(), name, ti.shape_str(), fmt::join(want, ", "));
        if (t.type == kc::kGgmlF32 || t.type == kc::kGgmlF16 || t.type == kc::kGgmlBF16) {
          ti.dtype = t.type == kc::kGgmlF32   ? kernels::DType::kF32
                     : t.type == kc::kGgmlF16 ? kernels::DType::kF16
                                              : kernels::DType::kBF16;
          ti.dtype_name = std::string(kernels::dtype_name(ti.dtype));
        } else {
          ti.ggml_type = static_cast<int32_t>(t.type);
          const GgmlTypeInfo* info = ggml_type_info(t.type);
          ti.dtype_name = info ? std::string(info->name) : fmt::format("type {}", t.type);
        }
        direct.push_back(std::move(ti));
      }
      if (hybrid) {
        const int64_t S = cfg.shared_expert_intermediate_size;
        add(b + "ffn_gate_shexp.weight", m + "shared_expert.gate_proj.weight", {S, H});
        add(b + "ffn_up_shexp.weight", m + "shared_expert.up_proj.weight", {S, H});
        add(b + "ffn_down_shexp.weight", m + "shared_expert.down_proj.weight", {H, S});
        add(b + "ffn_gate_inp_shexp.weight", m + "shared_expert_gate.weight", {1, H});
      }
    } else {
      const int64_t F = cfg.intermediate_size;
      add(b + "ffn_gate.weight", m + "gate_proj.weight", {F, H});
      add(b + "ffn_up.weight", m + "up_proj.weight", {F, H});
      add(b + "ffn_down.weight", m + "down_proj.weight", {H, F});
    }
  }

  // Check every source before decoding anything: element count, and a type tidal can decode.
  for (const auto& j : jobs) {
    int64_t want = 1, have = 0;
    for (int64_t d : j.shape) want *= d;
    for (const auto* t : j.src) {
      int64_t n = 1;
      for (int64_t d : t->ne) n *= d;
      have += n;
      const GgmlTypeInfo* info = ggml_type_info(t->type);
      TIDAL_CHECK(
          kc::ggml_decodable(static_cast<int32_t>(t->type)), Unsupported,
          "GGUF file \"{}\": tensor \"{}\" has type {}, which tidal cannot read (supported: "
          "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
          g.file_name(*t), t->name, info ? std::string(info->name) : std::to_string(t->type));
    }
    if (j.qkvz) {
      const auto s0 = j.src[0]->shape(), s1 = j.src[1]->shape();
      TIDAL_CHECK(s0 == (std::vector<int64_t>{2 * nk * dk + nv * dv, H}) &&
                      s1 == (std::vector<int64_t>{nv * dv, H}),
                  FormatError,
                  "GGUF model \"{}\": \"{}\" {} and \"{}\" {} should be [{}, {}] and [{}, {}]",
                  path.string(), j.src[0]->name, fmt::join(s0, "x"), j.src[1]->name,
                  fmt::join(s1, "x"), 2 * nk * dk + nv * dv, H, nv * dv, H);
    } else {
      // Row length must match too (a transposed tensor has the right count).
      const int64_t cols = j.shape.back();
      // conv1d is stored [channels, kernel] (ne = [kernel, channels]); HF has [channels, 1,
      // kernel].
      const bool rows_ok = j.fix == Fix::kConv
                               ? j.src[0]->ne.size() == 2 && j.src[0]->ne[0] == cols
                               : j.shape.size() == 1 || j.src[0]->ne[0] == cols || j.shape[0] == 1;
      TIDAL_CHECK(want == have && rows_ok, FormatError,
                  "GGUF model \"{}\": tensor \"{}\" has shape {} (ggml ne), expected {} values "
                  "as [{}] (for {})",
                  path.string(), j.src[0]->name, fmt::join(j.src[0]->ne, ", "), want,
                  fmt::join(j.shape, ", "), j.hf);
    }
  }

  // Decode and fix, in parallel over tensors.
  std::vector<TensorInfo> made(jobs.size());
  keep->buffers.resize(jobs.size());
  auto v_blocks = [&](const float* src, float* dst, int64_t rows, int64_t cols, int64_t head) {
    // GGUF row block (j * nk + i) -> HF row block (i * r + j), blocks of `head` rows.
    const int64_t r = nv / nk;
    for (int64_t i = 0; i < nk; ++i)
      for (int64_t jj = 0; jj < r; ++jj)
        std::memcpy(dst + (i * r + jj) * head * cols, src + (jj * nk + i) * head * cols,
                    static_cast<size_t>(head * cols) * 4);
    (void)rows;
  };
  // Plain threads pulling tensors (the loader runs before any executor exists, often with the GIL
  // released from Python's main thread); the first exception is rethrown.
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto one = [&](size_t k) {
    const Job& j = jobs[k];
    const GgufTensor& t0 = *j.src[0];
    TensorInfo ti;
    ti.name = j.hf;
    ti.source_name = t0.name;
    ti.shape = j.shape;
    ti.file = g.file_name(t0);
    const bool plain_type =
        t0.type == kc::kGgmlF32 || t0.type == kc::kGgmlF16 || t0.type == kc::kGgmlBF16;
    if (!j.qkvz && j.fix == Fix::kNone && plain_type) {  // in place
      ti.dtype = t0.type == kc::kGgmlF32   ? kernels::DType::kF32
                 : t0.type == kc::kGgmlF16 ? kernels::DType::kF16
                                           : kernels::DType::kBF16;
      ti.dtype_name = std::string(kernels::dtype_name(ti.dtype));
      ti.data = t0.data;
      ti.nbytes = t0.nbytes;
      made[k] = std::move(ti);
      return;
    }
    if (!decode) {  // inspection only: the source's type and bytes
      const GgmlTypeInfo* info = ggml_type_info(t0.type);
      ti.dtype = kernels::DType::kUnknown;
      ti.ggml_type = static_cast<int32_t>(t0.type);
      ti.dtype_name = info ? std::string(info->name) : std::to_string(t0.type);
      ti.data = t0.data;
      ti.nbytes = 0;
      for (const auto* t : j.src) ti.nbytes += t->nbytes;
      made[k] = std::move(ti);
      return;
    }
    std::vector<float> x = decode_all(t0);
    const int64_t cols = j.shape.back();
    const int64_t rows = static_cast<int64_t>(x.size()) / std::max<int64_t>(cols, 1);
    switch (j.fix) {
      case Fix::kNone:
        break;
      case Fix::kMinusOne:
        for (auto& v : x) v -= 1.f;
        break;
      case Fix::kLogNeg:
      case Fix::kVRows1:
      case Fix::kVRows:
      case Fix::kQkv:
      case Fix::kConv: {
        if (j.fix == Fix::kLogNeg)
          for (auto& v : x) {
            // ssm_a = -exp(A_log) is negative; anything else has no A_log.
            TIDAL_CHECK(
                v < 0.f, FormatError,
                "GGUF model \"{}\": tensor \"{}\" holds {}, but ssm_a = -exp(A_log) must be "
                "negative",
                path.string(), t0.name, v);
            v = std::log(-v);
          }
        if (!reorder) break;
        const int64_t head = j.fix == Fix::kLogNeg || j.fix == Fix::kVRows1 ? 1 : dv;
        const int64_t c = j.shape.size() == 1 ? 1 : cols;  // values per row (conv: the kernel)
        const int64_t skip = j.fix == Fix::kQkv || j.fix == Fix::kConv ? 2 * nk * dk : 0;
        std::vector<float> y(x);
        v_blocks(x.data() + skip * c, y.data() + skip * c, nv * head, c, head);
        x.swap(y);
        break;
      }
      case Fix::kVCols: {
        if (!reorder) break;
        // Columns: per row, column blocks of dv in the value-head order.
        std::vector<float> y(x.size());
        for (int64_t r = 0; r < rows; ++r)
          v_blocks(x.data() + r * cols, y.data() + r * cols, nv * dv, 1, dv);
        x.swap(y);
        break;
      }
    }
    if (j.qkvz) {
      const std::vector<float> z = decode_all(*j.src[1]);
      const int64_t r = nv / nk, per = 2 * dk + 2 * r * dv;
      std::vector<float> y(static_cast<size_t>(nk * per * H));
      for (int64_t i = 0; i < nk; ++i) {
        float* d = y.data() + i * per * H;
        auto put = [&](const float* s, int64_t n) {
          std::memcpy(d, s, static_cast<size_t>(n * H) * 4);
          d += n * H;
        };
        put(x.data() + i * dk * H, dk);                          // q
        put(x.data() + (nk * dk + i * dk) * H, dk);              // k
        put(x.data() + (2 * nk * dk + i * r * dv) * H, r * dv);  // v
        put(z.data() + i * r * dv * H, r * dv);                  // z
      }
      x.swap(y);
    }
    // Vectors and F32/F16 sources stay fp32; quantised (and BF16) matrices become BF16.
    const bool to_bf16 = j.shape.size() >= 2 && j.shape[0] > 1 &&
                         !(t0.type == kc::kGgmlF32 || t0.type == kc::kGgmlF16);
    const size_t n = x.size();
    auto buf = std::make_unique<std::byte[]>(n * (to_bf16 ? 2 : 4));
    if (to_bf16) {
      auto* p = reinterpret_cast<uint16_t*>(buf.get());
      for (size_t e = 0; e < n; ++e) p[e] = kernels::f32_to_bf16(x[e]);
      ti.dtype = kernels::DType::kBF16;
    } else {
      std::memcpy(buf.get(), x.data(), n * 4);
      ti.dtype = kernels::DType::kF32;
    }
    ti.dtype_name = std::string(kernels::dtype_name(ti.dtype));
    ti.data = buf.get();
    ti.nbytes = n * (to_bf16 ? 2 : 4);
    keep->buffers[k] = std::move(buf);
    made[k] = std::move(ti);
  };
  const size_t nthreads =
      std::max<size_t>(1, std::min<size_t>({jobs.size(), std::thread::hardware_concurrency(), 32}));
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (size_t k = next++; k < jobs.size() && !failed; k = next++) {
      try {
        one(k);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  try {
    for (size_t w = 1; w < nthreads; ++w) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // Fewer threads than asked for: the ones started (and this one) do the work.
  }
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  for (auto& t : direct) made.push_back(std::move(t));
  out.checkpoint = Checkpoint::from_tensors(path, std::move(made), keep);
  return out;
}

}  // namespace

}  // namespace tidal::core
