"""Optimizer step time: our Muon (torch-equivalent and V4 modes) against torch.optim.Muon and
torch.optim.AdamW, on the hidden matrices of the default model and of a ~100M-parameter config,
alternating in one process; plus the optimizer's share of a full training step (default model).

Target: ours in torch-equivalent mode ≤ 0.7× torch.optim.Muon's step time, with identical updates.

    python -m benchmarks.optim_step [--steps 10 --rounds 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import alternate, benchmark_trainer, load_config, median
from model import build_model
from optim.muon import Muon
from optim.params import classify_parameters

MODELS = {
    "default (d=128, 4 layers)": [],
    "~100M (d=768, 14 layers)": ["model.d_model=768", "model.n_layers=14", "model.n_heads=12"],
}
CONTENDERS = {
    "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    "ours, torch-equivalent": lambda ps: Muon(ps, lr=0.02),
    "ours, V4 (hybrid NS 10 it, bf16)": lambda ps: Muon(ps, lr=0.02, momentum_type="classical", ns_schedule="v4_hybrid",
                                                          adjust_lr_fn="match_rms_adamw", rms_target=0.18),
    "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.02, foreach=True),
}


def step_fn(make, matrices):
    params = [torch.nn.Parameter(p.detach().clone()) for p in matrices]  # whole matrices, as torch sees them
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    return opt.step


def check_identical(matrices) -> float:
    ref = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    a, b = torch.optim.Muon(ref, lr=0.02), Muon(ours, lr=0.02)
    for _ in range(3):
        for x, y in zip(ref, ours):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    return max((x - y).abs().max().item() for x, y in zip(ref, ours))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, overrides in MODELS.items():
        cfg = load_config(overrides)
        model = build_model(cfg.model, 256)
        matrices = [p for _, p in classify_parameters(model)["matrix"]]
        n = sum(p.numel() for p in model.parameters())
        big = n > 10_000_000  # seconds per step on 2 CPU cores: fewer steps and rounds
        steps, rounds = (max(1, args.steps // 5), max(2, args.rounds // 2)) if big else (args.steps, args.rounds)
        times = alternate({k: step_fn(make, matrices) for k, make in CONTENDERS.items()}, steps, rounds)
        ms = {k: 1e3 * median(v) for k, v in times.items()}
        print(f"\n{label}: {n:,} parameters, {len(matrices)} hidden matrices "
              f"({sum(p.numel() for p in matrices):,} elements); max |ours - torch| after 3 steps "
              f"{check_identical(matrices):.1e}")
        for k, v in ms.items():
            print(f"  {k:<34} {v:9.2f} ms   {v / ms['torch.optim.Muon']:.2f}x torch Muon   "
                  f"{v / ms['torch.optim.AdamW']:.1f}x AdamW")

    # The optimizer's share of a full training step of the default model with optim=muon.
    trainer = benchmark_trainer(["optim=muon", "logger.wandb.mode=disabled"])
    optimizer = trainer.optimizer
    spent = []
    original = optimizer.step

    def timed_step(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        spent.append(time.perf_counter() - start)
        return out

    optimizer.step = timed_step
    for _ in range(3):
        trainer.train_step()
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.steps * 2):
        trainer.train_step()
    total = time.perf_counter() - start
    print(f"\ndefault model, optim=muon (V4 recipe): optimizer step {1e3 * sum(spent) / len(spent):.1f} ms of a "
          f"{1e3 * total / (args.steps * 2):.1f} ms training step = {100 * sum(spent) / total:.1f} %")


if __name__ == "__main__":
    main()
