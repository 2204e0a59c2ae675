"""Multi-token prediction, depth 1 (V4 / V3): position t combines the trunk's final state with the
embedding of token t+1, runs one more block, and predicts token t+2 through the shared embedding
and output head. Its loss is weighted (0.3, then 0.1 once the learning rate decays) and logged
apart from the next-token loss.

With hyper-connections the combination happens on the n-stream state, before the trunk's head
reduction (V4; torchtitan's deepseek_v4 `mtp.py`): every stream becomes
`h_proj(norm(stream)) + e_proj(norm(emb(t+1)))`, a full block with its own hyper-connections runs
on the streams, then the MTP's own head reduction and norm. With one stream this is V3's
`eh_proj(concat(norm(emb), norm(h)))` written as two projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import RMSNorm


class MTP(nn.Module):
    def __init__(self, d_model: int, block: nn.Module, reduce: nn.Module | None, eps: float):
        super().__init__()
        self.hidden_norm = RMSNorm(d_model, eps=eps)
        self.embed_norm = RMSNorm(d_model, eps=eps)
        self.h_proj = nn.Linear(d_model, d_model, bias=False)
        self.e_proj = nn.Linear(d_model, d_model, bias=False)
        self.block = block
        self.reduce = reduce  # the streams' weighted sum (model/mhc.py StreamReduce); None: one stream
        self.norm = RMSNorm(d_model, eps=eps)

    def forward(self, hidden: torch.Tensor, next_embedding: torch.Tensor, next_ids: torch.Tensor, cos, sin):
        """hidden: the trunk's state at positions 0..T-1 ([B, T, n, D] streams, or [B, T, D]);
        the embeddings [B, T, D] (and ids) of tokens 1..T. Returns [B, T, D], before the head."""
        e = self.e_proj(self.embed_norm(next_embedding))
        x = self.h_proj(self.hidden_norm(hidden)) + (e.unsqueeze(-2) if hidden.dim() == 4 else e)
        x = self.block(x, cos, sin, next_ids)
        if self.reduce is not None:
            x = self.reduce(x)
        return self.norm(x)


def mtp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] at positions 0..T-1 against tokens 2..T (targets[:, 1:]); the last
    position's token after next is outside the window: it has no loss (ignored, rather than sliced
    off, which would copy the logits)."""
    after_next = F.pad(targets[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().flatten(0, 1), after_next.reshape(-1), ignore_index=-100)
