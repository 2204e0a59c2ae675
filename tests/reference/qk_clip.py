"""QK-Clip (Kimi K2's MuonClip) written from the formulas, in float64, with no imports from
model/ or optim/.

For attention head h with per-head queries q_h = W_q,h x and keys k_h = W_k,h x (after rotary
position embedding), the step's max logit is

    S_h = max over every sequence the optimizer step trained on (all micro-batches, all ranks)
          and every causal pair (i ≥ j) of  q_h,i · k_h,j / sqrt(head_dim).

After the step, each head with S_h > τ has W_q,h and W_k,h multiplied by sqrt(τ / S_h), so that
its logit on the same input becomes exactly τ; other heads are left alone.
"""
from __future__ import annotations

import math

import torch


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [..., T, D]: channel pair (2i, 2i+1) at position t rotated by the
    angle t · theta^(−2i/D)."""
    t, d = x.shape[-2], x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        freq = theta ** (-2 * i / d)
        for pos in range(t):
            c, s = math.cos(pos * freq), math.sin(pos * freq)
            a, b = x[..., pos, 2 * i], x[..., pos, 2 * i + 1]
            out[..., pos, 2 * i] = a * c - b * s
            out[..., pos, 2 * i + 1] = a * s + b * c
    return out


def max_logits(xs, w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int, theta: float) -> torch.Tensor:
    """S_h over the inputs `xs` (each [B, T, C], the attention layer's input), one value per head."""
    d = w_q.shape[0] // n_heads
    best = torch.full((n_heads,), -math.inf, dtype=torch.float64)
    for x in xs:
        x = x.to(torch.float64)
        for h in range(n_heads):
            q = rope(x @ w_q[h * d:(h + 1) * d].to(torch.float64).T, theta)
            k = rope(x @ w_k[h * d:(h + 1) * d].to(torch.float64).T, theta)
            t = x.shape[1]
            for i in range(t):
                logits = (q[:, i:i + 1, :] * k[:, : i + 1, :]).sum(-1) / math.sqrt(d)  # keys j ≤ i
                best[h] = max(best[h], logits.max().item())
    return best


def clip(w_q: torch.Tensor, w_k: torch.Tensor, s: torch.Tensor, tau: float, n_heads: int):
    """The rescaled (W_q, W_k) and how many heads were clipped."""
    d = w_q.shape[0] // n_heads
    w_q, w_k = w_q.to(torch.float64).clone(), w_k.to(torch.float64).clone()
    clipped = 0
    for h in range(n_heads):
        if s[h] > tau:
            factor = math.sqrt(tau / s[h])
            w_q[h * d:(h + 1) * d] *= factor
            w_k[h * d:(h + 1) * d] *= factor
            clipped += 1
    return w_q, w_k, clipped
