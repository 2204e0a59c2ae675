"""The loss-spike policy (`trainer.on_spike=skip`), after OLMo-core's skip-step optimizer.

Every step's loss and gradient norm enter a rolling window of the last `window` steps (skipped
steps too, so that a lasting shift of the loss level ends the skipping once the window has seen
it). Once the window is at least half full, a step whose loss or gradient norm exceeds the
window's mean by more than `sigma` standard deviations is a spike: its update is not applied.
"""
from __future__ import annotations

import math
import statistics
from collections import deque


class SpikeGuard:
    def __init__(self, sigma: float, window: int):
        self.sigma, self.window = sigma, window
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.phase = None  # what is trained (V4's indexer-only warm-up, then everything)

    def _above(self, value: float, history: deque) -> bool:
        if len(history) < 2:
            return False
        mean, std = statistics.fmean(history), statistics.stdev(history)
        return value - mean > self.sigma * std

    def is_spike(self, loss: float, grad_norm: float, phase=None) -> bool:
        """Whether this step is a spike, judged against the steps before it; then records it. A new
        `phase` starts a new history: the indexer warm-up's loss and norm are the indexer's alone,
        and the whole model's first steps after it are no spike (they were skipped)."""
        if phase != self.phase:
            self.losses.clear()
            self.grad_norms.clear()
            self.phase = phase
        warm = len(self.losses) >= max(2, self.window // 2)
        spike = warm and (self._above(loss, self.losses) or self._above(grad_norm, self.grad_norms))
        if math.isfinite(loss) and math.isfinite(grad_norm):  # non-finite steps have their own policy
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.window)
        self.phase = state.get("phase")
