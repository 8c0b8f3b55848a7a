// SPDX-License-Identifier: Apache-2.0
/// \file weight_decode.cpp
/// \brief Scalar decoders of ggml block types and FP8 E4M3 (load time only: each weight is decoded
/// once, then packed or converted).
#include "kernels/cpu/weight_decode.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

namespace tidal::kernels::cpu {
namespace {

uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
float h(const uint8_t* p) { return f16_to_f32(u16(p)); }

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml: get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void q4_0(const uint8_t* b, float* y) {  // 18 bytes: d, 16 bytes of nibbles
  const float d = h(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((b[2 + j] & 0xF) - 8) * d;
    y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
  }
}
void q4_1(const uint8_t* b, float* y) {  // 20 bytes: d, m, nibbles
  const float d = h(b), m = h(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(b[4 + j] & 0xF) * d + m;
    y[j + 16] = static_cast<float>(b[4 + j] >> 4) * d + m;
  }
}
void q5(const uint8_t* b, float* y, bool with_min) {  // Q5_0: d, qh[4], qs[16]; Q5_1: d, m, ...
  const float d = h(b), m = with_min ? h(b + 2) : 0.f;
  const uint8_t* p = b + (with_min ? 4 : 2);
  uint32_t qh;
  std::memcpy(&qh, p, 4);
  const uint8_t* qs = p + 4;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = static_cast<int>((qh >> j) << 4) & 0x10;
    const int hi1 = static_cast<int>(qh >> (j + 12)) & 0x10;
    const int x0 = (qs[j] & 0xF) | hi0, x1 = (qs[j] >> 4) | hi1;
    if (with_min) {
      y[j] = static_cast<float>(x0) * d + m;
      y[j + 16] = static_cast<float>(x1) * d + m;
    } else {
      y[j] = static_cast<float>(x0 - 16) * d;
      y[j + 16] = static_cast<float>(x1 - 16) * d;
    }
  }
}
void q8_0(const uint8_t* b, float* y) {  // 34 bytes: d, 32 int8
  const float d = h(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}
void q2_k(const uint8_t* b, float* y) {  // scales[16], qs[64], d, dmin: 84 bytes
  const uint8_t* sc = b;
  const uint8_t* q = b + 16;
  const float d = h(b + 80), dmin = h(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      for (int half = 0; half < 2; ++half) {
        const int s = sc[is++];
        const float dl = d * static_cast<float>(s & 0xF), ml = dmin * static_cast<float>(s >> 4);
        for (int l = 0; l < 16; ++l)
          *y++ = dl * static_cast<float>((q[l + 16 * half] >> shift) & 3) - ml;
      }
      shift += 2;
    }
    q += 32;
  }
}
void q3_k(const uint8_t* b, float* y) {  // hmask[32], qs[64], scales[12], d: 110 bytes
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const float d_all = h(b + 108);
  uint32_t aux[4];
  std::memcpy(aux, b + 96, 12);
  constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
  const uint32_t tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
  aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
  aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
  aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
  int8_t scales[16];
  std::memcpy(scales, aux, 16);
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      for (int half = 0; half < 2; ++half) {
        const float dl = d_all * static_cast<float>(scales[is++] - 32);
        for (int l = 0; l < 16; ++l) {
          const int i = l + 16 * half;
          const int v = ((q[i] >> shift) & 3) - ((hm[i] & m) ? 0 : 4);
          *y++ = dl * static_cast<float>(v);
        }
      }
      shift += 2;
      m = static_cast<uint8_t>(m << 1);
    }
    q += 32;
  }
}
void q4_k(const uint8_t* b, float* y) {  // d, dmin, scales[12], qs[128]: 144 bytes
  const float d = h(b), dmin = h(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  for (int j = 0; j < 256; j += 64) {
    int sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}
void q5_k(const uint8_t* b, float* y) {  // d, dmin, scales[12], qh[32], qs[128]: 176 bytes
  const float d = h(b), dmin = h(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  int is = 0;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0; j < 256; j += 64) {
    int sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l)
      *y++ = d1 * static_cast<float>((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l)
      *y++ = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    ql += 32;
    is += 2;
    u1 = static_cast<uint8_t>(u1 << 2);
    u2 = static_cast<uint8_t>(u2 << 2);
  }
}
void q6_k(const uint8_t* b, float* y) {  // ql[128], qh[64], int8 scales[16], d: 210 bytes
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

struct TypeRow {
  int32_t id;
  std::string_view name;
  int64_t block, bytes;
  void (*fn)(const uint8_t*, float*);
};
const TypeRow kRows[] = {
    {kGgmlQ4_0, "Q4_0", 32, 18, q4_0},
    {kGgmlQ4_1, "Q4_1", 32, 20, q4_1},
    {kGgmlQ5_0, "Q5_0", 32, 22, [](const uint8_t* b, float* y) { q5(b, y, false); }},
    {kGgmlQ5_1, "Q5_1", 32, 24, [](const uint8_t* b, float* y) { q5(b, y, true); }},
    {kGgmlQ8_0, "Q8_0", 32, 34, q8_0},
    {kGgmlQ2_K, "Q2_K", 256, 84, q2_k},
    {kGgmlQ3_K, "Q3_K", 256, 110, q3_k},
    {kGgmlQ4_K, "Q4_K", 256, 144, q4_k},
    {kGgmlQ5_K, "Q5_K", 256, 176, q5_k},
    {kGgmlQ6_K, "Q6_K", 256, 210, q6_k},
    {kGgmlF32, "F32", 1, 4, nullptr},
    {kGgmlF16, "F16", 1, 2, nullptr},
    {kGgmlBF16, "BF16", 1, 2, nullptr},
};
const TypeRow* row_of(int32_t type) {
  for (const auto& r : kRows)
    if (r.id == type) return &r;
  return nullptr;
}

}  // namespace

bool ggml_decodable(int32_t type) { return row_of(type) != nullptr; }
int64_t ggml_block_values(int32_t type) {
  const auto* r = row_of(type);
  return r ? r->block : 0;
}
int64_t ggml_block_bytes(int32_t type) {
  const auto* r = row_of(type);
  return r ? r->bytes : 0;
}
std::string_view ggml_type_name(int32_t type) {
  const auto* r = row_of(type);
  return r ? r->name : std::string_view("unknown ggml type");
}

void decode_ggml_row(int32_t type, const void* src, int64_t n, float* dst) {
  const auto* p = static_cast<const uint8_t*>(src);
  switch (type) {
    case kGgmlF32:
      std::memcpy(dst, p, static_cast<size_t>(n) * 4);
      return;
    case kGgmlF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(u16(p + 2 * i));
      return;
    case kGgmlBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(u16(p + 2 * i));
      return;
    default:
      break;
  }
  const TypeRow* r = row_of(type);
  for (int64_t b = 0; b < n / r->block; ++b) r->fn(p + b * r->bytes, dst + b * r->block);
}

bool ggml_is_symmetric32(int32_t type) { return type == kGgmlQ8_0 || type == kGgmlQ4_0; }

void decode_ggml_symmetric32(int32_t type, const void* src, int64_t n, int8_t* q,
                             uint16_t* scales) {
  const auto* p = static_cast<const uint8_t*>(src);
  const int64_t bytes = type == kGgmlQ8_0 ? 34 : 18;
  for (int64_t b = 0; b < n / 32; ++b, p += bytes, q += 32) {
    scales[b] = u16(p);
    if (type == kGgmlQ8_0) {
      std::memcpy(q, p + 2, 32);
    } else {
      for (int j = 0; j < 16; ++j) {
        q[j] = static_cast<int8_t>((p[2 + j] & 0xF) - 8);
        q[j + 16] = static_cast<int8_t>((p[2 + j] >> 4) - 8);
      }
    }
  }
}

float fp8_e4m3_to_f32(uint8_t bits) {
  const int sign = bits >> 7, exp = (bits >> 3) & 0xF, man = bits & 7;
  float v;
  if (exp == 0xF && man == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 10);  // (1 + man/8) * 2^(exp-7)
  }
  return sign ? -v : v;
}

uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const auto sign = static_cast<uint8_t>((u >> 31) << 7);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint8_t>(sign | 0x7f);
  if (a >= 448.f) return static_cast<uint8_t>(sign | 0x7e);
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (8 rounds up to the first normal)
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(a * 512.f)));
  }
  int e = static_cast<int>((u >> 23) & 0xff) - 127;
  uint32_t m = (u & 0x7fffff) >> 20;
  const uint32_t rem = u & 0xfffff;
  if (rem > 0x80000 || (rem == 0x80000 && (m & 1))) ++m;
  if (m == 8) {
    m = 0;
    ++e;
  }
  const int code = ((e + 7) << 3) | static_cast<int>(m);
  return static_cast<uint8_t>(sign | std::min(code, 0x7e));
}

void quantize_fp8_blocks(const float* w, int64_t rows, int64_t cols, int64_t block, uint8_t* codes,
                         float* scale_inv) {
  const int64_t gc = (cols + block - 1) / block;
  for (int64_t r0 = 0; r0 < rows; r0 += block)
    for (int64_t c0 = 0; c0 < cols; c0 += block) {
      const int64_t r1 = std::min(rows, r0 + block), c1 = std::min(cols, c0 + block);
      float amax = 0.f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float s = amax > 0.f ? amax / 448.f : 1.f;
      scale_inv[(r0 / block) * gc + c0 / block] = s;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c)
          codes[r * cols + c] = f32_to_fp8_e4m3(w[r * cols + c] / s);
    }
}

void MatrixSource::decode_row(int64_t r, float* dst) const {
  if (ggml_type >= 0) {
    decode_ggml_row(ggml_type, static_cast<const uint8_t*>(data) + r * row_bytes, cols, dst);
    return;
  }
  const auto* p = static_cast<const uint8_t*>(data);
  const size_t i0 = static_cast<size_t>(r * ld);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, p + i0 * 4, static_cast<size_t>(cols) * 4);
      return;
    case DType::kBF16:
      for (int64_t c = 0; c < cols; ++c) dst[c] = bf16_to_f32(u16(p + (i0 + c) * 2));
      return;
    case DType::kF16:
      for (int64_t c = 0; c < cols; ++c) dst[c] = f16_to_f32(u16(p + (i0 + c) * 2));
      return;
    case DType::kF8E4M3: {
      static const auto table = [] {
        std::array<float, 256> t{};
        for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
        return t;
      }();
      const int64_t sr = (r0 + r) / block;
      for (int64_t c0 = 0; c0 < cols; c0 += block) {
        const int64_t si = sr * scale_ld + c0 / block;
        float s;
        if (scale_dtype == DType::kBF16) {
          s = bf16_to_f32(u16(static_cast<const uint8_t*>(scale_inv) + si * 2));
        } else {
          std::memcpy(&s, static_cast<const uint8_t*>(scale_inv) + si * 4, 4);
        }
        const int64_t c1 = c0 + block < cols ? c0 + block : cols;
        for (int64_t c = c0; c < c1; ++c) dst[c] = table[p[i0 + c]] * s;
      }
      return;
    }
    default:
      for (int64_t c = 0; c < cols; ++c) dst[c] = std::numeric_limits<float>::quiet_NaN();
  }
}

MatrixSource MatrixSource::row_slice(int64_t first, int64_t count) const {
  MatrixSource s = *this;
  s.rows = count;
  if (ggml_type >= 0) {
    s.data = static_cast<const uint8_t*>(data) + first * row_bytes;
  } else {
    s.data = static_cast<const uint8_t*>(data) + first * ld * dtype_size(dtype);
    s.r0 = r0 + first;
  }
  return s;
}

}  // namespace tidal::kernels::cpu
