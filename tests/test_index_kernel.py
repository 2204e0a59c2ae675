"""The fused CPU selection of the lightning indexer (model/csrc/index_topk.cpp) against the chunked
PyTorch path it replaces on the CPU (batched matmuls, ReLU, top-k with ties sorted stably), which
itself is checked against a brute-force ranking and the dense-mask attention (test_v4*.py)."""
import pytest
import torch

import model.indexer as indexer_module
from model import cpu_kernels
from model.indexer import IndexQueries, select_topk


def chunked(index, n_visible, k, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(indexer_module, "_kernels", lambda: None)
        return select_topk(index, n_visible, k)


def random_index(b, t, heads, dim, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IndexQueries(torch.randn(b, t, heads, dim, generator=g, dtype=dtype),
                        torch.randn(b, t, heads, generator=g, dtype=dtype),
                        torch.randn(b, n, dim, generator=g, dtype=dtype))


@pytest.mark.parametrize("t,ratio,heads,dim,k", [(150, 3, 4, 8, 16), (700, 4, 8, 32, 64), (90, 2, 1, 5, 7)],
                         ids=["N50", "N175-blocks", "one-head-ties"])
def test_fused_selection_picks_the_chunked_paths_entries(t, ratio, heads, dim, k, monkeypatch):
    """Per query, the same set of valid picks as the chunked path (fp64, batch 2, entries not a
    multiple of the kernel's 64-entry blocks, early queries that see fewer than k); the kernel's
    valid picks come first, best first, ties by entry."""
    assert indexer_module._kernels() is not None
    index = random_index(2, t, heads, dim, t // ratio)
    n_visible = (torch.arange(t) + 1) // ratio
    picks, valid = select_topk(index, n_visible, k)
    ref_picks, ref_valid = chunked(index, n_visible, k, monkeypatch)
    assert picks.shape == ref_picks.shape and torch.equal(valid.sum(-1), ref_valid.sum(-1))
    scores = index.scores()
    ties = 0
    for b in range(2):
        for q in range(t):
            mine = picks[b, q][valid[b, q]]
            assert set(mine.tolist()) == set(ref_picks[b, q][ref_valid[b, q]].tolist()), (b, q)
            assert valid[b, q].tolist() == sorted(valid[b, q].tolist(), reverse=True)
            ranked = sorted(mine.tolist(), key=lambda s: (-scores[b, q, s].item(), s))
            assert mine.tolist() == ranked
            ties += int(len(mine) == k and (scores[b, q, : n_visible[q]] == scores[b, q, mine[-1]]).sum() > 1)
    if heads == 1:
        assert ties > 10  # ReLU zeros tied at the cut: decided by the earlier entry


def test_fused_selection_ignores_entries_a_query_does_not_see_yet():
    """A decoding cache holds only the entries made so far: scoring against the first n_visible
    keys only picks what scoring against all of them picks, ties (one index head: ReLU zeros)
    included."""
    index = random_index(1, 64, 1, 4, 64)
    n_visible = torch.arange(64) // 2
    picks, valid = select_topk(index, n_visible, 6)
    for q in range(64):
        few = IndexQueries(index.q[:, q:q + 1], index.w[:, q:q + 1], index.keys[:, : max(1, int(n_visible[q]))])
        p, v = select_topk(few, n_visible[q:q + 1], 6)
        assert p[0, 0][v[0, 0]].tolist() == picks[0, q][valid[0, q]].tolist()


def test_fused_selection_scores_low_precision_inputs_in_fp32_and_survives_nan():
    index = random_index(1, 40, 2, 8, 20, dtype=torch.float32)
    n_visible = torch.arange(40) // 2
    low = IndexQueries(*(x.bfloat16() for x in index))
    up = IndexQueries(*(x.float() for x in low))
    assert all(torch.equal(a, b) for a, b in zip(select_topk(low, n_visible, 5), select_topk(up, n_visible, 5)))
    index.w[0, 30, 0] = float("nan")  # every score of query 30 NaN: all count as largest, so the first 5
    picks, valid = select_topk(index, n_visible, 5)
    assert valid[0, 30].all() and picks[0, 30].tolist() == [0, 1, 2, 3, 4]


def test_the_kernel_refuses_mismatched_shapes_and_stays_inside_its_keys():
    kernels = indexer_module._kernels()
    block = indexer_module.KEY_BLOCK
    q, w, keys = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2), torch.randn(1, 1, 4, block)
    with pytest.raises(RuntimeError, match="disagree"):
        kernels.index_topk(q, w[:, :, :1].contiguous(), keys, torch.arange(8), 3)
    picks, valid = kernels.index_topk(q, w, keys, torch.full((8,), 10_000), 3)  # sees more than exists
    assert valid.all() and picks.max() < block


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_no_entry_yet_means_no_pick(fused, monkeypatch):
    """Fewer tokens than one block (a short prompt through the decoding cache): k' = 0 picks."""
    if not fused:
        monkeypatch.setattr(indexer_module, "_kernels", lambda: None)
    picks, valid = select_topk(random_index(2, 3, 2, 4, 0), torch.zeros(3, dtype=torch.long), 4)
    assert picks.shape == valid.shape == (2, 3, 0)


def test_a_nan_key_ranks_first_on_both_paths(monkeypatch):
    """NaN scores count as the largest (torch.topk's rule), in the kernel as in PyTorch."""
    index = random_index(1, 20, 2, 4, 10, dtype=torch.float32)
    index.keys[0, 7] = float("nan")
    n_visible = torch.full((20,), 10)
    fused = select_topk(index, n_visible, 3)
    ref = chunked(index, n_visible, 3, monkeypatch)
    assert (fused[0][0] == 7).any(-1).all() and (ref[0][0] == 7).any(-1).all()


def test_compiled_selection_calls_the_kernel_as_one_op(monkeypatch):
    """Under torch.compile (fullgraph: no graph break) the selection is the kernel's custom op, with
    the eager picks; the op passes torch.library.opcheck."""
    assert cpu_kernels.available("index_topk")
    index = random_index(2, 70, 4, 8, 23, dtype=torch.float32)
    n_visible = (torch.arange(70) + 1) // 3
    eager = select_topk(index, n_visible, 5)
    torch._dynamo.reset()
    compiled = torch.compile(select_topk, fullgraph=True, backend="aot_eager")
    compiled(index, n_visible, 5)
    built, runs = indexer_module._kernels(), []
    monkeypatch.setattr(indexer_module, "_kernels", lambda: runs.append(1) or built)
    picks = compiled(index, n_visible, 5)
    assert runs  # the graph ran the kernel (the compiled fallback sorts every row instead)
    assert all(torch.equal(a, b) for a, b in zip(eager, picks))
    keys = indexer_module.key_blocks(index.keys)
    torch.library.opcheck(indexer_module.index_topk_op, (index.q, index.w, keys, n_visible.clamp(0, 23), 5))
