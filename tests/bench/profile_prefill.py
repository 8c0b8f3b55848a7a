# SPDX-License-Identifier: Apache-2.0
"""Where a long prefill spends its time on device="cuda": wall time of one prompt of T tokens,
the host's routed-expert time, and with TIDAL_CUDA_PROFILE=1 (graphs off) GPU time per op label
(ops of the main stream; a label that waits on a copy or on the host includes the wait).

    TIDAL_CUDA_PROFILE=1 TIDAL_CUDA_PREFILL_STREAM=1 python tests/bench/profile_prefill.py MODEL \
        --tokens 8192 --gpu-memory 12GiB --cpu-threads 15
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
    ap.add_argument("--expert-dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    prof = os.environ.get("TIDAL_CUDA_PROFILE") == "1"
    rt = tidal.Runtime.load(a.model, device="cuda", gpu_memory=a.gpu_memory, cpu_threads=a.cpu_threads,
                            expert_dtype=a.expert_dtype, progress=False, cuda_graphs=not prof,
                            max_context=a.tokens + 64)
    prompt = [(7919 * i) % 30000 + 10 for i in range(a.tokens)]
    s = rt.new_sequence()
    s.forward(prompt[:256], all_logits=False)  # warm-up: kernels, cuBLAS handles, first-use allocations
    for rep in range(a.reps):
        s = rt.new_sequence()
        before = rt._engine.gpu_profile() if prof else {}
        rt.reset_stats()
        t0 = time.perf_counter()
        s.forward(prompt, all_logits=False)
        wall = time.perf_counter() - t0
        st = rt.stats()
        times = ", ".join(f"{k} {v:.3f} s" for k, v in st.time.items() if v)
        print(f"rep {rep}: T={a.tokens}: {wall:.3f} s = {a.tokens / wall:.0f} tok/s ({times})")
        if prof:
            after = rt._engine.gpu_profile()
            rows = sorted((after[k] - before.get(k, 0.0), k) for k in after)
            total = sum(r[0] for r in rows)
            print(f"  GPU total {1e3 * total:.1f} ms (main stream, between marks)")
            for t, k in reversed(rows):
                if t > 0:
                    print(f"  {1e3 * t:9.2f} ms  {100 * t / total:5.1f}%  {k}")
        del s


if __name__ == "__main__":
    main()
