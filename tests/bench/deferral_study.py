# SPDX-License-Identifier: Apache-2.0
"""What KTransformers-style expert deferral does to a model's outputs (Note [Expert deferral
study] in core/model/model.cpp): the same text through the CPU engine with each token's n
lowest-ranked routed experts added one layer late (TIDAL_STUDY_DEFER_EXPERTS=n, one process per
n), against n = 0. Prints, per n, the mean change of the per-token loss (nats), the largest
logit change, top-1 agreement, and how many greedy tokens of each prompt stay the same.

    python tests/bench/deferral_study.py [MODEL] [--defer 1,2] [--files 'python/tidal/*.py']
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def worker(model: str, files: list[str], tokens: int, gen: int, out: str) -> None:
    import tidal

    rt = tidal.Runtime.load(model, progress=False)
    res = {"nll": [], "top1": [], "logits": [], "greedy": []}
    for f in files:
        ids = rt.encode(open(f, encoding="utf-8").read())[:tokens]
        lg = rt.logits(ids).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        res["nll"].append((lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]).tolist())
        res["top1"].append(lg.argmax(-1).tolist())
        res["logits"].append(lg[:, :].astype(np.float32))
        g = rt.generate(ids[:64], max_new_tokens=gen, temperature=0.0, ignore_eos=True)
        res["greedy"].append(list(g.token_ids))
    np.savez(out, logits=np.concatenate(res["logits"]))
    with open(out + ".json", "w") as fh:
        json.dump({k: v for k, v in res.items() if k != "logits"}, fh)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=os.path.join(ROOT, "models", "tidal-mini"))
    ap.add_argument("--defer", default="1,2", help="experts deferred per token (comma-separated)")
    ap.add_argument("--files", default=os.path.join(ROOT, "python", "tidal", "*.py"),
                    help="text to score: files the model was not trained on")
    ap.add_argument("--tokens", type=int, default=512, help="tokens scored per file")
    ap.add_argument("--gen", type=int, default=32, help="greedy tokens per prompt (prompt: a file's first 64)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    files = sorted(glob.glob(a.files))[:8]
    if a.worker:
        worker(a.model, files, a.tokens, a.gen, a.worker)
        return 0
    import tempfile

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [0] + [int(x) for x in a.defer.split(",")]:
            out = os.path.join(tmp, f"d{n}")
            env = dict(os.environ, TIDAL_STUDY_DEFER_EXPERTS=str(n))
            subprocess.run([sys.executable, __file__, a.model, "--files", a.files, "--tokens", str(a.tokens),
                            "--gen", str(a.gen), "--worker", out], check=True, env=env)
            runs[n] = (json.load(open(out + ".json")), np.load(out + ".npz")["logits"])
    base, base_lg = runs[0]
    nll0 = np.concatenate([np.array(x) for x in base["nll"]])
    print(f"{len(files)} files, {len(nll0)} scored tokens; baseline loss {nll0.mean():.4f} nats/token")
    print("| deferred experts | Δ loss (nats/token) | max \\|Δlogit\\| (scale) | top-1 agreement | greedy tokens kept |")
    print("|---:|---:|---:|---:|---:|")
    for n, (r, lg) in runs.items():
        if n == 0:
            continue
        nll = np.concatenate([np.array(x) for x in r["nll"]])
        t0 = np.concatenate([np.array(x) for x in base["top1"]])
        t1 = np.concatenate([np.array(x) for x in r["top1"]])
        kept = []
        for g0, g1 in zip(base["greedy"], r["greedy"]):
            same = 0
            for x, y in zip(g0, g1):
                if x != y:
                    break
                same += 1
            kept.append(same / max(1, len(g0)))
        print(f"| {n} | {nll.mean() - nll0.mean():+.4f} | {np.abs(lg - base_lg).max():.3f} "
              f"({np.abs(base_lg).max():.1f}) | {(t0 == t1).mean():.4f} | {np.mean(kept):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
