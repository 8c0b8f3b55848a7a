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


# ---------------------------------------------------------------------------------------------------
# Converter: Hugging Face checkpoints -> the tensors and metadata llama.cpp loads.

import pathlib  # noqa: E402

from conftest import GOLDEN, MINI  # noqa: E402

# Tensors llama.cpp's qwen35moe loader asks for (src/models/qwen35moe.cpp), per layer kind.
_Q35_COMMON = ["attn_norm", "post_attention_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
               "ffn_down_exps", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
_Q35_FULL = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm"]
_Q35_LINEAR = ["attn_qkv", "attn_gate", "ssm_conv1d", "ssm_dt", "ssm_a", "ssm_beta", "ssm_alpha", "ssm_norm",
               "ssm_out"]


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _hf(model_dir):
    from tidal.gguf import _Checkpoint

    return _Checkpoint(pathlib.Path(model_dir))


def test_convert_qwen3_5_moe_names_metadata_and_values(tmp_path):
    src = GOLDEN / "qwen3_5_moe"  # the multimodal wrapper: text model under model.language_model.
    cfg = json.loads((src / "config.json").read_text())["text_config"]
    out = tg.convert(src, tmp_path / "m.gguf", expert_type="q8_0", workers=1, progress=False)
    r, t = _read(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "qwen35moe"
    n = cfg["num_hidden_layers"]
    assert f["qwen35moe.block_count"] == n
    assert r.fields["qwen35moe.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["qwen35moe.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]
    assert f["qwen35moe.attention.recurrent_layers"] == [k == "linear_attention" for k in cfg["layer_types"]]
    assert len(f["qwen35moe.rope.dimension_sections"]) == 4
    assert f["qwen35moe.rope.dimension_count"] == int(cfg["head_dim"] * cfg["rope_parameters"]["partial_rotary_factor"])
    assert f["qwen35moe.ssm.time_step_rank"] == cfg["linear_num_value_heads"]
    assert f["tokenizer.ggml.model"] == "none" and f["qwen35moe.vocab_size"] == cfg["vocab_size"]
    want = {"token_embd.weight", "output_norm.weight"} | (set() if cfg.get("tie_word_embeddings") else {"output.weight"})
    for i, kind in enumerate(cfg["layer_types"]):
        for x in _Q35_COMMON + (_Q35_FULL if kind == "full_attention" else _Q35_LINEAR):
            want.add(f"blk.{i}.{x}" + ("" if x == "ssm_a" else ".bias" if x == "ssm_dt" else ".weight"))
    assert set(t) == want  # llama.cpp refuses files with a tensor too many or too few
    hf = _hf(src)
    nk, nv, dv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
    r_ = nv // nk

    def arr(name):
        x = t[name]
        return gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).reshape([int(s) for s in x.shape][::-1])

    # Norms of the hybrids are zero-centred (x * (1 + w)): llama.cpp stores 1 + w; not the gated norm.
    np.testing.assert_array_equal(arr("blk.0.attn_norm.weight"), hf.get("model.layers.0.input_layernorm.weight") + 1)
    np.testing.assert_array_equal(arr("blk.0.ssm_norm.weight"), hf.get("model.layers.0.linear_attn.norm.weight"))
    # Value heads: HF groups them per key head, llama.cpp tiles them (head h of group g -> h * nk + g).
    perm = np.array([g * r_ + h for h in range(r_) for g in range(nk)])
    a_log = hf.get("model.layers.0.linear_attn.A_log")
    np.testing.assert_allclose(arr("blk.0.ssm_a"), -np.exp(a_log)[perm], rtol=1e-6)
    z = hf.get("model.layers.0.linear_attn.in_proj_z.weight").reshape(nv, dv, -1)
    np.testing.assert_array_equal(arr("blk.0.attn_gate.weight").reshape(nv, dv, -1),
                                  tg.dequantize(tg.quantize(z[perm], tg.GGMLType.BF16), tg.GGMLType.BF16, z.shape))
    out_proj = hf.get("model.layers.0.linear_attn.out_proj.weight")
    H = out_proj.shape[0]
    np.testing.assert_array_equal(arr("blk.0.ssm_out.weight").reshape(H, nv, dv), out_proj.reshape(H, nv, dv)[:, perm])
    assert t["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # Experts: gate = first half of gate_up_proj, up = second half; Q8_0 within its bound.
    gu = hf.get("model.layers.0.mlp.experts.gate_up_proj")
    inter = gu.shape[1] // 2
    for name, ref in (("ffn_gate_exps", gu[:, :inter]), ("ffn_up_exps", gu[:, inter:]),
                      ("ffn_down_exps", hf.get("model.layers.0.mlp.experts.down_proj"))):
        got = arr(f"blk.0.{name}.weight")
        assert got.shape == ref.shape
        assert np.sqrt(np.mean((got - ref) ** 2)) <= 0.01 * np.sqrt(np.mean(ref ** 2))


def test_convert_qwen3_next_splits_qkvz(tmp_path):
    src = GOLDEN / "qwen3_next"
    cfg = json.loads((src / "config.json").read_text())
    out = tg.convert(src, tmp_path / "n.gguf", expert_type="f32", dense_type="f32", workers=1, progress=False)
    r, t = _read(out)
    assert r.fields["general.architecture"].contents() == "qwen3next"
    i = cfg["layer_types"].index("linear_attention")
    assert f"blk.{i}.ssm_ba.weight" in t and f"blk.{i}.ssm_beta.weight" not in t
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    qkvz = _hf(src).get(f"model.layers.{i}.linear_attn.in_proj_qkvz.weight")
    H = qkvz.shape[1]
    g = qkvz.reshape(nk, 2 * dk + 2 * (nv // nk) * dv, H)
    want_qkv = np.concatenate([g[:, :dk].reshape(-1, H), g[:, dk:2 * dk].reshape(-1, H),
                               g[:, 2 * dk:2 * dk + (nv // nk) * dv].reshape(-1, H)])
    np.testing.assert_array_equal(np.asarray(t[f"blk.{i}.attn_qkv.weight"].data), want_qkv)
    np.testing.assert_array_equal(np.asarray(t[f"blk.{i}.attn_gate.weight"].data),
                                  g[:, 2 * dk + (nv // nk) * dv:].reshape(-1, H))


def test_convert_q4_k_experts_and_row_fallback(tmp_path):
    from tidal.synth import preset_config, write_checkpoint

    cfg = preset_config("tiny")
    cfg.update(hidden_size=256, moe_intermediate_size=256)  # Q4_K rows are 256 wide
    src = write_checkpoint(cfg, tmp_path / "ck", progress=False)
    r, t = _read(tg.convert(src, tmp_path / "q.gguf", expert_type="q4_k", workers=2, progress=False))
    assert t["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert t["blk.0.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert r.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # tiny preset (hidden 128): rows of 128 cannot hold Q4_K blocks -> Q8_0, as llama.cpp falls back
    src2 = write_checkpoint(preset_config("tiny"), tmp_path / "ck2", progress=False)
    _, t2 = _read(tg.convert(src2, tmp_path / "q2.gguf", expert_type="q4_k", workers=1, progress=False))
    assert t2["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_convert_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        tg.convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(NotImplementedError, match="dense MLP layers"):
        tg.convert(GOLDEN / "qwen3_moe", tmp_path / "x.gguf")
    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotImplementedError, match="no GGUF mapping"):
        tg.convert(d, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unknown GGUF tensor type"):
        tg.convert(GOLDEN / "qwen3_next", tmp_path / "x.gguf", expert_type="iq2_xs")
    assert not (tmp_path / "x.gguf").exists()
    assert tg.main([str(GOLDEN / "qwen3_moe"), str(tmp_path / "x.gguf")]) == 2


def test_tokenizer_json_becomes_gpt2_vocab(tmp_path):
    out = tg.convert(MINI, tmp_path / "mini.gguf", expert_type="q8_0", workers=1, progress=False)
    r, _ = _read(out)
    tok = json.loads((MINI / "tokenizer.json").read_text())
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    cfg = json.loads((MINI / "config.json").read_text())
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert len(tokens) == cfg["vocab_size"] and len(set(tokens)) == len(tokens)
    for text, i in list(tok["model"]["vocab"].items())[:50]:
        assert tokens[i] == text
    assert len(r.fields["tokenizer.ggml.merges"].contents()) == len(tok["model"]["merges"])
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == cfg["eos_token_id"]


def test_convert_prepacked_synth_regenerates_its_experts(tmp_path):
    """A synthetic checkpoint with pre-packed experts converts to the same GGUF as its BF16 twin
    (same seed): the experts are drawn again from their recorded streams."""
    from tidal.synth import preset_config, write_checkpoint

    cfg = preset_config("tiny")
    cfg.update(hidden_size=256, moe_intermediate_size=256)
    a = write_checkpoint(cfg, tmp_path / "bf16", progress=False, seed=3)
    b = write_checkpoint(cfg, tmp_path / "int4", progress=False, seed=3, expert_dtype="int4")
    _, ta = _read(tg.convert(a, tmp_path / "a.gguf", workers=2, progress=False))
    _, tb = _read(tg.convert(b, tmp_path / "b.gguf", workers=2, progress=False))
    assert list(ta) == list(tb)
    for name in ta:
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data), err_msg=name)
    conf = json.loads((b / "config.json").read_text())
    del conf["tidal_synth"]
    (b / "config.json").write_text(json.dumps(conf))
    with pytest.raises(NotImplementedError, match="not from tidal.synth"):
        tg.convert(b, tmp_path / "c.gguf", workers=1, progress=False)
