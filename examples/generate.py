# SPDX-License-Identifier: Apache-2.0
"""A short greedy generation on the small model shipped in the repo (the README's main command).

    python examples/generate.py [MODEL_DIR] [--max-new-tokens N]

Until the trained default model lands, the model is a tiny random-weight Qwen3.5-MoE fixture, so the
output is token ids (there is no tokenizer yet) and reads as noise; what it shows is the engine running
end to end: load, prefill, greedy and seeded sampled decoding, timing.
"""

import argparse
import pathlib
import time

import numpy as np
import tidal

DEFAULT_MODEL = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "qwen3_5_moe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rt = tidal.Runtime.load(args.model)
    print(f"loaded {rt.config} in {time.perf_counter() - t0:.3f}s on {rt.num_threads} threads")

    prompt = np.load(pathlib.Path(args.model) / "reference.npz")["prompt_ids"][:32].tolist() \
        if (pathlib.Path(args.model) / "reference.npz").exists() else [1, 2, 3, 4]
    greedy = rt.generate(prompt, max_new_tokens=args.max_new_tokens)
    sampled = rt.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=0)
    print("prompt ids:   ", prompt)
    print("greedy ids:   ", list(greedy.token_ids))
    print("sampled ids:  ", list(sampled.token_ids), "(temperature 0.8, top_p 0.95, seed 0)")
    n = len(greedy.token_ids)
    print(f"prefill {len(prompt)} tokens in {greedy.prefill_seconds * 1e3:.1f} ms; "
          f"decode {(n - 1) / max(greedy.decode_seconds, 1e-9):.0f} tok/s")


if __name__ == "__main__":
    main()
