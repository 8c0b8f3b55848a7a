# SPDX-License-Identifier: Apache-2.0
"""The checkpoint's tokenizer (Hugging Face `tokenizers`, from tokenizer.json) with its special tokens,
EOS ids and generation defaults.

EOS comes from generation_config.json (`eos_token_id`, an int or a list), else from
tokenizer_config.json's `eos_token`; special tokens from tokenizer.json's added tokens.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Sequence

__all__ = ["Tokenizer", "read_generation_config"]


def read_generation_config(path: str | pathlib.Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory as a dict ({} when there is none)."""
    p = pathlib.Path(path) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: expected a JSON object")
    return cfg


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Attributes
    ----------
    eos_token_ids : list[int]
        Ids that end generation by default.
    special_ids : set[int]
        Ids of special added tokens (dropped when decoding with ``skip_special_tokens``).
    """

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int], source: str = ""):
        self._tok = tokenizer
        self.source = source
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_checkpoint(cls, path: str | pathlib.Path) -> "Tokenizer":
        """Load tokenizer.json (required) and the EOS ids of a checkpoint directory."""
        from tokenizers import Tokenizer as HFTokenizer

        d = pathlib.Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (text input needs the checkpoint's tokenizer; "
                                    "pass token ids instead)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a plain Exception on a malformed file
            raise ValueError(f"{tj}: cannot be read by tokenizers ({exc})") from None
        eos = _ids(read_generation_config(d).get("eos_token_id"))
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text(encoding="utf-8"))
            name = cfg.get("eos_token")
            if isinstance(name, dict):
                name = name.get("content")
            if isinstance(name, str) and tok.token_to_id(name) is not None and not eos:
                eos = [tok.token_to_id(name)]
        return cls(tok, eos, source=str(tj))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings in it are recognised, no BOS is added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def decode_stream(self, skip_special_tokens: bool = True) -> "DecodeStream":
        """An incremental decoder: feed ids one at a time, get text that is always valid UTF-8."""
        return DecodeStream(self, skip_special_tokens)

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok


class DecodeStream:
    """Incremental detokenisation through `tokenizers.decoders.DecodeStream`: a token that ends in the
    middle of a UTF-8 character yields nothing until the character is complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream as HFDecodeStream

        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stream = HFDecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        piece = self._stream.step(self._tok.backend, int(token_id))
        if piece:
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever the full decode has beyond what was streamed (an incomplete character at the end
        decodes to U+FFFD here, as in a one-shot decode)."""
        full = self._tok.decode(self.ids, skip_special_tokens=self._skip)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest
