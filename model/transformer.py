"""The decoder-only language model: embedding, a stack of blocks, final norm, LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.block import Block
from model.layers import rope_tables
from model.mhc import StreamReduce


def ffn_hidden_size(d_model: int, requested: int) -> int:
    """SwiGLU width: the requested size, or 8/3·d rounded up to a multiple of 32 (same FLOPs as 4·d GELU)."""
    if requested > 0:
        return requested
    return 32 * math.ceil(8 * d_model / 3 / 32)


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
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, hidden, cfg.norm_eps, cfg.dropout, residual, self.n_streams, i,
                  cfg.sinkhorn_iters)
            for i in range(cfg.n_layers)
        )
        self.reduce = StreamReduce(residual, self.n_streams, cfg.d_model) if self.n_streams > 1 else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        # Not persistent: the tables are a pure function of the config, so checkpoints stay small.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

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

    def output_parameters(self) -> list[nn.Parameter]:
        """Parameters of the output head, which optimizers treat apart from hidden matrices."""
        return [self.head.weight]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.embed(idx)
        if self.n_streams > 1:  # the embedding, copied into every stream (a real copy: matmuls
            # over a stride-0 expanded tensor fall back to a per-token loop, 8x slower)
            x = x.unsqueeze(-2).expand(*x.shape[:-1], self.n_streams, x.size(-1)).contiguous()
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        if self.reduce is not None:
            x = self.reduce(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N for the matmuls plus attention's 12·L·d·T (PaLM's accounting)."""
        n = sum(p.numel() for n_, p in self.named_parameters() if not n_.startswith("embed"))
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len


def build_model(cfg, vocab_size: int) -> Transformer:
    return Transformer(cfg, vocab_size)
