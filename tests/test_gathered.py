"""The gathered-row kernels of sparse CSA (model/gathered.py, model/csrc/gathered.cpp) against the
gather-then-matmul reference: outputs and gradients, rows picked by many queries and twice by one,
opcheck of the custom ops, float64 gradcheck, a sum that does not depend on the thread count."""
import pytest
import torch

from model import cpu_kernels, gathered


def operands(dtype, b=2, t=37, h=3, k=5, n=11, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, h, d, generator=g, dtype=dtype)
    p = torch.randn(b, t, h, k, generator=g, dtype=dtype)
    rows = torch.randn(b, n, d, generator=g, dtype=dtype)
    index = torch.randint(0, n, (b, t, k), generator=g)
    index[:, :, 1] = index[:, :, 0]  # a row picked twice by the same query
    return a, p, rows, index


def reference(fn, x, rows, index):
    picked = gathered.gather_rows(rows, index)  # [B, T, K, D]
    return x @ picked.transpose(-1, -2) if fn is gathered.scores else x @ picked


def test_kernels_build():
    assert cpu_kernels.available("gathered")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fn", [gathered.scores, gathered.combine], ids=["scores", "combine"])
def test_kernels_equal_gather_then_matmul(fn, dtype, tol):
    a, p, rows, index = operands(dtype)
    x = (a if fn is gathered.scores else p).requires_grad_()
    rows.requires_grad_()
    out, ref = fn(x, rows, index), reference(fn, x, rows, index)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    cot = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for mine, theirs in zip(torch.autograd.grad(out, (x, rows), cot), torch.autograd.grad(ref, (x, rows), cot)):
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)


def test_the_kernels_run_on_cpu_float_inputs_only(monkeypatch):
    calls = []
    real = gathered._kernels
    monkeypatch.setattr(gathered, "_kernels", lambda: calls.append(1) or real())
    a, p, rows, index = operands(torch.float32)
    gathered.scores(a, rows, index)
    assert calls
    calls.clear()
    gathered.scores(a.bfloat16(), rows.bfloat16(), index)  # autocast's dtype: the reference path
    assert not calls
    torch.testing.assert_close(gathered.scores(a, rows, index.int()), reference(gathered.scores, a, rows, index))
    assert not calls  # an int32 index too (the kernels read int64)


@pytest.mark.parametrize("fn", [gathered.scores, gathered.combine], ids=["scores", "combine"])
def test_gradcheck_float64(fn):
    a, p, rows, index = operands(torch.float64, b=2, t=4, h=2, k=3, n=5, d=3)
    x = (a if fn is gathered.scores else p).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, r: fn(x, r, index), (x, rows.requires_grad_()))
    # each input alone needing a gradient (the autograd must give each from its own flag)
    assert torch.autograd.gradcheck(lambda r: fn(x.detach(), r, index), (rows,))
    assert torch.autograd.gradcheck(lambda x: fn(x, rows.detach(), index), (x,))


def test_ops_pass_opcheck():
    a, p, rows, index = operands(torch.float32, t=6)
    torch.library.opcheck(gathered.scores_op, (a.requires_grad_(), rows.requires_grad_(), index))
    torch.library.opcheck(gathered.combine_op, (p.requires_grad_(), rows, index))
    torch.library.opcheck(gathered.scatter_op, (p.detach(), a.detach(), index, rows.size(1)))


def test_row_gradients_do_not_depend_on_the_thread_count():
    a, p, rows, index = operands(torch.float32, t=300, n=7)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(gathered.scatter_op(p, a, index, rows.size(1)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_an_index_outside_the_rows_is_refused():
    a, p, rows, index = operands(torch.float32)
    index[0, 3, 2] = rows.size(1)
    with pytest.raises(RuntimeError, match="index outside the rows"):
        gathered.scores(a, rows, index)
    with pytest.raises(RuntimeError, match="index outside the rows"):
        gathered.scatter_op(p, a, index, rows.size(1))


def test_double_backward_is_refused():
    a, p, rows, index = operands(torch.float64, t=3)
    out = gathered.scores(a.requires_grad_(), rows, index)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), a, create_graph=True)
