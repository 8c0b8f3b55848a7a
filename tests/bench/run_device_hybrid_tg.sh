#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Hybrid decode (GPU + CPU experts) on the GPU test machine, A/B over the CPU executor in one run:
# builds tidal with CUDA (run_device_cuda.sh's build), writes the Qwen3.6-35B-A3B shape at real width
# with LAYERS layers (default 8) and pre-packed EXPERT_DTYPE experts (default int4), then runs
# tidal.bench with device cuda, a 12 GiB VRAM cap and 16 threads, alternating TIDAL_EXECUTOR=spin
# and tbb (Note [Spinning workers]; EXECUTORS to choose) ROUNDS times (default 2); BENCH_ARGS are
# added to tidal.bench's (e.g. "--gpu-expert-slots auto" for the VRAM expert cache). JSON and text
# in $OUT (or ./bench-out).
set -euo pipefail
mkdir -p "${OUT:-bench-out}"
out=$(cd "${OUT:-bench-out}" && pwd)
layers=${LAYERS:-8}
dtype=${EXPERT_DTYPE:-int4}
threads=${THREADS:-16}
STEPS=build NINJA_TARGETS=${NINJA_TARGETS:-_tidal} OUT="$out" bash tests/bench/run_device_cuda.sh > "$out/build_steps.log" 2>&1 \
  || { tail -30 "$out/build_steps.log"; exit 1; }
echo "built in ${SECONDS}s"
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/python
model=/tmp/tidal-hybrid/qwen3.6-35b-a3b-L$layers-$dtype
[ -f "$model/config.json" ] || python3 -m tidal.synth --preset qwen3.6-35b-a3b --layers "$layers" \
  --expert-dtype "$dtype" "$model" > /dev/null 2>&1
sync
echo "model written at ${SECONDS}s"
for round in $(seq "${ROUNDS:-2}"); do
  for ex in ${EXECUTORS:-spin tbb}; do
    TIDAL_EXECUTOR=$ex python3 -m tidal.bench "$model" --device cuda --gpu-memory 12GiB \
      --cpu-threads "$threads" --expert-dtype "$dtype" -p "${PROMPTS:-512}" -n 128 -r 3 ${BENCH_ARGS:-} \
      --json "$out/tg_${ex}_$round.json" > "$out/tg_${ex}_$round.txt" 2>&1 || tail -20 "$out/tg_${ex}_$round.txt"
    echo "== TIDAL_EXECUTOR=$ex round $round"
    grep -E "^\| (pp|tg)" "$out/tg_${ex}_$round.txt" || true
  done
done
