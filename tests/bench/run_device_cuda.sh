#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# CUDA backend on the GPU test machine: build with CUDA (sm_90 only, to keep the build short), run
# the CUDA kernel tests (C++), the device="cuda" Python tests (golden fixtures, graphs, VRAM
# accounting, bad input) and tidal_bench_cuda (kernel bandwidth and the 40-layer decode step).
# Logs and JSON lines go to $OUT (or ./bench-out); exit status non-zero when a test failed.
# STEPS (default "cpp python bench"; run in that order; "build" builds only) selects parts; ARCH (default 90) the CUDA
# architecture; GTEST_FILTER narrows the C++ tests (e.g. "*Cuda*"); NINJA_TARGETS narrows the build
# (e.g. "_tidal": the Python module only).
set -euo pipefail
mkdir -p "${OUT:-bench-out}" /tmp/deps
out=$(cd "${OUT:-bench-out}" && pwd)
steps=${STEPS:-cpp python bench}
failed=0
tar -xJf .devcarry/deps.tar.xz -C /tmp/deps
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH="$PATH:$d"; done
command -v nvcc >/dev/null || { echo "no nvcc on this machine"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
log=$out/build.log
cmake -S . -B build/gpu -G Ninja -DTIDAL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${ARCH:-90}" \
  -DTIDAL_BUILD_TESTS=ON -DTIDAL_BUILD_BENCHMARKS=ON -DCMAKE_PREFIX_PATH=/tmp/deps \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" > "$log" 2>&1 \
  || { tail -30 "$log"; exit 1; }
ninja -C build/gpu ${NINJA_TARGETS:-} >> "$log" 2>&1 || { grep -E "error|FAILED" -A5 "$log" | head -60; exit 1; }
ln -sf "$PWD"/build/gpu/python/_tidal*.so python/tidal/
run_cpp() {
  ./build/gpu/tests/tidal_tests > "$out/cpp_tests.log" 2>&1 || failed=1
  tail -3 "$out/cpp_tests.log"; grep -E "^\[  FAILED|SKIPPED \]|Failure|error" "$out/cpp_tests.log" | sort -u | head -40 || true
}
run_python() {
  (cd tests/python && PYTHONPATH="$PWD/../../python" python3 -m pytest -q -s -p no:cacheprovider -rs \
    ${PYTEST_ARGS:-test_cuda.py} > "$out/pytest_cuda.log" 2>&1) || failed=1
  tail -3 "$out/pytest_cuda.log"
  grep -E "cuda-measure" "$out/pytest_cuda.log" || true
  grep -E "^FAILED|^E  " "$out/pytest_cuda.log" | head -40 || true
}
run_bench() {
  ./build/gpu/tests/bench/tidal_bench_cuda ${BENCH_ARGS:-} > "$out/bench_cuda.jsonl" || failed=1
  cat "$out/bench_cuda.jsonl"
}
run_profile() {
  nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1 || true)
  if [ -n "$nsys" ]; then
    "$nsys" profile -o /tmp/step --force-overwrite true --cuda-graph-trace=node \
      ./build/gpu/tests/bench/tidal_bench_cuda --only-step --weights bf16 > /dev/null 2>&1 || true
    "$nsys" stats --report cuda_gpu_kern_sum --format csv /tmp/step.nsys-rep 2>/dev/null \
      | head -40 > "$out/profile_kernels.csv" || true
    cut -c1-160 "$out/profile_kernels.csv"
  else
    echo "no nsys on this machine"
  fi
}
# One eager decode step (bf16, today's defaults) under Nsight Compute: time, DRAM bytes, registers
# and occupancy per kernel (tests/bench/ncu_summary.py). Clocks left alone (--clock-control none).
run_ncu() {
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
  [ -n "$ncu" ] || { echo "no ncu on this machine"; return; }
  "$ncu" --clock-control none --profile-from-start off --csv --print-units base --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    ./build/gpu/tests/bench/tidal_bench_cuda --profile-step --weights bf16 ${NCU_BENCH_ARGS:-} \
    > /tmp/ncu.csv 2> "$out/ncu.err" || { tail -5 "$out/ncu.err"; failed=1; return; }
  xz -c /tmp/ncu.csv > "$out/ncu_step.csv.xz" || true
  python3 tests/bench/ncu_summary.py /tmp/ncu.csv "${NCU_PEAK_GBPS:-0}" | tee "$out/ncu_step.txt" | head -40
}
# Steps run in the order STEPS names them (e.g. "bench cpp python": the numbers first).
for step in $steps; do
  echo "== $step"
  case $step in
    build) ;;  # the build above is all
    cpp|python|bench|profile|ncu) "run_$step" ;;
    *) echo "unknown step $step"; failed=1 ;;
  esac
done
exit $failed
