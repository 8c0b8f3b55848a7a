# SPDX-License-Identifier: Apache-2.0
"""Routing traces: record the experts a real run chooses, replay a trace in a benchmark, or make a
synthetic one with a chosen popularity skew and temporal correlation (expert-cache studies).

A trace file is an .npz with `experts` int16 (tokens, layers, top_k), -1 for dense layers, plus
`num_experts`, `layers` and optionally `token_ids` (tokens,): the format of
models/tidal-mini/routing_trace.npz.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

__all__ = ["save_trace", "load_trace", "synthetic_trace", "record", "replay"]


def save_trace(path: str | os.PathLike, experts: np.ndarray, num_experts: int,
               token_ids: np.ndarray | None = None) -> None:
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (tokens, layers, top_k), got shape {experts.shape}")
    extra = {} if token_ids is None else {"token_ids": np.asarray(token_ids, np.int32)}
    np.savez_compressed(path, experts=experts.astype(np.int16), num_experts=np.int32(num_experts),
                        layers=np.int32(experts.shape[1]), **extra)


def load_trace(path: str | os.PathLike) -> dict[str, Any]:
    """{"experts": int32 (tokens, layers, top_k), "num_experts": int, "token_ids": array or None}."""
    try:
        z = np.load(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a routing trace (.npz) ({exc})") from None
    if "experts" not in z or "num_experts" not in z:
        raise ValueError(f"{path}: a routing trace needs 'experts' and 'num_experts' arrays")
    return {"experts": z["experts"].astype(np.int32), "num_experts": int(z["num_experts"]),
            "token_ids": z["token_ids"] if "token_ids" in z else None}


def synthetic_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int, *, skew: float = 1.0,
                    reuse: float = 0.5, seed: int = 0) -> np.ndarray:
    """int32 (num_tokens, num_layers, top_k) expert ids.

    Popularity follows a Zipf law with exponent `skew` (0: uniform), over a random permutation of the
    experts per layer. Temporal correlation: each of a token's k experts is, with probability
    `reuse`, one of the previous token's experts in that layer (which a VRAM cache would still hold);
    otherwise it is a fresh draw from the popularity law. Ids in a row are distinct.
    """
    if not (0 < top_k <= num_experts) or num_tokens < 1 or num_layers < 1:
        raise ValueError("need num_tokens >= 1, num_layers >= 1 and 0 < top_k <= num_experts")
    if skew < 0 or not 0 <= reuse <= 1:
        raise ValueError(f"skew must be >= 0 and reuse in [0, 1], got skew={skew}, reuse={reuse}")
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** skew
    p /= p.sum()
    out = np.empty((num_tokens, num_layers, top_k), np.int32)
    for layer in range(num_layers):
        perm = rng.permutation(num_experts)
        prev: np.ndarray | None = None
        for t in range(num_tokens):
            row: list[int] = []
            keep = rng.random(top_k) < reuse if prev is not None else np.zeros(top_k, bool)
            if prev is not None:
                candidates = list(rng.permutation(prev))
                row = [int(e) for e in candidates[: int(keep.sum())]]
            while len(row) < top_k:
                e = int(perm[rng.choice(num_experts, p=p)])
                if e not in row:
                    row.append(e)
            out[t, layer] = row
            prev = out[t, layer]
    return out


class Recording:
    """The result of `record()`: `experts` int32 (tokens, layers, top_k) once the block has exited."""

    experts: np.ndarray | None = None


@contextmanager
def record(rt: Any) -> Iterator[Recording]:
    """Record the routers' choices of everything run inside the block (one sequence at a time)."""
    rec = Recording()
    rt._engine.start_routing_record()
    try:
        yield rec
    finally:
        rec.experts = rt._engine.stop_routing_record()


@contextmanager
def replay(rt: Any, experts: np.ndarray) -> Iterator[None]:
    """Route every MoE layer by the rows of `experts` (looped) inside the block."""
    rt._engine.set_routing_replay(np.asarray(experts))
    try:
        yield
    finally:
        rt._engine.clear_routing_replay()
