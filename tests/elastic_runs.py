"""The 2-rank side of tests/test_elastic.py, run under `torchrun --nproc_per_node 2`: for each case
the uninterrupted 2-rank run, and the resume at 2 ranks of a 1-rank run's checkpoint that the test
prepared beforehand.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/elastic_runs.py OUT CACHE
"""
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY, compose_config  # noqa: E402
from tests.distributed_runs import V4  # noqa: E402
from train.trainer import Trainer  # noqa: E402

# (optimizer, ZeRO stage, resumed the other way too: 1 rank -> 2 ranks). Every case 2 -> 1; 1 -> 2
# for one case of each optimizer and stage (AdamW at ZeRO-1, Muon at ZeRO-2), to keep the file cheap.
# ZeRO-0 checkpoints hold whole states (no conversion): one case.
CASES = [("adamw", 1, True), ("adamw", 2, False), ("muon", 1, False), ("muon", 2, True), ("adamw", 3, False),
         ("adamw", 0, False)]
# V4-tiny with Muon at ZeRO-2, 2 ranks, up to the first checkpoint only: 3-D expert matrices, and MoE
# selection biases (buffers, which a universal load does not restore by itself). A 1-step indexer
# warm-up: the trunk (and with it the biases) trains in step 2, and the optimizer groups are
# split into frozen-until and warm-up groups, a layout the reshard must keep.
V4_CASE = "v42"
V4_ELASTIC = [*(o for o in V4 if not o.startswith("model.attn.indexer_warmup_steps=")),
              "model.attn.indexer_warmup_steps=1"]
STEPS, CUT = 4, 2  # checkpoints at 2 and 4; the resumes start from 2
# micro_batch_size=auto: 8 at 1 rank, 4 at 2 (global batch 8), so a reshard also changes the micro-batch
BASE = [*(o for o in TINY if not o.startswith("trainer.micro_batch_size=")), "trainer.micro_batch_size=auto"]


def overrides(optim: str, stage: int, ranks: int, steps: int = STEPS) -> list[str]:
    base = BASE
    if optim == "v4":
        base, optim = [*(o for o in BASE if not o.startswith("model=")), *V4_ELASTIC], "muon"
    # fp32 Newton–Schulz: 1 and 2 ranks sum gradients in other orders; bf16 would magnify that
    muon = ["optim.ns_dtype=fp32", "optim.lr=0.02"] if optim == "muon" else []
    return [*base, f"optim={optim}", *muon, f"deepspeed.zero_stage={stage}", f"trainer.max_steps={steps}",
            "trainer.eval_every=0", f"trainer.checkpoint_every={CUT}", f"launcher.nproc_per_node={ranks}"]


def stopped_copy(run: Path, out: Path, step: int = CUT) -> Path:
    """`run` as a run stopped after its checkpoint at `step` would have left it (its log may go
    further: a kill loses the steps after the checkpoint)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("summary.json", ".lock"))
    ckpts = out / "checkpoints"
    for later in ckpts.glob("step_*"):
        if int(later.name[len("step_"):]) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    return out


def main(out: Path, cache: Path) -> None:
    for optim, stage, both_ways in CASES:
        name = f"{optim}{stage}"
        Trainer(compose_config(overrides(optim, stage, 2), out_dir=out / f"{name}_2", cache_dir=cache)).fit()
        if both_ways:
            Trainer(compose_config(overrides(optim, stage, 2), out_dir=out / f"{name}_1to2", cache_dir=cache)).fit()
    Trainer(compose_config(overrides("v4", 2, 2, steps=CUT), out_dir=out / f"{V4_CASE}_2", cache_dir=cache)).fit()
    if dist.get_rank() == 0:
        (out / "done.json").write_text(json.dumps([f"{o}{s}" for o, s, _ in CASES]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
