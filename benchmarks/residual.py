"""Residual variants on the default model: plain residual, HC and mHC (n = 4 streams), and mHC
on its eager PyTorch path (`model.fused_hc=false`) to show what the fused kernels buy.

Each variant runs forward, backward and an AdamW step on the same batch, alternating in one
process; prints the median step time and the activation memory (bytes of tensors saved for
backward during one forward), each as a ratio to the plain residual.
Target: mHC step time ≤ 1.15× residual on CPU.

    python -m benchmarks.residual [--steps 5 --rounds 5] [hydra overrides ...]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, load_config, median
from model import build_model
from train.batch import micro_batch_size

VARIANTS = {"residual": [], "hc": ["model.residual=hc", "model.n_streams=4"],
            "mhc": ["model.residual=mhc", "model.n_streams=4"],
            "mhc-eager": ["model.residual=mhc", "model.n_streams=4", "model.fused_hc=false"]}


def saved_activation_bytes(model, idx, targets) -> int:
    """Bytes of the tensors autograd keeps for backward: what a forward holds until backward. Not
    the weights: a Linear saves a transposed view of its weight, no Parameter but its storage."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets).backward()
    model.zero_grad(set_to_none=True)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = load_config(args.overrides)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (micro_batch_size(base.trainer, 1), base.data.seq_len), generator=gen)
    targets = torch.randint(0, 256, idx.shape, generator=gen)
    steps, memory = {}, {}
    for name, extra in VARIANTS.items():
        cfg = load_config([*args.overrides, *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model, 256)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        memory[name] = saved_activation_bytes(model, idx, targets)

        def step(model=model, opt=opt):
            model(idx, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    times = alternate(steps, args.steps, args.rounds)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    print(f"d_model={base.model.d_model}, {base.model.n_layers} layers, batch {tuple(idx.shape)}, "
          f"{torch.get_num_threads()} threads; "
          f"{args.rounds} rounds × {args.steps} steps (forward + backward + AdamW)")
    for name in VARIANTS:
        print(f"  {name:<10} {ms[name]:8.1f} ms  {ms[name] / ms['residual']:5.2f}x   activations "
              f"{memory[name] / 2**20:7.1f} MiB  {memory[name] / memory['residual']:5.2f}x")


if __name__ == "__main__":
    main()
