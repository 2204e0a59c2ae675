"""DeepSeek-V4's Sinkhorn–Knopp and one mHC sublayer, written from V4's published code, in float64,
one token at a time.

Independent of model/sinkhorn.py, model/mhc.py and the C++ kernels (nothing imported from them):
no token batching, no layout changes, no hand-written derivatives; autograd differentiates it.

- Sinkhorn (V4 inference code; transformers' `DeepseekV4HyperConnection`): P = softmax of each row
  of the logits, plus eps; divide each column by (its sum + eps); then `iters − 1` times: each row
  by (its sum + eps), then each column by (its sum + eps).
- mHC sublayer, per token with state X [n, C]: v = vec(X), m = φ·v / sqrt(mean(v²) + eps_norm);
  pre = sigmoid(α₀·m[:n] + b_pre) + hc_eps; post = 2·sigmoid(α₁·m[n:2n] + b_post);
  comb = Sinkhorn(α₂·m[2n:] as n×n row-major + b_res) (rows: input streams, columns: output
  streams); x_in = Σᵢ preᵢ·Xᵢ; y = F(x_in); X'ₖ = postₖ·y + Σⱼ comb[j, k]·Xⱼ.
"""
from __future__ import annotations

from fractions import Fraction as F

import torch

# Worked by hand (eps = 0 unless given): (logits as softmax weights per row, iters, eps, comb).
# 2×2, weights [[1, 3], [1, 1]]: rows [1/4, 3/4], [1/2, 1/2]; columns sum to 3/4 and 5/4 → one
# normalisation gives [[1/3, 3/5], [2/3, 2/5]]; rows then sum to 14/15 and 16/15 → [[5/14, 9/14],
# [5/8, 3/8]]; columns 55/56 and 57/56 → [[4/11, 12/19], [7/11, 7/19]].
# With eps = 1/4: rows + eps = [[1/2, 1], [3/4, 3/4]]; columns + eps sum to 3/2 and 2.
# 3×3, weights [[1, 2, 1], [1, 1, 2], [4, 1, 1]]: rows /4, /4, /6; columns sum to 7/6, 11/12, 11/12.
HAND_CASES = [
    ([[1, 3], [1, 1]], 1, 0, [[F(1, 3), F(3, 5)], [F(2, 3), F(2, 5)]]),
    ([[1, 3], [1, 1]], 2, 0, [[F(4, 11), F(12, 19)], [F(7, 11), F(7, 19)]]),
    ([[1, 3], [1, 1]], 1, F(1, 4), [[F(1, 3), F(1, 2)], [F(1, 2), F(3, 8)]]),
    ([[1, 1], [1, 1]], 1, F(1, 4), [[F(3, 7), F(3, 7)], [F(3, 7), F(3, 7)]]),
    ([[1, 2, 1], [1, 1, 2], [4, 1, 1]], 1, 0,
     [[F(3, 14), F(6, 11), F(3, 11)], [F(3, 14), F(3, 11), F(6, 11)], [F(4, 7), F(2, 11), F(2, 11)]]),
]


def hand_case(i: int, dtype=torch.float64) -> tuple[torch.Tensor, int, float, torch.Tensor]:
    """HAND_CASES[i] as tensors: logits (log of the weights), iters, eps, the expected comb."""
    weights, iters, eps, comb = HAND_CASES[i]
    return (torch.tensor(weights, dtype=dtype).log(), iters, float(eps),
            torch.tensor([[float(v) for v in row] for row in comb], dtype=dtype))


def sinkhorn(z: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """One n×n matrix of logits → V4's doubly stochastic comb."""
    assert z.dim() == 2 and z.shape[0] == z.shape[1]
    n = z.shape[0]
    p = torch.stack([torch.exp(z[i] - z[i].max()) / torch.exp(z[i] - z[i].max()).sum() for i in range(n)]) + eps

    def columns(p):
        return torch.stack([p[:, j] / (p[:, j].sum() + eps) for j in range(n)], dim=1)

    def rows(p):
        return torch.stack([p[i] / (p[i].sum() + eps) for i in range(n)])

    p = columns(p)
    for _ in range(iters - 1):
        p = columns(rows(p))
    return p


def mhc_sublayer(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
                 b_post: torch.Tensor, b_res: torch.Tensor, sublayer, iters: int, eps_norm: float,
                 hc_eps: float) -> dict[str, torch.Tensor]:
    """x [tokens, n, C] → X' [tokens, n, C] and the coefficients pre, post, comb, x_in per token."""
    tokens, n, c = x.shape
    out = {"pre": [], "post": [], "comb": [], "x_in": []}
    for t in range(tokens):
        v = x[t].reshape(n * c)
        m = (phi @ v) / torch.sqrt((v * v).mean() + eps_norm)
        pre = torch.sigmoid(alpha[0] * m[:n] + b_pre) + hc_eps
        post = 2 * torch.sigmoid(alpha[1] * m[n : 2 * n] + b_post)
        comb = sinkhorn(alpha[2] * m[2 * n :].reshape(n, n) + b_res, iters, hc_eps)
        x_in = sum(pre[i] * x[t, i] for i in range(n))
        for k, val in zip(out, (pre, post, comb, x_in)):
            out[k].append(val)
    out = {k: torch.stack(v) for k, v in out.items()}
    y = sublayer(out["x_in"])
    out["out"] = torch.stack([
        torch.stack([out["post"][t, k] * y[t] + sum(out["comb"][t, j, k] * x[t, j] for j in range(n)) for k in range(n)])
        for t in range(tokens)])
    return out


def stream_reduce(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, eps_norm: float,
                  hc_eps: float) -> torch.Tensor:
    """V4's head reduction: Σᵢ wᵢ·Xᵢ, w = sigmoid(α·φ·v / rms(v) + bias) + hc_eps, per token of x [tokens, n, C]."""
    tokens, n, c = x.shape
    rows = []
    for t in range(tokens):
        v = x[t].reshape(n * c)
        w = torch.sigmoid(alpha[0] * (phi @ v) / torch.sqrt((v * v).mean() + eps_norm) + bias) + hc_eps
        rows.append(sum(w[i] * x[t, i] for i in range(n)))
    return torch.stack(rows)
