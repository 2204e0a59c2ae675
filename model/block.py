"""One decoder layer: attention and feed-forward sublayers joined by the residual stream.

`residual="residual"` is the plain pre-norm block, x + F(norm(x)). Hyper-connection variants
(`hc`, `mhc`) replace how the sublayers read from and write to the stream, not the sublayers.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers import Attention, SwiGLU


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, norm_eps: float, dropout: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = SwiGLU(d_model, ffn_hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.ffn(self.ffn_norm(x)))
