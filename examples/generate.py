# SPDX-License-Identifier: Apache-2.0
"""A short generation on the small model shipped in the repo (the README's main command).

    python examples/generate.py [MODEL_DIR] [--prompt TEXT] [--max-new-tokens N] [--seed S]

The default model is tidal-mini (models/tidal-mini): a 17.9M-parameter model with the exact architecture
of Qwen3.6-35B-A3B (Gated DeltaNet + gated attention, 48 routed experts + a shared expert, MTP head),
trained by us on Python sources (docs/models.md). It completes Python code. Text goes in and out through
the checkpoint's own tokenizer; sampling defaults come from its generation_config.json.
"""

import argparse
import pathlib

import tidal

DEFAULT_MODEL = pathlib.Path(__file__).resolve().parents[1] / "models" / "tidal-mini"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompt", default="def read_lines(path):\n")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rt = tidal.Runtime.load(args.model)  # progress bar + placement plan on stderr
    print(f"model: {rt.config}, {rt.num_threads} threads")

    # Greedy decoding of a small model loops; a mild repetition penalty (vLLM semantics) breaks that.
    greedy = rt.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.2)
    print(f"--- greedy, repetition_penalty=1.2 ({greedy.completion_tokens} tokens, {greedy.finish_reason}) ---")
    print(args.prompt + greedy.text)

    # Sampled with the checkpoint's defaults (generation_config.json), streamed as it is generated.
    defaults = {k: rt.generation_config[k] for k in ("temperature", "top_k", "top_p") if k in rt.generation_config}
    print(f"--- sampled ({', '.join(f'{k}={v}' for k, v in defaults.items())}, seed={args.seed}), streamed ---")
    print(args.prompt, end="")
    stream = rt.generate(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stream=True)
    for chunk in stream:
        print(chunk.text, end="", flush=True)
    print()
    r = stream.result
    print(f"--- prefill {r.prompt_tokens} tokens in {r.prefill_seconds * 1e3:.1f} ms; "
          f"decode {r.decode_tokens_per_second:.0f} tok/s ---")
    print(rt.stats())


if __name__ == "__main__":
    main()
