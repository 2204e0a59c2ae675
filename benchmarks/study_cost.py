"""Cost per optimizer step of the optimizer study's configurations, for sizing its runs
(docs/results/optimizer_study.md): process CPU seconds on one thread, which other processes
sharing the cores inflate far less than wall time. One warm-up step, then the minimum of --steps.

    python -m benchmarks.study_cost [--steps 3] [--only NAME ...] [hydra overrides for all ...]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.common import benchmark_trainer

STUDY = ["data.seq_len=128", "trainer.micro_batch_size=16", "trainer.global_batch_size=16", "optim.warmup_steps=30"]
MUON = ["optim=muon", "optim.ns_dtype=fp32"]
CONFIGS = {
    "d128 adamw": [],
    "d128 muon": MUON,
    "d128 muon bf16 NS": ["optim=muon", "optim.ns_dtype=bf16"],
    "d256 adamw": ["model.d_model=256"],
    "d256 muon": [*MUON, "model.d_model=256"],
    **{f"L{n} {res} muon": [*MUON, f"model.n_layers={n}", f"model.residual={res}"]
       for res in ("residual", "hc", "mhc") for n in (4, 8, 16)},
    "d128 adamw bpe4096": ["data.tokenizer=bpe", "data.vocab_size=4096"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help=f"configurations to measure, of: {', '.join(CONFIGS)}")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --only {unknown}: accepted {', '.join(CONFIGS)}")
    base = None
    print(f"1 thread, CPU seconds per optimizer step (min of {args.steps} after one warm-up step)")
    for name in names:
        trainer = benchmark_trainer(["logger.wandb.mode=disabled", *STUDY, *CONFIGS[name], *args.overrides])
        trainer.train_step()
        cpu = []
        for _ in range(args.steps):
            start = time.process_time()
            trainer.train_step()
            cpu.append(time.process_time() - start)
        best = min(cpu)
        base = base or best
        print(f"  {name:<22} {best:6.3f} s  {best / base:5.2f}x  {trainer.tokens_per_step} tokens/step  "
              f"{trainer.n_params:,} parameters", flush=True)
        del trainer
        gc.collect()


if __name__ == "__main__":
    main()
