# SPDX-License-Identifier: Apache-2.0
"""FP8 checkpoints in the official layout (Qwen's "-FP8" releases, DeepSeek-V3 style).

Each quantised linear weight W [rows, cols] (and each fused expert tensor [E, rows, cols]) is stored as
F8_E4M3 codes plus `<name>_scale_inv`, F32 [ceil(rows/128), ceil(cols/128)] (a leading E for fused
experts), with W = code * scale_inv over 128 x 128 blocks; config.json carries
quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}. Embeddings, lm_head, norms, routers, the shared-expert gate and the
DeltaNet conv/decay tensors stay BF16.

`tidal.Runtime.load` reads such a directory as it is (Note [FP8 checkpoints] in
core/checkpoint/safetensors_reader.h). `convert` writes one from a BF16 checkpoint: tests build tiny FP8
models with it, and `python -m tidal.synth --expert-dtype fp8` uses the same quantiser for real-shape
benchmark models.

    python -m tidal.fp8 BF16_CHECKPOINT_DIR OUT_DIR [--scale-dtype F32|BF16] [--block 128]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import struct
import sys
from typing import Any

import numpy as np

__all__ = ["BLOCK", "is_fp8_weight", "quantize_blocks", "dequantize_blocks", "e4m3_values", "convert",
           "quantization_config"]

BLOCK = 128
# What the official FP8 checkpoints keep in BF16 (their modules_to_not_convert), as name patterns.
KEEP_BF16 = ["embed_tokens", "lm_head", "norm", "mlp.gate", "shared_expert_gate", "conv1d", "A_log", "dt_bias"]


def quantization_config(block: int = BLOCK) -> dict[str, Any]:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [block, block], "modules_to_not_convert": list(KEEP_BF16)}


def is_fp8_weight(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """Whether the official layout stores tensor `name` in FP8."""
    if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        return len(shape) == 3
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    if "embed_tokens" in name or name.startswith("lm_head") or name.endswith("norm.weight"):
        return False
    return not name.endswith((".mlp.gate.weight", "shared_expert_gate.weight", "conv1d.weight"))


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, scale_inv float32) of float weights over the last two dims (tidal's C++
    quantiser: s = max|w| / 448 per block, round to nearest even, saturating)."""
    from . import _tidal

    codes, scales = _tidal.quantize_fp8_blocks(np.ascontiguousarray(w, np.float32), block)
    return np.asarray(codes), np.asarray(scales)


def e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 E4M3 codes (float8_e4m3fn: 0x7f and 0xff are NaN), computed
    here in numpy, independently of the C++ decoder."""
    c = np.arange(256)
    sign = np.where(c >> 7, -1.0, 1.0)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1.0 + m / 8.0) * 2.0 ** (e.astype(np.float64) - 7))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    return (sign * v).astype(np.float32)


def dequantize_blocks(codes: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Numpy reference: codes * scale_inv broadcast over block x block tiles (last two dims)."""
    v = e4m3_values()[codes]
    rows, cols = codes.shape[-2:]
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=-2)[..., :rows, :], block, axis=-1)
    return v * s[..., :cols]


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _bf16_bytes(x: np.ndarray) -> bytes:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def convert(src: str | pathlib.Path, out: str | pathlib.Path, *, scale_dtype: str = "F32", block: int = BLOCK,
            progress: bool = True) -> pathlib.Path:
    """Write the BF16/F32 checkpoint `src` in the official FP8 layout to `out` (same shards and names;
    tokenizer and generation files copied)."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    if scale_dtype not in ("F32", "BF16"):
        raise ValueError(f"scale_dtype must be F32 or BF16, got {scale_dtype!r}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no safetensors files")
    weight_map: dict[str, str] = {}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum((src / f).stat().st_size for f in files), unit="B", unit_scale=True,
                       unit_divisor=1024, desc=f"writing {out.name}", file=sys.stderr)
        except ImportError:
            bar = None
    for fname in files:
        header, data_off = _read_header(src / fname)
        raw = np.memmap(src / fname, np.uint8, mode="r")
        entries: list[tuple[str, str, list[int], bytes]] = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            blob = raw[data_off + a:data_off + b]
            shape = info["shape"]
            if info["dtype"] in ("BF16", "F32") and is_fp8_weight(name, shape):
                x = (blob.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" \
                    else blob.view(np.float32)
                codes, scales = quantize_blocks(x.reshape(shape), block)
                entries.append((name, "F8_E4M3", shape, codes.tobytes()))
                sb = scales.astype(np.float32).tobytes() if scale_dtype == "F32" else _bf16_bytes(scales)
                entries.append((name + "_scale_inv", scale_dtype, list(scales.shape), sb))
            else:
                entries.append((name, info["dtype"], shape, bytes(blob)))
            if bar is not None:
                bar.update(b - a)
        head: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "tidal.fp8"}}
        off = 0
        for name, dt, shape, data in entries:
            head[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
            off += len(data)
            weight_map[name] = fname
        h = json.dumps(head).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for *_, data in entries:
                f.write(data)
    if bar is not None:
        bar.close()
    if len(files) > 1 or (src / "model.safetensors.index.json").exists():
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = json.loads((src / "config.json").read_text())
    target = cfg["text_config"] if "text_config" in cfg else cfg
    target["quantization_config"] = quantization_config(block)
    cfg.pop("tidal_packed_experts", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                  "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, out / extra)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tidal.fp8", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="BF16 Hugging Face checkpoint directory")
    ap.add_argument("out", help="output directory (official FP8 layout)")
    ap.add_argument("--scale-dtype", default="F32", choices=["F32", "BF16"])
    ap.add_argument("--block", type=int, default=BLOCK)
    a = ap.parse_args(argv)
    try:
        path = convert(a.src, a.out, scale_dtype=a.scale_dtype, block=a.block)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"python -m tidal.fp8: error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
