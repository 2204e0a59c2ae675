"""Checkpoint cost and multi-rank throughput of the default model (or the one the overrides give).

1. Save and load time and on-disk size of a full checkpoint (model, optimizer state, scheduler,
   data position, RNG), for optim=adamw and optim=muon, in one process.
2. Training throughput of `python launch.py` at 1 rank and at 2 ranks (torchrun, gloo) with the
   same global batch, alternating launches; tokens/s from each run's summary.json (training time
   only, start-up excluded).

    python -m benchmarks.distributed [--reps 5 --steps 60 --rounds 2] [hydra overrides ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import benchmark_trainer, load_config, median, scratch_dir
from data.shards import prepare

ROOT = Path(__file__).resolve().parents[1]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_cost(optim: str, reps: int, overrides: list[str]) -> dict:
    trainer = benchmark_trainer([f"optim={optim}", "logger.wandb.mode=disabled", *overrides])
    for _ in range(2):  # optimizer state exists after the first step
        trainer.train_step()
    saves, loads = [], []
    for _ in range(reps):
        start = time.perf_counter()
        path = trainer.save_checkpoint()
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.load_state_dict(trainer.checkpointer.load(trainer.engine, path))
        loads.append(time.perf_counter() - start)
    return {"params": trainer.n_params, "bytes": dir_bytes(path), "save_s": median(saves), "load_s": median(loads)}


def throughput(ranks: int, steps: int, cache: Path, overrides: list[str]) -> float:
    out = scratch_dir("bench-ranks-")
    cmd = [sys.executable, str(ROOT / "launch.py"), f"launcher.nproc_per_node={ranks}", f"trainer.max_steps={steps}",
           f"trainer.micro_batch_size={16 // ranks}",  # global batch 16 either way
           "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress=false", "logger.wandb.mode=disabled",
           f"data.cache_dir={cache}", f"out_dir={out}", *overrides]
    # this process is a one-rank group of its own (the checkpoint part): its rank variables stay here
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    model = " ".join(args.overrides) or "the default model"

    print(f"checkpoint of {model} (median of", args.reps, "saves and loads):")
    for optim in ("adamw", "muon"):
        c = checkpoint_cost(optim, args.reps, args.overrides)
        print(f"  optim={optim:<6} {c['params']:,} parameters  {c['bytes'] / 2**20:6.2f} MiB on disk  "
              f"save {1e3 * c['save_s']:7.1f} ms  load {1e3 * c['load_s']:7.1f} ms")

    cache = scratch_dir("bench-cache-")
    prepare(load_config([f"data.cache_dir={cache}", *args.overrides]).data)  # once, outside the measurement
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for ranks in (1, 2) if r % 2 == 0 else (2, 1):
            rates[ranks].append(throughput(ranks, args.steps, cache, args.overrides))
    one, two = median(rates[1]), median(rates[2])
    print(f"\ntraining throughput, {model}, global batch 16, {args.steps} steps, {args.rounds} rounds:")
    print(f"  1 rank  {one:9,.0f} tokens/s   {rates[1]}")
    print(f"  2 ranks {two:9,.0f} tokens/s   {rates[2]}")
    print(f"  2 ranks / 1 rank: {two / one:.2f}x")


if __name__ == "__main__":
    main()
