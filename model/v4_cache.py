"""Decoding cache of V4 attention (model/attention.py): what a new query needs from the past.

- the raw window: rotated keys/values of the last `window − 1` tokens;
- the compressed entries made so far (and, for CSA, the indexer's compressed keys);
- the block being compressed: the layer inputs since the start of the newest incomplete block —
  for CSA's overlapping entries also the complete block before it, which the next entry pools
  too. When new tokens complete a block, its entry is made by the layer's own compressor from
  exactly those inputs, at the block's position, so it equals the entry of the full sequence.

`attend_cached` computes new queries against that state in one softmax over the window, the
visible (CSA: top-k selected) entries and the sink — the function `V4Attention._attend` computes
for a whole sequence, without its chunking. Prefill is the same call on an empty cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.compressor import rope_last
from model.gathered import gather_rows
from model.indexer import select_topk


@dataclass
class V4Cache:
    length: int = 0  # tokens seen
    kv: torch.Tensor | None = None  # [B, ≤ window−1, hd] rotated keys/values of the newest tokens
    pending: torch.Tensor | None = None  # [B, P, d_model] inputs from position `pending_start` on
    pending_start: int = 0
    entries: torch.Tensor | None = None  # [B, N, hd]
    index_keys: torch.Tensor | None = None  # [B, N, index_dim] (CSA)


def _compress(attn, inputs: torch.Tensor, start: int, have: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entries (and CSA index keys) of the blocks completed in inputs [B, P, d] (which start at
    position `start`, a block boundary) beyond the first `have` entries of the sequence."""
    m = attn.ratio
    cos, sin = attn.rope_cos[start:start + inputs.size(1)], attn.rope_sin[start:start + inputs.size(1)]
    first = start // m  # the sequence's index of the first block in inputs
    entries = attn.compressor(inputs, cos, sin)[:, have - first:]
    keys = None
    if attn.indexer is not None:
        keys = attn.indexer.keys(inputs, *attn.indexer.tables(cos, sin))[:, have - first:]
    return entries, keys


def attend_cached(attn, x: torch.Tensor, cache: V4Cache) -> torch.Tensor:
    """attn(x) for x [B, T, d_model] at positions cache.length..+T-1, after the cached tokens;
    the cache takes in x."""
    b, t, _ = x.shape
    p, w, m = cache.length, attn.window, attn.ratio
    if p + t > attn.rope_cos.size(0):
        raise ValueError(f"positions up to {p + t} exceed the model's context of {attn.rope_cos.size(0)}")
    cos, sin = attn.rope_cos[p:p + t], attn.rope_sin[p:p + t]
    q_latent, q, kv = attn.project(x, cos, sin)
    q = q.transpose(1, 2)  # [B, H, T, hd]: a few new tokens, so head-major and einsums for clarity
    keys = kv if cache.kv is None else torch.cat((cache.kv, kv), dim=1)
    q_pos = torch.arange(p, p + t, device=x.device)
    k_pos = torch.arange(p + t - keys.size(1), p + t, device=x.device)
    entries = index = None
    if attn.compressor is not None:
        pending = x if cache.pending is None else torch.cat((cache.pending, x), dim=1)
        have = 0 if cache.entries is None else cache.entries.size(1)
        entries, index_keys = cache.entries, cache.index_keys
        if (p + t) // m > have:  # new tokens complete blocks: compress them
            new, new_keys = _compress(attn, pending, cache.pending_start, have)
            entries = new if entries is None else torch.cat((entries, new), dim=1)
            if new_keys is not None:
                index_keys = new_keys if index_keys is None else torch.cat((index_keys, new_keys), dim=1)
        if entries is None:  # no block complete yet
            entries = x.new_zeros(b, 0, attn.head_dim)
            if attn.indexer is not None:
                index_keys = x.new_zeros(b, 0, attn.indexer.dim)
        if attn.indexer is not None and attn.sparse:
            index = attn.indexer.queries(x, q_latent, index_keys, cos, sin)
        # keep the inputs of the newest incomplete block (and for CSA the complete one before it)
        keep_from = max(0, ((p + t) // m - (1 if attn.compressor.overlap else 0)) * m)
        cache.pending = pending[:, keep_from - cache.pending_start:]
        cache.pending_start, cache.entries, cache.index_keys = keep_from, entries, index_keys
    cache.kv = keys[:, max(0, keys.size(1) - (w - 1)):]
    cache.length = p + t

    wide = torch.promote_types(q.dtype, torch.float32)
    index = None if index is None else index.to(wide)  # under CUDA's autocast: bf16 queries, fp32 keys
    with torch.autocast(x.device.type, enabled=False):
        q = q.to(wide) * attn.head_dim ** -0.5
        keys = keys.to(wide)
        window = (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < w)  # [T, K]
        parts = [torch.einsum("bhtd,bkd->bhtk", q, keys).masked_fill(~window, float("-inf"))]
        if entries is not None:
            entries = entries.to(wide)
            visible = torch.arange(entries.size(1), device=x.device)[None, :] < ((q_pos + 1) // m)[:, None]  # [T, N]
            if index is not None:
                selected, chosen = select_topk(index, (q_pos + 1) // m, attn.topk)  # [B, T, k]
                entries = gather_rows(entries, selected)  # [B, T, k, hd]
                parts.append(torch.einsum("bhtd,btkd->bhtk", q, entries).masked_fill(~chosen[:, None], float("-inf")))
            else:
                parts.append(torch.einsum("bhtd,bnd->bhtn", q, entries).masked_fill(~visible, float("-inf")))
        parts.append(attn.sink.view(1, -1, 1, 1).expand(b, -1, t, 1).to(wide))
        probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
        out = torch.einsum("bhtk,bkd->bhtd", probs[..., :keys.size(1)], keys)
        if entries is not None:
            p_comp = probs[..., keys.size(1):-1]
            out = out + (torch.einsum("bhtk,btkd->bhtd", p_comp, entries) if index is not None
                         else torch.einsum("bhtn,bnd->bhtd", p_comp, entries))
        out = rope_last(out, cos, -sin, attn.rope_dim)  # inverse RoPE at the query's position
    return attn.project_out(out.transpose(1, 2), x.dtype)
