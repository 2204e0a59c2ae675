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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(lr_multiplier, max_steps=max_steps, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                 min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
