"""The trainer: data, model and optimizer put together through DeepSpeed's engine.

One optimizer step is `train_step`: for each micro-batch, forward, `engine.backward`, `engine.step`
(DeepSpeed applies the update, clipping and LR schedule at the accumulation boundary). `fit` adds
evaluation, checkpoints and the callbacks around it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from data.loader import TokenLoader, validation_batches
from data.shards import prepare
from model import build_model, cpu_kernels
from optim import build_optimizer, build_scheduler
from optim.qk_clip import qk_clip, track_max_logits
from optim.zero import bind_zero_partitions
from train.batch import accumulation_steps, micro_batch_size
from train.callbacks import MetricsFile, ProgressBar, WandbLogger, cut_metrics
from train.checkpoint import CheckpointError, Checkpointer
from train.compile import compile_blocks, compile_seconds, eager
from train.config import Config
from train.distributed import (barrier, from_rank0, init_distributed, mean_over_ranks, sum_over_ranks,
                               wait_for_rank0)
from train.host import reuse_freed_memory
from train.log_setup import build_output_to_log
from train.manifest import atomic_write
from train.mfu import Utilisation
from train.preemption import StopSignals
from train.probes import StabilityProbes
from train.profiling import StepProfiler
from train.provenance import record_start
from train.run_config import as_dict, check_resume, flatten, inert_in, record_start_config, to_yaml
from train.spikes import SpikeGuard

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The loss or gradient norm became non-finite (and the run is to stop)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    # not bf16 that is emulated (V100, T4: the default of is_bf16_supported counts it)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """trainer.tf32 on CUDA: float32 matmuls on TF32 tensor cores. Only there: the setting is
    process-wide and reaches oneDNN's CPU matmuls too, which stay IEEE float32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    t = cfg.trainer
    stage = cfg.deepspeed.zero_stage
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(t, world_size),
        "gradient_accumulation_steps": accumulation_steps(t, world_size),
        # ZeRO-0 clips without reporting the norm; there the trainer clips itself (Trainer.manual_clip).
        "gradient_clipping": t.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        # bf16 as autocast over fp32 parameters: the optimizer (Muon included) sees whole fp32
        # matrices at ZeRO-0, where DeepSpeed's bf16 mode would hand it flat fragments. No "lower
        # precision safe modules": by default DeepSpeed reduces nn.Linear weights' gradients in bf16
        # at ZeRO-1/2 (even on one rank), rounding them where every other gradient stays fp32.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def engine_device_args(device: torch.device) -> argparse.Namespace | None:
    """DeepSpeed's engine takes GPU LOCAL_RANK unless told otherwise; ours wraps it around the GPUs
    this rank sees (a SLURM task may see only its own GPU, index 0, whatever its LOCAL_RANK)."""
    return argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    def __init__(self, cfg: Config, overrides: list[str] | None = None):
        """`overrides`: the command-line overrides of this run (launch.py), carried by every
        metrics row and the summary so that a sweep's files say which job they belong to."""
        import deepspeed

        self.cfg, t = cfg, cfg.trainer
        self.overrides = list(overrides) if overrides is not None else None
        if t.reuse_freed_memory:
            reuse_freed_memory()
        self.out_dir = Path(cfg.out_dir)
        with build_output_to_log():  # DeepSpeed's op builds print; a normal start does not show them
            self.rank, self.world_size, self.device = init_distributed(cfg.launcher.collective_timeout_s)
        self.max_steps = t.max_steps
        self.micro_batch = micro_batch_size(t, self.world_size)
        self.accum = accumulation_steps(t, self.world_size)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.precision = resolve_precision(t.precision, self.device)
        set_matmul_precision(self.device, t.tf32)

        d = cfg.data
        if self.rank == 0:  # one rank prepares, the others wait and reuse the cache
            self.prepared = prepare(d)
        wait_for_rank0()
        if self.rank != 0:
            self.prepared = prepare(d)
        self.loader = TokenLoader(self.prepared, d.seq_len, self.micro_batch, cfg.seed, self.rank, self.world_size,
                                  global_batch=t.global_batch_size)
        self.val_batches = validation_batches(self.prepared, d.seq_len, self.micro_batch, t.eval_batches,
                                              self.rank, self.world_size)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.loader.manifest["vocab_size"])
        self.n_params = model.num_params()
        self.n_active_params = model.num_active_params()
        self.flops_per_token = model.flops_per_token(d.seq_len)
        if self.device.type == "cpu":
            cpu_kernels.load_for(cfg.model)
        # in place, before DeepSpeed wraps the model: names and checkpoints stay the eager run's
        self.compiled = compile_blocks(model) if t.compile else []
        if self.compiled and cfg.deepspeed.zero_stage == 3:
            log.warning("trainer.compile with ZeRO-3: DeepSpeed's parameter-gathering hooks are kept out of "
                        "graphs, so each submodule of a block breaks its graph; training is the eager run's, "
                        "most of the speed-up is lost")
        self.compile_s = 0.0  # seconds spent compiling (the first steps, the first evaluation)
        optimizer = build_optimizer(model, cfg.optim, self.device)
        scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
        ds_config = deepspeed_config(cfg, self.world_size, self.precision)
        # ZeRO ≥ 1 moves gradients into its partitions (p.grad is None): DeepSpeed measures the norm there,
        # with or without clipping
        self.manual_clip = cfg.deepspeed.zero_stage == 0
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=engine_device_args(self.device), model=model.to(self.device), optimizer=optimizer,
            lr_scheduler=scheduler, config=ds_config,
        )
        bind_zero_partitions(self.engine)
        self.utilisation = Utilisation(self.flops_per_token, self.device, self.precision, t.peak_tflops)
        self.profiler = StepProfiler(t.profile, self.out_dir, self.rank, self.device)
        if cfg.optim.qk_clip_tau > 0:
            track_max_logits(self.engine.module)
        torch.manual_seed(cfg.seed + self.rank)  # dropout differs per rank, reproducibly

        self.probes = None
        if cfg.probes.every > 0 and self.rank == 0:  # local computation only: rank 0 probes, logs
            x, y = self.val_batches[0]
            self.probes = StabilityProbes(self.engine.module, (x.to(self.device), y.to(self.device)), cfg.probes.every,
                                          per_head=cfg.optim.per_head)
        self.step, self.tokens, self.train_time, self.skipped_steps = 0, 0, 0.0, 0
        self.wall_before, self.wall_start = 0.0, time.perf_counter()  # wall seconds of earlier launches, this one's start
        self.spikes = SpikeGuard(t.spike_sigma, t.spike_window) if t.on_spike == "skip" else None
        self.resumed_changes: dict = {}
        self.last_checkpoint: tuple[int, Path] | None = None
        self.val_loss: float | None = None
        self.optimizer_state_mb: float | None = None
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", t.keep_last, self.rank, self.world_size)
        self.callbacks = {}
        if self.rank == 0:
            resolved = as_dict(cfg)
            self.callbacks["metrics"] = MetricsFile(self.out_dir / "metrics.jsonl",
                                                    {} if self.overrides is None else {"overrides": self.overrides})
            if cfg.logger.wandb.mode != "disabled":
                self.callbacks["wandb"] = WandbLogger(cfg.logger.wandb, self.out_dir, resolved)
            if t.progress:
                self.callbacks["progress"] = ProgressBar()
        log.info("model: %s parameters (%s active per token), %s training FLOPs/token; precision %s; %d rank(s), "
                 "%d micro-batch(es) of %d per step", f"{self.n_params:,}", f"{self.n_active_params:,}",
                 f"{self.flops_per_token:,}", self.precision, self.world_size, self.accum, self.micro_batch)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        start = time.perf_counter()
        compile_start = compile_seconds()
        # what a stop on a non-finite step rolls back to: the data position and RNG before it
        before = (self.loader.state_dict(), rng_state())
        skipped_before = self.engine.skipped_steps
        groups = self.scheduler.optimizer.param_groups
        lr = groups[0]["lr"]  # what this step applies (Muon's half: group 0)
        adamw_lr = next((g["lr"] for g in groups if g.get("use_muon") is False), None)  # Muon's AdamW half
        module = self.engine.module
        self._set_model_phase()
        self.engine.train()
        loss_sum = torch.zeros((), device=self.device)
        grad_norm, spike = None, False
        for _ in range(self.accum):
            x, y = next(self.loader)
            loss = self.engine(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if self.manual_clip and self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._clip_grad_norm()
                if self.spikes is not None:  # the step's loss over all ranks, before the update
                    spike = self.spikes.is_spike(mean_over_ranks(loss_sum / self.accum).item(), grad_norm,
                                                 phase=getattr(module, "trunk_frozen", False))
                self._skip_update_if(not math.isfinite(grad_norm) or spike)
            self.engine.step()
        clipped = qk_clip(self.engine.module, self.cfg.optim.qk_clip_tau) if self.cfg.optim.qk_clip_tau > 0 else None
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        loss = mean_over_ranks(loss_sum / self.accum).item()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.step += 1
        self.tokens += self.tokens_per_step
        # The compiler's time (first steps) is no training: it stays out of tokens/s.
        compiled_s = compile_seconds() - compile_start
        self.compile_s += compiled_s
        elapsed = time.perf_counter() - start - compiled_s
        self.train_time += elapsed
        if self.compiled and self.step == 1 and self.rank == 0:
            log.info("torch.compile: %.1f s compiling %d block(s) in step 1, kept out of tokens/s",
                     compiled_s, len(self.compiled))
        applied = self.engine.skipped_steps == skipped_before
        # MoE bias updates and the loss parts; `loss` stays the next-token loss, comparable across models
        parts = module.on_step_end(applied) if hasattr(module, "on_step_end") else {}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._non_finite(loss, grad_norm, applied=applied, before=before)
        elif spike:
            self.skipped_steps += 1
            log.warning("step %d: loss %.4g or gradient norm %.4g more than trainer.spike_sigma=%g standard deviations "
                        "above the last %d steps; update skipped (%d skipped so far)", self.step, loss, grad_norm,
                        self.cfg.trainer.spike_sigma, len(self.spikes.losses), self.skipped_steps)
        if "loss/lm" in parts:
            parts["loss/total"], loss = loss, parts.pop("loss/lm")
        tokens_per_s = self.tokens_per_step / elapsed
        metrics = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                   "tokens_per_s": tokens_per_s, **self.utilisation.metrics(tokens_per_s),
                   "skipped_steps": self.skipped_steps, **parts}
        if adamw_lr is not None:
            metrics["lr/adamw"] = adamw_lr
        if clipped is not None:
            metrics["qk_clip/heads_clipped"] = clipped
        if self.spikes is not None:
            metrics["spike_skipped"] = spike
        digest = self.loader.take_digest()
        if digest is not None:  # V4LAB_BATCH_DIGEST=1: which windows the step trained on, whatever the layout
            metrics["data/digest"] = sum_over_ranks(digest, self.device)
        return metrics

    def _set_model_phase(self) -> None:
        """V4 parts that change with the step: CSA goes sparse after the indexer's warm-up, the
        MTP weight drops once the learning rate decays. Before every step, and after a resume
        (so that an evaluation right away sees the model as trained)."""
        module = self.engine.module
        if hasattr(module, "on_step_start"):
            group = self.scheduler.optimizer.param_groups[0]
            peak_from = group.get("frozen_until", 0) + self.cfg.optim.warmup_steps  # a frozen group's schedule starts late
            module.on_step_start(self.step, lr_decaying=self.step >= peak_from
                                 and group["lr"] < self.scheduler.base_lrs[0] * (1 - 1e-6))

    def _skip_update_if(self, non_finite: bool) -> None:
        """ZeRO-0: drop the gradients so the optimizer leaves every parameter and state alone, and
        raise the `overflow` flag by which DeepSpeed's engine counts a skipped step and holds the LR
        schedule. ZeRO ≥ 1 optimizers check for overflow and skip by themselves."""
        self.optimizer.overflow = non_finite
        if non_finite:
            self.optimizer.zero_grad(set_to_none=True)

    def _non_finite(self, loss: float, grad_norm: float, applied: bool, before) -> None:
        t = self.cfg.trainer
        what = f"step {self.step} had loss={loss}, grad_norm={grad_norm}"
        advice = (f"Lower optim.lr (now {self.cfg.optim.lr}) or raise optim.warmup_steps "
                  f"(now {self.cfg.optim.warmup_steps})")
        if applied:  # cannot happen with finite gradients and a non-finite loss; never continue silently
            raise Diverged(f"the run diverged: {what} and the update was applied. {advice}; the last good "
                           f"checkpoint is in {self.checkpointer.dir}")
        if t.on_nonfinite == "skip" and self.skipped_steps < t.max_skipped_steps:
            self.skipped_steps += 1
            log.warning("%s: update skipped (%d of at most trainer.max_skipped_steps=%d)", what,
                        self.skipped_steps, t.max_skipped_steps)
            return
        # The update was not applied: step back to the last good state and checkpoint it.
        self.step -= 1
        self.tokens -= self.tokens_per_step
        self.loader.load_state_dict(before[0])
        set_rng_state(before[1])
        ckpt = self.checkpoint_now()
        why = (f"more than trainer.max_skipped_steps={t.max_skipped_steps} steps were skipped"
               if t.on_nonfinite == "skip" else "trainer.on_nonfinite=stop")
        raise Diverged(f"the run diverged at step {self.step + 1}: {what}; its update was not applied and "
                       f"{why}. The last good state (step {self.step}) is checkpointed in {ckpt}. {advice}, "
                       f"or set trainer.on_nonfinite=skip to step over isolated bad batches.")

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        clip = self.cfg.trainer.grad_clip
        if clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))

    @torch.no_grad()
    def evaluate(self) -> float:
        compile_start = compile_seconds()  # the first evaluation compiles the blocks' no-grad graphs
        self._set_model_phase()  # the model as trained so far, as a resume or train.load.at_step sets it
        self.engine.eval()
        total, weight = torch.zeros((), device=self.device), 0.0
        for x, y in self.val_batches:
            share = x.size(0) / self.micro_batch  # a short split's last batch counts for its windows
            total += self.engine(x.to(self.device), y.to(self.device)).float() * share
            weight += share
        self.compile_s += compile_seconds() - compile_start
        return mean_over_ranks(total / weight).item()

    # -- state ------------------------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        """This rank's optimizer state (momentum, Adam moments): shrinks with ranks under ZeRO ≥ 1."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's complete parameters on every rank (gathered from ZeRO-3 partitions)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.deepspeed.zero_stage == 3):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_time": self.train_time, "wall_s": self.wall_s(),
                "skipped_steps": self.skipped_steps, "loader": self.loader.state_dict(), "rng": rng_state(),
                "probes": self.probes.state_dict() if self.probes else None,
                "spikes": self.spikes.state_dict() if self.spikes else None,
                "callbacks": {k: cb.state_dict() for k, cb in self.callbacks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.train_time = state["step"], state["tokens"], state["train_time"]
        self.skipped_steps, self.wall_before = state.get("skipped_steps", 0), state.get("wall_s", 0.0)
        self.loader.load_state_dict(state["loader"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        else:  # resharded onto a rank the checkpoint did not have: a stream of its own, not the start's replayed
            seed = (self.cfg.seed * 1_000_003 + self.rank) * 1_000_003 + self.step
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        if self.probes and state.get("probes"):
            self.probes.load_state_dict(state["probes"])
        if self.spikes and state.get("spikes"):
            self.spikes.load_state_dict(state["spikes"])
        for k, cb in self.callbacks.items():
            cb.load_state_dict(state["callbacks"].get(k, {}))

    def wall_s(self) -> float:
        """The run's wall time: this launch's, and the earlier launches' up to the checkpoint resumed."""
        return self.wall_before + time.perf_counter() - self.wall_start

    def checkpoint_now(self) -> Path:
        """A checkpoint of the current state: the one already written at this step, or a new one."""
        step, path = self.last_checkpoint or (None, None)
        return path if step == self.step else self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.engine, self.step, self.state_dict(), {"config.yaml": self.config_yaml()})
        self.last_checkpoint = (self.step, path)
        return path

    def maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "never":
            return
        if resume == "auto":  # rank 0 decides, so that every rank loads the same step (or refuses)
            ckpt = from_rank0(self.checkpointer.newest_valid, CheckpointError, lambda e: e)
        else:
            ckpt = Path(resume).expanduser()
        if ckpt is None:
            return
        self.resumed_changes = check_resume(self.cfg, ckpt, self.world_size, log_changes=self.rank == 0)
        groups = self.scheduler.optimizer.param_groups
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
        self.load_state_dict(self.checkpointer.load(self.engine, ckpt))
        if resume != "auto":  # loaded: only now may the later checkpoints stop being this run's
            self._branch_from(ckpt)
        self.last_checkpoint = (self.step, ckpt)
        self._apply_configured_hyperparameters(configured)
        self._set_model_phase()
        log.info("resumed from %s at step %d", ckpt, self.step)

    def _branch_from(self, ckpt: Path) -> None:
        """trainer.resume=PATH: what this out_dir holds past the checkpoint's step is another
        branch's. Rank 0 moves its metrics rows to metrics.abandoned.jsonl (all of them for another
        run's checkpoint), then the later checkpoints to checkpoints/abandoned/ (set_aside_after): the
        rows first, so a run killed in between is branched again, not continued, by the same command.
        Every rank hears of a failure."""
        own = ckpt.resolve().parent == self.checkpointer.dir.resolve()

        def branch():
            cut_metrics(self.out_dir / "metrics.jsonl", self.step if own else None, abandon=True)
            return [str(m) for m in self.checkpointer.set_aside_after(ckpt)]
        moved = from_rank0(branch, OSError,
                           lambda e: CheckpointError(f"cannot set what came after {ckpt.name} aside: {e}"))
        for path in moved:
            log.warning("resumed from the earlier %s: set %s aside (kept, no longer this run's)", ckpt.name, path)

    def _apply_configured_hyperparameters(self, configured: list[dict]) -> None:
        """A checkpoint restores the optimizer's hyperparameters as they were; the config of this
        launch wins (resuming a diverged run with a lower optim.lr must lower it)."""
        sched = self.scheduler
        for i, (group, fresh) in enumerate(zip(sched.optimizer.param_groups, configured)):
            changed = {k: (group.get(k), v) for k, v in fresh.items() if group.get(k) != v}
            group.update(fresh)
            sched.base_lrs[i] = fresh["initial_lr"]
            group["lr"] = fresh["initial_lr"] * sched.lr_lambdas[i](sched.last_epoch)
            if changed and self.rank == 0:
                log.warning("optimizer group %s: %s from this launch's config", group.get("name", i),
                            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))

    def config_yaml(self) -> str:
        return to_yaml(self.cfg, self.inert_keys())

    def inert_keys(self) -> list[str]:
        return inert_in(self.cfg, flatten(as_dict(self.cfg)))

    def _warn_inert(self, inert: list[str]) -> None:
        """One warning naming the keys this run was given that have no effect in it: set on the
        command line, or away from their default (a sweep crossing variants sets them)."""
        default = flatten(as_dict(Config()))
        given = {o.lstrip("+").split("=", 1)[0] for o in self.overrides or ()}
        now = flatten(as_dict(self.cfg))
        named = [k for k in inert if k in given or now[k] != default.get(k)]
        if named:
            log.warning("no effect in this run (marked inert in config.yaml): %s", ", ".join(
                f"{k}={now[k]!r}" for k in named))

    # -- the run ----------------------------------------------------------------------------
    def fit(self, stop: StopSignals | None = None) -> dict:
        """Train to max_steps. `stop`: the signal handlers launch.py installed before building
        the trainer; without them, fit installs its own for the duration of the run."""
        if stop is None:
            with StopSignals() as stop:
                return self.fit(stop)
        self.wall_start = time.perf_counter()
        self.maybe_resume()
        resumed_at = self.step
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            inert = self.inert_keys()
            start = record_start(self.out_dir, self.step, self.world_size, changed=self.resumed_changes, inert=inert,
                                 peak=self.utilisation.describe())
            record_start_config(self.out_dir, self.cfg, start, inert)
            self._warn_inert(inert)
            if (self.prepared / "tokenizer.json").is_file():  # the run decodes with it after training
                atomic_write(self.out_dir / "tokenizer.json", (self.prepared / "tokenizer.json").read_text())
        for cb in self.callbacks.values():
            cb.on_train_start(self)
        try:
            while self.step < self.max_steps:
                signum = stop.agreed(self.device)
                if signum is not None:
                    return self._preempt(signum, stop)
                self.run_step()
        except Diverged as e:
            self._finish("diverged", error=str(e))
            raise
        if self.step == resumed_at:  # resumed at the end: nothing trained
            done = from_rank0(self._completed_summary, OSError, lambda e: e)  # the ranks must agree
            if done is not None:  # this launch would report only its own idle start
                return self._finish("completed", written=done)
            self.val_loss = self.evaluate()  # killed before it wrote its summary: still report the final loss
        return self._finish("completed")

    def _completed_summary(self) -> dict | None:
        """summary.json of this run completed at the current step, if there is one."""
        try:
            done = json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return done if done.get("status") == "completed" and done.get("steps") == self.step else None

    def _preempt(self, signum: int, stop: StopSignals) -> dict:
        path = self.checkpoint_now()
        name = signal.Signals(signum).name
        summary = self._finish("preempted", signal=name, checkpoint=str(path))
        stop.hand_over(signum)  # e.g. submitit requeues the SLURM job here
        return summary

    def run_step(self) -> dict:
        """One optimizer step and what surrounds it in a run: evaluation, callbacks, checkpoint."""
        t = self.cfg.trainer
        if self.probes:
            self.probes.before_step(self.step + 1)
        with self.profiler.step(self.step + 1):
            metrics = self.train_step()
        if self.probes:
            with eager(self.compiled):  # its hooks and recordings would compile other graphs
                self.probes.after_step(metrics)
        if self.optimizer_state_mb is None:  # once the first step has created the state
            self.optimizer_state_mb = self.optimizer_state_bytes() / 2**20
            log.info("rank %d: optimizer state %.2f MB", self.rank, self.optimizer_state_mb)
        last = self.step == self.max_steps
        if last or (t.eval_every and self.step % t.eval_every == 0):
            metrics["val_loss"] = self.val_loss = self.evaluate()
        for cb in self.callbacks.values():
            cb.on_step_end(self, metrics)
        if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
            self.save_checkpoint()
        return metrics

    def _finish(self, status: str, error: str | None = None, written: dict | None = None, **extra) -> dict:
        """Writes summary.json, or (`written`) leaves the one a completed run wrote as it is."""
        self.profiler.close()
        if written is not None:
            for cb in self.callbacks.values():
                cb.on_train_end(self, written)
            return written
        tokens_per_s = self.tokens / self.train_time if self.train_time else None
        if self.optimizer_state_mb is None and self.step:  # resumed, then stopped before a step
            self.optimizer_state_mb = self.optimizer_state_bytes() / 2**20
        summary = {
            "status": status, "final_val_loss": self.val_loss, "steps": self.step, "tokens": self.tokens,
            "tokens_per_s": tokens_per_s, **self.utilisation.metrics(tokens_per_s),
            "wall_s": self.wall_s(),
            "probe/amax_fwd": self.probes.max_amax_fwd if self.probes else None,
            "probe/amax_bwd": self.probes.max_amax_bwd if self.probes else None,
            "probe/spikes": self.probes.spikes if self.probes else None,
            "n_params": self.n_params, "n_active_params": self.n_active_params,
            "flops_per_token": self.flops_per_token, "world_size": self.world_size, "precision": self.precision,
            "optimizer_state_mb_per_rank": self.optimizer_state_mb, "skipped_steps": self.skipped_steps,
            "micro_batch_size": self.micro_batch, "compile_s": self.compile_s if self.compiled else None,
            **extra,
        }
        if self.overrides is not None:
            summary["overrides"] = self.overrides
        if error:
            summary["error"] = error
        for cb in self.callbacks.values():
            cb.on_train_end(self, summary)
        if self.rank == 0:
            atomic_write(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        barrier()
        return summary

