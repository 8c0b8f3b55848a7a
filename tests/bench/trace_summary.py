# SPDX-License-Identifier: Apache-2.0
"""One line per decode call measured by `tidal_bench_experts --trace` (run_device_experts.sh's
trace step): the op's median time and fraction of the read bandwidth, then from the per-thread
timeline the entry, when the token's row was ready, when the last gate/up and down items finished
(medians per thread, their maximum), phase 2's length, the caller's return and the items stolen,
then (newer traces) the medians over calls of each call's last share start, gate/up end and down
end, and the return's distance from that last down end (and, per environment, the medians of
the entry before the dispatch, the row's readiness after it and that end distance),
followed by the median fraction per environment and dtype over the repetitions, also against the
larger of the two bandwidth probes (before and right after the op's calls).

    python3 tests/bench/trace_summary.py bench-out/decode_trace.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    op = None
    fractions = defaultdict(list)
    worst = defaultdict(list)
    fixed = defaultdict(list)  # per call: entry before dispatch, row after it, return after last down
    for line in open(path):
        d = json.loads(line)
        if d["bench"] == "moe_experts":
            op = d
        elif d["bench"] == "decode_trace" and op is not None:
            shares = d["shares"]
            gate_up = max(s[2] for s in shares)
            down = max(s[5] for s in shares)
            env = d.get("env", "-").replace("TIDAL_EXPERT_", "")
            fractions[(env, op["dtype"], op["shape"])].append(op["bw_fraction"])
            worst[(env, op["dtype"], op["shape"])].append(op.get("bw_fraction_worst", op["bw_fraction"]))
            if "last_down_us" in d:
                fixed[(env, op["dtype"], op["shape"])].append(
                    (-d["entry_us"], d.get("prepared_us", 0), d["return_us"] - d["last_down_us"]))
            print(f'{d.get("rep", "-")} {env[:48]:48s} {op["shape"][:10]} {op["dtype"]} '
                  f'{op["median_us"]:6.1f} us {op["bw_fraction"]:.3f} of {op["read_bw_gbps"]:.0f} GB/s '
                  f'(after {op.get("read_bw_after_gbps", 0):.0f}) | '
                  f'entry {d["entry_us"]:.1f} row {d.get("prepared_us", 0):.1f} gu {gate_up:.1f} '
                  f'dn {down:.1f} ph2 {down - gate_up:.1f} ret {d["return_us"]:.1f} '
                  f'stolen {d.get("stolen_items", 0):.0f}'
                  + (f' | per call: last start {d["last_start_us"]:.1f} gu {d["last_gate_up_us"]:.1f} '
                     f'dn {d["last_down_us"]:.1f} end {d["return_us"] - d["last_down_us"]:.1f}'
                     if "last_down_us" in d else ''))
    for (env, dtype, shape), f in sorted(fractions.items()):
        print(f'median of {len(f)}: {env[:48]:48s} {shape[:10]} {dtype} {statistics.median(f):.3f} '
              f'(min {min(f):.3f}, max {max(f):.3f}); against the larger probe '
              f'{statistics.median(worst[(env, dtype, shape)]):.3f}'
              + ('; fixed costs (µs): entry {:.1f} row {:.1f} end {:.1f}'.format(
                  *(statistics.median(x[i] for x in fixed[(env, dtype, shape)]) for i in range(3)))
                 if fixed[(env, dtype, shape)] else ''))


if __name__ == "__main__":
    main(sys.argv[1])
