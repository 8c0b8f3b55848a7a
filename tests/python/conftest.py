# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: paths of the golden checkpoints and a small safetensors writer/reader."""

import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
ARCHS = ["qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe"]
MINI = ROOT / "models" / "tidal-mini"                     # the shipped trained model
MINI_REF = ROOT / "tests" / "fixtures" / "tidal_mini"     # its transformers reference
CHAT_FIXTURE = ROOT / "tests" / "fixtures" / "chat" / "tidal_mini_renderings.json"
# (checkpoint dir, reference dir) of every model checked against transformers
GOLDEN_CASES = {**{a: (GOLDEN / a, GOLDEN / a) for a in ARCHS}, "tidal_mini": (MINI, MINI_REF)}


@pytest.fixture(autouse=True, scope="session")
def _prefill_stream_off_unless_asked():
    """device="cuda" streams a long enough prompt's experts through the GPU by default, from a threshold
    measured at load (Note [Measuring the stream threshold] in core/model/cuda_model.cpp), so whether a
    given prompt streams depends on the machine's timings. The tests check the paths they name (host
    experts, the VRAM cache, their counters) with the host path fixed; the streaming tests in test_cuda.py
    turn it on (forced, or automatic) themselves. TIDAL_CUDA_PREFILL_STREAM set by the caller (e.g. `auto`
    to run the whole suite with the default) is left alone."""
    with pytest.MonkeyPatch.context() as mp:
        if "TIDAL_CUDA_PREFILL_STREAM" not in os.environ:
            mp.setenv("TIDAL_CUDA_PREFILL_STREAM", "0")
        yield


def read_safetensors(path):
    """-> (header dict, raw data bytes)."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    h = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)


def tensor_array(header, data, name):
    """A tensor of a safetensors file as numpy (BF16 as float32)."""
    t = header[name]
    b0, b1 = t["data_offsets"]
    buf = data[b0:b1]
    if t["dtype"] == "BF16":
        u = np.frombuffer(buf, np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(t["shape"])
    return np.frombuffer(buf, {"F32": np.float32, "F16": np.float16}[t["dtype"]]).reshape(t["shape"])


@pytest.fixture
def golden_copy(tmp_path):
    """Copy of a golden checkpoint directory that a test may modify."""

    def make(arch):
        dst = tmp_path / arch
        shutil.copytree(GOLDEN / arch, dst)
        return dst

    return make
