# SPDX-License-Identifier: Apache-2.0
"""Chat and sessions: the seed use case (two turns with preserve_thinking), state reuse that gives the
same tokens as a fresh prefill, Sequence.truncate/checkpoint exactness, tool calls through chat."""

import numpy as np
import pytest
import tidal
from conftest import GOLDEN, MINI
from tolerances import GOLDEN_LOGITS_ATOL


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(MINI, progress=False)


GREEDY = dict(temperature=0, repetition_penalty=1.3, max_new_tokens=120)


def test_seed_use_case_preserve_thinking(rt):
    """Two chat turns with preserve_thinking: the second prompt contains the first turn's reasoning."""
    s = rt.session(preserve_thinking=True, **GREEDY)
    first = s.chat("Write a Python function `is_even(n)`.")
    assert first.reasoning and first.content, "the model thinks, then answers"
    assert s.messages[-1] == first.message and first.message["reasoning_content"] == first.reasoning
    second = s.chat("Now write `is_odd(n)`.")
    prompt = s.last_prompt
    assert f"<think>\n{first.reasoning}\n</think>\n\n{first.content}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nNow write `is_odd(n)`.<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert second.cached_tokens > first.prompt_tokens + len(first.token_ids) // 2  # the turn-1 state was reused
    # Without preserve_thinking the template drops turn 1's reasoning from the history.
    s2 = rt.session(**GREEDY)
    a = s2.chat("Write a Python function `is_even(n)`.")
    s2.chat("Now write `is_odd(n)`.")
    assert a.reasoning not in s2.last_prompt and a.content in s2.last_prompt


@pytest.mark.parametrize("preserve", [True, False])
def test_session_equals_fresh_prefill(rt, preserve):
    """Turn 2 through the session (cached prefix, rewound DeltaNet state) gives exactly the tokens of a
    stateless chat over the same messages (full prefill)."""
    s = rt.session(preserve_thinking=preserve, **GREEDY)
    s.chat("Write a function that reverses a string.")
    second = s.chat("Add a docstring.")
    fresh = rt.chat(s.messages[:-1], preserve_thinking=preserve, **GREEDY)
    assert second.cached_tokens > 0 and fresh.cached_tokens == 0
    assert second.token_ids == fresh.token_ids
    assert second.content == fresh.content and second.reasoning == fresh.reasoning


def test_session_history_edit_and_reset(rt):
    s = rt.session(**GREEDY)
    s.chat("Write is_even(n).")
    s.chat("Now is_odd(n).")
    # Replace the history with a different conversation: state rewinds as far as needed.
    msgs = [{"role": "user", "content": "Write is_even(n)."}, s.messages[1], {"role": "user", "content": "Sum a list."}]
    r = s.chat(msgs)
    fresh = rt.chat(msgs, **GREEDY)
    assert r.token_ids == fresh.token_ids and r.cached_tokens > 0
    s.reset()
    assert s.messages == [] and s.num_cached_tokens == 0
    with pytest.raises(ValueError, match="empty"):
        s.chat()


def test_cancelled_stream_keeps_session_consistent(rt):
    s = rt.session(**GREEDY)
    s.chat("Write is_even(n).")
    stream = s.chat("Now is_odd(n).", stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert [m["role"] for m in s.messages] == ["user", "assistant"]  # the cancelled turn is undone
    r = s.chat("Now is_odd(n).")
    assert r.token_ids == rt.chat(s.messages[:-1], **GREEDY).token_ids


def test_session_recovers_from_unrecorded_tokens(rt):
    """If a native step appended tokens the session did not record (Ctrl-C as the call returned), the
    next turn rewinds past them: same tokens as a fresh prefill."""
    s = rt.session(**GREEDY)
    s.chat("Write is_even(n).")
    s._seq.forward(rt.encode(" stray tokens"))  # what an interrupted step leaves behind
    r = s.chat("Now is_odd(n).")
    assert r.token_ids == rt.chat(s.messages[:-1], **GREEDY).token_ids


def test_sampled_replies_are_mostly_reused(rt):
    """With sampling, the template's re-rendering of a reply can differ from the sampled tokens (a
    tokenisation the tokenizer would not produce). Checkpoints saved during decoding keep most of the
    reply reusable anyway."""
    reused = []
    for seed in range(6):
        s = rt.session(preserve_thinking=True, max_new_tokens=200, seed=seed, repetition_penalty=1.3)
        first = s.chat("Write a Python function `is_even(n)`.")
        second = s.chat("Now write `is_odd(n)`.", max_new_tokens=1)
        reused.append((second.cached_tokens - first.prompt_tokens) / max(1, first.completion_tokens))
        fresh = rt.chat(s.messages[:-1], preserve_thinking=True, max_new_tokens=1, seed=seed, repetition_penalty=1.3)
        assert second.token_ids == fresh.token_ids
    assert sum(reused) / len(reused) > 0.5, reused


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_moe"])
def test_truncate_and_checkpoint_are_exact(arch):
    """Sequence.truncate: exact cut for attention-only models, back to the latest checkpoint for
    hybrids; re-fed tokens then give the logits of a fresh sequence."""
    g = tidal.Runtime.load(GOLDEN / arch, progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, g.config.vocab_size, 40).tolist()
    seq = g.new_sequence()
    seq.forward(ids[:10])
    seq.checkpoint()
    seq.forward(ids[10:25])
    seq.checkpoint()
    seq.forward(ids[25:31] + rng.integers(0, g.config.vocab_size, 6).tolist())  # then a branch to throw away
    pos = seq.truncate(30)
    hybrid = arch != "qwen3_moe"
    assert pos == (25 if hybrid else 30)
    assert seq.checkpoint_positions == ([10, 25] if hybrid else [])
    got = seq.forward(ids[pos:])
    want = g.logits(ids)[pos:]
    np.testing.assert_allclose(got, want, atol=GOLDEN_LOGITS_ATOL)
    assert seq.truncate(5) == (0 if hybrid else 5) and seq.num_tokens == (0 if hybrid else 5)
    assert seq.checkpoint_positions == []
    with pytest.raises(ValueError, match="truncate"):
        seq.truncate(-1)


def test_checkpoints_are_bounded(rt):
    seq = rt.new_sequence()
    for i in range(12):
        seq.forward([10 + i])
        seq.checkpoint()
    assert seq.checkpoint_positions == list(range(5, 13))  # at most 8, oldest dropped
    assert rt.stats().memory["state_checkpoints"] > 0


class ScriptedSequence:
    """Stands in for a Sequence: returns a fixed reply token by token (to drive the text pipeline
    deterministically with a reply the small model would not write)."""

    def __init__(self, reply_ids):
        self.reply = list(reply_ids)
        self.num_tokens = 0

    def step(self, ids, sampler):
        self.num_tokens += len(ids)
        return self.reply.pop(0)


def test_scripted_tool_call_reply_streams_and_parses(rt):
    from tidal.generation import SamplingOptions, run

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    reply = ("The user asks for weather.\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    ids = rt.encode(reply) + [rt.tokenizer.token_to_id("<|im_end|>")]
    opts = SamplingOptions.resolve(rt.generation_config, rt.eos_token_ids, temperature=0, max_new_tokens=500)
    result = tidal.ChatResult()
    chunks = list(run(ScriptedSequence(ids), [1, 2], [1, 2], opts, result, tokenizer=rt.tokenizer,
                      in_reasoning=True, tools=tools))
    assert result.reasoning == "The user asks for weather."
    assert result.content == "Let me check.\n\n" and result.finish_reason == "stop"
    assert [c.tool_call["function"] for c in chunks if c.channel == "tool_call"] == \
        [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]
    assert result.message["content"] == "Let me check." and result.message["tool_calls"] == result.tool_calls
    # Sent back with a tool result, the template renders the call as the model wrote it.
    msgs = [{"role": "user", "content": "Weather?"}, result.message, {"role": "tool", "content": "18C"}]
    text = rt.render_chat(msgs, tools=tools)
    assert "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>" in text
    assert "<tool_response>\n18C\n</tool_response>" in text


def _chat_cases():
    import json

    from conftest import CHAT_FIXTURE

    return json.loads(CHAT_FIXTURE.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", _chat_cases(), ids=lambda c: c["name"])
def test_runtime_renders_and_tokenizes_like_transformers(rt, case):
    """rt.render_chat + rt.encode (the path chat() and sessions take) give transformers' text and ids."""
    kw = dict(case["kwargs"])
    agp = kw.pop("add_generation_prompt", False)
    text = rt.render_chat(case["messages"], add_generation_prompt=agp, **kw)
    assert text == case["text"]
    assert rt.encode(text) == case["ids"]
