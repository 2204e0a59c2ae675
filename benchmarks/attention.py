"""V4 attention against dense attention: KV-cache bytes and attention FLOPs per token at long
context (analytic, from the shapes the modules implement), and measured CPU forward time.

1. For a model config (default `model=v4_small`) and its dense twin (`model.attention=dense`,
   same width, heads and depth): per generated token at context L ∈ {4K, 16K, 64K}, the KV cache
   held per token of context (bf16) and the attention FLOPs of that token (scores + weighted
   values, plus the indexer for CSA), summed over layers; ratios v4 / dense next to V4's
   published ratios (which are against V3.2's MLA, not dense MHA).
2. One attention layer's forward at T ∈ {2K, 4K, 8K} (batch 1, fp32, CPU): dense causal SDPA
   against V4 window, CSA (sparse top-k) and HCA layers of the same config, alternating.

    python -m benchmarks.attention [--model v4_small --rounds 3]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, load_config, median
from model.attention import V4Attention, layer_kinds
from model.layers import Attention, rope_tables

CONTEXTS = (4096, 16384, 65536)
PUBLISHED = "V4 report at 1M context vs V3.2: Flash 10 % FLOPs / 7 % KV cache; Pro 27 % / 10 %"
BYTES = 2  # bf16 cache


def dense_costs(d_model: int, n_layers: int, context: int) -> tuple[float, float]:
    """(KV bytes per token of context, attention FLOPs of the token at `context`)."""
    return n_layers * 2 * d_model * BYTES, n_layers * 4 * d_model * context


def v4_costs(cfg, context: int) -> tuple[float, float]:
    a, h = cfg.attn, cfg.n_heads
    kv_bytes = flops = 0.0
    for kind in layer_kinds(cfg.n_layers, a.layers):
        ratio = {"window": 0, "csa": a.csa_ratio, "hca": a.hca_ratio}[kind]
        entries = context // ratio if ratio else 0
        cached = min(a.window, context) * a.head_dim + entries * a.head_dim  # K = V: one vector each
        attended = min(a.window, context) + (min(a.csa_topk, entries) if kind == "csa" else entries)
        flops += 4 * h * a.head_dim * attended
        if kind == "csa":  # the indexer keeps its own key per entry and scores every entry
            cached += entries * a.index_dim
            flops += 2 * a.index_heads * a.index_dim * entries
        kv_bytes += cached * BYTES / context
    return kv_bytes, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="v4_small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="2048,4096,8192")
    args = ap.parse_args()
    cfg = load_config([f"model={args.model}"]).model
    a = cfg.attn
    print(f"model={args.model}: d={cfg.d_model}, {cfg.n_heads} heads, {cfg.n_layers} layers "
          f"{layer_kinds(cfg.n_layers, a.layers)}; window {a.window}, CSA 1/{a.csa_ratio} top-{a.csa_topk}, "
          f"HCA 1/{a.hca_ratio}, head_dim {a.head_dim}\n")
    print(f"{'context':>8} {'KV B/token dense':>17} {'v4':>9} {'ratio':>7}   {'attn FLOPs/token dense':>22} "
          f"{'v4':>11} {'ratio':>7}")
    for context in CONTEXTS:
        kv_d, fl_d = dense_costs(cfg.d_model, cfg.n_layers, context)
        kv_v, fl_v = v4_costs(cfg, context)
        print(f"{context:>8,} {kv_d:>17,.0f} {kv_v:>9,.0f} {kv_v / kv_d:>6.1%}   {fl_d:>22,.0f} {fl_v:>11,.0f} "
              f"{fl_v / fl_d:>6.1%}")
    print(f"published: {PUBLISHED}\n")

    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    top = max(lengths)
    layers = {"dense": Attention(cfg.d_model, cfg.n_heads, 0.0)}
    for kind in ("window", "csa", "hca"):
        layers[kind] = V4Attention(cfg.d_model, cfg.n_heads, a, kind, top, cfg.norm_eps)
        layers[kind].sparse = True
    cos, sin = rope_tables(top, cfg.d_model // cfg.n_heads, cfg.rope_theta)
    print(f"forward time of one attention layer, batch 1, fp32, {torch.get_num_threads()} CPU threads "
          f"(median of {args.rounds} alternating rounds):")
    print(f"{'T':>6} " + " ".join(f"{k + ' ms':>12}" for k in layers) + "   v4 / dense (window, csa, hca)")
    for t in lengths:
        x = torch.randn(1, t, cfg.d_model)

        def forward(layer):
            def run():
                with torch.no_grad():
                    layer.eval()(x, cos, sin)
            return run
        times = alternate({k: forward(m) for k, m in layers.items()}, steps=1, rounds=args.rounds)
        ms = {k: 1e3 * median(v) for k, v in times.items()}
        print(f"{t:>6} " + " ".join(f"{v:>12.1f}" for v in ms.values()) + "   "
              + ", ".join(f"{ms[k] / ms['dense']:.2f}x" for k in ("window", "csa", "hca")))


if __name__ == "__main__":
    main()
