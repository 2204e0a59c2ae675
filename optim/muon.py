"""Muon with an AdamW half, in every published convention, whole-matrix under ZeRO sharding.

`Muon` is a superset of `torch.optim.Muon`: the same keyword arguments, defaults and — in that
configuration — the same updates. Extensions (all off by default):

- `ns_schedule`: `keller`, `v4_hybrid` (8 + 2 iterations), `polar_express`; `ns_method="gram"`
  (Gram Newton–Schulz for wide matrices, restarting at `ns_restarts`: `None` is the schedule's
  default, see optim/newton_schulz.py); `ns_dtype` `bf16` (torch's) or `fp32`;
- `momentum_type`: `ema` (torch: M ← μM + (1−μ)G) or `classical` (V4: M ← μM + G); Nesterov on/off;
- `adjust_lr_fn="match_rms_adamw"` scales by `rms_target`·sqrt(max(rows, cols)) (0.2 as in torch;
  V4 uses 0.18); `original` by sqrt(max(1, rows/cols));
- matrices made of blocks: a parameter may carry `row_blocks` (fused q/k/v or gate/up: each block
  is its own matrix) and `head_blocks` (with `per_head=True`, each attention head's rows are);
  3-D parameters `[E, out, in]` are E matrices (stacked experts). Same-shape matrices are
  orthogonalised together in one batched iteration;
- groups with `use_muon=False` are AdamW (decoupled weight decay, `adamw_betas`, `adamw_eps`),
  so one optimizer holds the whole model — which DeepSpeed requires.

Under DeepSpeed ZeRO-1/2 the engine hands the optimizer one flat fp32 partition per group. After
`bind_zero_partitions` (optim/zero.py) tells it where each matrix lies in the flat buffer, a Muon
step keeps momentum on the local partition (elementwise), all-gathers the partitions of the
pre-orthogonalisation update, orthogonalises every *whole* matrix that overlaps the local
partition, and applies only the local slice. No rank ever orthogonalises a fragment.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_update

from optim.newton_schulz import DTYPES, KELLER, make_schedule, orthogonalize, orthogonalize_stacks

MOMENTUM_TYPES = ("ema", "classical")
# Same-shape matrices up to this size are orthogonalised as one batch: for small matrices the
# per-matmul overhead dominates (4 stacked 128×704 matrices: 3.7 ms batched, 7.0 ms one by one on
# 2 CPU cores); from about 512×512 the matmuls are compute-bound and batching only adds copies.
BATCH_MAX_ELEMENTS = 512 * 512
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


@dataclass(frozen=True)
class Segment:
    """Where one parameter lies in a ZeRO group's flat buffer."""
    start: int
    shape: tuple[int, ...]
    row_blocks: int = 1
    head_blocks: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Partition:
    segments: tuple[Segment, ...]
    start: int  # this rank's first element in the flat buffer
    size: int  # elements per rank (the last rank's share includes padding)
    group: object  # the data-parallel process group


def matrix_view(shape, row_blocks: int = 1, head_blocks: int = 1, per_head: bool = False) -> tuple[int, int, int]:
    """(count, rows, cols): how a parameter of `shape` splits into independent matrices."""
    blocks = row_blocks * (head_blocks if per_head else 1)
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters of 2 or more dimensions; got shape {tuple(shape)}")
    rows, cols = shape[-2], shape[-1]
    if rows % blocks:
        raise ValueError(f"a parameter of shape {tuple(shape)} cannot split into {blocks} row blocks")
    return math.prod(shape[:-2]) * blocks, rows // blocks, cols


def lr_scale(rows: int, cols: int, adjust_lr_fn: str | None, rms_target: float) -> float:
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    return rms_target * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = KELLER, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, ns_schedule: str | None = None,
                 ns_method: str = "standard", ns_dtype: str = "bf16", momentum_type: str = "ema",
                 rms_target: float = 0.2, per_head: bool = False, use_muon: bool = True,
                 ns_restarts: tuple[int, ...] | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8):
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if momentum_type not in MOMENTUM_TYPES:
            raise ValueError(f"momentum_type {momentum_type!r} is not one of {MOMENTUM_TYPES}")
        if ns_dtype not in DTYPES:
            raise ValueError(f"ns_dtype {ns_dtype!r} is not one of {tuple(DTYPES)}")
        if ns_method not in ("standard", "gram"):
            raise ValueError(f"ns_method {ns_method!r} is not one of ('standard', 'gram')")
        if ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        # fail now on a bad schedule name or restart list
        make_schedule(ns_schedule, ns_steps, ns_coefficients, ns_restarts)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_schedule=ns_schedule, ns_method=ns_method,
                        ns_restarts=None if ns_restarts is None else tuple(ns_restarts),
                        ns_dtype=ns_dtype, momentum_type=momentum_type, rms_target=rms_target,
                        per_head=per_head, use_muon=use_muon, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps)
        super().__init__(params, defaults)
        self._partitions: dict[int, Partition] = {}
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    matrix_view(p.shape, getattr(p, "row_blocks", 1), getattr(p, "head_blocks", 1), group["per_head"])

    def bind_partition(self, group_index: int, partition: Partition) -> None:
        """Declare that group `group_index` now holds one flat ZeRO partition laid out as given."""
        # Keyed by the flat tensor, not the index: DeepSpeed steps each group alone, as
        # `param_groups = [group]`, and a checkpoint load rebuilds the group dicts around it.
        (flat,) = self.param_groups[group_index]["params"]
        self._partitions[id(flat)] = partition

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if group["use_muon"]:
                self._muon_step(index, group)
            else:
                self._adamw_step(group)
        return loss

    # -- Muon ---------------------------------------------------------------------------------
    def _momentum_updates(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Advance the momentum of each p with its gradient; return the matrices to orthogonalise.
        One foreach call per operation over all parameters: per-tensor calls cost more than the
        arithmetic on small models (the same elementwise ops, so the same results)."""
        grads, mu = [p.grad for p in params], group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        if group["momentum_type"] == "ema":
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            return torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs

    def _orthogonalize_all(self, mats: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Orthogonalise each [k, m, n] stack. Small stacks of one shape run as one batch, and the
        m×m steps of all small stacks with the same m as one batch too."""
        schedule = make_schedule(group["ns_schedule"], group["ns_steps"], group["ns_coefficients"],
                                 group.get("ns_restarts"))  # absent from checkpoints before restarts
        kwargs = dict(eps=group["eps"], dtype=DTYPES[group["ns_dtype"]], method=group["ns_method"])
        # Tall matrices are orthogonalised transposed (as torch does), so an m×n and an n×m
        # matrix share one batch.
        wide = [m.mT if m.size(1) > m.size(2) else m for m in mats]
        by_shape = defaultdict(list)
        for i, m in enumerate(wide):
            by_shape[m.shape[1:]].append(i)
        out: list[torch.Tensor | None] = [None] * len(mats)

        def place(indices, results):
            for i, o in zip(indices, results):
                out[i] = o.mT if mats[i].size(1) > mats[i].size(2) else o

        small = defaultdict(list)  # rows -> shapes of small stacks, orthogonalised together
        for shape, indices in by_shape.items():
            if math.prod(shape) <= BATCH_MAX_ELEMENTS and group["ns_method"] == "standard":
                small[shape[0]].append(shape)
            elif math.prod(shape) <= BATCH_MAX_ELEMENTS:
                results = orthogonalize(torch.cat([wide[i] for i in indices]), schedule, **kwargs)
                place(indices, results.split([wide[i].size(0) for i in indices]))
            elif wide[indices[0]].device.type == "cpu":  # big matrices keep a CPU busy alone: stacking only copies
                place(indices, [torch.stack([orthogonalize(w, schedule, **kwargs) for w in wide[i]]) for i in indices])
            else:  # an accelerator: each parameter's stack in one call, not ~3 kernel launches per matrix and iteration
                place(indices, [orthogonalize(wide[i], schedule, **kwargs) for i in indices])
        for shapes in small.values():
            stacks = []
            for shape in shapes:
                parts = [wide[i] for i in by_shape[shape]]
                # cast while stacking: one copy instead of two
                stacks.append(torch.cat(parts, out=parts[0].new_empty((sum(t.size(0) for t in parts), *shape),
                                                                      dtype=kwargs["dtype"])))
            for shape, result in zip(shapes, orthogonalize_stacks(stacks, schedule, eps=group["eps"])):
                indices = by_shape[shape]
                place(indices, result.split([wide[i].size(0) for i in indices]))
        return out

    def _muon_step(self, index: int, group: dict) -> None:
        partition = self._partitions.get(id(group["params"][0])) if len(group["params"]) == 1 else None
        if partition is not None:
            return self._muon_step_partitioned(group, partition)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        views = [matrix_view(p.shape, getattr(p, "row_blocks", 1), getattr(p, "head_blocks", 1), group["per_head"])
                 for p in params]
        updates = [u.reshape(v) for u, v in zip(self._momentum_updates(params, group), views)]
        lr, wd = group["lr"], group["weight_decay"]
        torch._foreach_mul_(params, 1 - lr * wd)
        by_scale = defaultdict(lambda: ([], []))  # one foreach add per step size (per matrix shape)
        for p, v, o in zip(params, views, self._orthogonalize_all(updates, group)):
            targets, steps = by_scale[lr_scale(v[1], v[2], group["adjust_lr_fn"], group["rms_target"])]
            targets.append(p)
            steps.append(o.reshape(p.shape))
        for scale, (targets, steps) in by_scale.items():
            torch._foreach_add_(targets, steps, alpha=-lr * scale)

    def _muon_step_partitioned(self, group: dict, part: Partition) -> None:
        (flat,) = group["params"]
        if flat.grad is None:
            return
        local = self._momentum_updates([flat], group)[0].contiguous()
        world = dist.get_world_size(part.group)
        gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local, group=part.group)
        lo, hi = part.start, part.start + part.size
        mine = [s for s in part.segments if s.start < hi and s.start + s.numel > lo]
        views = [matrix_view(s.shape, s.row_blocks, s.head_blocks, group["per_head"]) for s in mine]
        mats = [gathered[s.start : s.start + s.numel].view(v) for s, v in zip(mine, views)]
        lr, wd = group["lr"], group["weight_decay"]
        for s, v, o in zip(mine, views, self._orthogonalize_all(mats, group)):
            a, b = max(lo, s.start), min(hi, s.start + s.numel)
            target = flat[a - lo : b - lo]
            target.mul_(1 - lr * wd)
            piece = o.reshape(-1)[a - s.start : b - s.start].to(flat.dtype)
            target.add_(piece, alpha=-lr * lr_scale(v[1], v[2], group["adjust_lr_fn"], group["rms_target"]))

    # -- AdamW --------------------------------------------------------------------------------
    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["adamw_betas"]
            adamw_update(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, amsgrad=False,
                         beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["adamw_eps"], maximize=False)
