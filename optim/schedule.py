"""Learning-rate schedules as multipliers of the peak lr: linear warm-up, then cosine decay,
warmup-stable-decay (WSD, linear decay over the last `decay_fraction` of the run) or constant.
The multiplier ends at `min_lr_ratio`."""
from __future__ import annotations

import math
from functools import partial

import torch


def lr_multiplier(step: int, *, max_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float,
                  decay_fraction: float) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - max(1, round(decay_fraction * max_steps)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - 1 - decay_start)
        return 1.0 - (1 - min_lr_ratio) * min(progress, 1.0)
    raise ValueError(f"optim.schedule={schedule!r} is not a schedule; accepted: cosine, wsd, constant")


def frozen_then(step: int, *, frozen_until: int, max_steps: int, **schedule) -> float:
    """0 for the first `frozen_until` steps; then the whole schedule (warm-up included) over the
    steps that remain."""
    if step < frozen_until:
        return 0.0
    return lr_multiplier(step - frozen_until, max_steps=max_steps - frozen_until, **schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One multiplier per group: the schedule, or for a group with `frozen_until` (optim/builder.py)
    0 until then and the schedule after."""
    schedule = dict(max_steps=max_steps, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                    min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    fns = [partial(frozen_then, frozen_until=g["frozen_until"], **schedule) if g.get("frozen_until")
           else partial(lr_multiplier, **schedule) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)
