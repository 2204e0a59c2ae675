"""The project's error types. Each maps to one exit status of `launch.py` (train/run.py), so a
module anywhere in the tree raises the right one without importing `train/`."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work: exit status 2, one line naming the key, the value
    and what is accepted (and, where there is one, the closest valid key)."""

    def __init__(self, key: str, value, accepted: str, why: str = ""):
        self.key, self.value = key, value
        reason = f": {why}" if why else ""
        super().__init__(f"invalid configuration {key}={value!r}{reason}. Accepted: {accepted}.")


class DataError(RuntimeError):
    """Missing, unreadable or inconsistent data (exit status 3); the message names the file or setting."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from as asked."""
