"""What `launch.py` does with a composed config: validate, fan out to ranks, train, report."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, DataError
from train.config import Config
from train.study import apply_study
from train.validate import validate

log = logging.getLogger(__name__)

EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_CHECKPOINT = 2, 3, 4, 5


def typed_config(cfg: DictConfig) -> Config:
    config: Config = OmegaConf.to_object(cfg)
    # Hydra created the run (or sweep job) directory from `out_dir`; use its absolute form so that
    # spawned ranks and every file agree on it.
    config.out_dir = str(Path(HydraConfig.get().runtime.output_dir).resolve())
    return config


class RunDirectoryBusy(RuntimeError):
    pass


@contextlib.contextmanager
def run_directory_lock(cfg: Config):
    """Rank 0 holds `out_dir/.lock` while the run lives (the OS drops it when the process dies, even
    by SIGKILL), so a second run in the same directory, or a resume while ranks of the previous
    launch still run, stops with an error instead of writing over it."""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    path = Path(cfg.out_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirectoryBusy(f"out_dir={cfg.out_dir} is in use by another run that is still alive; wait for it, "
                               f"stop it (its checkpoints stay valid), or choose another out_dir") from None
    except OSError as e:  # a file system without locks (some network mounts): run unguarded
        log.warning("cannot lock %s (%s); nothing guards this run directory against a second run", path, e)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def drop_if_empty(out: Path) -> None:
    """Hydra makes the job directory before the job runs; one that nothing was written to goes."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def job_overrides(overrides: list[str]) -> list[str]:
    """What `metrics.jsonl` and `summary.json` record as the job's overrides: the command line's,
    without where files and logs go (out_dir, logger.*; config.yaml has them)."""
    return [o for o in overrides if not o.lstrip("+").startswith(("out_dir=", "logger."))]


def name_sweep_job(cfg: Config, overrides: list[str]) -> list[str]:
    """A job of a multirun gets a wandb group (the sweep directory's name) and a run name made of
    its overrides, unless set; returns the overrides that pass them on to the job's ranks."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or cfg.logger.wandb.mode == "disabled":
        return []
    wb, added = cfg.logger.wandb, []
    if wb.group is None:
        wb.group = Path(HydraConfig.get().sweep.dir).name
        added.append(f"logger.wandb.group='{wb.group}'")
    if wb.name is None:
        wb.name = ",".join(o for o in job_overrides(overrides)
                           if not o.lstrip("+").startswith(("data.cache_dir=", "launcher.")))
        wb.name = wb.name or f"job{HydraConfig.get().job.num}"
        added.append(f"logger.wandb.name='{wb.name}'")
    return added


def check_resumable(cfg: Config) -> None:
    """Refuse, before anything starts, a resume whose checkpoint's settings this launch changes
    where they cannot change (train/run_config.py); the trainer logs the allowed changes."""
    t = cfg.trainer
    if t.resume == "never" or t.resume == "auto" and not any((Path(cfg.out_dir) / "checkpoints").glob("*")):
        return  # nothing to resume (and a launcher process that imports no torch starts ~2 s sooner)
    from train.checkpoint import Checkpointer
    from train.launcher import world_size
    from train.run_config import check_resume

    ckpt = Checkpointer(Path(cfg.out_dir) / "checkpoints", 1, 0, 1).newest_valid() if t.resume == "auto" \
        else Path(t.resume).expanduser()
    if ckpt is not None:
        check_resume(cfg, ckpt, world_size(cfg))


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def submitted() -> bool:
    """Whether Hydra runs this job through submitit (hydra/launcher=slurm|submitit_local): in a process
    of its own, on nodes that SLURM picks."""
    return "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))


def run(dict_cfg: DictConfig) -> int:
    from train import launcher

    overrides = list(HydraConfig.get().overrides.task)
    try:
        cfg = typed_config(dict_cfg)
        apply_study(cfg)  # the learning rate of a study's stage, before anything reads it
        validate(cfg, submitted=submitted())
        launcher.check_multi_node_out_dir(cfg, overrides)
        launcher.adopt_submitit_task(cfg)
    except ConfigError as e:
        drop_if_empty(Path(HydraConfig.get().runtime.output_dir))
        return fail(str(e), EXIT_CONFIG)
    overrides += name_sweep_job(cfg, overrides)
    plan = launcher.plan_launch(cfg, overrides)
    if cfg.launcher.dry_run:
        print(launcher.describe(plan, cfg, overrides), flush=True)
        drop_if_empty(Path(cfg.out_dir))
        return 0
    from common.errors import CheckpointError

    if "RANK" not in os.environ:
        try:  # before any rank starts: a checkpoint this launch cannot continue is refused here
            check_resumable(cfg)
        except CheckpointError as e:
            return fail(str(e), EXIT_CHECKPOINT)
    if plan is not None:
        if cfg.launcher.node_rank == 0:
            try:
                with run_directory_lock(cfg):  # refused here already, before any rank starts
                    pass
            except RunDirectoryBusy as e:
                return fail(str(e), EXIT_CONFIG)
        return launcher.execute(plan, cfg)

    from train.log_setup import route_logs

    route_logs(Path(cfg.out_dir), int(os.environ.get("RANK", 0)))
    from train.distributed import shutdown_distributed
    from train.preemption import StopSignals
    from train.trainer import Diverged, Trainer

    finished = False
    try:
        # stop signals from here on: one during start-up ends the run before its first step
        with run_directory_lock(cfg), StopSignals() as stop:
            summary = Trainer(cfg, job_overrides(overrides)).fit(stop)
        finished = True
    except RunDirectoryBusy as e:
        return fail(str(e), EXIT_CONFIG)
    except DataError as e:
        return fail(str(e), EXIT_DATA)
    except Diverged as e:
        return fail(str(e), EXIT_DIVERGED)
    except CheckpointError as e:
        return fail(str(e), EXIT_CHECKPOINT)
    finally:
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's jobs share one process group
            shutdown_distributed(wait_for_peers=finished)
    if summary["status"] == "preempted":
        STOPPED.append(summary["signal"])  # a sweep in this process runs no further job
    if int(os.environ.get("RANK", 0)) == 0 and summary["status"] == "preempted":
        print(f"\nstopped by {summary['signal']} after step {summary['steps']}; checkpoint "
              f"{summary['checkpoint']}. Run the same command to resume.", flush=True)
    elif int(os.environ.get("RANK", 0)) == 0:
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


# A sweep's failed jobs (in this process): (out_dir, exit status). A failed job does not end the
# others; the sweep exits with the first one's status once every job has run (launch.py).
FAILED_JOBS: list[tuple[str, int]] = []
# A stop signal (Ctrl-C, SIGTERM, SLURM's warning) ends a local sweep, not only its current job:
# the signal that stopped it, and the jobs it then did not start.
STOPPED: list[str] = []
SKIPPED_JOBS: list[str] = []


class JobFailed(RuntimeError):
    """A sweep job submitted through submitit failed: raised in its own process, Hydra hands it to
    the sweep, which exits non-zero once the batch of jobs has run."""


def main(dict_cfg: DictConfig) -> None:
    hydra = HydraConfig.get()
    if STOPPED and hydra.mode == RunMode.MULTIRUN:
        SKIPPED_JOBS.append(hydra.runtime.output_dir)
        drop_if_empty(Path(hydra.runtime.output_dir))
        return
    try:
        code = run(dict_cfg)
    except Exception:  # in a local sweep, one job's crash must neither end the others nor hide their failures
        if hydra.mode != RunMode.MULTIRUN or submitted():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if code and hydra.mode != RunMode.MULTIRUN:
        sys.exit(code)
    if code and submitted():
        raise JobFailed(f"job {hydra.job.num} ({hydra.runtime.output_dir}) failed with exit status {code}; its "
                        f"error is in its log under the sweep's .submitit/")
    if code:
        FAILED_JOBS.append((hydra.runtime.output_dir, code))


def exit_if_jobs_failed() -> None:
    """After a sweep: a one-line account of its failed jobs, and the first one's exit status; of the
    jobs a stop signal kept from starting."""
    if SKIPPED_JOBS:
        print(f"the sweep was stopped by {STOPPED[0]}: {len(SKIPPED_JOBS)} job(s) not started "
              f"({'; '.join(SKIPPED_JOBS)}). Run the same command to continue it.", file=sys.stderr, flush=True)
    if FAILED_JOBS:
        jobs = "; ".join(f"{out} (exit {code})" for out, code in FAILED_JOBS)
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed, each with its error above: {jobs}",
              file=sys.stderr, flush=True)
        sys.exit(FAILED_JOBS[0][1])
