"""Packed fixed-length training windows from memory-mapped token files.

The training split is cut into windows of `seq_len + 1` tokens at stride `seq_len` (inputs and
targets shifted by one). Each epoch visits every window once in a permutation fixed by
(seed, epoch); every optimizer micro-step takes `micro_batch * world_size` consecutive windows of
that order, and rank r reads its own slice of them, so ranks never share a window and together
cover the epoch. The position is two integers, which makes resuming exact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.shards import load_manifest, read_tokens
from data.sources import DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


class TokenLoader:
    def __init__(self, prepared: Path, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.manifest = load_manifest(prepared)
        self.tokens = read_tokens(prepared / "train.bin")
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = (len(self.tokens) - 1) // seq_len
        self.steps_per_epoch = self.n_windows // (micro_batch * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{prepared / 'train.bin'} holds {len(self.tokens)} tokens, fewer than one batch of "
                f"{micro_batch * world_size} windows of {seq_len + 1} tokens"
            )
        self.epoch, self.step_in_epoch = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n_windows, generator=g)
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._order = self.epoch + 1, 0, None
        per_step = self.micro_batch * self.world_size
        begin = self.step_in_epoch * per_step + self.rank * self.micro_batch
        idx = self._epoch_order()[begin : begin + self.micro_batch].numpy()
        self.step_in_epoch += 1
        return _windows(self.tokens, idx * self.seq_len, self.seq_len)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
            "fingerprint": self.fingerprint, "seq_len": self.seq_len,
            "micro_batch": self.micro_batch, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("fingerprint", "seq_len", "micro_batch", "world_size", "seed"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state does not match this run: saved {key}={state[key]!r}, "
                    f"current {key}={getattr(self, key)!r}; resume with the same data, batch layout and seed"
                )
        self.epoch, self.step_in_epoch, self._order = state["epoch"], state["step_in_epoch"], None


def validation_batches(prepared: Path, seq_len: int, micro_batch: int, n_batches: int, rank: int = 0, world_size: int = 1):
    """A fixed list of validation batches: the first windows of the split, striped over ranks."""
    tokens = read_tokens(prepared / "val.bin")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < world_size:
        raise DataError(f"{prepared / 'val.bin'} holds {len(tokens)} tokens, too few for one validation window per rank")
    starts = np.arange(rank, n_windows, world_size)[: n_batches * micro_batch] * seq_len
    return [_windows(tokens, starts[i : i + micro_batch], seq_len) for i in range(0, len(starts), micro_batch)]
