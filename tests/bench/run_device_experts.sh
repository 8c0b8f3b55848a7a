#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CPU expert engine on the GPU test machine (Xeon with AMX, no network): build the kernels, the C++
# tests and tidal_bench_experts (with the oneDNN baseline), run the expert tests (AMX included),
# the benchmark on the Qwen3.6-35B-A3B and Qwen3-Next-80B-A3B expert shapes, and KTransformers'
# kt-kernel on the same shapes. Writes logs and JSON lines to $OUT (or ./bench-out).
#
# What that machine lacks travels in .devcarry/deps.tar.xz (see tests/bench/make_devcarry.sh):
# TBB (PyPI wheels), oneDNN 2.6 + its OpenCL loader (Debian .debs), the kt-kernel wheel.
set -euo pipefail
out=${OUT:-bench-out}
mkdir -p "$out" /tmp/deps
tar -xJf .devcarry/deps.tar.xz -C /tmp/deps
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
threads=${THREADS:-$(nproc)}
cmake -S . -B build/bench -G Ninja -DTIDAL_CUDA=OFF -DTIDAL_BUILD_TESTS=ON -DTIDAL_BUILD_BENCHMARKS=ON \
  -DTIDAL_BUILD_PYTHON=OFF -DCMAKE_PREFIX_PATH=/tmp/deps \
  > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
ninja -C build/bench tidal_tests tidal_bench_experts >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
grep -E "oneDNN|benchmarks" "$out/build.log" || true
./build/bench/tests/tidal_tests --gtest_filter='Expert*:Moe*:CpuFeatures*' > "$out/tests.log" 2>&1 || true
tail -4 "$out/tests.log"; grep -E "FAILED|SKIPPED" "$out/tests.log" || true
b=./build/bench/tests/bench/tidal_bench_experts
"$b" --shape 35b --m 1 --threads 1,2,4,8,"$threads" --dtypes int4,int8,bf16 > "$out/decode_scaling.jsonl"
"$b" --shape 35b --m 1,4,16,128,512,2048 --threads "$threads" --dtypes int4,int8,bf16 --onednn > "$out/bench_35b.jsonl"
"$b" --shape 80b --m 1,16,2048 --threads "$threads" --dtypes int4,int8 > "$out/bench_80b.jsonl"
python3 tests/bench/bench_kt.py /tmp/deps/kt/kt_kernel/kt_kernel_ext*.so --threads "$threads" \
  > "$out/kt_35b.jsonl" 2> "$out/kt.log" || { echo "kt-kernel failed:"; tail -5 "$out/kt.log"; }
