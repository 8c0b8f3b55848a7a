// SPDX-License-Identifier: Apache-2.0
/// \file cpu_features.h
/// \brief What the CPU and the OS let tidal run: the CPU ISA levels of the kernel variants,
/// detected once from CPUID + XCR0 (+ the Linux AMX permission), and the parsing of ISA caps.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tidal::kernels {

/// Kernel ISA levels, ordered: a level implies the ones below it.
///  - kRef: scalar reference (no SIMD).
///  - kAvx2: AVX2 + FMA + F16C.
///  - kAvx512: AVX-512 F/BW/VL/DQ + VNNI + BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later).
///  - kAmx: kAvx512 plus AMX-TILE/BF16/INT8 with the OS permission to use tile data.
enum class Isa : uint8_t { kRef = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

/// "ref", "avx2", "avx512", "amx".
std::string_view isa_name(Isa isa);

/// Parses an ISA name ("scalar" is accepted for "ref"); throws std::invalid_argument naming the
/// accepted values.
Isa parse_isa(std::string_view name);

/// The immutable record of the CPU's features (the only process-wide kernel state).
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx512 = false;  ///< XCR0 has opmask/ZMM state enabled.
  bool os_amx = false;     ///< XCR0 has tile state and arch_prctl granted XTILEDATA.
  bool prfchw = false;     ///< PREFETCHW (CPUID 0x80000001 ECX bit 8).
  Isa best = Isa::kRef;    ///< Highest level the kernels may use here.
  std::string brand;       ///< CPUID brand string.
};

/// Detected once (thread-safe); AMX permission is requested from the OS on first use.
const CpuFeatures& cpu_features();

/// The ISA to run with: `requested` ("auto" or empty = the best the CPU has; otherwise a cap,
/// ref/scalar/avx2/avx512/amx). The environment variable TIDAL_CPU_ISA (alias TIDAL_MAX_ISA) caps
/// "auto". Throws std::invalid_argument for an unknown name or an ISA this CPU lacks (naming what
/// it has).
Isa resolve_isa(std::string_view requested);

}  // namespace tidal::kernels
