# SPDX-License-Identifier: Apache-2.0
"""tidal: run sparse Mixture-of-Experts language models (Qwen3-Next, Qwen3.5/3.6-MoE, Qwen3-MoE).

Quick start::

    import tidal
    rt = tidal.Runtime.load("path/to/checkpoint")          # config.json + *.safetensors
    logits = rt.logits([1, 2, 3])                          # float32 (3, vocab)
    out = rt.generate([1, 2, 3], max_new_tokens=16)        # greedy; out.token_ids
"""

from ._tidal import FormatError, GenerationResult, ModelConfig, Runtime, Sequence, __version__

__all__ = ["FormatError", "GenerationResult", "ModelConfig", "Runtime", "Sequence", "__version__"]
