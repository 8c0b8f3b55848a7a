#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call that checks the GPU code: builds (run_device_cuda.sh's build), then runs PARTS in
# order while the call's time allows (LIMIT seconds from the start, default 585):
#   cpp    the CUDA C++ tests (*Cuda*, *ExpertStore*, ExpertCacheSchedule*)
#   py     tests/python/test_cuda.py
#   cache  test_cuda.py with the VRAM expert cache on by default (TIDAL_GPU_EXPERT_SLOTS=auto)
#   auto   test_cuda.py with prefill expert streaming as a user gets it (TIDAL_CUDA_PREFILL_STREAM=auto;
#          tests/python/conftest.py turns it off unless asked)
# (default PARTS="cpp py cache"). Logs in $OUT; the summary on stdout; exit status 1 when a part
# failed, timed out or had no time left.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
limit=${LIMIT:-585}
failed=0
STEPS=build bash tests/bench/run_device_issue7.sh || exit 1
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run_cpp() {
  local left=$((limit - SECONDS))
  [ "$left" -gt 30 ] || { echo "cpp: no time left"; failed=1; return; }
  timeout "$left" ./build/gpu/tests/tidal_tests \
    --gtest_filter='*Cuda*:*ExpertStore*:ExpertCacheSchedule*' > "$out/cpp.log" 2>&1 || failed=1
  echo "C++: $(tail -1 "$out/cpp.log") ($SECONDS s)"
  grep -E "^\[  FAILED|fused vs unfused|Failure" "$out/cpp.log" | sort -u | head -30 || true
}
run_py() {  # log name, then pytest arguments
  local name=$1 left=$((limit - SECONDS))
  shift
  [ "$left" -gt 30 ] || { echo "$name: no time left"; failed=1; return; }
  (cd tests/python && timeout "$left" python3 -m pytest -q -s -p no:cacheprovider "$@" > "$out/$name.log" 2>&1) \
    || failed=1
  echo "$name: $(tail -1 "$out/$name.log") ($SECONDS s)"
  grep -E "^FAILED|^E  |lookahead prefetch|cuda-measure\] (vram|prefill)" "$out/$name.log" | cut -c1-300 | head -30 || true
}
for part in ${PARTS:-cpp py cache}; do
  case $part in
    cpp) run_cpp ;;
    py) run_py pyc test_cuda.py ;;
    cache) TIDAL_GPU_EXPERT_SLOTS=auto run_py pyc_cache_default test_cuda.py ;;
    auto) TIDAL_CUDA_PREFILL_STREAM=auto run_py pyc_stream_auto test_cuda.py ;;
    *) echo "unknown part $part"; failed=1 ;;
  esac
done
exit $failed
