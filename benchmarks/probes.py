"""Wall-time overhead of the stability probes at a given interval: two trainers of the same
config, probes on and off, alternating blocks of `every` steps in one process.
Target: ≤ 5 % at the interval the presets use (probes.every=50).

    python -m benchmarks.probes [--every 50 --rounds 3] [hydra overrides ...]
"""
from __future__ import annotations

import argparse

from benchmarks.common import alternate, benchmark_trainer, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    trainers = {}
    for name, every in (("probes off", 0), (f"probes every {args.every}", args.every)):
        trainers[name] = benchmark_trainer(["logger.wandb.mode=disabled", f"probes.every={every}", *args.overrides],
                                           start_callbacks=True)
    times = alternate({k: t.run_step for k, t in trainers.items()}, args.every, args.rounds)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    off, on = ms["probes off"], ms[f"probes every {args.every}"]
    print(f"{' '.join(args.overrides) or 'default config'}: {args.rounds} rounds × {args.every} steps")
    for k, v in ms.items():
        print(f"  {k:<18} {v:8.1f} ms/step")
    print(f"  overhead {100 * (on - off) / off:+.1f} %  (target <= 5 %)")


if __name__ == "__main__":
    main()
