"""Stability probes: is the run stable, and why? (a callback with checkpointed state)

Every `probes.every` steps, on a fixed probe batch, without touching the training step's RNG,
gradients or numerics (eval mode, `torch.autograd.grad` instead of `.backward()`):

- mHC's Amax Gain Magnitude (arXiv 2512.24880 §3.1): each sublayer's token-averaged mixing
  matrix H (X' = H·X); forward gain = max absolute row sum, backward gain = max absolute column
  sum, per sublayer and for the composite product over the whole depth (1.0 for a plain residual);
- per-layer gradient norms and their first/last ratio; activation RMS per layer (and per stream);
- per parameter role: update RMS, weight RMS, update/weight ratio, and the update's spectral norm
  for matrices (the quantities where Muon and AdamW differ by design);
- the max pre-softmax attention logit per layer (QK-Clip's trigger; for V4 attention, over the
  window, the compressed entries and the sink).

Every step: a loss-spike score (deviation of loss and grad norm from their running mean, in running
standard deviations) and the count of spikes.
"""
from __future__ import annotations

import math

import torch

from model.attention import V4Attention
from model.layers import Attention
from model.mhc import HyperConnection
from optim.muon import matrix_view
from optim.params import classify_parameters


def amax_gains(mats: list[torch.Tensor]) -> dict[str, object]:
    """Per-matrix and composite forward (max |row sum|) and backward (max |column sum|) gains of
    mixing matrices applied in order (X ← H_1 X, then H_2, ...), and the composite up to each depth."""
    per_fwd, per_bwd, depth_fwd, depth_bwd = [], [], [], []
    composite = None
    for h in mats:
        h = h.double()
        per_fwd.append(h.abs().sum(-1).max().item())
        per_bwd.append(h.abs().sum(-2).max().item())
        composite = h if composite is None else h @ composite
        depth_fwd.append(composite.abs().sum(-1).max().item())
        depth_bwd.append(composite.abs().sum(-2).max().item())
    return {"fwd": depth_fwd[-1] if mats else 1.0, "bwd": depth_bwd[-1] if mats else 1.0,
            "per_fwd": per_fwd, "per_bwd": per_bwd, "depth_fwd": depth_fwd, "depth_bwd": depth_bwd}


def spectral_norm(m: torch.Tensor, iters: int = 10) -> float:
    """Largest singular value of a matrix, or the largest of a stack [..., rows, cols], by power
    iteration (deterministic start: no RNG is consumed)."""
    m = m.reshape(-1, *m.shape[-2:]).double()
    v = torch.ones(*m.shape[:-2], m.shape[-1], 1, dtype=m.dtype, device=m.device) / math.sqrt(m.shape[-1])
    for _ in range(iters):
        v = m.mT @ (m @ v)
        v = v / v.norm(dim=-2, keepdim=True).clamp(min=1e-30)
    return (m @ v).norm(dim=-2).max().item()


def update_spectral_norm(p: torch.Tensor, delta: torch.Tensor, per_head: bool = False) -> float:
    """The largest spectral norm of `delta` over the matrices Muon sees in parameter `p`: each expert
    of a stack, each block of a fused q/k/v or gate/up projection (optim/muon.py matrix_view), not
    the parameter flattened to 2-D (a stack of experts measured so reads near a Frobenius norm)."""
    view = matrix_view(p.shape, getattr(p, "row_blocks", 1), getattr(p, "head_blocks", 1), per_head)
    return spectral_norm(delta.reshape(view))


class SpikeDetector:
    """Running mean and variance (EMA) of a series; a spike is a value `threshold` running
    standard deviations above the mean, after `warmup` observations."""

    def __init__(self, decay: float = 0.99, threshold: float = 6.0, warmup: int = 20):
        self.decay, self.threshold, self.warmup = decay, threshold, warmup
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def update(self, x: float) -> float:
        if not math.isfinite(x):
            return float("inf")
        score = (x - self.mean) / math.sqrt(self.var) if self.n >= self.warmup and self.var > 0 else 0.0
        if self.n == 0:
            self.mean = x
        delta = x - self.mean
        self.mean += (1 - self.decay) * delta
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        self.n += 1
        return score

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.n = s["mean"], s["var"], s["n"]


class StabilityProbes:
    def __init__(self, model: torch.nn.Module, probe_batch, every: int, per_head: bool = False):
        """`per_head`: the matrices of attention projections are per head, as optim.per_head has Muon see them."""
        self.model, self.every, self.per_head = model, every, per_head
        self.x, self.y = probe_batch
        self.roles = {role: [p for _, p in ps] for role, ps in classify_parameters(model).items() if ps}
        # The trunk's layers: the MTP block runs in training only, never in the probe's eval pass.
        trunk = [m for block in model.blocks for m in block.modules()]
        self.hyper = [m for m in trunk if isinstance(m, HyperConnection)]
        self.attention = [m for m in trunk if isinstance(m, (Attention, V4Attention))]
        self.loss_spikes, self.grad_spikes = SpikeDetector(), SpikeDetector()
        self.spikes = 0
        self.max_amax_fwd, self.max_amax_bwd = None, None
        self._before: dict[str, list[torch.Tensor]] | None = None

    def due(self, step: int) -> bool:
        """Whether the step about to run (number `step`) is probed."""
        return self.every > 0 and step % self.every == 0

    def before_step(self, next_step: int) -> None:
        if self.due(next_step):
            self._before = {role: [p.detach().float().clone() for p in ps] for role, ps in self.roles.items()}

    def after_step(self, metrics: dict) -> None:
        loss_z = self.loss_spikes.update(metrics["loss"])
        grad_z = self.grad_spikes.update(metrics["grad_norm"])
        spiked = max(loss_z, grad_z) > self.loss_spikes.threshold
        self.spikes += int(spiked)
        metrics.update({"probe/loss_z": loss_z, "probe/grad_norm_z": grad_z, "probe/spikes": self.spikes})
        if self._before is not None:
            metrics.update(self._update_stats())
            metrics.update(self._probe_pass())
            self._before = None

    # -- what changed in this step ----------------------------------------------------------
    @torch.no_grad()
    def _update_stats(self) -> dict:
        out = {}
        for role, params in self.roles.items():
            before = self._before[role]
            upd_sq = sum(((p.detach().float() - b) ** 2).sum().item() for p, b in zip(params, before))
            w_sq = sum((b**2).sum().item() for b in before)
            n = sum(b.numel() for b in before)
            out[f"probe/update_rms/{role}"] = math.sqrt(upd_sq / n)
            out[f"probe/weight_rms/{role}"] = math.sqrt(w_sq / n)
            out[f"probe/update_weight_ratio/{role}"] = math.sqrt(upd_sq / max(w_sq, 1e-30))
            if role == "matrix":
                norms = [update_spectral_norm(p, p.detach().float() - b, self.per_head) for p, b in zip(params, before)]
                out["probe/update_spectral/matrix"] = max(norms)
        return out

    # -- a forward and backward pass on the probe batch -------------------------------------
    def _probe_pass(self) -> dict:
        model = self.model
        was_training = model.training
        model.eval()  # no dropout: the probe consumes no RNG
        acts: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, o: acts.append(o.detach())) for b in model.blocks]
        tracked = [a.track_max_logits for a in self.attention]  # QK-Clip may be tracking already
        for m in self.hyper:
            m.record = True
        for a in self.attention:
            a.track_max_logits = True
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            with torch.enable_grad():
                loss = model(self.x, self.y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
            for m in self.hyper:
                m.record = False
            for a, t in zip(self.attention, tracked):
                a.track_max_logits = t
            model.train(was_training)
        out = {"probe/loss": loss.item()}
        grad_of = {id(p): g for p, g in zip(params, grads)}
        layer_norms = []
        for i, block in enumerate(model.blocks):
            sq = sum(grad_of[id(p)].float().pow(2).sum().item() for p in block.parameters() if grad_of.get(id(p)) is not None)
            layer_norms.append(math.sqrt(sq))
            out[f"probe/grad_norm/layer{i}"] = layer_norms[-1]
        out["probe/grad_norm_first_last"] = layer_norms[0] / max(layer_norms[-1], 1e-30)
        for i, a in enumerate(acts):
            rms = a.float().pow(2).mean(dim=tuple(range(a.dim() - 2)) + (a.dim() - 1,)).sqrt() if a.dim() == 4 else None
            out[f"probe/act_rms/layer{i}"] = a.float().pow(2).mean().sqrt().item()
            if rms is not None:
                for s, v in enumerate(rms.tolist()):
                    out[f"probe/act_rms/layer{i}/stream{s}"] = v
        logits = [a.max_logits.max().item() for a in self.attention if a.max_logits is not None]
        for i, v in enumerate(logits):
            out[f"probe/max_logit/layer{i}"] = v
        out["probe/max_logit"] = max(logits) if logits else None
        gains = amax_gains([m.recorded["res"] for m in self.hyper])
        out["probe/amax_fwd"], out["probe/amax_bwd"] = gains["fwd"], gains["bwd"]
        for i, (f, b, df, db) in enumerate(zip(gains["per_fwd"], gains["per_bwd"], gains["depth_fwd"], gains["depth_bwd"])):
            out[f"probe/amax_fwd/sublayer{i}"], out[f"probe/amax_bwd/sublayer{i}"] = f, b
            out[f"probe/amax_fwd_depth/sublayer{i}"], out[f"probe/amax_bwd_depth/sublayer{i}"] = df, db
        self.max_amax_fwd = max(self.max_amax_fwd or 0.0, gains["fwd"])
        self.max_amax_bwd = max(self.max_amax_bwd or 0.0, gains["bwd"])
        return out

    def state_dict(self) -> dict:
        return {"loss": self.loss_spikes.state_dict(), "grad": self.grad_spikes.state_dict(), "spikes": self.spikes,
                "max_amax_fwd": self.max_amax_fwd, "max_amax_bwd": self.max_amax_bwd}

    def load_state_dict(self, s: dict) -> None:
        self.loss_spikes.load_state_dict(s["loss"])
        self.grad_spikes.load_state_dict(s["grad"])
        self.spikes, self.max_amax_fwd, self.max_amax_bwd = s["spikes"], s["max_amax_fwd"], s["max_amax_bwd"]
