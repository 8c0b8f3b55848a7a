# SPDX-License-Identifier: Apache-2.0
"""Per-layer CPU expert time in a decode step, from rt.trace(): device, threads and executor as
given on the command line, tidal-mini by default. Used to find where a hybrid step's host time
goes (docs/performance.md). Usage: python tests/bench/hybrid_overhead.py DEVICE THREADS [MODEL]"""

import json
import statistics
import sys

import tidal

device, threads = sys.argv[1], int(sys.argv[2])
model = sys.argv[3] if len(sys.argv) > 3 else "models/tidal-mini"
rt = tidal.Runtime.load(model, device=device, cpu_threads=threads, progress=False)
rt.generate("def f(x):", max_new_tokens=4)
with rt.trace() as tr:
    rt.generate("def read_lines(path):", max_new_tokens=9)
decode = tr.spans("step")[1:]  # the prompt's forward call first
out = {"device": device, "threads": threads, "executor": rt.describe().get("cpu_executor"),
       "expert_dtype": rt.describe().get("expert_dtype")}
for cat, name in (("cpu_experts", "routed_experts"), ("waits", "wait_router_ids"), ("gpu", "gpu_segment")):
    ds = [e["dur"] for e in tr.spans(cat, name) if any(f["ts"] - 50 <= e["ts"] <= f["ts"] + f["dur"] for f in decode)]
    if ds:
        out[name + "_us_median"] = round(statistics.median(ds), 1)
out["forward_us_median"] = round(statistics.median(f["dur"] for f in decode), 1)
print(json.dumps(out))
