"""DeepSeekMoE as in V4 (REFERENCE.md §4): shared expert(s) plus fine-grained routed SwiGLU
experts, top-k routing on sqrt(softplus) affinities.

- selection uses affinity + a per-expert bias; the gate weights use the affinities alone,
  normalised over the selected experts and scaled by `route_scale`;
- auxiliary-loss-free balancing: after every optimizer step the bias moves by ∓γ for experts
  above / below the mean load (`update_bias`, loads summed over ranks). The bias is a buffer:
  saved in checkpoints, invisible to the optimizer;
- a small sequence-wise balance loss (`aux_loss`);
- the first `hash_layers` layers pick experts by a fixed token-id hash instead of by score;
- SwiGLU clamps: gate pre-activation ≤ clamp, linear part in [−clamp, clamp];
- expert weights are stacked [E, out, in], so Muon orthogonalises each expert on its own.

The experts run without a Python loop: token-expert pairs sorted by expert go through one grouped
matmul per projection (`grouped_linear`): `torch._grouped_mm` where it serves (on the CPU, one
BLAS matmul per group; on CUDA bf16 on Hopper/Blackwell, one grouped kernel; 16-byte rows), else a
batched matmul over the groups padded to the largest, whose size is read from the routing. Both
are `torch.library` custom ops with a fake kernel and a shared backward, so that torch.compile sees
one node of a fixed output shape instead of breaking the block's graph there (and `_grouped_mm`'s
own fake kernel accepts bf16 only).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.layers import SwiGLU, swiglu


_recomputing = False


@contextlib.contextmanager
def recomputation():
    """Around activation checkpointing's second forward (torch.utils.checkpoint's context_fn): the
    routing it repeats is not counted again into the experts' loads."""
    global _recomputing
    _recomputing, before = True, _recomputing
    try:
        yield
    finally:
        _recomputing = before


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg, layer: int, vocab_size: int):
        super().__init__()
        e, h = cfg.n_experts, cfg.expert_hidden
        self.n_experts, self.top_k, self.route_scale, self.clamp = e, cfg.top_k, cfg.route_scale, cfg.clamp
        self.gamma, self.balance_weight = cfg.bias_gamma, cfg.balance_weight
        if cfg.grouped_matmul not in ("auto", "padded"):
            raise ValueError(f"model.moe.grouped_matmul={cfg.grouped_matmul!r}: accepted auto, padded")
        self.use_grouped_mm = None if cfg.grouped_matmul == "auto" else False  # None: where it takes the operands
        self.router = nn.Parameter(torch.empty(e, d_model))
        self.gate_up = nn.Parameter(torch.empty(e, 2 * h, d_model))
        self.gate_up.row_blocks = 2  # each expert's gate and up are separate matrices for Muon
        self.down = nn.Parameter(torch.empty(e, d_model, h))
        self.shared = SwiGLU(d_model, h * cfg.n_shared, cfg.clamp) if cfg.n_shared else None
        self.register_buffer("bias", torch.zeros(e))
        self.register_buffer("load", torch.zeros(e), persistent=False)  # tokens per expert since the last update
        self.hashed = layer < cfg.hash_layers
        if self.hashed:  # top_k distinct experts per token id, fixed by the layer index
            g = torch.Generator().manual_seed(1000 + layer)
            # its own storage, not a view of the whole ranking: safetensors refuses to save a slice of a larger one
            table = torch.rand(vocab_size, e, generator=g).argsort(-1)[:, : cfg.top_k].contiguous()
            self.register_buffer("hash_table", table)
        self.aux_loss: torch.Tensor | None = None

    def init_weights(self, std: float, out_scale: float) -> None:
        for p in (self.router, self.gate_up):
            nn.init.normal_(p, std=std)
        nn.init.normal_(self.down, std=std * out_scale)
        if self.shared is not None:
            nn.init.normal_(self.shared.gate_up.weight, std=std)
            nn.init.normal_(self.shared.down.weight, std=std * out_scale)

    def route(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], ids [N] → affinities [N, E], chosen experts [N, k], gate weights [N, k].
        In fp32 even under autocast: bf16 logits would move selections by more than a bias step."""
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            scores = F.softplus(x.to(wide) @ self.router.to(wide).t()).sqrt()
        if self.hashed:
            chosen = self.hash_table[ids]
        else:
            chosen = (scores + self.bias).topk(self.top_k, dim=-1).indices
        picked = scores.gather(1, chosen)
        return scores, chosen, picked / picked.sum(-1, keepdim=True).clamp_min(1e-20) * self.route_scale

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        scores, chosen, weights = self.route(flat, ids.reshape(-1))
        pair_expert, order = chosen.flatten().sort(stable=True)  # token-expert pairs grouped by expert
        token = order // self.top_k
        # not bincount: its output's length depends on the data, which a compiled graph cannot follow
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, pair_expert, torch.ones_like(pair_expert))
        # index_select, not flat[token]: its backward is an index-add, 6x faster on CPU than indexing's accumulating put
        hidden = grouped_linear(flat.index_select(0, token), self.gate_up, pair_expert, counts, self.use_grouped_mm)
        routed = grouped_linear(swiglu(hidden, self.clamp), self.down, pair_expert, counts, self.use_grouped_mm)
        routed = routed * weights.flatten()[order, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, token, routed)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            # activation checkpointing runs this forward again in backward: the loads count once; the
            # balance loss is recomputed (the checkpoint matches the tensors both passes save)
            if not _recomputing:
                self.load += counts.to(self.load.dtype)
            if not self.hashed:  # a hash decides nothing the loss could balance
                self.aux_loss = self.balance_weight * self.balance_loss(scores.view(b, t, -1), chosen.view(b, t, -1))
        return out.view(b, t, d)

    def balance_loss(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Sequence-wise: Σ_i f_i·P_i per sequence, f_i = E/(k·T)·(tokens routed to i),
        P_i = mean over tokens of the normalised affinity; averaged over sequences."""
        b, t, e = scores.shape
        hits = F.one_hot(chosen, e).sum(2).float()  # [B, T, E]
        f = hits.sum(1) * e / (self.top_k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, applied: bool = True) -> dict[str, torch.Tensor]:
        """After an optimizer step: move the selection bias toward balance (identically on every
        rank: loads are summed over ranks first); returns this step's load statistics (0-d tensors:
        the caller reads all layers' at once, one wait for a GPU instead of one per layer)."""
        load = self.load.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        self.load.zero_()
        mean = load.mean()
        if applied and not self.hashed:
            self.bias -= self.gamma * torch.sign(load - mean)
        return {"load_max_over_mean": load.max() / mean.clamp_min(1e-9)}


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands and is the faster form: on the CPU fp32,
    bf16 or fp16 (it runs one BLAS matmul per group, where the padded batched matmul multiplies
    every group at the largest one's size, and routing is rarely even: `python -m benchmarks.moe`);
    on CUDA bf16 on compute capability 9.x or 10.x, the only operands its grouped kernel takes
    (elsewhere it copies the group offsets to the host, a synchronisation per call, and loops over
    the groups). Rows of both matrices a multiple of 16 bytes."""
    if x.device.type == "cuda":
        # get_device_properties, not get_device_capability: torch.compile folds the former to a constant
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_properties(x.device).major not in (9, 10):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    row = 16 // x.element_size()
    return weight.size(1) % row == 0 and weight.size(2) % row == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """Rows x [P, in] sorted by `expert` [P] (counts [E] rows each) times their expert's
    weight [E, out, in] transposed → [P, out], in one grouped matmul: `torch._grouped_mm` where it
    is supported, else one batched matmul over the groups padded to the largest."""
    # autocast does not reach into a custom op: cast here as it would cast the matmul
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x, weight)
    return (grouped_mm_linear if use_grouped_mm else padded_grouped_linear)(x, weight, expert, counts)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return counts.cumsum(0).to(torch.int32)  # each group's end row, as _grouped_mm reads them


@torch.library.custom_op("v4lab::grouped_mm_linear", mutates_args=())
def grouped_mm_linear(x: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
    """Each group's rows of x [P, in] times its weight[e]ᵀ → [P, out], by `torch._grouped_mm` (on the
    CPU one matmul per group). `expert` goes unread: the signature is the padded op's, whose
    backward this op shares."""
    with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtype
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=_offsets(counts))


@torch.library.custom_op("v4lab::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, expert: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
    """Σ over each expert's rows of grad[p]ᵀ x[p] → [E, out, in] (zero for an idle expert: set here,
    as PyTorch issue #172439 reports _grouped_mm on compute capability 10.x leaving garbage in empty
    groups, which would move idle experts' weights)."""
    with torch.autocast(x.device.type, enabled=False):
        summed = torch._grouped_mm(grad.t(), x, offs=_offsets(counts))
    return torch.where((counts > 0)[:, None, None], summed, 0)


def _by_expert(expert: torch.Tensor, counts: torch.Tensor, *rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each of `rows` ([P, k], sorted by expert) as [E, largest group, k]: each group's rows, then
    padding rows that repeat other rows (any values, non-finite ones included); the padding's mask
    [E, largest]; and each row's position in the flattened [E·largest]. One gather per tensor:
    zero-filling the padded tensor and scattering the rows into it was two passes, and the scatter
    a slow one."""
    p, e = expert.size(0), counts.size(0)
    largest = int(counts.max()) if p else 0
    starts = counts.cumsum(0) - counts
    slot = torch.arange(largest, device=expert.device)
    source = (starts[:, None] + slot).clamp_max(max(p - 1, 0)).flatten()
    position = expert * largest + torch.arange(p, device=expert.device) - starts[expert]
    padded = [r.index_select(0, source).view(e, largest, r.size(1)) for r in rows]
    return padded, slot >= counts[:, None], position


@torch.library.custom_op("v4lab::padded_grouped_linear", mutates_args=())
def padded_grouped_linear(x: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor,
                          counts: torch.Tensor) -> torch.Tensor:
    (padded,), _, position = _by_expert(expert, counts, x)
    with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtype
        out = torch.bmm(padded, weight.transpose(1, 2))  # padding rows' outputs are never read
    return out.view(-1, out.size(-1)).index_select(0, position)


@torch.library.custom_op("v4lab::padded_grouped_weight_grad", mutates_args=())
def padded_grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, expert: torch.Tensor,
                               counts: torch.Tensor) -> torch.Tensor:
    """Σ over each expert's rows of grad[p]ᵀ x[p] → [E, out, in]."""
    (grads, xs), padding, _ = _by_expert(expert, counts, grad, x)
    # zeros in both factors: a repeated non-finite row times a zero would put NaN into another expert's sum
    grads.masked_fill_(padding[..., None], 0)
    xs.masked_fill_(padding[..., None], 0)
    with torch.autocast(x.device.type, enabled=False):
        return torch.bmm(grads.transpose(1, 2), xs)


# The two forms share their fake kernels and their backward: (linear, weight gradient) pairs.
_PAIRS = {grouped_mm_linear: grouped_mm_weight_grad, padded_grouped_linear: padded_grouped_weight_grad}


def _fake_linear(x, weight, expert, counts):
    return x.new_empty(x.size(0), weight.size(1))


def _fake_weight_grad(grad, x, expert, counts):
    return x.new_empty(counts.size(0), grad.size(1), x.size(1))


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_of(linear, weight_grad):
    def backward(ctx, grad):
        x, weight, expert, counts = ctx.saved_tensors
        grad = grad.contiguous()  # _grouped_mm refuses an expanded one (a sum's)
        dx = linear(grad, weight.transpose(1, 2), expert, counts) if ctx.needs_input_grad[0] else None
        dw = weight_grad(grad, x, expert, counts) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None

    return backward


for _linear, _weight_grad in _PAIRS.items():
    _linear.register_fake(_fake_linear)
    _weight_grad.register_fake(_fake_weight_grad)
    _linear.register_autograd(_backward_of(_linear, _weight_grad), setup_context=_save)
