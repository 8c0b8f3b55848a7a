# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpora of tests/fuzz: small valid GGUF files from tidal's writer (every metadata
type, arrays, custom alignment, each tensor type tidal writes), small safetensors files, and the
config.json of every model the repo ships or tests (golden fixtures, tidal-mini, a pre-packed synth).

    PYTHONPATH=python python3 tests/fuzz/make_seeds.py tests/fuzz/corpus
"""

import json
import pathlib
import shutil
import struct
import sys

import numpy as np

from tidal import gguf as tg


ROOT = pathlib.Path(__file__).resolve().parents[2]


def safetensors(path: pathlib.Path, tensors: dict, metadata: dict | None = None) -> None:
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def main(out: str) -> None:
    base = pathlib.Path(out)
    st = base / "safetensors"
    st.mkdir(parents=True, exist_ok=True)
    safetensors(st / "two.safetensors", {"a.weight": ("BF16", [2, 3], bytes(12)),
                                         "b": ("F32", [4], np.arange(4, dtype=np.float32).tobytes())},
                {"format": "pt"})
    safetensors(st / "empty_and_scalar.safetensors", {"e": ("F16", [0, 5], b""), "s": ("I64", [], bytes(8))})
    cfg = base / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    for arch in ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe"):
        shutil.copy(ROOT / "tests" / "fixtures" / "golden" / arch / "config.json", cfg / f"{arch}.json")
    shutil.copy(ROOT / "models" / "tidal-mini" / "config.json", cfg / "tidal-mini.json")
    from tidal.synth import preset_config

    c = preset_config("qwen3-next-80b-a3b", 4)
    c["tidal_packed_experts"] = {"file": "experts-int4-g64.tidal", "dtype": "int4", "group_size": 64,
                                 "layout": "tidal_n16_v1"}
    (cfg / "prepacked.json").write_text(json.dumps(c))
    d = base / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    w = tg.GGUFWriter(d / "types.gguf")
    w.add("general.architecture", "qwen35moe")
    for key, value, t in [("u8", 7, tg.U8), ("i8", -7, tg.I8), ("u16", 9, tg.U16), ("i16", -9, tg.I16),
                          ("u32", 11, tg.U32), ("i32", -11, tg.I32), ("f32", 0.5, tg.F32), ("b", True, tg.BOOL),
                          ("u64", 13, tg.U64), ("i64", -13, tg.I64), ("f64", 0.25, tg.F64), ("s", "text", tg.STR)]:
        w.add(key, value, t)
    w.add("qwen35moe.rope.dimension_sections", [11, 11, 10, 0], tg.ARR, tg.I32)
    w.add("qwen35moe.attention.recurrent_layers", [True, False], tg.ARR, tg.BOOL)
    w.add("tokenizer.ggml.tokens", ["a", "b", "<|x|>"], tg.ARR, tg.STR)
    rng = np.random.default_rng(0)
    for name, shape, t in [("f32", [2, 3], tg.GGMLType.F32), ("bf16", [1, 32], tg.GGMLType.BF16),
                           ("q8", [1, 32], tg.GGMLType.Q8_0), ("q4k", [1, 256], tg.GGMLType.Q4_K)]:
        a = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, shape, t, lambda a=a, t=t: tg.quantize(a, t))
    w.write()
    w = tg.GGUFWriter(d / "aligned64.gguf", alignment=64)
    w.add("general.architecture", "qwen3moe")
    w.add_tensor("blk.0.ffn_gate_exps.weight", [2, 1, 32], tg.GGMLType.Q8_0, lambda: tg.quantize(np.ones((2, 1, 32)), 8))
    w.add_tensor("output_norm.weight", [8], tg.GGMLType.F32, lambda: np.arange(8, dtype=np.float32).tobytes())
    w.write()
    w = tg.GGUFWriter(d / "empty.gguf")
    w.write()
    # Whole models (one per architecture llama.cpp names), small enough for -max_len 65536, so the
    # model mapping (gguf_model.cpp) is reached: tiny configs written by tidal.synth, converted.
    import tempfile

    from tidal import synth

    hybrid = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  vocab_size=32, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, linear_num_key_heads=1, linear_num_value_heads=2,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  layer_types=["linear_attention", "full_attention"], max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                              "partial_rotary_factor": 0.25})
    models = {"qwen35moe": dict(hybrid, model_type="qwen3_5_moe_text"),
              "qwen3next": dict(hybrid, model_type="qwen3_next", intermediate_size=32, decoder_sparse_step=1,
                                mlp_only_layers=[], norm_topk_prob=True),
              "qwen3moe": dict(model_type="qwen3_moe", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, vocab_size=32, num_experts=2, num_experts_per_tok=1,
                               moe_intermediate_size=32, intermediate_size=32, decoder_sparse_step=1,
                               mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=64,
                               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1e4)}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in models.items():
            src = synth.write_checkpoint(cfg, pathlib.Path(tmp) / arch, progress=False)
            out = tg.convert(src, d / f"model-{arch}.gguf", expert_type="q8_0", dense_type="bf16", workers=1,
                             progress=False)
            assert out.stat().st_size <= 65536, (out, out.stat().st_size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/corpus")
