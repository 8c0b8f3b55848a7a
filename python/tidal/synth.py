# SPDX-License-Identifier: Apache-2.0
"""Synthetic checkpoints with the exact shapes of released models, for benchmarks.

    python -m tidal.synth --preset qwen3.6-35b-a3b [--layers N] [--expert-dtype bf16] OUT_DIR

Speed depends on shapes and bytes, not on values, so a checkpoint with the real config (every
dimension, vocab, layer pattern) and random weights measures what the real model would. `--layers N`
keeps the real width with fewer layers (the first N of the real pattern). Per-layer cost is the same
for every layer of a kind, so time per token scales linearly in the number of GDN, attention and MoE
layers. Embedding and lm_head are a fixed cost on top.

Weights are random BF16 of magnitude ~1/128 with random signs; norms are neutral, A_log/dt_bias
small. The output is a Hugging Face directory (config.json, sharded safetensors with an index) that
`tidal.Runtime.load` reads like any other. With `--expert-dtype bf16` (default) everything is BF16,
as published, and tidal quantises the routed experts at load (`Runtime.load(expert_dtype=...)`).
With `--expert-dtype fp8` the checkpoint is in the official FP8 layout (tidal.fp8: every projection, experts
included, as F8_E4M3 with 128 x 128 block scales; the same random values quantised), as the published
"-FP8" releases are: Qwen3.6-35B-A3B is then 35 GB.
With `--expert-dtype int4|int8` the routed experts are written directly in tidal's packed CPU format
(a file named in config.json's `tidal_packed_experts`), so models whose BF16 form does not fit the
disk or RAM exist at all: Qwen3.6-35B-A3B is 70 GB in BF16 and 20.5 GiB with INT4 experts,
Qwen3-Next-80B-A3B 160 GB and 42.7 GiB. Those experts are never materialised in BF16 on disk.

Every tensor (every expert of a fused expert tensor) is drawn from its own random stream, seeded by
(seed, tensor name, expert), so the same weights can be regenerated anywhere: the BF16 and the
packed forms of one seed hold the same values (before quantisation), and `python -m tidal.gguf`
converts a packed synthetic checkpoint by regenerating its experts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import struct
import sys
import zlib
from typing import Any, Iterator

import numpy as np

__all__ = ["PRESETS", "preset_config", "tensor_shapes", "write_checkpoint", "expert_layer", "main"]

# Released configurations (shared/docs/model-spec.md §2), plus a tiny one of the 35B's pattern for CI.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.6-35b-a3b": dict(
        model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, vocab_size=248320, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        full_attention_interval=4, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
    "qwen3-next-80b-a3b": dict(
        model_type="qwen3_next", hidden_size=2048, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, vocab_size=151936, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, full_attention_interval=4, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1e7, partial_rotary_factor=0.25),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1e6),
    # CI-sized: the 35B's architecture and layer pattern at small width (seconds to write and run).
    "tiny": dict(
        model_type="qwen3_5_moe_text", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=1024, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        full_attention_interval=4, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
}

SHARD_BYTES = 4 << 30  # like the published checkpoints' ~4 GB shards
_CHUNK = 1 << 24       # values generated per step (32 MiB of BF16): bounds RAM use while writing


def preset_config(preset: str, layers: int | None = None) -> dict[str, Any]:
    """config.json of a preset, optionally cut to its first `layers` layers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    n = cfg["num_hidden_layers"] if layers is None else layers
    if not isinstance(n, int) or n < 1 or n > cfg["num_hidden_layers"]:
        raise ValueError(f"--layers must be in [1, {cfg['num_hidden_layers']}] for {preset}, got {layers}")
    cfg["num_hidden_layers"] = n
    if cfg["model_type"] != "qwen3_moe":
        interval = cfg.pop("full_attention_interval")
        cfg["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    return cfg


def tensor_shapes(cfg: dict[str, Any], fused_experts: bool | None = None) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of a checkpoint of `cfg`, in file order (Hugging Face names)."""
    mt = cfg["model_type"]
    H, V, E, I = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hybrid = mt != "qwen3_moe"
    fused = (mt == "qwen3_5_moe_text") if fused_experts is None else fused_experts
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [V, H])]
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    for layer, kind in enumerate(types):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", [H]), (p + "post_attention_layernorm.weight", [H])]
        if kind == "full_attention":
            out += [(p + "self_attn.q_proj.weight", [nh * d * (2 if hybrid else 1), H]),
                    (p + "self_attn.k_proj.weight", [nkv * d, H]), (p + "self_attn.v_proj.weight", [nkv * d, H]),
                    (p + "self_attn.o_proj.weight", [H, nh * d]),
                    (p + "self_attn.q_norm.weight", [d]), (p + "self_attn.k_norm.weight", [d])]
        else:
            nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
            dk, dv, K = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_conv_kernel_dim"]
            conv = 2 * nk * dk + nv * dv
            q = p + "linear_attn."
            if mt == "qwen3_next":
                out += [(q + "in_proj_qkvz.weight", [2 * nk * dk + 2 * nv * dv, H]), (q + "in_proj_ba.weight", [2 * nv, H])]
            else:
                out += [(q + "in_proj_qkv.weight", [conv, H]), (q + "in_proj_z.weight", [nv * dv, H]),
                        (q + "in_proj_b.weight", [nv, H]), (q + "in_proj_a.weight", [nv, H])]
            out += [(q + "conv1d.weight", [conv, 1, K]), (q + "dt_bias", [nv]), (q + "A_log", [nv]),
                    (q + "norm.weight", [dv]), (q + "out_proj.weight", [H, nv * dv])]
        m = p + "mlp."
        out.append((m + "gate.weight", [E, H]))
        if fused:
            out += [(m + "experts.gate_up_proj", [E, 2 * I, H]), (m + "experts.down_proj", [E, H, I])]
        else:
            for e in range(E):
                out += [(f"{m}experts.{e}.gate_proj.weight", [I, H]), (f"{m}experts.{e}.up_proj.weight", [I, H]),
                        (f"{m}experts.{e}.down_proj.weight", [H, I])]
        Is = cfg.get("shared_expert_intermediate_size", 0)
        if Is:
            out += [(m + "shared_expert.gate_proj.weight", [Is, H]), (m + "shared_expert.up_proj.weight", [Is, H]),
                    (m + "shared_expert.down_proj.weight", [H, Is]), (m + "shared_expert_gate.weight", [1, H])]
    out += [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
    return out


def _bf16(values: np.ndarray) -> bytes:
    """float32 -> BF16 bytes (round to nearest even)."""
    u = values.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def _rng(seed: int, name: str, index: int = 0) -> np.random.Generator:
    """The random stream of one tensor (index 0) or of one expert of a fused expert tensor (e + 1)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def _bits(rng: np.random.Generator, n: int) -> np.ndarray:
    # Random signs and mantissas at exponent 2^-7 (|w| in [1/128, 1/64)): bounded activations, no
    # NaN/Inf, cheap to generate (bits, not floats).
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return (bits & np.uint16(0x807F)) | np.uint16(0x3C00)


def _is_fused_experts(name: str) -> bool:
    return name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))


def _fill(name: str, shape: list[int], seed: int, zero_centred: bool) -> Iterator[bytes]:
    """BF16 bytes of one tensor, in chunks."""
    numel = math.prod(shape)
    if name.endswith("norm.weight"):
        # Hybrids scale by (1 + w): zeros are neutral. qwen3_moe scales by w: ones.
        value = 0.0 if zero_centred and "linear_attn.norm" not in name else 1.0
        yield _bf16(np.full(numel, value, np.float32))
        return
    if name.endswith("A_log"):
        yield _bf16(np.log(_rng(seed, name).uniform(1.0, 16.0, numel)).astype(np.float32))
        return
    if name.endswith("dt_bias"):
        yield _bf16(np.full(numel, 1.0, np.float32))
        return
    if _is_fused_experts(name):  # one stream per expert (see expert_layer)
        for e in range(shape[0]):
            yield _bits(_rng(seed, name, e + 1), numel // shape[0]).tobytes()
        return
    rng = _rng(seed, name)
    left = numel
    while left:
        n = min(left, _CHUNK)
        yield _bits(rng, n).tobytes()
        left -= n


def expert_layer(cfg: dict[str, Any], layer: int, seed: int = 0, experts: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """BF16 bits (uint16) of one layer's routed experts as fused tensors, gate_up [E, 2I, H] and
    down [E, H, I] (or of the experts `experts` selects), exactly as write_checkpoint writes them."""
    E, I, H = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    ids = list(range(E)) if experts is None else list(np.arange(E)[experts].reshape(-1))
    gu_name = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    dn_name = f"model.layers.{layer}.mlp.experts.down_proj"
    gu = np.empty((len(ids), 2 * I, H), np.uint16)
    dn = np.empty((len(ids), H, I), np.uint16)
    for j, e in enumerate(ids):
        gu[j] = _bits(_rng(seed, gu_name, e + 1), 2 * I * H).reshape(2 * I, H)
        dn[j] = _bits(_rng(seed, dn_name, e + 1), H * I).reshape(H, I)
    return gu, dn


from .fp8 import BLOCK as FP8_BLOCK  # noqa: E402
from .fp8 import is_fp8_weight  # noqa: E402
from .fp8 import quantization_config as fp8_quantization_config  # noqa: E402
from .fp8 import quantize_blocks as quantize_fp8  # noqa: E402

PACKED_LAYOUT = "tidal_n16_v1"  # kernels/cpu/expert_gemm.h kExpertLayoutName
_DEFAULT_GROUP = {"int8": 128, "int4": 64}


def _packed_bytes(cfg: dict[str, Any], dtype: str, group: int) -> int:
    """Approximate size of the packed experts (for the disk check): weights plus fp16 scales."""
    E, I, H = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    bits = {"int8": 8, "int4": 4}[dtype]
    per = 3 * I * H * (bits / 8 + 2 / group)
    return int(cfg["num_hidden_layers"] * E * per) + 4096  # every layer of the presets is MoE


def write_checkpoint(cfg: dict[str, Any], out_dir: str | os.PathLike, *, seed: int = 0,
                     fused_experts: bool | None = None, progress: bool = True, expert_dtype: str = "bf16",
                     expert_group_size: int = 0) -> pathlib.Path:
    """Write config.json and BF16 safetensors shards (with an index) of `cfg` with random weights.
    `expert_dtype` "int4"/"int8": the routed experts go to a pre-packed file instead (tidal's CPU
    format, group `expert_group_size`, 0: tidal's default), written layer by layer."""
    out = pathlib.Path(out_dir)
    if expert_dtype not in ("bf16", "int8", "int4", "fp8"):
        raise ValueError(f"expert dtype must be bf16, int8, int4 or fp8, got {expert_dtype!r}")
    fp8_mode = expert_dtype == "fp8"  # the official FP8 layout for every projection (tidal.fp8)
    packed = expert_dtype in ("int8", "int4")
    if packed and fused_experts is False:
        raise ValueError("pre-packed experts (--expert-dtype int8/int4) have no per-expert tensors")
    group = expert_group_size or _DEFAULT_GROUP.get(expert_dtype, 0)
    if packed and group not in (32, 64, 128):
        raise ValueError(f"expert group size must be 32, 64 or 128, got {expert_group_size}")
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg, True if packed else fused_experts)
    if packed:
        shapes = [(n, s) for n, s in shapes if not _is_fused_experts(n)]
    # (name, safetensors dtype, shape, bytes); FP8 weights are followed by their block scales.
    entries: list[tuple[str, str, list[int], int]] = []
    for name, shape in shapes:
        if fp8_mode and is_fp8_weight(name, shape):
            entries.append((name, "F8_E4M3", shape, math.prod(shape)))
            sshape = shape[:-2] + [-(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK)]
            entries.append((name + "_scale_inv", "F32", sshape, 4 * math.prod(sshape)))
        else:
            entries.append((name, "BF16", shape, 2 * math.prod(shape)))
    total = sum(e[3] for e in entries) + (_packed_bytes(cfg, expert_dtype, group) if packed else 0)
    free = _free_disk(out)
    if free is not None and total > free:
        raise OSError(f"{out}: the checkpoint needs {total / 2**30:.1f} GiB but the disk has {free / 2**30:.1f} GiB "
                      "free; use --layers to write fewer layers")
    shards: list[list[tuple[str, str, list[int], int]]] = [[]]
    size = 0
    for e in entries:
        b = e[3]
        if shards[-1] and size + b > SHARD_BYTES and not e[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
                       file=sys.stderr)
        except ImportError:
            bar = None
    zero_centred = cfg["model_type"] != "qwen3_moe"
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "tidal.synth"}}
        off = 0
        for name, dt, shape, b in shard:
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + b]}
            off += b
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            scales: list[np.ndarray] = []
            for name, dt, shape, b in shard:
                if dt == "F32":  # the block scales of the FP8 weight just written
                    f.write(np.concatenate([x.reshape(-1) for x in scales]).astype(np.float32).tobytes())
                    scales = []
                    continue
                if dt == "F8_E4M3":  # the whole tensor from its BF16 stream, quantised on all cores
                    bits = np.frombuffer(b"".join(_fill(name, shape, seed, zero_centred)), np.uint16)
                    x = (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
                    codes, sc = quantize_fp8(x, FP8_BLOCK)
                    del bits, x
                    f.write(codes.tobytes())
                    scales.append(sc)
                    if bar is not None:
                        bar.update(codes.size)
                    continue
                for chunk in _fill(name, shape, seed, zero_centred):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map},
        indent=1))
    cfg = dict(cfg)
    cfg["tidal_synth"] = {"seed": seed, "streams": "per tensor and expert"}
    if fp8_mode:
        cfg["quantization_config"] = fp8_quantization_config(FP8_BLOCK)
    if packed:
        fname = f"experts-{expert_dtype}-g{group}.tidal"
        cfg["tidal_packed_experts"] = {"file": fname, "dtype": expert_dtype, "group_size": group,
                                       "layout": PACKED_LAYOUT}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if packed:
        from . import _tidal

        w = _tidal.PackedExpertsWriter(str(out / fname), str(out / "config.json"), expert_dtype, group)
        moe = [i for i in range(cfg["num_hidden_layers"])]  # every layer of these presets is MoE
        for layer in moe:
            gu, dn = expert_layer(cfg, layer, seed)
            w.add_layer(gu, dn)
            if bar is not None:
                bar.update(gu.nbytes // 2 * (8 if expert_dtype == "int8" else 4) // 8)
        w.finish()
    if bar is not None:
        bar.close()
    return out


def _free_disk(path: pathlib.Path) -> int | None:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tidal.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", required=True, choices=list(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (real width)")
    ap.add_argument("--expert-dtype", default="bf16", choices=["bf16", "int8", "int4", "fp8"],
                    help="routed experts: bf16 tensors (default), pre-packed int8/int4 (tidal's CPU format), "
                         "or fp8: the whole checkpoint in the official FP8 layout")
    ap.add_argument("--expert-group-size", type=int, default=0, help="int8/int4 group size (0: tidal's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-expert", action="store_true",
                    help="per-expert tensors instead of the fused layout (qwen3_5_moe_text default: fused)")
    a = ap.parse_args(argv)
    try:
        cfg = preset_config(a.preset, a.layers)
        out = write_checkpoint(cfg, a.out_dir, seed=a.seed, fused_experts=False if a.per_expert else None,
                               expert_dtype=a.expert_dtype, expert_group_size=a.expert_group_size)
    except (ValueError, OSError, MemoryError) as exc:
        print(f"python -m tidal.synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.preset}, {cfg['num_hidden_layers']} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
