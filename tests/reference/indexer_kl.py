"""One CSA attention layer of V4 and its lightning indexer's training signal, from the formulas
(V4 report §2.3, V3.2's DSA recipe, V4-Flash's inference code), in float64, one query at a time.

Per token t (x_t the layer's normalised input), with rms(v) = v / sqrt(mean(v²) + eps) and
RoPE rotating interleaved channel pairs (2i, 2i+1) of the last `rope_dim` channels:

    c_t      = rms(Wq_a x_t) ⊙ g_q                                    query latent
    q_{t,h}  = rope_t(rms((Wq_b c_t)_h))                              per head, no weight (V4)
    kv_t     = rope_t(rms(Wkv x_t) ⊙ g_kv)                            the one key = value
    entry i  = rope_{i·m}(rms(Σ_slots softmax_slots(gate) ⊙ value) ⊙ g)   over 2m slots: block i−1's
               tokens through the first d channels of the 2d-wide projections (and of the position
               bias), block i's through the second d; visible to t once (i+1)·m − 1 ≤ t
    I(t, s)  = Σ_h w_{t,h} · ReLU(qI_{t,h} · kI_s),  w_t = (W_w x_t) · index_dim^-0.5 · index_heads^-0.5
               with qI_{t,h} = rope_t((WqI c_t)_h) and kI the indexer's own entries (same formula)
    allowed  = every visible entry (dense warm-up) or the top-k visible by I (sparse)
    logits_h = [q_{t,h}·kv_j / sqrt(hd) for t−W < j ≤ t] ++ [q_{t,h}·entry_s / sqrt(hd), s allowed] ++ [sink_h]
    target   = Σ_h softmax(logits_h)[entries], renormalised;  KL_t = KL(target ‖ softmax(I(t, allowed)))
    loss     = mean of KL_t over queries with at least one allowed entry

RoPE base: `theta`, with YaRN (`yarn`: factor, original_seq_len, beta_fast, beta_slow) applied to
the frequencies as in the YaRN paper: pairs turning fewer than beta_slow times over the original
length are divided by factor, more than beta_fast kept, a linear ramp between.
"""
from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def inv_freq(dim: int, theta: float, yarn: dict | None) -> torch.Tensor:
    freq = torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    if yarn is None:
        return freq
    orig = yarn["original_seq_len"]
    pair = lambda rotations: dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = max(math.floor(pair(yarn["beta_fast"])), 0), min(math.ceil(pair(yarn["beta_slow"])), dim - 1)
    out = []
    for i in range(dim // 2):
        ramp = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)  # 0: keep, 1: interpolate
        out.append(float(freq[i]) * ((1 - ramp) + ramp / yarn["factor"]))
    return torch.tensor(out, dtype=torch.float64)


def rope(v: torch.Tensor, pos: int, freq: torch.Tensor, rope_dim: int) -> torch.Tensor:
    out = v.clone()
    for i in range(rope_dim // 2):
        a, b = v[-rope_dim + 2 * i], v[-rope_dim + 2 * i + 1]
        c, s = math.cos(pos * float(freq[i])), math.sin(pos * float(freq[i]))
        out[-rope_dim + 2 * i], out[-rope_dim + 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def compress(x: torch.Tensor, wkv, wgate, ape, g, m: int, eps: float, freq, rope_dim: int) -> list[torch.Tensor]:
    """Overlapping entries of one sequence x [T, D]."""
    d = g.numel()
    value, gate = x @ wkv.T, x @ wgate.T  # [T, 2d]
    entries = []
    for i in range(x.shape[0] // m):
        slots_v, slots_g = [], []
        for j in range(m):
            if i > 0:
                p = (i - 1) * m + j
                slots_v.append(value[p, :d])
                slots_g.append(gate[p, :d] + ape[j, :d])
            p = i * m + j
            slots_v.append(value[p, d:])
            slots_g.append(gate[p, d:] + ape[j, d:])
        weight = torch.softmax(torch.stack(slots_g), dim=0)  # per channel, over the slots
        pooled = (weight * torch.stack(slots_v)).sum(0)
        entries.append(rope(rms(pooled, eps) * g, i * m, freq, rope_dim))
    return entries


def csa_layer(x: torch.Tensor, w: dict, *, heads: int, head_dim: int, rope_dim: int, window: int, ratio: int,
              index_heads: int, index_dim: int, topk: int | None, eps: float, theta: float,
              yarn: dict | None) -> dict:
    """x [B, T, D]; w: `wq_a`, `q_norm`, `wq_b`, `wkv`, `kv_norm`, `sink`, and `comp_` / `idx_`
    `wkv`, `wgate`, `ape`, `norm` (the two compressors), `idx_wq_b`, `idx_weights`. topk None: dense.
    Returns the loss `kl`, the per-head max logit `max_logits` [H], the allowed entries per query
    and `ties`: queries whose k-th and (k+1)-th best scores are equal (their selection is arbitrary)."""
    w = {k: v.detach().double() for k, v in w.items()}
    freq = inv_freq(rope_dim, theta, yarn)
    kls, max_logits, allowed_all, ties = [], torch.full((heads,), -math.inf, dtype=torch.float64), [], 0
    for seq in x.double():
        t_len = seq.shape[0]
        entries = compress(seq, w["comp_wkv"], w["comp_wgate"], w["comp_ape"], w["comp_norm"], ratio, eps, freq, rope_dim)
        # index heads narrower than rope_dim rotate all their channels, with the highest frequencies
        index_rope = min(rope_dim, index_dim)
        keys = compress(seq, w["idx_wkv"], w["idx_wgate"], w["idx_ape"], w["idx_norm"], ratio, eps, freq, index_rope)
        kv = [rope(rms(w["wkv"] @ seq[t], eps) * w["kv_norm"], t, freq, rope_dim) for t in range(t_len)]
        for t in range(t_len):
            c = rms(w["wq_a"] @ seq[t], eps) * w["q_norm"]
            q = [rope(rms(qh, eps), t, freq, rope_dim) for qh in (w["wq_b"] @ c).view(heads, head_dim)]
            iq = [rope(qh, t, freq, index_rope) for qh in (w["idx_wq_b"] @ c).view(index_heads, index_dim)]
            hw = (w["idx_weights"] @ seq[t]) * index_dim ** -0.5 * index_heads ** -0.5
            visible = [s for s in range(len(entries)) if (s + 1) * ratio - 1 <= t]
            score = {s: sum(float(hw[h]) * max(float(iq[h] @ keys[s]), 0.0) for h in range(index_heads)) for s in visible}
            ranked = sorted(visible, key=lambda s: -score[s])
            allowed = visible if topk is None else sorted(ranked[:topk])
            if topk is not None and len(ranked) > topk and score[ranked[topk - 1]] == score[ranked[topk]]:
                ties += 1  # which of the tied entries top-k keeps is arbitrary
            allowed_all.append(allowed)
            keys_t = [kv[j] for j in range(max(0, t - window + 1), t + 1)] + [entries[s] for s in allowed]
            target = torch.zeros(len(allowed), dtype=torch.float64)
            for h in range(heads):
                logits = torch.stack([q[h] @ k / math.sqrt(head_dim) for k in keys_t] + [w["sink"][h]])
                max_logits[h] = max(max_logits[h], logits.max())
                p = torch.softmax(logits, 0)
                target += p[len(keys_t) - len(allowed): len(keys_t)]
            if allowed:
                target = target / target.sum()
                log_index = torch.log_softmax(torch.tensor([score[s] for s in allowed], dtype=torch.float64), 0)
                kls.append(float((target * (torch.log(target.clamp_min(1e-300)) - log_index)).sum()))
    return {"kl": sum(kls) / max(len(kls), 1), "max_logits": max_logits, "allowed": allowed_all, "ties": ties}
