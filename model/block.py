"""One decoder layer: attention and feed-forward sublayers joined by the residual stream.

`residual` is the plain pre-norm block, x + F(norm(x)). `hc` and `mhc` carry n streams
[B, T, n, C] and change how each sublayer reads from and writes to them (model/mhc.py), not the
sublayers themselves. The sublayers are given: dense or V4 attention, SwiGLU or MoE (which also
reads the token ids, for hash routing).
"""
from __future__ import annotations

import torch
from torch import nn

from model.mhc import HyperConnection
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module, norm_eps: float, dropout: float,
                 residual: str = "residual", n_streams: int = 1, layer: int = 0, sinkhorn_iters: int = 20,
                 fused_hc: bool = True):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn
        self.ffn_reads_ids = isinstance(ffn, MoE)
        self.drop = nn.Dropout(dropout)
        self.hyper = residual != "residual"
        if self.hyper:
            # The coefficients' RMS uses the model's norm eps, as V4's (rms_norm_eps) does.
            self.attn_hc = HyperConnection(residual, n_streams, d_model, 2 * layer, sinkhorn_iters, eps=norm_eps,
                                           fused=fused_hc)
            self.ffn_hc = HyperConnection(residual, n_streams, d_model, 2 * layer + 1, sinkhorn_iters, eps=norm_eps,
                                          fused=fused_hc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ids: torch.Tensor | None = None,
                cache=None):
        """`cache`: the attention's decoding cache (sampling); everything else is per token."""
        def attn(h):
            h = self.attn_norm(h)
            return self.drop(self.attn(h, cos, sin) if cache is None else self.attn(h, cos, sin, cache=cache))

        def ffn(h):
            h = self.ffn_norm(h)
            return self.drop(self.ffn(h, ids) if self.ffn_reads_ids else self.ffn(h))

        if self.hyper:
            return self.ffn_hc(self.attn_hc(x, attn), ffn)
        x = x + attn(x)
        return x + ffn(x)
