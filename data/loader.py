"""Packed fixed-length training windows from memory-mapped token shards.

Each shard is cut into windows of `seq_len + 1` tokens at stride `seq_len` (inputs and targets
shifted by one; windows never straddle shards). Each epoch visits every window once in a
permutation fixed by (seed, epoch); every micro-step takes `micro_batch * world_size` consecutive
windows of that order and rank r reads its own slice of them, so ranks never share a window and
together cover the epoch. The position is two integers, which makes resuming exact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.shards import load_manifest, read_tokens
from common.errors import DataError


class Windows:
    """All windows of one split: window i -> (shard, start) through cumulative counts."""

    def __init__(self, prepared: Path, split: str, seq_len: int):
        self.manifest = load_manifest(prepared)
        self.vocab_size = self.manifest["vocab_size"]
        self.seq_len = seq_len
        self.files, self.shards = [], []
        for s in self.manifest["splits"][split]["shards"]:
            path = prepared / s["file"]
            tokens = read_tokens(path)
            if len(tokens) != s["tokens"]:
                raise DataError(f"token file {path} holds {len(tokens)} tokens; manifest.json says {s['tokens']}")
            self.files.append(path)
            self.shards.append(tokens)
        counts = [max(0, (len(t) - 1) // seq_len) for t in self.shards]
        self.offsets = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, (i, s) in enumerate(zip(indices, shard_of)):
            start = (int(i) - int(self.offsets[s])) * self.seq_len
            rows[row] = self.shards[s][start : start + self.seq_len + 1]
        if rows.size and rows.max() >= self.vocab_size:
            bad = self.files[shard_of[int(np.argmax(rows.max(axis=1)))]]
            raise DataError(f"token file {bad} holds token id {rows.max()} ≥ the vocab size {self.vocab_size}")
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class TokenLoader:
    def __init__(self, prepared: Path, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows = Windows(prepared, "train", seq_len)
        self.manifest = self.windows.manifest
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = len(self.windows)
        self.steps_per_epoch = self.n_windows // (micro_batch * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training split of {prepared} holds {self.n_windows} windows of {seq_len + 1} tokens, "
                f"fewer than one step's {micro_batch * world_size}"
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
        begin = self.step_in_epoch * self.micro_batch * self.world_size + self.rank * self.micro_batch
        idx = self._epoch_order()[begin : begin + self.micro_batch].numpy()
        self.step_in_epoch += 1
        return self.windows.batch(idx)

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
    windows = Windows(prepared, "val", seq_len)
    if len(windows) < world_size:
        raise DataError(f"the validation split of {prepared} has {len(windows)} windows of {seq_len + 1} tokens, "
                        f"fewer than one per rank ({world_size})")
    idx = np.arange(rank, len(windows), world_size)[: n_batches * micro_batch]
    return [windows.batch(idx[i : i + micro_batch]) for i in range(0, len(idx), micro_batch)]
