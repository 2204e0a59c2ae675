"""The lightning indexer of CSA: which compressed entries each query attends to.

    I(t, s) = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s)

with several small index heads q_{t,h} (from the query's low-rank latent), one shared key k_s
per compressed entry (its own overlapping compressor over the same blocks), and per-token head
weights w_{t,h}, scaled as V4's code does by index_dim^-0.5 · index_heads^-0.5 (this sets the
temperature of the KL's softmax; it cannot change the top-k). The top-k visible entries by I
serve every attention head of the query.

The indexer learns only from its KL objective: its inputs are detached, so the KL never moves the
trunk, and the attention's own probabilities (summed over heads, detached) are its target — over
all visible entries while attention is dense (warm-up), over the selected ones once it is sparse.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels, gathered
from model.compressor import Compressor, rope_last


class Indexer(nn.Module):
    def __init__(self, d_model: int, q_lora: int, n_heads: int, dim: int, ratio: int, eps: float, rope_dim: int = 0):
        super().__init__()
        self.n_heads, self.dim, self.rope_dim = n_heads, dim, rope_dim
        self.q = nn.Linear(q_lora, n_heads * dim, bias=False)
        self.head_weights = nn.Linear(d_model, n_heads, bias=False)
        self.keys = Compressor(d_model, dim, ratio, overlap=True, rope_dim=rope_dim, eps=eps)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos, sin) -> "IndexQueries":
        """The index queries of x (and their keys), from which `scores` and `select_topk` compute
        scores [B, T, N] — all of them or a chunk of queries at a time. Queries and keys carry
        RoPE on their last rope_dim channels (the attention's tables, highest frequencies), as
        V3.2's indexer does."""
        x, q_latent = x.detach(), q_latent.detach()
        k = self.keys(x, *self.tables(cos, sin))  # [B, N, dim]
        return self.queries(x, q_latent, k, cos, sin)

    def tables(self, cos, sin):
        return cos[..., : self.rope_dim // 2], sin[..., : self.rope_dim // 2]

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos, sin) -> "IndexQueries":
        b, t, _ = x.shape
        cos, sin = self.tables(cos, sin)
        q = rope_last(self.q(q_latent).view(b, t, self.n_heads, self.dim), cos[:, None], sin[:, None],
                      self.rope_dim)  # [B, T, H, dim]
        w = self.head_weights(x) * (self.dim ** -0.5 * self.n_heads ** -0.5)  # [B, T, H]
        return IndexQueries(q, w, keys)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos, sin) -> torch.Tensor:
        """Scores [B, T, N] of the queries of x / q_latent (at the positions of cos/sin) against
        compressed index keys [B, N, dim]."""
        return self.queries(x, q_latent, keys, cos, sin).scores()


class IndexQueries(NamedTuple):
    """Index queries q [B, T, H, dim] with head weights w [B, T, H], and keys [B, N, dim]."""
    q: torch.Tensor
    w: torch.Tensor
    keys: torch.Tensor

    def to(self, dtype: torch.dtype) -> "IndexQueries":
        """In one dtype: under CUDA's autocast the keys' RMSNorm returns float32 while the queries'
        and head weights' projections return bf16, and the scores are taken with autocast off."""
        return IndexQueries(*(t.to(dtype) for t in self))

    def scores(self, start: int = 0, stop: int | None = None, n_keys: int | None = None) -> torch.Tensor:
        """I(t, s) of queries start..stop-1 against the first n_keys keys (all by default):
        [B, stop - start, n_keys]."""
        q, w = self.q[:, start:stop], self.w[:, start:stop]
        b, t, h, d = q.shape
        # as two batched matmuls on contiguous operands: einsum would permute [B, T, H, N]. ReLU in
        # place: a second [T·H, N] buffer costs more than the ReLU (fresh pages at every chunk)
        per_head = torch.bmm(q.reshape(b, t * h, d), self.keys[:, :n_keys].transpose(1, 2)).relu_()  # [B, T·H, N]
        return torch.bmm(w.reshape(b * t, 1, h), per_head.view(b * t, h, -1)).view(b, t, -1)

    def selected_scores(self, selected: torch.Tensor) -> torch.Tensor:
        """I(t, s) of each query against its selected keys only (selected [B, T, k]) → [B, T, k]."""
        per_head = gathered.scores(self.q, self.keys, selected).relu()  # [B, T, H, k]
        return torch.einsum("bth,bthk->btk", self.w, per_head)


# Scores of this many (query, entry, index head) triples at most are alive at once while selecting.
SELECT_CHUNK_ELEMENTS = 1 << 22


def _sorts_every_row(device: torch.device) -> bool:
    """Whether the selection sorts every row (stably: the same picks). A compiled graph cannot
    branch on the data, and off the CPU reading it (the rows' visible range, whether a row has a
    tie at the cut) would make the host wait for the device, several times per layer."""
    return torch.compiler.is_compiling() or device.type != "cpu"


def select_topk(index: "IndexQueries | torch.Tensor", n_visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best visible entries per query: indices [B, T, k'] (a set: in no particular order)
    and whether each pick is a visible entry [B, T, k'] (early queries see fewer than k),
    k' = min(k, N). Query t sees entries 0..n_visible[t]-1. `index` is IndexQueries (scored a
    chunk of queries at a time, so that [B, T, N] scores never exist at once; on the CPU by a
    fused kernel) or precomputed scores [B, T, N]. No gradient: the indexer learns from the
    scores of what was selected (`IndexQueries.selected_scores`)."""
    if isinstance(index, torch.Tensor):
        rows, n = (lambda start, stop, width: index[:, start:stop, :width].clone()), index.size(-1)  # masked in place
        chunk = max(1, index.size(1))
    elif _use_kernel(index):
        return _select_on_cpu(index, n_visible, k)
    else:
        rows, n = index.scores, index.keys.size(1)
        chunk = max(1, SELECT_CHUNK_ELEMENTS // max(1, n * index.q.size(2)))
    k = min(k, n)
    if k == 0:  # no entry yet (fewer tokens than one block): nothing to pick
        b = (index if isinstance(index, torch.Tensor) else index.q).size(0)
        empty = torch.zeros(b, n_visible.size(0), 0, dtype=torch.long, device=n_visible.device)
        return empty, empty.bool()
    picks, valid = [], []
    with torch.no_grad():
        for start in range(0, n_visible.size(0), chunk):  # chunks of queries, one at small T
            stop = min(start + chunk, n_visible.size(0))
            if _sorts_every_row(n_visible.device):
                hidden = torch.arange(n, device=n_visible.device) >= n_visible[start:stop, None]
                values, order = rows(start, stop, n).masked_fill(hidden, float("-inf")).sort(
                    dim=-1, descending=True, stable=True)
                picks.append(order[..., :k])
                valid.append(torch.isfinite(values[..., :k]))
                continue
            # entries no query of the chunk sees yet are not scored (at long T: about half of all)
            seen = n_visible[start:stop]
            width, everyone = min(n, int(seen.max())), min(n, int(seen.min()))
            # only entries some query of the chunk does not see yet need masking: a narrow band
            masked = rows(start, stop, width)
            masked[..., everyone:].masked_fill_(
                torch.arange(everyone, width, device=seen.device) >= seen[:, None], float("-inf"))
            if width < k:  # fewer entries than picks: the rest are padding, never valid
                values, order = masked.sort(dim=-1, descending=True, stable=True)
                picks.append(F.pad(order, (0, k - width)))
                valid.append(F.pad(torch.isfinite(values), (0, k - width), value=False))
                continue
            values, order = masked.topk(k, dim=-1, sorted=False)  # the set matters, not its order
            # Ties at the cut (entries whose every index head is ReLU-zero score exactly 0; the
            # hidden ones) go to the earlier entry, whatever the number of entries: a decoding
            # cache, which holds only complete ones, then picks what the full sequence picks.
            # topk leaves the choice among ties unspecified, so the rows that have one (few:
            # a full stable sort of every row costs ~5x the topk) are sorted stably instead.
            cut = values.amin(-1, keepdim=True)
            tied = (masked == cut).sum(-1) > (values == cut).sum(-1)
            if tied.any():
                tie_rows = tied.nonzero(as_tuple=True)
                row_values, row_order = masked[tie_rows].sort(dim=-1, descending=True, stable=True)
                values[tie_rows], order[tie_rows] = row_values[..., :k], row_order[..., :k]
            picks.append(order)
            valid.append(torch.isfinite(values))
    return torch.cat(picks, dim=1), torch.cat(valid, dim=1)


def _kernels():
    """The fused CPU selection (model/csrc/index_topk.cpp), or None where it cannot be built."""
    return cpu_kernels.extension("index_topk")


def _use_kernel(index: "IndexQueries") -> bool:
    """CPU tensors and a kernel that builds; a compiled graph only uses one already known to build
    (no build inside a trace)."""
    if index.q.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return cpu_kernels.known.get("index_topk", False)
    return _kernels() is not None


@torch.library.custom_op("v4lab::index_topk", mutates_args=())
def index_topk_op(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel as one opaque op for the compiler (no gradient: the selection has none)."""
    picks, valid = _kernels().index_topk(q, w, keys, n_visible, k)
    return picks, valid


@index_topk_op.register_fake
def _(q, w, keys, n_visible, k):
    return (q.new_empty(q.size(0), q.size(1), k, dtype=torch.long),
            q.new_empty(q.size(0), q.size(1), k, dtype=torch.bool))


KEY_BLOCK = 64  # the kernel reads keys in blocks of this many entries


def key_blocks(keys: torch.Tensor) -> torch.Tensor:
    """Keys [B, N, dim] as the kernel reads them: [B, ⌈N/64⌉, dim, 64], each block of 64 entries
    transposed, zero entries past N."""
    b, n, d = keys.shape
    blocks = -(-n // KEY_BLOCK)
    return F.pad(keys, (0, 0, 0, blocks * KEY_BLOCK - n)).view(b, blocks, KEY_BLOCK, d).transpose(2, 3).contiguous()


def _select_on_cpu(index: "IndexQueries", n_visible: torch.Tensor, k: int):
    """select_topk by the fused kernel: each query's scores made and ranked while they are in L1,
    in fp32 (fp64 for fp64 inputs) whatever the autocast dtype; the same picks, best first."""
    dtype = torch.float64 if index.q.dtype == torch.float64 else torch.float32
    n = index.keys.size(1)
    return index_topk_op(index.q.detach().to(dtype).contiguous(), index.w.detach().to(dtype).contiguous(),
                         key_blocks(index.keys.detach().to(dtype)), n_visible.clamp(0, n).contiguous(), min(k, n))


def kl_to_attention(index_logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """mean over queries of KL(target ‖ softmax(index_logits)) over the `allowed` entries;
    target [B, T, N'] are attention probabilities (any scale: renormalised here)."""
    total, queries = kl_to_attention_sum(index_logits, target, allowed)
    return total / queries.clamp_min(1)


def kl_to_attention_sum(index_logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor):
    """(sum of the per-query KLs, number of queries counted): `kl_to_attention` of queries taken a
    chunk at a time is the sum of the chunks' sums over the sum of their counts."""
    has_any = allowed.any(-1)
    wide = torch.promote_types(index_logits.dtype, torch.float32)
    # queries with nothing allowed (the first few) softmax over everything and are weighted 0
    log_p = torch.log_softmax(index_logits.to(wide).masked_fill(~allowed & has_any[..., None], float("-inf")), -1)
    log_p = log_p.masked_fill(~allowed, 0.0)  # no inf·0 anywhere, forward or backward
    target = target.detach().to(wide) * allowed
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-20)
    per_query = (target * (target.clamp_min(1e-20).log() - log_p)).sum(-1)
    return (per_query * has_any).sum(), has_any.sum()
