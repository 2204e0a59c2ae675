"""Shared helpers for benchmark scripts: compose a config as `launch.py` would, time alternately."""
from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import Config, register_configs
from train.host import reuse_freed_memory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def scratch_dir(prefix: str) -> Path:
    """A temporary directory for a benchmark's runs and data, removed when the script exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def load_config(overrides: list[str]) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    # Set up the process as a training process is (the Trainer does the same); the baseline and
    # the contender of every ratio share it.
    if cfg.trainer.reuse_freed_memory:
        reuse_freed_memory()
    return cfg


def benchmark_trainer(overrides: list[str], start_callbacks: bool = False):
    """A Trainer that only trains: no evaluation, checkpoints or progress bar, a practically
    endless schedule (its warm-up is what a few timed steps see), output in a temporary dir."""
    from train.trainer import Trainer

    cfg = load_config(["trainer.max_steps=1000000", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                       "trainer.progress=false", f"out_dir={scratch_dir('bench-')}", *overrides])
    trainer = Trainer(cfg)
    if start_callbacks:  # the metrics file and wandb, as in a real run
        for cb in trainer.callbacks.values():
            cb.on_train_start(trainer)
    return trainer


def alternate(contenders: dict, steps: int, rounds: int, warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Run each contender's `step()` `steps` times per round, in alternating order, and return
    the seconds per step of every measured round (warm-up rounds are discarded)."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup_rounds + rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(steps):
                contenders[name]()
            if r >= warmup_rounds:
                times[name].append((time.perf_counter() - start) / steps)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
