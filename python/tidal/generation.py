# SPDX-License-Identifier: Apache-2.0
"""Generation results, stream chunks and the token loop that turns engine steps into text.

The numerics (forward passes, penalties, sampling) run in C++ (`Sequence.step` with a `Sampler`,
GIL released); this loop only detokenises, applies stop strings and splits reasoning, content and tool
calls, one token at a time, so streaming and non-streaming results are the same by construction.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import _tidal
from .text import ReasoningSplitter, StopMatcher, ToolCallExtractor

__all__ = ["GenerationResult", "ChatResult", "StreamChunk", "Stream", "SamplingOptions"]

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class StreamChunk:
    """One piece of a streamed generation.

    channel is "reasoning" (inside ``<think>``), "content", "tool_call" (`tool_call` holds the parsed
    call) or "end" (the last chunk: empty text, `finish_reason` set).
    """

    text: str
    channel: str
    tool_call: dict | None = None
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """A finished generation.

    token_ids are the new tokens, including a stop token that ended it; `text` is their decoded text
    up to a stop string (None without a tokenizer), split into `reasoning` and `content`.
    finish_reason: "stop" (stop token or string, see `stop_reason`), "length" (max_new_tokens or the
    context is full) or "cancelled" (the stream was closed early).
    """

    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "length"
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


@dataclass
class ChatResult(GenerationResult):
    """A chat reply. `message` is the assistant message to append to the conversation: with its
    reasoning (`reasoning_content`, what Qwen templates read, so preserve_thinking works by appending)
    and its parsed tool calls."""

    @property
    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content.strip() if self.tool_calls else self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [dict(c) for c in self.tool_calls]
        return msg


@dataclass
class SamplingOptions:
    """Resolved generation options (explicit arguments over generation_config.json over defaults)."""

    max_new_tokens: int
    sampling: dict[str, Any]
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]

    @classmethod
    def resolve(cls, generation_config: Mapping[str, Any], eos_token_ids: Sequence[int], *,
                max_new_tokens: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                **sampling: Any) -> "SamplingOptions":
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        gc = generation_config
        # transformers semantics: without do_sample the checkpoint's default is greedy.
        defaults: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        if gc.get("do_sample"):
            defaults["temperature"] = float(gc.get("temperature", 1.0))
            for k in ("top_k", "top_p", "min_p"):
                if gc.get(k) is not None:
                    defaults[k] = gc[k]
        if gc.get("repetition_penalty") is not None:
            defaults["repetition_penalty"] = float(gc["repetition_penalty"])
        resolved = {k: (sampling[k] if sampling.get(k) is not None else defaults[k]) for k in _SAMPLING_KEYS}
        if not _is_int(resolved["top_k"]):
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {resolved['top_k']!r}")
        resolved["top_k"] = int(resolved["top_k"])
        for k in _SAMPLING_KEYS:
            if k != "top_k":
                if not isinstance(resolved[k], numbers.Real) or isinstance(resolved[k], bool):
                    raise ValueError(f"{k} must be a number, got {resolved[k]!r}")
                resolved[k] = float(resolved[k])
        if max_new_tokens is None:
            max_new_tokens = int(gc.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (an int), got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop)):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        StopMatcher(stops)  # validates
        ids = [] if ignore_eos else list(eos_token_ids)
        if stop_token_ids is not None and isinstance(stop_token_ids, (str, bytes)) or _is_int(stop_token_ids):
            raise TypeError(f"stop_token_ids must be a list of ints, got {stop_token_ids!r}")
        for t in stop_token_ids or []:
            if not _is_int(t):
                raise ValueError(f"stop_token_ids must be ints, got {t!r}")
            ids.append(int(t))
        opts = cls(max_new_tokens, resolved, seed, stops, list(dict.fromkeys(ids)))
        opts.new_sampler([])  # validates ranges in C++ now, not at the first token
        return opts

    def new_sampler(self, prompt_ids: Sequence[int]) -> Any:
        return _tidal.Sampler(**self.sampling, seed=self.seed, prompt_ids=list(prompt_ids))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Stream:
    """Iterator of `StreamChunk`s; `result` holds the result once the last chunk was read.

    Generation is pulled: leaving the loop early computes nothing more. close() (or ``with``, or the
    stream being garbage-collected, which is immediate for an unnamed ``for chunk in rt.generate(...)``)
    cancels it for good and frees its sequence."""

    def __init__(self, gen: Iterator[StreamChunk], result: GenerationResult, seq: Any = None):
        self._gen = gen
        self._seq = seq
        self.result = result

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StreamChunk:
        try:
            return next(self._gen)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        # The request is over: a session's sequence carries no cancel or deadline into its next turn,
        # and a finished stream frees its sequence with the generator.
        if self._seq is not None:
            self._seq.reset_controls()
            self._seq = None

    def close(self) -> None:
        self._gen.close()
        self._end()

    def cancel(self) -> None:
        """From any thread: stop the generation, also while another thread is inside a step of it
        (that step raises `tidal.Cancelled` in the consuming thread, which ends the stream with
        finish_reason "cancelled"). Returns at once."""
        if self._seq is not None:
            self._seq.cancel()

    def set_deadline(self, seconds: float) -> None:
        """Steps after `seconds` from now raise TimeoutError in the consuming thread (0: none)."""
        if self._seq is not None:
            self._seq.set_deadline(seconds)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run(seq: Any, feed: Sequence[int], prompt_ids: Sequence[int], opts: SamplingOptions, result: GenerationResult, *,
        tokenizer: Any = None, in_reasoning: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
        max_positions: int | None = None, before: Callable[[], tuple[Sequence[int], int]] | None = None,
        on_fed: Callable[[Sequence[int]], None] | None = None,
        on_prompt_done: Callable[[], None] | None = None,
        on_finish: Callable[[GenerationResult], None] | None = None,
        on_cancel: Callable[[GenerationResult], None] | None = None) -> Iterator[StreamChunk]:
    """The token loop (a generator). `before()` runs lazily and returns the ids still to feed and how
    many prompt tokens were reused (prefix reuse in sessions); `on_fed(ids)` is told about every token
    appended to `seq`."""
    if opts.stop and tokenizer is None:
        raise ValueError("stop strings need the checkpoint's tokenizer (tokenizer.json); use stop_token_ids")
    decoder = tokenizer.decode_stream() if tokenizer is not None else None
    stopper = StopMatcher(opts.stop)
    splitter = ReasoningSplitter(in_reasoning)
    tool_x = ToolCallExtractor(tools) if tools else None
    stop_ids = set(opts.stop_token_ids)
    raw: list[str] = []
    result.finish_reason = "cancelled"

    def pieces(text: str) -> list[StreamChunk]:
        if not text:
            return []
        raw.append(text)
        out = []
        for channel, piece in splitter.feed(text):
            out.extend(route(channel, piece))
        return out

    def route(channel: str, piece: str) -> list[StreamChunk]:
        items = tool_x.feed(piece) if (tool_x is not None and channel == "content") else [(channel, piece)]
        out = []
        for ch, val in items:
            if ch == "tool_call":
                result.tool_calls.append(val)
                out.append(StreamChunk("", "tool_call", tool_call=val))
            elif val:
                if ch == "reasoning":
                    result.reasoning += val
                else:
                    result.content += val
                out.append(StreamChunk(val, ch))
        return out

    def finish() -> list[StreamChunk]:
        out: list[StreamChunk] = []
        if decoder is not None:
            if stopper.matched is None:
                out += pieces(stopper.feed(decoder.flush()))
            out += pieces(stopper.flush())
            for channel, piece in splitter.flush():
                out.extend(route(channel, piece))
            if tool_x is not None:
                for ch, val in tool_x.flush():
                    out.extend(route("content", val))
            result.text = "".join(raw)
        return out

    t0 = t1 = time.perf_counter()
    result.prompt_tokens = len(prompt_ids)
    if opts.max_new_tokens == 0:
        result.finish_reason, result.text = "length", ("" if decoder is not None else None)
        yield StreamChunk("", "end", finish_reason="length")
        return
    if before is not None:
        feed, result.cached_tokens = before()
    sampler = opts.new_sampler(prompt_ids)
    limit = max_positions if max_positions else None
    try:
        try:
            tok = seq.step(list(feed), sampler)
        except _tidal.Cancelled:  # Stream.cancel() from another thread
            return
        if on_fed:
            on_fed(feed)
        if on_prompt_done:
            on_prompt_done()
        t1 = time.perf_counter()
        result.prefill_seconds = t1 - t0
        while True:
            result.token_ids.append(tok)
            if tok in stop_ids:
                result.finish_reason, result.stop_reason = "stop", tok
                break
            if decoder is not None:
                for c in pieces(stopper.feed(decoder.step(tok))):
                    yield c
                if stopper.matched is not None:
                    result.finish_reason, result.stop_reason = "stop", stopper.matched
                    break
            if len(result.token_ids) >= opts.max_new_tokens or (limit and seq.num_tokens + 1 >= limit):
                result.finish_reason = "length"
                break
            prev = tok
            try:
                tok = seq.step([prev], sampler)
            except _tidal.Cancelled:
                return
            if on_fed:
                on_fed([prev])
        result.decode_seconds = time.perf_counter() - t1
        for c in finish():
            yield c
        if on_finish:
            on_finish(result)
        yield StreamChunk("", "end", finish_reason=result.finish_reason)
    finally:
        if result.finish_reason == "cancelled":
            result.decode_seconds = time.perf_counter() - t1
            if decoder is not None:
                result.text = "".join(raw)
            if on_cancel:
                on_cancel(result)
