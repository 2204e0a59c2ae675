"""trainer.compile's worth: tokens/s of the trainer's step compiled ÷ eager for one configuration,
or (`--pair`) two configurations both compiled (both eager with `--eager`), e.g. mHC ÷ residual
step time, or V4 ÷ the dense default. Contenders train alternately in one process after a warm-up
that holds the compilation (its time is printed apart). Compiled against eager, both train on the
same batches from the same initialisation, and the largest relative difference of their losses at
equal steps is printed too: on a new backend, the one run checks both speed and agreement.

    python -m benchmarks.compile [--steps 5 --rounds 4] [hydra overrides ...]
    python -m benchmarks.compile --pair model.residual=residual model.residual=mhc [overrides ...]
    python -m benchmarks.compile --eager --pair model=small experiment=v4 model.attn.indexer_warmup_steps=0

A contender of several overrides is one quoted argument, the overrides separated by spaces:
`--pair model=small "model.residual=mhc model.mtp_depth=1 optim=muon"`.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import alternate, benchmark_trainer, median
from train.compile import compile_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per contender per round")
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds (one more is warm-up)")
    ap.add_argument("--pair", nargs=2, metavar=("BASE", "OTHER"),
                    help="compare two contenders, both compiled, instead of compiled against eager; "
                         "each one or more overrides separated by spaces")
    ap.add_argument("--eager", action="store_true", help="with --pair: both contenders eager")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for launch.py")
    args = ap.parse_args()
    if args.pair:
        if args.pair[0] == args.pair[1]:
            ap.error(f"--pair: both contenders are {args.pair[0]!r}")
        runs = {o: [*o.split(), f"trainer.compile={str(not args.eager).lower()}"] for o in args.pair}
    else:
        runs = {"eager": ["trainer.compile=false"], "compiled": ["trainer.compile=true"]}
    # every contender's loss at each step: without --pair, the compiled run against the eager one on the
    # same batches (both trainers start from the same seed and data position)
    trainers, losses = {}, {}
    for name, extra in runs.items():
        trainer = benchmark_trainer([*args.overrides, *extra])
        start, compiling = time.perf_counter(), compile_seconds()
        losses[name] = [trainer.train_step()["loss"]]  # the first step compiles (and warms the allocator)
        print(f"{name}: first step {time.perf_counter() - start:.1f} s, of which compiling "
              f"{compile_seconds() - compiling:.1f} s", flush=True)
        trainers[name] = trainer
    steps = {n: lambda n=n: losses[n].append(trainers[n].train_step()["loss"]) for n in trainers}
    times = alternate(steps, args.steps, args.rounds)
    tokens = {n: t.tokens_per_step for n, t in trainers.items()}  # a pair may differ in batch or length
    tps = {n: tokens[n] / median(ts) for n, ts in times.items()}
    print(f"overrides: {' '.join(args.overrides) or '(defaults)'}; tokens/step "
          f"{', '.join(f'{n} {k}' for n, k in tokens.items())}; {args.rounds} rounds × "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}")
    for n, v in tps.items():
        mfu = trainers[n].utilisation.metrics(v)["mfu"]
        print(f"{n:>24}: {v:>10,.0f} tokens/s, {1e3 * median(times[n]):.0f} ms/step, MFU {mfu:.3f} (median; rounds: "
              f"{', '.join(f'{1e3 * s:.0f}' for s in times[n])} ms)")
    print(f"peak: {next(iter(trainers.values())).utilisation.describe()}")
    a, b = list(tps)
    if not args.pair:
        worst = max(abs(x - y) / abs(y) for x, y in zip(losses[b], losses[a]))
        print(f"losses at the same {len(losses[a])} steps: largest |{b} - {a}| / |{a}| = {worst:.2e}")
    print(f" ratio tokens/s {b} ÷ {a} = {tps[b] / tps[a]:.3f}; step time {b} ÷ {a} = "
          f"{median(times[b]) / median(times[a]):.3f}")


if __name__ == "__main__":
    main()
