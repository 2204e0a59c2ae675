"""QK-Clip (Kimi K2's MuonClip): after an optimizer step, every attention head whose max
pre-softmax logit S exceeded τ has its query and key rows scaled by sqrt(τ/S), so that logit
falls back to τ. V4 does not use it (it normalises queries and keys instead); it is here for
comparisons. It rescales the model's weights in place, so it runs with ZeRO stage 0, where those
weights are the optimizer's own."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.layers import Attention


def attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def track_max_logits(model: nn.Module, on: bool = True) -> None:
    for attn in attention_modules(model):
        attn.track_max_logits = on
        attn.max_logits = None


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float) -> int:
    """Apply QK-Clip to every attention layer; returns how many heads were clipped."""
    clipped = 0
    for attn in attention_modules(model):
        if attn.max_logits is None:
            continue
        s = attn.max_logits.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(s, op=dist.ReduceOp.MAX)  # every rank must rescale identically
        eta = (tau / s.clamp(min=1e-12)).clamp(max=1.0)
        if bool((eta < 1).any()):
            w = attn.qkv.weight.view(3, attn.n_heads, attn.head_dim, -1)
            factor = eta.sqrt().to(w.dtype)[:, None, None]
            w[0].mul_(factor)
            w[1].mul_(factor)
            clipped += int((eta < 1).sum())
    return clipped
