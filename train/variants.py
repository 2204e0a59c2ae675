"""Keys that matter only in some variants of a run.

`data.path` is read only with `data.source=files`, `model.n_streams` only with hyper-connections,
the Muon keys only with `optim=muon`, and so on. Such a key is *inert* in a run of another
variant: setting it changes nothing. A launch that sets an inert key on the command line is
refused where that is unambiguous (the key has no effect in any job of the launch); a sweep
that crosses variants (`-m model.residual=residual,mhc model.n_streams=2,4`) is accepted, each
job logs the keys that have no effect in it, and `config.yaml` and the report mark them.
"""
from __future__ import annotations

from typing import Callable

# (key, or a prefix ending in "."), the variant it needs, the test of that variant on a Config
CONDITIONAL: list[tuple[str, str, Callable]] = [
    ("data.path", "data.source=files", lambda c: c.data.source == "files"),
    ("data.name", "data.source=hub", lambda c: c.data.source == "hub"),
    ("data.config_name", "data.source=hub", lambda c: c.data.source == "hub"),
    ("data.split", "data.source=hub", lambda c: c.data.source == "hub"),
    ("data.text_field", "data.source=files or data.source=hub", lambda c: c.data.source in ("files", "hub")),
    ("data.vocab_size", "data.tokenizer=bpe", lambda c: c.data.tokenizer == "bpe"),
    ("model.n_streams", "model.residual=hc or model.residual=mhc", lambda c: c.model.residual != "residual"),
    ("model.fused_hc", "model.residual=hc or model.residual=mhc", lambda c: c.model.residual != "residual"),
    ("model.sinkhorn_iters", "model.residual=mhc", lambda c: c.model.residual == "mhc"),
    ("model.attn.", "model.attention=v4", lambda c: c.model.attention == "v4"),
    ("model.moe.", "model.ffn=moe", lambda c: c.model.ffn == "moe"),
    ("model.mtp_weight", "model.mtp_depth=1", lambda c: c.model.mtp_depth > 0),
    ("model.mtp_weight_decayed", "model.mtp_depth=1", lambda c: c.model.mtp_depth > 0),
    *[(f"optim.{k}", "optim=muon", lambda c: c.optim.name == "muon")
      for k in ("adamw_lr", "adamw_weight_decay", "momentum", "nesterov", "momentum_type", "ns_schedule",
                "ns_method", "ns_dtype", "adjust_lr_fn", "rms_target", "per_head")],
    ("optim.ns_steps", "optim=muon with optim.ns_schedule=keller or polar_express",
     lambda c: c.optim.name == "muon" and c.optim.ns_schedule != "v4_hybrid"),
    ("optim.ns_restarts", "optim=muon with optim.ns_method=gram",
     lambda c: c.optim.name == "muon" and c.optim.ns_method == "gram"),
    ("optim.decay_fraction", "optim.schedule=wsd", lambda c: c.optim.schedule == "wsd"),
    ("optim.min_lr_ratio", "optim.schedule=cosine or optim.schedule=wsd", lambda c: c.optim.schedule != "constant"),
    ("trainer.max_skipped_steps", "trainer.on_nonfinite=skip", lambda c: c.trainer.on_nonfinite == "skip"),
    ("trainer.spike_sigma", "trainer.on_spike=skip", lambda c: c.trainer.on_spike == "skip"),
    ("trainer.spike_window", "trainer.on_spike=skip", lambda c: c.trainer.on_spike == "skip"),
    *[(f"study.{k}", "study=sweep (stage 1)", lambda c: c.study.stage == 1) for k in ("lr_step", "lr_grid", "lr_spacing")],
    *[(f"study.{k}", "study=tuned (stage 2)", lambda c: c.study.stage == 2)
      for k in ("best_lr_from", "allow_edge_lr", "allow_other_budget")],
    *[(f"launcher.{k}", "launcher.nnodes>1 or launcher.hostfile", lambda c: c.launcher.nnodes > 1 or bool(c.launcher.hostfile))
      for k in ("master_addr", "node_rank")],
    ("trainer.max_micro_batch_size", "trainer.micro_batch_size=auto", lambda c: c.trainer.micro_batch_size == "auto"),
    *[(f"logger.wandb.{k}", "logger.wandb.mode=offline or online", lambda c: c.logger.wandb.mode != "disabled")
      for k in ("project", "group", "name", "tags")],
]


def condition(key: str) -> tuple[str, Callable] | None:
    """The variant `key` needs and its test, or None for a key that matters in every run."""
    for k, needs, test in CONDITIONAL:
        if key == k or k.endswith(".") and key.startswith(k):
            return needs, test
    return None


def is_inert(key: str, cfg) -> bool:
    found = condition(key)
    return found is not None and not found[1](cfg)


def inert_keys(cfg, keys) -> list[str]:
    """Those of `keys` (dotted) that have no effect in a run of `cfg`."""
    return [k for k in keys if is_inert(k, cfg)]
