# SPDX-License-Identifier: Apache-2.0
"""A short generation on the small model shipped in the repo (the README's main command).

    python examples/generate.py [MODEL_DIR] [--prompt TEXT] [--max-new-tokens N] [--seed S]

The default model is tidal-mini (models/tidal-mini): a 17.9M-parameter model with the exact architecture
of Qwen3.6-35B-A3B (Gated DeltaNet + gated attention, 48 routed experts + a shared expert, MTP head),
trained by us on Python sources (docs/models.md). It completes Python code. Text goes in and out through
the checkpoint's own tokenizer.json (Hugging Face `tokenizers`); sampling defaults come from its
generation_config.json.
"""

import argparse
import json
import pathlib
import time

import tidal
from tokenizers import Tokenizer

DEFAULT_MODEL = pathlib.Path(__file__).resolve().parents[1] / "models" / "tidal-mini"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompt", default="def read_lines(path):\n")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = pathlib.Path(args.model)

    t0 = time.perf_counter()
    rt = tidal.Runtime.load(model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    gen = json.loads((model / "generation_config.json").read_text())
    print(f"loaded {rt.config} in {time.perf_counter() - t0:.3f}s on {rt.num_threads} threads")

    prompt = tok.encode(args.prompt, add_special_tokens=False).ids
    eos = gen.get("eos_token_id", [])
    stop = eos if isinstance(eos, list) else [eos]
    sampling = {k: gen[k] for k in ("temperature", "top_k", "top_p") if k in gen}
    greedy = rt.generate(prompt, max_new_tokens=args.max_new_tokens, stop_token_ids=stop)
    sampled = rt.generate(prompt, max_new_tokens=args.max_new_tokens, stop_token_ids=stop,
                          seed=args.seed, **sampling)
    print(f"--- greedy ({len(greedy.token_ids)} tokens, {greedy.finish_reason}) ---")
    print(args.prompt + tok.decode(list(greedy.token_ids)))
    print(f"--- sampled ({', '.join(f'{k}={v}' for k, v in sampling.items())}, seed={args.seed}) ---")
    print(args.prompt + tok.decode(list(sampled.token_ids)))
    n = len(greedy.token_ids)
    print(f"--- prefill {len(prompt)} tokens in {greedy.prefill_seconds * 1e3:.1f} ms; "
          f"decode {(n - 1) / max(greedy.decode_seconds, 1e-9):.0f} tok/s")


if __name__ == "__main__":
    main()
