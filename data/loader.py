"""Packed fixed-length training windows from memory-mapped token shards.

Each shard is cut into windows of `seq_len + 1` tokens at stride `seq_len` (inputs and targets
shifted by one; windows never straddle shards). Each epoch visits the windows in a permutation
fixed by (seed, epoch). Every micro-step takes the next `micro_batch * world_size` windows of that
order and rank r reads its own slice of them, so ranks never share a window; an optimizer step
therefore consumes the next `global_batch` windows whatever the layout. The position is global —
(epoch, windows consumed in it) — and a step that would not fit in what is left of the epoch starts
the next one (the epoch's last `n_windows mod global_batch` windows are left out), so a resume at
another world size or micro-batch continues the same global sample order: nothing repeated,
nothing skipped. A resume with another global batch continues from the same position.

`V4LAB_BATCH_DIGEST=1` makes the loader sum a 40-bit hash of every window it hands out
(`take_digest`); summed over ranks, a step's digest names its set of windows independently of the
layout. Tests compare runs with it; off, it costs nothing.
"""
from __future__ import annotations

import hashlib
import os
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
    """Training batches of one rank. `global_batch`: windows per optimizer step, a multiple of
    `micro_batch * world_size` (default: one micro-step); a step that would not fit in the rest of
    the epoch starts the next one."""

    STATE_VERSION = 2  # 1: (epoch, step_in_epoch) in micro-steps of a fixed micro_batch × world_size

    def __init__(self, prepared: Path, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 global_batch: int | None = None):
        self.windows = Windows(prepared, "train", seq_len)
        self.manifest = self.windows.manifest
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = global_batch or micro_batch * world_size
        if self.global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch={self.global_batch} is not a multiple of micro_batch × world_size = "
                             f"{micro_batch} × {world_size}")
        self.n_windows = len(self.windows)
        self.windows_per_epoch = self.n_windows // self.global_batch * self.global_batch
        if self.windows_per_epoch == 0:
            raise DataError(
                f"the training split of {prepared} holds {self.n_windows} windows of {seq_len + 1} tokens, "
                f"fewer than one step's {self.global_batch}"
            )
        self.epoch, self.position = 0, 0  # windows of this epoch's order consumed by all ranks together
        self._micro_steps = self.global_batch // (micro_batch * world_size)
        self._micro = 0  # micro-steps of the current optimizer step taken
        self._order: torch.Tensor | None = None
        self._digest = 0 if os.environ.get("V4LAB_BATCH_DIGEST") == "1" else None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps per epoch at this layout."""
        return self.windows_per_epoch // (self.micro_batch * self.world_size)

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n_windows, generator=g)
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._micro == 0 and self.position + self.global_batch > self.n_windows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        begin = self.position + self.rank * self.micro_batch
        idx = self._epoch_order()[begin : begin + self.micro_batch].numpy()
        self.position += self.micro_batch * self.world_size
        self._micro = (self._micro + 1) % self._micro_steps
        x, y = self.windows.batch(idx)
        if self._digest is not None:
            self._digest += sum(_window_hash(row) for row in torch.cat([x, y[:, -1:]], dim=1).numpy())
        return x, y

    def take_digest(self) -> int | None:
        """The sum of the hashes of the windows handed out since the last call (None when off)."""
        digest = self._digest
        if digest is not None:
            self._digest = 0
        return digest

    def state_dict(self) -> dict:
        return {"version": self.STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "fingerprint": self.fingerprint, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version", 1)
        if version not in (1, self.STATE_VERSION):
            raise DataError(f"data loader state version {version} is not one this code reads (1, {self.STATE_VERSION})")
        for key in ("fingerprint", "seq_len", "seed"):
            if key == "fingerprint" and state[key] in self.manifest.get("also_known_as", ()):
                continue  # the same files, fingerprinted as before they were known by content (data/shards.py)
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state does not match this run: saved {key}={state[key]!r}, "
                    f"current {key}={getattr(self, key)!r}; resume with the same data, sequence length and seed"
                )
        if version == 1:  # saved between optimizer steps, so a whole number of global batches
            position = state["step_in_epoch"] * state["micro_batch"] * state["world_size"]
        else:
            position = state["position"]
        self.epoch, self.position, self._micro, self._order = state["epoch"], position, 0, None


def _window_hash(tokens: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(tokens.tobytes(), digest_size=5).digest(), "little")


def validation_batches(prepared: Path, seq_len: int, micro_batch: int, n_batches: int, rank: int = 0, world_size: int = 1):
    """A fixed list of validation batches: the first windows of the split, striped over ranks. Every
    rank gets as many batches, of the same sizes (a short split: the last one partial on every
    rank): under ZeRO-3 each forward is a collective, and the ranks' means are averaged."""
    windows = Windows(prepared, "val", seq_len)
    if len(windows) < world_size:
        raise DataError(f"the validation split of {prepared} has {len(windows)} windows of {seq_len + 1} tokens, "
                        f"fewer than one per rank ({world_size})")
    per_rank = min(n_batches * micro_batch, len(windows) // world_size)
    idx = np.arange(rank, per_rank * world_size, world_size)
    return [windows.batch(idx[i : i + micro_batch]) for i in range(0, len(idx), micro_batch)]
