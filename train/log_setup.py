"""Where a run's log lines go: the terminal gets the run's own lines at INFO; rank 0 also writes
everything at DEBUG to `out_dir/train.log`. What DeepSpeed prints while it builds its ops (the
compiler commands setuptools echoes, "... built successfully") and its accelerator guess on a
CPU-only machine go to the file only, at DEBUG: a normal start shows none of it."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

BUILD = logging.getLogger("v4lab.build")
BUILD.setLevel(logging.DEBUG)  # distutils may set the root logger to INFO while DeepSpeed builds
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# setuptools' distutils logs the compiler commands of DeepSpeed's op builder on the root logger
# (older versions) or on `compilers.*` (newer ones)
BUILD_LOGGERS = ("root", "compilers", "distutils", BUILD.name)


def _from_build(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING and (record.name in BUILD_LOGGERS or record.name.startswith(
        tuple(f"{n}." for n in BUILD_LOGGERS)))


class _NotBuildOutput(logging.Filter):
    """For the terminal: drops build chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _from_build(record)


class _BuildOutputAsDebug(logging.Filter):
    """For the file: keeps build chatter, at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _from_build(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _LogWriter(io.TextIOBase):
    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.debug(line)
        return len(text)


def route_logs(out_dir: Path, rank: int) -> None:
    """Set up the run's logging (call once per process, before DeepSpeed is imported)."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed would warn that it guessed the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(logging.INFO)
        handler.addFilter(_NotBuildOutput())
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "train.log")
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter(FORMAT))
        file.addFilter(_BuildOutputAsDebug())
        root.addHandler(file)
    root.setLevel(logging.DEBUG)
    for chatty in ("filelock", "fsspec", "urllib3", "matplotlib", "PIL", "git", "asyncio"):
        logging.getLogger(chatty).setLevel(logging.INFO)


@contextlib.contextmanager
def build_output_to_log():
    """What third-party code prints (DeepSpeed's op builds) goes to the log at DEBUG."""
    with contextlib.redirect_stdout(_LogWriter(BUILD)):
        yield
