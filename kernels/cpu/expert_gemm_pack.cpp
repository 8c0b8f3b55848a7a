// SPDX-License-Identifier: Apache-2.0
/// \file expert_gemm_pack.cpp
/// \brief Layout arithmetic, quantisation and packing of expert weights, activation preparation.
///
/// Note [Expert weight layout tidal_n16_v1]
/// A matrix W [n, k] is stored as ceil(n/16) tiles of 16 consecutive rows (rows past n are zero);
/// each tile is contiguous, so one task streams one tile. Within a tile:
///  - BF16: k_pad/2 blocks of 64 bytes; block p holds, for rows r = 0..15, the pair
///    (W[r][2p], W[r][2p+1]) as two bf16 at u16 index 2r, 2r+1. This is the VNNI pair layout of an
///    AMX BF16 B tile row and of a `vdpbf16ps` operand (one 32-bit lane per row).
///  - INT8: per group g (G columns), G/4 blocks of 64 bytes; block j holds for each row r the four
///    columns 4j..4j+3 of the group at bytes 4r..4r+3, as unsigned bytes q + 128. One block is one
///    `vpdpbusd` operand (16 int32 lanes = 16 rows) and one AMX INT8 B tile row.
///  - INT4: per group, G/8 blocks of 64 bytes; block j holds the quads 2j (low nibbles) and 2j+1
///    (high nibbles) in the INT8 arrangement, as unsigned nibbles q + 8.
///  - INT8/INT4 scales follow the weights of the tile: fp16 [num_groups][16]; the tile is padded
///    to 64 bytes. Weights are stored unsigned so that `vpdpbusd` (u8 x s8) takes them as its
///    unsigned operand; the kernels subtract offset · Σq_x per group, exactly, in int32.
/// INT8 is symmetric in [-127, 127] with s = max|w| / 127; INT4 follows the Q4_0 convention: the
/// element of largest magnitude m maps to -8 (s = m / -8), so the full [-8, 7] range is used.
/// The scale is rounded to fp16 first and the weights are quantised with the rounded scale.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/common/set_if.h"
#include "kernels/cpu/expert_gemm.h"
#include "kernels/cpu/expert_gemm_ref.h"
#include "kernels/cpu/weight_decode.h"

namespace tidal::kernels::cpu {
namespace {

int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

float load_src(const void* src, DType dt, int64_t i) {
  return dt == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(src)[i])
                            : static_cast<const float*>(src)[i];
}

}  // namespace

std::string_view expert_dtype_name(ExpertDType dt) {
  switch (dt) {
    case ExpertDType::kBF16:
      return "bf16";
    case ExpertDType::kINT8:
      return "int8";
    case ExpertDType::kINT4:
      return "int4";
  }
  return "?";
}

ExpertDType parse_expert_dtype(std::string_view s) {
  if (s == "bf16") return ExpertDType::kBF16;
  if (s == "int8") return ExpertDType::kINT8;
  if (s == "int4") return ExpertDType::kINT4;
  throw std::invalid_argument("unknown expert dtype \"" + std::string(s) +
                              "\"; expected bf16, int8 or int4");
}

PackedLayout make_layout(ExpertDType dtype, int64_t n, int64_t k, int64_t group) {
  if (n <= 0 || k <= 0)
    throw std::invalid_argument("expert matrix shape [" + std::to_string(n) + ", " +
                                std::to_string(k) + "] must be positive");
  PackedLayout l;
  l.dtype = dtype;
  l.n = n;
  l.k = k;
  l.num_tiles = (n + kTileRows - 1) / kTileRows;
  if (dtype == ExpertDType::kBF16) {
    l.k_pad = round_up(k, kBf16ColAlign);
    l.group = l.k_pad;
    l.num_groups = 1;
    l.group_bytes = l.k_pad / 2 * 64;
    l.data_bytes = l.group_bytes;
    l.tile_bytes = l.data_bytes;
    return l;
  }
  if (std::find(std::begin(kGroupSizes), std::end(kGroupSizes), group) == std::end(kGroupSizes))
    throw std::invalid_argument("expert quantisation group size " + std::to_string(group) +
                                " is not supported; use 32, 64 or 128");
  l.group = group;
  l.k_pad = round_up(k, group);
  l.num_groups = l.k_pad / group;
  l.group_bytes = dtype == ExpertDType::kINT8 ? group * 16 : group * 8;
  l.data_bytes = l.num_groups * l.group_bytes;
  l.tile_bytes = round_up(l.data_bytes + l.num_groups * kTileRows * 2, 64);
  return l;
}

namespace {
// Packs tiles [tile0, tile1); matrix row `row` is read at src + (row - src_row0) * ld.
void pack_tiles(const PackedLayout& l, const void* src, DType src_dtype, int64_t ld, uint8_t* dst,
                int64_t tile0, int64_t tile1, int64_t src_row0) {
  for (int64_t t = tile0; t < tile1; ++t) {
    uint8_t* tile = dst + t * l.tile_bytes;
    std::memset(tile, 0, static_cast<size_t>(l.tile_bytes));
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t row = t * kTileRows + r;
      if (row >= l.n) break;
      const int64_t base = (row - src_row0) * ld;
      if (l.dtype == ExpertDType::kBF16) {
        auto* w = reinterpret_cast<uint16_t*>(tile);
        for (int64_t c = 0; c < l.k; ++c) {
          const uint16_t bits = src_dtype == DType::kBF16
                                    ? static_cast<const uint16_t*>(src)[base + c]
                                    : f32_to_bf16(static_cast<const float*>(src)[base + c]);
          w[(c / 2) * 32 + r * 2 + (c % 2)] = bits;
        }
        continue;
      }
      auto* scales = reinterpret_cast<uint16_t*>(tile + l.data_bytes);
      for (int64_t g = 0; g < l.num_groups; ++g) {
        const int64_t c0 = g * l.group, c1 = std::min(l.k, c0 + l.group);
        float amax = 0.f, extreme = 0.f;
        for (int64_t c = c0; c < c1; ++c) {
          const float v = load_src(src, src_dtype, base + c);
          if (std::fabs(v) > amax) {
            amax = std::fabs(v);
            extreme = v;
          }
        }
        const bool int8 = l.dtype == ExpertDType::kINT8;
        const uint16_t s16 = f32_to_f16(int8 ? amax / 127.f : extreme / -8.f);
        scales[g * kTileRows + r] = s16;
        const float s = f16_to_f32(s16);
        const float inv = s != 0.f ? 1.f / s : 0.f;
        uint8_t* gb = tile + g * l.group_bytes;
        for (int64_t c = c0; c < c1; ++c) {
          const float v = load_src(src, src_dtype, base + c);
          const int64_t cl = c - c0, quad = cl / 4, kk = cl % 4;
          if (int8) {
            const int q = std::clamp(static_cast<int>(std::nearbyint(v * inv)), -127, 127);
            gb[quad * 64 + r * 4 + kk] = static_cast<uint8_t>(q + 128);
          } else {
            const int q = std::clamp(static_cast<int>(std::nearbyint(v * inv)), -8, 7);
            uint8_t& b = gb[(quad / 2) * 64 + r * 4 + kk];
            b = static_cast<uint8_t>(b | ((q + 8) << (4 * (quad % 2))));
          }
        }
        if (l.dtype == ExpertDType::kINT8) {
          // Zero-padded columns of the group also carry the offset (q = 0 -> 128).
          for (int64_t c = c1; c < c0 + l.group; ++c) {
            const int64_t cl = c - c0;
            gb[(cl / 4) * 64 + r * 4 + cl % 4] = 128;
          }
        } else {
          for (int64_t c = c1; c < c0 + l.group; ++c) {
            const int64_t cl = c - c0, quad = cl / 4;
            uint8_t& b = gb[(quad / 2) * 64 + r * 4 + cl % 4];
            b = static_cast<uint8_t>(b | (8 << (4 * (quad % 2))));
          }
        }
      }
    }
    // Rows past n of a partial tile: q = 0 stored with the offset, scale 0.
    if (l.dtype != ExpertDType::kBF16) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        if (t * kTileRows + r < l.n) continue;
        for (int64_t g = 0; g < l.num_groups; ++g) {
          uint8_t* gb = tile + g * l.group_bytes;
          for (int64_t cl = 0; cl < l.group; ++cl) {
            const int64_t quad = cl / 4;
            if (l.dtype == ExpertDType::kINT8) {
              gb[quad * 64 + r * 4 + cl % 4] = 128;
            } else {
              uint8_t& b = gb[(quad / 2) * 64 + r * 4 + cl % 4];
              b = static_cast<uint8_t>(b | (8 << (4 * (quad % 2))));
            }
          }
        }
      }
    }
  }
}

}  // namespace

void pack_weights(const PackedLayout& l, const void* src, DType src_dtype, int64_t ld, uint8_t* dst,
                  int64_t tile0, int64_t tile1) {
  pack_tiles(l, src, src_dtype, ld, dst, tile0, tile1, 0);
}

bool pack_is_exact(const PackedLayout& l, const MatrixSource& src) {
  if (src.plain()) return true;  // (as exact as pack_weights: quantisation is the format's)
  return ggml_is_symmetric32(src.ggml_type) && l.group == 32 &&
         (l.dtype == ExpertDType::kINT8 ||
          (l.dtype == ExpertDType::kINT4 && src.ggml_type == kGgmlQ4_0));
}

void pack_weights_from(const PackedLayout& l, const MatrixSource& src, uint8_t* dst, int64_t tile0,
                       int64_t tile1) {
  if (src.plain()) {
    pack_weights(l, src.data, src.dtype, src.ld, dst, tile0, tile1);
    return;
  }
  if (pack_is_exact(l, src)) {
    // Note [Exact GGUF repack]: the integers and fp16 scales of Q8_0 / Q4_0 blocks are the
    // format's own; values pack as they are (Q8_0 may hold -128: stored as byte 0).
    thread_local std::vector<int8_t> q;
    thread_local std::vector<uint16_t> sc;
    q.resize(static_cast<size_t>(l.k_pad));
    sc.resize(static_cast<size_t>(l.num_groups));
    const bool int8 = l.dtype == ExpertDType::kINT8;
    for (int64_t t = tile0; t < tile1; ++t) {
      // Padding as the quantiser writes it: q = 0 (stored with its offset), scale 0.
      uint8_t* tile = dst + t * l.tile_bytes;
      std::memset(tile, int8 ? 128 : 0x88, static_cast<size_t>(l.data_bytes));
      std::memset(tile + l.data_bytes, 0, static_cast<size_t>(l.tile_bytes - l.data_bytes));
      auto* scales = reinterpret_cast<uint16_t*>(tile + l.data_bytes);
      for (int64_t r = 0; r < kTileRows && t * kTileRows + r < l.n; ++r) {
        const int64_t row = t * kTileRows + r;
        decode_ggml_symmetric32(src.ggml_type,
                                static_cast<const uint8_t*>(src.data) + row * src.row_bytes, l.k,
                                q.data(), sc.data());
        for (int64_t g = 0; g < l.num_groups; ++g) {
          scales[g * kTileRows + r] = sc[g];
          uint8_t* gb = tile + g * l.group_bytes;
          for (int64_t cl = 0; cl < l.group; ++cl) {
            const int v = q[g * l.group + cl];
            const int64_t quad = cl / 4, kk = cl % 4;
            if (int8) {
              gb[quad * 64 + r * 4 + kk] = static_cast<uint8_t>(v + 128);
            } else {
              uint8_t& b = gb[(quad / 2) * 64 + r * 4 + kk];
              const int sh = 4 * (quad % 2);
              b = static_cast<uint8_t>((b & ~(0xF << sh)) | ((v + 8) << sh));
            }
          }
        }
      }
    }
    return;
  }
  // Everything else: decode the tile's rows to fp32, then quantise as usual.
  thread_local std::vector<float> rows;
  rows.resize(static_cast<size_t>(kTileRows * l.k));
  for (int64_t t = tile0; t < tile1; ++t) {
    for (int64_t r = 0; r < kTileRows && t * kTileRows + r < l.n; ++r)
      src.decode_row(t * kTileRows + r, rows.data() + r * l.k);
    pack_tiles(l, rows.data(), DType::kF32, l.k, dst, t, t + 1, t * kTileRows);
  }
}

PackedValue packed_value(const PackedLayout& l, const uint8_t* packed, int64_t row, int64_t col) {
  const uint8_t* tile = packed + (row / kTileRows) * l.tile_bytes;
  const int64_t r = row % kTileRows;
  PackedValue v;
  if (l.dtype == ExpertDType::kBF16) {
    v.value =
        bf16_to_f32(reinterpret_cast<const uint16_t*>(tile)[(col / 2) * 32 + r * 2 + (col % 2)]);
    v.scale = 1.f;
    return v;
  }
  const int64_t g = col / l.group, cl = col % l.group, quad = cl / 4, kk = cl % 4;
  const uint8_t* gb = tile + g * l.group_bytes;
  if (l.dtype == ExpertDType::kINT8) {
    v.q = static_cast<int32_t>(gb[quad * 64 + r * 4 + kk]) - 128;
  } else {
    const uint8_t b = gb[(quad / 2) * 64 + r * 4 + kk];
    v.q = static_cast<int32_t>((b >> (4 * (quad % 2))) & 0xf) - 8;
  }
  v.scale = f16_to_f32(reinterpret_cast<const uint16_t*>(tile + l.data_bytes)[g * kTileRows + r]);
  v.value = static_cast<float>(v.q) * v.scale;
  return v;
}

void ActBuffer::reserve(ActKind kind_, const PackedLayout& l, int64_t rows_, Isa isa_,
                        bool zero_spare) {
  // Fields stored only where they change: at decode every worker reads them on every call.
  set_if(kind, kind_);
  set_if(isa, isa_);
  set_if(k, l.k);
  set_if(k_pad, l.k_pad);
  set_if(group, l.dtype == ExpertDType::kBF16 ? l.k_pad : l.group);
  set_if(num_groups, k_pad / group);
  // Rows are 64 bytes (32 elements) longer than k_pad: with a power-of-two row pitch the 16 rows
  // of an AMX A tile would all fall in one L1 set.
  set_if(ld, k_pad + 32);
  set_if(ld_group, num_groups);
  set_if(num_rows, rows_);
  // kTileRows spare rows: AMX loads whole 16-row A tiles.
  const auto cap = static_cast<size_t>((rows_ + kTileRows) * ld);
  auto grow_zero = [&](auto& v, size_t n) {
    if (v.size() < n) v.resize(n);
    if (!zero_spare) return;
    // The spare rows must be finite: zero them.
    std::fill(v.begin() + static_cast<std::ptrdiff_t>(rows_ * ld),
              v.begin() + static_cast<std::ptrdiff_t>(n), 0);
  };
  switch (kind) {
    case ActKind::kF32:
      grow_zero(f32, cap);
      break;
    case ActKind::kBf16Split:
      grow_zero(bf16, cap);
      grow_zero(bf16_lo, cap);
      break;
    case ActKind::kBf16:
      grow_zero(bf16, cap);
      break;
    case ActKind::kInt8Groups:
      grow_zero(q, cap);
      if (q_scale.size() < static_cast<size_t>(rows_ * num_groups)) {
        q_scale.resize(static_cast<size_t>(rows_ * num_groups));
        q_sum.resize(q_scale.size());
      }
      break;
  }
}

void ActBuffer::prepare(int64_t row, const float* x) {
  const int64_t o = row * ld;
  switch (kind) {
    case ActKind::kF32: {
      float* d = f32.data() + o;
      std::copy(x, x + k, d);
      std::fill(d + k, d + k_pad, 0.f);
      break;
    }
    case ActKind::kBf16Split: {
      uint16_t* hi = bf16.data() + o;
      uint16_t* lo = bf16_lo.data() + o;
      if (isa >= Isa::kAvx512) {
        avx512::prepare_bf16(x, k, k_pad, hi, lo);
        break;
      }
      for (int64_t c = 0; c < k; ++c) {
        hi[c] = f32_to_bf16(x[c]);
        lo[c] = f32_to_bf16(x[c] - bf16_to_f32(hi[c]));
      }
      std::fill(hi + k, hi + k_pad, uint16_t{0});
      std::fill(lo + k, lo + k_pad, uint16_t{0});
      break;
    }
    case ActKind::kBf16: {
      uint16_t* hi = bf16.data() + o;
      if (isa >= Isa::kAvx512) {
        avx512::prepare_bf16(x, k, k_pad, hi, nullptr);
        break;
      }
      for (int64_t c = 0; c < k; ++c) hi[c] = f32_to_bf16(x[c]);
      std::fill(hi + k, hi + k_pad, uint16_t{0});
      break;
    }
    case ActKind::kInt8Groups: {
      int8_t* qd = q.data() + o;
      if (isa >= Isa::kAvx512) {
        avx512::prepare_int8(x, k, group, num_groups, qd, q_scale.data() + row * num_groups,
                             q_sum.data() + row * num_groups);
        break;
      }
      if (isa >= Isa::kAvx2 && group % 32 == 0) {
        avx2::prepare_int8(x, k, group, num_groups, qd, q_scale.data() + row * num_groups,
                           q_sum.data() + row * num_groups);
        break;
      }
      for (int64_t g = 0; g < num_groups; ++g) {
        const int64_t c0 = g * group, c1 = std::min(k, c0 + group);
        float amax = 0.f;
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[c]));
        const float inv = act_inverse_scale(amax);
        int32_t sum = 0;
        for (int64_t c = c0; c < c1; ++c) {
          const int v = std::clamp(static_cast<int>(std::nearbyint(x[c] * inv)), -127, 127);
          qd[c] = static_cast<int8_t>(v);
          sum += v;
        }
        for (int64_t c = c1; c < c0 + group; ++c) qd[c] = 0;
        q_scale[static_cast<size_t>(row * num_groups + g)] = amax / 127.f;
        q_sum[static_cast<size_t>(row * num_groups + g)] = sum;
      }
      break;
    }
  }
}

void ActBuffer::copy_row(int64_t row, const ActBuffer& src, int64_t src_row) {
  auto cp = [&](auto& d, const auto& sv, int64_t n, int64_t ldd) {
    if (!sv.empty())
      std::copy(sv.begin() + src_row * ldd, sv.begin() + src_row * ldd + n, d.begin() + row * ldd);
  };
  switch (kind) {
    case ActKind::kF32:
      cp(f32, src.f32, k_pad, ld);
      break;
    case ActKind::kBf16Split:
      cp(bf16, src.bf16, k_pad, ld);
      cp(bf16_lo, src.bf16_lo, k_pad, ld);
      break;
    case ActKind::kBf16:
      cp(bf16, src.bf16, k_pad, ld);
      break;
    case ActKind::kInt8Groups:
      cp(q, src.q, k_pad, ld);
      cp(q_scale, src.q_scale, num_groups, num_groups);
      cp(q_sum, src.q_sum, num_groups, num_groups);
      break;
  }
}

ActRows ActBuffer::rows(int64_t row0) const {
  ActRows a;
  a.ld = ld;
  a.ld_group = ld_group;
  const auto o = static_cast<size_t>(row0 * ld);
  const auto og = static_cast<size_t>(row0 * ld_group);
  if (!f32.empty()) a.f32 = f32.data() + o;
  if (!bf16.empty()) a.bf16 = bf16.data() + o;
  if (!bf16_lo.empty()) a.bf16_lo = bf16_lo.data() + o;
  if (!q.empty()) a.q = q.data() + o;
  if (!q_scale.empty()) {
    a.q_scale = q_scale.data() + og;
    a.q_sum = q_sum.data() + og;
  }
  return a;
}

}  // namespace tidal::kernels::cpu
