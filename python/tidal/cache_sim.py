# SPDX-License-Identifier: Apache-2.0
"""VRAM expert-cache policies replayed on routing traces: how often a layer's routed experts would
already be on the GPU, per policy, before the cache itself exists (docs/performance.md, "Expert
cache policies on synthetic traces").

    python -m tidal.cache_sim --slots 3900 --tokens 2000 [--layers 40 --experts 256 --top-k 8]

The cache is one pool of `slots` expert slots shared by all MoE layers (keys are (layer, expert)).
The trace's first `warmup` tokens fill the cache (and profile the static set); hits, misses and
evictions count over the rest. Policies:

- ``lru``: evict the least recently used expert.
- ``lfu``: evict the expert with the lowest exponentially decayed use count (each token multiplies
  every count by ``decay``; an access adds 1).
- ``static``: the ``slots`` most used experts of the warm-up tokens stay resident; nothing is
  replaced (no copies after the warm-up).

History predictors (`predict`): a replayed trace has no router to run early (Note [Router
lookahead] measures that predictor on real models), so what a trace alone offers is its history:
- ``previous``: a layer's experts for token t are predicted to be its experts for token t - 1;
- ``previous+popular``: those, then the layer's most used experts so far (decayed counts, as the
  ``lfu`` policy keeps them) up to `predict_k` per token.
Precision = predicted ids that were routed / predicted ids, recall = routed ids that were
predicted / routed ids, over the tokens after the warm-up.

The runtime's own rules (`simulate_runtime`, ``--fills``): the same trace through
``ExpertCacheSchedule``, the class the VRAM expert cache runs on (Note [Expert cache schedule]): at
most `max_fills` copies queued or running, each issued a token after its miss and used from the token
after that, "static" profiled as "lfu" over the first tokens and then frozen. It counts the routed
pairs the GPU would compute and the copies per token.

Everything is deterministic for a given trace.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CacheResult", "PredictionResult", "RuntimeResult", "simulate", "simulate_native", "simulate_runtime",
           "predict", "POLICIES", "PREDICTORS"]

POLICIES = ("lru", "lfu", "static")
PREDICTORS = ("previous", "previous+popular")


@dataclass
class PredictionResult:
    predictor: str
    predict_k: int
    predicted: int = 0
    routed: int = 0
    hits: int = 0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.routed if self.routed else 0.0


def predict(experts: np.ndarray, num_experts: int, predictor: str = "previous", *, predict_k: int | None = None,
            warmup: int = 0, decay: float = 0.98) -> PredictionResult:
    """Precision and recall of a history predictor (module docstring) on `experts` (tokens, layers,
    top_k), -1 for dense layers; counts over the tokens after the first `warmup` (at least 1: the
    first token has no history)."""
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (tokens, layers, top_k), got shape {experts.shape}")
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}: expected one of {', '.join(PREDICTORS)}")
    tokens, layers, k = experts.shape
    kp = k if predict_k is None else int(predict_k)
    if not 1 <= kp <= num_experts:
        raise ValueError(f"predict_k must be in [1, {num_experts}], got {predict_k}")
    if predictor == "previous" and kp != k:
        raise ValueError(f"the 'previous' predictor predicts top_k = {k} experts; use 'previous+popular' for more")
    if not 0 <= warmup < tokens:
        raise ValueError(f"warmup must be in [0, {tokens}), got {warmup}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    res = PredictionResult(predictor, kp)
    counts = np.zeros((layers, num_experts))
    ids = np.arange(num_experts)
    for t in range(tokens):
        for layer in range(layers):
            row = experts[t, layer]
            row = row[row >= 0]
            if t >= max(1, warmup) and row.size:
                prev = experts[t - 1, layer]
                pred = list(dict.fromkeys(prev[prev >= 0].tolist()))[:kp]
                if predictor == "previous+popular" and len(pred) < kp:
                    # Most used first, lower id on ties; skip those already predicted.
                    order = np.lexsort((ids, -counts[layer]))
                    taken = set(pred)
                    for e in order.tolist():
                        if len(pred) == kp:
                            break
                        if e not in taken:
                            pred.append(e)
                res.predicted += len(pred)
                res.routed += row.size
                res.hits += len(set(pred) & set(row.tolist()))
            counts[layer] *= decay
            counts[layer, row] += 1.0
    return res


@dataclass
class CacheResult:
    policy: str
    slots: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_accesses: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def layer_hit_rates(self) -> list[float]:
        return [h / a if a else 0.0 for h, a in zip(self.layer_hits, self.layer_accesses)]


def simulate(experts: np.ndarray, num_experts: int, slots: int, policy: str = "lru", *,
             warmup: int = 0, decay: float = 0.98) -> CacheResult:
    """Replays `experts` (tokens, layers, top_k) int ids, -1 for dense layers, through a cache of
    `slots` experts under `policy`; counts over the tokens after the first `warmup`."""
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (tokens, layers, top_k), got shape {experts.shape}")
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if not 0 <= warmup < experts.shape[0]:
        raise ValueError(f"warmup must be in [0, {experts.shape[0]}), got {warmup}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if experts.size and (experts.max() >= num_experts or experts.min() < -1):
        raise ValueError(f"expert ids must be in [-1, {num_experts}), got [{experts.min()}, {experts.max()}]")
    tokens, layers, _ = experts.shape
    res = CacheResult(policy, slots, layer_hits=[0] * layers, layer_accesses=[0] * layers)
    keys = np.where(experts >= 0, np.arange(layers)[None, :, None] * num_experts + experts, -1)

    if policy == "static":
        counts = np.bincount(keys[:warmup][keys[:warmup] >= 0].ravel(), minlength=layers * num_experts)
        # The most used keys, ties broken by the lower key: deterministic.
        order = np.lexsort((np.arange(counts.size), -counts))
        resident = np.zeros(counts.size, bool)
        resident[order[:slots]] = True
        for t in range(warmup, tokens):
            for layer in range(layers):
                row = keys[t, layer]
                row = row[row >= 0]
                h = int(resident[row].sum())
                res.layer_hits[layer] += h
                res.layer_accesses[layer] += row.size
        res.hits = sum(res.layer_hits)
        res.misses = sum(res.layer_accesses) - res.hits
        return res

    lru: OrderedDict[int, None] = OrderedDict()
    score = np.zeros(layers * num_experts)  # lfu: decayed count as of `stamp`
    stamp = np.zeros(layers * num_experts)
    resident = np.zeros(layers * num_experts, bool)
    members: list[int] = []  # lfu: resident keys
    step = 0
    for t in range(tokens):
        counted = t >= warmup
        step += 1  # lfu: counts decay per token
        for layer in range(layers):
            row = keys[t, layer]
            row = row[row >= 0]
            if row.size == 0:
                continue
            for key in row.tolist():
                hit = bool(resident[key])
                if counted:
                    res.layer_accesses[layer] += 1
                    res.layer_hits[layer] += hit
                if policy == "lru":
                    if hit:
                        lru.move_to_end(key)
                        continue
                    if slots == 0:
                        continue
                    if len(lru) >= slots:
                        victim, _ = lru.popitem(last=False)
                        resident[victim] = False
                        res.evictions += counted
                    lru[key] = None
                    resident[key] = True
                else:  # lfu
                    score[key] = score[key] * decay ** (step - stamp[key]) + 1.0
                    stamp[key] = step
                    if hit or slots == 0:
                        continue
                    if len(members) >= slots:
                        m = np.asarray(members)
                        now = score[m] * np.power(decay, step - stamp[m])
                        i = int(np.argmin(now))  # first minimum: deterministic
                        victim = members[i]
                        members[i] = members[-1]
                        members.pop()
                        resident[victim] = False
                        res.evictions += counted
                    members.append(key)
                    resident[key] = True
    res.hits = sum(res.layer_hits)
    res.misses = sum(res.layer_accesses) - res.hits
    return res


def simulate_native(experts: np.ndarray, num_experts: int, slots: int, policy: str = "lru", *,
                    warmup: int = 0, decay: float = 0.98) -> CacheResult:
    """`simulate` through tidal's own cache bookkeeping (the C++ ``ExpertSlotCache`` the VRAM expert
    cache uses) instead of the Python model of it: same arguments, same counters. Pins are released
    after every access, as the Python model has none. LRU and static count exactly what `simulate`
    counts; LFU may differ where decayed counts tie (the C++ class evicts the lower key, the model
    the first in its member order)."""
    from ._tidal import ExpertSlotCache

    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (tokens, layers, top_k), got shape {experts.shape}")
    if not 0 <= warmup < experts.shape[0]:
        raise ValueError(f"warmup must be in [0, {experts.shape[0]}), got {warmup}")
    tokens, layers, _ = experts.shape
    cache = ExpertSlotCache(layers, num_experts, slots, policy, decay)
    start = 0
    if policy == "static":
        keys = np.where(experts[:warmup] >= 0, np.arange(layers)[None, :, None] * num_experts + experts[:warmup], -1)
        counts = np.bincount(keys[keys >= 0].ravel(), minlength=layers * num_experts)
        order = np.lexsort((np.arange(counts.size), -counts))[:slots]
        cache.set_resident([(int(k) // num_experts, int(k) % num_experts) for k in order])
        start = warmup
    res = CacheResult(policy, slots, layer_hits=[0] * layers, layer_accesses=[0] * layers)
    for t in range(start, tokens):
        if t == warmup:
            cache.reset_stats()
        for layer in range(layers):
            for e in experts[t, layer].tolist():
                if e >= 0:
                    cache.access(layer, e)
                    cache.release_pins()
        cache.next_token()
    stats = cache.stats()
    res.layer_hits = [s["hits"] for s in stats]
    res.layer_accesses = [s["hits"] + s["misses"] for s in stats]
    res.hits = sum(res.layer_hits)
    res.misses = sum(res.layer_accesses) - res.hits
    res.evictions = cache.total()["evictions"]
    return res


@dataclass
class RuntimeResult:
    """`simulate_runtime`: routed (token, expert) pairs the GPU computed from a slot and the host computed,
    and copies issued, over the counted tokens."""

    policy: str
    slots: int
    max_fills: int
    gpu_pairs: int = 0
    host_pairs: int = 0
    fills: int = 0
    tokens: int = 0

    @property
    def gpu_share(self) -> float:
        n = self.gpu_pairs + self.host_pairs
        return self.gpu_pairs / n if n else 0.0

    @property
    def fills_per_token(self) -> float:
        return self.fills / self.tokens if self.tokens else 0.0


def simulate_runtime(experts: np.ndarray, num_experts: int, slots: int, policy: str = "lfu", *,
                     max_fills: int = 16, warmup: int = 0, decay: float = 0.98,
                     static_steps: int = 256) -> RuntimeResult:
    """A trace through the runtime's own step rules (``ExpertCacheSchedule``, Note [Expert cache schedule]):
    a miss is admitted only while fewer than `max_fills` copies are queued or running, its copy is issued at
    the next token's start and the GPU computes it from the token after. So this counts what the runtime's
    cache would compute on the GPU (`gpu_share`) and copy (`fills_per_token`), where `simulate` counts
    a policy's hit rate with every miss copied at once."""
    from ._tidal import ExpertCacheSchedule

    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (tokens, layers, top_k), got shape {experts.shape}")
    if not 0 <= warmup < experts.shape[0]:
        raise ValueError(f"warmup must be in [0, {experts.shape[0]}), got {warmup}")
    if experts.size and int(experts.max()) >= num_experts:
        raise ValueError(f"expert id {int(experts.max())} is not below num_experts={num_experts}")
    tokens, layers, _ = experts.shape
    res = RuntimeResult(policy, slots, max_fills)
    s = ExpertCacheSchedule(layers, num_experts, max(1, slots), policy, max_fills, decay, static_steps)
    for t in range(tokens):
        issued = len(s.begin_step())
        counted = t >= warmup
        for layer in range(layers):
            ids = [e for e in experts[t, layer].tolist() if e >= 0]  # -1: a dense layer's row
            if not ids:
                continue
            if slots == 0:  # no cache: every routed pair on the host
                gpu, host = 0, ids
            else:
                gpu, host = s.route(layer, ids)
            if counted:
                res.gpu_pairs += gpu
                res.host_pairs += len(host)
        s.end_step()
        if counted:
            res.fills += issued
            res.tokens += 1
    return res


def main(argv: list[str] | None = None) -> int:
    from .routing import synthetic_trace

    ap = argparse.ArgumentParser(prog="python -m tidal.cache_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, required=True, help="expert slots in VRAM (all layers together)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=None, help="tokens that fill the cache (default: a quarter)")
    ap.add_argument("--decay", type=float, default=0.98)
    ap.add_argument("--predict-k", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                    help="also report the history predictors, previous+popular at these counts (e.g. 8,16)")
    ap.add_argument("--fills", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                    help="also replay the runtime's step rules with these copy limits (e.g. 16,64)")
    ap.add_argument("--traces", default="random:0:0,skewed:1.0:0.5",
                    help="name:zipf_skew:reuse,... synthetic traces (tidal.routing.synthetic_trace)")
    a = ap.parse_args(argv)
    warmup = a.tokens // 4 if a.warmup is None else a.warmup
    total = a.layers * a.experts
    print(f"{a.slots} slots of {total} routed experts ({100.0 * a.slots / total:.1f}%), {a.tokens} tokens "
          f"({warmup} warm-up), {a.layers} layers, top-{a.top_k} of {a.experts}")
    print("| trace | policy | hit rate | evictions per token | worst layer |")
    print("|---|---|---:|---:|---:|")
    for spec in a.traces.split(","):
        name, skew, reuse = spec.split(":")
        trace = synthetic_trace(a.tokens, a.layers, a.experts, a.top_k, skew=float(skew), reuse=float(reuse))
        for policy in POLICIES:
            r = simulate(trace, a.experts, a.slots, policy, warmup=warmup, decay=a.decay)
            counted = a.tokens - warmup
            worst = min(r.layer_hit_rates()) if r.layer_accesses else math.nan
            print(f"| {name} (skew {skew}, reuse {reuse}) | {policy} | {100 * r.hit_rate:.1f}% | "
                  f"{r.evictions / counted:.1f} | {100 * worst:.1f}% |")
    if a.fills:
        print("\nThe runtime's rules (simulate_runtime: copies limited, issued a token late, used the token after):")
        print("| trace | policy | copies at once | GPU share of routed pairs | copies per token |")
        print("|---|---|---:|---:|---:|")
        for spec in a.traces.split(","):
            name, skew, reuse = spec.split(":")
            trace = synthetic_trace(a.tokens, a.layers, a.experts, a.top_k, skew=float(skew), reuse=float(reuse))
            for policy in POLICIES:
                for f in a.fills:
                    r = simulate_runtime(trace, a.experts, a.slots, policy, max_fills=f, warmup=warmup, decay=a.decay,
                                         static_steps=warmup)
                    print(f"| {name} (skew {skew}, reuse {reuse}) | {policy} | {f} | {100 * r.gpu_share:.1f}% | "
                          f"{r.fills_per_token:.1f} |")
    if a.predict_k:
        print("\n| trace | predictor | predicted per token and layer | precision | recall |")
        print("|---|---|---:|---:|---:|")
        for spec in a.traces.split(","):
            name, skew, reuse = spec.split(":")
            trace = synthetic_trace(a.tokens, a.layers, a.experts, a.top_k, skew=float(skew), reuse=float(reuse))
            for predictor, kp in [("previous", a.top_k)] + [("previous+popular", k) for k in a.predict_k]:
                r = predict(trace, a.experts, predictor, predict_k=kp, warmup=warmup, decay=a.decay)
                print(f"| {name} (skew {skew}, reuse {reuse}) | {predictor} | {kp} | {100 * r.precision:.1f}% | "
                      f"{100 * r.recall:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
