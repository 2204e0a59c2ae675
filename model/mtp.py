"""Multi-token prediction, depth 1 (V4 / V3): position t combines the trunk's final hidden state
with the embedding of token t+1, runs one more block, and predicts token t+2 through the shared
embedding and output head. Its loss is weighted (0.3, then 0.1 once the learning rate decays)
and logged apart from the next-token loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MTP(nn.Module):
    def __init__(self, d_model: int, block: nn.Module, eps: float):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(d_model, eps=eps)
        self.embed_norm = nn.RMSNorm(d_model, eps=eps)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(d_model, eps=eps)

    def forward(self, hidden: torch.Tensor, next_embedding: torch.Tensor, next_ids: torch.Tensor, cos, sin):
        """hidden [B, T', D] at positions 0..T'-1, the embeddings (and ids) of tokens 1..T'."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embed_norm(next_embedding)), dim=-1))
        return self.norm(self.block(x, cos, sin, next_ids))


def mtp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T-1, V] at positions 0..T-2 against tokens 2..T (targets[:, 1:])."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, 1:].reshape(-1))
