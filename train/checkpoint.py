"""Atomic, self-checking checkpoints around DeepSpeed's engine checkpoint.

Layout under `out_dir/checkpoints/`: one directory per step (`step_00000100/`) holding DeepSpeed's
files (model, sharded optimizer state, LR scheduler), one `trainer_state_rank{r}.pt` per rank
(data position, RNG states, step, tokens, callback state), and `manifest.json`, which lists every
file with its size, the world size and every parameter's shape. A checkpoint is written under a
temporary name, fsynced, renamed into place, and only then named in `latest`; one whose files do
not match its manifest is skipped on resume. A checkpoint from another world size is resharded
(train/reshard.py); one written by a model of other parameter shapes is refused.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from common.errors import CheckpointError  # noqa: F401  (raised here; callers import it from here too)
from train import reshard
from train.distributed import barrier
from train.manifest import CHECKPOINT_NAME as _NAME
from train.manifest import PREFIX, REPLACED, atomic_write, fsync_path, problems, read, seal

log = logging.getLogger(__name__)


def param_shapes(module) -> dict[str, list[int]]:
    """Every parameter's full shape (ZeRO-3 partitions report theirs as `ds_shape`)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}


def saved_param_shapes(ckpt: Path, manifest: dict) -> dict[str, list[int]]:
    """The shapes the checkpoint's model had: from the manifest, or for checkpoints written before
    it recorded them, from DeepSpeed's model-state file."""
    if "param_shapes" in manifest:
        return manifest["param_shapes"]
    name = min(f for f in manifest["files"] if f.endswith("model_states.pt"))
    state = torch.load(ckpt / name, map_location="cpu", weights_only=False)
    if state.get("param_shapes"):  # ZeRO ≥ 1: one {name: shape} per optimizer group
        return {k: list(v) for group in state["param_shapes"] for k, v in group.items()}
    buffers = set(state.get("buffer_names") or ())
    return {k: list(v.shape) for k, v in state["module"].items() if k not in buffers}


def shape_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str | None:
    """Why a model with parameter shapes `current` cannot take the checkpoint's, or None."""
    differ = [f"{k}: checkpoint {tuple(saved[k])}, this model {tuple(v)}" for k, v in current.items()
              if k in saved and list(saved[k]) != list(v)]
    missing = [k for k in current if k not in saved]
    if missing:
        differ.append(f"not in the checkpoint: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if not differ:
        return None
    return "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")


def _step_of(ckpt: Path) -> int:
    """step_N and a swap's .replaced-step_N: N."""
    return int(_NAME.fullmatch(ckpt.name).group(2))


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
            for old in self._checkpoint_dirs(replaced=True):  # a swap cut short: drop the old copy once the new is whole
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
            seal(tmp, step=step, world_size=self.world_size, zero_stage=engine.zero_optimization_stage(),
                 param_shapes=param_shapes(engine.module))
            replaced = self.dir / f"{REPLACED}{final.name}"
            if final.exists():  # a re-run of the same step after a resume: swap, a whole copy at every moment
                os.rename(final, replaced)
            os.rename(tmp, final)
            fsync_path(self.dir)
            shutil.rmtree(replaced, ignore_errors=True)
            atomic_write(self.dir / "latest", final.name + "\n")
            self._prune(final)
        barrier()
        return final

    def set_aside_after(self, ckpt: Path) -> list[Path]:
        """Resuming from `ckpt` in this directory while newer checkpoints are there (going back to an
        earlier step on purpose): move those to `abandoned/`, where neither pruning (which keeps the
        newest names) nor resume=auto (which takes the newest) would treat them as this run's.
        Returns where they went."""
        ckpt = ckpt.resolve()
        if ckpt.parent != self.dir.resolve():
            return []
        step = _step_of(ckpt) if _NAME.fullmatch(ckpt.name) else read(ckpt)["step"]  # a renamed copy: its manifest
        moved = []
        for newer in [p for p in self._checkpoint_dirs() if _step_of(p) > step]:
            target = self.dir / "abandoned" / newer.name
            n = 1
            while target.exists():  # set aside before, by an earlier return to the past
                target, n = self.dir / "abandoned" / f"{newer.name}.{n}", n + 1
            target.parent.mkdir(exist_ok=True)
            os.rename(newer, target)
            moved.append(target)
        if moved:
            # DeepSpeed's zero_to_fp32.py, written beside the checkpoints, converts the one `latest` names
            atomic_write(self.dir / "latest", ckpt.name + "\n")
            fsync_path(self.dir)
        return moved

    def _checkpoint_dirs(self, replaced: bool | None = None) -> list[Path]:
        """Every checkpoint here, a swap's old copy (.replaced-step_N) included, oldest first; of one
        step, the old copy before the new (a kill between the swap's last rename and its cleanup
        leaves both). `replaced`: only the old copies (True) or only the others (False)."""
        found = []
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            m = _NAME.fullmatch(p.name)
            if m and p.is_dir() and replaced in (None, bool(m.group(1))):
                found.append((int(m.group(2)), not m.group(1), p))
        return [p for *_, p in sorted(found)]

    def _prune(self, written: Path) -> None:
        """Keep `written` and the newest keep_last - 1 usable steps before it; remove the ones
        older than those. Unusable checkpoints do not count (else, after resume=auto fell back past
        a damaged newest checkpoint, the one just written could go and the damaged one stay); later
        ones (a damaged checkpoint that resume skipped) stay for this run to write over. A step is
        usable where either of its copies is, as resume=auto takes them: a swap's old copy
        (.replaced-step_N) beside a damaged step_N keeps step N, and goes with it."""
        earlier = [p for p in self._checkpoint_dirs() if _step_of(p) < _step_of(written)]
        usable = sorted({_step_of(p) for p in earlier if problems(p) is None})
        kept = usable[max(0, len(usable) - (self.keep_last - 1)):] if self.keep_last > 1 else []
        oldest = kept[0] if kept else _step_of(written)
        for old in earlier:
            if _step_of(old) < oldest:
                shutil.rmtree(old, ignore_errors=True)

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; broken newer ones are reported.
        None where there is none at all; where there are checkpoints and none is usable, an error:
        starting afresh would overwrite the run's metrics with a new run's."""
        found = self._checkpoint_dirs()[::-1]
        reasons = []
        for ckpt in found:
            why = problems(ckpt)
            if why is None:
                return ckpt
            log.warning("checkpoint %s is unusable (%s); trying the previous one", ckpt, why)
            reasons.append(f"{ckpt.name}: {why}")
        if found:
            raise CheckpointError(
                f"{self.dir} holds checkpoints and none is usable ({'; '.join(reasons)}); nothing was changed. "
                f"Resume from a repaired one with trainer.resume=PATH, or start afresh in a new out_dir")
        return None

    def load(self, engine, ckpt: Path) -> dict:
        """Restore `engine` from `ckpt` and return this rank's trainer state. At another world size
        the optimizer state is resharded and every rank gets rank 0's trainer state (the data
        position and counters are global) with its own RNG state where the checkpoint has one for
        its rank, else `rng` None."""
        why = problems(ckpt)
        if why is not None:
            raise CheckpointError(f"checkpoint {ckpt} is unusable: {why}")
        manifest = read(ckpt)
        mismatch = shape_mismatch(saved_param_shapes(ckpt, manifest), param_shapes(engine.module))
        if mismatch:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by a model with other parameter shapes ({mismatch}), so it cannot "
                f"be resumed or resharded into this one. Resume with the model config it was written with, or "
                f"start afresh in a new out_dir")
        saved_world = manifest["world_size"]
        if saved_world == self.world_size:
            engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            return torch.load(ckpt / f"trainer_state_rank{self.rank}.pt", weights_only=False)
        log.info("resharding checkpoint %s from %d to %d rank(s)", ckpt, saved_world, self.world_size)
        try:
            reshard.load(engine, ckpt, manifest)
        except reshard.ReshardError as e:
            raise CheckpointError(str(e)) from None
        state = torch.load(ckpt / "trainer_state_rank0.pt", weights_only=False)
        if self.rank:
            own = ckpt / f"trainer_state_rank{self.rank}.pt"
            state["rng"] = torch.load(own, weights_only=False)["rng"] if own.is_file() else None
        return state
