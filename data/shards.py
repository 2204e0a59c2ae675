"""Pre-tokenized, versioned token shards, prepared once per (corpus, tokenizer, split rule).

A prepared dataset is a directory in `data.cache_dir` named by a fingerprint of its inputs:
`train_NNNNN.bin` / `val_NNNNN.bin` shards, `manifest.json`, and `tokenizer.json` for learned
tokenizers. Shard header (8 little-endian int64): magic, format version, bytes per token (2 when
the vocabulary fits uint16, else 4), token count, vocab size, three reserved zeros. The directory
is built under a temporary name and renamed into place while holding a file lock, so concurrent
runs or ranks never see, or make, a partial one.

The fingerprint hashes the corpus's content, which takes reading it. For local corpora,
`.index/` in the cache remembers which prepared directory a set of files (names, sizes,
modification times: what `datasets` itself keys local files by) was made into, so later runs,
and every rank, find it without reading the corpus; changing any file reads it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from common.errors import DataError
from data.sources import corpus_files, load_corpus
from data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

MAGIC = 0x5634_4C41_4254_4F4B  # "V4LABTOK"
VERSION = 1
HEADER_WORDS = 8
HEADER_BYTES = 8 * HEADER_WORDS
SPECIALS_RULE = "special tokens' spellings in text are text"
SPLIT_RULE = "crc32(utf-8 text) % 10000 < val_fraction * 10000; at least one document on each side"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class ShardWriter:
    """Streams token arrays into numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, vocab_size: int, shard_tokens: int):
        self.dir, self.split, self.vocab, self.limit = directory, split, vocab_size, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self.file, self.count = None, 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.file, self.count = open(self.dir / name, "wb"), 0
        self.file.write(b"\0" * HEADER_BYTES)  # the real header goes in once the count is known

    def _close(self) -> None:
        header = np.array([MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab, 0, 0, 0], dtype="<i8")
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards[-1]["tokens"] = self.count
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None:
                self._open()
            take = tokens[: self.limit - self.count]
            self.file.write(take.astype(self.dtype, copy=False).tobytes())
            self.count += len(take)
            tokens = tokens[len(take):]
            if self.count == self.limit:
                self._close()

    def finish(self) -> list[dict]:
        if self.file is not None:
            self._close()
        return self.shards


def write_tokens(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """One whole shard file (tests and tools)."""
    writer = ShardWriter(path.parent, "", vocab_size, max(1, len(tokens)))
    writer.write(tokens)
    (path.parent / writer.finish()[0]["file"]).rename(path)


def read_tokens(path: Path) -> np.ndarray:
    """Memory-map a shard after checking its header against its size."""
    size = path.stat().st_size if path.exists() else -1
    if size < HEADER_BYTES:
        raise DataError(f"token file {path} is missing or shorter than its header ({size} bytes)")
    magic, version, itemsize, count, vocab = (int(v) for v in np.fromfile(path, dtype="<i8", count=HEADER_WORDS)[:5])
    if magic != MAGIC:
        raise DataError(f"token file {path} has a wrong magic number: not a v4lab token file")
    if version != VERSION:
        raise DataError(f"token file {path} has format version {version}; this version reads {VERSION}")
    if itemsize not in (2, 4) or size != HEADER_BYTES + count * itemsize:
        raise DataError(
            f"token file {path} is truncated or corrupt: its header says {count} tokens of {itemsize} bytes, "
            f"the file holds {size - HEADER_BYTES} bytes after the header"
        )
    return np.memmap(path, dtype=np.uint16 if itemsize == 2 else np.uint32, mode="r", offset=HEADER_BYTES, shape=(count,))


def _tokenizer_id(cfg) -> tuple[str, str, str | None]:
    """(short label for the directory name, exact identity for the fingerprint, the identity
    before special tokens' spellings in text were encoded as text: None for the byte tokenizer,
    which always did)."""
    spec = cfg.tokenizer
    if spec == "byte":
        return "byte", "byte", None
    if spec == "bpe":
        label = before = f"bpe{cfg.vocab_size}"
    elif spec.startswith("pretrained:"):
        label, before = spec.split(":", 1)[1].replace("/", "_"), spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"data.tokenizer={spec!r}: no tokenizer file there; accepted: byte, bpe, a tokenizer.json path, pretrained:NAME")
        label, before = path.stem, hashlib.sha256(path.read_bytes()).hexdigest()
    return label, f"{before}|{SPECIALS_RULE}", before


def fingerprint(corpus_fingerprint: str, tokenizer_identity: str, val_fraction: float, shard_tokens: int) -> str:
    # Shard size is part of it: windows never straddle shards, so it shapes what the loader reads.
    key = (f"format {VERSION}|corpus {corpus_fingerprint}|tokenizer {tokenizer_identity}|"
           f"split {SPLIT_RULE}|{val_fraction}|shard {shard_tokens}")
    return hashlib.sha256(key.encode()).hexdigest()


def _split(corpus, val_fraction: float, num_proc: int):
    """Train/validation by document, from a hash of each document's text (order-independent)."""
    def crcs(batch, rows):
        bad = next((r for r, t in zip(rows, batch["text"]) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"document {bad} of the corpus has no text (its text field is "
                            f"{type(batch['text'][rows.index(bad)]).__name__}); every record needs a string")
        return {"crc": [zlib.crc32(t.encode()) for t in batch["text"]]}

    keyed = corpus.map(crcs, batched=True, with_indices=True, num_proc=num_proc, desc="split")
    crc = np.asarray(keyed["crc"], dtype=np.int64)
    if len(crc) < 2:
        raise DataError(f"the corpus has {len(crc)} document(s); a train/validation split needs 2 or more")
    is_val = crc % 10000 < val_fraction * 10000
    if is_val.all() or not is_val.any():  # tiny corpora: hold out one document (with its copies: no leak)
        is_val = crc == crc.min()
        if is_val.all():
            raise DataError(f"the corpus's {len(crc)} documents are all the same text; a train/validation split "
                            f"needs two different ones")
    return corpus.select(np.flatnonzero(~is_val)), corpus.select(np.flatnonzero(is_val))


def _build(cfg, corpus, fp: str, out: Path, aliases: list[str], before: list[str]) -> None:
    train_docs, val_docs = _split(corpus, cfg.val_fraction, cfg.num_proc)
    if cfg.tokenizer == "bpe":
        batches = (b["text"] for b in train_docs.iter(batch_size=256))
        tok = train_bpe(batches, cfg.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    if before and not _quotes_special_tokens(corpus, tok, cfg.num_proc):
        aliases = aliases + before  # the same tokens as before: runs prepared then resume on these
    eos = np.array([tok.eos_id], dtype=np.int64)

    def encode(batch):
        return {"ids": [np.concatenate([np.asarray(ids, dtype=np.int64), eos]) for ids in tok.encode_batch(batch["text"])]}

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(cfg, tok, encode, train_docs, val_docs, fp, aliases, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)


def _quotes_special_tokens(corpus, tok, num_proc: int) -> bool:
    spellings = tok.special_spellings()
    quoting = corpus.filter(lambda b: [any(s in t for s in spellings) for t in b["text"]], batched=True,
                            num_proc=num_proc, desc="special tokens in text")
    return len(quoting) > 0


def _write(cfg, tok, encode, train_docs, val_docs, fp: str, aliases: list[str], tmp: Path) -> None:
    splits = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = docs.map(encode, batched=True, num_proc=cfg.num_proc, remove_columns=docs.column_names,
                       desc=f"tokenize {split}")
        writer = ShardWriter(tmp, split, tok.vocab_size, cfg.shard_tokens)
        for batch in tqdm(ids.with_format("arrow").iter(batch_size=1024), desc=f"write {split}",
                          total=-(-len(ids) // 1024), disable=len(ids) < 50_000):
            tokens = batch.column("ids").combine_chunks().flatten().to_numpy()
            if len(tokens) and tokens.max() >= tok.vocab_size:
                raise DataError(f"tokenizer {cfg.tokenizer!r} produced id {tokens.max()} ≥ its vocab size {tok.vocab_size}")
            writer.write(tokens)
        shards = writer.finish()
        splits[split] = {"documents": len(docs), "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    tok.save(tmp)
    manifest = {
        "fingerprint": fp, "also_known_as": aliases, "format_version": VERSION, "source": cfg.source, "path": cfg.path, "name": cfg.name,
        "tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "split_rule": SPLIT_RULE, "val_fraction": cfg.val_fraction, "splits": splits,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def files_fingerprint(cfg, files: list[Path]) -> str:
    """The user's files by content: their bytes and names relative to one another (the order they
    are read in), and how they are read (text_field). Not datasets' builder hash, which is made
    of absolute paths and modification times: a copy of the corpus elsewhere, or a file touched
    without a change, was another corpus, and a file changed with its time kept was the same."""
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    h = hashlib.sha256(json.dumps(["files", cfg.text_field]).encode())
    for f in files:
        name = str(f.resolve().relative_to(root)).encode()
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _files_key(cfg, files: list[Path], tokenizer_identity: str) -> str:
    # ctime and inode too: tools that keep a file's size and mtime (cp -p, rsync -a, touch -r)
    # cannot keep those
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for f in files
             for st in [f.stat()]]
    key = json.dumps([VERSION, cfg.source, cfg.text_field, tokenizer_identity, SPLIT_RULE, cfg.val_fraction,
                      cfg.shard_tokens, stats])
    return hashlib.sha256(key.encode()).hexdigest()


def prepare(cfg) -> Path:
    """Tokenize the configured corpus into the cache once; return the prepared directory."""
    label, identity, identity_before = _tokenizer_id(cfg)
    cache = Path(cfg.cache_dir).expanduser()
    files = corpus_files(cfg)
    known = cache / ".index" / _files_key(cfg, files, identity) if files is not None else None
    if known is not None and known.exists():
        out = cache / known.read_text().strip()
        if (out / "manifest.json").exists():
            return out
    content = files_fingerprint(cfg, files) if cfg.source == "files" else None
    corpus = load_corpus(cfg, files, cache / ".datasets" / content[:16] if content else None)
    fp = fingerprint(content or corpus._fingerprint, identity, cfg.val_fraction, cfg.shard_tokens)
    # what these files were called before they were known by content (datasets' path-and-time hash):
    # runs prepared then still resume on them, while the files are as they were
    aliases = [fingerprint(corpus._fingerprint, identity, cfg.val_fraction, cfg.shard_tokens)] if content else []
    # before special tokens' spellings in text were text: the same data unless a document holds one
    before = ([fingerprint(c, identity_before, cfg.val_fraction, cfg.shard_tokens)
               for c in dict.fromkeys([content or corpus._fingerprint, corpus._fingerprint])]
              if identity_before is not None else [])
    out = cache / f"{cfg.source}-{label}-{fp[:16]}"
    if (out / "manifest.json").exists():
        _remember(known, out)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").exists():  # another process may have built it while we waited
            if out.exists():
                shutil.rmtree(out)
            for stale in out.parent.glob(f".{out.name}.*"):  # left by a build that was killed (holding this lock)
                shutil.rmtree(stale, ignore_errors=True)
            log.info("preparing %s into %s", cfg.source, out)
            _build(cfg, corpus, fp, out, aliases, before)
    _remember(known, out)
    return out


def _remember(known: Path | None, out: Path) -> None:
    """Best effort: a cache that is read-only (shared, prepared by someone else) still works, and
    every later run reads the corpus again."""
    if known is None:
        return
    try:
        known.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=known.parent, prefix=f".{known.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(out.name)
        os.replace(tmp, known)  # atomic: a concurrent rank reads the old entry, the new one, or none
    except OSError as e:
        log.debug("cannot record %s in %s: %s", out.name, known.parent, e)


def load_manifest(prepared: Path) -> dict:
    try:
        return json.loads((prepared / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"prepared dataset {prepared} has no readable manifest.json: {e}") from None


def load_tokenizer_of(prepared: Path, manifest: dict):
    """The tokenizer a prepared dataset was made with (for decoding samples)."""
    if manifest["tokenizer"] == "byte":
        return ByteTokenizer()
    return load_tokenizer(str(prepared / "tokenizer.json"))
