# SPDX-License-Identifier: Apache-2.0
"""`python -m tidal MODEL_DIR [--prompt-ids 1,2,3] [-n 16]`: a short generation from token ids."""

import argparse
import time

import tidal


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tidal", description=__doc__)
    ap.add_argument("model", help="checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--prompt-ids", default="1,2,3,4,5,6,7,8", help="comma-separated token ids")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rt = tidal.Runtime.load(args.model, num_threads=args.threads)
    print(f"loaded {rt.config} in {time.perf_counter() - t0:.2f}s ({rt.num_threads} threads)")
    ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    out = rt.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    print("prompt ids:   ", ids)
    print("generated ids:", list(out.token_ids))
    n = len(out.token_ids)
    if n > 1 and out.decode_seconds > 0:
        print(f"prefill {out.prefill_seconds * 1e3:.1f} ms, decode {(n - 1) / out.decode_seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
