"""The MoE's two grouped matmuls, `torch._grouped_mm` (one matmul per expert group) and the batched
matmul over groups padded to the largest: forward + backward of an expert's two projections
(gate_up, the model's clamped SwiGLU, down), alternating in one process. Routing is rarely even
(early in training above all, before the loss-free bias has balanced it), and the padded form
multiplies every group at the largest one's size: the skewed routing gives its experts 2, 1.7,
1.5, ... times the mean share down to a few rows.

    python -m benchmarks.moe [--model v4_tiny] [--tokens 4096 --rounds 20] [--device cuda --dtype bf16]

Prints the step time of each and padded ÷ grouped_mm (above 1: grouped_mm is faster).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, load_config, median
from model.layers import swiglu
from model.moe import grouped_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SKEW = (2.0, 1.7, 1.5, 1.0, 0.9, 0.6, 0.25, 0.05)  # multiples of the mean share, cycled over the experts


def routing(pairs: int, experts: int, skewed: bool) -> torch.Tensor:
    """Rows per expert summing to `pairs`: even, or in the SKEW profile."""
    share = torch.tensor([SKEW[e % len(SKEW)] if skewed else 1.0 for e in range(experts)])
    counts = (share / share.sum() * pairs).floor().long()
    counts[0] += pairs - counts.sum()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="v4_tiny", help="a configs/model preset with a MoE")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (the default run's 16 × 256)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32",
                    help="the operands' (CUDA's grouped kernel takes bf16 only: fp32 there is the looping fallback)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    m = load_config([f"model={args.model}"]).model
    e, d, h, k = m.moe.n_experts, m.d_model, m.moe.expert_hidden, m.moe.top_k
    print(f"model={args.model}: {e} experts, top-{k}, d_model {d}, expert_hidden {h}; {args.tokens} tokens, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} CPU threads); forward + backward of gate_up [{e}, {2 * h}, {d}] and down [{e}, {d}, {h}]")
    gen = torch.Generator().manual_seed(0)
    for skewed in (False, True):
        counts = routing(args.tokens * k, e, skewed)
        expert = torch.repeat_interleave(torch.arange(e), counts).to(device)
        x, gate_up, down = (torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
                            for shape in ((expert.numel(), d), (e, 2 * h, d), (e, d, h)))
        counts = counts.to(device)

        def step(grouped: bool):
            def run():
                hidden = grouped_linear(x, gate_up, expert, counts, use_grouped_mm=grouped)
                out = grouped_linear(swiglu(hidden, m.moe.clamp), down, expert, counts, use_grouped_mm=grouped)
                out.backward(torch.ones_like(out))
                if device.type == "cuda":  # time the kernels, not their launch
                    torch.cuda.synchronize()
            return run

        times = alternate({"grouped_mm": step(True), "padded": step(False)}, 1, args.rounds)
        ms = {name: 1e3 * median(v) for name, v in times.items()}
        label = "skewed" if skewed else "even"
        print(f"  {label:<6} routing, largest group {int(counts.max())} rows (mean {counts.float().mean():.0f}): "
              f"grouped_mm {ms['grouped_mm']:.2f} ms, padded {ms['padded']:.2f} ms; "
              f"padded / grouped_mm = {ms['padded'] / ms['grouped_mm']:.2f}x")


if __name__ == "__main__":
    main()
