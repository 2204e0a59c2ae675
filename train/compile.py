"""trainer.compile: every block of the model (the MTP block included) runs through torch.compile.

Blocks are compiled in place (`nn.Module.compile`), so parameter names, state dicts and
checkpoints are the same as an eager run's, and DeepSpeed, activation checkpointing (which calls
the block) and resume see the same modules. Identical blocks share one compiled graph: the
compiler inlines built-in modules and takes their parameters as graph inputs.

Compilation happens in the first steps (and once more at the first evaluation, in eval mode):
`compile_seconds` reads how long it took, so the trainer can log it and keep it out of tokens/s.
"""
from __future__ import annotations

import contextlib

from torch import nn

from model.block import Block

# torch's own record of compilation time, per phase: the forward frames (tracing, AOT autograd,
# Inductor) and the backward graphs, which are compiled at their first backward. Disjoint.
_PHASES = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile every Block of `model` in place; returns them. The fused CPU
    kernels are loaded already (the trainer's cpu_kernels.load_for), outside any traced frame."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return blocks


@contextlib.contextmanager
def eager(blocks: list[nn.Module]):
    """Run compiled blocks eagerly inside (probe passes: their hooks and recorded coefficients
    would otherwise make the compiler trace another graph of each block)."""
    saved = [b._compiled_call_impl for b in blocks]
    for b in blocks:
        b._compiled_call_impl = None
    try:
        yield
    finally:
        for b, impl in zip(blocks, saved):
            b._compiled_call_impl = impl


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(k, ())) for k in _PHASES)


def frames_compiled() -> int:
    """Frames the compiler has translated so far (grows by one with every compile or recompile)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())

