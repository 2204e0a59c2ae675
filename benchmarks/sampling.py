"""Sampling throughput with and without the decoding cache, for the default model and v4_tiny
(weights as initialised: throughput does not depend on them), alternating in one process.

Each measurement decodes `--tokens` tokens after a 16-token prompt, the context at the run's
data.seq_len (256 by default), so the uncached side recomputes up to 256 tokens per new token.
A model whose attention has no cache here is reported as such.

    python -m benchmarks.sampling [--tokens 200 --rounds 3] [--models "" model=v4_tiny]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, load_config, median
from model import build_model
from model.generate import Sampling, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=["", "model=v4_tiny"], help="model overrides, one string each")
    args = ap.parse_args()
    for spec in args.models:
        cfg = load_config(spec.split())
        torch.manual_seed(0)
        model = build_model(cfg.model, 256).eval()
        prompt = torch.randint(1, 256, (1, 16))

        def decode(use_cache: bool):
            return lambda: sum(1 for _ in generate(model, prompt, args.tokens, Sampling(0.8), cfg.data.seq_len,
                                                   use_cache=use_cache, generator=torch.Generator().manual_seed(0)))

        contenders = {"no cache": decode(False)}
        if model.supports_cache:
            contenders["cache"] = decode(True)
        times = alternate(contenders, 1, args.rounds)
        rate = {k: args.tokens / median(v) for k, v in times.items()}
        print(f"{spec or 'default model'} ({model.num_params():,} parameters), {args.tokens} tokens after a 16-token "
              f"prompt, context {cfg.data.seq_len}, median of {args.rounds} rounds:")
        for k, v in rate.items():
            print(f"  {k:<9} {v:8.1f} tokens/s")
        if "cache" in rate:
            print(f"  cache / no cache: {rate['cache'] / rate['no cache']:.2f}x")
        else:
            print("  cache: not available for this model's attention (V4 decoding recomputes the context)")


if __name__ == "__main__":
    main()
