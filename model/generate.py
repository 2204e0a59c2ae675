"""Autoregressive sampling from a Transformer: temperature, top-k, top-p; with or without a
decoding cache; with a context that slides once the sequence outgrows the model.

The model sees at most `context` tokens. When the next step would see more, the oldest tokens
are dropped so that the newest `context // 2` remain (`slide`), and a cache is rebuilt from them
in one forward pass. Cached and uncached decoding follow the same rule, so they see the same
tokens at every step and give the same logits and, for the same generator state, the same text.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.8  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [B, V] → temperature-scaled logits with everything outside top-k / top-p at -inf."""
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.size(-1):
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass strictly above each token
        drop = before >= s.top_p  # the most likely token always stays (its mass above is 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, V] → [B]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Step:
    token: torch.Tensor  # [B] the sampled ids
    logits: torch.Tensor  # [B, V] the logits they were sampled from
    slid: bool  # whether the context slid before this step


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling, context: int,
             use_cache: bool = True, generator: torch.Generator | None = None,
             on_slide: Callable[[], None] | None = None) -> Iterator[Step]:
    """Yield `max_new_tokens` steps continuing prompt [B, T0] (T0 ≥ 1; the newest `context`
    tokens are used if it is longer). `use_cache` needs `model.supports_cache`."""
    if use_cache and not model.supports_cache:
        raise ValueError("this model's attention has no decoding cache; sample with use_cache=False")
    context = min(context, model.max_seq_len)
    keep = max(1, context // 2)
    seq = prompt
    start = max(0, seq.size(1) - context)  # the first token the model sees
    cache, slid = None, start > 0
    for _ in range(max_new_tokens):
        if seq.size(1) - start > context:  # one more token would not fit: slide
            start, cache, slid = seq.size(1) - keep, None, True
        if slid and on_slide is not None:
            on_slide()
        if not use_cache:
            logits = model(seq[:, start:])[:, -1]
        elif cache is None:  # (re)fill the cache with everything visible in one pass
            cache = model.new_cache(seq.size(0), context)
            logits = model(seq[:, start:], cache=cache)[:, -1]
        else:
            logits = model(seq[:, -1:], cache=cache)[:, -1]
        token = next_token(logits, sampling, generator)
        seq = torch.cat((seq, token[:, None]), dim=1)
        yield Step(token, logits, slid)
        slid = False
