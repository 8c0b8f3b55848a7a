#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One device call for the GPU decode path: build (run_device_cuda.sh), the CUDA C++ tests and
# tests/python/test_cuda.py (golden fixtures, VRAM expert cache), then the decode step at 4K context
# (tidal_bench_cuda --only-step, BF16) under each setting of VARIANTS (environment assignments,
# ';'-separated, "default" for none; default: "default" twice), then
# attention decode at 128K context (SKIP_LONG=1: not). Prints one line per step run (gpu_ms, ratio to the bytes
# time); raw JSON lines in $OUT/steps.jsonl, logs in $OUT.
set -euo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
STEPS=build NINJA_TARGETS="tidal_tests tidal_bench_cuda _tidal" bash tests/bench/run_device_cuda.sh \
  > "$out/build_steps.log" 2>&1 || { tail -30 "$out/build_steps.log"; exit 1; }
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
bench=./build/gpu/tests/bench/tidal_bench_cuda
failed=0
timeout "${TEST_TIMEOUT:-240}" ./build/gpu/tests/tidal_tests --gtest_filter="${GTEST_FILTER:-*Cuda*}" \
  > "$out/cpp_tests.log" 2>&1 || failed=1
tail -1 "$out/cpp_tests.log"; grep -E "^\[  FAILED|Failure" "$out/cpp_tests.log" | sort -u | head -20 || true
if [ -z "${SKIP_PYTEST:-}" ]; then
  (cd tests/python && PYTHONPATH="$PWD/../../python" timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -s \
    -p no:cacheprovider test_cuda.py > "$out/pytest_cuda.log" 2>&1) || failed=1
  echo "pytest test_cuda.py: $(tail -1 "$out/pytest_cuda.log")"
  grep -E "^FAILED|^E  |cuda-measure\] vram" "$out/pytest_cuda.log" | cut -c1-300 | head -30 || true
fi
IFS=';' read -ra vs <<< "${VARIANTS:-default;default}"
for v in "${vs[@]}"; do
  e=$v; [ "$v" = default ] && e=
  env $e timeout 120 $bench --only-step --weights "${WEIGHTS:-bf16}" | python3 -c 'import json, sys
v = sys.argv[1]
for l in sys.stdin:
    if not l.startswith("{"):
        continue
    d = json.loads(l)
    d["env"] = v
    print(json.dumps(d), file=open(sys.argv[2], "a"))
    if d.get("bench") == "decode_step" and d.get("graphs") and d.get("fused_decode"):
        print("%s: gpu_ms %.4f ratio %.3f bytes_ms %.4f" % (v, d["gpu_ms"], d["gpu_ratio_to_bandwidth_time"],
                                                         d["bytes_at_measured_bw_ms"]))' "$v" "$out/steps.jsonl" || failed=1
done
[ -n "${SKIP_LONG:-}" ] || { timeout 120 $bench --no-step --contexts "${LONG_CONTEXT:-131072}" \
  --weights "${WEIGHTS:-bf16}" | tee "$out/long_context.jsonl" | grep -E '"hbm"|combine' | cut -c1-260 || failed=1; }
exit $failed
