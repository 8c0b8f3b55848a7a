# SPDX-License-Identifier: Apache-2.0
"""`python -m tidal.bench`: prompt processing (pp) and token generation (tg) speed, llama-bench style.

    python -m tidal.bench MODEL_DIR [-p 512,2048] [-n 128] [-d 0] [-r 3] [--cpu-threads N] [--json OUT]
    python -m tidal.bench --preset tiny ...        # synthesise the preset into a temporary directory

ppN: a fresh sequence prefills N tokens. tgN@dD: after an untimed prefill of D tokens, N greedy decode
steps (forward + sampling). Each test runs once as a warm-up, which is not counted, and then `-r`
times. Results give the median and the spread (min, max).

Every run also measures the host read bandwidth (all threads). It prints the physical bound for tg:
the bytes that must be read from RAM per generated token on this placement, and the tok/s that the
bandwidth allows. So a result reads as a fraction of its limit. On device="cpu", every byte of active
weights comes from RAM (there is no PCIe traffic). A prompt whose routed experts were streamed to the
GPU (by default from a prompt length measured at load; TIDAL_CUDA_PREFILL_STREAM) is bounded by the
streamed bytes at the pinned host-to-device bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

__all__ = ["run_bench", "bytes_per_token", "system_info", "main"]


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"values must be >= 0, got {text!r}")
    return vals


def _is_checkout(root: pathlib.Path) -> bool:
    """Whether `root` is a tidal source tree (python/tidal inside it, as in the repository)."""
    return (root / "pyproject.toml").is_file() and (root / "kernels").is_dir() and (root / "python" / "tidal").is_dir()


def system_info() -> dict[str, Any]:
    """tidal version and commit, CPU model and cores, GPU and driver (when nvidia-smi answers)."""
    from . import __version__

    info: dict[str, Any] = {"tidal_version": __version__, "commit": None, "python": platform.python_version(),
                            "cpu": platform.processor() or None, "logical_cpus": os.cpu_count(),
                            "physical_cores": None, "gpu": None,
                            "driver": None}
    try:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and info["cpu"] in (None, platform.processor() or None):
                    info["cpu"] = value
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and (phys or core):
                    cores.add((phys, core))
                    phys = core = ""
        if phys or core:
            cores.add((phys, core))
        info["physical_cores"] = len(cores) or None
    except OSError:
        pass
    here = pathlib.Path(__file__).resolve().parent
    if os.environ.get("TIDAL_COMMIT"):  # set by the device scripts: a copied tree's git metadata may lag
        info["commit"] = os.environ["TIDAL_COMMIT"]
    elif _is_checkout(here.parent.parent):
        # Only a tidal checkout's own commit: an installed package sits in site-packages, which may
        # lie inside some other repository (a pyenv tree), whose commit would be reported instead.
        try:
            info["commit"] = subprocess.run(["git", "-C", str(here.parent.parent), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        if out:
            info["gpu"], info["driver"] = [x.strip() for x in out[0].split(",", 1)]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def bytes_per_token(summary: Any, depth: int, expert_bytes: int | None = None, *, kv_elem_bytes: int = 4,
                    dense_scale: float = 1.0) -> dict[str, int]:
    """Bytes a decode step at context `depth` must read: every weight except the embedding table (one
    row) and the routed experts (k of E per MoE layer, `expert_bytes` each as packed in RAM; default:
    as in the checkpoint), plus the KV cache (`kv_elem_bytes` per value: 4 on the CPU, 2 for the GPU's
    BF16 cache) and the DeltaNet states (read and written). `dense_scale`: bytes of the dense weights
    as stored relative to the checkpoint (0.5 for INT8 GPU weights). On device="cpu" all of it comes
    from RAM; on device="cuda" the routed experts come from RAM and the rest from VRAM."""
    c = summary.config
    n_moe = sum(c.layer_is_moe)
    dense = int(dense_scale * (summary.pinned_bytes - summary.part_bytes["embeddings"])) + c.hidden_size * 2
    experts = n_moe * c.num_experts_per_tok * (summary.expert_bytes if expert_bytes is None else expert_bytes)
    kv = summary.kv_bytes_per_token(kv_elem_bytes) * depth
    state = 2 * summary.deltanet_state_bytes()
    return {"dense_weights": dense, "routed_experts": experts, "kv_cache": kv, "deltanet_state": state,
            "total": dense + experts + kv + state}


def decode_bound(need: dict[str, int], host_read: float, gpu_read: float | None,
                 pcie: float | None = None) -> float:
    """tok/s allowed by memory bandwidth: on the CPU every byte at `host_read`; with a GPU the routed
    experts at `host_read`, the rest at `gpu_read` and `need["pcie"]` bytes at the pinned copy
    bandwidth `pcie`, one after the other (no overlap assumed: the next layer's experts need this
    layer's output)."""
    if gpu_read is None:
        return host_read / need["total"]
    gpu_bytes = need["total"] - need["routed_experts"]
    t = need["routed_experts"] / host_read + gpu_bytes / gpu_read
    if pcie and need.get("pcie"):
        t += need["pcie"] / pcie
    return 1.0 / t


def _time_pp(rt: Any, n: int, rng: np.random.Generator) -> float:
    ids = rng.integers(0, rt.config.vocab_size, n).tolist()
    seq = rt.new_sequence()
    t0 = time.perf_counter()
    seq.forward(ids, all_logits=False)
    return time.perf_counter() - t0


def _time_tg(rt: Any, n: int, depth: int, rng: np.random.Generator) -> float:
    from . import _tidal

    seq = rt.new_sequence()
    prompt = rng.integers(0, rt.config.vocab_size, max(1, depth)).tolist()
    sampler = _tidal.Sampler(temperature=0.0)
    tok = seq.step(prompt, sampler)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = seq.step([tok], sampler)
    return time.perf_counter() - t0


def _gpu_step_seconds(rt: Any, depth: int, rng: np.random.Generator, steps: int = 16) -> float:
    """GPU time of one decode step at `depth` tokens of context, measured in this process: the
    GPU track of rt.trace() (CUDA events around each GPU segment of a forward call, Note [Step
    trace]) summed per decode step, median over `steps` steps after two untimed ones. The segments
    hold everything the GPU does in a step (dense layers, routers, shared experts, experts served
    from the VRAM cache, the activations' copies over PCIe); the CPU experts run between them."""
    from . import _tidal

    seq = rt.new_sequence()
    sampler = _tidal.Sampler(temperature=0.0)
    tok = seq.step(rng.integers(0, rt.config.vocab_size, max(1, depth)).tolist(), sampler)
    for _ in range(2):
        tok = seq.step([tok], sampler)
    with rt.trace() as tr:
        for _ in range(steps):
            tok = seq.step([tok], sampler)
    segs = tr.spans("gpu", "gpu_segment")
    per_step = [sum(e["dur"] for e in segs if f["ts"] <= e["ts"] <= f["ts"] + f["dur"]) for f in tr.spans("step")]
    per_step = [t for t in per_step if t > 0]
    if not per_step:
        raise RuntimeError("tidal.bench: the step trace recorded no GPU segment")
    return statistics.median(per_step) * 1e-6


def step_bound(need: dict[str, int], host_read: float, gpu_step_s: float) -> float:
    """tok/s allowed by the routed-expert bytes that must come from host RAM (at `host_read`) plus
    the GPU step time measured in the same run (issue 7's bound: what a step costs if the CPU
    experts ran at the bandwidth limit and nothing overlapped)."""
    return 1.0 / (need["routed_experts"] / host_read + gpu_step_s)


def _trace_steps(rt: Any, path: str | os.PathLike, seed: int) -> dict[str, Any]:
    """rt.trace() of a 32-token prompt and 8 decode steps; medians per decode step by category."""
    import statistics

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rt.config.vocab_size, 40).tolist()
    seq = rt.new_sequence()
    with rt.trace(path) as tr:
        seq.forward(ids[:32], all_logits=False)
        for t in ids[32:]:
            seq.forward([t], all_logits=False)
    steps = tr.spans("step")[1:]
    per_step: dict[str, list[float]] = {}
    for f in steps:
        t0, t1 = f["ts"], f["ts"] + f["dur"]
        sums: dict[str, float] = {}
        for e in tr.spans():
            # Host spans (tid 3 and up) lie inside their forward call; the GPU and copy tracks
            # (tid 1, 2) start there (within the launch queue's delay) and may end after it.
            inside = (t0 <= e["ts"] and e["ts"] + e["dur"] <= t1 + 1e-3) if e["tid"] > 2 else t0 <= e["ts"] <= t1
            if e["cat"] != "step" and inside:
                key = e["cat"] + ("_gpu_track" if e["tid"] == 1 else "")
                sums[key] = sums.get(key, 0.0) + e["dur"]
        for k, v in sums.items():
            per_step.setdefault(k + "_us", []).append(v)
    out = {"path": os.fspath(path), "decode_steps": len(steps),
           "decode_step_us": statistics.median(f["dur"] for f in steps) if steps else None}
    out.update({k: statistics.median(v) for k, v in sorted(per_step.items())})
    return out


def run_bench(model: str | os.PathLike, *, pp: list[int], tg: list[int], depths: list[int], repetitions: int = 3,
              cpu_threads: int = 0, device: str = "cpu", bandwidth_bytes: int = 1 << 30, seed: int = 0,
              routing: np.ndarray | None = None, routing_info: dict[str, Any] | None = None,
              expert_dtype: str = "auto", gpu_memory: str | int | None = None, gpu_weights: str = "bf16",
              gpu_precision: str | None = None, expert_group_size: int = 0,
              trace_path: str | os.PathLike | None = None, gpu_expert_slots: int | None = None,
              gpu_expert_policy: str = "lfu", router_lookahead: int | None = None) -> dict[str, Any]:
    """Run the tests and return the JSON-ready report. `routing`: a trace (tokens, layers, top_k) the
    MoE layers follow instead of their routers (see tidal.routing). `expert_dtype`, `gpu_memory`,
    `gpu_weights`, `gpu_precision`: as Runtime.load (the gpu_* ones with device="cuda" only).
    `trace_path`: after the tests, record a 32-token prompt and 8 decode steps with rt.trace() into
    this Chrome trace file and summarise the decode steps in the report ("trace").
    `router_lookahead`: turn the router lookahead on (rt.set_router_lookahead) with this many
    predicted experts per layer (0: top_k) and report each tg test's prediction precision and
    recall ("prediction"). Under a routing trace the router is overridden, so nothing is predicted."""
    from . import Runtime, _tidal, inspect

    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    on_gpu = device.startswith("cuda")
    gpu_kw: dict[str, Any] = {}
    if on_gpu:
        gpu_kw = {"gpu_memory": gpu_memory, "gpu_weights": gpu_weights, "gpu_expert_slots": gpu_expert_slots,
                  "gpu_expert_policy": gpu_expert_policy}
        if gpu_precision is not None:
            gpu_kw["gpu_precision"] = gpu_precision
    elif gpu_memory is not None or gpu_weights != "bf16" or gpu_precision is not None or gpu_expert_slots not in (None, 0):
        raise ValueError("--gpu-memory, --gpu-weights, --gpu-precision and --gpu-expert-slots need --device cuda")
    rt = Runtime.load(model, device=device, num_threads=cpu_threads, progress=False, expert_dtype=expert_dtype,
                      expert_group_size=expert_group_size, **gpu_kw)
    load = _load_report(rt)
    summary = inspect(model)
    c0 = rt.config
    n_experts_total = max(1, sum(c0.layer_is_moe) * c0.num_experts)
    packed_expert_bytes = rt._engine.stats()["expert_bytes"] // n_experts_total
    ctx = rt.config.max_position_embeddings
    for n in pp:
        if not 1 <= n < ctx:
            raise ValueError(f"pp{n}: prompt length must be in [1, {ctx}) for this model")
    for n in tg:
        for d in depths:
            if n < 1 or d + n + 1 >= ctx:
                raise ValueError(f"tg{n}@d{d}: must have 1 <= n and depth + n < {ctx}")
    if routing is not None:
        rt._engine.set_routing_replay(np.asarray(routing))
    if router_lookahead is not None:
        if isinstance(router_lookahead, bool) or not isinstance(router_lookahead, int) or router_lookahead < 0:
            raise ValueError(f"router_lookahead must be an int >= 0 (0: top_k), got {router_lookahead!r}")
        rt.set_router_lookahead(True, router_lookahead or None)
    # Host read bandwidth, measured before and again after the tests (the larger counts): a single
    # reading can be pulled down by other activity, e.g. the kernel writing back a checkpoint that
    # was just written, which would make the bound too low and a result look better than it is.
    bw_before = _tidal.measure_read_bandwidth(bandwidth_bytes, rt.num_threads, 3)
    bw = bw_before
    gpu_bw: dict[str, float] = {}
    memory: dict[str, int] | None = None
    dense_scale = 1.0
    kv_elem_bytes = 4
    if on_gpu:
        kv_elem_bytes = 4 if rt.describe().get("kv_cache_dtype") == "fp32" else 2
        gpu_bw = _tidal.measure_gpu_bandwidth(int(device.split(":")[1]) if ":" in device else 0)
        memory = {k: int(v) for k, v in rt.memory_report().items()}
        if memory.get("weights_bf16_equivalent"):
            dense_scale = memory["weights"] / memory["weights_bf16_equivalent"]
    rng = np.random.default_rng(seed)
    results = []

    def measure(name: str, tokens: int, fn: Any, **extra: Any) -> None:
        fn()  # warm-up, not counted
        times = [fn() for _ in range(repetitions)]
        rates = sorted(tokens / t for t in times)
        results.append({"test": name, "tokens": tokens, **extra, "tok_s_median": statistics.median(rates),
                        "tok_s_min": rates[0], "tok_s_max": rates[-1], "seconds": times})

    for n in pp:
        before = rt._engine.stats() if on_gpu else None
        measure(f"pp{n}", n, lambda n=n: _time_pp(rt, n, rng))
        if before is not None:
            after = rt._engine.stats()
            streamed = after.get("gpu_streamed_bytes", 0) - before.get("gpu_streamed_bytes", 0)
            if streamed > 0:
                # Prefill expert streaming (Note [Prefill expert streaming]): each chunk copies
                # every MoE layer's experts over PCIe, so the prompt can go no faster than those
                # bytes at the measured pinned host-to-device bandwidth (warm-up run included).
                runs = repetitions + 1
                r = results[-1]
                r["streamed"] = {"bytes_per_run": streamed / runs,
                                 "layers_per_run": (after["gpu_streamed_layers"] - before["gpu_streamed_layers"]) / runs}
                r["pcie_bytes"] = streamed / runs
    for d in depths:
        for n in tg:
            need = bytes_per_token(summary, d + n // 2, packed_expert_bytes,
                                   kv_elem_bytes=kv_elem_bytes,
                                   dense_scale=dense_scale)
            if on_gpu:
                # Crossing PCIe per token on this placement (routed experts computed where they
                # live): each MoE layer's input rows to the host and its expert output back (fp32),
                # plus the routing (ids and weights). No weights move.
                c = rt.config
                need["pcie"] = sum(c.layer_is_moe) * (2 * c.hidden_size * 4 + c.num_experts_per_tok * 8)
            before = rt._engine.stats() if on_gpu or router_lookahead is not None else None
            measure(f"tg{n}@d{d}", n, lambda n=n, d=d: _time_tg(rt, n, d, rng), depth=d, bytes_per_token=need)
            r = results[-1]
            if router_lookahead is not None:
                r["prediction"] = _prediction_delta(before, rt._engine.stats())
            if before is not None and before.get("gpu_expert_slots"):
                # The VRAM expert cache (Note [VRAM expert cache]): the routed experts it computed
                # were read from VRAM, not host RAM, and its copies crossed PCIe. The bound takes
                # the hit rate and copies measured over the timed steps (warm-up included).
                after = rt._engine.stats()
                gpu = after["gpu_expert_pairs"] - before["gpu_expert_pairs"]
                tokens = (repetitions + 1) * n
                c = rt.config
                prompt_pairs = (repetitions + 1) * (d if d > 1 else 0) * c.num_experts_per_tok * sum(c.layer_is_moe)
                host = after["host_expert_pairs"] - before["host_expert_pairs"] - prompt_pairs  # decode only
                hit = gpu / (gpu + host) if gpu + host else 0.0
                need["routed_experts_in_vram"] = int(need["routed_experts"] * hit)
                # The copies read host RAM (beside the CPU experts) and cross PCIe on their own
                # stream, beside the step: they count as host bytes, not as serial PCIe time.
                copies = int((after["gpu_expert_bytes_in"] - before["gpu_expert_bytes_in"]) / tokens)
                need["routed_experts"] += copies - need["routed_experts_in_vram"]
                need["expert_copies"] = copies
                r["expert_cache"] = {"slots": after["gpu_expert_slots"], "policy": after["gpu_expert_policy"],
                                     "hit_rate": hit,
                                     "fills_per_token": (after["gpu_expert_fills"] - before["gpu_expert_fills"]) / tokens}
                if after.get("gpu_expert_prefetch_slots"):
                    # Note [Lookahead prefetch]: copies per token, and the share of them then routed.
                    pf = after["gpu_expert_prefetched"] - before["gpu_expert_prefetched"]
                    pf_hits = after["gpu_expert_prefetch_hits"] - before["gpu_expert_prefetch_hits"]
                    # Recall: the decode pairs served by a prefetched expert, over the decode
                    # pairs that missed the cache's own slots (what prefetch could have served).
                    r["expert_cache"].update({"prefetch_slots": after["gpu_expert_prefetch_slots"],
                                              "prefetched_per_token": pf / tokens,
                                              "prefetch_precision": pf_hits / pf if pf else None,
                                              "prefetch_recall": pf_hits / (host + pf_hits) if host + pf_hits else None})
            r["bound_tok_s"] = decode_bound(need, bw, gpu_bw.get("hbm_read_bytes_per_s"),
                                            gpu_bw.get("pinned_h2d_bytes_per_s"))
            r["fraction_of_bound"] = r["tok_s_median"] / r["bound_tok_s"]
            if on_gpu and routing is None and router_lookahead is None:
                # (Routing control, replay or the lookahead's measurement, runs steps without graphs:
                # their GPU track would count launch gaps.)
                r["gpu_step_ms"] = 1e3 * _gpu_step_seconds(rt, d + n // 2, rng)
    bw_after = _tidal.measure_read_bandwidth(bandwidth_bytes, rt.num_threads, 3)
    if on_gpu:  # the GPU figures, too, are the larger of two readings
        again = _tidal.measure_gpu_bandwidth(int(device.split(":")[1]) if ":" in device else 0)
        changed = any(again[k] > gpu_bw[k] for k in again)
        gpu_bw = {k: max(v, again[k]) for k, v in gpu_bw.items()}
    else:
        changed = False
    if bw_after > bw or changed:
        bw = max(bw, bw_after)
        for r in results:
            if "bytes_per_token" in r:
                r["bound_tok_s"] = decode_bound(r["bytes_per_token"], bw, gpu_bw.get("hbm_read_bytes_per_s"),
                                                gpu_bw.get("pinned_h2d_bytes_per_s"))
                r["fraction_of_bound"] = r["tok_s_median"] / r["bound_tok_s"]
    for r in results:
        if "gpu_step_ms" in r:
            r["step_bound_tok_s"] = step_bound(r["bytes_per_token"], bw, 1e-3 * r["gpu_step_ms"])
            r["fraction_of_step_bound"] = r["tok_s_median"] / r["step_bound_tok_s"]
    h2d = gpu_bw.get("pinned_h2d_bytes_per_s")
    for r in results:
        if r.get("pcie_bytes") and h2d:
            r["bound_tok_s"] = r["tokens"] / (r["pcie_bytes"] / h2d)
            r["fraction_of_bound"] = r["tok_s_median"] / r["bound_tok_s"]
    for r in results:
        if r.get("fraction_of_bound", 0) > 1.0:
            # Faster than the memory bound: the bandwidth reading was too low (other activity), or
            # bytes were served from caches. The result stays, marked; the bound is not trusted.
            r["above_bound"] = True
            print(f"python -m tidal.bench: warning: {r['test']} runs at {100 * r['fraction_of_bound']:.0f}% of "
                  "its memory bound; the bandwidth measurement was probably disturbed", file=sys.stderr)
    trace_summary = None
    if trace_path is not None:
        trace_summary = _trace_steps(rt, trace_path, seed)
    st = rt.stats()
    c = rt.config
    active = summary.pinned_bytes - summary.part_bytes["embeddings"] + sum(c.layer_is_moe) * c.num_experts_per_tok * packed_expert_bytes
    d = rt.describe()
    return {
        "system": system_info(),
        "model": {"path": str(model), "model_type": c.model_type, "layers": c.num_hidden_layers,
                  "layer_types": c.layer_types, "hidden_size": c.hidden_size, "num_experts": c.num_experts,
                  "moe_intermediate_size": c.moe_intermediate_size, "moe_layers": sum(c.layer_is_moe),
                  "num_experts_per_tok": c.num_experts_per_tok, "weight_bytes": summary.total_bytes,
                  "active_weight_bytes_per_token": active, "dtypes": summary.dtypes},
        "load": load,
        "caps": {"device": device, "cpu_threads": rt.num_threads, "cpu_executor": d.get("cpu_executor"),
                 "cpu_pinned": d.get("cpu_pinned"), "cpu_numa_nodes": d.get("cpu_numa_nodes"), "gpu_memory": gpu_memory if on_gpu else None,
                 "gpu_weights": gpu_weights if on_gpu else None,
                 "gpu_precision": (gpu_precision or d.get("gpu_precision")) if on_gpu else None,
                 "expert_dtype": d["expert_dtype"], "expert_group_size": int(d["expert_group_size"]),
                 "cpu_isa": d["cpu_isa"], "expert_kernels": d["expert_kernels"],
                 "prefill_stream": d.get("prefill_stream") if on_gpu else None},
        "bounds": {"host_read_bytes_per_s": bw, "host_read_before_after": [bw_before, bw_after],
                   "pinned_h2d_bytes_per_s": gpu_bw.get("pinned_h2d_bytes_per_s"),
                   "gpu_read_bytes_per_s": gpu_bw.get("hbm_read_bytes_per_s")},
        "gpu_memory": memory,
        "results": results,
        # Since load: prefill pairs (computed on the host or streamed, never from the cache) count
        # too, so this is lower than the per-test expert_cache.hit_rate, which counts decode pairs.
        "cache": {"expert_cache_hit_rate": st.expert_cache_hit_rate, "prediction_precision": st.prediction_precision,
                  "prediction_recall": st.prediction_recall, "scope": "since load, prefill pairs included"},
        "routing": routing_info or {"mode": "router" if routing is None else "trace"},
        "trace": trace_summary,
    }


def _prediction_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Router lookahead precision and recall over one test (its prompts included): ids predicted
    for the next MoE layer that it then routed, over those predicted and over those routed."""
    pred = sum(after["lookahead_predicted"]) - sum(before["lookahead_predicted"])
    routed = sum(after["lookahead_routed"]) - sum(before["lookahead_routed"])
    hits = sum(after["lookahead_hits"]) - sum(before["lookahead_hits"])
    return {"predicted": pred, "routed": routed, "hits": hits,
            "precision": hits / pred if pred else None, "recall": hits / routed if routed else None}


def format_table(report: dict[str, Any]) -> str:
    s, m = report["system"], report["model"]
    bw = report["bounds"]["host_read_bytes_per_s"]
    lines = [f"tidal {s['tidal_version']} ({s['commit'] or 'no git'}) | {s['cpu']} | {report['caps']['cpu_threads']} threads"
             f" | device {report['caps']['device']} | GPU {s['gpu'] or '-'}",
             f"model {m['model_type']} x{m['layers']} layers ({m['weight_bytes'] / 2**30:.2f} GiB, "
             f"{m['active_weight_bytes_per_token'] / 2**20:.1f} MiB active per token) | host read {bw / 1e9:.1f} GB/s"
             + (f" | GPU read {report['bounds']['gpu_read_bytes_per_s'] / 1e9:.0f} GB/s | pinned H2D "
                f"{report['bounds']['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s"
                if report["bounds"].get("gpu_read_bytes_per_s") else ""),
             *([f"prefill expert streaming: {report['caps']['prefill_stream']}"]
               if report["caps"].get("prefill_stream") else []),
             "",
             f"| {'test':<14} | {'tok/s (median)':>14} | {'min':>9} | {'max':>9} | {'bound tok/s':>11} | {'of bound':>8} |",
             f"|{'-' * 16}|{'-' * 16}:|{'-' * 10}:|{'-' * 10}:|{'-' * 12}:|{'-' * 9}:|"]
    for r in report["results"]:
        bound = f"{r['bound_tok_s']:.1f}" if "bound_tok_s" in r else "-"
        frac = f"{100 * r['fraction_of_bound']:.0f}%" if "fraction_of_bound" in r else "-"
        if r.get("above_bound"):
            frac += "!"
        lines.append(f"| {r['test']:<14} | {r['tok_s_median']:>14.1f} | {r['tok_s_min']:>9.1f} | {r['tok_s_max']:>9.1f} "
                     f"| {bound:>11} | {frac:>8} |")
    lines.append("")
    for r in report["results"]:
        if "step_bound_tok_s" in r:
            lines.append(f"{r['test']}: {100 * r['fraction_of_step_bound']:.0f}% of {r['step_bound_tok_s']:.1f} tok/s, "
                         f"the bound from the host expert bytes plus the GPU step time measured here "
                         f"({r['gpu_step_ms']:.3f} ms; it assumes the CPU and GPU parts never overlap, so an "
                         f"overlapping step can beat it)")
    for r in report["results"]:
        p = r.get("prediction")
        if p is not None:
            pr = "n/a" if p["precision"] is None else f"{100 * p['precision']:.1f}%"
            rc = "n/a" if p["recall"] is None else f"{100 * p['recall']:.1f}%"
            lines.append(f"{r['test']}: router lookahead precision {pr}, recall {rc} ({p['predicted']} ids predicted)")
    if report["bounds"].get("gpu_read_bytes_per_s"):
        pcie = next((r["bytes_per_token"].get("pcie") for r in report["results"] if "bytes_per_token" in r), None)
        lines.append("bound: routed-expert bytes per token at the host read bandwidth plus the GPU-resident bytes "
                     "(dense weights, KV cache, DeltaNet state) at the GPU read bandwidth"
                     + (f" plus {pcie / 1024:.0f} KiB of activations over PCIe (no weights cross it on this placement)"
                        if pcie else "")
                     + ("; pp with streamed experts: their bytes over PCIe at the pinned H2D bandwidth"
                        if any(r.get("pcie_bytes") for r in report["results"]) else "; pp has no memory bound here"))
    else:
        lines.append("bound: host read bandwidth / bytes read per generated token (active weights, KV cache, DeltaNet "
                     "state); pp is compute-bound and has no memory bound here")
    return "\n".join(lines)


def _load_report(rt: Any) -> dict[str, Any]:
    """Load time and memory right after Runtime.load: peak and current resident set (anonymous =
    packed experts and converted tensors; file = memory-mapped weights), from /proc where it exists."""
    import resource

    st = rt._engine.stats()
    out: dict[str, Any] = {"seconds": st["load_seconds"], "weight_bytes": st["weight_bytes"],
                           "expert_bytes": st["expert_bytes"], "expert_source": rt.describe().get("expert_source"),
                           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key.lower() + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tidal.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="checkpoint directory or .gguf file")
    ap.add_argument("--preset", help="synthesise this tidal.synth preset into a temporary directory instead")
    ap.add_argument("--layers", type=int, default=None, help="with --preset: number of layers")
    ap.add_argument("-p", "--n-prompt", type=_ints, default=[512], help="prompt lengths (comma-separated)")
    ap.add_argument("-n", "--n-gen", type=_ints, default=[128], help="generated tokens (comma-separated)")
    ap.add_argument("-d", "--depth", type=_ints, default=[0], help="context depths for tg (comma-separated)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=0, help="0: one per physical core (one fewer with a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", default=None, help="VRAM cap, e.g. 12GiB (--device cuda)")
    ap.add_argument("--gpu-weights", default="bf16", choices=["bf16", "int8"],
                    help="format of the GPU-resident matrices (--device cuda)")
    ap.add_argument("--gpu-precision", default=None, choices=["bf16x2", "bf16", "fp32"],
                    help="prefill matrix products on the GPU (default: Runtime.load's)")
    ap.add_argument("--gpu-expert-slots", default="auto",
                    help="VRAM expert cache slots (--device cuda): 'auto' (the default, as Runtime.load's "
                         "gpu_expert_slots=None: what --gpu-memory leaves), or a number (0: no cache); with "
                         "--routing-* the cache sees the replayed experts")
    ap.add_argument("--gpu-expert-policy", default="lfu", choices=["lfu", "lru", "static"])
    ap.add_argument("--expert-dtype", default="auto", choices=["auto", "bf16", "int8", "int4"],
                    help="routed-expert format in RAM (Runtime.load's expert_dtype)")
    ap.add_argument("--expert-group-size", type=int, default=0, help="INT8/INT4 group (0: Runtime.load's choice)")
    ap.add_argument("--routing-trace", default=None, help="replay this routing trace (.npz, tidal.routing format)")
    ap.add_argument("--routing-skew", type=float, default=None,
                    help="replay a synthetic trace: Zipf exponent of expert popularity (0: uniform)")
    ap.add_argument("--routing-reuse", type=float, default=0.5,
                    help="synthetic trace: probability that an expert repeats from the previous token")
    ap.add_argument("--router-lookahead", type=int, default=None, metavar="K",
                    help="turn the router lookahead on, predicting K experts per layer (0: top_k), and report "
                         "each tg test's prediction precision and recall")
    ap.add_argument("--json", default=None, help="also write the report as JSON to this path ('-' for stdout)")
    ap.add_argument("--trace", default=None,
                    help="after the tests, write a Chrome trace of a prompt and 8 decode steps to this path")
    a = ap.parse_args(argv)
    if (a.model is None) == (a.preset is None):
        ap.error("give a checkpoint directory or --preset (one of them)")
    if a.layers is not None and a.preset is None:
        ap.error("--layers applies to --preset (a checkpoint directory has its own layer count)")
    tmp = None
    try:
        model = a.model
        if a.preset:
            from .synth import preset_config, write_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="tidal-bench-")
            model = str(write_checkpoint(preset_config(a.preset, a.layers), tmp.name, progress=False))
        trace, info = None, None
        if a.routing_trace and a.routing_skew is not None:
            raise ValueError("give --routing-trace or --routing-skew, not both")
        if a.routing_trace:
            from .routing import load_trace

            trace = load_trace(a.routing_trace)["experts"]
            info = {"mode": "trace", "file": a.routing_trace, "tokens": int(trace.shape[0])}
        elif a.routing_skew is not None:
            from . import _tidal
            from .routing import synthetic_trace

            cfg, _ = _tidal.inspect_checkpoint(model)
            trace = synthetic_trace(4096, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok,
                                    skew=a.routing_skew, reuse=a.routing_reuse)
            info = {"mode": "synthetic", "skew": a.routing_skew, "reuse": a.routing_reuse, "tokens": 4096}
        report = run_bench(model, pp=a.n_prompt, tg=a.n_gen, depths=a.depth, repetitions=a.repetitions,
                           cpu_threads=a.cpu_threads, device=a.device, routing=trace, routing_info=info,
                           expert_dtype=a.expert_dtype, gpu_memory=a.gpu_memory, gpu_weights=a.gpu_weights,
                           gpu_precision=a.gpu_precision, expert_group_size=a.expert_group_size,
                           trace_path=a.trace,
                           gpu_expert_slots=None if a.gpu_expert_slots in (None, "auto") else int(a.gpu_expert_slots),
                           gpu_expert_policy=a.gpu_expert_policy, router_lookahead=a.router_lookahead)
        if a.preset:
            report["model"]["preset"] = a.preset
    except (ValueError, FileNotFoundError, NotImplementedError, OSError, MemoryError) as exc:
        print(f"python -m tidal.bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    if a.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
