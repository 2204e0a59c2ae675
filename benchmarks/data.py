"""Data pipeline throughput on `data=pycode` (or the corpus the overrides name): preparation
(byte-level and BPE, from a cold cache) and loader delivery, printed next to what the default
model's training consumes.

Targets: loader ≥ 50× training consumption; BPE preparation of the full corpus < 120 s.

    python -m benchmarks.data [--vocab 4096] [--batches 2000] [--train-steps 10] [hydra overrides ...]
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import benchmark_trainer, load_config, scratch_dir
from data.loader import TokenLoader
from data.shards import load_manifest, prepare
from train.batch import micro_batch_size


def timed_prepare(cfg) -> tuple[float, dict]:
    start = time.perf_counter()
    prepared = prepare(cfg)
    return time.perf_counter() - start, load_manifest(prepared) | {"dir": prepared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--batches", type=int, default=2000, help="loader batches to time")
    ap.add_argument("--train-steps", type=int, default=10, help="training steps to time (after 3 warm-up)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cache = scratch_dir("bench-data-")
    rows = []
    for tokenizer in ("byte", "bpe"):
        cfg = load_config(["data=pycode", f"data.cache_dir={cache}", f"data.tokenizer={tokenizer}",
                           f"data.vocab_size={args.vocab}", *args.overrides]).data
        seconds, manifest = timed_prepare(cfg)
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        rows.append((tokenizer, seconds, tokens))
    byte_tokens = rows[0][2]

    trainer = benchmark_trainer(["data=pycode", f"data.cache_dir={cache}", "logger.wandb.mode=disabled",
                                 *args.overrides])
    cfg = trainer.cfg
    loader = TokenLoader(prepare(cfg.data), cfg.data.seq_len, micro_batch_size(cfg.trainer, 1), seed=0)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    loader_tps = args.batches * micro_batch_size(cfg.trainer, 1) * cfg.data.seq_len / (time.perf_counter() - start)

    for _ in range(3):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        trainer.train_step()
    train_tps = args.train_steps * trainer.tokens_per_step / (time.perf_counter() - start)

    print(f"data.source={cfg.data.source}: {byte_tokens:,} bytes in {manifest['splits']['train']['documents'] + manifest['splits']['val']['documents']} documents")
    for tokenizer, seconds, tokens in rows:
        label = "byte-level" if tokenizer == "byte" else f"BPE {args.vocab} (incl. training)"
        print(f"prepare {label:<28} {seconds:7.1f} s  {tokens / seconds:>12,.0f} tokens/s  "
              f"{byte_tokens / seconds:>12,.0f} bytes/s  ({tokens:,} tokens)")
    print(f"loader (seq {cfg.data.seq_len}, batch {micro_batch_size(cfg.trainer, 1)}) {loader_tps:>14,.0f} tokens/s")
    print(f"training, {' '.join(args.overrides) or 'default model':<26} {train_tps:>14,.0f} tokens/s")
    print(f"ratio loader / training = {loader_tps / train_tps:,.0f}x  (target >= 50x); "
          f"BPE preparation {rows[1][1]:.1f} s (target < 120 s)")


if __name__ == "__main__":
    main()
