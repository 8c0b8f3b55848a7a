# SPDX-License-Identifier: Apache-2.0
"""Text in, text out: tokenizer round trips, streaming (UTF-8 boundaries, equality with the
non-streamed result, cancellation), stop strings across token boundaries, reasoning/content split and
tool-call parsing."""

import gc
import json

import pytest
import tidal
from conftest import GOLDEN, MINI
from tidal.text import ReasoningSplitter, StopMatcher, ToolCallExtractor, parse_tool_call, prompt_opens_reasoning


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(MINI, progress=False)


TEXTS = ["def read_lines(path):\n    return open(path).read().splitlines()\n",
         "naïve café — 日本語 🚀 Ω≈ç\n\ttabs  and  spaces\r\n",
         "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think>\n\n<tool_call>\n",
         "", " ", "\n\n\n", "x" * 300]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(rt, text):
    ids = rt.encode(text)
    assert rt.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < rt.config.vocab_size for i in ids)


def test_special_tokens_and_eos(rt):
    tok = rt.tokenizer
    im_end = tok.token_to_id("<|im_end|>")
    assert rt.eos_token_ids == [im_end, tok.token_to_id("<|endoftext|>")]
    assert im_end in tok.special_ids and tok.token_to_id("<think>") not in tok.special_ids
    assert rt.encode("<|im_end|>") == [im_end]
    assert rt.decode([im_end]) == "" and rt.decode([im_end], skip_special_tokens=False) == "<|im_end|>"


def test_decode_stream_utf8_boundaries(rt):
    """Multi-byte characters split over several byte-level tokens: every delta is whole characters and
    the deltas join to the one-shot decode."""
    text = "naïve café — 日本語 🚀 Ω≈ç"
    ids = rt.encode(text)
    assert len(ids) > len(text.split()) + 6  # characters really are split across tokens
    ds = rt.tokenizer.decode_stream()
    deltas = [ds.step(i) for i in ids]
    assert "".join(deltas) + ds.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens end mid-character and are held back
    # One-byte-at-a-time feeding of the emoji: nothing until the last byte.
    rocket = rt.encode("🚀")
    ds = rt.tokenizer.decode_stream()
    out = [ds.step(i) for i in rocket]
    assert out[-1] == "🚀" and all(o == "" for o in out[:-1]) and len(rocket) >= 2


def test_stream_equals_result_and_is_valid_utf8(rt):
    kw = dict(max_new_tokens=60, temperature=1.0, seed=9)
    full = rt.generate("# 日本語のコメント\ndef f(x):\n", **kw)
    stream = rt.generate("# 日本語のコメント\ndef f(x):\n", stream=True, **kw)
    chunks = list(stream)
    assert chunks[-1].channel == "end" and chunks[-1].finish_reason == full.finish_reason
    assert "".join(c.text for c in chunks) == full.text == full.content  # no <think> in a code completion
    assert stream.result.token_ids == full.token_ids and stream.result.text == full.text
    for c in chunks:
        c.text.encode("utf-8")  # never a lone surrogate


def test_raw_completion_keeps_leading_newlines(rt):
    """Only the newlines after </think> are dropped; a plain completion is passed through as generated."""
    out = rt.generate("import os", max_new_tokens=8, temperature=0)
    assert out.text.startswith("\n") and out.content == out.text
    assert "".join(c.text for c in rt.generate("import os", max_new_tokens=8, temperature=0, stream=True)) == out.text


def test_stop_string_across_token_boundaries(rt):
    base = rt.generate("def read_lines(path):\n", max_new_tokens=40, temperature=0, repetition_penalty=1.2)
    text = base.text
    # Pick a stop string that starts inside one token and ends inside another.
    ids = base.token_ids
    pieces = [rt.decode([i]) for i in ids]
    starts = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
    k = next(k for k in range(3, len(pieces) - 2) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    stop = text[starts[k] + 1: starts[k + 1] + 2]
    assert text.find(stop) == starts[k] + 1, "the chosen stop string occurs earlier; pick another"
    out = rt.generate("def read_lines(path):\n", max_new_tokens=40, temperature=0, repetition_penalty=1.2, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: starts[k] + 1]
    assert out.token_ids == ids[: k + 2]
    streamed = "".join(c.text for c in rt.generate("def read_lines(path):\n", max_new_tokens=40, temperature=0,
                                                    repetition_penalty=1.2, stop=stop, stream=True))
    assert streamed == out.text


def test_stop_matcher_unit():
    m = StopMatcher(["END", "</x>"])
    out = [m.feed(d) for d in ["ab", "cE", "N", "Dzz"]]
    assert out == ["ab", "c", "", ""] and m.matched == "END"
    m = StopMatcher(["abc"])
    assert m.feed("xab") == "x" and m.feed("d") == "abd" and m.flush() == ""
    m = StopMatcher(["aab"])
    assert m.feed("aaa") == "a" and m.feed("b") == "" and m.matched == "aab"
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_stop_token_ids_and_eos(rt):
    greedy = rt.generate("def read_lines(path):\n", max_new_tokens=20, temperature=0, repetition_penalty=1.2)
    out = rt.generate("def read_lines(path):\n", max_new_tokens=20, temperature=0, repetition_penalty=1.2,
                      stop_token_ids=[greedy.token_ids[5]])
    first = greedy.token_ids.index(greedy.token_ids[5])
    assert out.token_ids == greedy.token_ids[: first + 1] and out.stop_reason == greedy.token_ids[5]
    assert out.text == rt.decode(greedy.token_ids[:first])  # the stop token's text is not output
    chat = rt.chat([{"role": "user", "content": "Write is_even(n)."}], max_new_tokens=400, seed=0,
                   repetition_penalty=1.2, enable_thinking=False)
    assert chat.finish_reason == "stop" and chat.stop_reason in rt.eos_token_ids
    assert "<|im_end|>" not in chat.text and "<|endoftext|>" not in chat.text


def test_cancellation_frees_the_sequence(rt):
    rt.reset_stats()
    before = rt.stats().live_sequences
    n = 0
    for chunk in rt.generate("def f(x):\n", max_new_tokens=400, temperature=1.0, seed=1, stream=True):
        n += 1
        assert rt.stats().live_sequences == before + 1
        if n == 3:
            break
    gc.collect()
    st = rt.stats()
    assert st.live_sequences == before and st.memory["kv_and_state"] == 0
    assert st.decode_tokens <= 5  # generation stopped with the loop
    stream = rt.generate("def f(x):\n", max_new_tokens=400, temperature=0, stream=True)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled" and len(stream.result.token_ids) <= 3
    gc.collect()
    assert rt.stats().live_sequences == before
    # The runtime is usable afterwards.
    assert rt.generate("def f(x):\n", max_new_tokens=3, temperature=0).completion_tokens == 3


def test_reasoning_splitter_unit():
    def run(start, deltas):
        s = ReasoningSplitter(start)
        out = []
        for d in deltas:
            out += s.feed(d)
        out += s.flush()
        r = "".join(t for c, t in out if c == "reasoning")
        return r, "".join(t for c, t in out if c == "content")

    whole = "Plan: add.\n</think>\n\nThe answer."
    for cut in range(len(whole) + 1):  # every split point, including inside the tag
        assert run(True, [whole[:cut], whole[cut:]]) == ("Plan: add.", "The answer.")
    assert run(False, ["<th", "ink>\nwhy\n</th", "ink>\n\nok"]) == ("why", "ok")
    assert run(False, ["plain answer"]) == ("", "plain answer")
    assert run(True, ["line1\n\nline2\n", "more"]) == ("line1\n\nline2\nmore", "")
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<think>\nold\n</think><|im_start|>assistant\n")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}}}}}


def test_tool_call_parsing_xml_and_json():
    xml = "\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n<parameter=days>\n3\n" \
          "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n</function>\n"
    call = parse_tool_call(xml, [WEATHER])
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather",
                                "arguments": {"city": "San Francisco, CA", "days": 3, "metric": True, "hours": [1, 2]}}
    assert parse_tool_call(xml)["function"]["arguments"]["days"] == "3"  # no schema: strings
    js = '\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    assert parse_tool_call(js)["function"] == {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
    assert parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}')["function"]["arguments"] == {"a": 1}
    assert parse_tool_call("{not json") is None and parse_tool_call("hello") is None


def test_tool_call_extractor_streaming():
    text = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}"
            "\n</tool_call>")
    for step in (1, 3, 7, len(text)):
        x = ToolCallExtractor([WEATHER])
        items = []
        for i in range(0, len(text), step):
            items += x.feed(text[i:i + step])
        items += x.flush()
        content = "".join(v for c, v in items if c == "content")
        calls = [v["function"] for c, v in items if c == "tool_call"]
        assert content == "Let me check.\n\n"
        assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                         {"name": "get_weather", "arguments": {"city": "Rome"}}]


def test_chat_result_message_round_trips_through_template(rt):
    """A reply with reasoning and a tool call becomes a message the template renders back to the text
    the model produced (what makes preserve_thinking and tool loops work by appending)."""
    r = tidal.ChatResult(reasoning="I should call the tool.", content="",
                         tool_calls=[parse_tool_call("<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                                                     "</function>", [WEATHER])])
    msgs = [{"role": "user", "content": "Weather in Paris?"}, r.message]
    text = rt.render_chat(msgs, tools=[WEATHER], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nI should call the tool.\n</think>\n\n<tool_call>\n"
                         "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
                         "<|im_end|>\n")


def test_text_needs_a_tokenizer():
    g = tidal.Runtime.load(GOLDEN / "qwen3_next", progress=False)
    assert g.tokenizer is None and g.chat_template is None
    with pytest.raises(ValueError, match="no tokenizer.json"):
        g.generate("hello")
    with pytest.raises(ValueError, match="stop strings need"):
        g.generate([1, 2, 3], stop=["x"])
    out = g.generate([1, 2, 3], max_new_tokens=4)
    assert out.text is None and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="no chat template"):
        g.chat([{"role": "user", "content": "hi"}])


def test_bad_generation_arguments(rt):
    with pytest.raises(TypeError, match="unknown generation argument"):
        rt.chat([{"role": "user", "content": "x"}], temprature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rt.generate("x", max_new_tokens=-2)
    with pytest.raises(ValueError, match="empty"):
        rt.generate("")
    with pytest.raises(ValueError, match="out of range"):
        rt.generate([1, 10**6], stream=True)  # raised when the stream is created
    with pytest.raises(ValueError, match="stop strings"):
        rt.generate("x", stop=[""])
    with pytest.raises(TypeError):
        rt.generate(b"bytes")
    with pytest.raises(TypeError, match="stop must be"):
        rt.generate("x", stop=123)
    with pytest.raises(TypeError, match="stop_token_ids"):
        rt.generate("x", stop_token_ids=5)
    with pytest.raises(ValueError, match="top_k"):
        rt.generate("x", top_k=1.5)
    with pytest.raises(ValueError, match=r"context is 4096 \(max_position_embeddings\)"):
        rt.generate([1] * 4096)
    import numpy as np  # numpy integers are integers
    assert rt.generate(np.array([5, 6]), max_new_tokens=np.int64(2), stop_token_ids=[np.int32(1)],
                       temperature=0).completion_tokens == 2
    assert json.dumps(rt.generate("x", max_new_tokens=0).token_ids) == "[]"
