"""The fused CPU kernels for hyper-connections (model/hc_kernel.py) against the eager PyTorch path:
same outputs and gradients, float64 gradcheck, doubly stochastic mixing, the fallback."""
import os
import shutil
import warnings

import pytest
import torch

from model import build_model, cpu_kernels, hc_kernel
from model.mhc import HyperConnection, StreamReduce
from tests.conftest import compose_config
from tests.reference import sinkhorn as reference

# Where a compiler exists the kernels must build: a broken source fails here instead of every model
# quietly running the eager path.
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler: the kernels cannot build")


def test_kernels_build():
    assert hc_kernel.available()


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large gates and random biases, so the dynamic coefficients and Sinkhorn matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if hasattr(module, "alpha"):
            module.alpha.fill_(0.7)
    return module


def run(module, x, fused, sublayer=None):
    """Output and the gradients of x, the module's and the sublayer's parameters for a fixed cotangent."""
    module.fused = fused
    params = [*module.parameters(), *(sublayer.parameters() if sublayer else [])]
    x = x.detach().clone().requires_grad_()
    out = module(x, lambda h: torch.tanh(sublayer(h))) if sublayer else module(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * cot).sum(), [x, *params])
    return [out.detach(), *grads]


# n, C, tokens: neither C nor tokens a multiple of the 16-token block; 1100 tokens take more blocks
# than the backward has gradient chunks
# c = 90: the kernels' sums run 64 channels at a time, then 16, then one by one; 90 takes all three
CASES = [(4, 16, 64), (3, 5, 37), (2, 24, 16), (4, 3, 1100), (4, 8, 1), (4, 90, 19)]


@pytest.mark.parametrize("kind", ["mhc", "hc"])
@pytest.mark.parametrize("n,c,tokens", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_fused_equals_eager(kind, n, c, tokens, dtype, tol):
    torch.manual_seed(0)
    hc = perturbed(HyperConnection(kind, n, c, index=1, sinkhorn_iters=20)).to(dtype)
    lin = torch.nn.Linear(c, c).to(dtype)
    x = torch.randn(1, tokens, n, c, dtype=dtype)
    fused, eager = run(hc, x, True, lin), run(hc, x, False, lin)
    for a, b in zip(fused, eager):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


class Scale(torch.nn.Module):
    """An elementwise sublayer: a matmul's BLAS sums may follow the thread count."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(c))

    def forward(self, h):
        return h * self.weight


def test_fused_mhc_does_not_depend_on_the_thread_count():
    """mHC's every output and gradient, φ's included, bit for bit with one thread and two: the
    parameter gradients are sums over a fixed number of token chunks (1100 tokens: more blocks than
    chunks). (hc computes its coefficients with PyTorch's BLAS, whose sums may follow the threads.)"""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("mhc", 4, 24, index=1, sinkhorn_iters=20))
    scale = Scale(24)
    x = torch.randn(1, 1100, 4, 24)
    results, before = {}, torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, dx, *grads = run(hc, x, True, scale)
            results[threads] = (out, dx, *grads[:len(list(hc.parameters()))])  # not the sublayer's sum
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n,c,tokens", CASES)
def test_fused_stream_reduce_equals_eager(n, c, tokens):
    torch.manual_seed(0)
    reduce = perturbed(StreamReduce("mhc", n, c)).double()
    x = torch.randn(2, tokens, n, c, dtype=torch.float64)
    for a, b in zip(run(reduce, x, True), run(reduce, x, False)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_fused_gradcheck_float64(kind):
    """Through the autograd Functions, including mhc's hand-over of the mix gradient (Link)."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection(kind, n=3, d_model=5, index=1, sinkhorn_iters=5)).double()
    lin = torch.nn.Linear(5, 5).double()
    x = torch.randn(1, 19, 3, 5, dtype=torch.float64, requires_grad=True)
    params = (hc.phi.weight if kind == "mhc" else hc.proj.weight, hc.alpha, hc.b_pre, hc.b_post, hc.b_res)

    names = ["phi.weight" if kind == "mhc" else "proj.weight", "alpha", "b_pre", "b_post", "b_res"]
    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))

    def g(x, *values):
        return torch.func.functional_call(hc, dict(zip(names, values)), (x, lambda h: torch.tanh(lin(h))))

    assert torch.autograd.gradcheck(g, inputs)


def test_mhc_in_gradcheck_and_reduce_form():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 3, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(24, 12, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.5, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    b_pre, b_post, b_res = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((4,), (4,), (4, 4)))

    def coefficients(*a):
        x_in, _pre, post, res = hc_kernel.mhc_in(*a, 7, 1e-6)
        return x_in, post, res

    assert torch.autograd.gradcheck(coefficients, (x, phi, alpha, b_pre, b_post, b_res))
    weights = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: hc_kernel.mhc_in(*a, None, None, 0, 1e-6)[0],
                                    (x, weights, alpha[:1].detach().clone().requires_grad_(), b_pre))


def test_mix_gradcheck():
    torch.manual_seed(0)
    shapes = [(2, 17, 4, 3), (2, 17, 3), (2, 17, 4), (2, 17, 4, 4)]
    inputs = tuple(torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes)
    assert torch.autograd.gradcheck(hc_kernel.mix, inputs)


@pytest.mark.parametrize("case", range(len(reference.HAND_CASES)))
def test_fused_sinkhorn_hand_computed(case):
    """The kernel's Sinkhorn alone (α = 0: the logits are b_res) on cases worked by hand; res is their transpose."""
    z, iters, eps, expected = reference.hand_case(case)
    n = z.shape[0]
    x = torch.randn(3, n, 2, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.float64)
    _, _, _, res = hc_kernel.mhc_in(x, torch.zeros(n * n + 2 * n, 2 * n, dtype=torch.float64),
                                   torch.zeros(3, dtype=torch.float64), zeros, zeros, z, iters, 1e-6, eps)
    assert torch.allclose(res, expected.T.expand(3, n, n), rtol=0, atol=1e-15)


def test_fused_mixing_matrices_are_doubly_stochastic():
    torch.manual_seed(0)
    x = torch.randn(300, 4, 32)
    phi = torch.randn(24, 128) * 0.03  # logits up to ~2; far larger ones need more than 20 iterations
    b = [torch.randn(4), torch.randn(4), torch.randn(4, 4) * 0.5]
    _, pre, post, res = hc_kernel.mhc_in(x, phi, torch.tensor([1.0, 1.0, 1.0]), *b, 20, 1e-6)
    assert res.dtype == torch.float32 and (res >= 0).all()
    assert (res.sum(-1) - 1).abs().max() < 1e-5 and (res.sum(-2) - 1).abs().max() < 1e-5
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()


def test_whole_model_fused_equals_eager_and_is_deterministic():
    cfg = compose_config(["model=tiny", "model.residual=mhc", "model.n_streams=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    for i, m in enumerate(model.modules()):  # away from init, where the bias gradients nearly vanish
        if isinstance(m, (HyperConnection, StreamReduce)):
            perturbed(m, seed=i)
    idx, y = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))

    def grads(fused):
        for m in model.modules():
            if isinstance(m, (HyperConnection, StreamReduce)):
                m.fused = fused
        model.zero_grad()
        loss = model(idx, y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    fused, again, eager = grads(True), grads(True), grads(False)
    assert all(torch.equal(a, b) for a, b in zip(fused, again))
    for (name, _), a, b in zip([("loss", None), *model.named_parameters()], fused, eager):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-9, name  # fp32 sums in another order


def test_zero_tokens():
    hc, reduce = perturbed(HyperConnection("mhc", 4, 8, index=0)), perturbed(StreamReduce("mhc", 4, 8))
    x = torch.randn(2, 0, 4, 8, requires_grad=True)
    out = hc(x, torch.tanh)
    assert out.shape == x.shape and reduce(out).shape == (2, 0, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_denormals_count_as_zero_only_inside_the_kernels():
    """The mHC kernels flush denormals (Sinkhorn's backward makes them, and they are slow): the
    setting must end with each kernel call, on the calling thread and on the pool's threads."""
    hc = perturbed(HyperConnection("mhc", 4, 32, index=0))
    x = torch.randn(1, 4096, 4, 32, requires_grad=True)  # enough tokens for every thread of the pool
    hc(x, torch.tanh).sum().backward()
    tiny = torch.tensor(1e-39)  # float32 denormal
    assert tiny * 0.5 != 0  # this thread
    assert (torch.full((1 << 22,), 1e-39) * 0.5).ne(0).all()  # one elementwise op over the whole pool


def test_a_pass_without_mhc_in_keeps_the_mix_gradient():
    """A gradient w.r.t. the sublayer only runs the mix's backward but not mhc_in's: the mix must not
    leave its gradient for a later pass that runs mhc_in alone (here through x_in only)."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("mhc", 4, 8, index=0))
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(1, 20, 4, 8)

    def passes(fused):
        hc.fused = fused
        xs, read = x.clone().requires_grad_(), []
        out = hc(xs, lambda h: read.append(h) or torch.tanh(lin(h)))
        first = torch.autograd.grad(out.sum(), [lin.weight], retain_graph=True)
        return [*first, *torch.autograd.grad(read[0].square().sum(), [xs, hc.phi.weight])]

    for a, b in zip(passes(True), passes(False)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_double_backward_is_refused(kind):
    hc = perturbed(HyperConnection(kind, 4, 8, index=0))
    x = torch.randn(1, 5, 4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(hc(x, torch.tanh).square().sum(), x, create_graph=True)


def test_link_survives_a_second_backward():
    """The mix hands its gradient to mhc_in once per backward: retain_graph runs give the same gradients."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("mhc", 4, 8, index=0))
    x = torch.randn(1, 20, 4, 8, requires_grad=True)
    out = hc(x, torch.tanh)
    first = torch.autograd.grad(out.square().sum(), [x, hc.phi.weight], retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), [x, hc.phi.weight])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
def test_bf16_autocast_follows_eager_within_bf16_precision(state):
    """Under autocast the eager path projects in bf16 and the kernels in fp32; both keep the state's dtype."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("mhc", 4, 32, index=0))
    x = torch.randn(2, 33, 4, 32).to(state)
    lin = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, eager = run(hc, x, True, lin), run(hc, x, False, lin)
    assert fused[0].dtype == eager[0].dtype == state
    for a, b in zip(fused, eager):
        assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max()


def test_eager_path_where_the_kernels_cannot_run(monkeypatch):
    hc = perturbed(HyperConnection("mhc", 4, 8, index=0))
    x = torch.randn(1, 5, 4, 8)
    assert hc_kernel.usable(x, *hc.parameters())
    hc.phi.weight.ds_id = 0  # a ZeRO-3 partitioned parameter is gathered only by the eager path's module call
    assert not hc_kernel.usable(x, *hc.parameters())
    del hc.phi.weight.ds_id
    monkeypatch.setattr(hc_kernel, "available", lambda: False)
    called = []
    monkeypatch.setattr(hc_kernel, "mhc_in", lambda *a, **k: called.append(1))
    hc(x, torch.tanh)
    assert not called


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**_):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_kernels.extension.__wrapped__("hyper_connection") is None
    assert any("eager PyTorch" in str(w.message) and "no compiler" in str(w.message) for w in caught)


@pytest.fixture
def directory(tmp_path, monkeypatch):
    """The build directory extension("hyper_connection") uses, empty, in a cache of the test's own."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_isa_tag", lambda: "x")
    (tmp_path / "v4lab_hyper_connection_x").mkdir()
    return tmp_path / "v4lab_hyper_connection_x"


def test_a_build_killed_half_way_neither_hangs_its_waiters_nor_later_runs(directory, monkeypatch):
    """torch's loader waits without end on the lock file a killed build leaves. A loader that was
    already waiting for that build goes on once its builder dies; the lock file is gone before
    torch's loader looks; a live build is waited for."""
    import subprocess
    import sys
    import threading
    import time

    from torch.utils import cpp_extension

    builder = subprocess.Popen([sys.executable, "-c", (  # holds the build, writes torch's lock, then hangs
        "import fcntl, pathlib, sys, time\n"
        f"d = pathlib.Path({str(directory)!r})\n"
        "h = open(d / 'v4lab.flock', 'a'); fcntl.flock(h, fcntl.LOCK_EX)\n"
        "(d / 'lock').touch(); print('building', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "building\n"
        seen = []
        monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append((directory / "lock").exists()))
        waiter = threading.Thread(target=cpu_kernels.extension.__wrapped__, args=("hyper_connection",))
        waiter.start()
        time.sleep(1.0)
        assert not seen and waiter.is_alive()  # the live build is waited for
        builder.kill()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and seen == [False]
    finally:
        builder.kill()
        builder.wait()


def test_a_killed_builds_orphaned_compiler_finishes_before_its_lock_is_removed(directory, monkeypatch):
    """The OOM killer takes the builder alone: its ninja and compilers go on writing in the build
    directory. The next loader waits for them before it removes torch's lock and builds there."""
    import subprocess
    import sys

    from torch.utils import cpp_extension

    (directory / "lock").touch()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"], cwd=directory)
    try:
        seen = []
        monkeypatch.setattr(cpp_extension, "load",
                            lambda **kw: seen.append(((directory / "lock").exists(), orphan.poll() is not None)))
        cpu_kernels.extension.__wrapped__("hyper_connection")
        assert seen == [(False, True)]
    finally:
        orphan.kill()
        orphan.wait()


def test_without_flock_the_kernels_still_build_under_torchs_lock(directory, monkeypatch):
    """A file system without flock (Lustre mounted noflock, some FUSE): no lock of ours, and a lock
    file of torch's is left to torch, as before; the kernels still load."""
    import errno

    from torch.utils import cpp_extension

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cpu_kernels.fcntl, "flock", no_flock)
    (directory / "lock").touch()
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append((directory / "lock").exists()))
    assert cpu_kernels.extension.__wrapped__("hyper_connection") is not None
    assert seen == [True]


def test_an_edited_header_gives_the_kernels_a_new_version(tmp_path, monkeypatch):
    """The operators' namespace names the file's version: it must cover the csrc/ headers the file
    includes, or a process would load an edited header's build under the old name (and torch would
    keep the old build)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    (tmp_path / "k.cpp").write_text('#include <vector>\n#include "tiles.h"\nint f();\n')
    (tmp_path / "tiles.h").write_text("constexpr int W = 16;\n")
    namespaces = []
    monkeypatch.setattr(cpu_kernels, "CSRC", tmp_path)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: namespaces.append(kw["extra_cflags"][-1]))
    for header in ("constexpr int W = 16;\n", "constexpr int W = 16;\n", "constexpr int W = 8;\n"):
        (tmp_path / "tiles.h").write_text(header)
        cpu_kernels.extension.__wrapped__("k")
    assert namespaces[0] == namespaces[1] != namespaces[2]
