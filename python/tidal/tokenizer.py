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


# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp): the split that
# Qwen's tokenizer.json applies before byte-level BPE. qwen35 adds combining marks (\p{M}) to letters.
_GGUF_PRE = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+",
}
_EOG_TEXTS = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"}


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

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str = "") -> "Tokenizer":
        """Rebuild a GGUF file's byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2", as llama.cpp's
        converter writes Qwen's) from its metadata: vocabulary, merges, token types (3: control, 4:
        user-defined become added tokens, special and not) and the pre-tokenizer its
        `tokenizer.ggml.pre` names (qwen2, qwen35). Other tokenizers raise NotImplementedError that says
        to pass the model's tokenizer.json instead."""
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = metadata.get("tokenizer.ggml.model")
        pre = metadata.get("tokenizer.ggml.pre", "qwen2")
        if kind != "gpt2" or pre not in _GGUF_PRE:
            raise NotImplementedError(
                f"{source}: tidal cannot rebuild this GGUF tokenizer (tokenizer.ggml.model={kind!r}, "
                f"pre={pre!r}; it rebuilds gpt2 byte-level BPE with the qwen2 / qwen35 pre-tokenizers): pass "
                "Runtime.load(..., tokenizer='path/to/tokenizer.json') from the original model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges") or []
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens must be a list of strings")
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 2, 6)}  # normal, unknown, byte
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ") if isinstance(m, str) else ("", "", "")
            if not sep:
                raise ValueError(f"{source}: bad merge {m!r} in tokenizer.ggml.merges")
            pairs.append((a, b))
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
        # Qwen's tokenizer.json normalises to NFC; GGUF has no key for it, so tidal's converter records
        # the source's choice (tidal.tokenizer.normalizer) and files without it get Qwen's.
        if metadata.get("tidal.tokenizer.normalizer", "NFC") == "NFC":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        added = [(i, t, types[i] == 3) for i, t in enumerate(tokens) if types[i] in (3, 4)]
        for i, t, special in added:  # in id order, so each gets its own id
            tok.add_tokens([AddedToken(t, special=special, normalized=False)])
            if tok.token_to_id(t) != i:
                raise ValueError(f"{source}: added token {t!r} should have id {i} but got {tok.token_to_id(t)}")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) and 0 <= eos < len(tokens) else []
        eot = metadata.get("tokenizer.ggml.eot_token_id")
        if isinstance(eot, int) and 0 <= eot < len(tokens):
            eos_ids.append(eot)
        # End-of-generation tokens as llama.cpp finds them (by their text) when the file names one EOS.
        eos_ids += [i for i, t, special in added if special and t in _EOG_TEXTS]
        return cls(tok, eos_ids, source=source)

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
