"""Framework overhead: our DeepSpeed trainer (`optim=adamw`) against a minimal PyTorch loop.

Both train the same model on the same batches with the same AdamW groups, schedule and clipping,
alternating in one process. Prints tokens/s of each and ours / plain (target ≥ 0.95).

    python -m benchmarks.overhead [--steps 20 --rounds 6] [hydra overrides ...]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, benchmark_trainer, median
from data.loader import TokenLoader
from model import build_model
from optim import build_scheduler
from optim.builder import adamw_groups
from train.batch import micro_batch_size


def plain_loop(cfg, prepared, vocab_size, device: torch.device, bf16: bool):
    """The loop nanoGPT would write: no engine, no callbacks; on the trainer's device and in its
    precision (bf16 autocast where the run resolves to it: the default on a GPU)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(adamw_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
    sched = build_scheduler(opt, o, cfg.trainer.max_steps)
    micro = micro_batch_size(cfg.trainer, 1)
    loader = TokenLoader(prepared, cfg.data.seq_len, micro, cfg.seed, global_batch=cfg.trainer.global_batch_size)
    accum = cfg.trainer.global_batch_size // micro

    def step():
        for _ in range(accum):
            x, y = next(loader)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x.to(device), y.to(device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per contender per round")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (one more is warm-up)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for launch.py")
    args = ap.parse_args()

    trainer = benchmark_trainer(args.overrides, start_callbacks=True)
    cfg = trainer.cfg
    contenders = {
        "plain": plain_loop(cfg, trainer.prepared, trainer.loader.manifest["vocab_size"], trainer.device,
                            trainer.precision == "bf16"),
        "ours": trainer.run_step,
    }
    times = alternate(contenders, args.steps, args.rounds)
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    tps = {n: tokens / median(t) for n, t in times.items()}
    print(f"model {trainer.n_params:,} params, {tokens} tokens/step, {args.rounds} rounds × {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}, wandb {cfg.logger.wandb.mode}")
    for name, v in tps.items():
        spread = ", ".join(f"{tokens / s:,.0f}" for s in times[name])
        print(f"{name:>6}: {v:>10,.0f} tokens/s (median; rounds: {spread})")
    print(f" ratio: ours / plain = {tps['ours'] / tps['plain']:.3f}  (target >= 0.95)")
    for cb in trainer.callbacks.values():
        cb.on_train_end(trainer, {})


if __name__ == "__main__":
    main()
