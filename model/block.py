"""One decoder layer: attention and feed-forward sublayers joined by the residual stream.

`residual` is the plain pre-norm block, x + F(norm(x)). `hc` and `mhc` carry n streams
[B, T, n, C] and change how each sublayer reads from and writes to them (model/mhc.py), not the
sublayers themselves.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers import Attention, SwiGLU
from model.mhc import HyperConnection


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, norm_eps: float, dropout: float,
                 residual: str = "residual", n_streams: int = 1, layer: int = 0, sinkhorn_iters: int = 20):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = SwiGLU(d_model, ffn_hidden)
        self.drop = nn.Dropout(dropout)
        self.hyper = residual != "residual"
        if self.hyper:
            self.attn_hc = HyperConnection(residual, n_streams, d_model, 2 * layer, sinkhorn_iters)
            self.ffn_hc = HyperConnection(residual, n_streams, d_model, 2 * layer + 1, sinkhorn_iters)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        def attn(h):
            return self.drop(self.attn(self.attn_norm(h), cos, sin))

        def ffn(h):
            return self.drop(self.ffn(self.ffn_norm(h)))

        if self.hyper:
            return self.ffn_hc(self.attn_hc(x, attn), ffn)
        x = x + attn(x)
        return x + ffn(x)
