"""Dynamic hyper-connections (Zhu et al., arXiv 2409.19606, §2.2 and Algorithm 2), written from the
paper's equations in float64, one token at a time. Independent of model/mhc.py (nothing imported).

Per token, with the n×d stream matrix H and H̄ = norm(H) (each stream on its own; here an RMS norm
without weight, the project's documented choice in place of the paper's LayerNorm):

    B(H)   = s_β ∘ tanh(H̄ W_β)ᵀ + B                 1×n    (write: the branch output into each stream)
    A_m(H) = s_α ∘ tanh(H̄ W_m)  + A_m               n×1    (read: the branch input)
    A_r(H) = s_α ∘ tanh(H̄ W_r)  + A_r               n×n    (mix: rows input streams, columns output)
    h₀ = A_mᵀ H,   Ĥ = Bᵀ T(h₀) + A_rᵀ H

One s_α for A_m and A_r (they come from one width-connection matrix), another s_β for B.
"""
from __future__ import annotations

import torch


def dynamic_hyper_connection(h: torch.Tensor, w_m: torch.Tensor, w_beta: torch.Tensor, w_r: torch.Tensor,
                             s_alpha: torch.Tensor, s_beta: torch.Tensor, a_m: torch.Tensor, b: torch.Tensor,
                             a_r: torch.Tensor, branch, eps: float) -> dict[str, torch.Tensor]:
    """h [tokens, n, d]; w_m, w_beta [d]; w_r [d, n]; a_m, b [n]; a_r [n, n] (input × output).
    Returns Ĥ [tokens, n, d] and the per-token A_m, B, A_r."""
    out = {"A_m": [], "B": [], "A_r": [], "h0": []}
    for t in range(h.shape[0]):
        H = h[t]
        Hn = H / torch.sqrt((H * H).mean(dim=1, keepdim=True) + eps)
        A_m = s_alpha * torch.tanh(Hn @ w_m) + a_m
        B = s_beta * torch.tanh(Hn @ w_beta) + b
        A_r = s_alpha * torch.tanh(Hn @ w_r) + a_r
        for k, v in zip(out, (A_m, B, A_r, A_m @ H)):
            out[k].append(v)
    out = {k: torch.stack(v) for k, v in out.items()}
    y = branch(out["h0"])
    out["out"] = out["B"].unsqueeze(-1) * y.unsqueeze(-2) + out["A_r"].transpose(-1, -2) @ h
    return out
