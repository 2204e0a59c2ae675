"""Sinkhorn–Knopp projection of n×n logits onto doubly stochastic matrices, batched over tokens.

Row-softmax makes the matrix positive with unit row sums; then `iters` rounds of column and row
normalisation. The eager loop would record ~4·iters tiny autograd nodes per call, which is what
makes naive mHC slow and memory-hungry; here the forward keeps no graph and the backward
recomputes the iterations and applies their hand-written derivatives in reverse. The result is the
exact gradient of the unrolled loop (tested against autograd through it), always in fp32 or wider.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


# Internally the matrix indices lead ([n, n, tokens]): every normalisation is then a sum of n
# contiguous token vectors, several times faster than reducing over a trailing dimension of 4.
ROW, COL = 1, 0  # p[i, j, :]: row i, column j


def _forward(z: torch.Tensor, iters: int, eps: float, keep: bool):
    p = torch.softmax(z, dim=ROW)
    saved = [p] if keep else None
    for _ in range(iters):
        c = p.sum(dim=COL, keepdim=True) + eps
        q = p / c
        r = q.sum(dim=ROW, keepdim=True) + eps
        p = q / r
        if keep:
            saved += [c, q, r, p]
    return p, saved


def sinkhorn_reference(z: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """The plain loop, differentiated by autograd: the definition the fast version must match."""
    return _to_tokens_last(_forward(_to_matrix_first(z), iters, eps, keep=False)[0], z.shape)


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
            for t in range(ctx.iters, 0, -1):
                c, q, r, p = saved[4 * t - 3 : 4 * t + 1]
                # y = x / (Σx + eps) along a dim  ⇒  ∂L/∂x = (∂L/∂y − Σ(∂L/∂y · y)) / (Σx + eps)
                g = (g - (g * p).sum(dim=ROW, keepdim=True)) / r
                g = (g - (g * q).sum(dim=COL, keepdim=True)) / c
            p0 = saved[0]
            g = p0 * (g - (g * p0).sum(dim=ROW, keepdim=True))  # softmax
        return _to_tokens_last(g, ctx.shape), None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Doubly stochastic [..., n, n] from logits, computed in fp32 whatever the input dtype."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return _Sinkhorn.apply(z, iters, eps)
