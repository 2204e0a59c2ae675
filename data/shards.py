"""Pre-tokenized token files: a fixed binary header followed by the token ids.

Header (8 little-endian int64): magic, format version, bytes per token, token count, vocab size,
three reserved zeros. A prepared dataset is a directory `train.bin`, `val.bin`, `manifest.json`,
written under a temporary name and renamed into place, so readers never see a partial one and
two processes preparing the same data at once cannot corrupt it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from data.sources import DataError, load_documents
from data.tokenizer import build_tokenizer

MAGIC = 0x5634_4C41_4254_4F4B  # "V4LABTOK"
VERSION = 1
HEADER = np.dtype("<i8"), 8
SPLIT_RULE = "crc32(name) % 10000 < val_fraction * 10000, at least one document"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_tokens(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    header = np.array([MAGIC, VERSION, dtype.itemsize, len(tokens), vocab_size, 0, 0, 0], dtype=HEADER[0])
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file after checking its header against its size."""
    size = path.stat().st_size if path.exists() else -1
    nbytes = HEADER[0].itemsize * HEADER[1]
    if size < nbytes:
        raise DataError(f"token file {path} is missing or shorter than its header ({size} bytes)")
    header = np.fromfile(path, dtype=HEADER[0], count=HEADER[1])
    magic, version, itemsize, count, vocab = (int(v) for v in header[:5])
    if magic != MAGIC:
        raise DataError(f"token file {path} has a wrong magic number: not a v4lab token file")
    if version != VERSION:
        raise DataError(f"token file {path} has format version {version}; this version reads {VERSION}")
    if itemsize not in (2, 4) or size != nbytes + count * itemsize:
        raise DataError(
            f"token file {path} is truncated or corrupt: header says {count} tokens of {itemsize} bytes, "
            f"file holds {size - nbytes} bytes after the header"
        )
    tokens = np.memmap(path, dtype=np.uint16 if itemsize == 2 else np.uint32, mode="r", offset=nbytes, shape=(count,))
    return tokens


def is_validation(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10000 < val_fraction * 10000


def fingerprint(docs, tokenizer_name: str, val_fraction: float) -> str:
    h = hashlib.sha256(f"v{VERSION}|{tokenizer_name}|{SPLIT_RULE}|{val_fraction}".encode())
    for name, text in zip(docs["name"], docs["text"]):
        h.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def prepare(source: str, path: str | None, tokenizer_name: str, val_fraction: float, cache_dir: str) -> Path:
    """Tokenize a corpus once into `cache_dir/<source>-<tokenizer>-<fingerprint>`; reuse it after."""
    docs = load_documents(source, path)
    fp = fingerprint(docs, tokenizer_name, val_fraction)
    out = Path(cache_dir).expanduser() / f"{source}-{tokenizer_name}-{fp[:16]}"
    if (out / "manifest.json").exists():
        return out
    tok = build_tokenizer(tokenizer_name)
    val = [is_validation(n, val_fraction) for n in docs["name"]]
    if not any(val) or all(val):
        # Tiny corpora: hold out the document that sorts first by hash, keep the rest for training.
        first = min(range(len(val)), key=lambda i: zlib.crc32(docs["name"][i].encode()))
        val = [i == first for i in range(len(val))] if len(val) > 1 else val
    if len(val) < 2:
        raise DataError(f"data.source={source!r} has {len(val)} document(s); a train/validation split needs 2 or more")
    tokenized = docs.map(lambda b: {"ids": [tok.encode(t) for t in b["text"]]}, batched=True, remove_columns=["text"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts = {}
    for split, keep in (("train", False), ("val", True)):
        parts = [np.asarray(ids) for ids, v in zip(tokenized["ids"], val) if v == keep]
        tokens = np.concatenate(parts)
        write_tokens(tmp / f"{split}.bin", tokens, tok.vocab_size)
        counts[split] = {"documents": len(parts), "tokens": int(len(tokens))}
    manifest = {
        "fingerprint": fp, "source": source, "path": path, "tokenizer": tokenizer_name,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "split_rule": SPLIT_RULE,
        "val_fraction": val_fraction, "format_version": VERSION, "splits": counts,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same preparation first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_manifest(prepared: Path) -> dict:
    try:
        return json.loads((prepared / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"prepared dataset {prepared} has no readable manifest.json: {e}") from None
