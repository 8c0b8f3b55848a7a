# SPDX-License-Identifier: Apache-2.0
"""Aggregate decode speed of N concurrent streams on one runtime, as `tidal serve` runs them (one
sequence per request, each in its own thread), for N in --streams: first with every sequence running
its own forward calls ("unbatched"), then through the batching scheduler ("batched":
Runtime.enable_batching, one decode step for all sequences). Prints a table and writes JSON.

    python tests/bench/bench_concurrent.py MODEL [--device cuda --gpu-memory 12GiB] [--cpu-threads 16]
        [--streams 1,2,4,8] [--tokens 64] [--modes unbatched,batched] [--json OUT]

Besides tok/s, each row has the routed-expert time per decode step (CPU experts: the part batching
shares) and, batched, the mean sequences per step.

Each stream feeds a short distinct prompt, then generates --tokens tokens (EOS ignored, greedy). The
aggregate rate is all generated tokens over the wall time from the first stream's start to the last
stream's end (prefill included, 16 tokens per stream); the ratio is against one stream.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import tidal


def run(rt, n: int, tokens: int) -> dict:
    prompts = [[(17 * i + 3 * k) % 997 + 10 for k in range(16)] for i in range(n)]
    done = []
    barrier = threading.Barrier(n + 1)

    def one(p):
        barrier.wait()
        r = rt.generate(p, max_new_tokens=tokens, temperature=0, ignore_eos=True)
        done.append(len(r.token_ids))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    rt.reset_stats()
    s0 = rt.scheduler_stats()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = rt.stats()
    raw = rt._engine.stats()
    s1 = rt.scheduler_stats()
    steps = s1["decode_steps"] - s0["decode_steps"] if s1 else st.decode_tokens
    rows = s1["decode_rows"] - s0["decode_rows"] if s1 else st.decode_tokens
    return {"streams": n, "tokens": sum(done), "seconds": wall, "tok_s": sum(done) / wall,
            "decode_steps": steps, "mean_batch": rows / steps if steps else 0.0,
            "expert_ms_per_step": 1e3 * st.time["cpu_experts"] / steps if steps else 0.0,
            "other_ms_per_step": 1e3 * (st.prefill_seconds + st.decode_seconds - st.time["cpu_experts"]) / steps
            if steps else 0.0,
            "wall_ms_per_step": 1e3 * wall / steps if steps else 0.0,
            # Routed-expert reads (distinct experts per MoE layer and step) against pairs computed
            # (prefill included): what one pass over an expert serves.
            "expert_reads": raw["expert_reads"], "expert_pairs": raw["expert_pairs"],
            "pairs_per_read": raw["expert_pairs"] / raw["expert_reads"] if raw["expert_reads"] else 0.0,
            "expert_seconds": st.time["cpu_experts"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default="unbatched,batched")
    ap.add_argument("--batch-wait", type=float, default=0.003)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    kw = {"device": a.device, "cpu_threads": a.cpu_threads, "progress": False}
    if a.gpu_memory:
        kw["gpu_memory"] = a.gpu_memory
    rt = tidal.Runtime.load(a.model, **kw)
    cfg = rt.config
    moe_layers = sum(1 for x in cfg.layer_is_moe if x) if hasattr(cfg, "layer_is_moe") else cfg.num_hidden_layers
    expert_read_bytes = rt._engine.stats()["expert_bytes"] / (moe_layers * cfg.num_experts)
    host_bw = tidal._tidal.measure_read_bandwidth(1 << 30, rt.num_threads, 3)
    print(f"host read bandwidth {host_bw / 1e9:.1f} GB/s; one expert (gate, up, down) {expert_read_bytes / 2**20:.2f} MiB")
    table = []
    for mode in a.modes.split(","):
        if mode == "batched":
            rt.enable_batching(max_batch=max(int(n) for n in a.streams.split(",")), max_requests=64,
                               batch_wait=a.batch_wait)
        elif mode != "unbatched":
            raise SystemExit(f"unknown mode {mode!r}")
        run(rt, 1, 8)  # warm-up (graphs, caches)
        rows = [run(rt, int(n), a.tokens) for n in a.streams.split(",")]
        base = rows[0]["tok_s"]
        print(f"\n{mode}:\n| streams | tokens | seconds | aggregate tok/s | ratio to 1 stream | mean batch "
              f"| expert ms / step | rest of forward ms / step | wall ms / step | tokens per expert read "
              f"| expert read GB/s (of host bw) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            r["mode"] = mode
            r["ratio"] = r["tok_s"] / base
            # Bytes the experts read over their time, against the measured host read bandwidth.
            r["expert_read_gb_s"] = r["expert_reads"] * expert_read_bytes / r["expert_seconds"] / 1e9 \
                if r["expert_seconds"] else 0.0
            r["expert_bw_fraction"] = r["expert_read_gb_s"] * 1e9 / host_bw
            print(f"| {r['streams']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | {r['ratio']:.2f} "
                  f"| {r['mean_batch']:.2f} | {r['expert_ms_per_step']:.2f} | {r['other_ms_per_step']:.2f} "
                  f"| {r['wall_ms_per_step']:.2f} | {r['pairs_per_read']:.2f} "
                  f"| {r['expert_read_gb_s']:.1f} ({100 * r['expert_bw_fraction']:.0f}%) |")
        table += rows
    rows = table
    if a.json:
        commit = os.environ.get("TIDAL_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "device": a.device, "host_read_bytes_per_s": host_bw,
                       "expert_read_bytes": expert_read_bytes, "gpu_memory": a.gpu_memory, "threads": rt.num_threads,
                       "describe": rt.describe(), "commit": commit, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
