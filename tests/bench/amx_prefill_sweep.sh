#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# AMX prefill knobs on the GPU test machine, interleaved repeats (the shared machine's noise is
# up to 2x between identical runs): the weight prefetch (TIDAL_AMX_PREFETCH bytes ahead,
# TIDAL_AMX_PREFETCH_L2), single-thread tile calls (hot and cold) and the whole op at 2048 tokens
# at 1, 8 and 16 threads. MICRO_REPS, PF_LIST, OP_REPS, OP_PF_LIST, OP_THREADS, OP_DTYPES and
# SCALING choose what runs. Run after run_device_experts.sh has built build/bench (any STEPS).
# Output: $OUT/amx_sweep.jsonl and a summary on stdout.
set -euo pipefail
out=$(cd "${OUT:-bench-out}" && pwd)
b=./build/bench/tests/bench/tidal_bench_experts
threads=${THREADS:-$(nproc)}
lscpu | grep -E "^(Model name|Thread|Core|Socket|L2|L3|CPU\(s\)|NUMA node\(s\))" || true
for rep in $(seq 1 "${MICRO_REPS:-3}"); do
  for pf in ${PF_LIST:-0:0 8192:0 16384:1 32768:1}; do
    TIDAL_AMX_PREFETCH=${pf%:*} TIDAL_AMX_PREFETCH_L2=${pf#*:} "$b" --micro --dtypes int8,int4 --m 64,128 |
      sed "s/^{/{\"rep\":$rep,\"pf\":\"$pf\",/"
  done
done > "$out/amx_sweep.jsonl"
for rep in $(seq 1 "${OP_REPS:-2}"); do
  for pf in ${OP_PF_LIST:-8192:0 32768:1}; do
    TIDAL_AMX_PREFETCH=${pf%:*} TIDAL_AMX_PREFETCH_L2=${pf#*:} "$b" --shape 35b --m 2048 \
      --threads "${OP_THREADS:-$threads}" --dtypes "${OP_DTYPES:-int8}" --seconds 1 | sed "s/^{/{\"rep\":$rep,\"pf\":\"$pf\",/"
  done
done >> "$out/amx_sweep.jsonl"
[[ -n ${SCALING:-} ]] && "$b" --shape 35b --m 2048 --threads 1,8,"$threads" --dtypes int8 --seconds 1 |
  sed 's/^{/{"rep":0,"pf":"default",/' >> "$out/amx_sweep.jsonl"
python3 - "$out/amx_sweep.jsonl" <<'PY'
import json, sys, collections
micro = collections.defaultdict(list)
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["bench"] == "micro":
        micro[(d["variant"], d["m"], d["cold"], d["pf"])].append(d["us_per_call"])
    elif d["bench"] == "moe_experts":
        print(f'op pf={d["pf"]} rep={d["rep"]} {d["threads"]:2d} thr {d["dtype"]} {d["median_us"]:8.0f} us '
              f'{d["tflops"]:.2f} TFLOP/s {d["roofline_fraction"]:.3f} of roofline (bw {d["read_bw_gbps"]:.0f}, '
              f'int8 peak {d["amx_peak_int8_tops"]:.1f}) {d["phase_us"]}')
for k in sorted(micro):
    print("micro", *k, "us:", " ".join(f"{v:.2f}" for v in micro[k]))
PY
