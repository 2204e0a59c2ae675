"""Evaluate a trained run on any corpus:

    python -m train.evaluate RUN [data=PRESET] [data.KEY=VALUE ...] [split=val|train|all]
                                 [max_batches=N] [micro_batch_size=N] [name=NAME] [overwrite=true] [device=auto]

Without data arguments the run's own data is scored; `data.KEY=VALUE` alone changes that data
(e.g. `data.seq_len=128`); `data=PRESET` or `data.source=...` scores another corpus (a preset, or
the user's files: `data.source=files data.path=PATH`), tokenized with the run's tokenizer at the
run's sequence length. Batches are built as validation builds them: windows of seq_len + 1 tokens at stride
seq_len, the split's windows in order, `micro_batch_size` per forward pass, the model's own
next-token loss. So `split=val max_batches=<trainer.eval_batches>` on a one-rank run's own data
gives its `final_val_loss` bit for bit.

Writes RUN/eval/<name>.json (nothing else in the run directory changes); one there from another
evaluation (other checkpoint, data, split or batches) is refused unless `overwrite=true`:
- `loss`: mean next-token loss in nats (mean of the batches' means, a short last batch weighted
  by its share of a full one), `perplexity` = exp(loss), `bits_per_token`;
- `bits_per_byte` = total nats / (ln 2 · UTF-8 bytes of the text the scored tokens stand for):
  comparable across tokenizers. Bytes are counted per token id (byte-level and byte-level BPE
  tokenizers: exact; end-of-document tokens stand for no bytes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from train.cli import compose_args, fail, split_args
from train.load import EXIT_CONFIG, EXIT_DATA, LoadError, load_run, tokenizer_spec
from train.manifest import atomic_write

USAGE = "python -m train.evaluate RUN_OR_CHECKPOINT_DIR [data=PRESET] [data.path=PATH] [split=val|train|all] ..."
SPLITS = {"val": ("val",), "train": ("train",), "all": ("val", "train")}


def eval_data(args, overrides: list[str], run_cfg, run_dir: Path):
    """The data to score: the run's own, with the given data.KEY values on top; another corpus
    (`data=PRESET` or `data.source=...`, the preset's defaults under the given values); always the
    run's tokenizer, and the run's sequence length and data cache unless given."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    keys = [k.removeprefix("data.") for k in given if k.startswith("data.")]
    if "tokenizer" in keys:
        raise LoadError("data.tokenizer cannot be set: a run is scored with its own tokenizer", EXIT_CONFIG)
    if "data" in given or "source" in keys:
        data = args.data
        data.tokenizer = tokenizer_spec(run_cfg, run_dir)
        for key in ("seq_len", "cache_dir"):
            if key not in keys:
                setattr(data, key, getattr(run_cfg.data, key))
        return data
    data = dataclasses.replace(run_cfg.data, tokenizer=tokenizer_spec(run_cfg, run_dir))  # a learned one: the run's
    for key in keys:  # the composed (typed) values
        setattr(data, key, getattr(args.data, key))
    return data


def check_name(name: str | None) -> None:
    """`name` becomes eval/<name>.json: a plain file name, so the record lands in eval/ and nowhere else."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise LoadError(f"invalid argument name={name!r}. Accepted: a file name of letters, digits, _, . and - "
                        f"(not starting with .)", EXIT_CONFIG)


SAME_EVALUATION = ("checkpoint", "split", "data", "max_batches", "micro_batch_size", "precision")


def check_replace(out: Path, record: dict, overwrite: bool) -> None:
    """An eval/<name>.json of another evaluation stays unless `overwrite`; the same evaluation's is
    replaced (a re-run)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return  # none, or not a record
    differ = [k for k in SAME_EVALUATION if old.get(k) != record.get(k)]
    if differ and not overwrite:
        raise LoadError(f"{out} holds another evaluation ({', '.join(f'{k}: {old.get(k)!r}' for k in differ)[:300]}); "
                        f"give another name=NAME, or overwrite=true to replace it", EXIT_CONFIG)


def default_name(data, split: str) -> str:
    base = {"files": Path(data.path or "files").stem, "hub": str(data.name)}.get(data.source, data.source)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}_{split}")


def run_micro_batch(cfg, ckpt: Path) -> int:
    """The micro-batch the run validated with: trainer.micro_batch_size (`auto` by default) resolved
    at the checkpoint's world size, as the trainer resolved it."""
    from train.batch import micro_batch_size
    from train.manifest import read

    world = read(ckpt).get("world_size", 1)
    return micro_batch_size(cfg.trainer, world)


def run_precision(run_dir: Path, cfg, device: torch.device) -> str:
    """The precision the run validated in (its summary's, resolved where it trained: precision=auto
    is fp32 on a CPU and bf16 on a GPU), else the config's resolved on `device`."""
    from train.trainer import resolve_precision

    summary = run_dir / "summary.json"
    recorded = json.loads(summary.read_text()).get("precision") if summary.is_file() else None
    return recorded or resolve_precision(cfg.trainer.precision, device)


@torch.no_grad()
def score(model, windows: list, micro_batch: int, max_batches: int, byte_lengths: np.ndarray | None,
          autocast_dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Next-token loss and bits per byte over the windows of `windows` (data.loader.Windows, one
    per split), batched as validation batches them."""
    device = model.embed.weight.device
    plan = [(w, i) for w in windows for i in range(0, len(w), micro_batch)]
    if max_batches:
        plan = plan[:max_batches]
    total = torch.zeros((), device=device)  # float32 and summed as Trainer.evaluate sums
    weight, nats, tokens, n_bytes, n_windows = 0.0, 0.0, 0, 0, 0
    for w, i in tqdm(plan, desc="evaluate", unit="batch", disable=not progress, file=sys.stderr):
        x, y = w.batch(np.arange(i, min(i + micro_batch, len(w))))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(x.to(device), y.to(device)).float()
        share = x.size(0) / micro_batch  # 1.0 for every full batch
        total += loss * share
        weight += share
        nats += float(loss) * y.numel()
        tokens += y.numel()
        n_windows += x.size(0)
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[y.numpy()].sum())
    if not plan:
        raise LoadError("there is nothing to evaluate: the chosen split holds no window of seq_len + 1 tokens", EXIT_DATA)
    loss = (total / weight).item()
    return {
        "loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
        "bits_per_byte": nats / (math.log(2) * n_bytes) if n_bytes else None,
        "nats": nats, "tokens": tokens, "bytes": n_bytes if byte_lengths is not None else None,
        "windows": n_windows, "batches": len(plan),
    }


def main(argv: list[str] | None = None) -> int:
    from data.loader import Windows
    from data.shards import prepare
    from data.sources import DataError

    argv = sys.argv[1:] if argv is None else argv
    try:
        run, overrides = split_args(argv, USAGE)
        args = compose_args("evaluate", overrides)
        if args.split not in SPLITS:
            raise LoadError(f"invalid argument split={args.split!r}. Accepted: {', '.join(SPLITS)}.", EXIT_CONFIG)
        if args.max_batches < 0 or args.micro_batch_size < 0:
            raise LoadError("max_batches and micro_batch_size take integers ≥ 0 (0: all / the run's)", EXIT_CONFIG)
        check_name(args.name)
        loaded = load_run(run, args.device)
        cfg = loaded.config
        data = eval_data(args, overrides, cfg, loaded.run_dir)
        if data.seq_len > loaded.model.max_seq_len:
            raise LoadError(f"invalid argument data.seq_len={data.seq_len}. Accepted: at most the model's "
                            f"max_seq_len={loaded.model.max_seq_len}.", EXIT_CONFIG)
        prepared = prepare(data)
        windows = [Windows(prepared, s, data.seq_len) for s in SPLITS[args.split]]
        if windows[0].vocab_size > loaded.model.vocab_size:
            raise LoadError(f"{prepared} has a vocabulary of {windows[0].vocab_size}; the model's is "
                            f"{loaded.model.vocab_size}", EXIT_DATA)
    except LoadError as e:
        return fail(str(e), e.code)
    except DataError as e:
        return fail(str(e), EXIT_DATA)
    device = loaded.model.embed.weight.device
    bf16 = run_precision(loaded.run_dir, cfg, device) == "bf16"
    micro = args.micro_batch_size or run_micro_batch(cfg, loaded.checkpoint)
    name = args.name or default_name(data, args.split)
    record = {"name": name, "checkpoint": str(loaded.checkpoint), "step": loaded.step, "split": args.split,
              "seq_len": data.seq_len, "micro_batch_size": micro, "max_batches": args.max_batches,
              "precision": "bf16" if bf16 else "fp32", "data": dataclasses.asdict(data), "prepared": str(prepared)}
    out = loaded.run_dir / "eval" / f"{name}.json"
    start = time.perf_counter()
    try:
        check_replace(out, record, args.overwrite)
        result = score(loaded.model, windows, micro, args.max_batches, loaded.tokenizer.byte_lengths(),
                       torch.bfloat16 if bf16 else None)
    except LoadError as e:
        return fail(str(e), e.code)
    except DataError as e:
        return fail(str(e), EXIT_DATA)
    record = {**record, **result, "wall_s": time.perf_counter() - start}
    out.parent.mkdir(exist_ok=True)
    atomic_write(out, json.dumps(record, indent=2))
    bpb = result["bits_per_byte"]
    print(f"{name}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, "
          f"bits per byte {'n/a (tokenizer bytes unknown)' if bpb is None else f'{bpb:.4f}'} "
          f"over {result['tokens']:,} tokens ({result['windows']} windows) -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
