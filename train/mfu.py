"""Model FLOPs utilisation (MFU) and peak memory, carried by every step's metrics and the summary.

    mfu = training FLOPs per token × tokens/s ÷ (peak FLOP/s per device × ranks)

FLOPs per token are the model's own count (`Transformer.flops_per_token`: 6 × active non-embedding
parameters + attention, PaLM's accounting). The peak per device is, first that applies:
`trainer.peak_tflops`; on a GPU, the dense bf16 figure of a known accelerator (`PEAK_BF16_TFLOPS`,
from the vendors' datasheets); on CPU, a matmul measured once at start-up in the run's precision
with the run's threads (the best of a few hundred milliseconds of 2048² products). An unknown GPU
without `trainer.peak_tflops` logs `mfu` as null. `mem/peak_gb` is the peak since the process
started, in GB (10⁹ bytes): CUDA's max allocated on a GPU, the process's peak resident set on CPU.
"""
from __future__ import annotations

import functools
import logging
import re
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) bf16 tensor-core peak per device, TFLOP/s: the datasheets print the sparse
# figure with an asterisk; dense is half of it. First match wins (more specific names first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GB200", 2500.0),        # NVIDIA GB200 NVL72 datasheet: 360 PFLOPS* per 72 GPUs = 5 PFLOPS* each
    (r"B200", 2250.0),         # NVIDIA HGX B200 datasheet: FP16/BF16 36 PFLOPS* per 8 GPUs = 4.5 PFLOPS* each
    (r"H200 NVL", 835.0),      # NVIDIA H200 NVL datasheet: BF16 Tensor Core 1,671 TFLOPS*
    (r"H200", 989.0),          # NVIDIA H200 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS* (also GH200)
    (r"H100 NVL", 835.0),      # NVIDIA H100 NVL datasheet: 1,671 TFLOPS*
    (r"H[18]00 PCIe", 756.0),  # NVIDIA H100 PCIe datasheet: 1,513 TFLOPS* (H800 PCIe: H100 PCIe's compute)
    (r"H100|H800", 989.0),     # NVIDIA H100 SXM datasheet: 1,979 TFLOPS*
    (r"H20\b", 148.0),         # NVIDIA H20: 296 TFLOPS*
    (r"A100|A800", 312.0),     # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS | 624 TFLOPS*
    (r"L40S", 362.0),          # NVIDIA L40S datasheet: BF16 Tensor Core 733 TFLOPS*
    (r"L4\b", 121.0),          # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS*
    (r"A10\b", 125.0),         # NVIDIA A10 datasheet: BF16 Tensor Core 250 TFLOPS*
    (r"MI300X|MI325X", 1307.4),  # AMD Instinct MI300X / MI325X datasheets: peak bfloat16 1307.4 TFLOPS (dense)
    (r"MI250X", 383.0),        # AMD Instinct MI250X datasheet: peak bfloat16 383 TFLOPS
)


def table_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator, by its device name; None if unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(dtype: torch.dtype, threads: int, budget_s: float = 0.3,
                           max_n: int = 2048) -> tuple[float, int]:
    """(TFLOP/s, n): the best rate of n×n matmuls (F.linear, the op the model runs) on CPU within
    about `budget_s` (at least three); n doubles from 256 until one matmul takes over a tenth of
    the budget, or reaches max_n. The size adapts because a CPU without bf16 units runs a 2048²
    bf16 matmul in minutes, not milliseconds.
    The hardware does not change within a process, so each (dtype, threads) is measured once."""
    n = min(256, max_n)
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        F.linear(a, b)  # warm-up: thread pool, packing buffers
        start = time.perf_counter()
        F.linear(a, b)
        if n >= max_n or time.perf_counter() - start > budget_s / 10:
            break
        n = min(2 * n, max_n)
    best, spent, reps = 0.0, 0.0, 0
    while reps < 3 or spent < budget_s:
        start = time.perf_counter()
        F.linear(a, b)
        elapsed = time.perf_counter() - start
        best, spent, reps = max(best, 2 * n**3 / elapsed), spent + elapsed, reps + 1
    return best / 1e12, n


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


class Utilisation:
    """The peak FLOP/s this run holds, and `mfu` / `mem/peak_gb` from a tokens/s figure."""

    def __init__(self, flops_per_token: int, device: torch.device, precision: str, peak_tflops: float | None):
        self.flops_per_token, self.device = flops_per_token, device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if peak_tflops:
            per_device, source = float(peak_tflops), "trainer.peak_tflops"
        elif device.type == "cpu":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # ranks sharing a host measure together, so each sees its share
            per_device, n = measured_matmul_tflops(dtype, torch.get_num_threads())
            source = f"measured: {str(dtype).removeprefix('torch.')} {n}x{n} matmul, {torch.get_num_threads()} threads"
        else:
            per_device, source = table_peak_tflops(name), f"datasheet dense bf16 peak of {name}"
            if per_device is None:
                source = f"unknown accelerator {name!r}: set trainer.peak_tflops"
                log.warning("no peak FLOP/s known for %r: mfu is not reported; set trainer.peak_tflops=X "
                            "(dense bf16 TFLOP/s per device)", name)
        total = per_device
        if per_device is not None and dist.is_initialized() and dist.get_world_size() > 1:
            summed = torch.tensor([per_device], dtype=torch.float64, device=device)
            dist.all_reduce(summed)  # measured peaks differ per rank; the run holds their sum
            total = float(summed.item())
        self.per_device_tflops, self.total_tflops, self.source, self.device_name = per_device, total, source, name
        if per_device is not None:
            log.info("peak %.3g TFLOP/s per device (%s); %.3g TFLOP/s over all ranks", per_device, source, total)

    def describe(self) -> dict:
        """What environment.json records about the peak."""
        return {"device_name": self.device_name, "peak_tflops_per_device": self.per_device_tflops,
                "peak_tflops_total": self.total_tflops, "peak_source": self.source}

    def mfu(self, tokens_per_s: float | None) -> float | None:
        if not self.total_tflops or not tokens_per_s:
            return None
        return self.flops_per_token * tokens_per_s / (self.total_tflops * 1e12)

    def metrics(self, tokens_per_s: float | None) -> dict:
        return {"mfu": self.mfu(tokens_per_s), "mem/peak_gb": peak_memory_gb(self.device)}
