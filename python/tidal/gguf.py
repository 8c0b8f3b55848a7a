# SPDX-License-Identifier: Apache-2.0
"""GGUF v3 files: tidal's own writer, the block quantisers it needs, and a Hugging Face -> GGUF converter.

    python -m tidal.gguf MODEL_DIR OUT.gguf [--expert-type q4_k|q8_0|bf16] [--dense-type bf16|f16|f32|q8_0]

The converter writes a checkpoint (config.json + safetensors, e.g. one made by `tidal.synth`) in the
layout llama.cpp loads for these architectures (`qwen35moe`, `qwen3next`, `qwen3moe`), so that the
same model can be run by llama.cpp and by tidal (`tests/bench/run_device_llama_cpp.sh`). Routed
experts take `--expert-type` (Q4_K: the INT4 class, Q8_0: the INT8 class); the other matrices take
`--dense-type` (BF16 by default, like tidal's GPU-resident weights); norms and small vectors stay F32.

Format (ggml/src/gguf.cpp, ggml/docs/gguf.md): little-endian; magic "GGUF", version 3, tensor count,
metadata count; metadata as (key, type, value); tensor infos as (name, n_dims, ne[0..n), type,
offset); padding to `general.alignment` (32); tensor data, each tensor aligned. `ne[0]` is the
innermost (contiguous) dimension, so a row-major numpy array of shape (a, b, c) has ne = (c, b, a).

Block formats written here (ggml/src/ggml-common.h):
- Q8_0: 32 weights per block: fp16 scale d, 32 int8 q; w = d * q.
- Q4_K: 256 weights per block in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes holding 6-bit
  sub-block scales and mins, 128 bytes of 4-bit q; w = d * sc[j] * q - dmin * m[j].
The quantisers are straightforward min/max fits (not llama.cpp's iterative search): their error is
bounded and tested (tests/python/test_gguf.py), and the `gguf` package on PyPI reads the files back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import struct
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

__all__ = [
    "GGMLType", "GGUFWriter", "GGUFInfo", "read", "quantize", "dequantize", "type_size", "convert", "main",
    "U8", "I8", "U16", "I16", "U32", "I32", "F32", "BOOL", "STR", "U64", "I64", "F64",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.h: enum gguf_type).
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
               U64: "<Q", I64: "<q", F64: "<d"}


class GGMLType:
    """ggml tensor types tidal writes (ggml.h: enum ggml_type) with (block size, bytes per block)."""
    F32, F16, Q4_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 8, 12, 14, 30  # noqa: N815
    NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
             12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 16: "IQ2_XXS", 20: "IQ4_NL", 23: "IQ4_XS", 30: "BF16"}
    BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84),
             11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 16: (256, 66), 20: (32, 18),
             23: (256, 136),
             30: (1, 2)}

    @classmethod
    def parse(cls, name: str) -> int:
        key = name.upper()
        for k, v in cls.NAMES.items():
            if v == key:
                return k
        raise ValueError(f"unknown GGUF tensor type {name!r}; tidal writes {', '.join(cls.NAMES.values())}")


def type_size(ggml_type: int, shape: Iterable[int]) -> int:
    """Bytes of a tensor of numpy `shape` in `ggml_type`; the last dimension must fill whole blocks."""
    shape = [int(s) for s in shape]
    block, nbytes = GGMLType.BLOCK[ggml_type]
    if shape and shape[-1] % block:
        raise ValueError(f"{GGMLType.NAMES[ggml_type]} needs rows that are a multiple of {block} values; "
                         f"shape {shape} has rows of {shape[-1]}")
    return math.prod(shape) // block * nbytes


# ----------------------------------------------------------------------------------------------------
# Quantisers (float32 rows -> block bytes) and their inverses.


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    d = _f16(amax / 127.0)
    df = d.astype(np.float32)
    inv = np.divide(1.0, df, out=np.zeros_like(df), where=df > 0)
    q = np.clip(np.rint(b * inv[:, None]), -127, 127).astype(np.int8)
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def _dq8_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return d * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 8, 32)
    nb = b.shape[0]
    lo = np.minimum(b.min(axis=2), 0.0)  # sub-block minimum, kept <= 0 (so m >= 0)
    hi = b.max(axis=2)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(axis=1) / 63.0)
    dmin = _f16(mins.max(axis=1) / 63.0)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    inv_d = np.divide(1.0, df, out=np.zeros_like(df), where=df > 0)
    inv_dmin = np.divide(1.0, dminf, out=np.zeros_like(dminf), where=dminf > 0)
    sc = np.clip(np.rint(scale * inv_d[:, None]), 0, 63).astype(np.uint8)
    mq = np.clip(np.rint(mins * inv_dmin[:, None]), 0, 63).astype(np.uint8)
    step = df[:, None] * sc  # effective sub-block scale and offset, as the decoder computes them
    off = dminf[:, None] * mq
    inv_step = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    q = np.clip(np.rint((b + off[:, :, None]) * inv_step[:, :, None]), 0, 15).astype(np.uint8)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(-1, 2)
    # 12 scale bytes (ggml-quants.c get_scale_min_k4): bytes 0-3 scales 0-3 (+ top bits of 4-7),
    # bytes 4-7 mins 0-3 (+ top bits of mins 4-7), bytes 8-11 low nibbles of scales/mins 4-7.
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mq[:, :4] & 63) | ((mq[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((mq[:, 4:] & 15) << 4)
    # 4 groups of 32 bytes: low nibble = sub-block 2g, high nibble = sub-block 2g+1.
    qq = q.reshape(nb, 4, 2, 32)
    out[:, 16:] = (qq[:, :, 0, :] | (qq[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q4_0(x: np.ndarray) -> np.ndarray:
    """ggml's Q4_0: the element of largest magnitude maps to -8 (d = extreme / -8), q = x/d + 8."""
    b = x.reshape(-1, 32)
    idx = np.abs(b).argmax(axis=1)
    d = _f16(b[np.arange(b.shape[0]), idx] / -8.0)
    df = d.astype(np.float32)
    inv = np.divide(1.0, df, out=np.zeros_like(df), where=df != 0)
    q = np.clip(np.rint(b * inv[:, None]) + 8, 0, 15).astype(np.uint8)
    out = np.empty((b.shape[0], 18), np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def _q6_k(x: np.ndarray) -> np.ndarray:
    """ggml's Q6_K: 16 sub-blocks of 16 with int8 scales (times one fp16 d per 256), 6-bit values."""
    b = x.reshape(-1, 16, 16)
    nb = b.shape[0]
    idx = np.abs(b).argmax(axis=2)
    extreme = np.take_along_axis(b, idx[:, :, None], axis=2)[:, :, 0]
    scale = extreme / -32.0                              # sub-block scale: the extreme maps to -32
    big = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = _f16(big / -128.0)
    df = d.astype(np.float32)
    inv_d = np.divide(1.0, df, out=np.zeros_like(df), where=df != 0)
    sc = np.clip(np.rint(scale * inv_d[:, None]), -128, 127).astype(np.int8)
    step = df[:, None] * sc.astype(np.float32)
    inv = np.divide(1.0, step, out=np.zeros_like(step), where=step != 0)
    q = (np.clip(np.rint(b * inv[:, :, None]), -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 4, 32)
    out = np.empty((nb, 210), np.uint8)
    # Per half h (128 values, 4 parts of 32): ql[h*64 + L] = part0 | part2 << 4,
    # ql[h*64 + 32 + L] = part1 | part3 << 4, qh[h*32 + L] = high bits of parts 0..3 at bits 0,2,4,6.
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out[:, :128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return out


def _dq4_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(nb)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(nb)
    s = blocks[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1).astype(np.float32)
    mq = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1).astype(np.float32)
    qs = blocks[:, 16:].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * mq[:, :, None]).reshape(nb, 256)


def quantize(x: np.ndarray, ggml_type: int) -> bytes:
    """Row-major float values -> the bytes of `ggml_type` (rows must fill whole blocks)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    type_size(ggml_type, x.shape)  # checks the block multiple
    if not np.isfinite(x).all():
        raise ValueError("cannot quantise non-finite values (NaN or Inf)")
    if ggml_type == GGMLType.F32:
        return x.tobytes()
    if ggml_type == GGMLType.F16:
        return x.astype(np.float16).tobytes()
    if ggml_type == GGMLType.BF16:
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    if ggml_type == GGMLType.Q8_0:
        return _q8_0(x).tobytes()
    if ggml_type == GGMLType.Q4_K:
        return _q4_k(x).tobytes()
    if ggml_type == GGMLType.Q4_0:
        return _q4_0(x).tobytes()
    if ggml_type == GGMLType.Q6_K:
        return _q6_k(x).tobytes()
    raise ValueError(f"tidal cannot quantise to {GGMLType.NAMES.get(ggml_type, ggml_type)}")


def dequantize(data: bytes | np.ndarray, ggml_type: int, shape: Iterable[int]) -> np.ndarray:
    """Inverse of `quantize`: float32 array of numpy `shape`."""
    shape = [int(s) for s in shape]
    raw = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if raw.size != type_size(ggml_type, shape):
        raise ValueError(f"{GGMLType.NAMES[ggml_type]} tensor of shape {shape} needs "
                         f"{type_size(ggml_type, shape)} bytes, got {raw.size}")
    if ggml_type == GGMLType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ggml_type == GGMLType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, nbytes = GGMLType.BLOCK[ggml_type]
    blocks = raw.reshape(-1, nbytes)
    if ggml_type == GGMLType.Q8_0:
        return _dq8_0(blocks).reshape(shape)
    if ggml_type == GGMLType.Q4_K:
        return _dq4_k(blocks).reshape(shape)
    if ggml_type in (GGMLType.Q4_0, GGMLType.Q6_K):  # decoded by tidal's C++ decoder
        from . import _tidal

        return np.asarray(_tidal.decode_ggml(raw.tobytes(), ggml_type, math.prod(shape))).reshape(shape)
    raise ValueError(f"tidal cannot dequantise {GGMLType.NAMES.get(ggml_type, ggml_type)}")


# ----------------------------------------------------------------------------------------------------
# Writer


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _infer_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, np.integer)):
        return U32 if 0 <= value < 2**32 else I64
    if isinstance(value, (float, np.floating)):
        return F32
    if isinstance(value, str):
        return STR
    if isinstance(value, (list, tuple, np.ndarray)):
        return ARR
    raise TypeError(f"GGUF metadata cannot hold a {type(value).__name__}")


def _pack_value(value: Any, vtype: int, elem: int | None = None) -> bytes:
    if vtype == STR:
        return _pack_string(str(value))
    if vtype == ARR:
        items = list(value) if not isinstance(value, np.ndarray) else value
        if elem is None:
            elem = _infer_type(items[0]) if len(items) else I32
            if elem == U32 and any(int(v) < 0 for v in items):
                elem = I32
        head = struct.pack("<IQ", elem, len(items))
        if elem == STR:
            return head + b"".join(_pack_string(s) for s in items)
        if elem == ARR:
            raise TypeError("nested GGUF arrays are not written by tidal")
        return head + np.asarray(items, dtype=np.dtype(_SCALAR_FMT[elem])).tobytes()
    return struct.pack(_SCALAR_FMT[vtype], value)


class GGUFWriter:
    """Streams a GGUF v3 file: metadata and tensor infos first, then each tensor's bytes from its
    producer (so a file larger than RAM can be written)."""

    def __init__(self, path: str | os.PathLike, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment < 8 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 8, got {alignment}")
        self.path = pathlib.Path(path)
        self.alignment = alignment
        self.kv: list[tuple[str, int, Any, int | None]] = []
        self.tensors: list[tuple[str, list[int], int, Callable[[], Iterator[bytes]]]] = []
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, U32)

    def add(self, key: str, value: Any, vtype: int | None = None, elem: int | None = None) -> None:
        """One metadata entry; `vtype` (and `elem` for arrays) default to the value's natural type."""
        if any(k == key for k, *_ in self.kv):
            raise ValueError(f"duplicate GGUF metadata key {key!r}")
        self.kv.append((key, _infer_type(value) if vtype is None else vtype, value, elem))

    def add_tensor(self, name: str, shape: Iterable[int], ggml_type: int,
                   produce: Callable[[], Iterator[bytes] | bytes]) -> None:
        """A tensor of numpy `shape`; `produce()` returns its bytes (or an iterator of chunks)."""
        shape = [int(s) for s in shape]
        if len(name.encode()) >= 64:
            raise ValueError(f"GGUF tensor names are < 64 bytes: {name!r}")
        if any(t[0] == name for t in self.tensors):
            raise ValueError(f"duplicate GGUF tensor {name!r}")
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"GGUF tensors have 1 to 4 dimensions; {name} has shape {shape}")
        type_size(ggml_type, shape)
        self.tensors.append((name, shape, ggml_type, produce))

    def _header(self) -> tuple[bytes, list[int]]:
        out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.kv))]
        for key, vtype, value, elem in self.kv:
            out += [_pack_string(key), struct.pack("<I", vtype), _pack_value(value, vtype, elem)]
        offsets, off = [], 0
        for name, shape, gtype, _ in self.tensors:
            ne = shape[::-1]
            out += [_pack_string(name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                    struct.pack("<IQ", gtype, off)]
            offsets.append(off)
            off += type_size(gtype, shape)
            off += -off % self.alignment
        head = b"".join(out)
        return head + b"\0" * (-len(head) % self.alignment), offsets

    def total_bytes(self) -> int:
        head, _ = self._header()
        off = 0
        for _, shape, gtype, _ in self.tensors:
            off += type_size(gtype, shape)
            off += -off % self.alignment
        return len(head) + off

    def write(self, progress: Callable[[int], None] | None = None) -> pathlib.Path:
        """Write the file (to a temporary name, renamed when complete)."""
        head, _ = self._header()
        tmp = self.path.with_name(self.path.name + ".partial")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                for name, shape, gtype, produce in self.tensors:
                    want = type_size(gtype, shape)
                    got = 0
                    data = produce()
                    for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                        f.write(chunk)
                        got += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    if got != want:
                        raise ValueError(f"tensor {name}: producer gave {got} bytes, {GGMLType.NAMES[gtype]} "
                                         f"of shape {shape} needs {want}")
                    f.write(b"\0" * (-got % self.alignment))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.path


# ----------------------------------------------------------------------------------------------------
# Reader (the C++ parser of core/checkpoint/gguf_reader.cpp: every field bounded by the file)


class GGUFInfo:
    """A parsed GGUF file: version, alignment, metadata (with each key's GGUF type) and tensor
    infos (name, ggml type, numpy shape, offset in the data section, bytes)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.version: int = raw["version"]
        self.alignment: int = raw["alignment"]
        self.data_offset: int = raw["data_offset"]
        self.metadata: dict[str, Any] = dict(raw["metadata"])
        self.types: dict[str, str] = dict(raw["types"])
        self.tensors: list[dict[str, Any]] = list(raw["tensors"])

    def tensor(self, name: str) -> dict[str, Any]:
        for t in self.tensors:
            if t["name"] == name:
                return t
        raise KeyError(f"GGUF file has no tensor {name!r}")


def read(path: str | os.PathLike) -> GGUFInfo:
    """Parse a GGUF file's header, metadata and tensor infos. A file that is not valid GGUF (bad
    magic or version, truncated, counts or sizes that cannot fit the file, unknown types, misaligned
    or overlapping-the-end tensors) raises tidal.FormatError (a ValueError) naming the file and the
    key or tensor."""
    from . import _tidal

    return GGUFInfo(_tidal.read_gguf(os.fspath(path)))


_VTYPES = {"u8": U8, "i8": I8, "u16": U16, "i16": I16, "u32": U32, "i32": I32, "f32": F32, "bool": BOOL,
           "string": STR, "u64": U64, "i64": I64, "f64": F64}


def split(path: str | os.PathLike, parts: int) -> list[pathlib.Path]:
    """Write `path` as `parts` files `<stem>-0000K-of-0000N.gguf` next to it, as llama.cpp's gguf-split
    does: every metadata entry in the first part, split.no / split.count / split.tensors.count in each,
    the tensors in order, in contiguous groups."""
    path = pathlib.Path(path)
    info = read(path)
    n = len(info.tensors)
    if not 1 <= parts <= max(1, n):
        raise ValueError(f"cannot split {n} tensors into {parts} parts")
    data = np.memmap(path, np.uint8, mode="r")
    out = []
    for k in range(parts):
        name = path.with_name(f"{path.stem}-{k + 1:05d}-of-{parts:05d}.gguf")
        w = GGUFWriter(name, alignment=info.alignment)
        if k == 0:
            for key, value in info.metadata.items():
                if key in ("general.alignment",) or key.startswith("split."):
                    continue
                t = info.types[key]
                if t.startswith("array["):
                    w.add(key, value, ARR, _VTYPES[t[6:-1]])
                else:
                    w.add(key, value, _VTYPES[t])
        w.add("split.no", k, U16)
        w.add("split.count", parts, U16)
        w.add("split.tensors.count", n, I32)
        for t in info.tensors[k * n // parts:(k + 1) * n // parts]:
            start = info.data_offset + t["offset"]
            w.add_tensor(t["name"], t["shape"], t["type"],
                         lambda s=start, e=start + t["nbytes"]: bytes(data[s:e]))
        w.write()
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------
# Hugging Face checkpoint -> GGUF (llama.cpp's names and metadata for the Qwen MoE architectures)


class _Checkpoint:
    """Memory-mapped safetensors tensors of a checkpoint directory (single file or sharded)."""

    _DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}

    def __init__(self, path: pathlib.Path) -> None:
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            [p.name for p in sorted(path.glob("*.safetensors"))]
        if not files:
            raise FileNotFoundError(f"{path}: no safetensors files")
        self.entries: dict[str, tuple[pathlib.Path, str, list[int], int]] = {}
        for name in files:
            fp = path / name
            with open(fp, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    # Multimodal checkpoints keep the text model under model.language_model.
                    k = k.replace("model.language_model.", "model.", 1)
                    self.entries[k] = (fp, v["dtype"], v["shape"], 8 + n + v["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][2])

    def get(self, name: str, index: Any = None) -> np.ndarray:
        """float32 copy of a tensor (or of `tensor[index]`, read without touching the rest)."""
        if name not in self.entries:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        fp, dtype, shape, off = self.entries[name]
        if dtype not in self._DTYPES:
            raise NotImplementedError(f"{name}: dtype {dtype} is not converted to GGUF by tidal")
        m = np.memmap(fp, dtype=self._DTYPES[dtype], mode="r", offset=off, shape=tuple(shape))
        a = np.asarray(m if index is None else m[index])
        if dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)


_ARCH = {"qwen3_5_moe_text": "qwen35moe", "qwen3_5_moe": "qwen35moe", "qwen3_next": "qwen3next",
         "qwen3_moe": "qwen3moe"}
# The Qwen2 pre-tokenizer regex (tokenizer.json); llama.cpp calls it "qwen2".
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# GGUF file types (llama.h: llama_ftype), a label llama.cpp prints: by the routed experts' type.
_FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q8_0: 7, GGMLType.Q4_K: 15,
              GGMLType.BF16: 32}


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    if "text_config" in cfg:  # multimodal wrapper (Qwen3_5MoeForConditionalGeneration)
        return {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg["model_type"])}
    return cfg


def _metadata(cfg: dict[str, Any], arch: str, n_vocab: int) -> list[tuple[str, Any, int, int | None]]:
    """llama.cpp metadata (key, value, type, array element type) for `cfg` (llama.cpp's loaders in
    src/models/{qwen35moe,qwen3next,qwen3moe}.cpp; values as its converter derives them)."""
    n = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kv: list[tuple[str, Any, int, int | None]] = [
        (f"{arch}.block_count", n, U32, None),
        (f"{arch}.context_length", cfg["max_position_embeddings"], U32, None),
        (f"{arch}.embedding_length", cfg["hidden_size"], U32, None),
        (f"{arch}.attention.head_count", cfg["num_attention_heads"], U32, None),
        (f"{arch}.attention.head_count_kv", cfg["num_key_value_heads"], U32, None),
        (f"{arch}.attention.key_length", head_dim, U32, None),
        (f"{arch}.attention.value_length", head_dim, U32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(cfg["rms_norm_eps"]), F32, None),
        (f"{arch}.rope.freq_base", float(theta), F32, None),
        (f"{arch}.expert_count", cfg["num_experts"], U32, None),
        (f"{arch}.expert_used_count", cfg["num_experts_per_tok"], U32, None),
        (f"{arch}.expert_feed_forward_length", cfg["moe_intermediate_size"], U32, None),
        (f"{arch}.vocab_size", n_vocab, U32, None),
    ]
    if cfg.get("intermediate_size"):
        kv.append((f"{arch}.feed_forward_length", cfg["intermediate_size"], U32, None))
    if arch == "qwen3moe":
        return kv
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % cfg.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(n)]
    kv += [
        (f"{arch}.expert_shared_feed_forward_length", cfg["shared_expert_intermediate_size"], U32, None),
        (f"{arch}.rope.dimension_count", int(head_dim * partial), U32, None),
        (f"{arch}.ssm.conv_kernel", cfg["linear_conv_kernel_dim"], U32, None),
        (f"{arch}.ssm.state_size", cfg["linear_key_head_dim"], U32, None),
        (f"{arch}.ssm.group_count", cfg["linear_num_key_heads"], U32, None),
        (f"{arch}.ssm.time_step_rank", cfg["linear_num_value_heads"], U32, None),
        (f"{arch}.ssm.inner_size", cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"], U32, None),
        (f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in types], ARR, BOOL),
        (f"{arch}.full_attention_interval", cfg.get("full_attention_interval", 4), U32, None),
    ]
    if arch == "qwen35moe":
        sections = list(rope.get("mrope_section") or [11, 11, 10])
        kv.append((f"{arch}.rope.dimension_sections", (sections + [0, 0, 0, 0])[:4], ARR, I32))
    return kv


# generation_config.json sampling defaults <-> GGUF general.sampling.* (gguf-py: Keys.General.SAMPLING_*).
SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                 "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                 "repetition_penalty": "general.sampling.penalty_repeat"}


def _sampling(model_dir: pathlib.Path) -> list[tuple[str, Any, int, int | None]]:
    p = model_dir / "generation_config.json"
    gen = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    if not gen.get("do_sample"):
        return []
    return [(key, gen[name], I32 if name == "top_k" else F32, None) for name, key in SAMPLING_KEYS.items()
            if isinstance(gen.get(name), (int, float)) and not isinstance(gen.get(name), bool)]


def _tokenizer(model_dir: pathlib.Path, cfg: dict[str, Any], n_vocab: int) -> list[tuple[str, Any, int, int | None]]:
    """Tokenizer metadata: the checkpoint's byte-level BPE tokenizer.json as llama.cpp's "gpt2" model,
    or "none" (ids only: enough for llama-bench, which feeds random ids) when there is none."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return [("tokenizer.ggml.model", "none", STR, None)]
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise NotImplementedError(f"{path}: only byte-level BPE tokenizers are converted (this one is "
                                  f"{model.get('type')!r})")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [1] * n_vocab  # 1: normal, 3: control, 5: unused
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4  # control / user-defined
    for i, t in enumerate(tokens):
        if t.startswith("[PAD") and t == f"[PAD{i}]":
            types[i] = 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    is_qwen2 = json.dumps(_QWEN2_REGEX)[1:-1] in pre
    chat = None
    if (model_dir / "chat_template.jinja").is_file():
        chat = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (model_dir / "tokenizer_config.json").is_file():
        chat = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    kv = [("tokenizer.ggml.model", "gpt2", STR, None),
          ("tokenizer.ggml.pre", "qwen2" if is_qwen2 or not cfg["model_type"].startswith("qwen3_5") else "qwen35",
           STR, None),
          ("tokenizer.ggml.tokens", tokens, ARR, STR), ("tokenizer.ggml.token_type", types, ARR, I32),
          ("tokenizer.ggml.merges", merges, ARR, STR), ("tokenizer.ggml.add_bos_token", False, BOOL, None)]
    for key, cfg_key in (("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id"),
                         ("bos_token_id", "bos_token_id")):
        v = cfg.get(cfg_key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < n_vocab:
            kv.append((f"tokenizer.ggml.{key}", v, U32, None))
    if isinstance(chat, str):
        kv.append(("tokenizer.chat_template", chat, STR, None))
    norm = (tok.get("normalizer") or {}).get("type")
    kv.append(("tidal.tokenizer.normalizer", norm if norm == "NFC" else "none", STR, None))
    return kv


# Value transforms (llama.cpp's converter, conversion/qwen.py): run in worker processes, so plain
# functions of (array, config).
def _v_reorder(x: np.ndarray, cfg: dict[str, Any], axis: int, head: int) -> np.ndarray:
    """Qwen3.5 DeltaNet value heads, grouped per key head in HF ([k0: v0 v1][k1: v2 v3]) -> tiled as
    llama.cpp's kernels index them ([v0 v2][v1 v3]). No-op when key and value heads are as many."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if cfg["model_type"] == "qwen3_next" or nk == nv:
        return x
    x = np.moveaxis(x, axis, 0)
    rest = x.shape[1:]
    x = x.reshape(nk, nv // nk, head, *rest).swapaxes(0, 1).reshape(nk * (nv // nk) * head, *rest)
    return np.moveaxis(x, 0, axis)


def _transform(kind: str, x: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    nk, dk = cfg.get("linear_num_key_heads", 0), cfg.get("linear_key_head_dim", 0)
    dv = cfg.get("linear_value_head_dim", 0)
    if kind == "plus_one":
        return x + 1.0
    if kind == "neg_exp":
        return _v_reorder(-np.exp(x), cfg, 0, 1)
    if kind == "v_rows1":
        return _v_reorder(x, cfg, 0, 1)
    if kind == "v_rows":
        return _v_reorder(x, cfg, 0, dv)
    if kind == "v_cols":
        return _v_reorder(x, cfg, 1, dv)
    if kind in ("qkv", "conv"):
        if kind == "conv":
            x = x.reshape(x.shape[0], x.shape[-1])
        return np.concatenate([x[: 2 * nk * dk], _v_reorder(x[2 * nk * dk:], cfg, 0, dv)], axis=0)
    if kind in ("next_qkv", "next_z"):  # Qwen3-Next in_proj_qkvz: per key head [q k v z] -> q|k|v and z
        r = cfg["linear_num_value_heads"] // nk
        g = x.reshape(nk, 2 * dk + 2 * r * dv, x.shape[-1])
        if kind == "next_z":
            return g[:, 2 * dk + r * dv:].reshape(-1, x.shape[-1])
        return np.concatenate([g[:, :dk].reshape(-1, x.shape[-1]), g[:, dk:2 * dk].reshape(-1, x.shape[-1]),
                               g[:, 2 * dk:2 * dk + r * dv].reshape(-1, x.shape[-1])], axis=0)
    raise AssertionError(kind)


_WORKER: dict[str, Any] = {}


def _job(args: tuple[Any, ...]) -> bytes:
    """One unit of conversion work: read (a slice of) a tensor, transform it, encode it."""
    model_dir, name, index, kind, gtype, cfg = args
    if name.startswith("synth:"):  # experts of a pre-packed tidal.synth checkpoint: regenerate them
        from .synth import expert_layer

        layer, e = index
        gu, dn = expert_layer(cfg, layer, cfg["tidal_synth"]["seed"], experts=[e])
        inter = cfg["moe_intermediate_size"]
        bits = {"synth:gate": gu[0, :inter], "synth:up": gu[0, inter:], "synth:down": dn[0]}[name]
        return quantize((bits.astype(np.uint32) << 16).view(np.float32), gtype)
    ck = _WORKER.get(model_dir)
    if ck is None:
        ck = _WORKER[model_dir] = _Checkpoint(pathlib.Path(model_dir))
    x = ck.get(name, index)
    if kind:
        x = _transform(kind, x, cfg)
    return quantize(x, gtype)


class _Out:
    """One GGUF tensor: its jobs (each a slice of an HF tensor, in order) and type."""

    def __init__(self, name: str, shape: list[int], gtype: int, jobs: list[tuple[str, Any, str | None]]) -> None:
        self.name, self.shape, self.gtype, self.jobs = name, shape, gtype, jobs


def _plan_tensors(ck: _Checkpoint, cfg: dict[str, Any], arch: str, expert_type: int,
                  dense_type: int) -> list[_Out]:
    H, E, I = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
    hybrid = arch != "qwen3moe"
    outs: list[_Out] = []

    def has(name: str) -> bool:
        return name in ck

    def shape(name: str) -> list[int]:
        return ck.shape(name)

    def matrix_type(want: int, row: int) -> int:
        # Rows that do not fill whole blocks of `want` fall back to Q8_0, then to F16 (llama.cpp's
        # quantiser makes the same kind of fallback).
        for t in (want, GGMLType.Q8_0, GGMLType.F16):
            if row % GGMLType.BLOCK[t][0] == 0:
                return t
        return GGMLType.F32

    def add(gguf: str, hf: str, kind: str | None = None, gtype: int | None = None,
            out_shape: list[int] | None = None) -> None:
        if not has(hf):
            raise FileNotFoundError(f"checkpoint has no tensor {hf!r} (needed for {gguf})")
        s = out_shape or shape(hf)
        if gtype is None:
            small = len(s) == 1 or gguf.endswith("norm.weight") or "ffn_gate_inp" in gguf or "ssm_conv1d" in gguf \
                or not gguf.endswith(".weight")
            gtype = GGMLType.F32 if small else matrix_type(dense_type, s[-1])
        outs.append(_Out(gguf, s, gtype, [(hf, None, kind)]))

    norm = "plus_one" if hybrid else None
    n_vocab = cfg["vocab_size"]
    add("token_embd.weight", "model.embed_tokens.weight")
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    for i, kind in enumerate(types):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", h + "input_layernorm.weight", norm)
        add(b + ("post_attention_norm.weight" if hybrid else "ffn_norm.weight"), h + "post_attention_layernorm.weight",
            norm)
        if kind == "full_attention":
            a = h + "self_attn."
            for g, n in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
                add(b + g + ".weight", a + n + ".weight")
            add(b + "attn_q_norm.weight", a + "q_norm.weight", norm)
            add(b + "attn_k_norm.weight", a + "k_norm.weight", norm)
        else:
            a = h + "linear_attn."
            nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
            dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
            if arch == "qwen3next":
                add(b + "attn_qkv.weight", a + "in_proj_qkvz.weight", "next_qkv", out_shape=[2 * nk * dk + nv * dv, H])
                add(b + "attn_gate.weight", a + "in_proj_qkvz.weight", "next_z", out_shape=[nv * dv, H])
                add(b + "ssm_ba.weight", a + "in_proj_ba.weight")
            else:
                add(b + "attn_qkv.weight", a + "in_proj_qkv.weight", "qkv")
                add(b + "attn_gate.weight", a + "in_proj_z.weight", "v_rows")
                add(b + "ssm_beta.weight", a + "in_proj_b.weight", "v_rows1")
                add(b + "ssm_alpha.weight", a + "in_proj_a.weight", "v_rows1")
            conv = shape(a + "conv1d.weight")
            add(b + "ssm_conv1d.weight", a + "conv1d.weight", "conv", out_shape=[conv[0], conv[-1]])
            add(b + "ssm_dt.bias", a + "dt_bias", "v_rows1")
            add(b + "ssm_a", a + "A_log", "neg_exp")
            add(b + "ssm_norm.weight", a + "norm.weight")
            add(b + "ssm_out.weight", a + "out_proj.weight", "v_cols")
        m = h + "mlp."
        add(b + "ffn_gate_inp.weight", m + "gate.weight")
        et = {}
        for g, rows in (("gate", H), ("up", H), ("down", I)):
            et[g] = matrix_type(expert_type, rows)
        if has(m + "experts.gate_up_proj"):
            gu = shape(m + "experts.gate_up_proj")
            if gu != [E, 2 * I, H]:
                raise ValueError(f"{m}experts.gate_up_proj has shape {gu}, expected {[E, 2 * I, H]}")
            name = m + "experts.gate_up_proj"
            outs.append(_Out(b + "ffn_gate_exps.weight", [E, I, H], et["gate"],
                             [(name, (e, slice(0, I)), None) for e in range(E)]))
            outs.append(_Out(b + "ffn_up_exps.weight", [E, I, H], et["up"],
                             [(name, (e, slice(I, 2 * I)), None) for e in range(E)]))
            outs.append(_Out(b + "ffn_down_exps.weight", [E, H, I], et["down"],
                             [(m + "experts.down_proj", (e,), None) for e in range(E)]))
        elif cfg.get("tidal_packed_experts"):
            # Pre-packed experts hold quantised values only; a tidal.synth checkpoint records the
            # seed its BF16 experts were drawn from, so they are drawn again (same values as the
            # BF16 form of the same seed).
            if "tidal_synth" not in cfg:
                raise NotImplementedError(f"{m}experts: the routed experts are pre-packed "
                                          f"({cfg['tidal_packed_experts']['file']}) and not from tidal.synth; "
                                          "GGUF conversion needs their source weights")
            for g, shp in (("gate", [E, I, H]), ("up", [E, I, H]), ("down", [E, H, I])):
                outs.append(_Out(b + f"ffn_{g}_exps.weight", shp, et[g], [(f"synth:{g}", (i, e), None)
                                                                         for e in range(E)]))
        else:
            for g in ("gate", "up", "down"):
                names = [f"{m}experts.{e}.{g}_proj.weight" for e in range(E)]
                missing = [n for n in names if n not in ck]
                if missing:
                    raise FileNotFoundError(f"checkpoint has no tensor {missing[0]!r} (needed for ffn_{g}_exps)")
                outs.append(_Out(b + f"ffn_{g}_exps.weight", [E, *ck.shape(names[0])], et[g],
                                 [(n, None, None) for n in names]))
        if hybrid and has(m + "shared_expert.gate_proj.weight"):
            for g in ("gate", "up", "down"):
                add(b + f"ffn_{g}_shexp.weight", m + f"shared_expert.{g}_proj.weight")
            add(b + "ffn_gate_inp_shexp.weight", m + "shared_expert_gate.weight")
    add("output_norm.weight", "model.norm.weight", norm)
    if has("lm_head.weight") and not cfg.get("tie_word_embeddings", False):
        add("output.weight", "lm_head.weight")
    if outs[0].shape[0] != n_vocab:
        raise ValueError(f"embedding has {outs[0].shape[0]} rows, config vocab_size is {n_vocab}")
    return outs


def _q4_k_m(outs: list[_Out], n_layer: int) -> None:
    """llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M choices (src/llama-quant.cpp, llama_tensor_get_type): output
    in Q6_K; attn_v and ffn_down (experts and shared expert too) in Q6_K in the layers its use_more_bits
    picks (the first and last eighth, every third in between); Q4_K elsewhere."""
    def more_bits(i: int) -> bool:
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    for o in outs:
        if o.gtype != GGMLType.Q4_K:
            continue  # vectors, and rows that fell back to Q8_0 / F16
        parts = o.name.split(".")
        layer = int(parts[1]) if parts[0] == "blk" else -1
        if o.name == "output.weight" or (layer >= 0 and more_bits(layer) and
                                         parts[2] in ("attn_v", "ffn_down_exps", "ffn_down_shexp")):
            o.gtype = GGMLType.Q6_K


def convert(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, expert_type: str = "q4_k",
            dense_type: str = "bf16", workers: int = 0, progress: bool = True) -> pathlib.Path:
    """Write the Hugging Face checkpoint `model_dir` as a GGUF file llama.cpp runs. Routed experts in
    `expert_type` (q4_k, q4_0, q6_k, q8_0, bf16, f16, f32; or q4_k_m: llama.cpp's Q4_K_M mix for the
    whole file, Q4_K with Q6_K where it spends more bits), other matrices in `dense_type`; norms, routers and
    the DeltaNet conv/decay vectors in F32 (as llama.cpp's converter does). MTP layers are left out.
    `workers`: processes encoding tensors in parallel (0: one per CPU)."""
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    cfg = _text_config(json.loads((model_dir / "config.json").read_text()))
    mt = cfg.get("model_type")
    if mt not in _ARCH:
        raise NotImplementedError(f"model_type {mt!r} has no GGUF mapping in tidal; supported: {', '.join(_ARCH)}")
    arch = _ARCH[mt]
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
    # What llama.cpp's graphs for these architectures cannot express: say so instead of writing a
    # file that would load and compute something else.
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise NotImplementedError(f"{model_dir}: dense MLP layers (mlp_only_layers={cfg.get('mlp_only_layers')}, "
                                  f"decoder_sparse_step={cfg.get('decoder_sparse_step', 1)}) have no place in "
                                  f"llama.cpp's {arch} graph, which makes every layer MoE")
    if cfg.get("norm_topk_prob", True) is False:
        raise NotImplementedError(f"{model_dir}: norm_topk_prob=false; llama.cpp's {arch} graph always "
                                  "renormalises the top-k router weights")
    mix = expert_type.lower() == "q4_k_m"
    if mix:  # llama.cpp's Q4_K_M: Q4_K everywhere, Q6_K where it spends more bits
        expert_type = dense_type = "q4_k"
    etype, dtype_ = GGMLType.parse(expert_type), GGMLType.parse(dense_type)
    ck = _Checkpoint(model_dir)
    outs = _plan_tensors(ck, cfg, arch, etype, dtype_)
    if mix:
        _q4_k_m(outs, cfg["num_hidden_layers"])
    w = GGUFWriter(out_path)
    w.add("general.architecture", arch, STR)
    w.add("general.name", model_dir.name, STR)
    w.add("general.file_type", _FILE_TYPE.get(etype, 0), U32)
    w.add("general.quantization_version", 2, U32)
    for key, value, vtype, elem in _metadata(cfg, arch, cfg["vocab_size"]) + _sampling(model_dir) + _tokenizer(model_dir, cfg,
                                                                                         cfg["vocab_size"]):
        w.add(key, value, vtype, elem)
    workers = workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers) if workers > 1 else None

    def producer(o: _Out) -> Callable[[], Iterator[bytes]]:
        def run() -> Iterator[bytes]:
            args = [(str(model_dir), name, index, kind, o.gtype, cfg) for name, index, kind in o.jobs]
            if pool is None or len(args) == 1:
                yield from map(_job, args)
            else:
                yield from pool.map(_job, args, chunksize=max(1, len(args) // (4 * workers)))
        return run

    for o in outs:
        w.add_tensor(o.name, o.shape, o.gtype, producer(o))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=w.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"writing {pathlib.Path(out_path).name}", file=sys.stderr)
        except ImportError:
            pass
    try:
        return w.write(progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tidal.gguf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="Hugging Face checkpoint directory (config.json + safetensors)")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--expert-type", default="q4_k",
                    help="routed experts: q4_k (default), q4_0, q6_k, q8_0, bf16, f16, f32; or q4_k_m (llama.cpp's "
                         "Q4_K_M mix for every matrix)")
    ap.add_argument("--dense-type", default="bf16", help="other matrices: bf16 (default), f16, f32, q8_0")
    ap.add_argument("--workers", type=int, default=0, help="encoding processes (0: one per CPU)")
    a = ap.parse_args(argv)
    try:
        path = convert(a.model_dir, a.out, expert_type=a.expert_type, dense_type=a.dense_type, workers=a.workers)
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as exc:
        print(f"python -m tidal.gguf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
