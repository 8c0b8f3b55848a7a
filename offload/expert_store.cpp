// SPDX-License-Identifier: Apache-2.0
/// \file expert_store.cpp
/// \brief Expert lookup for both checkpoint layouts, packing into one huge-page-backed host
/// region, and the routed-expert forward through the fused MoE op.
#include "offload/expert_store.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace tidal::offload {
namespace kc = kernels::cpu;

ExpertStore::ExpertStore(const core::ModelConfig& cfg, const core::Checkpoint& ck)
    : hidden_(cfg.hidden_size),
      inter_(cfg.moe_intermediate_size),
      num_experts_(cfg.num_experts),
      owned_(std::make_shared<core::OwnedWeights>()) {
  core::WeightLoader ld(ck, owned_);
  const int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size, H = cfg.hidden_size;
  const std::string why =
      fmt::format("num_experts={}, moe_intermediate_size={}, hidden_size={}", E, I, H);
  sources_.resize(static_cast<size_t>(cfg.num_hidden_layers));
  checkpoint_dir_ = ck.path();
  auto note_mapped = [&](const core::TensorInfo& t, int64_t l) {
    source_bytes_ += t.nbytes;
    if (std::find(source_files_.begin(), source_files_.end(), t.file) == source_files_.end())
      source_files_.push_back(t.file);
    if (t.dtype == kernels::DType::kBF16 || t.dtype == kernels::DType::kF32 ||
        t.dtype == kernels::DType::kF8E4M3 || t.ggml_type >= 0) {
      mapped_.emplace_back(t.data, t.nbytes);
      mapped_layer_.push_back(static_cast<size_t>(l));
    }
  };
  if (!cfg.packed_experts.file.empty()) {  // Note [Pre-packed experts]
    const auto& pe = cfg.packed_experts;
    TIDAL_CHECK(pe.layout == kc::kExpertLayoutName, Unsupported,
                "pre-packed experts \"{}\" use layout \"{}\"; this tidal reads \"{}\" (write them "
                "again with python -m tidal.synth)",
                pe.file, pe.layout, kc::kExpertLayoutName);
    try {
      prepacked_dtype_ = kc::parse_expert_dtype(pe.dtype);
      kc::make_layout(prepacked_dtype_, I, H, pe.group_size);
    } catch (const std::invalid_argument& e) {
      throw FormatError(fmt::format("pre-packed experts \"{}\": {}", pe.file, e.what()));
    }
    prepacked_group_ = pe.group_size;
    prepacked_file_ = std::filesystem::is_directory(ck.path()) ? ck.path() / pe.file
                                                               : ck.path().parent_path() / pe.file;
    std::error_code ec;
    const auto size = std::filesystem::file_size(prepacked_file_, ec);
    TIDAL_CHECK(!ec, FileNotFound,
                "pre-packed experts file \"{}\" (config.json "
                "tidal_packed_experts) does not exist",
                prepacked_file_.string());
    source_bytes_ = size;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
      if (cfg.layer_is_moe[l]) sources_[l].resize(static_cast<size_t>(E));
    return;
  }
  // A routed-expert tensor as a source of `rows` x `cols` matrices; Note [Expert sources].
  auto require_expert = [&](const std::string& name, const std::vector<int64_t>& shape,
                            const std::string& what) -> const core::TensorInfo& {
    const core::TensorInfo* t = ck.find(name);
    if (t == nullptr || t->dtype == kernels::DType::kBF16 || t->dtype == kernels::DType::kF16 ||
        t->dtype == kernels::DType::kF32)
      return ld.require(name, shape, what);
    TIDAL_CHECK(t->shape == shape, FormatError,
                "checkpoint \"{}\": tensor \"{}\" has shape {}, expected [{}] ({})", t->file, name,
                t->shape_str(), fmt::join(shape, ", "), what);
    if (t->ggml_type >= 0) {
      TIDAL_CHECK(kc::ggml_decodable(t->ggml_type), Unsupported,
                  "GGUF file \"{}\": tensor \"{}\" has type {}, which tidal cannot run (supported "
                  "for experts: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, "
                  "Q5_K, Q6_K)",
                  t->file, t->source_name.empty() ? name : t->source_name, t->dtype_name);
      return *t;
    }
    if (t->dtype == kernels::DType::kF8E4M3) {
      const core::TensorInfo* s = ck.find(core::fp8_scale_name(name));
      TIDAL_CHECK(s != nullptr, FormatError,
                  "checkpoint \"{}\": FP8 tensor \"{}\" has no block scales \"{}\"", t->file, name,
                  core::fp8_scale_name(name));
      // The scales' shard is part of the source too (packed-expert cache key).
      if (std::find(source_files_.begin(), source_files_.end(), s->file) == source_files_.end())
        source_files_.push_back(s->file);
      return *t;
    }
    return ld.require(name, shape, what);  // names the unsupported dtype
  };
  auto source_of = [&](const core::TensorInfo& t, int64_t row0, int64_t rows, int64_t cols,
                       int64_t expert, int64_t rows_per_expert) {
    kc::MatrixSource m;
    m.rows = rows;
    m.cols = cols;
    if (t.ggml_type >= 0) {
      m.ggml_type = t.ggml_type;
      m.row_bytes = kc::ggml_row_bytes(t.ggml_type, cols);
      m.data = t.data + static_cast<size_t>(row0) * m.row_bytes;
      return m;
    }
    if (t.dtype == kernels::DType::kF8E4M3) {
      const core::TensorInfo& s = *ck.find(core::fp8_scale_name(t.name));
      m.dtype = t.dtype;
      m.ld = cols;
      m.data = t.data + static_cast<size_t>(row0 * cols);
      m.block = ck.fp8_block();
      const int64_t grid_r = (rows_per_expert + m.block - 1) / m.block;
      m.scale_ld = (cols + m.block - 1) / m.block;
      const std::vector<int64_t> want = t.shape.size() == 3
                                            ? std::vector<int64_t>{t.shape[0], grid_r, m.scale_ld}
                                            : std::vector<int64_t>{grid_r, m.scale_ld};
      TIDAL_CHECK(
          s.shape == want && (s.dtype == kernels::DType::kF32 || s.dtype == kernels::DType::kBF16),
          FormatError,
          "checkpoint \"{}\": FP8 block scales \"{}\" are {} {}, expected F32 or BF16 "
          "[{}] ({}x{} blocks of {})",
          s.file, s.name, s.dtype_name, s.shape_str(), fmt::join(want, ", "), m.block, m.block,
          t.name);
      m.scale_dtype = s.dtype;
      m.scale_inv =
          s.data + static_cast<size_t>(expert * grid_r * m.scale_ld) * kernels::dtype_size(s.dtype);
      m.r0 = row0 - expert * rows_per_expert;
      return m;
    }
    const kernels::WeightView v = ld.rows_of(t, row0, rows, cols);
    m.data = v.data;
    m.dtype = v.dtype;
    m.ld = cols;
    return m;
  };
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.layer_is_moe[l]) continue;
    const std::string pre = fmt::format("{}layers.{}.mlp.experts.", cfg.weight_prefix, l);
    auto& experts = sources_[l];
    experts.resize(static_cast<size_t>(E));
    // Fused layout: gate_up_proj [E, 2I, H] (rows [0, I) gate, [I, 2I) up) and down_proj [E, H, I];
    // the published names have no ".weight" suffix, but accept it.
    std::string gu = pre + "gate_up_proj", dn = pre + "down_proj";
    if (!ck.find(gu) && ck.find(gu + ".weight")) {
      gu += ".weight";
      dn += ".weight";
    }
    if (ck.find(gu)) {
      const auto& tgu = require_expert(gu, {E, 2 * I, H}, why + " (fused experts: [E, 2I, H])");
      const auto& tdn = require_expert(dn, {E, H, I}, why + " (fused experts: [E, H, I])");
      note_mapped(tgu, l);
      note_mapped(tdn, l);
      for (int64_t e = 0; e < E; ++e) {
        experts[e].gate = source_of(tgu, e * 2 * I, I, H, e, 2 * I);
        experts[e].up = source_of(tgu, e * 2 * I + I, I, H, e, 2 * I);
        experts[e].down = source_of(tdn, e * H, H, I, e, H);
      }
    } else if (ck.find(pre + "gate_proj")) {
      // Stacked, unfused (GGUF ffn_{gate,up,down}_exps): gate_proj / up_proj [E, I, H],
      // down_proj [E, H, I].
      const auto& tg = require_expert(pre + "gate_proj", {E, I, H}, why + " (stacked: [E, I, H])");
      const auto& tu = require_expert(pre + "up_proj", {E, I, H}, why + " (stacked: [E, I, H])");
      const auto& td = require_expert(pre + "down_proj", {E, H, I}, why + " (stacked: [E, H, I])");
      for (const auto* t : {&tg, &tu, &td}) note_mapped(*t, l);
      for (int64_t e = 0; e < E; ++e) {
        experts[e].gate = source_of(tg, e * I, I, H, e, I);
        experts[e].up = source_of(tu, e * I, I, H, e, I);
        experts[e].down = source_of(td, e * H, H, I, e, H);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const std::string p = fmt::format("{}{}.", pre, e);
        const auto& tg = require_expert(p + "gate_proj.weight", {I, H}, why);
        const auto& tu = require_expert(p + "up_proj.weight", {I, H}, why);
        const auto& td = require_expert(p + "down_proj.weight", {H, I}, why);
        experts[e].gate = source_of(tg, 0, I, H, 0, I);
        experts[e].up = source_of(tu, 0, I, H, 0, I);
        experts[e].down = source_of(td, 0, H, I, 0, H);
        for (const auto* t : {&tg, &tu, &td}) note_mapped(*t, l);
      }
    }
    for (const auto& x : experts)
      for (const auto* m : {&x.gate, &x.up, &x.down}) {
        const std::string f = m->ggml_type >= 0 ? std::string(kc::ggml_type_name(m->ggml_type))
                                                : std::string(kernels::dtype_name(m->dtype));
        if (std::find(source_formats_.begin(), source_formats_.end(), f) == source_formats_.end())
          source_formats_.push_back(f);
      }
  }
}

bool ExpertStore::exact_pack(kc::ExpertDType dtype, int64_t group) const {
  if (prepacked()) return false;
  const auto gu = kc::make_layout(dtype, inter_, hidden_, group);
  const auto dn = kc::make_layout(dtype, hidden_, inter_, group);
  for (const auto& layer : sources_)
    for (const auto& x : layer)
      if (!kc::pack_is_exact(gu, x.gate) || !kc::pack_is_exact(gu, x.up) ||
          !kc::pack_is_exact(dn, x.down))
        return false;
  return true;
}

bool ExpertStore::quantized_source() const {
  for (const auto& f : source_formats_)
    if (f != "BF16" && f != "F16" && f != "F32") return true;
  return false;
}

bool ExpertStore::ggml_source() const {
  for (const auto& layer : sources_)
    for (const auto& x : layer)
      if (x.gate.ggml_type >= 0 || x.up.ggml_type >= 0 || x.down.ggml_type >= 0) return true;
  return false;
}

std::string ExpertStore::source_format() const {
  return fmt::format("{}", fmt::join(source_formats_, "+"));
}

ExpertStore::~ExpertStore() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
}

// Note [Packed expert cache]
// Quantising a 35B-A3B checkpoint's experts takes minutes; the packed bytes are written once to
// `<cache_dir>/experts-<dtype>-g<group>-<key hash>.bin` (4 KiB header, then the region) and the
// next load maps that file instead of re-quantising. The header holds the full key: layout name
// and version, dtype, group, shapes, and every source file's name, size and modification time, so
// a changed checkpoint or format never reads a stale cache (the key differs: the file is rebuilt).
// Writes go to a temporary file of the writing process, fsync'ed and renamed into place, so a crash
// or a concurrent loader never leaves a half-written cache under the final name. The contents
// carry no checksum: a file damaged in place at the same size is not detected. Caches of an older
// key are not deleted (a shared cache directory may hold other checkpoints' files).
namespace {
constexpr size_t kCacheHeaderBytes = 4096;
constexpr size_t kCacheKeyBytes = kCacheHeaderBytes - 9;  // after the magic, NUL-terminated
constexpr char kCacheMagic[8] = {'T', 'I', 'D', 'A', 'L', 'E', 'X', 'P'};

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// What the header stores: the key itself, or for very long keys (checkpoints of hundreds of
// shards) its length and two independent 64-bit hashes.
std::string header_key(const std::string& key) {
  if (key.size() < kCacheKeyBytes) return key;
  return fmt::format("long key: {} bytes, {:016x} {:016x}", key.size(), fnv1a(key),
                     std::hash<std::string>{}(key));
}

// The key without source files: shapes and format (also the whole key of a pre-packed file).
std::string format_key(kc::ExpertDType dtype, int64_t group, int64_t hidden, int64_t inter,
                       int64_t experts, const std::vector<int64_t>& moe_layers) {
  std::string k = fmt::format(
      "layout={} dtype={} group={} hidden={} inter={} experts={} layers=", kc::kExpertLayoutName,
      kc::expert_dtype_name(dtype), group, hidden, inter, experts);
  for (int64_t l : moe_layers) k += fmt::format("{},", l);
  return k;
}
}  // namespace

std::string ExpertStore::cache_key() const {
  std::vector<int64_t> layers;
  for (size_t l = 0; l < sources_.size(); ++l)
    if (!sources_[l].empty()) layers.push_back(static_cast<int64_t>(l));
  std::string k = format_key(opts_.dtype, opts_.group_size, hidden_, inter_, num_experts_, layers);
  for (const auto& f : source_files_) {
    const auto p = std::filesystem::is_directory(checkpoint_dir_)
                       ? checkpoint_dir_ / f
                       : checkpoint_dir_.parent_path() / f;
    std::error_code ec;
    const auto size = std::filesystem::file_size(p, ec);
    const auto mtime = std::filesystem::last_write_time(p, ec).time_since_epoch().count();
    k += fmt::format(" file={}:{}:{}", f, ec ? 0 : size, ec ? 0 : mtime);
  }
  return k;
}

bool ExpertStore::load_cache(const std::function<void(uint64_t)>& progress) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(cache_file_, ec);
  if (ec || size != kCacheHeaderBytes + region_bytes_) return false;
  const int fd = ::open(cache_file_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char header[kCacheHeaderBytes];
  const bool ok =
      ::pread(fd, header, sizeof header, 0) == static_cast<ssize_t>(sizeof header) &&
      std::memcmp(header, kCacheMagic, sizeof kCacheMagic) == 0 &&
      std::string(header + 8, strnlen(header + 8, kCacheKeyBytes)) == header_key(cache_key());
  void* m = ok ? mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  ::close(fd);
  if (m == MAP_FAILED) return false;
  mapping_ = m;
  mapping_bytes_ = size;
  region_ = static_cast<uint8_t*>(m) + kCacheHeaderBytes;
  // Read it in now (with progress), so the first tokens do not wait on the disk.
  constexpr size_t kChunk = size_t{64} << 20;
  const auto* base = static_cast<const uint8_t*>(region_);
  for (size_t off = 0; off < region_bytes_; off += kChunk) {
    const size_t n = std::min(kChunk, region_bytes_ - off);
#ifdef MADV_POPULATE_READ
    if (madvise(const_cast<uint8_t*>(base) + off - (off % 4096), n, MADV_POPULATE_READ) != 0)
#endif
    {
      volatile uint8_t sink = 0;
      for (size_t i = 0; i < n; i += 4096) sink = sink ^ base[off + i];
      (void)sink;
    }
    if (progress) progress(source_bytes_ * (off + n) / std::max<size_t>(1, region_bytes_));
  }
  return true;
}

void ExpertStore::write_cache() {
  std::error_code ec;
  std::filesystem::create_directories(cache_file_.parent_path(), ec);
  if (ec) {
    cache_state_ = "not written: cannot create " + cache_file_.parent_path().string();
    return;
  }
  const auto space = std::filesystem::space(cache_file_.parent_path(), ec);
  if (ec || space.available < kCacheHeaderBytes + region_bytes_ + (size_t{1} << 30)) {
    cache_state_ =
        "not written: not enough free disk space in " + cache_file_.parent_path().string();
    return;
  }
  // A name of this process's own: concurrent loaders of the same checkpoint each write their
  // own file and the last rename wins, with complete contents either way.
  const auto tmp = fmt::format("{}.{}.{:x}.tmp", cache_file_.string(), ::getpid(),
                               reinterpret_cast<uintptr_t>(this));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    cache_state_ = "not written: cannot write " + tmp;
    return;
  }
  char header[kCacheHeaderBytes] = {};
  std::memcpy(header, kCacheMagic, sizeof kCacheMagic);
  const std::string key = header_key(cache_key());
  std::memcpy(header + 8, key.data(), key.size());
  bool ok = ::write(fd, header, sizeof header) == sizeof header;
  const auto* p = static_cast<const uint8_t*>(region_);
  for (size_t off = 0; ok && off < region_bytes_;) {
    const ssize_t w = ::write(fd, p + off, std::min<size_t>(region_bytes_ - off, size_t{1} << 30));
    if (w <= 0)
      ok = false;
    else
      off += static_cast<size_t>(w);
  }
  // Durable before it becomes visible under its final name.
  ok = ok && ::fsync(fd) == 0;
  ok = ::close(fd) == 0 && ok;
  if (ok) std::filesystem::rename(tmp, cache_file_, ec);
  if (!ok || ec) {
    std::filesystem::remove(tmp, ec);
    cache_state_ = "not written: write to " + cache_file_.string() + " failed";
    return;
  }
  cache_state_ = "written";
}

uint64_t ExpertStore::packed_bytes(kc::ExpertDType dtype, int64_t group_size) const {
  if (group_size == 0) group_size = kc::default_group_size(dtype);
  const auto gu = kc::make_layout(dtype, inter_, hidden_, group_size);
  const auto dn = kc::make_layout(dtype, hidden_, inter_, group_size);
  uint64_t layers = 0;
  for (const auto& s : sources_) layers += s.empty() ? 0 : 1;
  return layers * static_cast<uint64_t>(num_experts_) *
         static_cast<uint64_t>(2 * gu.bytes() + dn.bytes());
}

void ExpertStore::pack(const ExpertStoreOptions& opts, kernels::Executor& ex,
                       const std::function<void(uint64_t)>& progress) {
  TIDAL_ASSERT(region_ == nullptr, "ExpertStore::pack called twice");
  opts_ = opts;
  if (opts_.group_size == 0) opts_.group_size = kc::default_group_size(opts_.dtype);
  gate_up_ = kc::make_layout(opts_.dtype, inter_, hidden_, opts_.group_size);
  down_ = kc::make_layout(opts_.dtype, hidden_, inter_, opts_.group_size);
  const auto per_expert = static_cast<size_t>(2 * gate_up_.bytes() + down_.bytes());
  int64_t moe_layers = 0;
  for (const auto& s : sources_) moe_layers += s.empty() ? 0 : 1;
  region_bytes_ = std::max<size_t>(
      1, static_cast<size_t>(moe_layers) * static_cast<size_t>(num_experts_) * per_expert);
  // Pointers into the region, the same for a fresh pack and a cached file.
  auto assign_pointers = [&] {
    auto* base = static_cast<uint8_t*>(region_);
    packed_.assign(sources_.size(), {});
    size_t off = 0;
    for (size_t l = 0; l < sources_.size(); ++l) {
      if (sources_[l].empty()) continue;
      packed_[l].resize(sources_[l].size());
      for (auto& d : packed_[l]) {
        d.gate = base + off;
        d.up = d.gate + gate_up_.bytes();
        d.down = d.up + gate_up_.bytes();
        off += per_expert;
      }
    }
  };
  // The experts come mapped from a file (cache hit or pre-packed): nothing to pack.
  auto use_mapped_file = [&](const char* state) {
    cache_state_ = state;
    file_backed_ = true;
    assign_pointers();
    place_on_numa_nodes(ex, static_cast<const uint8_t*>(region_), true);
    if (progress) progress(source_bytes_);
    sources_.clear();
    owned_.reset();
  };
  if (prepacked()) {  // Note [Pre-packed experts]
    TIDAL_CHECK(
        opts_.dtype == prepacked_dtype_, InvalidArgument,
        "this checkpoint's experts are pre-packed as {}; expert_dtype=\"{}\" cannot be made "
        "from them: use expert_dtype=\"auto\" or \"{}\"",
        kc::expert_dtype_name(prepacked_dtype_), kc::expert_dtype_name(opts_.dtype),
        kc::expert_dtype_name(prepacked_dtype_));
    TIDAL_CHECK(opts_.group_size == prepacked_group_, InvalidArgument,
                "this checkpoint's experts are pre-packed with group size {}; expert_group_size={} "
                "cannot be made from them: use 0 (the file's)",
                prepacked_group_, opts_.group_size);
    cache_file_ = prepacked_file_;
    TIDAL_CHECK(load_cache(progress), FormatError,
                "pre-packed experts file \"{}\" does not match config.json (expected {} bytes of "
                "{} experts with header key \"{}\"): truncated, or written for another config",
                prepacked_file_.string(), kCacheHeaderBytes + region_bytes_,
                kc::expert_dtype_name(prepacked_dtype_), header_key(cache_key()));
    use_mapped_file("pre-packed");
    return;
  }
  if (!opts_.cache_dir.empty()) {
    cache_file_ = opts_.cache_dir /
                  fmt::format("experts-{}-g{}-{:016x}.bin", kc::expert_dtype_name(opts_.dtype),
                              opts_.dtype == kc::ExpertDType::kBF16 ? 0 : opts_.group_size,
                              fnv1a(cache_key()));
    if (load_cache(progress)) {
      use_mapped_file("hit");
      return;
    }
  }
  // One anonymous region; transparent huge pages keep the TLB out of the way of streaming reads.
  mapping_ =
      mmap(nullptr, region_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw OutOfMemory(fmt::format("cannot reserve {:.2f} GiB of host memory for the packed experts",
                                  static_cast<double>(region_bytes_) / (1u << 30)));
  }
  mapping_bytes_ = region_bytes_;
  region_ = mapping_;
#ifdef MADV_HUGEPAGE
  madvise(region_, region_bytes_, MADV_HUGEPAGE);
#endif
  assign_pointers();
  place_on_numa_nodes(ex, static_cast<const uint8_t*>(region_), false);
  const uint64_t layer_source = moe_layers ? source_bytes_ / static_cast<uint64_t>(moe_layers) : 0;
  uint64_t done = 0;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (size_t l = 0; l < sources_.size(); ++l) {
    const auto& src = sources_[l];
    if (src.empty()) continue;
    auto& dst = packed_[l];
    // Work items: (expert, matrix, tile); first touch by the packing threads.
    const int64_t tiles_gu = gate_up_.num_tiles, tiles_dn = down_.num_tiles;
    const int64_t per = 2 * tiles_gu + tiles_dn;
    ex.parallel_for(static_cast<int64_t>(src.size()) * per, 4, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t e = w / per, r = w % per;
        const Source& s = src[e];
        const kc::PackedExpert& d = dst[e];
        if (r < tiles_gu) {
          kc::pack_weights_from(gate_up_, s.gate, const_cast<uint8_t*>(d.gate), r, r + 1);
        } else if (r < 2 * tiles_gu) {
          kc::pack_weights_from(gate_up_, s.up, const_cast<uint8_t*>(d.up), r - tiles_gu,
                                r - tiles_gu + 1);
        } else {
          kc::pack_weights_from(down_, s.down, const_cast<uint8_t*>(d.down), r - 2 * tiles_gu,
                                r - 2 * tiles_gu + 1);
        }
      }
    });
    // The checkpoint pages of this layer were read once; drop them (they are file-backed and
    // clean, so this only frees page cache and RSS). Interior pages only.
    for (size_t i = 0; i < mapped_.size(); ++i) {
      if (mapped_layer_[i] != l) continue;
      const auto b = (reinterpret_cast<uintptr_t>(mapped_[i].first) + page - 1) & ~(page - 1);
      const auto e =
          (reinterpret_cast<uintptr_t>(mapped_[i].first) + mapped_[i].second) & ~(page - 1);
      if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
    }
    done += layer_source;
    if (progress) progress(std::min(done, source_bytes_));
  }
  if (!opts_.cache_dir.empty()) write_cache();  // needs sources_ for its key
  if (progress) progress(source_bytes_);
  sources_.clear();
  sources_.shrink_to_fit();
  owned_.reset();  // converted F16 sources, if any
}

bool ExpertStore::packed_layouts(kc::PackedLayout& gate_up, kc::PackedLayout& down) const {
  if (region_ == nullptr) return false;
  gate_up = gate_up_;
  down = down_;
  return true;
}

std::vector<std::pair<void*, size_t>> ExpertStore::packed_layer_regions() const {
  std::vector<std::pair<void*, size_t>> r;
  for (const auto& experts : packed_)
    if (!experts.empty())
      r.emplace_back(
          const_cast<uint8_t*>(experts.front().gate),
          static_cast<size_t>(experts.back().down + down_.bytes() - experts.front().gate));
  return r;
}

std::vector<NodePageRange> numa_page_ranges(const std::vector<size_t>& layer_offsets,
                                            size_t per_expert, int64_t experts, int nodes,
                                            size_t page) {
  std::vector<NodePageRange> r;
  if (nodes <= 1 || experts <= 0 || per_expert == 0 || page == 0) return r;
  // Every boundary rounds down to a page, the last layer's end up: the ranges are disjoint (a page
  // shared by two experts goes to the later one's node) and tile the layers' pages.
  for (size_t l = 0; l < layer_offsets.size(); ++l) {
    const size_t base = layer_offsets[l];
    for (int n = 0; n < nodes; ++n) {
      const auto e0 = static_cast<size_t>(kc::first_expert_of_node(n, experts, nodes));
      const auto e1 = static_cast<size_t>(kc::first_expert_of_node(n + 1, experts, nodes));
      const size_t b = (base + e0 * per_expert) / page * page;
      const size_t last = base + e1 * per_expert;
      const bool end_of_all = n + 1 == nodes && l + 1 == layer_offsets.size();
      const size_t e = end_of_all ? (last + page - 1) / page * page : last / page * page;
      if (e > b) r.push_back({b, e, n});
    }
  }
  return r;
}

// Note [Packed experts on their NUMA nodes]
// With workers on several NUMA nodes (executor numa_nodes() > 1, Note [NUMA spread]), each MoE
// layer's experts are split into one contiguous range per node (Note [NUMA expert placement] in
// kernels/cpu/moe_experts.cpp says why whole experts) and each range is bound to its node with
// hwloc_set_area_membind: before the packing threads first write a fresh region, so its pages
// are allocated there whoever packs them; with page migration for experts mapped from the cache
// file or a pre-packed file (their pages were read in by load_cache), and before the parallel
// copy into anonymous memory for GPU copies. The ranges are one per (layer, node), so the number
// of memory areas stays far below the kernel's per-process limit and huge pages survive (but for
// one per boundary). The decode job then orders its work by node (MoeExpertsArgs::numa_nodes).
// The policy is hwloc's BIND without STRICT, which Linux applies as a preference: a full node
// falls back to another instead of failing an allocation. Best effort throughout: where the
// system refuses (no mbind, a synthetic hwloc topology), numa_placement() says so and the job
// keeps the plain order; migrating a mapped file's pages skips pages another process also maps,
// and file pages read in again after eviction follow the reading thread, not the range. One
// node: nothing is bound and nothing changes.
void ExpertStore::place_on_numa_nodes(kernels::Executor& ex, const uint8_t* base, bool migrate) {
  const int nodes = ex.numa_nodes();
  numa_nodes_ = 1;
  if (nodes <= 1) {
    numa_state_ = "one node";
    return;
  }
  std::vector<size_t> layers;
  for (const auto& experts : packed_)
    if (!experts.empty())
      layers.push_back(
          static_cast<size_t>(experts.front().gate - static_cast<const uint8_t*>(region_)));
  const auto per_expert = static_cast<size_t>(2 * gate_up_.bytes() + down_.bytes());
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (layers.empty()) {
    numa_state_ = "no routed experts";
    return;
  }
  int refused = 0, bound = 0;
  for (const auto& r : numa_page_ranges(layers, per_expert, num_experts_, nodes, page)) {
    if (ex.bind_memory(const_cast<uint8_t*>(base) + r.begin, r.end - r.begin, r.node, migrate))
      ++bound;
    else
      ++refused;
  }
  if (refused == 0 && bound > 0) {
    numa_nodes_ = nodes;
    numa_state_ = fmt::format("bound to {} nodes", nodes);
  } else {
    numa_state_ =
        fmt::format("not bound: the system refused {} of {} page ranges", refused, refused + bound);
  }
}

// Note [Packed experts out of the file mapping]
// The VRAM expert cache copies experts with DMA, which needs their host pages page-locked
// (cudaHostRegister). Registering a large file mapping (a pre-packed checkpoint, or a cache
// hit: 17 GB of experts for the 35B-A3B at INT4) hung on the GPU test machine: 95-170 s without
// return, every thread idle in futex waits (2026-12-06; others report the same: llama.cpp turned
// off registering its mmap'd weights by default, vLLM-Omni saw cudaHostRegister on file ranges
// never complete). Anonymous memory is what pinned-memory users normally register, so before
// registering, the packed experts move into an anonymous region: one parallel copy (the pages
// were read in at load; ~1 s per 10 GB on 16 threads), then the mapping goes and the page cache
// may drop the file. The copy briefly needs a second region's worth of RAM: the caller
// (CudaModel's register_host_store) copies only when /proc/meminfo's MemAvailable covers it plus
// 1 GiB, and otherwise registers nothing (copies then stage through the driver: correct, slower).
// Registration is one MoE layer's range per call.
void ExpertStore::copy_packed_to_anonymous(kernels::Executor& ex) {
  if (!packed_region_file_backed()) return;
  void* m =
      mmap(nullptr, region_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED)
    throw OutOfMemory(fmt::format(
        "cannot reserve {:.2f} GiB of host memory to hold the packed experts for GPU copies",
        static_cast<double>(region_bytes_) / (1u << 30)));
#ifdef MADV_HUGEPAGE
  madvise(m, region_bytes_, MADV_HUGEPAGE);
#endif
  place_on_numa_nodes(ex, static_cast<const uint8_t*>(m), false);
  constexpr int64_t kPiece = int64_t{8} << 20;
  const auto* from = static_cast<const uint8_t*>(region_);
  auto* to = static_cast<uint8_t*>(m);
  const int64_t n = static_cast<int64_t>(region_bytes_);
  ex.parallel_for((n + kPiece - 1) / kPiece, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t o = p * kPiece;
      std::memcpy(to + o, from + o, static_cast<size_t>(std::min(kPiece, n - o)));
    }
  });
  for (auto& experts : packed_)
    for (auto& e : experts) {
      e.gate = to + (e.gate - from);
      e.up = to + (e.up - from);
      e.down = to + (e.down - from);
    }
  munmap(mapping_, mapping_bytes_);
  mapping_ = m;
  mapping_bytes_ = region_bytes_;
  region_ = m;
  file_backed_ = false;
}

core::RoutedExperts::PackedExpertView ExpertStore::packed_expert(int64_t layer,
                                                                 int64_t expert) const {
  if (region_ == nullptr || layer < 0 || static_cast<size_t>(layer) >= packed_.size()) return {};
  const auto& experts = packed_[static_cast<size_t>(layer)];
  if (expert < 0 || static_cast<size_t>(expert) >= experts.size()) return {};
  const auto& e = experts[static_cast<size_t>(expert)];
  return {e.gate, e.up, e.down};
}

void ExpertStore::forward(int64_t layer, const float* src, int64_t num_tokens, const int32_t* ids,
                          const float* weights, int64_t top_k, float* dst, kernels::Executor& ex) {
  TIDAL_ASSERT(region_ != nullptr, "experts used before ExpertStore::pack");
  const auto& experts = packed_.at(static_cast<size_t>(layer));
  TIDAL_ASSERT(!experts.empty(), "layer {} has no routed experts", layer);
  // One workspace per calling thread: sequences may run concurrently, and the op allocates only
  // until its workspace has grown to the largest call.
  thread_local kc::MoeExperts op(kernels::Isa::kRef);
  op.set_isa(opts_.isa);
  kc::MoeExpertsArgs a;
  a.gate_up = &gate_up_;
  a.down = &down_;
  a.experts = experts.data();
  a.num_experts = static_cast<int64_t>(experts.size());
  a.src = src;
  a.ld_src = hidden_;
  a.m = num_tokens;
  a.ids = ids;
  a.weights = weights;
  a.top_k = top_k;
  a.dst = dst;
  a.ld_dst = hidden_;
  a.numa_nodes = ex.numa_nodes() == numa_nodes_ ? numa_nodes_ : 1;
  op.run(a, ex);
  {  // distinct experts of this call (each read from RAM once), and the pairs computed
    thread_local std::vector<uint8_t> seen;
    seen.assign(experts.size(), 0);
    uint64_t distinct = 0, pairs = 0;
    for (int64_t i = 0; i < num_tokens * top_k; ++i) {
      const int32_t e = ids[i];
      if (e < 0 || static_cast<size_t>(e) >= seen.size()) continue;
      ++pairs;
      if (!seen[static_cast<size_t>(e)]) {
        seen[static_cast<size_t>(e)] = 1;
        ++distinct;
      }
    }
    reads_.fetch_add(distinct, std::memory_order_relaxed);
    pairs_.fetch_add(pairs, std::memory_order_relaxed);
  }
  last_small_.store(op.used_small(), std::memory_order_relaxed);
  last_large_.store(op.used_large(), std::memory_order_relaxed);
}

std::string ExpertStore::last_kernels() const {
  const char* s = last_small_.load(std::memory_order_relaxed);
  const char* l = last_large_.load(std::memory_order_relaxed);
  std::string out = s ? s : "";
  if (l) {
    if (!out.empty()) out += '+';
    out += l;
  }
  return out;
}

PackedExpertsWriter::PackedExpertsWriter(const std::filesystem::path& path,
                                         const core::ModelConfig& cfg, kc::ExpertDType dtype,
                                         int64_t group_size, int num_threads)
    : path_(path),
      hidden_(cfg.hidden_size),
      inter_(cfg.moe_intermediate_size),
      experts_(cfg.num_experts) {
  if (group_size == 0) group_size = kc::default_group_size(dtype);
  try {
    gate_up_ = kc::make_layout(dtype, inter_, hidden_, group_size);
    down_ = kc::make_layout(dtype, hidden_, inter_, group_size);
  } catch (const std::invalid_argument& e) {
    throw InvalidArgument(e.what());
  }
  std::vector<int64_t> layers;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.layer_is_moe[l]) layers.push_back(l);
  moe_layers_ = static_cast<int64_t>(layers.size());
  TIDAL_CHECK(moe_layers_ > 0, InvalidArgument, "the config has no MoE layer: no experts to pack");
  ex_ = kernels::make_tbb_executor(num_threads);
  tmp_ = path_;
  tmp_ += ".partial";
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TIDAL_CHECK(fd_ >= 0, InvalidArgument, "cannot write \"{}\"", tmp_.string());
  char header[kCacheHeaderBytes] = {};
  std::memcpy(header, kCacheMagic, sizeof kCacheMagic);
  const std::string key =
      header_key(format_key(dtype, group_size, hidden_, inter_, experts_, layers));
  std::memcpy(header + 8, key.data(), key.size());
  TIDAL_CHECK(::write(fd_, header, sizeof header) == sizeof header, Error, "writing \"{}\" failed",
              tmp_.string());
  buf_.resize(static_cast<size_t>(experts_ * (2 * gate_up_.bytes() + down_.bytes())));
}

PackedExpertsWriter::~PackedExpertsWriter() {
  if (fd_ >= 0) {  // not finished: leave nothing under either name
    ::close(fd_);
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void PackedExpertsWriter::add_layer(const void* gate_up, const void* down,
                                    kernels::DType src_dtype) {
  TIDAL_CHECK(fd_ >= 0 && written_ < moe_layers_, InvalidArgument,
              "all {} MoE layers were already written", moe_layers_);
  TIDAL_CHECK(src_dtype == kernels::DType::kBF16 || src_dtype == kernels::DType::kF32,
              InvalidArgument, "experts to pack must be BF16 or F32");
  const size_t el = src_dtype == kernels::DType::kBF16 ? 2 : 4;
  const auto* gu = static_cast<const uint8_t*>(gate_up);
  const auto* dn = static_cast<const uint8_t*>(down);
  const int64_t tiles_gu = gate_up_.num_tiles, tiles_dn = down_.num_tiles;
  const int64_t per = 2 * tiles_gu + tiles_dn;
  const auto per_expert = static_cast<size_t>(2 * gate_up_.bytes() + down_.bytes());
  const size_t gu_rows = static_cast<size_t>(inter_ * hidden_) * el;  // one I x H half
  ex_->parallel_for(experts_ * per, 4, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t e = w / per, r = w % per;
      uint8_t* d = buf_.data() + static_cast<size_t>(e) * per_expert;
      const uint8_t* g = gu + static_cast<size_t>(e) * 2 * gu_rows;
      if (r < tiles_gu)
        kc::pack_weights(gate_up_, g, src_dtype, hidden_, d, r, r + 1);
      else if (r < 2 * tiles_gu)
        kc::pack_weights(gate_up_, g + gu_rows, src_dtype, hidden_, d + gate_up_.bytes(),
                         r - tiles_gu, r - tiles_gu + 1);
      else
        kc::pack_weights(down_, dn + static_cast<size_t>(e) * hidden_ * inter_ * el, src_dtype,
                         inter_, d + 2 * gate_up_.bytes(), r - 2 * tiles_gu, r - 2 * tiles_gu + 1);
    }
  });
  for (size_t off = 0; off < buf_.size();) {
    const ssize_t n =
        ::write(fd_, buf_.data() + off, std::min<size_t>(buf_.size() - off, size_t{1} << 30));
    TIDAL_CHECK(n > 0, Error, "writing \"{}\" failed (disk full?)", tmp_.string());
    off += static_cast<size_t>(n);
  }
  ++written_;
}

void PackedExpertsWriter::finish() {
  TIDAL_CHECK(fd_ >= 0, InvalidArgument, "\"{}\" is already finished", path_.string());
  TIDAL_CHECK(written_ == moe_layers_, InvalidArgument,
              "{} of {} MoE layers were written; every layer is needed", written_, moe_layers_);
  const bool ok = ::fsync(fd_) == 0;
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  std::error_code ec;
  if (ok && closed) std::filesystem::rename(tmp_, path_, ec);
  if (!ok || !closed || ec) {
    std::filesystem::remove(tmp_, ec);
    throw Error(fmt::format("writing \"{}\" failed", path_.string()));
  }
}

}  // namespace tidal::offload
