# SPDX-License-Identifier: Apache-2.0
"""The shipped default model (models/tidal-mini): checkpoint layout, tokenizer, chat template, output.

Its logits against transformers are checked with the other golden cases (test_generate_golden.py).
"""

import ast
import json

import numpy as np
import pytest
import tidal
from conftest import CHAT_FIXTURE, MINI, read_safetensors
from tidal.chat_template import ChatTemplate
from tokenizers import Tokenizer

QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
              "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def config():
    return json.loads((MINI / "config.json").read_text())


@pytest.fixture(scope="module")
def shapes():
    index = json.loads((MINI / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        header, _ = read_safetensors(MINI / shard)
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    assert set(out) == set(index["weight_map"]), "index and shards disagree"
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(MINI / "tokenizer.json"))


def test_checkpoint_is_a_qwen3_6_text_checkpoint_under_40_mb(config, shapes):
    total = sum((MINI / f).stat().st_size for f in {p.name for p in MINI.glob("*.safetensors")})
    assert total < 40e6, f"checkpoint is {total / 1e6:.1f} MB"
    assert config["model_type"] == "qwen3_5_moe_text"
    assert config["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert config["mtp_num_hidden_layers"] == 1
    assert all(dtype == "BF16" for dtype, _ in shapes.values())
    # routed experts in the published Qwen3.5/3.6 BF16 layout: fused 3-D, gate rows first, no `.weight`
    e, i, h = config["num_experts"], config["moe_intermediate_size"], config["hidden_size"]
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"][1] == [e, 2 * i, h]
    assert shapes["model.layers.0.mlp.experts.down_proj"][1] == [e, h, i]


def test_mtp_head_named_and_shaped_as_published(config, shapes):
    h, e, i = config["hidden_size"], config["num_experts"], config["moe_intermediate_size"]
    nh, nkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    expect = {
        "mtp.fc.weight": [h, 2 * h],
        "mtp.pre_fc_norm_embedding.weight": [h],
        "mtp.pre_fc_norm_hidden.weight": [h],
        "mtp.norm.weight": [h],
        "mtp.layers.0.input_layernorm.weight": [h],
        "mtp.layers.0.post_attention_layernorm.weight": [h],
        "mtp.layers.0.self_attn.q_proj.weight": [2 * nh * d, h],
        "mtp.layers.0.self_attn.k_proj.weight": [nkv * d, h],
        "mtp.layers.0.self_attn.v_proj.weight": [nkv * d, h],
        "mtp.layers.0.self_attn.o_proj.weight": [h, nh * d],
        "mtp.layers.0.self_attn.q_norm.weight": [d],
        "mtp.layers.0.self_attn.k_norm.weight": [d],
        "mtp.layers.0.mlp.gate.weight": [e, h],
        "mtp.layers.0.mlp.experts.gate_up_proj": [e, 2 * i, h],
        "mtp.layers.0.mlp.experts.down_proj": [e, h, i],
        "mtp.layers.0.mlp.shared_expert.gate_proj.weight": [config["shared_expert_intermediate_size"], h],
        "mtp.layers.0.mlp.shared_expert.up_proj.weight": [config["shared_expert_intermediate_size"], h],
        "mtp.layers.0.mlp.shared_expert.down_proj.weight": [h, config["shared_expert_intermediate_size"]],
        "mtp.layers.0.mlp.shared_expert_gate.weight": [1, h],
    }
    got = {k: shapes.get(k, (None, None))[1] for k in expect}
    assert got == expect
    mtp = {k for k in shapes if k.startswith("mtp.")}
    assert not any(k.startswith("mtp.layers.0.linear_attn") for k in mtp), "MTP layer is full attention"
    assert "mtp.embed_tokens.weight" not in mtp and "mtp.lm_head.weight" not in mtp  # shared with the trunk


def test_tokenizer_carries_qwen_added_tokens(tok, config):
    assert tok.get_vocab_size() == config["vocab_size"] == 8192
    ids = [tok.token_to_id(t) for t in QWEN_ADDED]
    assert ids == list(range(8192 - len(QWEN_ADDED), 8192)), "added tokens in Qwen's order at the top"
    for t in QWEN_ADDED:  # each is one token, also inside text
        assert tok.encode(f"a{t}b", add_special_tokens=False).tokens[1] == t
    gen = json.loads((MINI / "generation_config.json").read_text())
    assert tok.token_to_id("<|im_end|>") in gen["eos_token_id"]
    assert config["eos_token_id"] == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # comment\n\n\nclass A:\n    pass\n",
    "naïve café — 日本語 🚀 Ω≈ç\ttab\r\nwindows line",
    "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n",
    "",
])
def test_tokenizer_round_trips(tok, text):
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def chat_cases():
    return json.loads(CHAT_FIXTURE.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", chat_cases(), ids=lambda c: c["name"])
def test_chat_template_renders_like_transformers(case, tok):
    template = ChatTemplate.from_checkpoint(MINI)
    text = template.render(case["messages"], **case["kwargs"])
    assert text == case["text"]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == case["ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_preserve_thinking_keeps_earlier_reasoning_in_the_prompt():
    template = ChatTemplate.from_checkpoint(MINI)
    turn1 = [{"role": "user", "content": "Write is_even(n)."},
             {"role": "assistant", "reasoning_content": "Use n % 2.", "content": "def is_even(n): ..."},
             {"role": "user", "content": "Now is_odd(n)."}]
    kept = template.render(turn1, add_generation_prompt=True, preserve_thinking=True)
    dropped = template.render(turn1, add_generation_prompt=True)
    assert "<think>\nUse n % 2.\n</think>" in kept
    assert "Use n % 2." not in dropped
    assert kept.endswith("<|im_start|>assistant\n<think>\n")


def test_chat_template_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="No user query"):
        ChatTemplate.from_checkpoint(MINI).render([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="syntax error"):
        ChatTemplate("{% if %}")
    with pytest.raises(FileNotFoundError):
        ChatTemplate.from_checkpoint(tmp_path)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="tools\\[0\\] must be a JSON-schema dict"):
        ChatTemplate.from_checkpoint(MINI).render(user, tools=[len])
    with pytest.raises(NotImplementedError, match="continue_final_message"):
        ChatTemplate.from_checkpoint(MINI).render(user + [{"role": "assistant", "content": "he"}],
                                                  continue_final_message=True)
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        ChatTemplate.from_checkpoint(MINI).render(user + ["oops"])


def test_greedy_completion_is_python(tok):
    """The README's main command: the completion of a function header parses as Python."""
    rt = tidal.Runtime.load(MINI)
    prompt = "def read_lines(path):\n"
    out = rt.generate(tok.encode(prompt).ids, max_new_tokens=64, temperature=0)
    text = prompt + tok.decode(list(out.token_ids))
    complete = text[: text.rfind("\n") + 1]  # drop the line cut off by max_new_tokens
    ast.parse(complete)
    assert complete.count("\n") >= 4


def test_routing_trace_is_a_valid_trace(config):
    z = np.load(MINI / "routing_trace.npz")
    t, layers, k = z["experts"].shape
    assert (layers, k) == (config["num_hidden_layers"], config["num_experts_per_tok"])
    assert z["token_ids"].shape == (t,) and t >= 4096
    assert z["experts"].min() >= 0 and z["experts"].max() < config["num_experts"]
    rows = np.sort(z["experts"].reshape(-1, k), axis=1)
    assert (np.diff(rows, axis=1) > 0).all(), "the k experts of a token and layer are distinct"
