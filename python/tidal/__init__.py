# SPDX-License-Identifier: Apache-2.0
"""tidal: run sparse Mixture-of-Experts language models (Qwen3-Next, Qwen3.5/3.6-MoE, Qwen3-MoE).

Quick start::

    import tidal
    rt = tidal.Runtime.load("models/tidal-mini")            # a Hugging Face checkpoint directory
    print(rt.generate("def fibonacci(n):\\n", max_new_tokens=48).text)

    reply = rt.chat([{"role": "user", "content": "Write is_prime(n)."}])
    print(reply.reasoning, reply.content)

    for chunk in rt.generate("import os\\n", stream=True):  # text deltas, whole UTF-8 characters
        print(chunk.text, end="")

    s = rt.session(preserve_thinking=True)                  # multi-turn, reuses the cached state
    s.chat("Write is_even(n).");  s.chat("Now is_odd(n).")
    print(rt.stats())
"""

from ._tidal import Busy, Cancelled, FormatError, ModelConfig, Sampler, Sequence, __version__, cuda_devices
from .chat_template import ChatTemplate
from .generation import ChatResult, GenerationResult, Stream, StreamChunk
from .plan import Plan, inspect, plan
from .runtime import Runtime
from .session import Session
from .stats import Stats
from .tokenizer import Tokenizer

__all__ = ["Busy", "Cancelled", "ChatResult", "ChatTemplate", "FormatError", "GenerationResult", "ModelConfig", "Plan", "Runtime",
           "Sampler", "Sequence", "Session", "Stats", "Stream", "StreamChunk", "Tokenizer", "__version__", "cuda_devices",
           "inspect", "plan"]
