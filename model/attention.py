"""DeepSeek-V4 attention: every query attends, in one softmax, to a sliding window of raw tokens
and to compressed entries of the whole past (REFERENCE.md §3).

- queries: low-rank projection, RMSNorm, up to heads, then each head RMS-normalised again without
  a weight (`q_head_norm`: what bounds V4's logits); one shared key/value head (K = V), RMSNorm;
  RoPE (interleaved pairs) on the last `rope_dim` channels of both; the output is rotated back by
  the query's own position (inverse RoPE), so what a value contributes depends on relative
  position only;
- RoPE base per layer: `window` layers use the model's `rope_theta`; layers with a compressor
  use `compress_rope_theta` with YaRN (`yarn_*`), for their window, entries and indexer alike;
- a learnable sink logit per head joins the softmax denominator;
- output: heads in `out_groups` groups, each projected to rank `out_lora`, then to d_model;
- kinds per layer: `window` (raw window only), `csa` (entries of `csa_ratio` tokens, overlapping,
  the top-k chosen by the lightning indexer; dense over all visible entries during the indexer's
  warm-up), `hca` (entries of `hca_ratio` tokens, dense).

The window is computed in chunks of `window`/2 queries against the `window` keys before each
chunk and the chunk's own, so memory grows as T·window, not T². Past `query_chunk` queries the whole softmax runs a chunk of
queries at a time, recomputed in backward, so that the [T, T/m] scores of dense compressed
attention are never all kept either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import gathered
from model.compressor import Compressor, rope_last, visible_entries
from model.indexer import Indexer, IndexQueries, kl_to_attention_sum, select_topk
from model.layers import RMSNorm, refuse_create_graph, rms_norm, rope_tables

KINDS = ("window", "csa", "hca")


def layer_kinds(n_layers: int, layers: list[str]) -> list[str]:
    """The configured pattern, or V4-Flash's shape scaled down: its 2 window-only layers of 43
    (at least one), then CSA and HCA alternating."""
    if layers:
        return list(layers)
    n_window = max(1, round(2 * n_layers / 43))
    return ["window"] * n_window + [("csa", "hca")[i % 2] for i in range(n_layers - n_window)]


WINDOW_SPLIT = 2


def window_chunk(window: int) -> int:
    """Queries per chunk of the windowed attention: a chunk of c queries scores the w + c keys
    before its end, of which each query sees w, so smaller chunks waste less (c = w: half of the
    2w scores are masked; c = w/2: a third) but multiply in smaller matrices."""
    return window // WINDOW_SPLIT if window % WINDOW_SPLIT == 0 else window


def window_mask(seq_len: int, window: int, device=None, first: int = 0, count: int | None = None,
                chunk: int | None = None) -> torch.Tensor:
    """[C, c, w + c] bool for chunked window attention with chunks of c queries (default c = w):
    query (chunk j, row r) at position j·c + r may see key (chunk j, column i) at position
    j·c − w + i. Chunks first..first+count-1 only (by default all of them)."""
    c = chunk or window
    n_chunks = -(-seq_len // c) - first if count is None else count
    chunks = torch.arange(first, first + n_chunks, device=device)[:, None]
    q = (chunks * c + torch.arange(c, device=device))[:, :, None]
    k = (chunks * c - window + torch.arange(window + c, device=device))[:, None, :]
    return (k <= q) & (q - k < window) & (k >= 0)


def rope_base(kind: str, cfg, rope_theta: float, max_seq_len: int) -> tuple[float, dict | None]:
    """(theta, YaRN parameters or None) of a layer: V4 rotates window-only layers with the model's
    base and layers with a compressor with `compress_rope_theta` and YaRN."""
    if kind == "window":
        return rope_theta, None
    if cfg.yarn_factor == 1:
        return cfg.compress_rope_theta, None
    original = cfg.yarn_original_seq_len or max(1, round(max_seq_len / cfg.yarn_factor))
    return cfg.compress_rope_theta, {"factor": cfg.yarn_factor, "original_seq_len": original,
                                     "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}


class SoftmaxOverParts(torch.autograd.Function):
    """One softmax over logits given in parts: sink [1, 1, H, 1] (broadcast), parts [B, n, H, w_i]
    then one bool mask per part (broadcastable to it, True = hidden) → the probabilities of each
    part (views of one [B, n, H, Σw_i + 1] buffer, the sink's column last), and the per-head max
    logit when `track_max` (else an empty tensor).

    Its backward writes each part's gradient once, p·(g − Σ p·g), the sink's summed. Autograd's
    would zero-fill a full-width gradient for each slice taken of the probabilities, add them,
    run the softmax backward over the sum and then mask the window again, though hidden
    probabilities are 0 and so is their gradient: 3-4 passes over the scores more per layer."""

    @staticmethod
    def forward(ctx, sink, track_max: bool, *parts_and_masks):
        parts, masks = parts_and_masks[: len(parts_and_masks) // 2], parts_and_masks[len(parts_and_masks) // 2:]
        b, n, h, _ = parts[0].shape
        logits = torch.cat([*parts, sink.expand(b, n, h, 1)], dim=-1)
        at = 0
        for part, mask in zip(parts, masks):
            logits[..., at: at + part.size(-1)].masked_fill_(mask, float("-inf"))
            at += part.size(-1)
        max_logits = logits.amax(dim=(0, 1, 3)) if track_max else logits.new_empty(0)
        probs = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(probs)
        ctx.widths = [p.size(-1) for p in parts]
        ctx.mark_non_differentiable(max_logits)
        return (*probs.split([*ctx.widths, 1], dim=-1)[:-1], max_logits)

    @staticmethod
    def backward(ctx, *grads):
        # the saved probabilities carry no graph: a graph of this backward would miss their terms
        refuse_create_graph("V4 attention's softmax has no double backward (create_graph=True)")
        (probs,) = ctx.saved_tensors
        *ps, p_sink = probs.split([*ctx.widths, 1], dim=-1)
        # (grads: one per part, zeros where a part went unused, then the max logit's.) (g − Σp·g)·p,
        # rounded as torch's softmax backward rounds it: p·g − p·Σ saves two passes but cancels
        # worse, enough to move V4's losses over 10 steps by 2e-5 (tests/test_distributed.py)
        dot = sum(torch.linalg.vecdot(p, g).unsqueeze(-1) for p, g in zip(ps, grads))
        d_parts = [(g - dot).mul_(p) for p, g in zip(ps, grads)]
        d_sink = -(p_sink * dot).sum((0, 1), keepdim=True)
        return (d_sink, None, *d_parts, *[None] * len(ps))


class V4Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, cfg, kind: str, max_seq_len: int, eps: float,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.kind, self.n_heads, self.head_dim, self.rope_dim = kind, n_heads, cfg.head_dim, cfg.rope_dim
        self.q_head_norm, self.eps = cfg.q_head_norm, eps
        self.window, self.topk, self.kl_weight = cfg.window, cfg.csa_topk, cfg.indexer_kl_weight
        self.query_chunk = cfg.query_chunk
        self.ratio = {"window": 0, "csa": cfg.csa_ratio, "hca": cfg.hca_ratio}[kind]
        hd, groups = cfg.head_dim, cfg.out_groups
        self.q_down = nn.Linear(d_model, cfg.q_lora, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora, eps=eps)
        self.q_up = nn.Linear(cfg.q_lora, n_heads * hd, bias=False)
        self.q_up.weight.head_blocks = n_heads
        self.kv = nn.Linear(d_model, hd, bias=False)
        self.kv_norm = RMSNorm(hd, eps=eps)
        self.sink = nn.Parameter(torch.zeros(n_heads))
        # [groups, rank, heads·hd / groups]: Muon orthogonalises each group's projection on its own
        self.out_down = nn.Parameter(torch.empty(groups, cfg.out_lora, n_heads * hd // groups))
        self.out = nn.Linear(groups * cfg.out_lora, d_model, bias=False)
        self.compressor = None if kind == "window" else Compressor(
            d_model, hd, self.ratio, overlap=kind == "csa", rope_dim=cfg.rope_dim, eps=eps)
        self.indexer = Indexer(d_model, cfg.q_lora, cfg.index_heads, cfg.index_dim, self.ratio, eps,
                               rope_dim=min(cfg.rope_dim, cfg.index_dim)) if kind == "csa" else None
        self.sparse = False  # CSA: top-k entries (after the indexer's warm-up) or all visible ones
        self.aux_loss: torch.Tensor | None = None  # the indexer's KL of the last training forward
        # Per-head max pre-softmax logit (window, entries and sink) of the last forward, for the
        # probes; computed only while `track_max_logits` is on.
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None
        cos, sin = rope_tables(max_seq_len, max(cfg.rope_dim, 2), *rope_base(kind, cfg, rope_theta, max_seq_len))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, std: float, out_scale: float) -> None:
        nn.init.normal_(self.out_down, std=std)
        nn.init.normal_(self.out.weight, std=std * out_scale)

    def new_cache(self, batch: int, capacity: int, device, dtype) -> "V4Cache":
        from model.v4_cache import V4Cache

        return V4Cache()

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query latent [B, T, q_lora], rotated queries [B, T, H, hd] and key/value [B, T, hd] of x
        at the positions of cos/sin. Queries stay query-major, as the projection makes them: the
        attention below multiplies in that layout, and the output projection wants it back."""
        b, t, _ = x.shape
        q_latent = self.q_norm(self.q_down(x))
        q = self.q_up(q_latent).view(b, t, self.n_heads, self.head_dim)
        if self.q_head_norm:
            q = rms_norm(q, None, self.eps)
        q = rope_last(q, cos[:, None], sin[:, None], self.rope_dim)
        kv = rope_last(self.kv_norm(self.kv(x)), cos, sin, self.rope_dim)  # [B, T, hd], key and value
        return q_latent, q, kv

    def project_out(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Heads [B, T, H, hd] → [B, T, d_model] through the grouped low-rank projection: group g's
        heads through its down-projection D_g [rank, H·hd/G], then all ranks through `out`.
        When the rank is not below the group's width (small models) and there are enough tokens,
        the two are multiplied first into one [d_model, H·hd] matrix: the same map in fewer FLOPs."""
        b, t, _, _ = out.shape
        groups, rank, width = self.out_down.shape
        heads = out.reshape(b, t, groups * width).to(dtype)  # [B, T, G·(H·hd/G)]
        down = self.out_down.to(heads.dtype)
        d_model = self.out.out_features
        factored = b * t * groups * rank * (width + d_model)
        merged = (b * t + groups * rank) * groups * width * d_model
        if merged < factored:
            # out(block_diag(D_g^T)) = [W_out[:, g] · D_g]_g^T, [G·width, d_model]; through the module,
            # so that its hooks (ZeRO-3 gathering `out.weight`) run
            return heads @ self.out(torch.block_diag(*down.transpose(1, 2)))
        return self.out(torch.einsum("btgi,gri->btgr", heads.view(b, t, groups, width), down).flatten(2))

    def forward(self, x: torch.Tensor, *unused, cache: "V4Cache | None" = None) -> torch.Tensor:
        """x [B, T, d_model] at positions 0..T-1; with `cache` (decoding), x continues the cached
        tokens (model/v4_cache.py)."""
        if cache is not None:
            from model.v4_cache import attend_cached

            return attend_cached(self, x, cache)
        t = x.size(1)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        q_latent, q, kv = self.project(x, cos, sin)
        entries = index = None
        if self.compressor is not None:
            entries = self.compressor(x, cos, sin)  # [B, N, hd]
            if self.indexer is not None and (self.sparse or self.training):
                index = self.indexer(x, q_latent, cos, sin)
        # Scores, softmax and weighted values in fp32 (or wider) even under bf16 autocast: bf16
        # logits would be rounded before the softmax, the sink with them.
        wide = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            out = self._attend(q.to(wide), kv.to(wide), None if entries is None else entries.to(wide),
                               None if index is None else index.to(wide), cos, sin)
        return self.project_out(out, x.dtype)

    def _attend(self, q, kv, entries, index, cos, sin) -> torch.Tensor:
        """One softmax over the window, the (selected) compressed entries and the sink: queries
        [B, T, H, hd] → [B, T, H, hd]. Sparse CSA scores only each query's top-k entries
        ([B, T, H, k]); dense CSA (the indexer's warm-up) and HCA score every entry
        ([B, T, H, T/m]). Everything is query-major, so that each product is one batched matmul
        on views, without permuting copies of scores or probabilities. Beyond `query_chunk`
        queries this runs a chunk of queries at a time, and in training each chunk's scores and
        probabilities are recomputed in backward instead of kept: a dense layer's [T, T/m] would
        otherwise make its memory grow quadratically in T."""
        b, t, h, hd = q.shape
        w, c = self.window, window_chunk(self.window)
        n_chunks = -(-t // c)
        pad = n_chunks * c - t
        # query chunk j's keys: key chunks j-w/c..j side by side. Not `unfold(1, w + c, c)`:
        # Inductor's unfold_backward (overlapping windows) computes wrong gradients in torch 2.13,
        # and crashed on a small case (pytorch/pytorch#172064); the copy costs a pass over kv per
        # w/c + 1 chunks.
        kp = F.pad(kv, (0, 0, w, pad)).view(b, n_chunks + w // c, c, hd)
        kc = torch.cat([kp[:, i: i + n_chunks] for i in range(w // c + 1)], dim=2)  # [B, C, w + c, hd]
        selected = chosen = None
        if entries is not None and self.indexer is not None and self.sparse:
            n_visible = (torch.arange(t, device=q.device) + 1) // self.ratio  # query t sees entries < this
            selected, chosen = select_topk(index, n_visible, self.topk)  # [B, T, k]
        with_kl = entries is not None and index is not None and self.training
        # the sink as a view, not the parameter: recomputation must not depend on ZeRO-3 still
        # holding the parameter's data
        sink = self.sink.view(1, 1, h, 1).to(q.dtype)
        span = t if not self.query_chunk or t <= self.query_chunk else max(c, self.query_chunk // c * c)
        recompute = span < t and torch.is_grad_enabled()
        outs, kl_sum, kl_count, max_logits = [], 0.0, 0, None
        for start in range(0, t, span):
            stop = min(start + span, t)
            # dense over entries: a chunk scores only the entries its last query can see
            # (stop // m), half the work of scoring all of them over the chunks
            limit = None if selected is not None else stop // max(1, self.ratio)
            part = (q[:, start:stop], kc[:, start // c: -(-stop // c)], sink,
                    None if entries is None else entries[:, :limit], start, t,
                    None if index is None else IndexQueries(index.q[:, start:stop], index.w[:, start:stop],
                                                            index.keys[:, :limit]),
                    None if selected is None else selected[:, start:stop],
                    None if chosen is None else chosen[:, start:stop], with_kl)
            out, chunk_sum, chunk_count, chunk_max = (
                checkpoint(self._attend_queries, *part, use_reentrant=False) if recompute else self._attend_queries(*part))
            outs.append(out)
            if with_kl:
                kl_sum, kl_count = kl_sum + chunk_sum, kl_count + chunk_count
            if chunk_max is not None:
                max_logits = chunk_max if max_logits is None else torch.maximum(max_logits, chunk_max)
        if with_kl:
            self.aux_loss = self.kl_weight * kl_sum / kl_count.clamp_min(1)
        if self.track_max_logits:
            self.max_logits = max_logits
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return rope_last(out, cos[:, None], -sin[:, None], self.rope_dim)  # inverse RoPE at the query's position

    def _attend_queries(self, q, kc, sink, entries, start: int, t: int, index, selected, chosen, with_kl: bool):
        """Queries start..start+len-1 (q [B, len, H, hd], start a multiple of the query chunk; kc
        their chunks' window keys) → (output [B, len, H, hd], the indexer's summed KL and its count,
        per-head max logit or None)."""
        b, n, h, hd = q.shape
        w, c = self.window, window_chunk(self.window)
        q = q * hd ** -0.5
        n_chunks = kc.size(1)
        pad = n_chunks * c - n
        qc = (F.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q).view(b, n_chunks, c * h, hd)
        parts = [torch.matmul(qc, kc.transpose(-1, -2)).view(b, n_chunks * c, h, w + c)[:, :n]]
        hidden = [~window_mask(t, w, q.device, start // c, n_chunks, c).view(n_chunks * c, 1, w + c)[:n]]
        visible = None
        if entries is not None:
            if selected is not None:
                parts.append(gathered.scores(q, entries, selected))  # [B, n, H, k]
                hidden.append(~chosen[:, :, None])
            else:
                # this chunk's rows only: a [T, T/m] mask per chunk would be quadratic again
                visible = visible_entries(start + n, self.ratio, q.device, start=start)  # [n, (start + n) // m]
                parts.append(torch.matmul(q.reshape(b, n * h, hd), entries.transpose(1, 2)).view(b, n, h, -1))
                hidden.append(~visible[:, None])
        *probs, max_logits = SoftmaxOverParts.apply(sink, self.track_max_logits, *parts, *hidden)
        max_logits = max_logits if self.track_max_logits else None

        p_win = probs[0]  # rows strided by the logits' width: batched matmul takes it as is
        p_win = (F.pad(p_win, (0, 0, 0, 0, 0, pad)) if pad else p_win).reshape(b, n_chunks, c * h, w + c)
        out = torch.matmul(p_win, kc).view(b, n_chunks * c, h, hd)[:, :n]
        kl_sum = kl_count = None
        if entries is not None:
            p_comp = probs[1]
            out = out + (gathered.combine(p_comp, entries, selected) if selected is not None
                         else torch.matmul(p_comp.reshape(b, n * h, -1), entries).view(b, n, h, hd))
            if with_kl:
                target = p_comp.sum(2)  # attention over entries, summed over heads
                if selected is not None:
                    kl_sum, kl_count = kl_to_attention_sum(index.selected_scores(selected), target, chosen)
                else:
                    kl_sum, kl_count = kl_to_attention_sum(index.scores(), target, visible.expand(b, -1, -1))
        return out, kl_sum, kl_count, max_logits

    def attention_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of scores and weighted values (projections count as
        parameters), by the convention of dense attention's 4·d·T (PaLM): every query as if it saw
        its full share of the sequence — the window, all T/m entries (HCA), the top-k of them
        (CSA after the indexer's warm-up) plus the indexer's scoring of all T/m."""
        flops = 4 * self.n_heads * self.head_dim * min(self.window, seq_len)
        if self.kind != "window":
            entries = seq_len // self.ratio
            flops += 4 * self.n_heads * self.head_dim * (min(self.topk, entries) if self.kind == "csa" else entries)
            if self.indexer is not None:
                flops += 2 * self.indexer.n_heads * self.indexer.dim * entries
        return flops
