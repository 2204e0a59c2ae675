"""Run under `torchrun --nproc_per_node 2` by tests/test_distributed.py: trains each
(optimizer, ZeRO stage) combination for a few steps on 2 ranks, saves the final parameters, and
checks that a run killed after its checkpoint resumes onto the uninterrupted trajectory.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_runs.py OUT CACHE
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY, compose_config, interrupted_run  # noqa: E402
from train.trainer import Trainer  # noqa: E402

COMBOS = [("adamw", 0), ("adamw", 1), ("adamw", 2), ("adamw", 3), ("muon", 0), ("muon", 1), ("muon", 2), ("v4", 2)]
# 3 layers, not TINY's 2: with 2 equal layers the ranks' halves of the hidden-matrix group meet at
# the layer boundary and no matrix straddles two ranks, so a sharded Muon that read the other
# rank's part of a matrix as zeros would pass. 3 puts the boundary inside a layer-1 matrix
# (checked in tests/test_distributed.py from the layouts this script saves).
LAYERS = ["model.n_layers=3"]
# v4: V4-tiny (MoE experts as 3-D matrices, selection biases from loads summed over ranks, CSA
# after a 3-step indexer warm-up) with Muon on ZeRO-2 partitions.
# AdamW eps 1e-8, not the recipe's 1e-20: the mHC α gradients start at 1e-8 to 1e-10, rounding
# level, and with eps 1e-20 AdamW steps them by ±lr by their sign, which the ranks' summation order
# decides (α differed by 0.007 = 2 lr after 10 steps). The test is of sharding, not of that.
V4 = ["model=v4_tiny", "model.d_model=64", "model.n_heads=2", "model.attn.window=8", "model.attn.indexer_warmup_steps=3",
      "model.attn.csa_topk=4", "model.moe.bias_gamma=0.01", "optim.eps=1e-8"]
STEPS = 10


def overrides(optim: str, stage: int) -> list[str]:
    # fp32 Newton–Schulz: ranks sum gradients in another order than one process does, and bf16
    # would turn those last-bit differences into bf16-sized ones.
    base, extra = TINY, []
    if optim == "v4":
        base, optim = [o for o in TINY if not o.startswith("model=")], "muon"
        extra = V4
    else:
        extra = LAYERS
    if optim == "muon":
        extra = [*extra, "optim.ns_dtype=fp32", "optim.lr=0.02"]
    return [*base, f"optim={optim}", *extra, f"deepspeed.zero_stage={stage}", f"trainer.max_steps={STEPS}",
            "trainer.eval_every=5", "trainer.checkpoint_every=5", "launcher.nproc_per_node=2"]


def zero_layout(trainer) -> list[dict]:
    """Per optimizer group: its partition size (rank r holds [r·size, (r+1)·size) of the flat
    buffer) and where each parameter lies in it, as DeepSpeed's ZeRO-1/2 optimizer records them."""
    zero = trainer.engine.optimizer
    return [{"size": int(zero.partition_size[i]),
             "params": [(int(offset), tuple(meta.shape)) for offset, meta in
                        zip(zero.round_robin_bit16_offsets[i], zero.round_robin_bit16_meta[i])]}
            for i in range(len(zero.round_robin_bit16_groups))]


def main(out: Path, cache: Path) -> None:
    results, layouts = {}, {}
    for optim, stage in COMBOS:
        cfg = compose_config(overrides(optim, stage), out_dir=out / f"{optim}{stage}", cache_dir=cache)
        trainer = Trainer(cfg)
        trainer.fit()
        results[f"{optim}{stage}"] = {k: v.detach().cpu().clone() for k, v in trainer.full_state_dict().items()}
        if stage in (1, 2):
            layouts[f"{optim}{stage}"] = zero_layout(trainer)

        if optim == "muon" and stage > 0:  # sharded optimizer state must survive a checkpoint round trip
            cfg = compose_config(overrides(optim, stage), out_dir=out / f"{optim}{stage}_resumed", cache_dir=cache)
            interrupted_run(cfg, after_step=7)
            Trainer(cfg).fit()
    if dist.get_rank() == 0:
        torch.save(results, out / "params.pt")
        torch.save(layouts, out / "layouts.pt")
        (out / "done.json").write_text(json.dumps(sorted(results)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
