# SPDX-License-Identifier: Apache-2.0
"""`rt.stats()`: what the runtime did since load (or `reset_stats()`), from the engine's counters.

Fields that belong to parts not present in this run (GPU time, PCIe copies, the VRAM expert cache and
its predictor on a device="cpu" runtime) are 0 or None, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .plan import format_bytes

__all__ = ["Stats"]


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _expert_cache_layers(s: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Per MoE layer of the VRAM expert cache (device="cuda"): routed pairs computed from a slot
    (hits) and on the host (misses), misses admitted (fills), the experts they evicted, and the
    bytes copied for the fills; empty without a cache."""
    if not s.get("gpu_expert_slots"):
        return {}
    out = {}
    gpu, host = s["layer_gpu_expert_pairs"], s["layer_host_expert_pairs"]
    fills, ev = s["layer_gpu_expert_fills"], s["layer_gpu_expert_evictions"]
    for layer in range(len(gpu)):
        if gpu[layer] + host[layer] == 0:
            continue
        out[layer] = {"hits": gpu[layer], "misses": host[layer], "hit_rate": gpu[layer] / (gpu[layer] + host[layer]),
                      "fills": fills[layer], "evictions": ev[layer],
                      "bytes_in": fills[layer] * s["gpu_expert_slot_bytes"]}
    return out


def _expert_cache_hit_rate(s: dict[str, Any]) -> float | None:
    """Routed (token, expert) pairs computed from the VRAM expert cache over all routed pairs since
    load / reset_stats (None without a cache, or before any pair)."""
    if not s.get("gpu_expert_slots"):
        return None
    total = s["gpu_expert_pairs"] + s["host_expert_pairs"]
    return s["gpu_expert_pairs"] / total if total else None


@dataclass
class Stats:
    """Counters of one runtime. Times in seconds, sizes in bytes.

    time: where forward time went — "gpu" (layers on the GPU), "cpu_experts" (routed experts on the
    CPU), "cpu_dense" (attention, DeltaNet, routers, shared experts, lm_head on the CPU), "sampling",
    "copies" (host->VRAM expert copies), "waits" (GPU waiting on CPU experts).
    """

    device: str
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    time: dict[str, float]
    expert_cache_hit_rate: float | None
    prediction_precision: float | None
    prediction_recall: float | None
    prediction_per_layer: dict[int, dict[str, float]]
    memory: dict[str, int | None]
    live_sequences: int
    prompt_tokens: int
    cached_prompt_tokens: int
    last: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    expert_cache_layers: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @classmethod
    def collect(cls, rt: Any) -> "Stats":
        s = rt._engine.stats()
        on_gpu = rt.device != "cpu"
        dense = s["dense_seconds"]
        time = {"gpu": dense if on_gpu else 0.0, "cpu_experts": s["routed_expert_seconds"],
                "cpu_dense": 0.0 if on_gpu else dense, "sampling": s["sample_seconds"], "copies": 0.0, "waits": 0.0}
        memory = {"weights_ram": s["weight_bytes"] - s["expert_bytes"], "experts_ram": s["expert_bytes"], "weights_vram": 0, "kv_and_state": s["state_bytes"],
                  "state_checkpoints": s["checkpoint_bytes"], "process_rss": _rss_bytes(), "vram_free": None}
        notes = []
        # Router lookahead (rt.set_router_lookahead): per layer ids predicted, routed, predicted and routed.
        pred, routed, hits = s["lookahead_predicted"], s["lookahead_routed"], s["lookahead_hits"]
        per_layer = {layer: {"precision": hits[layer] / pred[layer], "recall": hits[layer] / routed[layer]}
                     for layer in range(len(pred)) if pred[layer] > 0 and routed[layer] > 0}
        precision = sum(hits) / sum(pred) if sum(pred) > 0 else None
        recall = sum(hits) / sum(routed) if sum(routed) > 0 else None
        if not on_gpu:
            notes.append("device=cpu: no VRAM expert cache, so no hit rate; no copies")
        if precision is None and s["lookahead_on"]:
            notes.append("router lookahead is on but has measured nothing yet (no forward call since, "
                         "or a routing trace replaying)")
        if not s["weights_populated"]:
            notes.append("weights are memory-mapped lazily (populate=False or they exceed available RAM)")
        last = {}
        if rt._last is not None:
            r = rt._last
            last = {"prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                    "completion_tokens": r.completion_tokens, "time_to_first_token": r.prefill_seconds,
                    "decode_tokens_per_second": r.decode_tokens_per_second, "finish_reason": r.finish_reason}
        return cls(device=rt.device, prefill_tokens=s["prefill_tokens"], prefill_seconds=s["prefill_seconds"],
                   decode_tokens=s["decode_tokens"], decode_seconds=s["decode_seconds"], time=time,
                   expert_cache_hit_rate=_expert_cache_hit_rate(s), prediction_precision=precision, prediction_recall=recall,
                   prediction_per_layer=per_layer, memory=memory,
                   live_sequences=s["live_sequences"], prompt_tokens=rt._prompt_tokens,
                   cached_prompt_tokens=rt._cached_prompt_tokens, last=last, notes=notes,
                   expert_cache_layers=_expert_cache_layers(s))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        d["decode_tokens_per_second"] = self.decode_tokens_per_second
        return d

    def __str__(self) -> str:
        total = sum(self.time.values()) or 1.0
        lines = [f"prefill  {self.prefill_tokens:>8} tok  {self.prefill_seconds:8.3f} s  "
                 f"{self.prefill_tokens_per_second:10.1f} tok/s",
                 f"decode   {self.decode_tokens:>8} tok  {self.decode_seconds:8.3f} s  "
                 f"{self.decode_tokens_per_second:10.1f} tok/s",
                 "time     " + ", ".join(f"{k} {v:.3f}s ({100 * v / total:.0f}%)" for k, v in self.time.items() if v),
                 f"prompt cache: {self.cached_prompt_tokens} of {self.prompt_tokens} prompt tokens reused",
                 "expert cache hit rate: " + ("n/a" if self.expert_cache_hit_rate is None else f"{self.expert_cache_hit_rate:.1%}")
                 + ", prediction precision: " + ("n/a" if self.prediction_precision is None else f"{self.prediction_precision:.1%}")
                 + ", recall: " + ("n/a" if self.prediction_recall is None else f"{self.prediction_recall:.1%}"),
                 "memory   " + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory.items() if v is not None)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
