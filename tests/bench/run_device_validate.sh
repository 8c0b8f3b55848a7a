#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call that checks the GPU code: builds (run_device_cuda.sh's build), then runs PARTS in
# order while the call's time allows (LIMIT seconds from the start, default 585):
#   cpp    the CUDA C++ tests (*Cuda*, *ExpertStore*, ExpertCacheSchedule*)
#   py     tests/python/test_cuda.py
#   cache  test_cuda.py with the VRAM expert cache on by default (TIDAL_GPU_EXPERT_SLOTS=auto)
#   auto   test_cuda.py with prefill expert streaming as a user gets it (TIDAL_CUDA_PREFILL_STREAM=auto;
#          tests/python/conftest.py turns it off unless asked)
#   dc0    test_cuda.py with the staged delta rule (TIDAL_CUDA_DELTA_CHUNKED=0; the two-pass chunked
#          form is the default)
#   profile  the 40-layer 35B-A3B shape, then GPU time per op of an 8192-token streamed prefill
#          (run_device_issue7.sh's profile) under each delta-rule mode of DELTA_MODES (default "0 2")
#   pp     the 40-layer 35B-A3B shape (run_device_issue7.sh's model, /tmp/m40), then tidal.bench
#          pp8192 (streaming chosen at load) once per entry of PP_ENVS (ENV=VALUE, or "-" for the
#          defaults; default "- TIDAL_CUDA_DELTA_CHUNKED=0")
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
    dc0) TIDAL_CUDA_DELTA_CHUNKED=0 run_py pyc_dc0 test_cuda.py ;;
    profile)
      left=$((limit - SECONDS))
      if [ "$left" -lt 150 ]; then echo "profile: no time left"; failed=1; continue; fi
      STEPS="model profile" DELTA_CHUNKED="${DELTA_MODES:-0 2}" OUT="$out" timeout "$left" \
        bash tests/bench/run_device_issue7.sh 2>&1 | tail -22 || failed=1 ;;
    pp)
      left=$((limit - SECONDS))
      if [ "$left" -lt 120 ]; then echo "pp: no time left"; failed=1; continue; fi
      STEPS=model OUT="$out" timeout "$left" bash tests/bench/run_device_issue7.sh > "$out/model.log" 2>&1 \
        || { echo "pp: model failed"; tail -5 "$out/model.log"; failed=1; continue; }
      # PP_ENVS: one run per entry, each an environment assignment (ENV=VALUE) or "-" (defaults).
      for v in ${PP_ENVS:-- TIDAL_CUDA_DELTA_CHUNKED=0}; do
        left=$((limit - SECONDS))
        [ "$left" -gt 40 ] || { echo "pp $v: no time left"; failed=1; break; }
        name=${v//[^A-Za-z0-9]/_}
        if [ "$v" = "-" ]; then set --; else set -- "$v"; fi
        env "$@" TIDAL_EXECUTOR=spin timeout "$left" python3 -m tidal.bench /tmp/m40 \
          --device cuda --gpu-memory 12GiB --cpu-threads 15 --expert-dtype int4 -p 8192 -n "" -r 3 \
          --json "$out/pp_$name.json" > "$out/pp_$name.txt" 2>&1 || failed=1
        echo "pp8192 [$v] ($SECONDS s): $(grep -E '^\| pp' "$out/pp_$name.txt" | head -1)"
        grep -E "^prefill expert streaming" "$out/pp_$name.txt" | cut -c1-200
      done ;;
    *) echo "unknown part $part"; failed=1 ;;
  esac
done
exit $failed
