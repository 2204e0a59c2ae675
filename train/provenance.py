"""`environment.json`: what produced a run. One entry per start (a resumed run adds one), each with
the git commit, package versions, machine, command line, the step it started from, the settings
changed since the checkpoint it resumed, and the keys with no effect in the run."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("v4lab", "torch", "deepspeed", "hydra-core", "omegaconf", "datasets", "tokenizers", "wandb", "numpy",
            "hydra-submitit-launcher", "submitit")


def git_state() -> dict | None:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def record_start(out_dir: Path, step: int, world_size: int, changed: dict | None = None,
                 inert: list[str] = ()) -> int:
    """Append this start's entry and return its number (0 = the first start). `changed`: the
    settings that differ from the checkpoint this start resumes ({key: [old, new]}), which change
    the trajectory; `inert`: keys with no effect in this run."""
    path = out_dir / "environment.json"
    starts = json.loads(path.read_text()) if path.exists() else []
    starts.append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "git": git_state(),
        "python": sys.version.split()[0], "packages": versions(), "platform": platform.platform(),
        "hostname": socket.gethostname(), "world_size": world_size, "argv": sys.argv,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "changed": {k: list(v) for k, v in (changed or {}).items()}, "inert": list(inert),
    })
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(starts, indent=1))
    os.replace(tmp, path)
    return len(starts) - 1
