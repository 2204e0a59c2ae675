"""Checks of a composed config that types alone cannot express, run before any work starts.

Each failure names the key, the bad value and what is accepted, in one paragraph.
"""
from __future__ import annotations

import glob
import math
import os
import re
import sys
from pathlib import Path

from common.errors import ConfigError  # noqa: F401  (re-exported for callers of train.validate)
from train.config import Config
from train.batch import micro_batch_size
from train.launcher import read_hostfile, world_size
from train.study import check_study
from train.profiling import parse_steps

OPTIMIZERS = ("adamw", "muon")
RESIDUALS = ("residual", "hc", "mhc")
SCHEDULES = ("cosine", "wsd", "constant")
SOURCES = ("shakespeare", "pycode", "files", "hub")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")


def _choice(key: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ConfigError(key, value, ", ".join(map(str, accepted)))


def _positive(key: str, value, integer: bool = True, allow_zero: bool = False) -> None:
    ok = (value >= 0 if allow_zero else value > 0) and math.isfinite(value)
    if not ok:
        kind = "integer" if integer else "number"
        raise ConfigError(key, value, f"a {'non-negative' if allow_zero else 'positive'} {kind}")


def visible_gpus() -> int:
    """This node's CUDA GPUs, without importing torch where it is not imported yet (the launcher
    process starts ~2 s sooner): the NVIDIA device files, narrowed by CUDA_VISIBLE_DEVICES."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    present = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if present and visible is not None:
        return min(present, _cuda_visible(visible, present))
    return present


def _cuda_visible(visible: str, present: int) -> int:
    """How many devices CUDA makes visible: the list is read in order up to the first entry that
    names no device (a negative, malformed or out-of-range index; an entry without the list's
    GPU-/MIG- prefix), an index is read from its leading digits, and a repeated entry hides all."""
    entries = [e.strip() for e in visible.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if visible.startswith(p)), None)
    taken: list[str] = []
    for entry in entries:
        if prefix is None:
            index = re.match(r"\+?(\d+)", entry)  # as strtoul reads it: a sign only first
            if index is None or int(index.group(1)) >= present:
                break
            entry = str(int(index.group(1)))
        elif not entry.startswith(prefix):
            break
        if entry in taken:
            return 0
        taken.append(entry)
    return len(taken)


def _launcher(cfg: Config, submitted: bool) -> None:
    lc = cfg.launcher
    _positive("launcher.nproc_per_node", lc.nproc_per_node)
    _positive("launcher.nnodes", lc.nnodes)
    if not 0 <= lc.node_rank < lc.nnodes:
        raise ConfigError("launcher.node_rank", lc.node_rank, f"an integer from 0 to launcher.nnodes-1={lc.nnodes - 1}")
    if not 1 <= lc.master_port <= 65535:
        raise ConfigError("launcher.master_port", lc.master_port, "a TCP port from 1 to 65535")
    if lc.nnodes > 1 and not lc.hostfile and not lc.master_addr and not submitted:  # SLURM names node 0 itself
        raise ConfigError("launcher.master_addr", lc.master_addr,
                          "node 0's host name or IP address, reachable from every node (required with launcher.nnodes > 1)")
    _positive("launcher.collective_timeout_s", lc.collective_timeout_s)
    if "RANK" not in os.environ and not submitted:  # the launching process: this node's ranks share its GPUs
        gpus = visible_gpus()
        if gpus and lc.nproc_per_node > gpus:
            raise ConfigError("launcher.nproc_per_node", lc.nproc_per_node,
                              f"at most {gpus}, the GPUs of this node (one rank per GPU; NCCL refuses two on one)")
    if lc.hostfile is not None and "RANK" not in os.environ:  # ranks on other hosts need not have the file
        if not Path(lc.hostfile).expanduser().is_file():
            raise ConfigError("launcher.hostfile", lc.hostfile, "the path of an existing DeepSpeed hostfile")
        try:
            hosts = read_hostfile(lc.hostfile)
        except ValueError as e:
            raise ConfigError("launcher.hostfile", lc.hostfile, "lines of 'HOSTNAME slots=N'", str(e)) from None
        if lc.nnodes > len(hosts):
            raise ConfigError("launcher.nnodes", lc.nnodes, f"at most the {len(hosts)} host(s) in {lc.hostfile}")
        fewest = min(slots for _, slots in hosts[: lc.nnodes])
        if lc.nproc_per_node > fewest:
            raise ConfigError("launcher.nproc_per_node", lc.nproc_per_node,
                              f"at most {fewest}, the fewest slots among the first {lc.nnodes} host(s) of {lc.hostfile}")


def _v4_parts(cfg: Config) -> None:
    m, a, e = cfg.model, cfg.model.attn, cfg.model.moe
    _choice("model.attention", m.attention, ("dense", "v4"))
    _choice("model.ffn", m.ffn, ("dense", "moe"))
    _choice("model.mtp_depth", m.mtp_depth, (0, 1))
    for key in ("mtp_weight", "mtp_weight_decayed"):
        _positive(f"model.{key}", getattr(m, key), integer=False, allow_zero=True)
    if m.attention == "v4":
        if a.layers and (len(a.layers) != m.n_layers or not set(a.layers) <= {"window", "csa", "hca"}):
            raise ConfigError("model.attn.layers", list(a.layers),
                              f"[] (V4-Flash's pattern) or model.n_layers={m.n_layers} entries of window, csa, hca")
        for key in ("window", "head_dim", "q_lora", "out_groups", "out_lora", "csa_ratio", "csa_topk", "hca_ratio",
                    "index_heads", "index_dim"):
            _positive(f"model.attn.{key}", getattr(a, key))
        _positive("model.attn.indexer_warmup_steps", a.indexer_warmup_steps, allow_zero=True)
        _choice("model.attn.indexer_warmup", a.indexer_warmup, ("indexer_only", "all"))
        _positive("model.attn.compress_rope_theta", a.compress_rope_theta, integer=False)
        if not (a.yarn_factor >= 1 and math.isfinite(a.yarn_factor)):
            raise ConfigError("model.attn.yarn_factor", a.yarn_factor, "a number >= 1 (1: no YaRN)")
        _positive("model.attn.yarn_original_seq_len", a.yarn_original_seq_len, allow_zero=True)
        _positive("model.attn.yarn_beta_fast", a.yarn_beta_fast, integer=False)
        _positive("model.attn.yarn_beta_slow", a.yarn_beta_slow, integer=False)
        _positive("model.attn.indexer_kl_weight", a.indexer_kl_weight, integer=False, allow_zero=True)
        _positive("model.attn.query_chunk", a.query_chunk, allow_zero=True)
        if a.rope_dim % 2 or not 0 <= a.rope_dim <= a.head_dim:
            raise ConfigError("model.attn.rope_dim", a.rope_dim, f"an even number from 0 to model.attn.head_dim={a.head_dim}")
        if m.n_heads % a.out_groups:
            raise ConfigError("model.attn.out_groups", a.out_groups, f"a divisor of model.n_heads={m.n_heads}")
    if m.ffn == "moe":
        for key in ("n_experts", "top_k", "expert_hidden"):
            _positive(f"model.moe.{key}", getattr(e, key))
        if e.top_k > e.n_experts:
            raise ConfigError("model.moe.top_k", e.top_k, f"at most model.moe.n_experts={e.n_experts}")
        for key in ("n_shared", "hash_layers"):
            _positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
        for key in ("route_scale", "clamp"):
            _positive(f"model.moe.{key}", getattr(e, key), integer=False)
        for key in ("bias_gamma", "balance_weight"):
            _positive(f"model.moe.{key}", getattr(e, key), integer=False, allow_zero=True)
        _choice("model.moe.grouped_matmul", e.grouped_matmul, ("auto", "padded"))
    v4 = [k for k, on in (("model.attention=v4", m.attention == "v4"), ("model.ffn=moe", m.ffn == "moe"),
                          ("model.mtp_depth=1", m.mtp_depth == 1)) if on]
    if v4 and m.activation_checkpointing:
        raise ConfigError("model.activation_checkpointing", True, f"false with {', '.join(v4)}",
                          "their auxiliary losses and expert loads are side outputs that recomputation would repeat")
    if m.attention == "v4" and cfg.optim.qk_clip_tau > 0:
        raise ConfigError("optim.qk_clip_tau", cfg.optim.qk_clip_tau, "0 with model.attention=v4",
                          "V4 attention normalises queries and keys with RMSNorm instead")


def _check_resume_path(resume: str, out_dir: Path) -> None:
    """trainer.resume=PATH names one intact checkpoint. Another run's (or an abandoned branch's) is
    refused in an out_dir that holds checkpoints of its own: their histories would interleave."""
    from train.manifest import CHECKPOINT_NAME, problems

    accepted = "auto, never, or a checkpoint directory (RUN/checkpoints/step_NNNNNNNN)"
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError("trainer.resume", resume, accepted, "no such directory")
    if not (path / "manifest.json").is_file() and (path / "checkpoints").is_dir():
        raise ConfigError("trainer.resume", resume, accepted, f"a run directory, not a checkpoint: continue it with "
                          f"out_dir={resume} trainer.resume=auto, or name one of its checkpoints")
    why = problems(path)
    if why is not None:
        raise ConfigError("trainer.resume", resume, accepted, f"not a usable checkpoint ({why})")
    own = out_dir.expanduser().resolve() / "checkpoints"
    if path.resolve().parent != own and own.is_dir() and any(CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
                                                             for p in own.iterdir()):
        raise ConfigError("trainer.resume", resume, f"a checkpoint of this run ({own}/step_NNNNNNNN), or this one "
                          f"with a new out_dir", f"out_dir={out_dir} holds checkpoints of its own, and resuming "
                          f"another history into it would interleave the two")


def validate(cfg: Config, submitted: bool = False) -> None:
    """`submitted`: the jobs go to SLURM (hydra/launcher=slurm|submitit_local), which picks the
    nodes: this machine's GPUs and node 0's address are not the job's to check."""
    m, o, d, t = cfg.model, cfg.optim, cfg.data, cfg.trainer

    _choice("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr, integer=False)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", list(o.betas), "two numbers in [0, 1), e.g. [0.9, 0.95]")
    _positive("optim.eps", o.eps, integer=False)
    _positive("optim.weight_decay", o.weight_decay, integer=False, allow_zero=True)
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "a number in [0, 1]")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError("optim.decay_fraction", o.decay_fraction, "a number in (0, 1]")

    if o.name == "muon":
        _positive("optim.adamw_lr", o.adamw_lr, integer=False)
        _positive("optim.adamw_weight_decay", o.adamw_weight_decay, integer=False, allow_zero=True)
        if not 0.0 <= o.momentum < 1.0:
            raise ConfigError("optim.momentum", o.momentum, "a number in [0, 1)")
        _choice("optim.momentum_type", o.momentum_type, ("classical", "ema"))
        _choice("optim.ns_schedule", o.ns_schedule, ("v4_hybrid", "keller", "polar_express"))
        if not 1 <= o.ns_steps < 100:
            raise ConfigError("optim.ns_steps", o.ns_steps, "an integer from 1 to 99")
        _choice("optim.ns_method", o.ns_method, ("standard", "gram"))
        n_iter = 10 if o.ns_schedule == "v4_hybrid" else o.ns_steps
        if o.ns_restarts is not None and not all(1 <= i < n_iter for i in o.ns_restarts):
            raise ConfigError("optim.ns_restarts", list(o.ns_restarts),
                              f"null (the schedule's default) or iterations from 1 to {n_iter - 1}")
        _choice("optim.ns_dtype", o.ns_dtype, ("bf16", "fp32"))
        _choice("optim.adjust_lr_fn", o.adjust_lr_fn, ("match_rms_adamw", "original"))
        _positive("optim.rms_target", o.rms_target, integer=False)
        if cfg.deepspeed.zero_stage == 3:
            raise ConfigError("deepspeed.zero_stage", 3, "0, 1 or 2 with optim=muon",
                              "ZeRO-3 partitions each matrix across ranks and whole-matrix Muon is not built for it")

    _positive("optim.qk_clip_tau", o.qk_clip_tau, integer=False, allow_zero=True)
    if o.qk_clip_tau > 0 and cfg.deepspeed.zero_stage != 0:
        raise ConfigError("optim.qk_clip_tau", o.qk_clip_tau, "0 (off), or deepspeed.zero_stage=0",
                          "QK-Clip rescales the model's weights in place, which ZeRO ≥ 1 would overwrite "
                          "from its own fp32 copy")

    _choice("model.residual", m.residual, RESIDUALS)
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len", "n_streams", "sinkhorn_iters"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.ffn_hidden", m.ffn_hidden, allow_zero=True)
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model} leaving an even head size")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", m.dropout, "a number in [0, 1)")
    _v4_parts(cfg)

    _choice("data.source", d.source, SOURCES)
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            "data.seq_len", d.seq_len, f"at most model.max_seq_len={m.max_seq_len}",
            "the sequence is longer than the model supports",
        )
    if not 0.0 < d.val_fraction <= 0.5:
        raise ConfigError("data.val_fraction", d.val_fraction, "a number in (0, 0.5]")
    if d.source == "files":
        if not d.path:
            raise ConfigError("data.path", d.path, "a text file, a directory or a glob, required with data.source=files")
        if not glob.glob(os.path.expanduser(d.path), recursive=True):
            raise ConfigError("data.path", d.path, "an existing file, directory or glob", "nothing found at that path")
    if d.source == "hub" and not d.name:
        raise ConfigError("data.name", d.name, "a dataset name or local dataset directory, required with data.source=hub")
    tokenizer_ok = d.tokenizer in ("byte", "bpe") or (d.tokenizer.startswith("pretrained:") and len(d.tokenizer) > 11) \
        or Path(d.tokenizer).expanduser().is_file()
    if not tokenizer_ok:
        raise ConfigError("data.tokenizer", d.tokenizer, "byte, bpe, the path of an existing tokenizer.json, or pretrained:NAME")
    if d.tokenizer == "bpe" and not 257 <= d.vocab_size <= 2**32 - 1:
        raise ConfigError("data.vocab_size", d.vocab_size, "an integer ≥ 257 (256 bytes plus the end-of-document token)")
    _positive("data.num_proc", d.num_proc)
    if d.shard_tokens <= d.seq_len:
        raise ConfigError("data.shard_tokens", d.shard_tokens, f"more than data.seq_len={d.seq_len}")

    for key in ("max_steps", "eval_batches", "keep_last"):
        _positive(f"trainer.{key}", getattr(t, key))
    for key in ("eval_every", "checkpoint_every"):
        _positive(f"trainer.{key}", getattr(t, key), allow_zero=True)
    _positive("trainer.grad_clip", t.grad_clip, integer=False, allow_zero=True)
    micro_batch_size(t, world_size(cfg))  # raises, naming the micro- and global batch sizes that work
    if t.resume not in ("auto", "never"):
        _check_resume_path(t.resume, Path(cfg.out_dir))
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _positive("trainer.max_skipped_steps", t.max_skipped_steps, allow_zero=True)
    _choice("trainer.on_spike", t.on_spike, ("off", "skip"))
    if t.on_spike == "skip":
        _positive("trainer.spike_sigma", t.spike_sigma, integer=False)
        if t.spike_window < 4:
            raise ConfigError("trainer.spike_window", t.spike_window, "an integer ≥ 4")
        if cfg.deepspeed.zero_stage != 0:
            raise ConfigError("trainer.on_spike", t.on_spike, "off, or skip with deepspeed.zero_stage=0",
                              "at ZeRO ≥ 1 DeepSpeed computes the gradient norm and applies the update in one call, "
                              "so there is no point to decide between them")
    if t.peak_tflops is not None:
        _positive("trainer.peak_tflops", t.peak_tflops, integer=False)
    if t.profile is not None:
        try:
            _, end = parse_steps(t.profile)
        except ValueError as e:
            raise ConfigError("trainer.profile", t.profile, "START:END, two step numbers with 1 <= START <= END, "
                              "e.g. 10:12", str(e)) from None
        if end > t.max_steps:
            raise ConfigError("trainer.profile", t.profile, f"START:END with END at most trainer.max_steps={t.max_steps}")

    _positive("probes.every", cfg.probes.every, allow_zero=True)
    if cfg.probes.every and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("probes.every", cfg.probes.every, "0 with deepspeed.zero_stage=3",
                          "the probes read whole parameters, which ZeRO-3 partitions across ranks")
    _launcher(cfg, submitted)
    _choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3))
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    _positive("seed", cfg.seed, allow_zero=True)

    check_study(cfg)

    out = Path(cfg.out_dir)
    if t.resume == "never" and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise ConfigError(
            "out_dir", cfg.out_dir, "a new directory, or trainer.resume=auto to continue the run in it",
            "it already holds a run and trainer.resume=never would overwrite it",
        )
