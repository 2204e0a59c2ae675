"""What `launch.py` does with a composed config: validate, fan out to ranks, train, report."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from train.config import Config
from train.validate import ConfigError, validate

log = logging.getLogger(__name__)

EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED = 2, 3, 4


def typed_config(cfg: DictConfig) -> Config:
    config: Config = OmegaConf.to_object(cfg)
    # Hydra created the run (or sweep job) directory from `out_dir`; use its absolute form so that
    # spawned ranks and every file agree on it.
    config.out_dir = str(Path(HydraConfig.get().runtime.output_dir).resolve())
    return config


def spawn_ranks(cfg: Config) -> int:
    """Re-run this command under torchrun with one process per local rank."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("out_dir=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.launcher.nproc_per_node}", sys.argv[0], *overrides, f"out_dir={cfg.out_dir}"]
    log.info("launching %d ranks: %s", cfg.launcher.nproc_per_node, " ".join(cmd))
    return subprocess.run(cmd).returncode


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run(dict_cfg: DictConfig) -> int:
    from data.sources import DataError

    try:
        cfg = typed_config(dict_cfg)
        validate(cfg)
    except ConfigError as e:
        return fail(str(e), EXIT_CONFIG)
    if cfg.launcher.nproc_per_node > 1 and "RANK" not in os.environ:
        return spawn_ranks(cfg)

    from train.distributed import shutdown_distributed
    from train.trainer import Diverged, Trainer

    try:
        summary = Trainer(cfg).fit()
    except DataError as e:
        return fail(str(e), EXIT_DATA)
    except Diverged as e:
        return fail(str(e), EXIT_DIVERGED)
    finally:
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's jobs share one process group
            shutdown_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        out = Path(cfg.out_dir)
        wandb_dir = next(iter(sorted((out / "wandb").glob("*run-*"))), None)
        print(
            f"\nfinished {summary['steps']} steps, {summary['tokens']:,} tokens, "
            f"{summary['tokens_per_s']:,.0f} tokens/s; final validation loss {summary['final_val_loss']:.4f}\n"
            f"  config      {out / 'config.yaml'}\n  metrics     {out / 'metrics.jsonl'}\n"
            f"  summary     {out / 'summary.json'}\n  checkpoints {out / 'checkpoints'}\n"
            + (f"  wandb       {wandb_dir}\n" if wandb_dir else ""),
            flush=True,
        )
    return 0


def main(dict_cfg: DictConfig) -> None:
    code = run(dict_cfg)
    # In a sweep a failed job must not end the other jobs; its summary.json records the failure.
    if code and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(code)
