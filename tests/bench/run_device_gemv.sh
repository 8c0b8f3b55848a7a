#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The decode GEMV on the GPU test machine: build (run_device_cuda.sh), the C++ CUDA tests, then
# tidal_bench_cuda's GEMV chain and per-shape streams for each setting in GEMV_VARIANTS
# (environment assignments, ';'-separated; default: the block-per-rows kernel, then the streaming
# kernel with its own and other launch settings), then the whole benchmark at 4K context with the
# default settings and the decode step under each of STEP_VARIANTS. JSON lines in $OUT/gemv.jsonl, each tagged with its variant.
set -euo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
STEPS=build NINJA_TARGETS="${NINJA_TARGETS:-tidal_tests tidal_bench_cuda _tidal}" bash tests/bench/run_device_cuda.sh
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
bench=./build/gpu/tests/bench/tidal_bench_cuda
failed=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-240}" ./build/gpu/tests/tidal_tests --gtest_filter="${GTEST_FILTER:-*Cuda*}" > "$out/cpp_tests.log" 2>&1 || failed=1
  tail -3 "$out/cpp_tests.log"; grep -E "^\[  FAILED|Failure" "$out/cpp_tests.log" | sort -u | head -20 || true
  # The GEMV tests again under other launch settings (TEST_VARIANTS, ';'-separated).
  IFS=';' read -ra tv <<< "${TEST_VARIANTS:-TIDAL_GEMV_BPS=1;TIDAL_GEMV_STREAM=0}"
  for v in "${tv[@]}"; do
    env $v timeout "${TEST_TIMEOUT:-240}" ./build/gpu/tests/tidal_tests --gtest_filter='*CudaGemv*:*CudaOps.Gemv*:*CudaModel*:*CudaDeltaRule*' > "$out/cpp_tests_variant.log" 2>&1 || failed=1
    echo "$v: $(tail -1 "$out/cpp_tests_variant.log")"; grep -E "^\[  FAILED" "$out/cpp_tests_variant.log" | sort -u | head -5 || true
  done
fi
tag() { python3 -c 'import json,sys
v=sys.argv[1]
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); d["env"]=v; print(json.dumps(d))' "$1"; }
# The golden transformers fixtures on device="cuda" (tests/python/test_cuda.py), with the default
# decode and with each of PYTEST_VARIANTS.
IFS=';' read -ra pv <<< "${PYTEST_VARIANTS:-TIDAL_CUDA_FUSE=0;TIDAL_CUDA_GDN_SPLIT=1}"
for v in "default" "${pv[@]}"; do
  [ -n "${SKIP_PYTEST:-}" ] && break
  e=$v; [ "$v" = default ] && e=
  (cd tests/python && env $e PYTHONPATH="$PWD/../../python" timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
    test_cuda.py > "$out/pytest_cuda.log" 2>&1) || failed=1
  echo "pytest test_cuda.py [$v]: $(tail -1 "$out/pytest_cuda.log")"
  grep -E "^FAILED|^E  " "$out/pytest_cuda.log" | head -10 || true
done
IFS=';' read -ra gv <<< "${GEMV_VARIANTS:-TIDAL_GEMV_STREAM=0;TIDAL_GEMV_STREAM=1}"
for v in "${gv[@]}"; do
  env $v $bench --gemv-only --weights "${WEIGHTS:-bf16}" | tag "$v" | tee -a "$out/gemv.jsonl" | cut -c1-220
done
IFS=';' read -ra sv <<< "${STEP_VARIANTS:-TIDAL_CUDA_GDN_SPLIT=1;TIDAL_CUDA_SIDE_ROUTE=0;TIDAL_GEMV_STREAM=0}"
for v in "default" "${sv[@]}"; do
  e=$v; a="--only-step"; [ "$v" = default ] && e= && a="--contexts 4096"
  env $e $bench $a --weights "${WEIGHTS:-bf16}" | grep -v gemv_stream_shape | grep -v decode_gemv_chain | tag "$v" | tee -a "$out/gemv.jsonl" | cut -c1-260
done
# NCU=1: one eager decode step under Nsight Compute (run_device_cuda.sh's ncu step).
if [ -n "${NCU:-}" ]; then
  OUT="$out" STEPS=ncu NINJA_TARGETS=tidal_bench_cuda bash tests/bench/run_device_cuda.sh | tail -32 || failed=1
fi
exit $failed
