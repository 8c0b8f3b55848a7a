# SPDX-License-Identifier: Apache-2.0
"""Times the VRAM expert cache's start on a real-shape model: Runtime.load (slots allocated, the
host expert store registered for DMA), then decode steps, printing the hit rate and fills as the
cache warms up. One JSON line per phase.

    python3 tests/bench/cache_probe.py MODEL [--gpu-memory 12GiB] [--threads 15] [--steps 256] [--slots auto|N]
"""
import argparse
import json
import time

import numpy as np

import tidal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--slots", default="auto")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rt = tidal.Runtime.load(a.model, device="cuda", gpu_memory=a.gpu_memory, num_threads=a.threads, progress=False,
                            gpu_expert_slots=None if a.slots == "auto" else int(a.slots))
    st = rt._engine.stats()
    print(json.dumps({"phase": "load", "s": time.perf_counter() - t0, "slots": st.get("gpu_expert_slots"),
                      "memory": rt.memory_report()}), flush=True)
    seq = rt.new_sequence()
    ids = np.random.default_rng(0).integers(5, rt.config.vocab_size - 1, 32 + a.steps)
    t0 = time.perf_counter()
    seq.prefill([int(i) for i in ids[:32]])
    print(json.dumps({"phase": "prefill32", "s": time.perf_counter() - t0}), flush=True)
    last, t0 = rt._engine.stats(), time.perf_counter()
    for i, t in enumerate(ids[32:]):
        seq.forward([int(t)], all_logits=False)
        if (i + 1) % 32 == 0:
            now, st = time.perf_counter(), rt._engine.stats()
            g = st["gpu_expert_pairs"] - last["gpu_expert_pairs"]
            h = st["host_expert_pairs"] - last["host_expert_pairs"]
            print(json.dumps({"phase": f"steps{i + 1}", "tok_s": 32 / (now - t0), "hit": g / max(1, g + h),
                              "fills": st["gpu_expert_fills"] - last["gpu_expert_fills"]}), flush=True)
            last, t0 = st, time.perf_counter()


if __name__ == "__main__":
    main()
