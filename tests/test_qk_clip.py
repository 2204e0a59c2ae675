"""QK-Clip against the float64 reference of tests/reference/qk_clip.py: the max logit is the
optimizer step's (every micro-batch, every rank), not the last forward's."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import build_model
from optim.qk_clip import attention_modules, qk_clip, track_max_logits
from tests.conftest import compose_config
from tests.reference import qk_clip as ref

SEQ = 12


def tiny_model():
    cfg = compose_config(["model=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(8)  # logits of a few tens in layer 0
    return model, cfg.model.rope_theta


def attention_inputs(model, batches):
    """Each attention layer's input for each batch, from a forward that tracks nothing."""
    seen = {id(a): [] for a in attention_modules(model)}
    hooks = [a.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].detach().clone()))
             for a in attention_modules(model)]
    with torch.no_grad():
        for idx in batches:
            model(idx)
    for h in hooks:
        h.remove()
    return [seen[id(a)] for a in attention_modules(model)]


def reference_step(model, theta, batches, tau):
    """(W_q, W_k) of every layer after QK-Clip with S over `batches`, and the heads clipped."""
    out, clipped = [], 0
    for attn, xs in zip(attention_modules(model), attention_inputs(model, batches)):
        w_q, w_k, _ = attn.qkv.weight.detach().chunk(3)
        s = ref.max_logits(xs, w_q, w_k, attn.n_heads, theta)
        w_q, w_k, n = ref.clip(w_q, w_k, s, tau, attn.n_heads)
        out.append((w_q, w_k))
        clipped += n
    return out, clipped


def per_batch_max(model, theta, batch):
    attn = attention_modules(model)[0]
    w_q, w_k, _ = attn.qkv.weight.detach().chunk(3)
    return ref.max_logits(attention_inputs(model, [batch])[0], w_q, w_k, attn.n_heads, theta)


def batches_by_head0_max(model, theta, count, seed=1):
    """`count` random batches sorted by layer 0 head 0's max logit, highest first, with their maxima."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (2, SEQ), generator=g) for _ in range(count)]
    maxima = [per_batch_max(model, theta, b) for b in batches]
    order = sorted(range(count), key=lambda i: -float(maxima[i][0]))
    return [batches[i] for i in order], [maxima[i] for i in order]


def assert_matches(model, expected):
    for attn, (w_q, w_k) in zip(attention_modules(model), expected):
        q, k, _ = attn.qkv.weight.detach().double().chunk(3)
        assert torch.allclose(q, w_q, rtol=1e-5, atol=1e-7) and torch.allclose(k, w_k, rtol=1e-5, atol=1e-7)


def test_max_is_over_every_micro_batch_of_the_step_and_not_eval_forwards():
    """Two micro-batches with head 0's max in the first; then an eval forward (as the probes run)
    with a larger one, which must not count. τ lies between the two micro-batches' maxima."""
    model, theta = tiny_model()
    (evaluated, first, second), (_, s_first, s_second) = batches_by_head0_max(model, theta, 3)
    tau = float(s_first[0] + s_second[0]) / 2
    expected, n_expected = reference_step(model, theta, [first, second], tau)
    track_max_logits(model)
    model.train()
    model(first)
    model(second)
    model.eval()
    model(evaluated)
    model.train()
    assert qk_clip(model, tau) == n_expected > 0
    assert_matches(model, expected)
    assert all(a.step_max_logits is None for a in attention_modules(model))  # the next step starts afresh
    assert qk_clip(model, tau) == 0


def test_heads_at_or_below_tau_are_left_alone():
    """τ between two heads of one layer: the head above it is scaled by √(τ/S), the one below
    keeps its weights (η is capped at 1, never a scale-up)."""
    model, theta = tiny_model()
    batch = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    s = sorted(per_batch_max(model, theta, batch).tolist())
    tau = (s[0] + s[-1]) / 2
    expected, n_expected = reference_step(model, theta, [batch], tau)
    before = attention_modules(model)[0].qkv.weight.detach().clone()
    track_max_logits(model)
    model.train()
    model(batch)
    assert 0 < qk_clip(model, tau) == n_expected < model.blocks[0].attn.n_heads
    assert_matches(model, expected)
    assert not torch.equal(attention_modules(model)[0].qkv.weight, before)


def _two_rank_worker(rank, init_file, out_dir, batches, tau):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        model, _ = tiny_model()
        track_max_logits(model)
        model.train()
        model(batches[rank])
        clipped = qk_clip(model, tau)
        torch.save({"clipped": clipped, "qkv": [a.qkv.weight.detach().clone() for a in attention_modules(model)]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_clip_with_the_max_over_both_ranks(tmp_path):
    """Rank 1's batch holds head 0's max, above τ; rank 0's stays below it. Both ranks must clip
    identically, with the maximum over both (gloo, 2 processes)."""
    model, theta = tiny_model()
    (high, low), (s_high, s_low) = batches_by_head0_max(model, theta, 2)
    tau = float(s_high[0] + s_low[0]) / 2
    expected, n_expected = reference_step(model, theta, [low, high], tau)
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), [low, high], tau), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["clipped"] == n_expected > 0
        for attn, qkv in zip(attention_modules(model), result["qkv"]):
            attn.qkv.weight.data.copy_(qkv)
        assert_matches(model, expected)
