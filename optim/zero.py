"""Tell our Muon where each matrix lies in DeepSpeed's ZeRO-1/2 flat partitions.

DeepSpeed flattens each optimizer group's parameters into one buffer (in the order and at the
offsets it records), cuts it into equal per-rank partitions, and hands the client optimizer only
its partition. Reading that layout back once after `deepspeed.initialize` lets Muon rebuild whole
matrices for Newton–Schulz (optim/muon.py). Checked against DeepSpeed 0.19.8, the pinned version;
the tests compare sharded updates with a single-process run, so a layout change cannot go unseen.
"""
from __future__ import annotations

import torch.distributed as dist

from optim.muon import Muon, Partition, Segment


def bind_zero_partitions(engine) -> None:
    stage = engine.zero_optimization_stage()
    client = getattr(engine.optimizer, "optimizer", None)
    if not isinstance(client, Muon) or stage == 0:
        return
    if stage == 3:
        raise ValueError("whole-matrix Muon under ZeRO-3 is not supported; use deepspeed.zero_stage 0, 1 or 2")
    zero = engine.optimizer
    if getattr(zero, "round_robin_gradients", False):
        raise ValueError("Muon under ZeRO needs round_robin_gradients off: it reorders matrices across partitions")
    for index, group in enumerate(client.param_groups):
        if not group["use_muon"]:
            continue
        params, offsets = zero.round_robin_bit16_groups[index], zero.round_robin_bit16_offsets[index]
        shapes = [tuple(m.shape) for m in zero.round_robin_bit16_meta[index]]
        process_group = zero.real_dp_process_group[index]
        size = int(zero.partition_size[index])
        segments = tuple(
            Segment(int(offset), shape, getattr(p, "row_blocks", 1), getattr(p, "head_blocks", 1))
            for p, shape, offset in zip(params, shapes, offsets)
        )
        client.bind_partition(index, Partition(segments, dist.get_rank(process_group) * size, size, process_group))
