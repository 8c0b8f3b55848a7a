# SPDX-License-Identifier: Apache-2.0
"""Explicit sequence state: prefill a prompt in chunks, then decode token by token.

    python examples/chunked_prefill.py [MODEL_DIR]        (default: the shipped tidal-mini model)

Shows that a Sequence carries its KV cache and DeltaNet state between calls, and that chunked prefill
gives the logits of a one-shot prefill.
"""

import pathlib
import sys

import numpy as np
import tidal
from tokenizers import Tokenizer

model = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                     pathlib.Path(__file__).resolve().parents[1] / "models" / "tidal-mini")
rt = tidal.Runtime.load(model)
tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
text = pathlib.Path(__file__).read_text()  # this file's own source: ~100 tokens of Python to prefill
prompt = tokenizer.encode(text, add_special_tokens=False).ids[:100]

one_shot = rt.logits(prompt)
seq = rt.new_sequence()
chunks = [seq.forward(prompt[i:i + 7]) for i in range(0, len(prompt), 7)]
print(f"chunked (7 at a time) vs one-shot prefill: max |diff| = {np.abs(np.concatenate(chunks) - one_shot).max():.2e}")

tokens = []
last = chunks[-1][-1]
for _ in range(8):
    tok = int(np.argmax(last))
    tokens.append(tok)
    last = seq.forward([tok], all_logits=False)[0]
print("decoded:", repr(tokenizer.decode(tokens)), "| same as generate():",
      tokens == list(rt.generate(prompt, max_new_tokens=8).token_ids))
