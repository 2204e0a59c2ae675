"""The lightning indexer of CSA: which compressed entries each query attends to.

    I(t, s) = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s)

with several small index heads q_{t,h} (from the query's low-rank latent), one shared key k_s
per compressed entry (its own overlapping compressor over the same blocks), and per-token head
weights w_{t,h}, scaled as V4's code does by index_dim^-0.5 · index_heads^-0.5 (this sets the
temperature of the KL's softmax; it cannot change the top-k). The top-k visible entries by I
serve every attention head of the query.

The indexer learns only from its KL objective: its inputs are detached, so the KL never moves the
trunk, and the attention's own probabilities (summed over heads, detached) are its target — over
all visible entries while attention is dense (warm-up), over the selected ones once it is sparse.
"""
from __future__ import annotations

import torch
from torch import nn

from model.compressor import Compressor, rope_last


class Indexer(nn.Module):
    def __init__(self, d_model: int, q_lora: int, n_heads: int, dim: int, ratio: int, eps: float, rope_dim: int = 0):
        super().__init__()
        self.n_heads, self.dim, self.rope_dim = n_heads, dim, rope_dim
        self.q = nn.Linear(q_lora, n_heads * dim, bias=False)
        self.head_weights = nn.Linear(d_model, n_heads, bias=False)
        self.keys = Compressor(d_model, dim, ratio, overlap=True, rope_dim=rope_dim, eps=eps)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos, sin) -> torch.Tensor:
        """Index scores [B, T, N] (before masking). Queries and keys carry RoPE on their last
        rope_dim channels (the attention's tables, highest frequencies), as V3.2's indexer does."""
        x, q_latent = x.detach(), q_latent.detach()
        k = self.keys(x, *self.tables(cos, sin))  # [B, N, dim]
        return self.scores(x, q_latent, k, cos, sin)

    def tables(self, cos, sin):
        return cos[:, : self.rope_dim // 2], sin[:, : self.rope_dim // 2]

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos, sin) -> torch.Tensor:
        """Scores [B, T, N] of the queries of x / q_latent (at the positions of cos/sin) against
        compressed index keys [B, N, dim]."""
        b, t, _ = x.shape
        cos, sin = self.tables(cos, sin)
        q = self.q(q_latent).view(b, t, self.n_heads, self.dim).transpose(1, 2)
        q = rope_last(q, cos, sin, self.rope_dim).transpose(1, 2)
        w = self.head_weights(x) * (self.dim ** -0.5 * self.n_heads ** -0.5)  # [B, T, H]
        return torch.einsum("bth,bthn->btn", w, torch.relu(torch.einsum("bthd,bnd->bthn", q, keys)))


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best visible entries per query: indices [B, T, k'] and whether each pick is a
    visible entry [B, T, k'] (early queries see fewer than k), k' = min(k, N)."""
    k = min(k, scores.size(-1))
    masked = scores.masked_fill(~visible, float("-inf"))
    # Ties (entries whose every index head is ReLU-zero score exactly 0) go to the earlier entry,
    # whatever the number of entries: a decoding cache, which holds only complete ones, then picks
    # what the full sequence picks. topk leaves the order of ties unspecified.
    values, index = masked.sort(dim=-1, descending=True, stable=True)
    return index[..., :k], torch.isfinite(values[..., :k])


def kl_to_attention(index_logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """mean over queries of KL(target ‖ softmax(index_logits)) over the `allowed` entries;
    target [B, T, N'] are attention probabilities (any scale: renormalised here)."""
    has_any = allowed.any(-1)
    wide = torch.promote_types(index_logits.dtype, torch.float32)
    # queries with nothing allowed (the first few) softmax over everything and are weighted 0
    log_p = torch.log_softmax(index_logits.to(wide).masked_fill(~allowed & has_any[..., None], float("-inf")), -1)
    log_p = log_p.masked_fill(~allowed, 0.0)  # no inf·0 anywhere, forward or backward
    target = target.detach().to(wide) * allowed
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-20)
    per_query = (target * (target.clamp_min(1e-20).log() - log_p)).sum(-1)
    return (per_query * has_any).sum() / has_any.sum().clamp_min(1)
