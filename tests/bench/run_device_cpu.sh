#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build tidal on the GPU test machine and benchmark the Qwen3.6-35B-A3B shape on its CPU
# (docs/performance.md). That machine has no network. It has the Debian/Ubuntu -dev packages tidal
# needs except TBB, and a Python venv with cmake, ninja, scikit-build-core and pybind11. So the TBB
# wheels travel with the working tree. Prepare them on a machine with network:
#
#   pip download --no-deps --only-binary :all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .devcarry tbb-devel tbb
#   echo ".devcarry/" >> .git/info/exclude
#
# then run this script there with .devcarry carried. Writes JSON reports to $OUT (or ./bench-out).
set -euo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
prefix=$(python3 -c 'import sys; print(sys.prefix)')
python3 -m pip install -q --no-deps --no-index .devcarry/tbb*.whl
export LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-deps --no-build-isolation . -Cbuild-dir=build/device \
  -Ccmake.define.TIDAL_CUDA=OFF -Ccmake.define.CMAKE_PREFIX_PATH="$prefix" \
  -Ccmake.define.pybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
cd /tmp
for layers in 4 8; do  # two depths of the same pattern: per-layer cost by difference (docs/performance.md)
  python3 -m tidal.synth --preset qwen3.6-35b-a3b --layers "$layers" "/tmp/q36-$layers" 2>/dev/null
  python3 -m tidal.bench "/tmp/q36-$layers" -p 512 -n 32 -r 2 --cpu-threads 16 --json "$out/bench_q36_$layers.json"
  rm -rf "/tmp/q36-$layers"
done
