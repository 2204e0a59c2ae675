"""Things that watch a run without steering it: the metrics file, wandb, the progress bar.

Each callback sees the trainer at fixed points and may keep state, which checkpoints save, so a
resumed run continues its logs rather than restarting them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from train.manifest import atomic_write


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, metrics: dict) -> None: ...
    def on_train_end(self, trainer, summary: dict) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def cut_metrics(path: Path, after_step: int | None, abandon: bool = False) -> None:
    """Rows of `path` past `after_step` (every row where None) leave the file; with `abandon` they
    are kept in metrics.abandoned.jsonl (another branch's history), written before the file shrinks."""
    kept, dropped = [], []
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError):
            break  # a line cut short by a kill: everything after it is unreliable
        (kept if after_step is not None and step <= after_step else dropped).append(line + "\n")
    if not dropped:
        return
    if abandon:
        with open(path.with_name("metrics.abandoned.jsonl"), "a") as f:
            f.writelines(dropped)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, "".join(kept))


class MetricsFile(Callback):
    """`metrics.jsonl`: one JSON object per step, flushed as written so a killed run keeps its log."""

    def __init__(self, path: Path, extra: dict | None = None):
        """`extra`: keys added to every row (the job's overrides)."""
        self.path, self.file, self.extra = path, None, extra or {}

    def on_train_start(self, trainer) -> None:
        # A resumed run re-logs the steps after its checkpoint: drop what the interrupted run wrote
        # past that point, so the file reads as one uninterrupted run. (A return to an earlier
        # checkpoint has already moved those rows to metrics.abandoned.jsonl: cut_metrics.)
        cut_metrics(self.path, trainer.step)
        self.file = open(self.path, "a", buffering=1)

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.file.write(json.dumps({**{k: _jsonable(v) for k, v in metrics.items()}, **self.extra}) + "\n")

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.file:
            self.file.close()


class WandbLogger(Callback):
    def __init__(self, cfg, out_dir: Path, config: dict):
        self.cfg, self.out_dir, self.config = cfg, out_dir, config
        self.run, self.run_id = None, None

    def on_train_start(self, trainer) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=self.cfg.mode, project=self.cfg.project, group=self.cfg.group, name=self.cfg.name,
            tags=list(self.cfg.tags), dir=str(self.out_dir), config=self.config,
            id=self.run_id, resume="allow" if self.run_id else None,
        )
        self.run_id = self.run.id

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
            self.run.finish()

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")


class ProgressBar(Callback):
    def on_train_start(self, trainer) -> None:
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=0.5)

    def on_step_end(self, trainer, metrics: dict) -> None:
        post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
        if metrics.get("mfu") is not None:
            post["mfu"] = f"{metrics['mfu']:.1%}"
        if "val_loss" in metrics:
            post["val"] = f"{metrics['val_loss']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer, summary: dict) -> None:
        self.bar.close()
