"""Pre-emption: SIGTERM, SIGINT or SIGUSR2 (SLURM via submitit) ask the run to stop. The step in
progress finishes, every rank agrees on stopping after the same step, a checkpoint is written and
the run exits 0. A second Ctrl-C interrupts at once.

Whoever handled the signal before us keeps its say: after the checkpoint, a Python handler that
was installed (submitit's, which requeues the SLURM job) is called with the signal."""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class StopSignals:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            log.warning("received %s: stopping after this step with a checkpoint (Ctrl-C again to abort)",
                        signal.Signals(signum).name)

    def agreed(self) -> int | None:
        """The signal any rank received, the same answer on every rank (one tiny all-reduce)."""
        got = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([got], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            got = int(flag.item())
        return got or None

    def hand_over(self, signum: int) -> None:
        handler = self.previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)
