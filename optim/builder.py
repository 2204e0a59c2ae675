"""Build the optimizer named by `optim.name` with parameter groups derived from the model."""
from __future__ import annotations

import logging

import torch
from torch import nn

from optim.params import classify_parameters, describe_groups

log = logging.getLogger(__name__)


def adamw_groups(model: nn.Module, cfg) -> list[dict]:
    roles = classify_parameters(model)
    decayed = roles["matrix"] + roles["head"] + (roles["embedding"] if cfg.decay_embeddings else [])
    plain = roles["norm"] + roles["scalar"] + ([] if cfg.decay_embeddings else roles["embedding"])
    groups = [
        {"name": "adamw_decay", "params": [p for _, p in decayed], "weight_decay": cfg.weight_decay},
        {"name": "adamw_no_decay", "params": [p for _, p in plain], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r} is not available; accepted: adamw")
    groups = adamw_groups(model, cfg)
    log.info("optimizer groups:\n%s", describe_groups(groups))
    # foreach=True: one fused multi-tensor kernel per group rather than a Python loop per tensor.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
