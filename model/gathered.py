"""Products with rows picked by index: sparse CSA's scores and weighted sum over each query's
top-k compressed entries, without a [B, T, K, D] tensor of the gathered entries.

    scores(a, rows, index)[b, t, h, j]  = Σ_d a[b, t, h, d] · rows[b, index[b, t, j], d]
    combine(p, rows, index)[b, t, h, d] = Σ_j p[b, t, h, j] · rows[b, index[b, t, j], d]

On the CPU both are kernels of model/csrc/gathered.cpp (torch.library custom ops with fake
implementations and registered autograd, so compiled graphs keep them as single ops) for float32
and float64 operands; elsewhere (other devices or dtypes, no compiler) the gather-then-matmul
reference below runs.
"""
from __future__ import annotations

import torch

from model import cpu_kernels
from model.layers import refuse_create_graph

Tensor = torch.Tensor
NO_DOUBLE_BACKWARD = "the gathered-row kernels have no double backward (create_graph=True)"


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows [B, N, D] picked by index [B, T, k] → [B, T, k, D]. Indexing the flattened rows keeps
    the backward an index-add into [B·N, D]: gathering from rows expanded to [B, T, N, D] would
    allocate that whole expansion for its gradient."""
    b, n, d = rows.shape
    offset = torch.arange(b, device=index.device).view(b, 1, 1) * n
    # index_select: forward + backward 3.1 ms on CPU at v4_tiny's training shape, against 5.9 ms for
    # an embedding lookup (the same gather forward, a sorting backward) and 7.8 ms for advanced indexing
    return rows.reshape(b * n, d).index_select(0, (index + offset).flatten()).view(*index.shape, d)


def _kernels():
    return cpu_kernels.extension("gathered")


def _use_kernels(index: Tensor, *tensors: Tensor) -> bool:
    """CPU tensors of one dtype, float32 or float64, an int64 index, and kernels that build; a
    compiled graph only uses them once known to build (no build inside a trace: the trainer loads
    them first, cpu_kernels.load_for)."""
    if any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors) or \
            tensors[0].dtype not in (torch.float32, torch.float64) or index.dtype != torch.int64:
        return False
    if torch.compiler.is_compiling():
        return cpu_kernels.known.get("gathered", False)
    return cpu_kernels.available("gathered")


@torch.library.custom_op("v4lab::gathered_scores", mutates_args=())
def scores_op(a: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    return _kernels().gathered_scores(a, rows, index)


@scores_op.register_fake
def _(a, rows, index):
    return a.new_empty(*a.shape[:3], index.size(2))


@torch.library.custom_op("v4lab::gathered_combine", mutates_args=())
def combine_op(p: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    return _kernels().gathered_combine(p, rows, index)


@combine_op.register_fake
def _(p, rows, index):
    return p.new_empty(*p.shape[:3], rows.size(2))


@torch.library.custom_op("v4lab::gathered_scatter", mutates_args=())
def scatter_op(p: Tensor, c: Tensor, index: Tensor, n_rows: int) -> Tensor:
    """Σ over (t, j) picking row n of Σ_h p[b, t, h, j] · c[b, t, h, :]: [B, n_rows, D]."""
    return _kernels().gathered_scatter(p, c, index, n_rows)


@scatter_op.register_fake
def _(p, c, index, n_rows):
    return c.new_empty(c.size(0), n_rows, c.size(3))


def _setup(ctx, inputs, output):
    per_query, rows, index = inputs
    ctx.save_for_backward(per_query, rows, index)


def _scores_backward(ctx, grad):
    refuse_create_graph(NO_DOUBLE_BACKWARD)
    a, rows, index = ctx.saved_tensors
    grad = grad.contiguous()
    da = combine_op(grad, rows, index) if ctx.needs_input_grad[0] else None
    drows = scatter_op(grad, a, index, rows.size(1)) if ctx.needs_input_grad[1] else None
    return da, drows, None


def _combine_backward(ctx, grad):
    refuse_create_graph(NO_DOUBLE_BACKWARD)
    p, rows, index = ctx.saved_tensors
    grad = grad.contiguous()
    dp = scores_op(grad, rows, index) if ctx.needs_input_grad[0] else None
    drows = scatter_op(p, grad, index, rows.size(1)) if ctx.needs_input_grad[1] else None
    return dp, drows, None


scores_op.register_autograd(_scores_backward, setup_context=_setup)
combine_op.register_autograd(_combine_backward, setup_context=_setup)


def scores(a: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """a [B, T, H, D] against the rows each query picked → [B, T, H, K]."""
    if _use_kernels(index, a, rows):
        return scores_op(a.contiguous(), rows.contiguous(), index.contiguous())
    return torch.matmul(a, gather_rows(rows, index).transpose(-1, -2))


def combine(p: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """p [B, T, H, K] weighting the rows each query picked → [B, T, H, D]."""
    if _use_kernels(index, p, rows):
        return combine_op(p.contiguous(), rows.contiguous(), index.contiguous())
    return torch.matmul(p, gather_rows(rows, index))
