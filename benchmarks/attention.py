"""V4 attention against dense attention: KV-cache bytes and attention FLOPs per token at long
context (analytic, from the shapes the modules implement), and measured CPU forward time.

1. For a model config (default `model=v4_small`) and its dense twin (`model.attention=dense`,
   same width, heads and depth): per generated token at context L ∈ {4K, 16K, 64K}, the KV cache
   held per token of context (bf16) and the attention FLOPs of that token (scores + weighted
   values, plus the indexer for CSA), summed over layers; ratios v4 / dense next to V4's
   published ratios (which are against V3.2's MLA, not dense MHA).
2. One attention layer's forward at T ∈ {2K, 4K, 8K} (batch 1, fp32, CPU): dense causal SDPA
   against V4 window, CSA (sparse top-k) and HCA layers of the same config, alternating.
3. `--measure memory` (or `both`): peak memory of one attention layer's forward + backward (training mode, CSA after
   the indexer's warm-up) at the same lengths: the bytes allocated beyond what existed before
   (input and weights), from torch.profiler's allocation events on CPU or CUDA's peak statistics
   on a GPU; ratios T / 2K (linear growth: 4× at 8K) and V4 / dense. Then the same for one whole
   V4 layer as the model builds it (its mHC streams, attention of each kind, MoE), from the
   streams in to the streams out.
4. `--measure step`: the time of that forward + backward. Beyond `model.attn.query_chunk` queries
   (`--query-chunk N`; 0: one pass) V4 layers recompute each chunk's scores in backward: memory
   for time, which 3 and 4 measure with and without.

    python -m benchmarks.attention [--model v4_small --rounds 3 --measure time|memory|both|step
                                    --query-chunk N --device cpu|cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch

from benchmarks.common import alternate, load_config, median
from model import build_model
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


def peak_memory_bytes(run, device: torch.device) -> int:
    """Peak bytes allocated while `run()` runs, over what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # "Total Allocated" is a running total that does not start at 0 with each profiler: it holds
    # what earlier ones saw allocated and not freed. What run() adds is measured from the total
    # before its first event.
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - base


def training_step(layer, x: torch.Tensor, cos, sin, *extra):
    """One training forward + backward of `layer` on x (which requires grad), gradients dropped.
    The auxiliary losses the layer keeps (CSA's indexer KL, the MoE's balance) join the backward,
    as in the model's loss, and are dropped with it: kept, they would hold their graphs into the
    next measurement."""
    def run():
        loss = layer.train()(x, cos, sin, *extra).sum()
        for module in layer.modules():
            if getattr(module, "aux_loss", None) is not None:
                loss = loss + module.aux_loss
                module.aux_loss = None
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return run


def memory_table(layers: dict, d_model: int, lengths: list[int], cos, sin, device, what: str = "attention layer",
                 n_streams: int = 0) -> None:
    """`n_streams` > 0: the layers are blocks, called on [1, T, n_streams, d] streams and token ids."""
    print(f"\npeak memory of one {what}'s forward + backward, batch 1, fp32, {device} (MiB):")
    dense = "dense" in layers
    print(f"{'T':>6} " + " ".join(f"{k:>10}" for k in layers) + ("   v4 / dense (window, csa, hca)" if dense else ""))
    peaks: dict[int, dict[str, int]] = {}
    for t in lengths:
        shape = (1, t, n_streams, d_model) if n_streams else (1, t, d_model)
        x = torch.randn(*shape, device=device, requires_grad=True)
        extra = (torch.randint(0, 256, (1, t), device=device),) if n_streams else ()
        peaks[t] = {k: peak_memory_bytes(training_step(m, x, cos[:t], sin[:t], *extra), device)
                    for k, m in layers.items()}
        print(f"{t:>6} " + " ".join(f"{v / 2**20:>10.1f}" for v in peaks[t].values()) + ("   " + ", ".join(
            f"{peaks[t][k] / peaks[t]['dense']:.2f}x" for k in ("window", "csa", "hca")) if dense else ""))
    first = lengths[0]
    for t in lengths[1:]:
        print(f"T={t} / T={first}: " + ", ".join(f"{k} {peaks[t][k] / peaks[first][k]:.2f}x" for k in layers)
              + f"   (linear: {t / first:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="v4_small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--measure", choices=("time", "memory", "both", "step"), default="time",
                    help="forward time, peak memory of forward + backward, both, or forward + backward time")
    ap.add_argument("--query-chunk", type=int, default=None,
                    help="model.attn.query_chunk of the V4 layers (default: the preset's; 0: one pass)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = load_config([f"model={args.model}"]).model
    a = cfg.attn
    if args.query_chunk is not None:
        a.query_chunk = args.query_chunk
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
    layers = {k: m.to(device) for k, m in layers.items()}
    cos, sin = (t.to(device) for t in rope_tables(top, cfg.d_model // cfg.n_heads, cfg.rope_theta))
    if args.measure in ("memory", "both"):
        memory_table(layers, cfg.d_model, lengths, cos, sin, device)
        memory_table(v4_blocks(cfg, top, device), cfg.d_model, lengths, cos, sin, device,
                     what="V4 layer (mHC, attention, MoE)", n_streams=cfg.n_streams)
    if args.measure == "memory":
        return
    time_table(layers, cfg.d_model, lengths, cos, sin, device, args.rounds, backward=args.measure == "step")


def v4_blocks(cfg, seq_len: int, device) -> dict:
    """One layer of each attention kind from the model as built and initialised for `seq_len`
    tokens: the first with a routed MoE, else the first (hash-routed); CSA past the indexer's
    warm-up."""
    cfg = copy.deepcopy(cfg)
    cfg.max_seq_len, cfg.mtp_depth = seq_len, 0
    model = build_model(cfg, 256)
    blocks = {}
    for i in sorted(range(cfg.n_layers), key=lambda i: i < cfg.moe.hash_layers):  # routed first
        blocks.setdefault(model.kinds[i], model.blocks[i])
    for block in blocks.values():
        block.attn.sparse = True
    return {k: blocks[k].to(device) for k in ("window", "csa", "hca") if k in blocks}


def time_table(layers: dict, d_model: int, lengths: list[int], cos, sin, device, rounds: int, backward: bool) -> None:
    what = "forward + backward (training)" if backward else "forward"
    print(f"\n{what} time of one attention layer, batch 1, fp32, {device}, {torch.get_num_threads()} CPU threads "
          f"(median of {rounds} alternating rounds):")
    print(f"{'T':>6} " + " ".join(f"{k + ' ms':>12}" for k in layers) + "   v4 / dense (window, csa, hca)")
    for t in lengths:
        x = torch.randn(1, t, d_model, device=device, requires_grad=backward)

        def forward(layer):
            step = training_step(layer, x, cos, sin)

            def run():
                if backward:
                    step()
                else:
                    with torch.no_grad():
                        layer.eval()(x, cos, sin)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return run
        times = alternate({k: forward(m) for k, m in layers.items()}, steps=1, rounds=rounds)
        ms = {k: 1e3 * median(v) for k, v in times.items()}
        print(f"{t:>6} " + " ".join(f"{v:>12.1f}" for v in ms.values()) + "   "
              + ", ".join(f"{ms[k] / ms['dense']:.2f}x" for k in ("window", "csa", "hca")))


if __name__ == "__main__":
    main()
