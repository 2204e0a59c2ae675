"""Atomic, self-checking checkpoints around DeepSpeed's engine checkpoint.

Layout under `out_dir/checkpoints/`: one directory per step (`step_00000100/`) holding DeepSpeed's
files (model, sharded optimizer state, LR scheduler), one `trainer_state_rank{r}.pt` per rank
(data position, RNG states, step, tokens, callback state), and `manifest.json`, which lists every
file with its size. A checkpoint is written under a temporary name, fsynced, renamed into place,
and only then named in `latest`; one whose files do not match its manifest is skipped on resume.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from train.distributed import barrier

log = logging.getLogger(__name__)
PREFIX = "step_"
REPLACED = ".replaced-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from as asked."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def problems(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None if every file matches its manifest."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json (the write did not finish)"
    for rel, size in manifest["files"].items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int):
        self.dir, self.keep_last, self.rank, self.world_size = directory, keep_last, rank, world_size

    def save(self, engine, step: int, trainer_state: dict, extra_files: dict[str, str] | None = None) -> Path:
        """`extra_files`: {name: text} written beside the state by rank 0 (the run's config)."""
        final, tmp = self.dir / f"{PREFIX}{step:08d}", self.dir / f".tmp-{PREFIX}{step:08d}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(f".tmp-{PREFIX}*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            for old in self.dir.glob(f"{REPLACED}*"):  # a swap cut short: drop the old copy once the new is whole
                new = self.dir / old.name.removeprefix(REPLACED)
                if new.is_dir() and problems(new) is None:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False)
        torch.save(trainer_state, tmp / f"trainer_state_rank{self.rank}.pt")
        if self.rank == 0:
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        barrier()
        if self.rank == 0:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            for f in files:
                _fsync(tmp / f)
            manifest = {"step": step, "world_size": self.world_size, "files": files}
            _atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1))
            if final.exists():  # a re-run of the same step after a resume: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.dir)
            _atomic_write(self.dir / "latest", final.name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; broken newer ones are reported."""
        found = [*self.dir.glob(f"{PREFIX}*"), *self.dir.glob(f"{REPLACED}{PREFIX}*")]
        for ckpt in sorted(found, key=lambda p: p.name.removeprefix(REPLACED), reverse=True):
            why = problems(ckpt)
            if why is None:
                return ckpt
            log.warning("checkpoint %s is unusable (%s); trying the previous one", ckpt, why)
        return None

    def load(self, engine, ckpt: Path) -> dict:
        why = problems(ckpt)
        if why is not None:
            raise CheckpointError(f"checkpoint {ckpt} is unusable: {why}")
        saved_world = json.loads((ckpt / "manifest.json").read_text())["world_size"]
        if saved_world != self.world_size:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {saved_world} rank(s); this run has {self.world_size}. "
                f"Resume with launcher.nnodes × launcher.nproc_per_node = {saved_world} ranks (resharding "
                f"a checkpoint to another world size is not supported), or start afresh in a new out_dir"
            )
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        return torch.load(ckpt / f"trainer_state_rank{self.rank}.pt", weights_only=False)
