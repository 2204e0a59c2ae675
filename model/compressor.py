"""KV compression for V4 attention: each block of `ratio` tokens becomes one entry.

An entry is a per-channel softmax-gated average of its tokens' projections, the gate logits
carrying a learned bias for each position inside the block. CSA's entries overlap, each pooling
its own block and the one before (2·ratio tokens), as V4 does it: the value and gate projections
(and the position bias) are 2·dim wide; entry i pools block i−1 through the first dim channels and
block i through the second dim channels (entry 0 has no previous block). The entry is
RMS-normalised and rotated to the position of its block's first token. Query t may use entry i
only once every token it pools is at or before t: `i < floor((t + 1) / ratio)` (`visible_entries`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import RMSNorm, apply_rope


def visible_entries(seq_len: int, ratio: int, device=None, start: int = 0) -> torch.Tensor:
    """[T - start, N] bool: query t (from `start` on) may attend to compressed entry i, N = T // ratio."""
    t = torch.arange(start, seq_len, device=device)
    i = torch.arange(seq_len // ratio, device=device)
    return i[None, :] < ((t + 1) // ratio)[:, None]


def rope_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """RoPE on the last `rope_dim` channels of x [..., T, D] (cos/sin: [T, rope_dim/2]), or of
    query-major x [..., T, H, D] (cos/sin: [T, 1, rope_dim/2])."""
    if rope_dim == 0:
        return x
    still = x.size(-1) - rope_dim
    if still % 2:  # the rotated pairs do not line up with x's own pairs
        return torch.cat((x[..., :-rope_dim], apply_rope(x[..., -rope_dim:], cos, sin)), dim=-1)
    # the other channels' pairs rotated by angle 0 (cos 1, sin 0: exactly themselves while finite;
    # an inf would make its pair partner NaN): one pass each way, where rotating a slice and
    # concatenating zero-fills x's width twice in backward
    return apply_rope(x, F.pad(cos, (still // 2, 0), value=1.0), F.pad(sin, (still // 2, 0)))


class Compressor(nn.Module):
    def __init__(self, d_model: int, dim: int, ratio: int, overlap: bool, rope_dim: int, eps: float):
        super().__init__()
        self.ratio, self.overlap, self.rope_dim, self.dim = ratio, overlap, rope_dim, dim
        width = 2 * dim if overlap else dim  # overlap: [previous block's channels | own block's channels]
        self.proj = nn.Linear(d_model, width, bias=False)
        self.gate = nn.Linear(d_model, width, bias=False)
        self.pos_bias = nn.Parameter(torch.zeros(ratio, width))
        self.pos_bias.optim_role = "scalar"  # a bias, whatever its shape
        self.norm = RMSNorm(dim, eps=eps)

    def pooled_positions(self, n_entries: int) -> torch.Tensor:
        """[N, width] token position each gate slot of each entry reads (negative: none)."""
        width = (2 if self.overlap else 1) * self.ratio
        start = torch.arange(n_entries)[:, None] * self.ratio - (self.ratio if self.overlap else 0)
        return start + torch.arange(width)[None, :]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] → entries [B, T // ratio, dim] (only complete blocks)."""
        b, t, _ = x.shape
        n = t // self.ratio
        x = x[:, : n * self.ratio]
        value = self.proj(x).unflatten(1, (n, self.ratio))
        logit = self.gate(x).unflatten(1, (n, self.ratio)) + self.pos_bias
        if self.overlap:  # slots 0..m-1: the previous block's first half; m..2m-1: this block's second half
            d = self.dim
            prev_value = F.pad(value[..., :d], (0, 0, 0, 0, 1, 0))[:, :n]
            prev_logit = F.pad(logit[..., :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))[:, :n]
            value = torch.cat((prev_value, value[..., d:]), dim=2)
            logit = torch.cat((prev_logit, logit[..., d:]), dim=2)
        weight = torch.softmax(logit.to(torch.promote_types(logit.dtype, torch.float32)), dim=2).type_as(value)
        entries = self.norm((weight * value).sum(dim=2))
        if not self.rope_dim:
            return entries
        first = torch.arange(n, device=x.device) * self.ratio  # each block's first position
        return rope_last(entries, cos[first], sin[first], self.rope_dim)
