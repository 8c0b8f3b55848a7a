# SPDX-License-Identifier: Apache-2.0
"""Streaming text processing of generated tokens: stop strings, reasoning vs content, tool calls.

Each class consumes text deltas and returns what is safe to show now, holding back only the shortest
tail that could still turn into a marker (a stop string, ``<think>``, ``</think>``, ``<tool_call>``),
so a marker split across tokens is still found and never shown half-printed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["StopMatcher", "ReasoningSplitter", "ToolCallExtractor", "parse_tool_call", "prompt_opens_reasoning"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Finds the first stop string in a stream of text deltas (OpenAI/vLLM semantics: the output ends
    just before the stop string, which is not included)."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = list(stops)
        self._held = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Text that can be emitted now; after a match, everything up to the stop string."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        hit_at, hit = -1, None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (hit_at < 0 or i < hit_at):
                hit_at, hit = i, s
        if hit is not None:
            self.matched = hit
            self._held = ""
            return text[:hit_at]
        keep = _partial_suffix(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.matched is not None else out


class ReasoningSplitter:
    """Splits generated text into ("reasoning", text) and ("content", text) pieces.

    `in_reasoning`: the prompt already opened a ``<think>`` block (Qwen3.5/3.6 templates put
    ``<think>\\n`` in the generation prompt). Otherwise a ``<think>`` at the very start of the output
    opens one (Qwen3 / Qwen3-Next thinking models emit it themselves). ``</think>`` closes it for good.
    Newlines around the tags are dropped so the pieces concatenate to what the chat template expects.
    """

    def __init__(self, in_reasoning: bool):
        self.mode = "reasoning" if in_reasoning else "start"
        self._held = ""
        self._reasoning_started = False
        self._strip_content = False  # after </think>: drop the newlines that separate it from the answer
        self._nl_held = ""  # trailing newlines of reasoning, shown once more reasoning follows

    def _emit(self, channel: str, text: str, out: list):
        if not text:
            return
        if channel == "reasoning":
            if not self._reasoning_started:
                text = text.lstrip("\n")
                if not text:
                    return
                self._reasoning_started = True
            text = self._nl_held + text
            stripped = text.rstrip("\n")
            self._nl_held = text[len(stripped):]
            text = stripped
        elif self._strip_content:
            text = text.lstrip("\n")
            if not text:
                return
            self._strip_content = False
        if text:
            if out and out[-1][0] == channel:
                out[-1] = (channel, out[-1][1] + text)
            else:
                out.append((channel, text))

    def feed(self, delta: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._held + delta
        self._held = ""
        while text:
            if self.mode == "start":
                s = text.lstrip()
                if not s:
                    self._held = text
                    return out
                if s.startswith(THINK_OPEN):
                    self.mode = "reasoning"
                    text = s[len(THINK_OPEN):]
                    continue
                if THINK_OPEN.startswith(s):
                    self._held = text
                    return out
                self.mode = "content"
                continue
            if self.mode == "reasoning":
                i = text.find(THINK_CLOSE)
                if i >= 0:
                    self._emit("reasoning", text[:i], out)
                    self._nl_held = ""
                    self.mode = "content"
                    self._strip_content = True
                    text = text[i + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(text, [THINK_CLOSE])
                self._emit("reasoning", text[: len(text) - keep], out)
                self._held = text[len(text) - keep:]
                return out
            self._emit("content", text, out)
            return out
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        held, self._held = self._held, ""
        if held:
            self._emit("reasoning" if self.mode == "reasoning" else "content", held, out)
        return out


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt ends inside an open ``<think>`` block of the last turn."""
    tail = prompt[prompt.rfind("<|im_start|>") + 1:] if "<|im_start|>" in prompt else prompt
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def _schema_types(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    types: dict[str, dict[str, Any]] = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, Mapping) else {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        if isinstance(fn.get("name"), str):
            types[fn["name"]] = {k: (v or {}).get("type") for k, v in props.items() if isinstance(v, Mapping)}
    return types


def _convert(value: str, kind: Any) -> Any:
    """A parameter value of the XML format, typed by the tool's JSON schema (string when unknown)."""
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        try:
            if k == "integer":
                return int(value)
            if k == "number":
                f = float(value)
                return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f
            if k == "boolean" and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if k in ("object", "array"):
                return json.loads(value)
            if k == "null" and value.strip() == "null":
                return None
        except (ValueError, json.JSONDecodeError):
            continue
    return value


_FUNC_RE = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAM_RE = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def parse_tool_call(body: str, tools: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
    """One ``<tool_call>`` body as an OpenAI-style tool call, or None when it does not parse.

    Two formats: Qwen3.5/3.6 and Qwen3-Coder's XML (``<function=name><parameter=p>value</parameter>``,
    values typed by the tool's schema) and Qwen3 / Qwen3-Next's JSON (``{"name": ..., "arguments":
    {...}}``). `arguments` is a dict, as the chat templates expect when the message is sent back.
    """
    body = body.strip()
    name, args = None, None
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
    else:
        m = _FUNC_RE.search(body)
        if not m:
            return None
        name = m.group(1).strip()
        types = _schema_types(tools).get(name, {})
        args = {p.strip(): _convert(v, types.get(p.strip())) for p, v in _PARAM_RE.findall(m.group(2))}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


@dataclass
class ToolCallExtractor:
    """Pulls complete ``<tool_call>...</tool_call>`` blocks out of a content stream.

    feed() returns a list of ("content", text) and ("tool_call", call_dict) items. A block that does
    not parse is passed through as content, unchanged.
    """

    tools: Sequence[Mapping[str, Any]] | None = None
    _held: str = ""
    _inside: bool = False
    _after_call: bool = False  # drop the newlines that separate consecutive calls
    calls: list = field(default_factory=list)

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        text = self._held + delta
        self._held = ""
        while text:
            if not self._inside:
                if self._after_call:
                    text = text.lstrip("\n")
                    if not text:
                        return out
                    self._after_call = False
                i = text.find(TOOL_OPEN)
                if i < 0:
                    keep = _partial_suffix(text, [TOOL_OPEN])
                    if text[: len(text) - keep]:
                        out.append(("content", text[: len(text) - keep]))
                    self._held = text[len(text) - keep:]
                    return out
                if text[:i]:
                    out.append(("content", text[:i]))
                self._inside = True
                text = text[i:]
            j = text.find(TOOL_CLOSE)
            k = text.find(TOOL_OPEN, len(TOOL_OPEN))
            if 0 < k and (j < 0 or k < j):  # an unclosed <tool_call> followed by another: the first is text
                out.append(("content", text[:k]))
                text = text[k:]
                continue
            if j < 0:
                self._held = text
                return out
            block = text[: j + len(TOOL_CLOSE)]
            call = parse_tool_call(block[len(TOOL_OPEN): -len(TOOL_CLOSE)], self.tools)
            if call is None:
                out.append(("content", block))
            else:
                self.calls.append(call)
                out.append(("tool_call", call))
                self._after_call = True
            self._inside = False
            text = text[j + len(TOOL_CLOSE):]
        return out

    def flush(self) -> list[tuple[str, Any]]:
        held, self._held = self._held, ""
        self._inside = False
        return [("content", held)] if held else []
