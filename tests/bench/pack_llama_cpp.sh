#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Packs the llama.cpp source that tests/bench/run_device_llama_cpp.sh builds on the GPU test machine
# (which has no network) into .devcarry/llama.cpp-src.tar.xz (~4 MB). The source is not committed:
# it comes from the llama-cpp-python sdist on PyPI, which carries the whole llama.cpp tree under
# vendor/llama.cpp (0.3.36: llama.cpp of 2026-10-01, with the qwen35moe architecture). Only the
# folders the CMake build of llama-bench needs are packed; other GPU backends, the web UI and
# audio are left out. Usage: bash tests/bench/pack_llama_cpp.sh [VERSION] [SRC_DIR]
# (SRC_DIR: an unpacked llama.cpp tree to pack instead of downloading).
set -euo pipefail
version=${1:-0.3.36}
src=${2:-}
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
if [ -z "$src" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$w"
  tar -xzf "$w"/llama_cpp_python-*.tar.gz -C "$w"
  src=$(echo "$w"/llama_cpp_python-*/vendor/llama.cpp)
fi
[ -f "$src/CMakeLists.txt" ] && [ -d "$src/ggml" ] || { echo "$src is not a llama.cpp tree"; exit 1; }
mkdir -p .devcarry
parent=$(cd "$src/.." && pwd)
name=$(basename "$src")
# Where the source came from, for the results (the packed tree has no git metadata).
echo "llama.cpp from the llama-cpp-python $version sdist (vendor/llama.cpp)${2:+, unpacked tree given}" > "$src/SOURCE.txt"
x=()
for b in vulkan sycl opencl hexagon metal et webgpu openvino cann; do x+=(--exclude="$name/ggml/src/ggml-$b"); done
tar "${x[@]}" --exclude="$name/tools/ui" --exclude='*.png' --transform "s|^$name|llama.cpp|" \
  -cJf .devcarry/llama.cpp-src.tar.xz -C "$parent" \
  "$name"/{CMakeLists.txt,cmake,ggml,src,include,common,vendor,tools,licenses,LICENSE,app,SOURCE.txt}
ls -la .devcarry/llama.cpp-src.tar.xz
