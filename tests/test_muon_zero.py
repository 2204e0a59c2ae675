"""The partitioned (ZeRO-1/2) Muon step against the whole-matrix step, in one process: each
rank is a thread with its own flat partition and optimizer, and the all-gather is a real exchange
between them. The layouts put partition boundaries through the middle of a matrix, through a
row block and a head block, and into the padding at the end of the flat buffer."""
import math
import threading
from types import SimpleNamespace

import pytest
import torch

import optim.muon
from optim.muon import Muon, Partition, Segment

KW = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, momentum_type="classical",
          ns_schedule="v4_hybrid", ns_dtype="fp32", adjust_lr_fn="match_rms_adamw", rms_target=0.18)


class ThreadRanks:
    """`world` ranks as threads: the two collectives Muon calls, over per-thread ranks."""

    def __init__(self, world: int):
        self.world, self.parts = world, [None] * world
        self.barrier = threading.Barrier(world)

    def get_world_size(self, group=None) -> int:
        return self.world

    def all_gather_into_tensor(self, out, local, group=None) -> None:
        self.parts[group] = local.clone()  # the partition's `group` field holds the rank here
        self.barrier.wait()
        out.copy_(torch.cat(self.parts))
        self.barrier.wait()

    def run(self, fn) -> list:
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # surface it in the test, and free the others
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


# (name, [(shape, row_blocks, head_blocks)], ranks, alignment of the padded buffer, per_head)
LAYOUTS = [
    ("mid-matrix", [((24, 40), 1, 1), ((40, 24), 1, 1), ((2, 16, 28), 1, 1)], 2, 1, False),
    ("row-block", [((20, 8), 1, 1), ((3 * 16, 40), 3, 1), ((40, 16), 1, 1)], 2, 1, False),
    ("head-block", [((3 * 16, 20), 3, 4), ((24, 24), 1, 1)], 3, 1, True),
    ("padding", [((16, 24), 1, 1), ((2 * 12, 20), 2, 1)], 3, 256, False),
    ("ends-one-in", [((2, 13), 1, 1), ((4, 6), 1, 1)], 2, 1, False),  # the first matrix's last element is rank 1's
    ("starts-at-last", [((4, 6), 1, 1), ((2, 13), 1, 1)], 2, 1, False),  # the second's first is rank 0's last
]


def partitions(shapes, world, align):
    """DeepSpeed's flat layout: parameters back to back, the buffer padded to a multiple of
    world·align, cut into equal per-rank partitions."""
    segments, start = [], 0
    for shape, rows, heads in shapes:
        segments.append(Segment(start, shape, rows, heads))
        start += math.prod(shape)
    total = -(-start // (world * align)) * world * align
    return tuple(segments), start, total // world


def check_layout(name, segments, used, size, world):
    """The cut each layout exists for is really there."""
    bounds = [r * size for r in range(1, world)]
    inside = [(s, b - s.start) for s in segments for b in bounds if s.start < b < s.start + s.numel]
    if name == "mid-matrix":
        assert any(off % s.shape[-1] for s, off in inside)  # mid-row, even
    elif name in ("row-block", "head-block"):
        blocks = {s: s.row_blocks * (s.head_blocks if name == "head-block" else 1) for s in segments}
        assert any(blocks[s] > 1 and off % (s.numel // blocks[s]) for s, off in inside)
    elif name == "ends-one-in":
        assert any(s.start + s.numel == b + 1 for s in segments for b in bounds)
    elif name == "starts-at-last":
        assert any(s.start == b - 1 for s in segments for b in bounds)
    else:  # rank 1's partition runs past the last matrix into the padding, rank 2's is all padding
        assert size < used < 2 * size < 3 * size


def partitioned_step(shapes, world, align, per_head, weights, grads, steps, kw=KW):
    segments, used, size = partitions(shapes, world, align)
    flat_w = torch.cat([w.reshape(-1) for w in weights] + [torch.zeros(world * size - used)])
    flat_g = [torch.cat([g.reshape(-1) for g in gs] + [torch.zeros(world * size - used)]) for gs in grads]
    ranks = ThreadRanks(world)

    def rank_step(rank):
        lo = rank * size
        # as DeepSpeed does: the optimizer is built on the model's matrices, then its group is
        # given the rank's flat partition in their place
        opt = Muon([torch.nn.Parameter(w.clone()) for w in weights], per_head=per_head, **kw)
        p = torch.nn.Parameter(flat_w[lo:lo + size].clone())
        opt.param_groups[0]["params"] = [p]
        opt.bind_partition(0, Partition(segments, lo, size, group=rank))
        for g in flat_g:
            p.grad = g[lo:lo + size].clone()
            opt.step()
        return p.detach()

    original = optim.muon.dist
    optim.muon.dist = SimpleNamespace(get_world_size=ranks.get_world_size,
                                      all_gather_into_tensor=ranks.all_gather_into_tensor)
    try:
        return torch.cat(ranks.run(rank_step)), segments, used, size
    finally:
        optim.muon.dist = original


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])  # original: not symmetric in rows and columns
@pytest.mark.parametrize("name,shapes,world,align,per_head", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_partitioned_step_equals_whole_matrix_step(name, shapes, world, align, per_head, adjust):
    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape, _, _ in shapes]
    grads = [[torch.randn(shape) for shape, _, _ in shapes] for _ in range(2)]  # two steps: momentum too
    kw = {**KW, "adjust_lr_fn": adjust}
    sharded, segments, used, size = partitioned_step(shapes, world, align, per_head, weights, grads, 2, kw)
    check_layout(name, segments, used, size, world)

    params = []
    for w, (_, rows, heads) in zip(weights, shapes):
        params.append(torch.nn.Parameter(w.clone()))
        params[-1].row_blocks, params[-1].head_blocks = rows, heads
    opt = Muon(params, per_head=per_head, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    whole = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.allclose(sharded[:used], whole, atol=1e-6, rtol=0)
    assert torch.equal(sharded[used:], torch.zeros(world * size - used))  # padding stays untouched
