# SPDX-License-Identifier: Apache-2.0
"""tidal's GGUF reader (core/checkpoint/gguf_reader.cpp, via tidal.gguf.read): files written by
tidal's writer and by the converter read back exactly; every damaged or hostile header is a
tidal.FormatError naming the file, never a crash, a hang or a huge allocation."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import tidal
from conftest import MINI
from tidal import gguf as tg


def _sample(path):
    w = tg.GGUFWriter(path)
    w.add("general.architecture", "qwen35moe")
    w.add("u8", 7, tg.U8)
    w.add("i8", -7, tg.I8)
    w.add("u16", 65535, tg.U16)
    w.add("i16", -300, tg.I16)
    w.add("u32", 4000000000, tg.U32)
    w.add("i32", -5, tg.I32)
    w.add("f32", 0.5, tg.F32)
    w.add("bool", True, tg.BOOL)
    w.add("u64", 2**63 + 5, tg.U64)
    w.add("i64", -(2**40), tg.I64)
    w.add("f64", 1e-300, tg.F64)
    w.add("text", "ünï", tg.STR)
    w.add("strings", ["a", "", "<|x|>"], tg.ARR, tg.STR)
    w.add("bools", [True, False], tg.ARR, tg.BOOL)
    w.add("i32s", [11, -11, 10, 0], tg.ARR, tg.I32)
    w.add("empty", [], tg.ARR, tg.F32)
    arrays = {}
    for i, (name, shape, gtype) in enumerate([("a", [3, 5], tg.GGMLType.F32), ("b", [2, 64], tg.GGMLType.BF16),
                                             ("c", [4, 3, 64], tg.GGMLType.Q8_0), ("d", [2, 512], tg.GGMLType.Q4_K)]):
        a = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        arrays[name] = (shape, gtype, tg.quantize(a, gtype))
        w.add_tensor(name, shape, gtype, lambda b=arrays[name][2]: b)
    return w.write(), arrays


def test_reads_back_what_the_writer_wrote(tmp_path):
    path, arrays = _sample(tmp_path / "s.gguf")
    info = tg.read(path)
    assert info.version == 3 and info.alignment == 32 and info.data_offset % 32 == 0
    m = info.metadata
    assert (m["u8"], m["i8"], m["u16"], m["i16"], m["u32"], m["i32"]) == (7, -7, 65535, -300, 4000000000, -5)
    assert m["f32"] == 0.5 and m["bool"] is True and m["u64"] == 2**63 + 5 and m["i64"] == -(2**40)
    assert m["f64"] == 1e-300 and m["text"] == "ünï"
    assert m["strings"] == ["a", "", "<|x|>"] and m["bools"] == [True, False] and m["i32s"] == [11, -11, 10, 0]
    assert m["empty"] == []
    assert info.types["u16"] == "u16" and info.types["strings"] == "array[string]" and info.types["f64"] == "f64"
    raw = path.read_bytes()
    assert [t["name"] for t in info.tensors] == list(arrays)
    for t in info.tensors:
        shape, gtype, data = arrays[t["name"]]
        assert t["shape"] == shape and t["type"] == gtype and t["nbytes"] == len(data)
        start = info.data_offset + t["offset"]
        assert raw[start:start + t["nbytes"]] == data


def test_matches_the_gguf_package_on_a_converted_model(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the `gguf` package (pip install gguf) is the reference reader")
    path = tg.convert(MINI, tmp_path / "mini.gguf", expert_type="q8_0", workers=1, progress=False)
    ours = tg.read(path)
    ref = gguf.GGUFReader(str(path))
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert a["name"] == b.name and a["type"] == int(b.tensor_type)
        assert a["shape"] == [int(x) for x in b.shape][::-1]
        assert ours.data_offset + a["offset"] == b.data_offset and a["nbytes"] == b.n_bytes
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()


# ---- damaged and hostile files ----------------------------------------------------------------


def _header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name=b"t", ne=(32,), gtype=0, offset=0):
    return _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", gtype, offset)


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 32)


CASES = {
    "bad magic": (_header(magic=b"GGUG"), "not a GGUF file"),
    "version 1": (_header(version=1), "version 1"),
    "version 4": (_header(version=4), "version 4"),
    "huge tensor count": (_header(n_tensors=2**60), "tensor count"),
    "huge metadata count": (_header(n_kv=2**62), "metadata count"),
    "huge string": (_header(n_kv=1) + struct.pack("<Q", 2**63) + b"abc", "length"),
    "unknown value type": (_header(n_kv=1) + _kv(b"k", 13, b"\0" * 8), "unknown value type 13"),
    "nested array": (_header(n_kv=1) + _kv(b"k", 9, struct.pack("<IQ", 9, 1) + b"\0" * 16), "element type 9"),
    "huge array": (_header(n_kv=1) + _kv(b"k", 9, struct.pack("<IQ", 4, 2**61)), "array length"),
    "bool byte 2": (_header(n_kv=1) + _kv(b"k", 7, b"\x02"), "bool byte 2"),
    "duplicate key": (_header(n_kv=2) + _kv(b"k", 4, b"\0" * 4) * 2, "appears twice"),
    "empty key": (_header(n_kv=1) + _kv(b"", 4, b"\0" * 4), "empty"),
    "bad alignment": (_header(n_kv=1) + _kv(b"general.alignment", 4, struct.pack("<I", 48)), "power of two"),
    "alignment not u32": (_header(n_kv=1) + _kv(b"general.alignment", 10, struct.pack("<Q", 32)), "power of two"),
    "zero dims": (_header(n_tensors=1) + _s(b"t") + struct.pack("<I", 0) + b"\0" * 32, "0 dimensions"),
    "five dims": (_header(n_tensors=1) + _tensor(ne=(1, 1, 1, 1, 1)), "5 dimensions"),
    "negative dim": (_header(n_tensors=1) + _tensor(ne=(32, -1)), "dimension 1 = -1"),
    "overflowing dims": (_header(n_tensors=1) + _tensor(ne=(2**32, 2**32, 2**32)), "dimension 1 = 4294967296"),
    "key not UTF-8": (_header(n_kv=1) + _kv(b"k\xff", 4, b"\0" * 4), "not UTF-8"),
    "name not UTF-8": (_header(n_tensors=1) + _tensor(name=b"\xc3("), "not UTF-8"),
    "unknown tensor type": (_header(n_tensors=1) + _tensor(gtype=77), "ggml type 77"),
    "row not a block multiple": (_header(n_tensors=1) + _tensor(ne=(33,), gtype=8), "multiple of the 32-value"),
    "misaligned offset": (_header(n_tensors=1) + _tensor(offset=4), "not a multiple of the alignment"),
    "duplicate tensor": (_header(n_tensors=2) + _tensor() + _tensor(), "appears twice"),
    "tensor past the end": (_pad(_header(n_tensors=1) + _tensor(ne=(32,), gtype=0)) + b"\0" * 64, "ends past"),
    "huge tensor": (_pad(_header(n_tensors=1) + _tensor(ne=(2**40, 2**20), gtype=0)), "ends past|too large"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_headers_are_clear_errors(tmp_path, case):
    data, msg = CASES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + (b"\0" * 64 if case != "tensor past the end" else b""))  # room for the counts
    with pytest.raises(tidal.FormatError, match=msg) as e:
        tg.read(path)
    assert "bad.gguf" in str(e.value)


def test_every_truncation_is_a_clear_error(tmp_path):
    path, _ = _sample(tmp_path / "s.gguf")
    raw = path.read_bytes()
    info = tg.read(path)
    cut_points = list(range(0, info.data_offset + 1, 3)) + [len(raw) - 1, len(raw) - 100]
    for n in cut_points:
        p = tmp_path / "cut.gguf"
        p.write_bytes(raw[:n])
        with pytest.raises(tidal.FormatError, match="cut.gguf"):
            tg.read(p)


def test_random_corruption_never_crashes(tmp_path):
    """A cheap in-CI cousin of the libFuzzer harness: 3000 files with random bytes overwritten
    either parse or raise tidal.FormatError."""
    path, _ = _sample(tmp_path / "s.gguf")
    raw = bytearray(path.read_bytes())
    info = tg.read(path)
    rng = np.random.default_rng(0)
    p = tmp_path / "m.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, info.data_offset))
            b[i] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            tg.read(p)
            outcomes["ok"] += 1
        except tidal.FormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 100, outcomes


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.read(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="directory"):
        tg.read(tmp_path)


def test_version_2_reads_like_version_3(tmp_path):
    path, arrays = _sample(tmp_path / "s.gguf")
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)  # v2 has the same layout (64-bit counts and lengths)
    p2 = tmp_path / "v2.gguf"
    p2.write_bytes(bytes(raw))
    a, b = tg.read(path), tg.read(p2)
    assert b.version == 2 and a.tensors == b.tensors and a.metadata == b.metadata


def test_special_values_survive(tmp_path):
    body = (_kv(b"nan", 6, struct.pack("<f", float("nan"))) + _kv(b"inf", 12, struct.pack("<d", float("-inf")))
            + _kv(b"raw", 8, _s(b"\xff\xfe")) + _kv(b"big", 10, struct.pack("<Q", 2**64 - 1)))
    p = tmp_path / "special.gguf"
    p.write_bytes(_pad(_header(n_kv=4) + body))
    m = tg.read(p).metadata
    assert np.isnan(m["nan"]) and m["inf"] == float("-inf")
    assert m["raw"] == b"\xff\xfe"  # not UTF-8: kept as bytes, not replaced
    assert m["big"] == 2**64 - 1
    bad = tmp_path / "align.gguf"
    bad.write_bytes(_header(n_kv=1) + _kv(b"general.alignment", 8, _s(b"\xff")) + b"\0" * 64)
    with pytest.raises(tidal.FormatError, match="power of two"):
        tg.read(bad)
