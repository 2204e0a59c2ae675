"""`trainer.profile=START:END`: a torch.profiler trace of optimizer steps START to END (both included,
numbered as in metrics.jsonl), written as Chrome/Perfetto JSON to
`out_dir/profile/trace_rank{R}_steps{START}-{END}.json` by every rank. Each step is a range named
`step N`; inside it the model's blocks (`blocks.0`, ...) and their `attn` and `ffn` sublayers are
named ranges of the forward (model/block.py). Open the file in https://ui.perfetto.dev or
chrome://tracing.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def parse_steps(spec: str) -> tuple[int, int]:
    """"START:END" → (START, END); ValueError unless 1 ≤ START ≤ END."""
    try:
        start, end = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise ValueError("not of the form START:END") from None
    if not 1 <= start <= end:
        raise ValueError("steps count from 1 and START must not exceed END")
    return start, end


class StepProfiler:
    """Starts torch.profiler before step START and writes the trace after step END (or when the
    run ends first). Without a spec, every method does nothing."""

    def __init__(self, spec: str | None, out_dir: Path, rank: int, device):
        self.steps = parse_steps(spec) if spec else None
        self.out_dir, self.rank, self.device = Path(out_dir), rank, device
        self.prof = None

    @property
    def path(self) -> Path:
        start, end = self.steps
        return self.out_dir / "profile" / f"trace_rank{self.rank}_steps{start}-{end}.json"

    @contextlib.contextmanager
    def step(self, step: int):
        """Around optimizer step `step` (1-based)."""
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            yield
            return
        from torch.profiler import ProfilerActivity, profile, record_function  # torch-free import for validate.py

        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        with record_function(f"step {step}"):
            yield
        if step == self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the trace, if one is being recorded."""
        if self.prof is None:
            return
        self.prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        self.prof = None
        log.info("profile written to %s (open it in https://ui.perfetto.dev or chrome://tracing)", self.path)
