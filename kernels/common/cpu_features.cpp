// SPDX-License-Identifier: Apache-2.0
/// \file cpu_features.cpp
/// \brief CPUID/XCR0 detection and the Linux AMX tile-data permission request.
#include "kernels/common/cpu_features.h"

#include <cpuid.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tidal::kernels {
namespace {

void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}

uint64_t xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux asks each process to request permission for the AMX tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM with XFEATURE_XTILEDATA) before its first tile instruction.
bool request_amx_permission() {
#if defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  uint32_t r[4];
  cpuid(0, 0, r);
  const uint32_t max_leaf = r[0];
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    f.avx2 = os_avx && ((r[1] >> 5) & 1);
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    f.avx512_vnni = (r[2] >> 11) & 1;
    f.amx_bf16 = (r[3] >> 22) & 1;
    f.amx_tile = (r[3] >> 24) & 1;
    f.amx_int8 = (r[3] >> 25) & 1;
    cpuid(7, 1, r);
    f.avx512_bf16 = (r[0] >> 5) & 1;
  }
  cpuid(0x80000000u, 0, r);
  const uint32_t max_ext = r[0];
  if (max_ext >= 0x80000001u) {
    cpuid(0x80000001u, 0, r);
    f.prfchw = (r[2] >> 8) & 1;
  }
  if (max_ext >= 0x80000004u) {
    char b[49] = {};
    for (uint32_t i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(b + 16 * i, r, 16);
    }
    f.brand = b;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
  }
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
                      f.avx512_vnni && f.avx512_bf16;
  const bool amx_xcr0 = (xcr0 & 0x60000) == 0x60000;
  f.os_amx =
      avx512 && f.amx_tile && f.amx_bf16 && f.amx_int8 && amx_xcr0 && request_amx_permission();
  f.best = f.os_amx ? Isa::kAmx : avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kRef;
  return f;
}

}  // namespace

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::kRef:
      return "ref";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAmx:
      return "amx";
  }
  return "?";
}

Isa parse_isa(std::string_view s) {
  if (s == "ref" || s == "scalar") return Isa::kRef;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  if (s == "amx") return Isa::kAmx;
  throw std::invalid_argument("unknown CPU ISA \"" + std::string(s) +
                              "\"; expected one of auto, scalar (ref), avx2, avx512, amx");
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa resolve_isa(std::string_view requested) {
  const CpuFeatures& f = cpu_features();
  std::string_view want = requested;
  const char* source = "cpu_isa";
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("TIDAL_CPU_ISA");
    source = "TIDAL_CPU_ISA";
    if (env == nullptr || *env == '\0') {
      env = std::getenv("TIDAL_MAX_ISA");
      source = "TIDAL_MAX_ISA";
    }
    if (env == nullptr || *env == '\0' || std::string_view(env) == "auto") return f.best;
    want = env;
  }
  Isa isa;
  try {
    isa = parse_isa(want);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(source) + ": " + e.what());
  }
  if (static_cast<int>(isa) > static_cast<int>(f.best))
    throw std::invalid_argument(std::string(source) + "=" + std::string(want) + ": this CPU (" +
                                f.brand + ") supports up to \"" + std::string(isa_name(f.best)) +
                                "\"");
  return isa;
}

}  // namespace tidal::kernels
