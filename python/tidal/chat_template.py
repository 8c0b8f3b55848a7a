# SPDX-License-Identifier: Apache-2.0
"""Chat templates rendered the way transformers' `apply_chat_template` renders them.

A checkpoint's template comes from `chat_template.jinja` or from `tokenizer_config.json`
(`chat_template`: a string, or a list of `{name, template}` of which "default" is used). It is rendered
with jinja2 in a sandbox with the same settings transformers uses (trim_blocks, lstrip_blocks, loop
controls, a `tojson` filter that keeps non-ASCII, `raise_exception`, `strftime_now`), so prompts match
token for token what the model was trained on.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Mapping, Sequence

__all__ = ["ChatTemplate"]


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class ChatTemplate:
    """A compiled chat template. `render(messages, ...)` returns the prompt text."""

    def __init__(self, source: str):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template: empty or not a string")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template: syntax error at line {exc.lineno}: {exc.message}") from None
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path) -> "ChatTemplate":
        """The template of a checkpoint directory (chat_template.jinja wins over tokenizer_config.json)."""
        d = pathlib.Path(path)
        if (d / "chat_template.jinja").is_file():
            return cls((d / "chat_template.jinja").read_text(encoding="utf-8"))
        cfg_path = d / "tokenizer_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d}: no chat_template.jinja or tokenizer_config.json")
        tpl = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
            tpl = named.get("default")
        if not isinstance(tpl, str):
            raise ValueError(f"{cfg_path}: no chat_template (string or a list with a 'default' entry)")
        return cls(tpl)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts). Extra keyword arguments (enable_thinking,
        preserve_thinking, ...) are passed to the template as variables, as transformers does."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        if kwargs.get("continue_final_message"):
            raise NotImplementedError("continue_final_message is not supported yet: render with "
                                      "add_generation_prompt=True and append the partial reply's text instead")
        for i, t in enumerate(tools or []):
            if not isinstance(t, Mapping):
                raise TypeError(f"tools[{i}] must be a JSON-schema dict ({{'type': 'function', 'function': {{...}}}})"
                                f", not {type(t).__name__}; Python functions are not converted")
        return self._template.render(messages=list(messages), tools=tools,
                                     add_generation_prompt=add_generation_prompt, **kwargs)
