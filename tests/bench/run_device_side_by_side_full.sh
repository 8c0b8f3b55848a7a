#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 7's same-run comparison in one device call (~500 s): tidal with its defaults (expert cache
# and prefill streaming chosen at load) and llama.cpp with every routed expert on the CPU, on the
# 40-layer Qwen3.6-35B-A3B shape (tidal INT4 g64 pre-packed / llama.cpp Q4_K), 12 GiB cap,
# pp512, pp8192, tg128, 3 repetitions (llama.cpp: each micro-batch of UBATCH in its own run with its
# own VRAM peak, all tests at UBATCH_FULL, pp8192 at the others); then the side-by-side table with
# llama.cpp's fastest micro-batch within the cap and its fastest whatever its VRAM.
# Needs .devcarry/deps.tar.xz (make_devcarry.sh) and .devcarry/llama.cpp-bin.tar.xz
# (build_llama_cpp_bin.sh); the two with the tree exceed the 64 MiB carry unless models/ and
# tests/fixtures/ are moved out of the working tree for the call (nothing here uses them):
#   mv models tests/fixtures /elsewhere/ ; run with carry [".devcarry"] ; move them back
#   TIDAL_COMMIT=$(git rev-parse --short HEAD) bash tests/bench/run_device_side_by_side_full.sh
# Extra tidal.bench arguments: TIDAL_BENCH_ARGS; TIDAL_CUDA_* switches pass through the environment.
set -uo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
STEPS="build model" OUT="$out" bash tests/bench/run_device_issue7.sh > "$out/issue7_steps.log" 2>&1 \
  || { tail -20 "$out/issue7_steps.log"; exit 1; }
tail -2 "$out/issue7_steps.log"
mkdir -p /tmp/tidal-side-by-side/full && ln -sfn "${MODEL:-/tmp/m40}" /tmp/tidal-side-by-side/full/int4
TIDAL_EXECUTOR=spin UBATCH=${UBATCH:-2048,4096,6144,7168,8192} UBATCH_FULL=${UBATCH_FULL:-2048} STEPS="build full4" OUT="$out" \
  TIDAL_BENCH_ARGS="--cpu-threads 15 ${TIDAL_BENCH_ARGS:-}" bash tests/bench/run_device_llama_cpp.sh 2>&1 | tail -25
python3 tests/bench/side_by_side.py "$out" | tee "$out/side_by_side.md"
python3 - "$out/llama_q4_k.json" <<'PY' || true
import json, sys
for r in json.load(open(sys.argv[1])):
    peak = r.get("vram_peak_over_idle_gib")
    at = f" (VRAM peak over idle {peak:.2f} GiB)" if peak is not None else ""
    print(f"llama.cpp ub {r['n_ubatch']}: pp{r['n_prompt']} tg{r['n_gen']} {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} tok/s{at}")
PY
# tidal's pp8192 again under each TIDAL_CUDA_DELTA_CHUNKED value of EXTRA_DELTA_MODES (default
# none), for comparison with the run above.
export PYTHONPATH=$PWD/python LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-}
for dm in ${EXTRA_DELTA_MODES:-}; do
  TIDAL_CUDA_DELTA_CHUNKED=$dm TIDAL_EXECUTOR=spin timeout 150 python3 -m tidal.bench "${MODEL:-/tmp/m40}" \
    --device cuda --gpu-memory 12GiB --cpu-threads 15 --expert-dtype int4 -p 8192 -n "" -r 3 \
    --json "$out/tidal_pp_dc$dm.json" > "$out/tidal_pp_dc$dm.txt" 2>&1 || tail -5 "$out/tidal_pp_dc$dm.txt"
  echo "tidal pp8192, TIDAL_CUDA_DELTA_CHUNKED=$dm: $(grep -E '^\| pp' "$out/tidal_pp_dc$dm.txt" | head -1)"
done
