"""Tokenizers: byte-level, BPE trained on the training split, or an existing tokenizer.

Byte-level: UTF-8 bytes are the tokens (vocab 256), so losses compare directly with
character-level baselines; byte 0 (NUL, never in text) is the end-of-document token.
BPE: byte-level BPE trained with the `tokenizers` library, `<|endoftext|>` = id 0.

A special token's spelling inside a document (`<|endoftext|>` in a page about tokenizers) is text,
encoded as its characters: only the data pipeline ends a document, as the byte tokenizer drops a
NUL in the text. Otherwise a corpus could end documents in the middle, and a document quoting
the token would train the model to stop there. The exported tokenizer does the same
(`split_special_tokens`), so transformers encodes text as training did.
"""
from __future__ import annotations

import json
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

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for: one, and none for the end-of-document token."""
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths


class HFTokenizer:
    """A `tokenizers.Tokenizer` with an end-of-document token."""

    def __init__(self, tok: Tokenizer, origin: str):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {origin} has none of the end-of-document tokens {', '.join(EOS_NAMES)}")
        self.eos_id = eos

    def special_spellings(self) -> list[str]:
        """The special tokens' spellings, which text holding them encodes differently from before
        special tokens were taken as text (shard fingerprints: data/shards.py)."""
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # here, not once: neither tokenizer.json nor a pickled copy (datasets' map workers) keeps it
        self.tok.encode_special_tokens = True
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))

    def byte_lengths(self) -> np.ndarray | None:
        """UTF-8 bytes of text each id stands for (special tokens: none), exact for byte-level
        BPE, whose every token character is one byte; None for other tokenizers, whose tokens'
        bytes depend on their neighbours (SentencePiece's leading spaces, byte fallback)."""
        if not isinstance(self.tok.decoder, decoders.ByteLevel):
            return None
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        added = self.tok.get_added_tokens_decoder()
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                lengths[i] = 0 if added[i].special else len(token.encode("utf-8"))
            elif set(token) <= alphabet:
                lengths[i] = len(token)
            else:
                return None
        return lengths


EOS = "<|endoftext|>"


def byte_level_tokenizer() -> Tokenizer:
    """ByteTokenizer as a `tokenizers.Tokenizer`: id b is byte b (1..255) and id 0 the
    end-of-document token `<|endoftext|>` (our byte 0, which text never holds). A byte-level
    BPE with no merges: each byte is its own token, as GPT-2's byte alphabet spells it."""
    alphabet = {c: b for b, c in _byte_alphabet().items()}
    vocab = {EOS: 0, **{c: b for c, b in alphabet.items() if b != 0}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the ByteLevel pre-tokenizer's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


def save_for_transformers(tokenizer, directory: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json that `AutoTokenizer.from_pretrained(directory)`
    loads as the same tokenizer (byte-level runs: `byte_level_tokenizer`)."""
    tok = byte_level_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer.tok
    tok.save(str(directory / "tokenizer.json"))
    eos = tok.id_to_token(tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos}, indent=2))


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
