# SPDX-License-Identifier: Apache-2.0
"""Where a batched decode step spends its time on device="cuda": for B sequences, wall time of
Runtime.forward_batch, split into routed experts (host) and the rest, and with TIDAL_CUDA_PROFILE=1
(graphs off) GPU time per op label.

    TIDAL_CUDA_PROFILE=1 python tests/bench/profile_batch.py MODEL --gpu-memory 12GiB [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import time

import tidal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--cpu-threads", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    prof = os.environ.get("TIDAL_CUDA_PROFILE") == "1"
    rt = tidal.Runtime.load(a.model, device="cuda", gpu_memory=a.gpu_memory, cpu_threads=a.cpu_threads,
                            progress=False, cuda_graphs=not prof)
    for B in (int(b) for b in a.batches.split(",")):
        seqs = [rt.new_sequence() for _ in range(B)]
        for i, s in enumerate(seqs):
            s.prefill([(13 * i + k) % 1000 + 10 for k in range(16)])
        rt.forward_batch(seqs, [5] * B)  # warm-up (graph capture for this B)
        before = rt._engine.gpu_profile()
        rt.reset_stats()
        t0 = time.perf_counter()
        for step in range(a.steps):
            rt.forward_batch(seqs, [(step * 7 + b) % 1000 + 3 for b in range(B)])
        wall = (time.perf_counter() - t0) / a.steps
        st = rt.stats()
        ex = st.time["cpu_experts"] / a.steps
        print(f"B={B}: {1e3 * wall:.2f} ms/step, experts {1e3 * ex:.2f}, rest {1e3 * (wall - ex):.2f}")
        if prof:
            after = rt._engine.gpu_profile()
            rows = sorted(((after[k] - before.get(k, 0.0)) / a.steps, k) for k in after)
            total = sum(r[0] for r in rows)
            print(f"  GPU total {1e3 * total:.2f} ms/step")
            for t, k in reversed(rows[-12:]):
                print(f"  {1e3 * t:8.3f} ms  {k}")


if __name__ == "__main__":
    main()
