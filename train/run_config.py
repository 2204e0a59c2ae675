"""The resolved config a run records, and what a resume may change.

Each start of a run writes its resolved config to `out_dir/configs/start_NNN.yaml` (NNN counts
the starts, as `environment.json` does) and to `config.yaml` (the latest); each checkpoint holds
the config it was trained with (`config.yaml` in its directory). Keys that have no effect in the
run (train/variants.py) carry the comment `# inert`. On resume the checkpoint's config and this
launch's are compared key by key:

- FROZEN keys cannot change under a checkpoint (model shape, vocabulary and data identity, seed,
  optimizer kind and parameter groups, ZeRO stage): the resume is refused with the list of them.
  The world size and the micro-batch may change: the checkpoint is resharded (train/reshard.py) and
  the data position is global (data/loader.py);
- NEUTRAL keys change nothing the model sees (where files go, logging, intervals);
- every other difference changes the trajectory: allowed, printed as `key: old -> new` and
  recorded, and the report marks the run "resumed with changes".
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import yaml
from omegaconf import OmegaConf

from common.errors import CheckpointError
from train.batch import micro_batch_size
from train.manifest import atomic_write
from train.variants import is_inert

log = logging.getLogger(__name__)

FROZEN = (
    *[f"model.{k}" for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len", "tie_embeddings",
                             "residual", "n_streams", "attention", "ffn", "mtp_depth")],
    *[f"model.attn.{k}" for k in ("layers", "head_dim", "rope_dim", "q_lora", "out_groups", "out_lora", "csa_ratio",
                                  "hca_ratio", "index_heads", "index_dim")],
    *[f"model.moe.{k}" for k in ("n_experts", "n_shared", "expert_hidden", "hash_layers")],
    *[f"data.{k}" for k in ("source", "path", "name", "config_name", "split", "text_field", "tokenizer", "vocab_size",
                            "seq_len", "val_fraction", "shard_tokens")],
    "seed", "optim.name", "deepspeed.zero_stage",
    # the optimizer's parameter groups (a checkpoint's optimizer state is one entry per group)
    "optim.decay_embeddings", "model.attn.indexer_warmup",
)
NEUTRAL = ("out_dir", "trainer.resume", "trainer.progress", "trainer.checkpoint_every", "trainer.keep_last",
           "trainer.peak_tflops", "trainer.profile",
           "trainer.eval_every", "trainer.eval_batches", "trainer.reuse_freed_memory", "probes.", "launcher.",
           "logger.", "data.cache_dir", "data.num_proc", "model.fused_hc", "model.activation_checkpointing",
           "trainer.micro_batch_size", "trainer.max_micro_batch_size")  # the micro-batch: compared resolved


def matches(key: str, keys) -> bool:
    """`key` is one of `keys`, or under one of them that ends with a dot (a group: "probes.")."""
    return any(key == k or k.endswith(".") and key.startswith(k) for k in keys)


def as_dict(cfg) -> dict:
    # dataclasses.asdict, not OmegaConf.structured: the same dict (Hydra validated the types when
    # it composed the config) in well under 1 ms instead of ~0.1 s, and a run calls it several times.
    return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"a.b.c": value}; lists become tuples so values can key groups."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def to_yaml(cfg, inert: list[str] = ()) -> str:
    """The config as YAML, each inert key marked with a trailing `# inert` comment."""
    text, path, out = OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))), [], []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][\w]*):", line)
        if m:
            depth = len(m.group(1)) // 2
            path = path[:depth] + [m.group(2)]
            if ".".join(path) in inert:
                line += "  # inert: no effect in this run"
        out.append(line)
    return "\n".join(out) + "\n"


def inert_in(cfg, keys) -> list[str]:
    return [k for k in keys if is_inert(k, cfg)]


def record_start_config(out_dir: Path, cfg, start: int, inert: list[str]) -> Path:
    """`configs/start_NNN.yaml` for start number `start` (0 = the first), and `config.yaml`."""
    text = to_yaml(cfg, inert)
    path = out_dir / "configs" / f"start_{start:03d}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    atomic_write(out_dir / "config.yaml", text)  # a kill mid-write must not lose the run's config
    return path


def saved_config(ckpt: Path) -> dict | None:
    """The config a checkpoint was trained with; older checkpoints without one: the run's config.yaml."""
    for f in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if f.is_file():
            return yaml.safe_load(f.read_text())
    return None


def resume_changes(saved: dict, cfg, saved_world: int, world: int, saved_micro: int | None, micro: int
                   ) -> tuple[dict, dict, dict]:
    """(frozen, trajectory, neutral) differences between a checkpoint's config and this launch's,
    each {key: (old, new)}. Keys inert in both runs do not count."""
    old, new = flatten(saved), flatten(as_dict(cfg))
    frozen, trajectory, neutral = {}, {}, {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or key in old and key in new and is_inert(key, cfg) and _inert_in_dict(key, saved):
            continue
        (frozen if key in FROZEN or _splits_groups(key, a, b) else neutral if matches(key, NEUTRAL)
         else trajectory)[key] = (a, b)
    if saved_world != world:
        neutral["world size (launcher.nnodes × launcher.nproc_per_node)"] = (saved_world, world)
    if saved_micro is not None and saved_micro != micro:
        neutral["micro-batch per rank (trainer.micro_batch_size, resolved)"] = (saved_micro, micro)
    return frozen, trajectory, neutral


def _splits_groups(key: str, a, b) -> bool:
    """An indexer warm-up's length may change; whether there is one may not: with one, every
    optimizer group is split in two (optim/builder.py split_warmup)."""
    return key == "model.attn.indexer_warmup_steps" and bool(a) != bool(b)


def _inert_in_dict(key: str, saved: dict) -> bool:
    def ns(d):
        return SimpleNamespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})
    try:
        return is_inert(key, ns(saved))
    except AttributeError:  # a config of an older schema
        return False


def describe(changes: dict) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_resume(cfg, ckpt: Path, world_size: int, log_changes: bool = False) -> dict:
    """Compare checkpoint `ckpt`'s config with `cfg` at `world_size` ranks (train/run_config.py).
    Raises CheckpointError listing the keys that cannot change under a checkpoint; returns the
    trajectory changes {key: (old, new)}, which the resume applies, and logs every difference."""
    saved = saved_config(ckpt)
    if saved is None:
        log.warning("checkpoint %s holds no config.yaml: the settings it was trained with cannot be compared", ckpt)
        return {}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    saved_world = manifest.get("world_size", world_size)
    try:
        saved_micro = micro_batch_size(_trainer_view(saved["trainer"]), saved_world)
    except Exception:  # an older schema: the data loader still checks its own layout
        saved_micro = None
    frozen, trajectory, neutral = resume_changes(saved, cfg, saved_world, world_size, saved_micro,
                                                 micro_batch_size(cfg.trainer, world_size))
    if frozen:
        raise CheckpointError(
            f"cannot resume {ckpt} with changed {describe(frozen)}: these cannot change under a checkpoint "
            f"(model shape, vocabulary, data, seed, optimizer kind and parameter groups, ZeRO stage). Restore "
            f"them, or start a new run with another out_dir")
    if log_changes and (trajectory or neutral):
        log.warning("resuming %s with changed settings:\n%s", ckpt,
                    "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in {**trajectory, **neutral}.items()))
    return trajectory


def _trainer_view(d: dict):
    return SimpleNamespace(**d)
