"""Read a run back after training: its newest valid checkpoint, the model its `config.yaml`
describes with the checkpoint's weights, and its tokenizer. Shared by `train.sample`,
`train.evaluate` and `train.export`.

Weights come from any ZeRO stage and any world size the run was written with: ZeRO-0 checkpoints
hold the whole model in DeepSpeed's model-state file; ZeRO 1–3 checkpoints are consolidated from
the optimizer's fp32 partitions by DeepSpeed's own `zero_to_fp32` utilities. Nothing is written:
the run directory is only read.

Every failure is a `LoadError` with a one-line message and the exit status the commands use.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.checkpoint import PREFIX, CheckpointError, Checkpointer, problems
from train.config import Config
from train.manifest import read as read_manifest
from train.run import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA

__all__ = ["EXIT_CHECKPOINT", "EXIT_CONFIG", "EXIT_DATA", "LoadError", "Loaded", "load_run", "locate",
           "run_config", "consolidated_state_dict", "build_from_state", "tokenizer_spec", "run_tokenizer",
           "pick_device", "from_exported"]


class LoadError(RuntimeError):
    """Why a run cannot be read back, in one line, and the exit status that says so."""

    def __init__(self, message: str, code: int = EXIT_CHECKPOINT):
        super().__init__(message)
        self.code = code


@dataclass
class Loaded:
    model: torch.nn.Module  # in eval mode, fp32, on the requested device
    config: Config  # the run's resolved config
    run_dir: Path
    checkpoint: Path
    step: int
    tokenizer: object  # data.tokenizer.ByteTokenizer or HFTokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def locate(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (its newest valid checkpoint), its
    `checkpoints/` directory (the same), or one checkpoint directory (that one, if intact)."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise LoadError(f"{path}: no such directory; give a run directory (with checkpoints/) or a checkpoint "
                        f"directory (checkpoints/{PREFIX}NNNNNNNN)")
    if (p / "manifest.json").exists() or p.name.startswith(PREFIX):
        why = problems(p)
        if why is not None:
            raise LoadError(f"checkpoint {p} is unusable: {why}")
        # the run above its checkpoints/ (RUN/checkpoints/abandoned/step_N included); a copy elsewhere: its folder
        return next((a.parent for a in p.parents if a.name == "checkpoints"), p.parent), p
    ckpts = p if p.name == "checkpoints" else p / "checkpoints"
    if not ckpts.is_dir():
        raise LoadError(f"{p} holds no checkpoints/ directory: not a run directory (a finished run writes "
                        f"checkpoints/{PREFIX}NNNNNNNN there)")
    try:
        newest = Checkpointer(ckpts, keep_last=0, rank=0, world_size=1).newest_valid()
    except CheckpointError:  # checkpoints, none usable: the message below says so
        newest = None
    if newest is None:
        raise LoadError(f"{ckpts} holds no valid checkpoint (none whose files match its manifest.json)")
    return ckpts.parent, newest


def checkpoint_config(run_dir: Path, ckpt: Path) -> tuple[Config, Path]:
    """The config `ckpt` trained with and its file: the checkpoint's own config.yaml (a later launch
    may have changed the run's), else (older checkpoints) the run's."""
    path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run_dir / "config.yaml"
    return run_config(path.parent), path


def run_config(run_dir: Path) -> Config:
    """The run's `config.yaml`, typed by this version's schema (unknown keys or wrong types:
    a config this version cannot build)."""
    path = run_dir / "config.yaml"
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise LoadError(f"{path} is missing: the run directory has no config to rebuild its model from") from None
    except Exception as e:  # a YAML parser error
        raise LoadError(f"{path} is not readable YAML: {_first_line(e)}") from None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))
    except OmegaConfBaseException as e:
        raise LoadError(f"{path} cannot be built by this version of v4lab: {_first_line(e)}") from None


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict from a checkpoint of any ZeRO stage and world size."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger writes to the stdout of its import
        from deepspeed.utils import zero_to_fp32

    try:
        if list(ckpt.glob("*_optim_states.pt")):  # ZeRO >= 1: weights live in the optimizer's partitions
            # DeepSpeed prints its progress; keep stdout for what the commands themselves print
            with contextlib.redirect_stdout(sys.stderr):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:  # ZeRO-0: rank 0's model-state file holds the whole module
            (model_file,) = zero_to_fp32.get_model_state_files(str(ckpt))
            state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    except Exception as e:  # unpickling, missing or inconsistent DeepSpeed files
        raise LoadError(f"checkpoint {ckpt} cannot be read: {_first_line(e)}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build_from_state(cfg: Config, state: dict[str, torch.Tensor], origin: Path) -> torch.nn.Module:
    """The model `cfg.model` describes, holding exactly `state` (vocabulary size from the embedding)."""
    from model import build_model

    if "embed.weight" not in state:
        raise LoadError(f"{origin} holds no embed.weight: not a v4lab model checkpoint")
    try:
        model = build_model(cfg.model, state["embed.weight"].shape[0])
    except Exception as e:
        raise LoadError(f"the model in {origin} cannot be built by this version of v4lab: {_first_line(e)}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{origin} does not fit the model its config.yaml describes: "
                        f"{' '.join(str(e).split())[:400]}") from None
    return model.eval()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LoadError(f"invalid device={name!r}. Accepted: auto, cpu, cuda, cuda:N.", EXIT_CONFIG)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device={name!r}, but no CUDA device is available. Accepted here: auto, cpu.", EXIT_CONFIG)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LoadError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s). "
                        f"Accepted: auto, cpu, cuda, cuda:0 to cuda:{torch.cuda.device_count() - 1}.", EXIT_CONFIG)
    return device


def tokenizer_spec(cfg: Config, run_dir: Path) -> str:
    """The run's tokenizer as a `data.tokenizer` value that names it exactly: `byte`, the path of
    its `tokenizer.json` (the run's copy, or the one beside its prepared data, found through the
    data cache and prepared again if it was deleted), or `pretrained:NAME`."""
    spec = cfg.data.tokenizer
    if spec == "byte" or spec.startswith("pretrained:"):
        return spec
    if (run_dir / "tokenizer.json").is_file():
        return str(run_dir / "tokenizer.json")
    if spec == "bpe":
        from data.shards import prepare
        from data.sources import DataError

        try:
            return str(prepare(cfg.data) / "tokenizer.json")
        except DataError as e:
            raise LoadError(f"the run's tokenizer (data.tokenizer=bpe) cannot be found: {e}", EXIT_DATA) from None
    return spec


def run_tokenizer(cfg: Config, run_dir: Path):
    """The tokenizer the run trained with (data.tokenizer.ByteTokenizer or HFTokenizer)."""
    from data.sources import DataError
    from data.tokenizer import load_tokenizer

    spec = tokenizer_spec(cfg, run_dir)
    try:
        return load_tokenizer(spec)
    except DataError as e:
        raise LoadError(f"the run's tokenizer {spec!r} cannot be loaded: {e}", EXIT_DATA) from None


def checkpoint_step(ckpt: Path) -> int:
    return read_manifest(ckpt).get("step", 0)


def at_step(model: torch.nn.Module, step: int) -> torch.nn.Module:
    """The model as it trained at optimizer step `step`: V4's CSA attends to its top-k entries once
    past the indexer's warm-up (densely before), so sampling, evaluation and exports compute what
    training computed."""
    if hasattr(model, "on_step_start"):
        model.on_step_start(step, lr_decaying=False)
    return model


def load_run(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Loaded:
    """Everything the after-training commands need from a run or checkpoint directory."""
    device = pick_device(device) if isinstance(device, str) else device  # before minutes of consolidating
    run_dir, ckpt = locate(path)
    cfg, _ = checkpoint_config(run_dir, ckpt)
    model = build_from_state(cfg, consolidated_state_dict(ckpt), ckpt)
    step = checkpoint_step(ckpt)
    at_step(model, step)
    from train.trainer import set_matmul_precision

    set_matmul_precision(device, cfg.trainer.tf32)  # TF32 on CUDA as the run trained (trainer.tf32)
    return Loaded(model.to(device), cfg, run_dir, ckpt, step, run_tokenizer(cfg, run_dir) if tokenizer else None)


EXPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}


def from_exported(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model `python -m train.export RUN --format safetensors` wrote to `directory`, rebuilt
    from its config.yaml with exactly the exported tensors (in the exported dtype), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    directory = Path(directory).expanduser()
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise LoadError(f"{directory} holds no model.safetensors: not a `train.export --format safetensors` output")
    cfg = run_config(directory)
    from model import build_model

    try:
        with safe_open(str(weights), framework="pt") as f:
            if "embed.weight" not in f.keys():
                raise LoadError(f"{weights} holds no embed.weight: not a `train.export --format safetensors` output "
                                f"(a transformers export loads with transformers' from_pretrained)")
            embed = f.get_slice("embed.weight")
            vocab, dtype = embed.get_shape()[0], EXPORTED_DTYPES.get(embed.get_dtype())
            step = (f.metadata() or {}).get("step")
    except LoadError:
        raise
    except Exception as e:  # safetensors' own errors: a file cut short or not safetensors
        raise LoadError(f"{weights} cannot be read: {_first_line(e)}") from None
    if dtype is None:
        raise LoadError(f"{weights} holds {embed.get_dtype()} weights; accepted: "
                        f"{', '.join(EXPORTED_DTYPES)} (what train.export writes)")
    try:
        model = build_model(cfg.model, vocab).to(dtype)
        load_model(model, str(weights), strict=True, device="cpu")
    except Exception as e:
        raise LoadError(f"{weights} does not fit the model its config.yaml describes: "
                        f"{' '.join(str(e).split())[:400]}") from None
    exported = directory / "export.json"  # older exports carry the step only there
    if step is None and exported.is_file():
        step = json.loads(exported.read_text()).get("step")
    if step is None and getattr(model, "indexers", lambda: [])():
        raise LoadError(f"{weights} does not say which step it is from (neither its metadata nor an export.json "
                        f"beside it), and this V4 model attends densely in its indexer's warm-up and sparsely "
                        f"after it; export it again with `python -m train.export`")
    at_step(model, int(step or 0))
    return model.eval().to(device)
