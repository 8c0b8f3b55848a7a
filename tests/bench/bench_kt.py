# SPDX-License-Identifier: Apache-2.0
"""Peer benchmark (not a test): KTransformers' CPU MoE kernels (kt-kernel, AMX/AVX-512) on the expert
shapes of tidal_bench_experts. JSON lines on stdout.

Timing: `--batch 1` times submit + sync per call, the way KTransformers' own bench scripts drive the
kernels. On the GPU test machine every such call took a multiple of 8 ms: the worker pool's sleep/wake
granularity, not the kernel. `--batch B` submits B calls (rotating layers and routings) and syncs
once: the workers stay awake and the time per call is the kernel's own (the Python submission of a
call costs a few µs and overlaps the previous call's work).

Usage: python bench_kt.py KT_EXT_SO [--threads 16] [--m 1,16,128,512,2048] [--dtypes int4,int8,bf16]
KT_EXT_SO is kt_kernel_ext*.so from an unpacked kt-kernel wheel (loaded directly: the package's
__init__ imports more than the kernels need). Needs torch for the weight tensors.
"""

import argparse
import importlib.util
import json
import sys
import time

import torch

SHAPES = {"35b": ("qwen3.6-35b-a3b", 2048, 512, 256, 8), "80b": ("qwen3-next-80b-a3b", 2048, 512, 512, 10)}
BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


def load_ext(path):
    spec = importlib.util.spec_from_file_location("kt_kernel_ext", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ext")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--m", default="1,16,128,512,2048")
    ap.add_argument("--dtypes", default="int4,int8,bf16")
    ap.add_argument("--shape", default="35b")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1, help="calls submitted per sync (1: submit + sync per call)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pool", choices=["config", "int"], default="config",
                    help="CPUInfer from a WorkerPoolConfig (one NUMA subpool) or from a thread count")
    a = ap.parse_args()
    def log(msg):
        print(f"bench_kt: {msg}", file=sys.stderr, flush=True)

    ext = load_ext(a.ext)
    log("extension loaded")
    cls = {"bf16": ext.moe.AMXBF16_MOE, "int8": ext.moe.AMXInt8_MOE, "int4": ext.moe.AMXInt4_MOE}
    if a.pool == "config":
        wc = ext.WorkerPoolConfig()
        wc.subpool_count, wc.subpool_numa_map, wc.subpool_thread_count = 1, [0], [a.threads]
        cpu = ext.CPUInfer(wc)
    else:
        cpu = ext.CPUInfer(a.threads)
    log("CPUInfer created")
    name, H, I, E, K = SHAPES[a.shape]
    ms = [int(x) for x in a.m.split(",")]
    torch.manual_seed(0)
    for dt in a.dtypes.split(","):
        layers, keep = [], []
        for _ in range(a.layers):
            g = (torch.randn(E, I, H) * 0.02).bfloat16().contiguous()
            u = (torch.randn(E, I, H) * 0.02).bfloat16().contiguous()
            d = (torch.randn(E, H, I) * 0.02).bfloat16().contiguous()
            cfg = ext.moe.MOEConfig(E, K, H, I)
            cfg.max_len = max(ms)
            cfg.pool = cpu.backend_
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = g.data_ptr(), u.data_ptr(), d.data_ptr()
            log(f"{dt}: MOEConfig set, constructing")
            moe = cls[dt](cfg)
            p2l = torch.arange(E, dtype=torch.int64)
            log(f"{dt}: loading weights")
            cpu.submit(moe.load_weights_task(p2l.data_ptr()))
            cpu.sync()
            log(f"{dt}: weights loaded")
            layers.append(moe)
            keep.append((g, u, d, p2l))
        keep.clear()  # weights are repacked inside kt-kernel
        for m in ms:
            n = 16
            ids = torch.stack([torch.rand(m, E).topk(K, -1).indices for _ in range(n)]).reshape(n, m * K)
            ids = ids.to(torch.int64).contiguous()
            w = torch.full((n, m * K), 1.0 / K, dtype=torch.float32)
            x = torch.randn(len(layers), m, H).bfloat16().contiguous()
            y = torch.empty_like(x)
            qlen = torch.tensor([m], dtype=torch.int32)

            def step(i):
                for j in range(i, i + a.batch):
                    li, r = j % len(layers), j % n
                    cpu.submit(layers[li].forward_task(qlen.data_ptr(), K, ids[r].data_ptr(), w[r].data_ptr(),
                                                       x[li].data_ptr(), y[li].data_ptr(), False))
                cpu.sync()

            for i in range(3):
                step(i * a.batch)
            times, i, end = [], 3 * a.batch, time.perf_counter() + a.seconds
            while time.perf_counter() < end or len(times) < 5:
                t0 = time.perf_counter()
                step(i)
                times.append((time.perf_counter() - t0) / a.batch)
                i += a.batch
            times.sort()
            t = times[len(times) // 2]
            uniq = sum(int(ids[r].unique().numel()) for r in range(n)) / n
            flops = 2.0 * m * K * 3 * H * I
            print(json.dumps({"bench": "kt_kernel_moe", "shape": name, "dtype": dt, "m": m, "threads": a.threads,
                              "median_us": t * 1e6, "min_us": times[0] * 1e6, "calls": len(times) * a.batch,
                              "batch": a.batch, "version": getattr(ext, "__version__", None),
                              "gbps_unique_weights": uniq * 3 * H * I * BYTES[dt] / t / 1e9,
                              "tflops": flops / t / 1e12, "layers": len(layers)}), flush=True)
        layers.clear()


if __name__ == "__main__":
    main()
