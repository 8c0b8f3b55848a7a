# SPDX-License-Identifier: Apache-2.0
"""tidal.gguf: the writer's files are standard GGUF (read back by the `gguf` package from PyPI, the
reference reader maintained with llama.cpp), the block quantisers decode to within their stated error,
and the converter writes the tensors and metadata llama.cpp expects for each architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidal import gguf as tg

gguf = pytest.importorskip("gguf", reason="the `gguf` package (pip install gguf) reads the files back")
from gguf import GGMLQuantizationType as T  # noqa: E402

# Error bounds of the quantisers, relative to the RMS of the input (gaussian rows).
# Q8_0: step = amax/127 over 32 values (amax ~ 2.1 sigma for gaussians): rms error = step/sqrt(12)
#   ~ 0.005 sigma; bound 0.01. Q4_K: sub-block step = range/15 with 6-bit rounded scales; range of 32
#   gaussians ~ 4.1 sigma: step/sqrt(12) ~ 0.08 sigma; bound 0.1 (Q4_0 from the gguf package,
#   range/16 over 32 values with no offset, measures ~0.086 on the same data).
REL_RMS = {tg.GGMLType.Q8_0: 0.01, tg.GGMLType.Q4_K: 0.1, tg.GGMLType.BF16: 0.004, tg.GGMLType.F16: 5e-4,
           tg.GGMLType.F32: 0.0}
REF = {tg.GGMLType.Q8_0: T.Q8_0, tg.GGMLType.Q4_K: T.Q4_K, tg.GGMLType.BF16: T.BF16, tg.GGMLType.F16: T.F16,
       tg.GGMLType.F32: T.F32}


def _data(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[0, : min(cols, 64)] = 0.0                 # an all-zero block
    if rows > 1:
        x[1] = np.abs(x[1])                     # non-negative row (min offset of zero)
    if rows > 2:
        x[2] = -np.abs(x[2]) * 50               # large negative row
    return x


@pytest.mark.parametrize("gtype", list(REL_RMS))
@pytest.mark.parametrize("rows,cols", [(1, 256), (3, 512), (17, 768)])
def test_quantise_decode_matches_gguf_package(gtype, rows, cols):
    x = _data(rows, cols, seed=rows)
    data = tg.quantize(x, gtype)
    assert len(data) == tg.type_size(gtype, x.shape)
    mine = tg.dequantize(data, gtype, x.shape)
    ref = gguf.quants.dequantize(np.frombuffer(data, np.uint8).reshape(rows, -1), REF[gtype])
    np.testing.assert_array_equal(mine, ref.reshape(x.shape))  # same decoder semantics, bit for bit
    for r in range(rows):  # error bound per row (each row has its own scale)
        rms = np.sqrt(np.mean(x[r] ** 2))
        err = np.sqrt(np.mean((mine[r] - x[r]) ** 2))
        assert err <= REL_RMS[gtype] * rms + 1e-12, (r, err / max(rms, 1e-30))


def test_zero_and_constant_blocks_are_exact():
    x = np.zeros((2, 256), np.float32)
    x[1] = 0.5
    for gtype in (tg.GGMLType.Q8_0, tg.GGMLType.Q4_K):
        y = tg.dequantize(tg.quantize(x, gtype), gtype, x.shape)
        np.testing.assert_allclose(y, x, atol=0.5 / 100)
        assert np.all(y[0] == 0)


def test_quantise_rejects_bad_rows_and_values():
    with pytest.raises(ValueError, match="multiple of 256"):
        tg.quantize(np.zeros((2, 100), np.float32), tg.GGMLType.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        tg.quantize(np.zeros(33, np.float32), tg.GGMLType.Q8_0)
    with pytest.raises(ValueError, match="non-finite"):
        tg.quantize(np.full(32, np.nan, np.float32), tg.GGMLType.Q8_0)
    with pytest.raises(ValueError, match="needs"):
        tg.dequantize(b"\0" * 10, tg.GGMLType.Q8_0, [32])
    with pytest.raises(ValueError, match="unknown GGUF tensor type"):
        tg.GGMLType.parse("q3_xs")


def test_writer_file_reads_back_with_gguf_package(tmp_path):
    w = tg.GGUFWriter(tmp_path / "t.gguf")
    w.add("general.architecture", "qwen35moe")
    w.add("general.name", "ünïcode name")
    w.add("qwen35moe.block_count", 4, tg.U32)
    w.add("qwen35moe.rope.freq_base", 1e7, tg.F32)
    w.add("some.flag", True)
    w.add("some.i64", -(2**40))
    w.add("qwen35moe.rope.dimension_sections", [11, 11, 10, 0], tg.ARR, tg.I32)
    w.add("tokenizer.ggml.tokens", ["a", "b", "<|x|>"])
    arrays = {}
    specs = [("f32", [3, 5], tg.GGMLType.F32), ("bf16", [2, 64], tg.GGMLType.BF16),
             ("f16", [7], tg.GGMLType.F16), ("q8", [4, 3, 64], tg.GGMLType.Q8_0),
             ("q4k", [2, 512], tg.GGMLType.Q4_K)]
    for i, (name, shape, gtype) in enumerate(specs):
        a = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        arrays[name] = (a, gtype)
        w.add_tensor(name, shape, gtype, lambda a=a, gtype=gtype: tg.quantize(a, gtype))
    path = w.write()
    assert path.stat().st_size == w.total_bytes()
    r = gguf.GGUFReader(str(path))

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("general.architecture") == "qwen35moe"
    assert field("general.name") == "ünïcode name"
    assert field("qwen35moe.block_count") == 4
    assert r.fields["qwen35moe.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert field("qwen35moe.rope.freq_base") == pytest.approx(1e7)
    assert field("some.flag") is True
    assert field("some.i64") == -(2**40)
    assert field("qwen35moe.rope.dimension_sections") == [11, 11, 10, 0]
    assert field("tokenizer.ggml.tokens") == ["a", "b", "<|x|>"]
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == [s[0] for s in specs]
    for name, shape, gtype in specs:
        t = tensors[name]
        assert int(t.tensor_type) == gtype
        assert [int(n) for n in t.shape] == shape[::-1]  # ne[0] is the innermost dimension
        assert t.data_offset % 32 == 0
        a, _ = arrays[name]
        got = gguf.quants.dequantize(np.asarray(t.data), REF[gtype]).reshape(shape)
        np.testing.assert_array_equal(got, tg.dequantize(tg.quantize(a, gtype), gtype, shape))
        if gtype == tg.GGMLType.F32:
            np.testing.assert_array_equal(got, a)


def test_writer_rejects_bad_input(tmp_path):
    w = tg.GGUFWriter(tmp_path / "bad.gguf")
    w.add("a", 1)
    with pytest.raises(ValueError, match="duplicate GGUF metadata key"):
        w.add("a", 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        w.add_tensor("t", [3, 33], tg.GGMLType.Q8_0, lambda: b"")
    with pytest.raises(ValueError, match="< 64 bytes"):
        w.add_tensor("x" * 64, [4], tg.GGMLType.F32, lambda: b"")
    with pytest.raises(TypeError, match="cannot hold"):
        w.add("obj", object())
    w.add_tensor("short", [4], tg.GGMLType.F32, lambda: b"\0" * 12)
    with pytest.raises(ValueError, match="producer gave 12 bytes"):
        w.write()
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()
    with pytest.raises(ValueError, match="power of two"):
        tg.GGUFWriter(tmp_path / "x.gguf", alignment=12)


def test_custom_alignment_is_recorded_and_respected(tmp_path):
    w = tg.GGUFWriter(tmp_path / "a.gguf", alignment=64)
    w.add_tensor("a", [3], tg.GGMLType.F32, lambda: np.ones(3, np.float32).tobytes())
    w.add_tensor("b", [5], tg.GGMLType.F32, lambda: np.arange(5, dtype=np.float32).tobytes())
    r = gguf.GGUFReader(str(w.write()))
    assert r.fields["general.alignment"].contents() == 64
    offs = [t.data_offset for t in r.tensors]
    assert all(o % 64 == 0 for o in offs)
    np.testing.assert_array_equal(np.asarray(r.tensors[1].data), np.arange(5, dtype=np.float32))
