#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Summarises an Nsight Compute CSV (``ncu --csv --metrics ...``) of one decode step: per kernel
name, the launch count, total and mean GPU time, DRAM bytes read and the achieved read bandwidth,
registers per thread and grid size. Usage: ncu_summary.py ncu.csv [peak_GBps]"""
import csv
import re
import sys
from collections import defaultdict


def short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)  # drop the argument list
    return name.replace("tidal::kernels::cuda::", "").replace("void ", "")[:60]


def main() -> None:
    rows = list(csv.DictReader(line for line in open(sys.argv[1]) if line.startswith('"')))
    peak = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    per = defaultdict(lambda: defaultdict(float))
    order = []
    for r in rows:
        key = (r["ID"], short(r["Kernel Name"]), r.get("Grid Size", ""))
        v = r["Metric Value"].replace(",", "")
        try:
            per[key][r["Metric Name"]] = float(v)
        except ValueError:
            per[key][r["Metric Name"]] = 0.0
        if key not in order:
            order.append(key)
    agg = defaultdict(lambda: defaultdict(float))
    total_t = total_b = 0.0
    for key in order:
        m = per[key]
        t = m.get("gpu__time_duration.sum", 0.0) * 1e-9  # ns
        b = m.get("dram__bytes_read.sum", 0.0)
        a = agg[(key[1], key[2])]
        a["n"] += 1
        a["t"] += t
        a["b"] += b
        a["regs"] = m.get("launch__registers_per_thread", 0.0)
        a["occ"] += m.get("sm__warps_active.avg.pct_of_peak_sustained_active", 0.0)
        total_t += t
        total_b += b
    print(f"kernels {len(order)}  total {total_t * 1e6:.1f} us  dram read {total_b / 1e9:.3f} GB"
          + (f"  = {total_b / total_t / 1e9:.0f} GB/s ({total_b / total_t / 1e9 / peak:.0%} of {peak:.0f})"
             if peak and total_t else ""))
    print(f"{'kernel':60s} {'grid':>12s} {'n':>4s} {'total_us':>9s} {'mean_us':>8s} {'MB':>8s}"
          f" {'GB/s':>7s} {'regs':>4s} {'occ%':>5s}")
    for (name, grid), a in sorted(agg.items(), key=lambda kv: -kv[1]["t"]):
        bw = a["b"] / a["t"] / 1e9 if a["t"] else 0.0
        print(f"{name:60s} {grid:>12s} {int(a['n']):4d} {a['t'] * 1e6:9.1f} "
              f"{a['t'] * 1e6 / a['n']:8.2f} {a['b'] / a['n'] / 1e6:8.2f} {bw:7.0f} "
              f"{int(a['regs']):4d} {a['occ'] / a['n']:5.1f}")


if __name__ == "__main__":
    main()
