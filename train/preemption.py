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
# In order of precedence when ranks saw different ones: USR2 first, as it is SLURM's warning that
# submitit turns into a requeue.
SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installed by `launch.py` before the trainer is built (a signal during start-up stops the run
    before its first step), or by `Trainer.fit` when used on its own."""

    def __init__(self):
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

    def agreed(self, device: torch.device) -> int | None:
        """The signal any rank received, the same answer on every rank (one tiny all-reduce)."""
        seen = torch.tensor([self.received == s for s in SIGNALS], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return next((s for s, hit in zip(SIGNALS, seen.tolist()) if hit), None)

    def hand_over(self, signum: int) -> None:
        handler = self.previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)
