# SPDX-License-Identifier: Apache-2.0
"""What a checkpoint holds and where it goes: sizes per part of the model, and the placement plan for a
device and a GPU memory budget (`tidal info MODEL --gpu-memory 12G`).

Placement (docs/architecture.md): everything but the routed experts is pinned on the GPU (embeddings,
attention and DeltaNet layers, routers, shared experts, norms, lm_head) together with the KV cache and
DeltaNet states; routed experts live in host RAM and the VRAM left over becomes the expert cache. With
device="cpu" every part lives in RAM.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckpointSummary", "Plan", "inspect", "plan", "parse_bytes", "format_bytes"]

# Parts of the model, in display order.
PARTS = ("embeddings", "attention", "deltanet", "router", "shared_experts", "dense_mlp", "norms", "lm_head",
         "routed_experts", "unused")

# VRAM kept free for the CUDA context, cuBLAS workspace and activations of a prefill chunk (measured
# CUDA context + cuBLAS on an H100 is ~500 MiB; the rest is headroom for activations).
GPU_RESERVE_BYTES = 768 << 20
# The KV cache on the GPU is BF16.
KV_BYTES_PER_VALUE = 2
# Prefill expert streaming (docs/architecture.md, "Prefill expert streaming"): the chunk lengths
# the load tries, longest first, and the share of what the budget leaves for the expert cache it
# may take (Note [Measuring the stream threshold] in core/model/cuda_model.cpp); the GPU pass
# length without it (CudaOptions::max_chunk).
STREAM_CHUNKS = (8192, 4096, 2048, 1024)
STREAM_SHARE = 0.75
HOST_CHUNK = 512


def _part(name: str) -> str:
    if name.startswith(("mtp.", "model.mtp.", "visual.", "model.visual.")):
        return "unused"
    if ".mlp.experts." in name:  # per-expert and fused (experts.gate_up_proj / experts.down_proj)
        return "routed_experts"
    if "shared_expert" in name:
        return "shared_experts"
    if name.endswith(".mlp.gate.weight"):
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "linear_attn" in name:
        return "deltanet"
    if "self_attn" in name:
        return "norms" if re.search(r"\.(q|k)_norm\.", name) else "attention"
    if re.search(r"\.mlp\.(gate_proj|up_proj|down_proj)\.", name):
        return "dense_mlp"
    if "norm" in name:
        return "norms"
    return "unused"


def parse_bytes(text: str | int | float) -> int:
    """'12G', '12GiB', '8000M', '1.5T' or a number of bytes -> bytes (binary units: G = 2**30)."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"memory size must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}: use e.g. 12G, 11.5GiB or 8000M")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class CheckpointSummary:
    """Sizes of a checkpoint per model part, read from its config and safetensors headers only."""

    path: str
    config: Any
    part_bytes: dict[str, int]
    dtypes: dict[str, int]  # dtype -> bytes
    num_tensors: int
    expert_bytes: int  # one routed expert of one layer (gate + up + down)

    @property
    def total_bytes(self) -> int:
        return sum(self.part_bytes.values())

    @property
    def pinned_bytes(self) -> int:
        """Everything the model uses except routed experts."""
        return sum(v for k, v in self.part_bytes.items() if k not in ("routed_experts", "unused"))

    def kv_bytes_per_token(self, bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:
        c = self.config
        n_attn = sum(t == "full_attention" for t in c.layer_types)
        return n_attn * 2 * c.num_key_value_heads * c.head_dim * bytes_per_value

    def deltanet_state_bytes(self) -> int:
        """Conv + recurrent state of one sequence (fp32)."""
        c = self.config
        n_lin = sum(t == "linear_attention" for t in c.layer_types)
        channels = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
        rec = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
        return n_lin * 4 * (rec + (c.linear_conv_kernel_dim - 1) * channels)


def _activation_bytes_per_token(c: Any) -> int:
    """The GPU workspaces per token of a prefill chunk (CudaModel::Impl::plan_workspaces, fp32
    rows and a two-term BF16 copy of the widest GEMM input), approximately. For the 40-layer
    35B-A3B shape with INT4 experts, stream_vram_bytes(8192) comes to 4.04 GB; the load allocated
    4.03 GB (H100, docs/performance.md 2026-12-07, ninth session)."""
    H, E, k = c.hidden_size, max(1, c.num_experts), max(1, c.num_experts_per_tok)
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn_rows = 2 * nh * d + 2 * nkv * d  # gated q, k, v
    b = 4 * H * 4 + 4 + 2 * k * 4
    widest = max(attn_rows, E + 2 * (c.shared_expert_intermediate_size or 0) + 1,
                 2 * (c.intermediate_size or 0))
    kmax = max(H, nh * d, c.shared_expert_intermediate_size or 0, c.intermediate_size or 0)
    if any(t == "full_attention" for t in c.layer_types):
        b += 3 * nh * d * 4 + nh * (d + 2) * 4
    if any(t == "linear_attention" for t in c.layer_types):
        nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        conv = 2 * nk * dk + nv * dv
        widest = max(widest, conv + nv * dv + 2 * nv)
        b += (conv + 2 * nk * dk + 2 * nv * dv + 2 * nv) * 4  # u, q, k, v, beta, g, out
        if "next" in str(c.family).lower():  # de-interleaved projections
            b += (conv + nv * dv + 2 * nv) * 4
        kmax = max(kmax, nv * dv)
    b += widest * 4 + max(c.shared_expert_intermediate_size or 0, c.intermediate_size or 0) * 4 + 2 * kmax * 2
    return b


def stream_vram_bytes(summary: CheckpointSummary, tokens: int) -> int:
    """Approximate VRAM that prefill expert streaming takes for chunks of `tokens`: two MoE layers'
    routed experts, 16 experts' BF16 weights, the routed rows' activations, the lanes' cuBLAS
    workspaces, and the workspaces of chunks that long beyond the default 512-token ones."""
    c = summary.config
    H, I, k, E = c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok, c.num_experts
    fixed = 2 * E * summary.expert_bytes + 16 * 3 * H * I * 2 + 4 * (8 << 20)
    rows = tokens * k * (6 * H + 10 * I + 8)
    return fixed + rows + max(0, tokens - HOST_CHUNK) * _activation_bytes_per_token(c)


def inspect(path: str | os.PathLike) -> CheckpointSummary:
    """Summarise a checkpoint directory without reading its weights."""
    from . import _tidal

    cfg, tensors = _tidal.inspect_checkpoint(os.fspath(path))
    parts = {p: 0 for p in PARTS}
    dtypes: dict[str, int] = {}
    for t in tensors:
        parts[_part(t["name"])] += t["nbytes"]
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + t["nbytes"]
    packed = cfg.packed_experts
    if packed is not None:  # routed experts pre-packed in one file (tidal.synth --expert-dtype int4|int8)
        f = pathlib.Path(path) / packed["file"]
        size = max(0, f.stat().st_size - 4096) if f.exists() else 0
        parts["routed_experts"] += size
        key = f"{packed['dtype']} (pre-packed)"
        dtypes[key] = dtypes.get(key, 0) + size
    n_moe = sum(cfg.layer_is_moe) or 1
    expert = parts["routed_experts"] // max(1, n_moe * max(1, cfg.num_experts))
    return CheckpointSummary(os.fspath(path), cfg, parts, dtypes, len(tensors), expert)


@dataclass
class Plan:
    """Where each part goes for a device and budget. Sizes in bytes."""

    device: str
    summary: CheckpointSummary
    gpu_budget: int | None = None
    context_tokens: int = 0
    vram: dict[str, int] = field(default_factory=dict)
    ram: dict[str, int] = field(default_factory=dict)
    expert_cache_slots: int = 0
    stream_chunk: int = 0  # prefill expert streaming's chunk length (0: off)
    fits: bool = True
    problem: str = ""
    ram_available: int | None = None

    @property
    def vram_used(self) -> int:
        return sum(self.vram.values())

    @property
    def ram_used(self) -> int:
        return sum(self.ram.values())

    def lines(self) -> list[str]:
        s = self.summary
        out = []
        if self.device == "cpu":
            weights = sum(v for k, v in self.ram.items() if k in PARTS)
            out.append(f"placement (device=cpu): everything in host RAM: weights {format_bytes(weights)}, "
                       f"KV cache {format_bytes(self.ram.get('kv_cache (fp32)', 0))} for {self.context_tokens} tokens, "
                       f"DeltaNet state {format_bytes(self.ram.get('deltanet_state', 0))} per sequence"
                       + (f"; {format_bytes(self.ram_available)} RAM available" if self.ram_available else ""))
        else:
            budget = format_bytes(self.gpu_budget) if self.gpu_budget is not None else "?"
            out.append(f"placement (device={self.device}, GPU budget {budget}, context {self.context_tokens} tokens):")
            for k, v in self.vram.items():
                out.append(f"  VRAM  {k:<28} {format_bytes(v):>12}")
            total_experts = max(1, s.config.num_experts * sum(s.config.layer_is_moe))
            out.append(f"  VRAM  {'free':<28} {format_bytes(max(0, (self.gpu_budget or 0) - self.vram_used)):>12}")
            for k, v in self.ram.items():
                out.append(f"  RAM   {k:<28} {format_bytes(v):>12}")
            if self.fits:
                out.append(f"  expert cache: {self.expert_cache_slots} of {total_experts} routed experts "
                           f"({100.0 * self.expert_cache_slots / total_experts:.1f}%), {format_bytes(s.expert_bytes)} each")
        if self.problem:
            out.append(("does not fit: " if not self.fits else "warning: ") + self.problem)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _what_fits(p: Plan) -> str:
    """The options that would make a GPU plan that does not fit fit, largest first: a shorter
    context, int8 GPU weights (about half the pinned bytes), both; else a larger budget."""
    s, budget = p.summary, p.gpu_budget or 0
    kv_tok = s.kv_bytes_per_token()
    rest = s.deltanet_state_bytes() + GPU_RESERVE_BYTES
    options = []
    for label, pinned in (("", s.pinned_bytes), ('gpu_weights="int8" (pinned weights about half), ', s.pinned_bytes // 2)):
        room = budget - pinned - rest
        if room < kv_tok:
            continue
        ctx = room // kv_tok if kv_tok else p.context_tokens
        if ctx >= p.context_tokens:
            options.append(f"{label.rstrip(', ') or 'this budget'} with the {p.context_tokens}-token context")
        else:
            options.append(f"{label}a context of at most {ctx} tokens (max_context)")
    if not options:
        return "neither a shorter context nor int8 GPU weights fits: raise gpu_memory"
    return "would fit: " + "; or ".join(options)


def plan(summary: CheckpointSummary, device: str = "cpu", gpu_memory: str | int | None = None,
         context_tokens: int | None = None, gpu_weights: str = "bf16", prefill_stream: bool = True) -> Plan:
    """The placement plan of `summary` for `device` ("cpu" or "cuda") and a GPU memory budget.
    context_tokens: the context the KV cache is sized for (default: 32768, or the model's
    max_position_embeddings when smaller). gpu_weights: "int8" counts the pinned weights at about
    half their BF16 bytes (weight-only INT8 matrices). prefill_stream: whether prefill expert
    streaming takes its share (the load's rule: the longest chunk of 8192 ... 1024 tokens whose
    buffers fit 3/4 of what the expert cache would get; whether it then streams at all, and from
    how many tokens, the load measures: `Runtime.describe()["prefill_stream"]`)."""
    if gpu_weights not in ("bf16", "int8"):
        raise ValueError(f'gpu_weights must be "bf16" or "int8", got {gpu_weights!r}')
    if context_tokens is None:
        context_tokens = min(32768, summary.config.max_position_embeddings)
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    s = summary
    p = Plan(device="cpu" if device == "cpu" else "cuda", summary=s, context_tokens=context_tokens,
             ram_available=_mem_available())
    if p.device == "cpu":
        p.ram = {k: v for k, v in s.part_bytes.items() if v and k != "unused"}
        p.ram["kv_cache (fp32)"] = s.kv_bytes_per_token(4) * context_tokens
        p.ram["deltanet_state"] = s.deltanet_state_bytes()
        if p.ram_available is not None and p.ram_used > p.ram_available:
            p.problem = (f"the weights and a {context_tokens}-token cache need {format_bytes(p.ram_used)} but only "
                         f"{format_bytes(p.ram_available)} of RAM is available; pages will be read from disk")
        return p
    if gpu_memory is None:
        raise ValueError("a GPU plan needs gpu_memory (e.g. '12G')")
    p.gpu_budget = parse_bytes(gpu_memory)
    pinned = s.pinned_bytes // 2 if gpu_weights == "int8" else s.pinned_bytes
    p.vram = {"pinned weights" + (" (int8)" if gpu_weights == "int8" else ""): pinned,
              f"kv_cache ({context_tokens} tok)": s.kv_bytes_per_token() * context_tokens,
              "deltanet_state": s.deltanet_state_bytes(),
              "cuda context + workspace": GPU_RESERVE_BYTES}
    free = p.gpu_budget - p.vram_used
    if free < 0:
        p.fits = False
        p.problem = (f"the GPU part needs {format_bytes(p.vram_used)} (pinned weights "
                     f"{format_bytes(pinned)}, KV cache for {context_tokens} tokens) but the budget is "
                     f"{format_bytes(p.gpu_budget)}: {format_bytes(-free)} missing; " + _what_fits(p))
        return p
    if prefill_stream and s.config.num_experts > 0 and sum(s.config.layer_is_moe):
        # No longer than the context needs (the shortest chunk that holds it at most).
        ctx = min(context_tokens, s.config.max_position_embeddings)
        for t in [t for t in STREAM_CHUNKS if t == STREAM_CHUNKS[-1] or t // 2 < ctx]:
            need = stream_vram_bytes(s, t)
            if need <= free * STREAM_SHARE:
                p.stream_chunk = t
                p.vram[f"prefill streaming ({t} tok)"] = need
                free -= need
                break
    p.expert_cache_slots = int(min(free // max(1, s.expert_bytes), s.config.num_experts * sum(s.config.layer_is_moe)))
    p.vram["expert cache"] = p.expert_cache_slots * s.expert_bytes
    p.ram = {"routed_experts": s.part_bytes["routed_experts"]}
    if p.ram_available is not None and p.ram_used > p.ram_available:
        p.problem = (f"the routed experts need {format_bytes(p.ram_used)} of RAM but {format_bytes(p.ram_available)} "
                     "is available; they will be paged from disk (quantize them to fit)")
    return p
