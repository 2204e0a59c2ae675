"""Batch geometry: how `trainer.global_batch_size` sequences per optimizer step split over ranks
and micro-batches. One function decides the micro-batch, so a launch, a rank and a resume at
another world size all agree on it."""
from __future__ import annotations

from common.errors import ConfigError

AUTO = "auto"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def micro_batch_size(t, world_size: int) -> int:
    """Sequences per rank per forward pass for trainer config `t` at `world_size` ranks.

    An integer is taken as given; `auto` is the largest divisor of global_batch_size / world_size
    that is at most `t.max_micro_batch_size` (the memory cap), so the global batch, and with it the
    trajectory, is the same at every world size that divides it. Raises ConfigError, naming the
    values that work, when the global batch cannot be split."""
    g, mb = t.global_batch_size, t.micro_batch_size
    if isinstance(mb, str) and mb != AUTO or isinstance(mb, bool) or isinstance(mb, int) and mb <= 0:
        raise ConfigError("trainer.micro_batch_size", mb, "auto, or a positive integer")
    if t.max_micro_batch_size <= 0:
        raise ConfigError("trainer.max_micro_batch_size", t.max_micro_batch_size, "a positive integer")
    if g <= 0:
        raise ConfigError("trainer.global_batch_size", g, "a positive integer")
    if g % world_size:
        multiples = ", ".join(str(world_size * k) for k in range(max(1, g // world_size), g // world_size + 3))
        raise ConfigError("trainer.global_batch_size", g, f"a multiple of the {world_size} rank(s), e.g. {multiples}",
                          "every rank takes the same number of sequences per step")
    per_rank = g // world_size
    if mb == AUTO:
        return max(d for d in _divisors(per_rank) if d <= t.max_micro_batch_size)
    if per_rank % mb:
        per_step = mb * world_size
        fits = ", ".join(str(d) for d in _divisors(per_rank))
        raise ConfigError(
            "trainer.global_batch_size", g,
            f"a multiple of {per_step}, e.g. {per_step * max(1, round(g / per_step))}; or keep it and set "
            f"trainer.micro_batch_size to one of {fits} (or auto)",
            f"it must split into micro-batches of trainer.micro_batch_size={mb} on each of {world_size} rank(s)")
    return mb


def accumulation_steps(t, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step."""
    return t.global_batch_size // (micro_batch_size(t, world_size) * world_size)
