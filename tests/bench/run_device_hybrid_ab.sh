#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Hybrid decode (GPU + CPU experts) A/B of the GPU decode path in one device call: the golden
# fixtures on device="cuda" first (tests/python/test_cuda.py), then run_device_hybrid_tg.sh
# (LAYERS, default 8; one spinning-executor round; THREADS, default 15 = the device="cuda" default
# on 16 cores) once per setting in VARIANTS (environment assignments, ';'-separated; default: the
# decode as it is, and the block-per-rows GEMV without fused norms, the GPU path before
# 2026-12-06's streaming GEMV). Text and JSON under $OUT/<n>/.
set -euo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
STEPS=build NINJA_TARGETS=_tidal OUT="$out" bash tests/bench/run_device_cuda.sh > "$out/build_steps.log" 2>&1 \
  || { tail -30 "$out/build_steps.log"; exit 1; }
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
failed=0
(cd tests/python && PYTHONPATH="$PWD/../../python" python3 -m pytest -q -s -p no:cacheprovider test_cuda.py \
  > "$out/pytest_cuda.log" 2>&1) || failed=1
echo "pytest test_cuda.py: $(tail -1 "$out/pytest_cuda.log")"
grep -E "^FAILED|^E  |cuda-measure\] vram" "$out/pytest_cuda.log" | cut -c1-400 | head -30 || true
IFS=';' read -ra vs <<< "${VARIANTS:-default;TIDAL_GEMV_STREAM=0 TIDAL_CUDA_FUSE=0}"
n=0
for v in "${vs[@]}"; do
  n=$((n + 1)); e=$v; [ "$v" = default ] && e=
  mkdir -p "$out/$n"; echo "$v" > "$out/$n/variant.txt"
  echo "== [$n] $v"
  env $e OUT="$out/$n" LAYERS="${LAYERS:-8}" THREADS="${THREADS:-15}" EXECUTORS=spin ROUNDS=1 \
    NINJA_TARGETS=_tidal bash tests/bench/run_device_hybrid_tg.sh 2>&1 | grep -E "^\| (pp|tg)|Error|error" || failed=1
done
exit $failed
