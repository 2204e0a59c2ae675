"""The default model against a minimal GPT of the same size and FLOPs per token, written the
simplest way (nanoGPT's shape): fused qkv, SDPA with is_causal, a GELU MLP, LayerNorm, learned
positions, a plain AdamW loop. The MLP's width makes its FLOPs per token those of our SwiGLU (two
matrices of width 3/2·h against our three of width h: 528 for the default model's h = 352, where
nanoGPT's 4·d = 512 would give the minimal GPT 1.5 % fewer FLOPs per token); `--mlp-width 512`
measures against nanoGPT's own width.

Three contenders train on the same batches, alternating in one process:
- `minimal`: the minimal GPT in a plain loop (forward, backward, clip, AdamW step);
- `ours-plain`: our model (`configs/model/...` as composed) in the same plain loop — the model's cost;
- `ours`: our trainer's full training step (`Trainer.train_step`: DeepSpeed engine, schedule,
  clipping, metrics) — what a run gets.
Prints tokens/s of each and the ratios to `minimal` (goal ≥ 1.0 for `ours`).

    python -m benchmarks.minimal_gpt [--steps 10 --rounds 6] [--profile] [hydra overrides ...]

`--profile` prints torch.profiler's top operators of one step of `ours-plain` and of `minimal`.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import alternate, benchmark_trainer, median
from data.loader import TokenLoader
from model import build_model
from model.transformer import ffn_hidden_size


class MinimalBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.fc_out = nn.Linear(d, mlp, bias=False), nn.Linear(mlp, d, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, max_seq_len: int, mlp: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_seq_len, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, n_heads, mlp) for _ in range(n_layers))
        self.ln, self.head = nn.LayerNorm(d, bias=False), nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, seq_len: int) -> int:
        """Same accounting as our model: 6 × non-embedding parameters + 3 × 4·d·T per layer."""
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(("tok", "pos")))
        d = self.tok.weight.size(1)
        return 6 * n + 3 * 4 * d * seq_len * len(self.blocks)


def plain_loop(model: nn.Module, loader: TokenLoader, accum: int, lr: float, clip: float, bf16: bool):
    """Forward and backward (under bf16 autocast when the run uses it, as the trainer does), clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    device = next(model.parameters()).device

    def step():
        for _ in range(accum):
            x, y = next(loader)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x.to(device), y.to(device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_step(name: str, step, rows: int = 25) -> None:
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n--- {name}: one step, top operators by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per contender per round")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (one more is warm-up)")
    ap.add_argument("--mlp-width", type=int, default=0,
                    help="the minimal GPT's MLP width (default 0: the width that matches our SwiGLU's FLOPs)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of one step of each model")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for launch.py")
    args = ap.parse_args()

    trainer = benchmark_trainer(["logger.wandb.mode=disabled", *args.overrides])
    cfg, m, t = trainer.cfg, trainer.cfg.model, trainer.cfg.trainer
    vocab = trainer.loader.manifest["vocab_size"]
    micro = trainer.micro_batch  # trainer.micro_batch_size as resolved (it may be `auto`)
    accum = t.global_batch_size // micro

    def loader():
        return TokenLoader(trainer.prepared, cfg.data.seq_len, micro, cfg.seed)

    torch.manual_seed(cfg.seed)
    mlp = args.mlp_width or round(1.5 * ffn_hidden_size(m.d_model, m.ffn_hidden))
    minimal = MinimalGPT(vocab, m.d_model, m.n_layers, m.n_heads, m.max_seq_len, mlp).to(trainer.device)
    torch.manual_seed(cfg.seed)
    ours = build_model(m, vocab).to(trainer.device)
    bf16 = trainer.precision == "bf16"
    contenders = {
        "minimal": plain_loop(minimal, loader(), accum, cfg.optim.lr, t.grad_clip, bf16),
        "ours-plain": plain_loop(ours, loader(), accum, cfg.optim.lr, t.grad_clip, bf16),
        "ours": trainer.train_step,
    }
    if args.profile:
        profile_step("minimal", contenders["minimal"])
        profile_step("ours-plain", contenders["ours-plain"])
    times = alternate(contenders, args.steps, args.rounds)
    tokens = t.global_batch_size * cfg.data.seq_len
    tps = {n: tokens / median(v) for n, v in times.items()}
    print(f"ours: {ours.num_params():,} params, {ours.flops_per_token(cfg.data.seq_len):,} FLOPs/token; "
          f"minimal (MLP width {mlp}): {sum(p.numel() for p in minimal.parameters()):,} params, "
          f"{minimal.flops_per_token(cfg.data.seq_len):,} FLOPs/token")
    print(f"{tokens} tokens/step, {args.rounds} rounds × {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"precision {trainer.precision}")
    for name, v in tps.items():
        spread = ", ".join(f"{tokens / s:,.0f}" for s in times[name])
        print(f"{name:>10}: {v:>10,.0f} tokens/s (median; rounds: {spread})")
    print(f" ratio: ours-plain / minimal = {tps['ours-plain'] / tps['minimal']:.3f}; "
          f"ours / minimal = {tps['ours'] / tps['minimal']:.3f}  (goal >= 1.0)")


if __name__ == "__main__":
    main()
