#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Prefill expert streaming's trade, one device call (after STEPS="build model" of
# run_device_issue7.sh): prompt (pp512, pp8192) and decode (tg128) speed with streaming as chosen
# at load (TIDAL_CUDA_PREFILL_STREAM unset: its buffers come out of the expert cache's share), the
# same with each group's experts padded into one strided-batched GEMM (TIDAL_CUDA_STREAM_BATCHED=1),
# with the streamed experts' GEMMs one after another (TIDAL_CUDA_STREAM_LANES=1), and streaming
# off (every byte to the cache): same model, same caps, same call. PROFILE=1 adds where an 8K
# prefill's GPU time goes (TIDAL_CUDA_PROFILE=1, tests/bench/profile_prefill.py).
#   STEPS="build model" bash tests/bench/run_device_issue7.sh && bash tests/bench/run_device_stream_tradeoff.sh
# MODES: name=ENV=VALUE,ENV=VALUE ... (a name alone runs with the environment as it is).
set -uo pipefail
out=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)
m=${MODEL:-/tmp/m40}
export LD_LIBRARY_PATH=/tmp/deps/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/python TIDAL_EXECUTOR=spin
for mode in ${MODES:-auto batched=TIDAL_CUDA_STREAM_BATCHED=1 lanes1=TIDAL_CUDA_STREAM_LANES=1 off=TIDAL_CUDA_PREFILL_STREAM=0}; do
  s=${mode%%=*}
  envs=()
  [[ $mode == *=* ]] && IFS=, read -r -a envs <<< "${mode#*=}"
  env "${envs[@]}" timeout "${BENCH_TIMEOUT:-170}" python3 -m tidal.bench "$m" --device cuda \
    --gpu-memory 12GiB --cpu-threads 15 --expert-dtype int4 -p "${PROMPTS:-512,8192}" -n 128 -r 3 \
    --json "$out/stream_$s.json" > "$out/stream_$s.txt" 2>&1 || tail -5 "$out/stream_$s.txt"
  echo "== $s: ${envs[*]} ($SECONDS s)"
  grep -E "^\| (pp|tg)|prefill expert streaming|GPU step time" "$out/stream_$s.txt" || true
  python3 - "$out/stream_$s.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    if r.get("expert_cache"):
        print("expert cache:", r["test"], {k: r["expert_cache"].get(k) for k in ("slots", "hit_rate")})
print("gpu memory:", {k: d["gpu_memory"].get(k) for k in ("workspaces", "expert_cache", "used", "limit")})
PY
done
if [ "${PROFILE:-0}" = 1 ]; then
  TIDAL_CUDA_PROFILE=1 timeout 150 python3 tests/bench/profile_prefill.py "$m" --tokens 8192 --cpu-threads 15 \
    --expert-dtype int4 > "$out/profile8192.txt" 2>&1 || tail -5 "$out/profile8192.txt"
  sed -n '/^rep 1/,$p' "$out/profile8192.txt" | head -24
fi
