# SPDX-License-Identifier: Apache-2.0
"""Loading: config styles seen in the wild, layouts, F16/F32 weights, the config object."""

import json

import numpy as np
import tidal
from conftest import GOLDEN, read_safetensors, tensor_array, write_safetensors


def test_config_object():
    rt = tidal.Runtime.load(GOLDEN / "qwen3_next")
    c = rt.config
    assert c.model_type == "qwen3_next" and c.family == "qwen3_next"
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert c.rotary_dim == 8 and c.head_dim == 32
    assert tidal.Runtime.load(GOLDEN / "qwen3_moe").config.layer_is_moe == [True, True, False, True]
    assert tidal.Runtime.load(GOLDEN / "qwen3_5_moe").config.family == "qwen3_5_moe"


def test_old_style_config_gives_identical_logits(golden_copy):
    """rope_theta / partial_rotary_factor at top level, no rope_parameters, no layer_types."""
    d = golden_copy("qwen3_next")
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    cfg["rope_scaling"] = None
    cfg["full_attention_interval"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 40))
    np.testing.assert_array_equal(tidal.Runtime.load(d).logits(ids), tidal.Runtime.load(GOLDEN / "qwen3_next").logits(ids))


def test_rope_theta_is_honoured(golden_copy):
    d = golden_copy("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 1e6
    (d / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 30))
    a = tidal.Runtime.load(d).logits(ids)
    b = tidal.Runtime.load(GOLDEN / "qwen3_moe").logits(ids)
    assert np.allclose(a[0], b[0], atol=1e-5)  # position 0 is not rotated
    assert np.abs(a - b).max() > 1e-3


def test_fused_experts_with_weight_suffix(golden_copy):
    """llama.cpp accepts `mlp.experts.gate_up_proj.weight`; so does tidal (identical logits)."""
    d = golden_copy("qwen3_5_moe")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        header, data = read_safetensors(d / shard)
        renamed = {(k + ".weight" if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else k): v
                   for k, v in header.items()}
        write_safetensors(d / shard, renamed, data)
    index["weight_map"] = {(k + ".weight" if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else k): v
                           for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = list(range(7, 47))
    np.testing.assert_array_equal(tidal.Runtime.load(d).logits(ids), tidal.Runtime.load(GOLDEN / "qwen3_5_moe").logits(ids))


def test_f32_and_f16_weights(golden_copy):
    """The same checkpoint re-encoded in F32 (exact) and F16 (exact for these BF16 values in range)."""
    ids = list(range(3, 50))
    want = tidal.Runtime.load(GOLDEN / "qwen3_5_moe_text").logits(ids)
    for dtype, np_dtype in (("F32", np.float32), ("F16", np.float16)):
        d = golden_copy("qwen3_5_moe_text") if dtype == "F32" else d
        header, data = read_safetensors(d / "model.safetensors")
        out_h, chunks, off = {}, [], 0
        for name in header:
            if name == "__metadata__":
                continue
            arr = tensor_array(header, data, name).astype(np_dtype)
            raw = arr.tobytes()
            out_h[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
            chunks.append(raw)
            off += len(raw)
        write_safetensors(d / "model.safetensors", out_h, b"".join(chunks))
        got = tidal.Runtime.load(d).logits(ids)
        np.testing.assert_allclose(got, want, atol=5e-2 if dtype == "F16" else 1e-5, err_msg=dtype)
