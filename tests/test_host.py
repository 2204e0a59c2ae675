"""train/host.py: with freed memory kept for reuse, a step's freed buffers stay with the process
(nothing is given back to the OS to be faulted in again). Each measurement runs in a process of its
own: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# Not through benchmarks.common: composing a config there sets the thresholds. Each round allocates
# six 16 MB buffers (the size of a default-model step's activations and their gradients) and frees
# them; printed: the bytes glibc gave back to the OS on each free (its heap and its own mappings,
# from mallinfo: glibc's bookkeeping, which the kernel's page faulting and reclaim do not blur; its
# int fields hold these few hundred MB).
RETURNED = textwrap.dedent("""
    import ctypes, sys, torch
    from train.host import reuse_freed_memory

    class Mallinfo(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo = ctypes.CDLL(None).mallinfo
    mallinfo.restype = Mallinfo

    def held():
        info = mallinfo()
        return info.arena + info.hblkhd

    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    returned = []
    for _ in range(3):
        buffers = [torch.ones(4 << 20) for _ in range(6)]
        before = held()
        del buffers
        returned.append(before - held())
    print(*returned)
""")


def returned_per_round(mode: str) -> list[int]:
    # glibc's own defaults: without the user's malloc settings, which reuse_freed_memory would respect
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", RETURNED, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(b) for b in out.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc thresholds")
def test_freed_buffers_stay_with_the_process():
    """With the setting, freeing a step's buffers gives nothing back to the OS, so the next step
    does not fault them in afresh (~8,500 faults per step of the default model without it, on
    machines without huge pages). Without it, glibc unmaps the first round's buffers (16 MB is
    above its initial 128 KB mmap threshold): 96 MB, then 32 MB trimmed, then it has adapted."""
    default = returned_per_round("default")
    assert default[0] >= 6 * (16 << 20)  # what the check below would see of a setting that does nothing
    assert returned_per_round("reuse") == [0, 0, 0]


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_applies_the_setting_when_asked(tiny_config, monkeypatch, on):
    import train.trainer

    calls = []
    monkeypatch.setattr(train.trainer, "reuse_freed_memory", lambda: calls.append(1))
    train.trainer.Trainer(tiny_config(f"trainer.reuse_freed_memory={str(on).lower()}"))
    assert calls == ([1] if on else [])


@pytest.mark.parametrize("key,value", [
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),  # read as text: nothing is preloaded here
])
def test_users_malloc_settings_win(monkeypatch, caplog, key, value):
    """The user's own malloc configuration (glibc's variables, its tunables, another allocator) is
    left as it is: nothing is set on top of it."""
    from train import host

    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.39"))  # the settings are glibc's
    for other in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(key, value)
    caplog.set_level(logging.INFO, logger="train.host")
    host.reuse_freed_memory.cache_clear()
    try:
        assert host.reuse_freed_memory() is False
    finally:
        host.reuse_freed_memory.cache_clear()
    assert f"malloc left as configured by {key}" in caplog.text
