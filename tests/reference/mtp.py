"""Multi-token prediction (depth 1) with hyper-connection streams, from the formulas (V4;
torchtitan's deepseek_v4 `mtp.py`), in float64, one position at a time.

For t = 0 .. T-2, with X_t the trunk's n-stream state at t (before the trunk's head reduction)
and e = Emb[token t+1]:

    Y_{t,s}  = H · rms(X_{t,s}) ⊙ g_h  +  E · rms(e) ⊙ g_e          for every stream s
    Z        = block(Y)                                             (a full decoder layer on the streams)
    w        = sigmoid(α · (Φ · v / rms(v)) + b) + hc_eps,  v = vec(Z_t)   (head reduction)
    z        = rms(Σ_s w_s Z_{t,s}) ⊙ g
    loss     = mean_t  −log softmax(Head · z)[token t+2]

rms(x) = x / sqrt(mean(x²) + eps). The decoder layer is a given function here: it is the trunk's
own layer, which tests/test_hf_v4.py checks against transformers' DeepseekV4DecoderLayer.
"""
from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def mtp_loss(hidden, tokens, weights: dict, block, eps: float, hc_eps: float) -> float:
    """hidden [T, n, D]: trunk state at positions 0..T-1 (one sequence); tokens [T+1]: the
    input tokens and the last target (token i+1 follows token i). weights: `embed` [V, D],
    `head` [V, D], `enorm`, `hnorm`, `norm` [D], `e_proj`, `h_proj` [D, D], `hc_fn` [n, n·D],
    `hc_base` [n], `hc_scale` [1]. block(streams [1, T-1, n, D], next_ids [1, T-1]) → same shape."""
    w = {k: v.detach().double() for k, v in weights.items()}
    hidden = hidden.double()
    t_len, n, _ = hidden.shape
    rows = []
    for t in range(t_len - 1):
        e = w["embed"][tokens[t + 1]]
        e_part = w["e_proj"] @ (rms(e, eps) * w["enorm"])
        rows.append(torch.stack([w["h_proj"] @ (rms(hidden[t, s], eps) * w["hnorm"]) + e_part for s in range(n)]))
    z_all = block(torch.stack(rows)[None], tokens[1:t_len][None])[0]  # [T-1, n, D]
    total = 0.0
    for t in range(t_len - 1):
        v = z_all[t].reshape(-1)
        m = (w["hc_fn"] @ v) / math.sqrt(float((v * v).mean()) + eps)
        gate = torch.sigmoid(w["hc_scale"] * m + w["hc_base"]) + hc_eps
        z = rms((gate[:, None] * z_all[t]).sum(0), eps) * w["norm"]
        logits = w["head"] @ z
        total += float(torch.logsumexp(logits, 0) - logits[tokens[t + 2]])
    return total / (t_len - 1)
