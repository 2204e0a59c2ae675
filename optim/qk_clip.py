"""QK-Clip (Kimi K2's MuonClip): after an optimizer step, every attention head whose max
pre-softmax logit S over that step exceeded τ has its query and key rows scaled by sqrt(τ/S), so
that logit falls back to τ. V4 does not use it (it normalises queries and keys instead); it is here
for comparisons. It rescales the model's weights in place, so it runs with ZeRO stage 0, where
those weights are the optimizer's own.

S is the batch maximum, as in Kimi K2: over every micro-batch of the step (each training forward
folds its per-head maxima into `attn.step_max_logits`) and over every rank (one all-reduce max).
Forwards in eval mode (evaluation, the stability probes) do not count: the step did not train on
them."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.layers import Attention


def attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def _fold_step_max(attn: Attention, inputs, output) -> None:
    if attn.training and attn.track_max_logits and attn.max_logits is not None:
        s = attn.max_logits
        attn.step_max_logits = s.clone() if attn.step_max_logits is None else torch.maximum(attn.step_max_logits, s)


def track_max_logits(model: nn.Module, on: bool = True) -> None:
    """Start (or stop) collecting each head's max logit over the training forwards until the next
    `qk_clip`."""
    for attn in attention_modules(model):
        attn.track_max_logits = on
        attn.max_logits = attn.step_max_logits = None
        hook = getattr(attn, "_qk_clip_hook", None)
        if hook is not None:
            hook.remove()
        attn._qk_clip_hook = attn.register_forward_hook(_fold_step_max) if on else None


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float) -> int:
    """Apply QK-Clip to every attention layer with the maxima collected since the last call (then
    start collecting afresh); returns how many heads were clipped. Every rank must call it."""
    layers = [a for a in attention_modules(model) if getattr(a, "step_max_logits", None) is not None]
    if not layers:
        return 0
    s = torch.cat([a.step_max_logits for a in layers])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(s, op=dist.ReduceOp.MAX)  # one collective for all layers; ranks rescale identically
    clipped = 0
    for attn, s_layer in zip(layers, s.split([a.n_heads for a in layers])):
        attn.step_max_logits = None
        eta = (tau / s_layer.clamp(min=1e-12)).clamp(max=1.0)
        if bool((eta < 1).any()):
            w = attn.qkv.weight.view(3, attn.n_heads, attn.head_dim, -1)
            factor = eta.sqrt().to(w.dtype)[:, None, None]
            w[0].mul_(factor)
            w[1].mul_(factor)
            clipped += int((eta < 1).sum())
    return clipped
