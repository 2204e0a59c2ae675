"""Tokenizers. Byte-level: UTF-8 bytes are the tokens (vocab 256), so losses compare directly with
character-level baselines. Byte 0 (NUL, absent from text) marks document boundaries as EOS.
"""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> np.ndarray:
        ids = np.frombuffer(text.replace("\0", "").encode("utf-8"), dtype=np.uint8)
        return np.append(ids, np.uint8(self.eos_id))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


def build_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; accepted: byte")
