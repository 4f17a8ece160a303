"""Tokenizer: a thin wrapper over the `tokenizers` library (tokenizer.json), plus a streaming
detokenizer that turns token ids into text deltas without splitting multi-byte characters."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class StreamDecoder:
    """Incremental decode of one caption: push ids, get the new text since the last push.
    `strip`: text the output begins with that is not part of it (an answer's prefix,
    PromptTemplate.answer_prefix), taken off where the text starts with it."""

    def __init__(self, tok: HFTokenizer, strip: str = "") -> None:
        self._tok = tok
        self._strip = strip
        self._ids: list[int] = []
        self._text = ""

    def reset(self) -> None:
        self._ids, self._text = [], ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self.text
        if text.endswith("\ufffd") or not text.startswith(self._text):
            # an incomplete UTF-8 sequence (byte-level BPE) or a decoder that rewrote the past:
            # wait for more tokens; the full text is still available from `text`
            return ""
        delta, self._text = text[len(self._text) :], text
        return delta

    @property
    def text(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if self._strip and self._strip.startswith(text):  # the prefix itself, or a part of it
            return ""
        return text.removeprefix(self._strip)


class Tokenizer:
    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    def stream(self, strip: str = "") -> StreamDecoder:
        return StreamDecoder(self.tok, strip)
