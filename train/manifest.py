"""Directories that vouch for themselves: `manifest.json` lists every file with its size.

A directory is written under a temporary name, its files fsynced, the manifest written last, and
only then renamed into place; one whose files do not match its manifest (a write cut short, a
truncated or deleted file) is recognised as unusable. Checkpoints and their universal conversions
are sealed this way.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

NAME = "manifest.json"
PREFIX = "step_"
REPLACED = ".replaced-"
# only names the checkpointer writes (step_N, and a swap's old copy .replaced-step_N): a user's
# step_00000004.bak or step_best/ beside them is neither pruned nor resumed
CHECKPOINT_NAME = re.compile(rf"({re.escape(REPLACED)})?{PREFIX}(\d+)")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seal(directory: Path, **fields) -> dict:
    """fsync every file under `directory` (subdirectories included) and write its manifest:
    `fields` plus each file's size."""
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    for f in files:
        fsync_path(directory / f)
    manifest = {**fields, "files": files}
    atomic_write(directory / NAME, json.dumps(manifest, indent=1))
    return manifest


def read(directory: Path) -> dict:
    return json.loads((directory / NAME).read_text())


def problems(directory: Path) -> str | None:
    """Why `directory` cannot be used, or None if every file matches its manifest."""
    try:
        manifest = read(directory)
    except (OSError, ValueError):
        return "no readable manifest.json (the write did not finish)"
    for rel, size in manifest["files"].items():
        f = directory / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return None
