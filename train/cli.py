"""The command line shared by `train.sample`, `train.evaluate` and `train.export`: a run (or
checkpoint) directory first, then Hydra-style `key=value` arguments composed against `configs/`
with the commands' typed schemas, so a misspelt key or a wrong type is refused before any work.
Every refusal is one line `error: ...` on stderr and an exit status from train.load."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import register_configs
from train.load import EXIT_CONFIG, LoadError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def split_args(argv: list[str], usage: str) -> tuple[str, list[str]]:
    """(the run directory, the key=value overrides) from argv; a first argument that is an existing
    directory is the run even with "=" in its name (sweep directories such as optim.lr=3e-3)."""
    named = argv[:1] if argv and "=" in argv[0] and Path(argv[0]).expanduser().is_dir() else []
    positional = named + [a for a in argv[len(named):] if "=" not in a]
    if len(positional) != 1:
        raise LoadError(f"expected one run or checkpoint directory, got {positional or 'none'}. Usage: {usage}", EXIT_CONFIG)
    return positional[0], [a for a in argv[len(named):] if "=" in a]


def compose_args(config_name: str, overrides: list[str]):
    """The typed config object `config_name` composed with `overrides`."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
        return OmegaConf.to_object(cfg)
    except Exception as e:  # Hydra's and OmegaConf's errors are several lines; keep what names the problem
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("To append")]
        cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ else ""
        if cause and cause not in lines:
            lines.append(f"({cause})")
        raise LoadError(f"invalid argument(s) {' '.join(overrides)}: {' '.join(lines)[:400]}", EXIT_CONFIG) from None
