# SPDX-License-Identifier: Apache-2.0
"""Multi-turn sessions that keep the sequence state between turns.

Each turn renders the whole conversation, tokenises it and compares it with the tokens already in
the session's sequence. Only the tokens after the longest common prefix are prefilled. The KV cache can
be cut at any length, but a Gated DeltaNet state cannot be rewound. So the sequence saves it
(`Sequence.checkpoint`) at two places per turn: before the last ``<|im_start|>`` of the prompt (the
assistant header) and at the end of the prompt. When the template re-renders the previous reply
differently from how it was generated, the session rewinds to the nearest saved state and re-feeds
from there. Examples: reasoning dropped without preserve_thinking, or whitespace normalised. See
docs/architecture.md ("Sessions").
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .generation import ChatResult, GenerationResult
from .text import prompt_opens_reasoning

__all__ = ["Session"]

_TEMPLATE_KEYS = ("enable_thinking", "preserve_thinking", "tools", "chat_template_kwargs")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """A conversation with its own sequence. `chat()` one turn at a time; `messages` is the history.

    Parameters
    ----------
    rt : Runtime
    messages : list of dict, optional
        Initial history (e.g. a system message).
    **defaults
        enable_thinking, preserve_thinking, tools, chat_template_kwargs and generation arguments
        (temperature, max_new_tokens, ...) used by every turn unless a turn overrides them.
    """

    def __init__(self, rt: Any, messages: Sequence[Mapping[str, Any]] | None = None, **defaults: Any):
        self.rt = rt
        self.messages: list[dict[str, Any]] = [dict(m) for m in (messages or [])]
        self.defaults = defaults
        self._seq = rt._engine.new_sequence()
        self._tokens: list[int] = []
        tok = rt.tokenizer
        self._header_id = tok.token_to_id("<|im_start|>") if tok is not None else None
        self.last_prompt: str | None = None
        self._active: Any = None  # the open stream of the current turn

    @property
    def num_cached_tokens(self) -> int:
        """Tokens whose state the session holds."""
        return len(self._tokens)

    def reset(self, messages: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Forget the conversation and the cached state."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self.messages = [dict(m) for m in (messages or [])]
        self._seq = self.rt._engine.new_sequence()
        self._tokens = []

    def _reuse(self, ids: list[int]) -> tuple[list[int], int]:
        """Rewind the sequence to the longest reusable prefix of `ids`; prefill up to the assistant
        header and save the state there. Returns the ids still to feed (at least one) and the number
        of prompt tokens reused."""
        if self._seq.num_tokens != len(self._tokens):
            # An interrupted step (Ctrl-C as a native call returned) appended tokens we did not record:
            # go back to what we know.
            del self._tokens[self._seq.truncate(len(self._tokens)):]
        n = min(_common_prefix(self._tokens, ids), len(ids) - 1)
        if n < len(self._tokens):
            pos = self._seq.truncate(n)
            del self._tokens[pos:]
        pos = reused = len(self._tokens)
        header = -1
        if self._header_id is not None:
            for i in range(len(ids) - 1, pos, -1):
                if ids[i] == self._header_id:
                    header = i
                    break
        if header > pos:
            self._seq.prefill(ids[pos:header])
            self._tokens.extend(ids[pos:header])
            self._seq.checkpoint()
            pos = header
        return ids[pos:], reused

    def _split(self, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        merged = {**self.defaults, **{k: v for k, v in kw.items() if v is not None}}
        template = {k: merged.pop(k) for k in _TEMPLATE_KEYS if k in merged}
        return template, merged

    def _run(self, ids: list[int], opts: Any, result: GenerationResult, *, stream: bool, in_reasoning: bool,
             tools: Any, on_finish: Any = None, on_cancel: Any = None) -> Any:
        if self._active is not None:  # one turn at a time: a new turn cancels an unfinished stream
            self._active.close()
            self._active = None
        # Save the DeltaNet state every `every` generated tokens too, so that when the next prompt
        # re-renders this reply differently (a sampled token sequence the tokenizer would not produce, a
        # trimmed newline), the rewind lands near the difference instead of at the end of this prompt.
        # At most 4 per reply, so with the 2 per prompt they fit in the sequence's 8.
        every = max(32, -(-opts.max_new_tokens // 4))
        seq = self._seq
        fed_since = [0]

        def on_fed(new: list[int]) -> None:
            self._tokens.extend(new)
            fed_since[0] += len(new)
            if fed_since[0] >= every:
                seq.checkpoint()
                fed_since[0] = 0

        def on_prompt_done() -> None:
            seq.checkpoint()
            fed_since[0] = 0

        out = self.rt._start(ids, opts, result, stream=stream, in_reasoning=in_reasoning, tools=tools, seq=seq,
                             before=lambda: self._reuse(ids), on_fed=on_fed, on_prompt_done=on_prompt_done,
                             on_finish=on_finish, on_cancel=on_cancel)
        if stream:
            self._active = out
        return out

    def chat(self, message: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, *,
             stream: bool = False, **kw: Any) -> Any:
        """One turn. `message`: the user's text, a message dict, a whole message list (replaces the
        history, as an OpenAI request does) or None (reply to the history as it is, e.g. after you
        appended tool results). The reply is appended to `messages` when it finishes; a cancelled turn
        (stream closed early, Ctrl-C) leaves `messages` as it was before the call. Returns a
        ChatResult, or a Stream with ``stream=True``."""
        before = list(self.messages)
        if isinstance(message, str):
            self.messages.append({"role": "user", "content": message})
        elif isinstance(message, Mapping):
            self.messages.append(dict(message))
        elif message is not None:
            self.messages = [dict(m) for m in message]
        if not self.messages:
            raise ValueError("the conversation is empty: give a message")
        template, gen = self._split(kw)
        extra = dict(template.pop("chat_template_kwargs", None) or {})
        prompt = self.rt.render_chat(self.messages, **template, **extra)
        self.last_prompt = prompt
        ids = self.rt.encode(prompt)
        opts = self.rt._options(gen)

        def on_finish(r: GenerationResult) -> None:
            self.messages.append(r.message)  # type: ignore[attr-defined]

        def on_cancel(r: GenerationResult) -> None:
            self.messages = before  # a cancelled turn leaves the history as it was

        return self._run(ids, opts, ChatResult(), stream=stream, in_reasoning=prompt_opens_reasoning(prompt),
                         tools=template.get("tools"), on_finish=on_finish, on_cancel=on_cancel)

    def generate(self, prompt: Any, *, stream: bool = False, **kw: Any) -> Any:
        """Continue a raw prompt (text or ids), reusing whatever prefix the session already holds."""
        ids, text = self.rt._prompt_ids(prompt)
        _, gen = self._split(kw)
        opts = self.rt._options(gen)
        in_reasoning = prompt_opens_reasoning(text) if text is not None else False
        return self._run(ids, opts, GenerationResult(), stream=stream, in_reasoning=in_reasoning, tools=None)

    def __repr__(self) -> str:
        return f"Session({len(self.messages)} messages, {len(self._tokens)} cached tokens)"
