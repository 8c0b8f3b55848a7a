# SPDX-License-Identifier: Apache-2.0
"""A two-turn chat with preserve_thinking on the small model, reusing the session's cached state.

    python examples/chat.py [MODEL_DIR]

With preserve_thinking the chat template keeps the <think> reasoning of earlier assistant turns in the
prompt, so the model sees its own prior reasoning on the next turn (what an agent loop wants). The
session prefills only what is new in each turn's prompt.
"""

import pathlib
import sys

import tidal

MODEL = sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1] / "models" / "tidal-mini"

rt = tidal.Runtime.load(MODEL, progress=False)
session = rt.session(preserve_thinking=True, max_new_tokens=200, seed=0, repetition_penalty=1.3)

first = session.chat("Write a Python function `is_even(n)`.")
print("reasoning:", first.reasoning)
print("answer:\n" + first.content)

# The second turn streams; its prompt carries the first turn's reasoning.
print("--- turn 2 (streamed) ---")
channel = None
stream = session.chat("Now write `is_odd(n)`.", stream=True)
for chunk in stream:
    if chunk.channel != channel and chunk.channel in ("reasoning", "content"):
        print(f"\n[{chunk.channel}] ", end="")
        channel = chunk.channel
    print(chunk.text, end="", flush=True)
print()
assert first.reasoning in session.last_prompt, "preserve_thinking: turn 1's reasoning is in turn 2's prompt"
r = stream.result
print(f"turn 2: {r.cached_tokens} of {r.prompt_tokens} prompt tokens came from the session's cache; "
      f"history has {len(session.messages)} messages")
