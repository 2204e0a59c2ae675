"""The decoder-only language model: embedding, a stack of blocks, final norm, LM head; with
V4's parts when configured (V4 attention, MoE, multi-token prediction) and their extra losses."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import V4Attention, layer_kinds
from model.block import Block
from model.layers import Attention, RMSNorm, SwiGLU, rope_tables
from model.mhc import StreamReduce
from model.moe import MoE, recomputation
from model.mtp import MTP, mtp_loss


def ffn_hidden_size(d_model: int, requested: int) -> int:
    """SwiGLU width: the requested size, or 8/3·d rounded up to a multiple of 32 (same FLOPs as 4·d GELU)."""
    if requested > 0:
        return requested
    return 32 * math.ceil(8 * d_model / 3 / 32)


class DecodeCache:
    """What decoding keeps between forward passes: how many tokens it holds, and one attention
    cache per layer (whatever that layer's attention keeps)."""

    def __init__(self, layers: list):
        self.layers, self.length = layers, 0


class Transformer(nn.Module):
    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len
        hidden = ffn_hidden_size(cfg.d_model, cfg.ffn_hidden)
        # One stream has nothing to mix: hc/mhc with n_streams=1 is the plain residual model.
        self.n_streams = cfg.n_streams if cfg.residual != "residual" and cfg.n_streams > 1 else 1
        residual = cfg.residual if self.n_streams > 1 else "residual"
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.kinds = layer_kinds(cfg.n_layers, cfg.attn.layers) if cfg.attention == "v4" else ["dense"] * cfg.n_layers

        def attention(kind: str) -> nn.Module:
            if kind == "dense":
                return Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
            return V4Attention(cfg.d_model, cfg.n_heads, cfg.attn, kind, cfg.max_seq_len, cfg.norm_eps, cfg.rope_theta)

        def ffn(layer: int) -> nn.Module:
            return MoE(cfg.d_model, cfg.moe, layer, vocab_size) if cfg.ffn == "moe" else SwiGLU(cfg.d_model, hidden)

        self.blocks = nn.ModuleList(
            Block(cfg.d_model, attention(self.kinds[i]), ffn(i), cfg.norm_eps, cfg.dropout, residual, self.n_streams,
                  i, cfg.sinkhorn_iters, cfg.fused_hc)
            for i in range(cfg.n_layers)
        )
        # V4's MTP block: a block like the trunk's (same residual streams) with its cheapest attention
        self.mtp = MTP(cfg.d_model, Block(cfg.d_model, attention("window" if cfg.attention == "v4" else "dense"),
                                          ffn(cfg.n_layers), cfg.norm_eps, cfg.dropout, residual, self.n_streams,
                                          cfg.n_layers, cfg.sinkhorn_iters, cfg.fused_hc),
                       self.stream_reduce(residual), cfg.norm_eps) if cfg.mtp_depth else None
        self.mtp_weight = cfg.mtp_weight
        # During an `indexer_only` warm-up only the indexers learn (V3.2's recipe): the loss backward
        # sees is their KL alone, the MoE biases hold still, and the optimizer holds every other
        # parameter (`frozen_until`, optim/builder.py).
        self.trunk_frozen = False
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_count = 0
        self.reduce = self.stream_reduce(residual)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        # Not persistent: the tables are a pure function of the config, so checkpoints stay small.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, module in self.named_modules():  # profiles name each block by its module path
            if isinstance(module, Block):
                module.range_name = name
        self.reset_parameters()

    def stream_reduce(self, residual: str) -> StreamReduce | None:
        return StreamReduce(residual, self.n_streams, self.cfg.d_model, eps=self.cfg.norm_eps, fused=self.cfg.fused_hc) \
            if self.n_streams > 1 else None

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights; hyper-connection gates and biases
        keep the values their module gave them."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            # GPT-2's scaling: projections that write into the residual stream shrink with depth.
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("attn.out", "ffn.down")) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
        for module in self.modules():  # weights held outside nn.Linear (stacked experts, grouped projections)
            if hasattr(module, "init_weights"):
                module.init_weights(std, 1 / math.sqrt(2 * self.cfg.n_layers))

    def output_parameters(self) -> list[nn.Parameter]:
        """Parameters of the output head, which optimizers treat apart from hidden matrices."""
        return [self.head.weight]

    @property
    def supports_cache(self) -> bool:
        """Whether every attention layer can decode with a cache (`new_cache`)."""
        return all(hasattr(b.attn, "new_cache") for b in self.blocks)

    def new_cache(self, batch: int, capacity: int) -> DecodeCache:
        """An empty decoding cache for `batch` sequences of up to `capacity` tokens. Only attention
        is cached: everything else in a block, hyper-connection streams included, is per token."""
        p = self.embed.weight
        return DecodeCache([b.attn.new_cache(batch, capacity, p.device, p.dtype) for b in self.blocks])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: DecodeCache | None = None):
        """Logits [B, T, V] of idx [B, T] (the loss instead, given targets). With `cache`, idx
        continues the tokens the cache holds (positions cache.length...) and is added to it."""
        x = self.embed(idx)
        cos, sin = self.rope_cos, self.rope_sin
        if cache is not None:
            start = cache.length
            if start + idx.size(1) > cos.size(0):
                raise ValueError(f"positions up to {start + idx.size(1)} exceed the model's context of {cos.size(0)}")
            cos, sin = cos[start:start + idx.size(1)], sin[start:start + idx.size(1)]
            cache.length += idx.size(1)
        if self.n_streams > 1:  # the embedding, copied into every stream (a real copy: matmuls
            # over a stride-0 expanded tensor fall back to a per-token loop, 8x slower)
            x = x.unsqueeze(-2).expand(*x.shape[:-1], self.n_streams, x.size(-1)).contiguous()
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, idx, use_reentrant=False,
                               context_fn=lambda: (contextlib.nullcontext(), recomputation()))
            else:
                x = block(x, cos, sin, idx, None if cache is None else cache.layers[i])
        streams = x
        if self.reduce is not None:
            x = self.reduce(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        lm = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        if not self.training:  # evaluation: the next-token loss alone, comparable across models
            return lm
        return self._training_loss(lm, streams, targets)

    def _training_loss(self, lm: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss backward sees: next-token loss, weighted MTP loss, the indexers' KL and the
        MoE balance loss; each is kept (detached) for the step's metrics. `hidden`: the trunk's
        final state before the head reduction (the MTP block reads the streams)."""
        parts, total = {"lm": lm}, lm
        if self.mtp is not None:
            # every position, the last too (its token after next is outside the window, so mtp_loss
            # leaves it out; causal attention keeps it out of the others): T - 1 positions would put
            # the block's matmuls and attention on odd shapes, ~3x slower on CPU for attention
            h = self.mtp(hidden, self.embed(targets), targets, self.rope_cos, self.rope_sin)
            parts["mtp"] = mtp_loss(self.head(h), targets)
            total = total + self.mtp_weight * parts["mtp"]
        for module in self.modules():
            aux = getattr(module, "aux_loss", None)
            if aux is not None:
                key = "indexer_kl" if isinstance(module, V4Attention) else "moe_balance"
                parts[key] = parts.get(key, 0.0) + aux
                total = total + aux
                module.aux_loss = None
        if self.trunk_frozen:
            total = parts.get("indexer_kl", lm * 0.0)
        for k, v in parts.items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v.detach().float()
        self.loss_count += 1
        return total

    # -- what the trainer calls around each optimizer step ---------------------------------------
    def indexers(self) -> list[V4Attention]:
        return [m for m in self.modules() if isinstance(m, V4Attention) and m.indexer is not None]

    def warmup_trainable(self) -> tuple[int, list[nn.Parameter]] | None:
        """(steps, parameters): during the first `steps` optimizer steps only these may change
        (`model.attn.indexer_warmup=indexer_only`: the indexers'); None when everything trains."""
        a = self.cfg.attn
        if self.cfg.attention != "v4" or a.indexer_warmup != "indexer_only" or not a.indexer_warmup_steps:
            return None
        params = [p for m in self.indexers() for p in m.indexer.parameters()]
        return (a.indexer_warmup_steps, params) if params else None

    def on_step_start(self, step: int, lr_decaying: bool) -> None:
        """Before optimizer step `step` (0-based): CSA goes sparse after the indexer's warm-up,
        during which (`indexer_only`) the trunk is frozen; the MTP weight drops once the learning
        rate decays."""
        warming_up = step < self.cfg.attn.indexer_warmup_steps
        for module in self.indexers():
            module.sparse = not warming_up
        self.trunk_frozen = warming_up and self.warmup_trainable() is not None
        self.mtp_weight = self.cfg.mtp_weight_decayed if lr_decaying else self.cfg.mtp_weight

    def on_step_end(self, applied: bool = True) -> dict[str, float]:
        """After the optimizer step: MoE bias updates (none if the step was skipped), and the
        step's loss parts and expert loads (means over micro-batches and ranks) for the metrics."""
        metrics = {}
        if self.loss_count and len(self.loss_sums) > 1:
            keys = sorted(self.loss_sums)
            values = torch.stack([self.loss_sums[k] for k in keys]) / self.loss_count
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(values)
                values /= dist.get_world_size()
            metrics.update(zip((f"loss/{k}" for k in keys), values.tolist()))  # one device sync
            if self.mtp is not None:
                metrics["mtp_weight"] = self.mtp_weight
        self.loss_sums, self.loss_count = {}, 0
        moes = [(f"layer{i}", b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)]
        if self.mtp is not None and isinstance(self.mtp.block.ffn, MoE):
            moes.append(("mtp", self.mtp.block.ffn))
        if moes:
            loads = [moe.update_bias(applied and not self.trunk_frozen)["load_max_over_mean"] for _, moe in moes]
            biases = torch.cat([m.bias for _, m in moes])
            *loads, low, high = torch.stack([*loads, biases.min(), biases.max()]).tolist()  # one device sync
            metrics.update({f"moe/{name}/load_max_over_mean": v for (name, _), v in zip(moes, loads)})
            metrics["moe/load_max_over_mean"] = max(loads)
            metrics["moe/bias_min"], metrics["moe/bias_max"] = low, high
        return metrics

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: routed experts count only top_k of n_experts."""
        inactive = sum((m.gate_up.numel() + m.down.numel()) * (m.n_experts - m.top_k) // m.n_experts
                       for m in self.modules() if isinstance(m, MoE))
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 × active non-embedding parameters for the matmuls, plus 3 ×
        the attention scores and weighted values (dense: 4·d·T per layer, PaLM's accounting; V4:
        window, selected or all compressed entries, and the indexer, by the same convention)."""
        n = self.num_active_params() - self.embed.weight.numel()
        if self.head.weight is self.embed.weight:  # tied: counted once in the parameters, still a matmul
            n += self.head.weight.numel()
        if self.mtp is not None:  # the shared head runs a second time, on the MTP block's output;
            n += self.head.weight.numel()  # and the MTP's h_proj once per stream of the hyper-connections
            streams = self.cfg.n_streams if self.mtp.reduce is not None else 1
            n += (streams - 1) * self.mtp.h_proj.weight.numel()
        attention = sum(m.attention_flops(seq_len) if isinstance(m, V4Attention) else 4 * self.cfg.d_model * seq_len
                        for m in self.modules() if isinstance(m, (V4Attention, Attention)))
        return int(6 * n + 3 * attention)


def build_model(cfg, vocab_size: int) -> Transformer:
    return Transformer(cfg, vocab_size)
