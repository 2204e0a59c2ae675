"""train/host.py: with freed memory kept for reuse, a training step stops faulting its buffers in
afresh. Each measurement runs in a process of its own: the setting is process-wide and cannot be
undone."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# Not through benchmarks.common: composing a config there sets the thresholds.
STEP_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from model import build_model
    from train.config import ModelConfig
    from train.host import reuse_freed_memory
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 256)  # the default model (configs/model/small.yaml), batch 16 x 256
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    idx = torch.randint(0, 256, (16, 256))
    def step():
        model(idx, idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):  # to the steady state
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2)
""")


def faults_per_step(mode: str) -> int:
    # glibc's own defaults: without the user's malloc settings, which reuse_freed_memory would respect
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc thresholds")
def test_a_training_step_reuses_freed_buffers():
    default = faults_per_step("default")
    if default < 2000:  # e.g. transparent huge pages "always": a fault maps 2 MB
        pytest.skip(f"this machine faults only {default} times per step without the setting")
    # measured 300-1,400 against 8,200-10,800; on a VM whose kernel maps huge pages and reclaims
    # memory by itself (12-07), 1,154 against 3,121: a broken setting faults as often as the default
    assert faults_per_step("reuse") * 2 < default


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_applies_the_setting_when_asked(tiny_config, monkeypatch, on):
    import train.trainer

    calls = []
    monkeypatch.setattr(train.trainer, "reuse_freed_memory", lambda: calls.append(1))
    train.trainer.Trainer(tiny_config(f"trainer.reuse_freed_memory={str(on).lower()}"))
    assert calls == ([1] if on else [])


def test_users_malloc_settings_win(monkeypatch):
    from train import host

    host.reuse_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    try:
        assert host.reuse_freed_memory() is False
    finally:
        host.reuse_freed_memory.cache_clear()
