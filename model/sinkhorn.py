"""Sinkhorn–Knopp projection of n×n logits onto doubly stochastic matrices, batched over tokens.

Exactly DeepSeek-V4's iteration (its inference code, and transformers' `DeepseekV4HyperConnection`):
softmax along the last dim plus eps, one column normalisation, then `iters − 1` rounds of row and
column normalisation, every denominator `line sum + eps`: 2·iters − 1 normalisations, the last a
column one. The logits are laid out as V4's `comb` [input stream, output stream] (model/mhc.py
transposes the result into its output × input `res`).

The eager loop would record ~2·iters tiny autograd nodes per call, which is what makes naive mHC
slow and memory-hungry; here the forward keeps no graph and the backward recomputes the iterations
and applies their hand-written derivatives in reverse. The result is the exact gradient of the
unrolled loop (gradchecked in float64), always computed in fp32 or wider.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Internally the matrix indices lead ([n, n, tokens]): every normalisation is then a sum of n
# contiguous token vectors, several times faster than reducing over a trailing dimension of 4.
ROW, COL = 1, 0  # p[i, j, :]: row i, column j; a row sum runs over dim 1


def normalisations(iters: int) -> list[int]:
    """The dim each normalisation sums over, in order: V4's one column, then iters − 1 × (row, column)."""
    return [COL] + [ROW, COL] * (iters - 1) if iters > 0 else []


def _forward(z: torch.Tensor, iters: int, eps: float, keep: bool):
    s = torch.softmax(z, dim=ROW)
    p = s + eps
    saved = [s] if keep else None
    for dim in normalisations(iters):
        d = p.sum(dim=dim, keepdim=True) + eps
        p = p / d
        if keep:
            saved += [d, p]
    return p, saved


def _to_matrix_first(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(-1, *z.shape[-2:]).permute(1, 2, 0).contiguous()


def _to_tokens_last(p: torch.Tensor, shape) -> torch.Tensor:
    # contiguous: batched matmuls with strided operands fall back to a per-token loop
    return p.permute(2, 0, 1).reshape(shape).contiguous()


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, iters: int, eps: float):
        zt = _to_matrix_first(z)
        ctx.save_for_backward(zt)
        ctx.iters, ctx.eps, ctx.shape = iters, eps, z.shape
        with torch.no_grad():
            return _to_tokens_last(_forward(zt, iters, eps, keep=False)[0], z.shape)

    @staticmethod
    @once_differentiable  # the hand-written derivatives run without a graph: no double backward
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        with torch.no_grad():
            _, saved = _forward(z, ctx.iters, ctx.eps, keep=True)
            g = _to_matrix_first(grad.to(z.dtype))
            for k, dim in reversed(list(enumerate(normalisations(ctx.iters)))):
                d, p = saved[1 + 2 * k], saved[2 + 2 * k]
                # y = x / (Σx + eps) along a dim  ⇒  ∂L/∂x = (∂L/∂y − Σ(∂L/∂y · y)) / (Σx + eps)
                g = (g - (g * p).sum(dim=dim, keepdim=True)) / d
            s = saved[0]  # softmax; the eps added to it is a constant
            g = s * (g - (g * s).sum(dim=ROW, keepdim=True))
        return _to_tokens_last(g, ctx.shape), None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Doubly stochastic [..., n, n] from logits, computed in fp32 whatever the input dtype."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return _Sinkhorn.apply(z, iters, eps)
