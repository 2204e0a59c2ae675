"""The MFU denominator: datasheet peaks by device name, the CPU's measured matmul peak."""
import time

import pytest
import torch

from train.mfu import Utilisation, measured_matmul_tflops, table_peak_tflops


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("AMD Instinct MI300X", 1307.4), ("NVIDIA GeForce GTX 1080", None),
    ("NVIDIA H800", 989.0), ("NVIDIA H800 PCIe", 756.0),
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
