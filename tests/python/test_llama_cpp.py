# SPDX-License-Identifier: Apache-2.0
"""llama.cpp runs tidal's GGUF conversion of tidal-mini and continues a prompt exactly as tidal does:
proof that tidal.gguf writes the same model (names, layouts, value transforms), so the side-by-side
benchmark (tests/bench/run_device_llama_cpp.sh) compares two engines on one model."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from conftest import MINI
from tidal import gguf as tg

# llama.cpp itself runs the converted tidal-mini and must continue a prompt exactly as tidal does
# (greedy, 40 tokens; F32 dense weights, F32 or Q8_0 experts). Needs a llama.cpp build: TIDAL_LLAMA_CPP_BIN is the
# folder with llama-completion (tests/bench/run_device_llama_cpp.sh builds one and sets it).
LLAMA_BIN = os.environ.get("TIDAL_LLAMA_CPP_BIN")


@pytest.mark.skipif(not LLAMA_BIN, reason="no llama.cpp build: set TIDAL_LLAMA_CPP_BIN to the folder with "
                                          "llama-completion (tests/bench/run_device_llama_cpp.sh does)")
@pytest.mark.parametrize("expert_type", ["f32", "q8_0"])
def test_llama_cpp_continues_like_tidal(tmp_path, expert_type):
    import tidal

    prompt = "The little robot looked at the river and said that"
    out = tg.convert(MINI, tmp_path / "mini.gguf", expert_type=expert_type, dense_type="f32", workers=1,
                     progress=False)
    res = subprocess.run([str(pathlib.Path(LLAMA_BIN) / "llama-completion"), "-m", str(out), "-p", prompt, "-n", "40",
                          "--temp", "0", "--no-warmup", "-t", "4", "-ngl", "99", "-ot", "exps=CPU",
                          # plain continuation: the GGUF carries the chat template, which would
                          # otherwise put llama-completion in conversation mode
                          "-no-cnv"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(prompt), res.stdout[:200]
    theirs = res.stdout[len(prompt):]
    rt = tidal.Runtime.load(MINI, progress=False, expert_dtype="bf16")
    ours = rt.generate(prompt, max_new_tokens=40, temperature=0.0).text
    n = min(len(ours), len(theirs.rstrip("\n")))
    assert n >= 40 and theirs[:n] == ours[:n], (theirs, ours)
