#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Batched decoding on the GPU test machine: build with CUDA and run the batching tests (device="cuda"
# included) and the CUDA tests (the single-sequence path shares the segment code), then the
# concurrent-streams benchmark of issue 9 on the Qwen3.6-35B-A3B shape (tidal.synth, INT4 g64
# experts), 12 GiB GPU cap, unbatched and batched. Carry .devcarry (deps.tar.xz). Logs and JSON go
# to $OUT (or ./bench-out). STEPS (default "test bench") selects parts.
set -euo pipefail
mkdir -p "${OUT:-bench-out}"
out=$(cd "${OUT:-bench-out}" && pwd)
steps=${STEPS:-test bench}
failed=0
if [[ $steps == *test* ]]; then
  STEPS=python PYTEST_ARGS="${PYTEST_ARGS:-test_batching.py test_cuda.py}" bash tests/bench/run_device_cuda.sh || failed=1
else
  STEPS=none bash tests/bench/run_device_cuda.sh || exit 1  # build only
fi
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
if [[ $steps == *bench* ]]; then
  export PYTHONPATH="$PWD/python" TIDAL_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ -d /tmp/m35 ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --expert-dtype int4 \
    --expert-group-size 64 /tmp/m35 > "$out/synth.log" 2>&1
  python3 tests/bench/bench_concurrent.py /tmp/m35 --device cuda --gpu-memory 12GiB --cpu-threads 16 \
    --tokens "${TOKENS:-64}" --streams "${STREAMS:-1,2,4,8}" --json "$out/concurrent_35b_int4.json" \
    2>&1 | tee "$out/concurrent.log" || failed=1
fi
exit $failed
