#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds oneDNN 3 (the matmul and reorder primitives and the experimental ukernel/brgemm API; CPU
# only, OpenMP threading, inference, every ISA up to AMX) from a oneDNN source tree you bring
# (e.g. a checkout of github.com/uxlfoundation/oneDNN) and packs include/ and lib/ into
# .devcarry/onednn3.tar.xz. tests/bench/run_device_experts.sh then builds tidal_bench_experts's
# prefill baseline against it instead of Debian's oneDNN 2.6 (issue 11 asks for oneDNN 3's AMX
# matmul). Why not PyPI's onednn wheel: it is built with Intel's SYCL runtime (libsycl, libsvml,
# libimf from dpcpp-cpp-rt / intel-opencl-rt, ~300 MB), which neither machine has and which does
# not fit the device's 64 MiB carry. Nothing is committed.
#
#   bash tests/bench/build_onednn3.sh SRC_DIR          # ~35 min on 2 cores
set -euo pipefail
src=${1:?usage: build_onednn3.sh ONEDNN_SOURCE_DIR}
work=${WORK:-/tmp/onednn3-build}
prefix=$work/install
[ -f "$src/CMakeLists.txt" ] && [ -f "$src/include/oneapi/dnnl/dnnl.hpp" ] \
  || { echo "$src is not a oneDNN source tree"; exit 1; }
flags=(-DCMAKE_BUILD_TYPE=Release -DONEDNN_BUILD_TESTS=OFF -DONEDNN_BUILD_EXAMPLES=OFF
  -DONEDNN_BUILD_GRAPH=OFF -DONEDNN_CPU_RUNTIME=OMP -DONEDNN_GPU_RUNTIME=NONE
  "-DONEDNN_ENABLE_PRIMITIVE=MATMUL;REORDER" -DONEDNN_ENABLE_PRIMITIVE_CPU_ISA=AMX
  -DONEDNN_ENABLE_WORKLOAD=INFERENCE -DONEDNN_EXPERIMENTAL_UKERNEL=ON)
cmake -S "$src" -B "$work/build" -G Ninja "${flags[@]}" -DCMAKE_INSTALL_PREFIX="$prefix"
ninja -C "$work/build" -j"${JOBS:-2}" install
{
  echo "oneDNN $(git -C "$src" describe --tags --always 2>/dev/null || echo "(no git metadata)")"
  echo "built by tests/bench/build_onednn3.sh: cmake ${flags[*]}"
} > "$prefix/SOURCE.txt"
mkdir -p .devcarry
tar -cJf .devcarry/onednn3.tar.xz -C "$prefix" include lib SOURCE.txt
ls -la .devcarry/onednn3.tar.xz
