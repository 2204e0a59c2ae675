"""Resume a checkpoint at another world size, through DeepSpeed's universal checkpoints.

A ZeRO-1/2/3 checkpoint holds each rank's flat partition of the fp32 weights and the optimizer
state. DeepSpeed 0.19.8 refuses to load it at another data-parallel size (its ZeRO-1/2
`elastic_checkpoint` path sits behind the same check in `engine._load_zero_checkpoint`); its answer
is the universal checkpoint: `ds_to_universal` rewrites the partitions as one file per parameter
and state (`zero/<name>/{fp32,exp_avg,...}.pt`), and an engine whose config says
`checkpoint.load_universal` cuts its own partition out of them, whatever its layout.

- ZeRO-0 checkpoints keep the whole model and optimizer state in one file every rank reads: they
  load at any world size as they are.
- ZeRO ≥ 1: rank 0 converts once, into `step_N/universal/`, sealed with its own manifest and
  renamed into place from a temporary directory, so a conversion cut short or damaged later is
  recognised and redone. The checkpoint's own files are never touched.
- DeepSpeed's converter reads Adam's moments by name (`exp_avg`, `exp_avg_sq`; DeepSpeed issue
  #8608), while its universal loader restores whatever state files it finds. The extraction step
  here names each group's states from the group itself, so Muon's `momentum_buffer` is cut into
  per-parameter files by the same DeepSpeed functions and merged the same way as Adam's moments.
- A universal load restores parameters only: buffers (MoE selection biases) are copied from the
  checkpoint's model-state file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path
from unittest import mock

import torch

from train.distributed import from_rank0
from train.manifest import fsync_path, problems, seal

log = logging.getLogger(__name__)
UNIVERSAL = "universal"
# the states DeepSpeed's own merge step handles; the extraction may find others (Muon's momentum)
DEEPSPEED_MERGED = {"fp32", "exp_avg", "exp_avg_sq", "step"}


class ReshardError(RuntimeError):
    """A checkpoint that cannot be resumed at this world size."""


def is_sharded(manifest: dict) -> bool:
    """Whether the checkpoint holds ZeRO partitions (ZeRO ≥ 1) rather than whole states."""
    return any(name.endswith("optim_states.pt") for name in manifest["files"])


def load(engine, ckpt: Path, manifest: dict) -> None:
    """Restore `engine` from `ckpt`, written at another world size."""
    stage, saved = engine.zero_optimization_stage(), manifest.get("zero_stage")
    if saved is None:  # written before manifests recorded it: only sharded or not is known
        saved = stage if is_sharded(manifest) == (stage > 0) else "≥ 1" if is_sharded(manifest) else 0
    if saved != stage:
        raise ReshardError(
            f"checkpoint {ckpt} was written at ZeRO stage {saved} and this run uses deepspeed.zero_stage={stage}; "
            f"resharding to another world size keeps the stage. Resume with deepspeed.zero_stage={saved}, or at "
            f"the checkpoint's world size ({manifest['world_size']})")
    if stage == 0:
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        return
    # rank 0 converts (it can outlast a collective's timeout); every rank hears of a failure
    from_rank0(lambda: ensure_universal(ckpt), Exception, lambda e: ReshardError(
        f"converting checkpoint {ckpt} to DeepSpeed's universal format failed: {type(e).__name__}: {e}"))
    with _load_universal(engine):
        engine.load_checkpoint(str(ckpt), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=True)
    restore_buffers(engine.module, ckpt / UNIVERSAL)
    if stage == 3:
        _repair_zero3_load(engine.optimizer.optimizer, ckpt / UNIVERSAL)


@contextlib.contextmanager
def _load_universal(engine):
    """`checkpoint.load_universal` of the engine's config, for this load: the engine reads it only
    while loading, and which checkpoint to load is known only after the engine is built."""
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = before


def ensure_universal(ckpt: Path) -> Path:
    """`ckpt/universal/`, converted now unless a whole conversion is already there."""
    target = ckpt / UNIVERSAL
    why = problems(target)
    if why is None:
        return target
    if target.exists():
        log.warning("%s is unusable (%s); converting the checkpoint again", target, why)
        shutil.rmtree(target)  # DeepSpeed's reader takes model-state files from subdirectories too
    tmp = ckpt / f".{UNIVERSAL}.tmp"  # DeepSpeed also writes `latest_universal` next to its output: in here
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(ckpt, tmp / UNIVERSAL)
        seal(tmp / UNIVERSAL, source=ckpt.name)
    except BaseException:  # a refusal or a stop leaves the checkpoint as it was, without half a conversion
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / UNIVERSAL).rename(target)
    fsync_path(ckpt)
    shutil.rmtree(tmp)
    log.info("converted %s to DeepSpeed's universal format in %s", ckpt, target)
    return target


def convert(ckpt: Path, out: Path) -> None:
    """DeepSpeed's `ds_to_universal` from `ckpt` into `out`, for every optimizer state name."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=True, strict=True,
                              # our models carry no tensor/pipeline-parallel layout info: an empty one
                              inject_missing_state=True)
    said = io.StringIO()  # it prints progress and tqdm bars
    with mock.patch.object(ds_to_universal, "extract_zero_shards", _extract_every_state), \
            contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", said.getvalue())
    _merge_other_states(out / "tmp", out / "zero")
    shutil.rmtree(out / "tmp")


def _extract_every_state(temp_dir: str, ds_checkpoint, indices_3d) -> None:
    """DeepSpeed's `extract_zero_shards` (one fragment file per parameter, state and rank, cut at
    the checkpoint's own slice mappings), taking each group's state names from the group."""
    from deepspeed.checkpoint import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                      SINGLE_PARTITION_OF_FP32_GROUPS)
    from deepspeed.checkpoint.ds_to_universal import dump_param_fragment

    pp_index, tp_index, dp_index = indices_3d
    optim = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp_index, tp_index=tp_index,
                                                    dp_index=dp_index)[OPTIMIZER_STATE_DICT]
    for group, mapping in enumerate(optim[PARAM_SLICE_MAPPINGS]):
        flat = {"fp32": optim[SINGLE_PARTITION_OF_FP32_GROUPS][group], **optim[BASE_OPTIMIZER_STATE]["state"][group]}
        for key, value in flat.items():
            if key != "step" and not (torch.is_tensor(value) and value.dim() == 1):
                raise ReshardError(f"optimizer group {group} holds state {key!r} that is not one value per "
                                   f"element of its partition, so it cannot be cut per parameter")
        for name, fragment in mapping.items():
            for key, value in flat.items():
                dump_param_fragment(temp_dir, tp_index, dp_index, key, value, name, fragment.start, fragment.numel)


def _merge_other_states(fragments: Path, zero: Path) -> None:
    """The merge DeepSpeed's converter does for Adam's moments (fragments of all ranks concatenated
    in rank order, one file per parameter), for the other state names the extraction found."""
    from deepspeed.checkpoint import CAT_DIM, PARAM
    from deepspeed.checkpoint.ds_to_universal import _merge_zero_shards, _save_checkpoint

    for param in sorted(p for p in fragments.iterdir() if p.is_dir()):
        names = {f.name.rsplit(".", 1)[0] for f in (param / "0").iterdir()} - DEEPSPEED_MERGED
        for name in sorted(names):
            (merged,) = _merge_zero_shards(str(param), name, 1)
            _save_checkpoint(str(zero / param.name / f"{name}.pt"), {PARAM: merged, CAT_DIM: 0})


def _repair_zero3_load(optimizer: torch.optim.Optimizer, universal: Path) -> None:
    """Two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader. It gives every param group the
    hyperparameters of group 0 (AdamW's no-decay group would decay): each gets its own back. And it
    puts one `step` tensor object into every group's state, which AdamW then advances in place once
    per group and step, so bias corrections would run ahead (measured: losses off by 3e-4 within
    two steps): each gets its own copy."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
    for group, hyper in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def restore_buffers(module: torch.nn.Module, universal: Path) -> None:
    """Copy the module's buffers from the checkpoint's model state (a universal load skips them)."""
    buffers = dict(module.named_buffers())
    files = sorted(universal.glob("*model_states.pt"))
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, value in saved.items():
            if name in buffers:
                buffers[name].copy_(value)
