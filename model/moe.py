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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.layers import SwiGLU, clamped_swiglu


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg, layer: int, vocab_size: int):
        super().__init__()
        e, h = cfg.n_experts, cfg.expert_hidden
        self.n_experts, self.top_k, self.route_scale, self.clamp = e, cfg.top_k, cfg.route_scale, cfg.clamp
        self.gamma, self.balance_weight = cfg.bias_gamma, cfg.balance_weight
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
            self.register_buffer("hash_table", torch.rand(vocab_size, e, generator=g).argsort(-1)[:, : cfg.top_k])
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

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(*(x @ self.gate_up[e].t()).chunk(2, dim=-1), self.clamp) @ self.down[e].t()

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        scores, chosen, weights = self.route(flat, ids.reshape(-1))
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):  # a loop over experts, never over tokens
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, self.expert(e, flat[token]) * weights[token, slot, None].to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)
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
    def update_bias(self, applied: bool = True) -> dict[str, float]:
        """After an optimizer step: move the selection bias toward balance (identically on every
        rank: loads are summed over ranks first); returns this step's load statistics."""
        load = self.load.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        self.load.zero_()
        mean = load.mean()
        if applied and not self.hashed:
            self.bias -= self.gamma * torch.sign(load - mean)
        return {"load_max_over_mean": float(load.max() / mean.clamp_min(1e-9))}
