# SPDX-License-Identifier: Apache-2.0
"""Bad input gets a clear Python exception naming what is wrong; never a crash."""

import json
import os
import pathlib

import pytest
import tidal
from conftest import GOLDEN, read_safetensors, write_safetensors


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(GOLDEN / "qwen3_5_moe_text")


# ---- checkpoints and configs -------------------------------------------------------------------

def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tidal.Runtime.load("/nonexistent/model/dir")


def test_missing_config(golden_copy):
    d = golden_copy("qwen3_moe")
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        tidal.Runtime.load(d)


def test_unknown_model_type_lists_supported(golden_copy):
    d = golden_copy("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match=r'"llama".*qwen3_next, qwen3_5_moe, qwen3_5_moe_text, qwen3_moe'):
        tidal.Runtime.load(d)


def test_config_not_json(golden_copy):
    d = golden_copy("qwen3_moe")
    (d / "config.json").write_text("{ not json")
    with pytest.raises(tidal.FormatError, match="not valid JSON"):
        tidal.Runtime.load(d)


def test_config_missing_field(golden_copy):
    d = golden_copy("qwen3_next")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='"hidden_size" is missing'):
        tidal.Runtime.load(d)


# Found by the config fuzzer (tests/fuzz, kept in its corpus as regression-hidden-act-not-a-string):
# a field of the wrong JSON type escaped as a JSON library error instead of a FormatError. Values
# nested deeply are not printed whole (printing recursed as deep as the input).
@pytest.mark.parametrize("field,value,msg", [
    ("hidden_act", False, 'field "hidden_act" must be a string, got false'),
    ("mlp_only_layers", ["x"], 'field "mlp_only_layers" must be an integer, got "x"'),
    ("mlp_only_layers", [7.7e108], 'field "mlp_only_layers" must be an integer'),  # once an unchecked conversion
    ("hidden_size", [[[[1]]]], "must be an integer, got a JSON array"),
    ("layer_types", {"a": 1}, "layer_types must be a list"),
])
def test_config_fields_of_the_wrong_type(golden_copy, field, value, msg):
    d = golden_copy("qwen3_moe" if field != "layer_types" else "qwen3_next")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tidal.FormatError, match=msg):
        tidal.Runtime.load(d)


def test_deeply_nested_config_value_is_a_clear_error(golden_copy):
    d = golden_copy("qwen3_moe")
    text = (d / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": ' + "[" * 50000 + "]" * 50000)
    (d / "config.json").write_text(text)
    with pytest.raises(tidal.FormatError, match="hidden_size"):
        tidal.Runtime.load(d)


def _rewrite(path, edit):
    header, data = read_safetensors(path)
    header, data = edit(header, data)
    write_safetensors(path, header, data)


def _set_field(path, name, field, value):
    """Rewrite one header field of tensor `name` (the data stays as it is)."""

    def edit(h, b):
        h[name][field] = value(h[name][field]) if callable(value) else value
        return h, b

    _rewrite(path, edit)


@pytest.mark.parametrize("name", ["model.layers.3.self_attn.k_proj.weight",  # a pinned tensor
                                  "model.layers.1.mlp.experts.5.down_proj.weight"])  # a routed expert
def test_missing_tensor_named(golden_copy, name):
    d = golden_copy("qwen3_5_moe_text")
    _rewrite(d / "model.safetensors", lambda h, b: ({k: v for k, v in h.items() if k != name}, b))
    with pytest.raises(tidal.FormatError, match=rf'tensor "{name}" is missing'):
        tidal.Runtime.load(d)


def test_wrong_shape_names_tensor_file_and_fields(golden_copy):
    d = golden_copy("qwen3_5_moe_text")
    name = "model.layers.0.linear_attn.in_proj_qkv.weight"

    _set_field(d / "model.safetensors", name, "shape", lambda old: list(reversed(old)))
    with pytest.raises(tidal.FormatError, match=rf'"model.safetensors": tensor "{name}" has shape \[64, 128\], '
                                                r"expected \[128, 64\] \(hidden_size=64, linear_num_key_heads=2"):
        tidal.Runtime.load(d)


def test_wrong_fused_expert_shape(golden_copy):
    d = golden_copy("qwen3_5_moe")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.2.mlp.experts.gate_up_proj"
    shard = d / index["weight_map"][name]
    _set_field(shard, name, "shape", lambda old: [old[0] * 2, old[1] // 2, old[2]])
    with pytest.raises(tidal.FormatError, match=rf'tensor "{name}" has shape \[16, 32, 64\], expected \[8, 64, 64\]'):
        tidal.Runtime.load(d)


def test_truncated_file(golden_copy):
    d = golden_copy("qwen3_next")
    shard = d / "model-00002-of-00003.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(tidal.FormatError, match=r"model-00002-of-00003.safetensors.*truncated"):
        tidal.Runtime.load(d)


def test_corrupt_header(golden_copy):
    d = golden_copy("qwen3_5_moe_text")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:20] = b"#garbage####"
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(tidal.FormatError, match="corrupt header"):
        tidal.Runtime.load(d)


def test_unsupported_dtype_named(golden_copy):
    d = golden_copy("qwen3_5_moe_text")
    name = "model.layers.0.mlp.gate.weight"

    _set_field(d / "model.safetensors", name, "dtype", "I16")  # same byte size as BF16: header stays consistent
    with pytest.raises(NotImplementedError, match=rf'tensor "{name}" has dtype I16'):
        tidal.Runtime.load(d)


def test_extra_tensors_are_skipped():
    # The wrapper fixture carries mtp.* and model.visual.* tensors; loading must ignore them.
    rt = tidal.Runtime.load(GOLDEN / "qwen3_5_moe")
    assert rt.logits([1, 2, 3]).shape == (3, 320)


# ---- runtime arguments -------------------------------------------------------------------------

def test_token_ids_out_of_range(rt):
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 320 is out of range \[0, 320\)"):
        rt.logits([1, 320])
    with pytest.raises(ValueError, match=r"token_ids\[0\] = -1"):
        rt.generate([-1])
    with pytest.raises(ValueError, match="out of range"):
        rt.new_sequence().forward([5, 1000])


def test_empty_prompt(rt):
    with pytest.raises(ValueError, match="empty"):
        rt.logits([])
    with pytest.raises(ValueError, match="empty"):
        rt.generate([], max_new_tokens=3)


def test_bad_token_types(rt):
    with pytest.raises(ValueError, match="string"):
        rt.logits("hello")
    with pytest.raises(ValueError, match="integers"):
        rt.logits([1.5, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        rt.logits([[1, 2], [3, 4]])


def test_negative_lengths_and_bad_sampling(rt):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        rt.generate([1, 2], max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        rt.generate([1, 2], temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        rt.generate([1, 2], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        rt.generate([1, 2], top_k=-3)
    with pytest.raises(ValueError, match="min_p"):
        rt.generate([1, 2], min_p=1.5)
    for seed in (-4, 2**64, 10**30):
        with pytest.raises(ValueError, match="seed"):
            rt.generate([1, 2], temperature=1.0, seed=seed)
    assert len(rt.generate([1, 2], max_new_tokens=2, temperature=1.0, seed=2**64 - 1).token_ids) == 2
    assert list(rt.generate([1, 2], max_new_tokens=0).token_ids) == []


def test_missing_tensor_names_its_shard(golden_copy):
    d = golden_copy("qwen3_next")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.4.linear_attn.in_proj_ba.weight"
    shard = index["weight_map"][name]
    _rewrite(d / shard, lambda h, b: ({k: v for k, v in h.items() if k != name}, b))
    with pytest.raises(tidal.FormatError, match=rf'tensor "{name}" is missing from "{shard}"'):
        tidal.Runtime.load(d)


def test_non_integer_shape(golden_copy):
    d = golden_copy("qwen3_5_moe_text")
    name = "model.norm.weight"

    _set_field(d / "model.safetensors", name, "shape", [64.5])
    with pytest.raises(tidal.FormatError, match=rf'"{name}" has a non-integer'):
        tidal.Runtime.load(d)


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**12), ("head_dim", 2**62),
                                         ("num_local_experts", 10**9)])
def test_implausible_config_sizes(golden_copy, field, value):
    d = golden_copy("qwen3_moe")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tidal.FormatError, match=field.replace("num_local_experts", "num_experts")):
        tidal.Runtime.load(d)


def test_bad_device_and_threads():
    with pytest.raises(ValueError, match='device must be "cpu" or "cuda"'):
        tidal.Runtime.load(GOLDEN / "qwen3_moe", device="tpu")
    if not tidal.cuda_devices():  # no GPU or a CPU-only build: a clear error, not a crash
        with pytest.raises((ValueError, NotImplementedError), match="cuda"):
            tidal.Runtime.load(GOLDEN / "qwen3_moe", device="cuda")
    with pytest.raises((ValueError, NotImplementedError), match="cuda"):
        tidal.Runtime.load(GOLDEN / "qwen3_moe", device="cuda:7x")
    with pytest.raises((ValueError, NotImplementedError), match="cuda"):
        tidal.Runtime.load(GOLDEN / "qwen3_moe", device="cuda:99")
    with pytest.raises(ValueError, match="num_threads"):
        tidal.Runtime.load(GOLDEN / "qwen3_moe", num_threads=-2)
    with pytest.raises(ValueError, match="num_threads=10000000"):
        tidal.Runtime.load(GOLDEN / "qwen3_moe", num_threads=10**7)


def test_model_larger_than_ram_fails_at_load_with_the_numbers(monkeypatch):
    """A model whose weights do not fit the RAM available fails before packing anything, saying
    how much it needs and how much there is (TIDAL_MEM_AVAILABLE stands in for MemAvailable)."""
    mini = pathlib.Path(__file__).resolve().parents[2] / "models" / "tidal-mini"
    monkeypatch.setenv("TIDAL_MEM_AVAILABLE", str(1 << 20))
    with pytest.raises(MemoryError, match=r"needs \d+\.\d GiB of RAM .*but 0\.0 GiB is available"):
        tidal.Runtime.load(mini, progress=False)
    with pytest.raises(MemoryError, match=r"int4 experts need .* GiB of RAM"):
        tidal.Runtime.load(mini, expert_dtype="int4", progress=False)
    monkeypatch.setenv("TIDAL_MEM_AVAILABLE", "lots")
    with pytest.raises(ValueError, match="TIDAL_MEM_AVAILABLE"):
        tidal.Runtime.load(mini, progress=False)
    # Enough of it: loads.
    monkeypatch.setenv("TIDAL_MEM_AVAILABLE", str(64 << 30))
    assert tidal.Runtime.load(mini, progress=False).logits([5, 6]).shape[-1] > 0


@pytest.mark.parametrize("value,default", [("", "None"), ("auto", "None"), ("0", "0"), ("12", "12"), ("-1", None),
                                           ("many", None)])
def test_gpu_expert_slots_default_from_the_environment(value, default):
    """TIDAL_GPU_EXPERT_SLOTS replaces Runtime.load's default gpu_expert_slots (None: the cache sized
    automatically) when tidal is imported ("auto": None, a number: that many, 0 turns the cache off);
    anything else is a ValueError naming the variable."""
    import subprocess
    import sys

    code = ("import inspect, tidal; "
            "print(inspect.signature(tidal.Runtime.load).parameters['gpu_expert_slots'].default)")
    env = dict(os.environ, TIDAL_GPU_EXPERT_SLOTS=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if default is None:
        assert r.returncode != 0 and "TIDAL_GPU_EXPERT_SLOTS" in r.stderr and "ValueError" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == default
