# SPDX-License-Identifier: Apache-2.0
"""`tidal serve`: an OpenAI-compatible HTTP server for one loaded model (FastAPI + uvicorn).

    tidal serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events, or not), GET /health, GET /metrics (Prometheus text). Requests take the fields OpenAI clients
send (messages, tools / tool_choice, temperature, top_p, max_tokens / max_completion_tokens, stop,
seed, presence / frequency penalties) plus vLLM's top_k, min_p, repetition_penalty, ignore_eos and
chat_template_kwargs (enable_thinking, preserve_thinking). Replies carry `reasoning_content` apart from
`content`, `tool_calls`, `finish_reason` and `usage`. Errors use OpenAI's shape
({"error": {"message", "type", "param", "code"}}) with the matching HTTP status.

Each request runs on its own sequence; the runtime's batching scheduler (C++, Boost.Asio:
`Runtime.enable_batching`, which create_app turns on) decodes the concurrent sequences together, one
token of each per step, so every routed expert is read from RAM once per step for all the requests
routed to it, and prefills prompts in chunks between decode steps. A bounded number of requests is
admitted (the scheduler's `try_admit`); beyond it the server answers 503 instead of queueing without
limit. A client that disconnects cancels its request (also during a long prefill), and
`--request-timeout` bounds each request's time (504, or an error event in a stream).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request).
import argparse
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Iterator

__all__ = ["create_app", "main"]

_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "presence_penalty": float,
             "frequency_penalty": float, "repetition_penalty": float, "seed": int}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: "str | None" = None,
                 code: "str | None" = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _generation_args(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling and stopping fields of a request, checked, as Runtime.generate keywords."""
    out: dict[str, Any] = {}
    for name, kind in _SAMPLING.items():
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise APIError(400, f"'{name}' must be a {'integer' if kind is int else 'number'}, got {v!r}", param=name)
        out[name] = kind(v)
    n = body.get("max_completion_tokens")
    if n is None:
        n = body.get("max_tokens")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise APIError(400, f"'max_tokens' must be a positive integer, got {n!r}", param="max_tokens")
        out["max_new_tokens"] = n
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 of them", param="stop")
        out["stop"] = stop
    if body.get("ignore_eos") is not None:  # vLLM's extra field: generate max_tokens regardless of EOS
        if not isinstance(body["ignore_eos"], bool):
            raise APIError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
        out["ignore_eos"] = body["ignore_eos"]
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        calls = []
        for c in m.get("tool_calls") or []:  # arguments arrive as JSON text; Qwen's templates read mappings
            c = json.loads(json.dumps(c))
            fn = c.get("function") or {}
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass
            calls.append(c)
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def _openai_tool_call(c: dict[str, Any], index: int) -> dict[str, Any]:
    fn = dict(c.get("function") or {})
    if not isinstance(fn.get("arguments"), str):
        fn["arguments"] = json.dumps(fn.get("arguments", {}), ensure_ascii=False)
    return {"index": index, "id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": fn}


class _Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.active = 0


def create_app(rt: Any, *, model_name: str, api_key: "str | None" = None, max_requests: int = 16,
               max_batch: int = 32, batch_wait: float = 0.003, prefill_chunk: int = 512,
               request_timeout: "float | None" = None) -> Any:
    """The FastAPI application serving `rt` (a loaded tidal.Runtime) as `model_name`. Turns on the
    runtime's batching scheduler (max_requests, max_batch, batch_wait, prefill_chunk: see
    Runtime.enable_batching) unless it already runs, in which case its own limits apply. At most
    max_requests requests run or wait at once; more get 503. `request_timeout`: seconds a request may
    take (None: no limit)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    from ._tidal import Busy

    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if not rt.batching:
        rt.enable_batching(max_batch=max_batch, max_requests=max_requests, prefill_chunk=prefill_chunk,
                           batch_wait=batch_wait)
    limit = rt.scheduler_stats()["max_requests"]
    app = FastAPI(title="tidal", docs_url=None, redoc_url=None)
    metrics = _Metrics()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        with metrics.lock:
            metrics.errors += 1
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        with metrics.lock:
            metrics.errors += 1
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                            status_code=500)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404 / 405 routes
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     "invalid_request_error").body(), status_code=exc.status_code)

    class _Auth:  # plain ASGI, not BaseHTTPMiddleware: that one hides client disconnects from endpoints
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if api_key is not None and scope["type"] == "http":
                given = ""
                for k, v in scope.get("headers", []):
                    if k.lower() == b"authorization":
                        given = v.decode("latin-1")
                if not (given[:7].lower() == "bearer " and hmac.compare_digest(given[7:].encode(), api_key.encode())):
                    resp = JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                 "authentication_error", code="invalid_api_key").body(),
                                        status_code=401)
                    await resp(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(_Auth)

    async def _body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 64 << 20:
            raise APIError(413, "request body over 64 MiB")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"model '{model}' does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")
        return body

    def _admit() -> Any:
        try:
            ticket = rt.try_admit()
        except Busy:
            raise APIError(503, f"server busy: {limit} requests already running or waiting; retry later",
                           "server_error", code="busy") from None
        with metrics.lock:
            metrics.requests += 1
            metrics.active += 1
        return ticket

    def _release(ticket: Any) -> None:
        with metrics.lock:
            metrics.active -= 1
        ticket.release()

    def _count(result: Any) -> dict[str, int]:
        with metrics.lock:
            metrics.prompt_tokens += result.prompt_tokens
            metrics.completion_tokens += result.completion_tokens
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def _start(kind: str, body: dict[str, Any]) -> Any:
        gen = _generation_args(body)
        try:
            if kind == "chat":
                tools = body.get("tools")
                if body.get("tool_choice") == "none":
                    tools = None
                kw = body.get("chat_template_kwargs") or {}
                if not isinstance(kw, dict):
                    raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
                kw = dict(kw)
                return rt.chat(_messages(body), stream=True, tools=tools or None,
                               enable_thinking=kw.pop("enable_thinking", None),
                               preserve_thinking=kw.pop("preserve_thinking", None), chat_template_kwargs=kw, **gen)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
                raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt")
            return rt.generate(prompt, stream=True, **gen)
        except APIError:
            raise
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise APIError(400, str(exc)) from None

    def _drain(stream: Any) -> Any:
        with stream:
            for _ in stream:
                pass
        return stream.result

    async def _handle(request: Request, kind: str) -> Any:
        body = await _body(request)
        streaming = body.get("stream", False)
        if not isinstance(streaming, bool) and streaming is not None:
            raise APIError(400, "'stream' must be a boolean", param="stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = bool((opts or {}).get("include_usage"))
        ticket = _admit()
        released = threading.Event()
        release_lock = threading.Lock()

        def cleanup(stream: Any = None) -> None:  # the slot exactly once, whichever path gets here first
            if stream is not None:
                try:
                    stream.close()
                except ValueError:  # a worker thread is inside a step: that step raises Cancelled
                    stream.cancel()
            with release_lock:  # runs in the event loop and in a worker thread
                if released.is_set():
                    return
                released.set()
            _release(ticket)

        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            stream = await run_in_threadpool(_start, kind, body)
        except BaseException:
            cleanup()
            raise
        if request_timeout is not None:
            stream.set_deadline(request_timeout)
        if not streaming:
            try:
                work = asyncio.ensure_future(run_in_threadpool(_drain, stream))
                while not work.done():  # a client that leaves cancels its request
                    await asyncio.wait({work}, timeout=0.25)
                    if not work.done() and await request.is_disconnected():
                        stream.cancel()
                try:
                    result = work.result()
                except TimeoutError:
                    raise APIError(504, f"the request took longer than --request-timeout ({request_timeout} s)",
                                   "server_error", code="timeout") from None
            finally:
                cleanup(stream)
            usage = _count(result)
            if kind == "chat":
                content = result.content.strip() if result.tool_calls else result.content
                msg: dict[str, Any] = {"role": "assistant", "content": content or (None if result.tool_calls else "")}
                if result.reasoning:
                    msg["reasoning_content"] = result.reasoning
                if result.tool_calls:
                    msg["tool_calls"] = [_openai_tool_call(c, i) for i, c in enumerate(result.tool_calls)]
                finish = "tool_calls" if result.tool_calls and result.finish_reason == "stop" else result.finish_reason
                choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": result.text or "", "logprobs": None,
                          "finish_reason": result.finish_reason}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": [choice], "usage": usage})
        # The background task also runs when the response is cancelled before the generator starts
        # (the client left at once): the slot and the sequence are freed either way.
        return StreamingResponse(_sse(request, stream, kind, rid, include_usage, cleanup),
                                 media_type="text/event-stream", background=BackgroundTask(cleanup, stream))

    async def _sse(request: Request, stream: Any, kind: str, rid: str, include_usage: bool, cleanup: Any) -> Any:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        now = int(time.time())

        def event(choice: "dict[str, Any] | None", usage: "dict[str, int] | None" = None) -> str:
            d: dict[str, Any] = {"id": rid, "object": obj, "created": now, "model": model_name,
                                 "choices": [choice] if choice is not None else []}
            if usage is not None:
                d["usage"] = usage
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        it: Iterator[Any] = iter(stream)
        ncalls = 0
        try:
            if kind == "chat":
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while True:
                if await request.is_disconnected():
                    return  # finally: the stream is closed, its sequence freed
                try:
                    chunk = await run_in_threadpool(next, it, None)
                except Exception as exc:  # after the 200: say so in the stream (OpenAI error shape)
                    err = APIError(504, f"the request took longer than --request-timeout ({request_timeout} s)",
                                   "server_error", code="timeout") if isinstance(exc, TimeoutError) else \
                        APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    with metrics.lock:
                        metrics.errors += 1
                    return
                if chunk is None:
                    break
                if chunk.channel == "end":
                    finish = "tool_calls" if ncalls and kind == "chat" and chunk.finish_reason == "stop" \
                        else chunk.finish_reason
                    yield event({"index": 0, "delta": {}, "finish_reason": finish} if kind == "chat"
                                else {"index": 0, "text": "", "finish_reason": finish})
                    continue
                if kind != "chat":
                    if chunk.text:
                        yield event({"index": 0, "text": chunk.text, "finish_reason": None})
                    continue
                if chunk.channel == "tool_call" and chunk.tool_call is not None:
                    delta = {"tool_calls": [_openai_tool_call(chunk.tool_call, ncalls)]}
                    ncalls += 1
                elif chunk.channel == "reasoning":
                    delta = {"reasoning_content": chunk.text}
                else:
                    delta = {"content": chunk.text}
                if chunk.text or "tool_calls" in delta:
                    yield event({"index": 0, "delta": delta, "finish_reason": None})
            usage = _count(stream.result)
            if include_usage:
                yield event(None, usage)
            yield "data: [DONE]\n\n"
        finally:
            cleanup(stream)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tidal"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _handle(request, "completion")

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        st = rt.stats()
        with metrics.lock:
            lines = [
                "# TYPE tidal_requests_total counter", f"tidal_requests_total {metrics.requests}",
                "# TYPE tidal_request_errors_total counter", f"tidal_request_errors_total {metrics.errors}",
                "# TYPE tidal_requests_active gauge", f"tidal_requests_active {metrics.active}",
                "# TYPE tidal_prompt_tokens_total counter", f"tidal_prompt_tokens_total {metrics.prompt_tokens}",
                "# TYPE tidal_generation_tokens_total counter",
                f"tidal_generation_tokens_total {metrics.completion_tokens}",
            ]
        lines += ["# TYPE tidal_decode_tokens_per_second gauge",
                  f"tidal_decode_tokens_per_second {st.decode_tokens_per_second or 0.0:.3f}",
                  "# TYPE tidal_prefill_tokens_per_second gauge",
                  f"tidal_prefill_tokens_per_second {st.prefill_tokens_per_second or 0.0:.3f}",
                  "# TYPE tidal_live_sequences gauge", f"tidal_live_sequences {st.live_sequences}",
                  "# TYPE tidal_memory_bytes gauge"]
        for k, v in (st.memory or {}).items():
            if isinstance(v, (int, float)):
                lines.append(f'tidal_memory_bytes{{kind="{k}"}} {v}')
        sched = rt.scheduler_stats()
        if sched:
            steps = sched["decode_steps"]
            lines += ["# TYPE tidal_scheduler_queue gauge", f"tidal_scheduler_queue {sched['queued']}",
                      "# TYPE tidal_decode_steps_total counter", f"tidal_decode_steps_total {steps}",
                      "# TYPE tidal_decode_rows_total counter", f"tidal_decode_rows_total {sched['decode_rows']}",
                      "# TYPE tidal_decode_batch_mean gauge",
                      f"tidal_decode_batch_mean {sched['decode_rows'] / steps if steps else 0.0:.3f}",
                      "# TYPE tidal_requests_rejected_total counter",
                      f"tidal_requests_rejected_total {sched['rejected']}",
                      "# TYPE tidal_requests_cancelled_total counter",
                      f"tidal_requests_cancelled_total {sched['cancelled']}",
                      "# TYPE tidal_requests_timed_out_total counter",
                      f"tidal_requests_timed_out_total {sched['deadline_exceeded']}"]
        hit = st.expert_cache_hit_rate
        lines += ["# TYPE tidal_expert_cache_hit_rate gauge",
                  f"tidal_expert_cache_hit_rate {hit if isinstance(hit, (int, float)) else 'NaN'}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(prog="tidal serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory or .gguf file")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("TIDAL_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every request (default: $TIDAL_API_KEY, else none)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients use (default: the path's name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--max-context", type=int, default=None,
                    help="tokens one request may hold, prompt and completion (default: the model's context)")
    ap.add_argument("--max-requests", type=int, default=16, help="requests running or waiting before 503")
    ap.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per step")
    ap.add_argument("--batch-wait", type=float, default=0.003,
                    help="seconds a decode step waits for the other running requests to join it")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="prompt tokens per turn; decode steps of other requests run between chunks")
    ap.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take (default: no limit)")
    a = ap.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("tidal serve: needs FastAPI and uvicorn: pip install 'tidal[serve]'", file=sys.stderr)
        return 2
    from .runtime import Runtime

    kw: dict[str, Any] = {"device": a.device, "cpu_threads": a.cpu_threads}
    if a.gpu_memory:
        kw["gpu_memory"] = a.gpu_memory
    if a.max_context:
        kw["max_context"] = a.max_context
    rt = Runtime.load(a.model, **kw)
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    app = create_app(rt, model_name=name, api_key=a.api_key, max_requests=a.max_requests, max_batch=a.max_batch,
                     batch_wait=a.batch_wait, prefill_chunk=a.prefill_chunk, request_timeout=a.request_timeout)
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
