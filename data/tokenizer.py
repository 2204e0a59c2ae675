"""Tokenizers: byte-level, BPE trained on the training split, or an existing tokenizer.

Byte-level: UTF-8 bytes are the tokens (vocab 256), so losses compare directly with
character-level baselines; byte 0 (NUL, never in text) is the end-of-document token.
BPE: byte-level BPE trained with the `tokenizers` library, `<|endoftext|>` = id 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.errors import DataError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    vocab_size = 256
    eos_id = 0

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.replace("\0", "").encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        """Nothing to save: the byte tokenizer has no learned state."""


class HFTokenizer:
    """A `tokenizers.Tokenizer` with an end-of-document token."""

    def __init__(self, tok: Tokenizer, origin: str):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {origin} has none of the end-of-document tokens {', '.join(EOS_NAMES)}")
        self.eos_id = eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


def train_bpe(texts, vocab_size: int) -> HFTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, f"BPE({vocab_size})")


def load_tokenizer(spec: str):
    """`byte`, a path to a `tokenizer.json`, or `pretrained:NAME` (downloaded by `tokenizers`)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("pretrained:"):
        name = spec.split(":", 1)[1]
        try:
            return HFTokenizer(Tokenizer.from_pretrained(name), name)
        except Exception as e:
            raise DataError(f"cannot load pretrained tokenizer data.tokenizer={spec!r}: {e}") from None
    path = Path(spec).expanduser()
    try:
        return HFTokenizer(Tokenizer.from_file(str(path)), str(path))
    except Exception as e:
        raise DataError(f"cannot load tokenizer file data.tokenizer={spec!r}: {e}") from None
