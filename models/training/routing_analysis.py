# SPDX-License-Identifier: Apache-2.0
"""What an expert cache can exploit in a routing trace (numpy only).

    python3 models/training/routing_analysis.py models/tidal-mini/routing_trace.npz

Trace format (routing_trace.npz): `token_ids [T] int32` (the routed tokens, consecutive held-out text),
`experts [T, L, k] int16` (expert ids chosen per token and MoE layer, top-k in descending router weight),
`num_experts` (scalar), `layers [L]` (decoder layer index of each column).

Per layer it prints:
  top10  share of routed (token, expert) slots taken by the 10% most used experts (uniform: 0.10)
  tok    mean |E_L(t) ∩ E_L(t+1)| / k: experts reused by the next token at the same layer (uniform: k/E)
  pred   layer-ahead predictability: a co-occurrence table fitted on the first half of the trace predicts
         layer L+1's top-k from layer L's experts; precision on the second half (uniform: k/E)
  lru    hit rate of a per-layer LRU cache holding 25% of the experts, replaying the trace
"""

import sys

import numpy as np


def analyse(path, cache_share=0.25):
    z = np.load(path)
    routes = z["experts"].astype(np.int64)
    e = int(z["num_experts"])
    t, layers, k = routes.shape
    half = t // 2
    rows = []
    for layer in range(layers):
        r = routes[:, layer]
        counts = np.bincount(r.reshape(-1), minlength=e)
        top10 = np.sort(counts)[::-1][:max(1, round(0.1 * e))].sum() / counts.sum()
        onehot = np.zeros((t, e), bool)
        np.put_along_axis(onehot, r, True, axis=1)
        tok = (onehot[:-1] & onehot[1:]).sum(1).mean() / k
        pred = None
        if layer + 1 < layers:
            nxt = np.zeros((t, e), bool)
            np.put_along_axis(nxt, routes[:, layer + 1], True, axis=1)
            co = onehot[:half].T.astype(np.float64) @ nxt[:half].astype(np.float64)  # (E, E)
            scores = onehot[half:].astype(np.float64) @ co
            guess = np.argsort(-scores, axis=1)[:, :k]
            pred = np.take_along_axis(nxt[half:], guess, axis=1).sum(1).mean() / k
        cap = max(1, round(cache_share * e))
        cache, hits, total = [], 0, 0
        for row in r:
            for x in row:
                total += 1
                if x in cache:
                    hits += 1
                    cache.remove(x)
                elif len(cache) >= cap:
                    cache.pop(0)
                cache.append(x)
        rows.append(dict(layer=int(z["layers"][layer]), top10=float(top10), tok=float(tok),
                         pred=None if pred is None else float(pred), lru=hits / total))
    return dict(tokens=t, num_experts=e, top_k=k, uniform=k / e, cache_share=cache_share, layers=rows)


def main():
    res = analyse(sys.argv[1] if len(sys.argv) > 1 else "models/tidal-mini/routing_trace.npz")
    print(f"{res['tokens']} tokens, {res['num_experts']} experts, top-{res['top_k']}; "
          f"uniform overlap {res['uniform']:.3f}, LRU cache of {res['cache_share']:.0%} of experts")
    print("layer  top10   tok    pred   lru")
    for r in res["layers"]:
        pred = "  -  " if r["pred"] is None else f"{r['pred']:.3f}"
        print(f"{r['layer']:5d}  {r['top10']:.3f}  {r['tok']:.3f}  {pred}  {r['lru']:.3f}")


if __name__ == "__main__":
    main()
