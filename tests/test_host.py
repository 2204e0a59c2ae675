"""train/host.py: with freed memory kept for reuse, a training step stops faulting its buffers in
afresh. Each case runs in a process of its own: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from train.config import TrainerConfig

# Not through benchmarks.common: importing it sets the thresholds.
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
    for _ in range(4):  # to the steady state
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
""")


def faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_freed_buffers():
    default, reuse = faults_per_step("default"), faults_per_step("reuse")
    assert default > 2000  # measured 8,200-10,800: glibc alone unmaps and trims between steps
    assert reuse * 4 < default  # measured 300-1,400


def test_on_by_default():
    assert TrainerConfig().reuse_freed_memory is True
