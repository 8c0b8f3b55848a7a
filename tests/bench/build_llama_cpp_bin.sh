#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds llama.cpp's llama-bench, llama-completion and llama-quantize with CUDA for sm_90 on this
# (development) machine and packs them into .devcarry/llama.cpp-bin.tar.xz, which
# tests/bench/run_device_llama_cpp.sh unpacks instead of compiling llama.cpp on the GPU test
# machine (minutes of its device time per session). Nothing is committed: the source comes from the
# llama-cpp-python sdist on PyPI (vendor/llama.cpp), as in pack_llama_cpp.sh.
#
# The build is llama.cpp's release configuration for x86: the CPU backend in every variant
# (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS), the best one picked at run time for the CPU it runs on
# (sapphirerapids, with AMX, on the GPU test machine's Xeon), so building here on another CPU does
# not tune it for this one. The CUDA toolkit here must be the device's (13.0 on both).
#
#   bash tests/bench/build_llama_cpp_bin.sh [VERSION] [SRC_DIR]      # ~1.5 h on 2 cores
set -euo pipefail
version=${1:-0.3.36}
src=${2:-}
work=${WORK:-/tmp/llama-bin-build}
mkdir -p "$work"
if [ -z "$src" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
  src=$work/llama_cpp_python-$version/vendor/llama.cpp
fi
[ -f "$src/CMakeLists.txt" ] && [ -d "$src/ggml" ] || { echo "$src is not a llama.cpp tree"; exit 1; }
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH="$PATH:$d"; done
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}"
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DBUILD_SHARED_LIBS=ON
  -DGGML_CUDA_NCCL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF)
cmake -S "$src" -B "$work/build" -G Ninja "${flags[@]}"
ninja -C "$work/build" -j"${JOBS:-2}" llama-bench llama-completion llama-quantize ggml-cuda \
  ggml-cpu-sapphirerapids ggml-cpu-icelake ggml-cpu-zen4 ggml-cpu-haswell ggml-cpu-x64
{
  echo "llama.cpp from the llama-cpp-python $version sdist (vendor/llama.cpp), prebuilt by"
  echo "tests/bench/build_llama_cpp_bin.sh with CUDA $(nvcc --version | grep -o 'release [0-9.]*')"
  echo "cmake ${flags[*]}"
} > "$work/build/bin/SOURCE.txt"
mkdir -p .devcarry
tar -cJf .devcarry/llama.cpp-bin.tar.xz -C "$work/build" bin
ls -la .devcarry/llama.cpp-bin.tar.xz
