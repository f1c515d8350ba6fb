"""Tokens to text and back, including text that arrives one token at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer

CJK = r"\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_SPACE = re.compile(
    rf"(?<=[{CJK}]) (?=[{CJK}])|(?<=[{CJK}]) (?=[^\s\w])|(?<=[^\s\w]) (?=[{CJK}])"
)
INCOMPLETE = "\ufffd"  # what decoding shows for a character whose bytes have not all arrived


class TextCodec:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        # WordPiece (BERT-style) decoding joins every token with a space, which is wrong
        # between Chinese characters; byte-level BPE keeps the text's own spacing.
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        self.spaces_between_tokens = decoder.get("type") == "WordPiece"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        return CJK_SPACE.sub("", text) if self.spaces_between_tokens else text


class IncrementalDecoder:
    """Text of a growing token list, one piece per new token, never a broken character.

    Decodes a short window (the tokens since the last piece plus the one before them), not
    the whole list, as TGI and vLLM do: a Chinese character split over two byte-level tokens
    shows as U+FFFD until its last byte arrives, and is held back until then.
    """

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.codec.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back, once the sequence has ended."""
        before = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.codec.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]
