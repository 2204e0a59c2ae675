"""Build the optimizer named by `optim.name`, with parameter groups derived from the model."""
from __future__ import annotations

import logging

import torch
from torch import nn

from common.errors import ConfigError
from optim.muon import Muon
from optim.params import classify_parameters, describe_groups

log = logging.getLogger(__name__)


def _adamw_halves(roles: dict, cfg, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the head (and hidden matrices, passed in `roles['matrix']` when AdamW
    owns them); never on norms, biases, other 0/1-D parameters; on embeddings if configured."""
    decayed = roles["matrix"] + roles["head"] + (roles["embedding"] if cfg.decay_embeddings else [])
    plain = roles["norm"] + roles["scalar"] + ([] if cfg.decay_embeddings else roles["embedding"])
    groups = [
        {"name": "adamw_decay", "params": [p for _, p in decayed], "weight_decay": weight_decay, "lr": lr},
        {"name": "adamw_no_decay", "params": [p for _, p in plain], "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def adamw_groups(model: nn.Module, cfg) -> list[dict]:
    return _adamw_halves(classify_parameters(model), cfg, cfg.lr, cfg.weight_decay)


def muon_groups(model: nn.Module, cfg) -> list[dict]:
    roles = classify_parameters(model)
    if not roles["matrix"]:
        raise ConfigError("optim.name", cfg.name, "adamw for this model",
                          "Muon found no hidden weight matrix to optimise; it would silently be an AdamW run")
    muon = {"name": "muon", "params": [p for _, p in roles["matrix"]], "use_muon": True,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay}
    adam = _adamw_halves({**roles, "matrix": []}, cfg, cfg.adamw_lr, cfg.adamw_weight_decay)
    return [muon] + [{**g, "use_muon": False} for g in adam]


def split_warmup(model: nn.Module, groups: list[dict]) -> list[dict]:
    """A model whose first steps train only some parameters (`model.warmup_trainable()`, e.g. V4's
    indexer-only warm-up) gets each group split in two: the rest, with `frozen_until` = those steps
    (build_scheduler holds its lr at 0 until then, so neither the update nor the decoupled weight
    decay moves it, whatever the gradients and ZeRO stage), and `<name>_warmup`, the ones that train."""
    warmup = getattr(model, "warmup_trainable", lambda: None)()
    if warmup is None:
        return groups
    steps, trainable = warmup
    ids = {id(p) for p in trainable}
    split = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in ids]
        alone = [p for p in g["params"] if id(p) in ids]
        split += [{**g, "params": rest, "frozen_until": steps}] if rest else []
        split += [{**g, "name": f"{g['name']}_warmup", "params": alone}] if alone else []
    return split


def build_optimizer(model: nn.Module, cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    """`device`: where the model will train (default: where its parameters are now)."""
    if cfg.name == "adamw":
        groups = split_warmup(model, adamw_groups(model, cfg))
        log.info("optimizer groups (AdamW):\n%s", describe_groups(groups))
        # foreach=True: one multi-tensor kernel per group rather than a Python loop per tensor.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    if cfg.name == "muon":
        groups = split_warmup(model, muon_groups(model, cfg))
        log.info("optimizer groups (Muon + AdamW):\n%s", describe_groups(groups))
        device = device or next(model.parameters()).device
        if cfg.ns_dtype == "bf16" and device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
            # measured on an AVX2 EPYC: V4-tiny's steps 2.3× (experiment=v4) to 3.5× (test size) slower
            # than with fp32, a 2048² torch.mm 300×
            log.warning("Newton-Schulz runs in bf16 on a CPU without bf16 units, where bf16 matmuls are "
                        "emulated and slow: optim.ns_dtype=fp32 is 2-3× faster here")
        return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn, ns_schedule=cfg.ns_schedule,
                    ns_method=cfg.ns_method, ns_restarts=cfg.ns_restarts, ns_dtype=cfg.ns_dtype, momentum_type=cfg.momentum_type,
                    rms_target=cfg.rms_target, per_head=cfg.per_head, adamw_betas=tuple(cfg.betas),
                    adamw_eps=cfg.eps)
    raise ConfigError("optim.name", cfg.name, "adamw, muon")
