# SPDX-License-Identifier: Apache-2.0
"""`tidal serve` (tidal.serve) on tidal-mini, driven by the official `openai` client: chat and
completions, streaming equal to non-streaming, stop strings, seed reproducibility, concurrent streams
equal to sequential runs, cancellation, errors in OpenAI's shape, API key, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import pytest

import tidal
from conftest import MINI

fastapi = pytest.importorskip("fastapi", reason="tidal serve needs FastAPI and uvicorn (pip install 'tidal[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="tidal serve needs FastAPI and uvicorn (pip install 'tidal[serve]')")
openai = pytest.importorskip("openai", reason="the tests drive the server with the official openai client")
httpx = pytest.importorskip("httpx", reason="raw HTTP checks use httpx (pip install httpx)")

from tidal.serve import create_app  # noqa: E402

NAME = "tidal-mini"
MSGS = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


class _Server:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def rt():
    return tidal.Runtime.load(MINI, progress=False)


@pytest.fixture(scope="module")
def server(rt):
    s = _Server(create_app(rt, model_name=NAME, max_requests=8))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_matches_the_runtime_and_streams_the_same(client, rt):
    want = rt.chat(MSGS, max_new_tokens=24, temperature=0)
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.content
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.token_ids)
    parts, finish, usage = [], None, None
    for ev in client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=24, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == want.content and finish == want.finish_reason
    assert usage is not None and usage.completion_tokens == len(want.token_ids)


def test_thinking_is_returned_apart_and_preserved(client, rt):
    """enable_thinking opens a reasoning block that comes back as reasoning_content; a second turn with
    preserve_thinking accepts the assistant message as returned (reasoning included)."""
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=32, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
    assert reasoning  # the prompt opens <think>: everything until </think> (or the limit) is reasoning
    turn2 = MSGS + [{"role": "assistant", "content": msg.content or "", "reasoning_content": reasoning},
                    {"role": "user", "content": "Now subtract them."}]
    r2 = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=8, temperature=0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True,
                                                                             "preserve_thinking": True}})
    # The second prompt is exactly what the template makes of the conversation with its reasoning kept.
    want = rt.encode(rt.render_chat(turn2, enable_thinking=True, preserve_thinking=True))
    assert r2.usage.prompt_tokens == len(want)
    assert reasoning.strip()[:20] in rt.render_chat(turn2, enable_thinking=True, preserve_thinking=True)


def test_completions_stop_and_seed(client, rt):
    prompt = "def add(a, b):\n"
    want = rt.generate(prompt, max_new_tokens=16, temperature=0)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == want.text
    stop = want.text[len(want.text) // 2:][:3] if len(want.text) > 6 else None
    if stop:
        rs = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
        assert stop not in rs.choices[0].text and rs.choices[0].finish_reason == "stop"
    a = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=1.0, seed=7)
    b = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_streams_equal_sequential_runs(client, rt):
    prompts = [f"# task {i}\ndef f{i}(x):\n" for i in range(4)]

    def run(p, stream):
        if not stream:
            return client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(model=NAME, prompt=p, max_tokens=12,
                                                                                temperature=0, stream=True)
                       if c.choices)
    sequential = [run(p, False) for p in prompts]
    before = rt.scheduler_stats()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda p: run(p, True), prompts))
    assert parallel == sequential
    st = rt.scheduler_stats()  # the server's scheduler decoded them together
    assert st["max_rows"] >= 2 and st["decode_rows"] - before["decode_rows"] > st["decode_steps"] - before["decode_steps"]


def test_cancelling_one_stream_leaves_the_others(client, server, rt):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        other = pool.submit(lambda: client.completions.create(model=NAME, prompt="import os\n", max_tokens=12,
                                                              temperature=0).choices[0].text)
        with httpx.stream("POST", server.url + "/v1/completions",
                          json={"model": NAME, "prompt": "x = 1\n", "max_tokens": 3000, "ignore_eos": True,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first chunk: the connection closes
        assert other.result() == rt.generate("import os\n", max_new_tokens=12, temperature=0).text
    for _ in range(100):  # the cancelled request releases its slot and its sequence
        m = httpx.get(server.url + "/metrics").text
        if "tidal_requests_active 0" in m and rt.stats().live_sequences == 0:
            break
        time.sleep(0.05)
    assert "tidal_requests_active 0" in m
    # Well short of the 3000 tokens asked for: the generation stopped with the connection.
    assert rt.stats().live_sequences == 0


def test_raw_stream_format(server):
    """The SSE stream as OpenAI sends it: a role chunk, content deltas, a finish chunk, a usage chunk
    with no choices, then [DONE]."""
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": NAME, "messages": MSGS, "max_tokens": 5, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert "does not exist" in str(e.value)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": MSGS, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    long_prompt = "word " * 5000  # beyond tidal-mini's 4096-token context
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # still up
    r = httpx.post(server.url + "/v1/responses", json={})
    assert r.status_code == 404 and "error" in r.json()  # unknown routes answer in OpenAI's shape too
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": MSGS, "stream": True,
                                                              "stream_options": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    m = httpx.get(server.url + "/metrics").text
    errors = [int(line.split()[1]) for line in m.splitlines() if line.startswith("tidal_request_errors_total ")]
    assert errors and errors[0] >= 5
    assert "tidal_requests_active 0" in m  # no request kept its slot


def test_api_key_and_busy():
    rt = tidal.Runtime.load(MINI, progress=False)  # its own scheduler, with one request slot
    s = _Server(create_app(rt, model_name=NAME, api_key="sekret", max_requests=1))
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(s.url + "/health").status_code == 401  # checked on every request
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        # One slot: a second request while a long stream holds it gets 503 at once.
        with httpx.stream("POST", s.url + "/v1/completions", headers={"authorization": "Bearer sekret"},
                          json={"model": NAME, "prompt": "x", "max_tokens": 2000, "ignore_eos": True,
                                "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection (and the request)
            first = next(lines)
            assert r.status_code == 200 and first.startswith("data: {"), (r.status_code, first)
            busy = httpx.post(s.url + "/v1/completions", headers={"authorization": "Bearer sekret"},
                              json={"model": NAME, "prompt": "y", "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy"
        h = {"authorization": "Bearer sekret"}
        for _ in range(100):  # the closed stream gives its slot back (once the server sees the disconnect)
            ok = httpx.post(s.url + "/v1/completions", headers=h, json={"model": NAME, "prompt": "y", "max_tokens": 2})
            if ok.status_code == 200:
                break
            time.sleep(0.05)
        assert ok.status_code == 200
        for _ in range(3):  # and so do failing requests: each finds the one slot free
            bad_req = httpx.post(s.url + "/v1/completions", headers=h, json={"model": NAME, "prompt": {}})
            assert bad_req.status_code == 400
        ok = httpx.post(s.url + "/v1/completions", headers=h, json={"model": NAME, "prompt": "y", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_request_timeout_and_non_streaming_disconnect():
    rt = tidal.Runtime.load(MINI, progress=False)
    s = _Server(create_app(rt, model_name=NAME, request_timeout=0.3))
    try:
        long = {"model": NAME, "prompt": "x", "max_tokens": 4000, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=long, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "timeout"
        ok = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200  # short requests still pass
        assert rt.scheduler_stats()["deadline_exceeded"] >= 2
    finally:
        s.stop()
    # A non-streaming client that goes away cancels its request (no timeout on this server).
    s = _Server(create_app(rt, model_name=NAME))
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 4000,
                                                        "ignore_eos": True}, timeout=0.5)
        for _ in range(200):
            if rt.stats().live_sequences == 0:
                break
            time.sleep(0.05)
        assert rt.stats().live_sequences == 0 and rt.scheduler_stats()["cancelled"] >= 1
        m = httpx.get(s.url + "/metrics").text
        assert "tidal_requests_cancelled_total" in m and "tidal_decode_batch_mean" in m
    finally:
        s.stop()


def test_agent_client_example_runs_unchanged(server):
    """examples/agent_client.py: an agent loop as clients write it (streamed tools, preserve_thinking,
    tool results fed back), pointed at the server by OPENAI_BASE_URL / MODEL only."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, OPENAI_BASE_URL=server.url + "/v1", MODEL=NAME)
    p = subprocess.run([sys.executable, str(root / "examples" / "agent_client.py"), "--max-tokens", "48"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["turns"] >= 2 and summary["messages"] >= 5


def test_tidal_serve_command(tmp_path):
    """The CLI: loads the model, binds 127.0.0.1 by default, serves until stopped."""
    import os
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = subprocess.Popen([sys.executable, "-c", "import sys, tidal.cli; sys.exit(tidal.cli.main(sys.argv[1:]))",
                          "serve", str(MINI), "--port", str(port), "--served-model-name", "mini"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "mini":
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"server did not start (exit status {p.poll()})")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "mini", "prompt": "def f():", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        p.terminate()
        p.wait(timeout=20)


def test_tool_call_round_trip_request(client, rt):
    """A conversation that already holds a tool call and its result (as agents send it: arguments as
    JSON text) renders as the chat template renders the same call with mapped arguments."""
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "number"}, "b": {"type": "number"}}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    msgs = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=tools, max_tokens=4, temperature=0)
    mapped = json.loads(json.dumps(msgs))
    mapped[1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    want = rt.encode(rt.render_chat(mapped, tools=tools))
    assert r.usage.prompt_tokens == len(want)
    assert '"a": 2' in rt.render_chat(mapped, tools=tools) or "<parameter=a>" in rt.render_chat(mapped, tools=tools)
