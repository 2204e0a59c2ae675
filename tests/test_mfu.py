"""The MFU denominator: datasheet peaks by device name, the CPU's measured matmul peak."""
import itertools
import time
from pathlib import Path

import pytest
import torch

from train import mfu
from train.mfu import Utilisation, measured_matmul_tflops, peak_memory_gb, table_peak_tflops


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("AMD Instinct MI300X", 1307.4), ("NVIDIA GeForce GTX 1080", None),
    ("NVIDIA H800", 989.0), ("NVIDIA H800 PCIe", 756.0), ("NVIDIA A10", 125.0), ("NVIDIA H20", 148.0),
    ("NVIDIA A800-SXM4-80GB", 312.0), ("AMD Instinct MI325X", 1307.4), ("AMD Instinct MI250X", 383.0),
])
def test_known_accelerators_by_name(name, tflops):
    assert table_peak_tflops(name) == tflops


def test_measured_cpu_peak_is_plausible_and_cached():
    first, n = measured_matmul_tflops(torch.float32, torch.get_num_threads(), budget_s=0.05, max_n=512)
    assert 1e-4 < first < 10 and n in (256, 512)  # TFLOP/s of a CPU
    assert measured_matmul_tflops(torch.float32, torch.get_num_threads(), budget_s=0.05, max_n=512) == (first, n)


def test_measured_cpu_peak_shrinks_the_matmul_where_the_dtype_is_slow():
    """bf16 on a CPU without bf16 units takes minutes for one 2048² matmul: the size adapts to the budget."""
    start = time.perf_counter()
    tflops, n = measured_matmul_tflops(torch.bfloat16, torch.get_num_threads(), budget_s=0.2)
    assert time.perf_counter() - start < 30 and tflops > 0 and 256 <= n <= 2048


def test_mfu_is_null_without_a_peak_or_a_speed():
    u = Utilisation(1000, torch.device("cpu"), "fp32", peak_tflops=2.0)
    assert u.mfu(None) is None
    assert u.mfu(1e9) == pytest.approx(1000 * 1e9 / 2e12)
    u.total_tflops = None  # an unknown GPU without trainer.peak_tflops
    assert u.metrics(1e9)["mfu"] is None and u.metrics(1e9)["mem/peak_gb"] > 0


def test_progress_bar_shows_mfu():
    from types import SimpleNamespace

    from train.callbacks import ProgressBar

    bar = ProgressBar()
    bar.on_train_start(SimpleNamespace(max_steps=4, step=0))
    bar.on_step_end(None, {"step": 1, "loss": 2.5, "tokens_per_s": 1234.0, "mfu": 0.4321})
    assert "mfu=43.2%" in bar.bar.postfix and "tok/s=1,234" in bar.bar.postfix
    bar.on_step_end(None, {"step": 2, "loss": 2.4, "tokens_per_s": 1234.0, "mfu": None})  # no known peak
    assert "mfu" not in bar.bar.postfix
    bar.on_train_end(None, {})


def _ticking_clock(monkeypatch, dt):
    """train.mfu's perf_counter advancing by `dt` seconds per call."""
    ticks = itertools.count()
    monkeypatch.setattr(mfu.time, "perf_counter", lambda: next(ticks) * dt)


def test_measured_cpu_peak_counts_a_multiply_add_as_two_flops(monkeypatch):
    """An n×n matmul is 2n³ FLOPs (PaLM's accounting, as flops_per_token): the CPU peak must count
    the same way, or its MFU comes out doubled."""
    dt = 2.0 ** -10  # exact in binary: every measured interval is exactly dt
    _ticking_clock(monkeypatch, dt)
    tflops, n = measured_matmul_tflops.__wrapped__(torch.float32, 1, budget_s=0.01, max_n=256)
    assert n == 256 and tflops == 2 * 256**3 / dt / 1e12


def test_measured_matmul_grows_until_one_takes_a_tenth_of_the_budget(monkeypatch):
    """n doubles from 256 until one matmul takes over budget/10: a matmul costing c·n³ seconds is
    measured at the first such n (a smaller one would time mostly overhead), at its c·n³ rate."""
    c, budget = 1e-10, 0.3
    now = [0.0]

    def linear(a, b):
        now[0] += c * a.shape[0] ** 3

    monkeypatch.setattr(mfu.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(mfu.F, "linear", linear)
    monkeypatch.setattr(mfu.torch, "randn", lambda *shape: torch.empty(*shape))
    tflops, n = measured_matmul_tflops.__wrapped__(torch.float32, 1, budget_s=budget, max_n=2048)
    expected = next(m for m in (256, 512, 1024, 2048) if c * m**3 > budget / 10 or m == 2048)
    assert n == expected == 1024
    assert tflops == pytest.approx(2 / c / 1e12, rel=1e-9)


def test_a_bf16_run_on_cpu_is_measured_in_bf16(monkeypatch):
    """A CPU's bf16 matmuls can be many times slower than its fp32 ones: the peak of a bf16 run is
    the bf16 one, or its MFU is off by that factor."""
    peaks = {torch.bfloat16: 0.25, torch.float32: 2.0}
    monkeypatch.setattr(mfu, "measured_matmul_tflops", lambda dtype, threads: (peaks[dtype], 256))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        u = Utilisation(1000, torch.device("cpu"), precision, peak_tflops=None)
        assert u.per_device_tflops == u.total_tflops == peaks[dtype]
        assert u.source.startswith(f"measured: {str(dtype).removeprefix('torch.')} 256x256 matmul")


def test_mfu_divides_by_the_peak_summed_over_ranks(monkeypatch):
    """mfu = FLOPs/token × global tokens/s ÷ (sum of the ranks' peaks): two ranks (the other one's
    peak 3 TFLOP/s, as the all-reduce brings it) hold 5 TFLOP/s, not this rank's 2."""
    monkeypatch.setattr(mfu.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mfu.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(mfu.dist, "all_reduce", lambda t: t.add_(3.0))
    u = Utilisation(1000, torch.device("cpu"), "fp32", peak_tflops=2.0)
    assert (u.per_device_tflops, u.total_tflops) == (2.0, 5.0)
    assert u.describe()["peak_tflops_total"] == 5.0
    assert u.mfu(1e9) == 1000 * 1e9 / (5.0 * 1e12)


def test_cpu_peak_memory_is_the_peak_resident_set_in_bytes():
    """ru_maxrss is in KiB on Linux: ×1024, as the kernel's own peak resident set (VmHWM) says."""
    status = Path("/proc/self/status")
    lines = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
    if not lines:
        pytest.skip("no /proc/self/status VmHWM (not Linux)")
    gb = peak_memory_gb(torch.device("cpu"))
    assert lines[0].split()[2] == "kB"
    assert gb == pytest.approx(int(lines[0].split()[1]) * 1024 / 1e9, rel=5e-3)


def test_gpu_peak_memory_is_the_peak_not_the_current_allocation(monkeypatch):
    """mem/peak_gb on a GPU is CUDA's max allocated since the start, not what is held at the moment."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7_000_000_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3_000_000_000)
    assert peak_memory_gb(torch.device("cuda", 0)) == 7.0
