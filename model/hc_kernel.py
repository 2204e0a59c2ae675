"""Fused CPU kernels for hyper-connections: the eager path's arithmetic in two passes per sublayer.

`mhc_in` is mHC's whole coefficient path plus the stream read (RMS, φ projection, sigmoid gates,
V4's Sinkhorn, x_in = Σ pre_i X_i) per token, with its backward; `mix` is the write and mix
X' = res·X + post ⊗ y. Both are autograd Functions over model/csrc/hyper_connection.cpp, which
torch's C++ extension loader builds on first use (cached under ~/.cache/torch_extensions, one build
per CPU instruction set). Where it cannot be built (no compiler), `available()` is False after one
warning and model/mhc.py runs its eager path. They are CPU kernels: other devices run eagerly.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "hyper_connection.cpp"
# -Wno-psabi: GCC notes that helpers returning vector types would pass them differently on other
# ISAs; they are internal to the build, so the note is noise on every CPU without AVX-512.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
log = logging.getLogger(__name__)


def _isa_tag() -> str:
    """The build is compiled for this CPU (-march=native); a cache shared by different CPUs keeps one build each."""
    flags = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:  # x86: model name, flags; ARM: Features, CPU part
            flags += "".join(sorted({line for line in f if line.startswith(("flags", "Features", "model name",
                                                                              "CPU part", "CPU implementer"))}))
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


class _Kernels:
    """The built module's functions, called with autocast off: their BLAS calls must stay in the
    accumulation dtype the kernels read back."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(*args):
            with torch.autocast("cpu", enabled=False):
                return fn(*args)

        return call


@functools.cache
def _extension():
    from torch.utils import cpp_extension

    # A build killed half-way leaves torch's lock file in the build directory, and later loads wait
    # on it: delete the directory under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR).
    log.info("loading the fused hyper-connection kernels (the first use on a machine compiles them, ~30 s)")
    try:
        return _Kernels(cpp_extension.load(name=f"v4lab_hc_{_isa_tag()}", sources=[str(SOURCE)],
                                           extra_cflags=CFLAGS,
                                           extra_ldflags=["-fopenmp"]))
    except Exception as e:  # no compiler, or a broken toolchain: the eager path computes the same thing
        warnings.warn(f"fused hyper-connection kernels unavailable, using eager PyTorch: {e}")
        return None


def available() -> bool:
    return _extension() is not None


def usable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """CPU tensors and whole parameters: a ZeRO-3 partition is gathered only by the module call that
    the eager path makes, so partitioned parameters stay on that path."""
    return x.device.type == "cpu" and not any(hasattr(p, "ds_id") for p in params) and available()


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The kernels accumulate in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(_acc_dtype(like)).contiguous()


class _Mailbox:
    __slots__ = ("g",)

    def __init__(self):
        self.g = None


class Link:
    """Hands the mix's incoming gradient G to the mhc_in that read the same X: its backward adds the
    mix's part of X's gradient, resᵀG, in its own pass over X, so the mix neither writes that part
    out nor has autograd add the two. Autograd runs the mix's backward first: mhc_in's backward
    needs the gradients of post and res, which only the mix produces. A pass that will not run
    mhc_in's backward (a gradient w.r.t. some parameters only) keeps the gradient in the mix.
    mhc_in's node sees only the mailbox, the mix's node sees both: no reference cycle holds a graph."""

    __slots__ = ("mailbox", "node")

    def __init__(self):
        self.mailbox = _Mailbox()
        self.node = None


def _refuse_create_graph() -> None:
    # The kernels' arithmetic is not recorded, so a graph of the backward would silently miss it.
    # (once_differentiable would not do: its error is raised only where the gradient is needed
    # through nothing but these kernels.)
    if torch.is_grad_enabled():
        raise RuntimeError("the fused hyper-connection kernels have no double backward (create_graph=True); "
                           "set model.fused_hc=false to use the eager path")


class _MHCIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm, eps_hc, link):
        mix = b_post is not None
        none = torch.empty(0, dtype=_acc_dtype(x))
        phi_, alpha_, b_pre_, b_post_, b_res_ = (_acc(t, x) if t is not None else none
                                                 for t in (phi, alpha, b_pre, b_post, b_res))
        x_in, pre, post, res, mp, rinv = _extension().mhc_in_forward(x, phi_, alpha_, b_pre_, b_post_, b_res_, n,
                                                                     iters, eps_norm, eps_hc)
        ctx.save_for_backward(x, phi_, alpha_, b_res_, pre, post, res, mp, rinv)
        ctx.meta = (n, iters, eps_hc, mix, phi.dtype, alpha.dtype, alpha.numel())
        ctx.mailbox = link.mailbox if link is not None else None
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)
        return x_in, pre, post, res

    @staticmethod
    def backward(ctx, g_in, _g_pre, g_post, g_res):
        _refuse_create_graph()
        x, phi, alpha, b_res, pre, post, res, mp, rinv = ctx.saved_tensors
        n, iters, eps_hc, mix, phi_dtype, dtype, n_alpha = ctx.meta
        g_in = torch.zeros(x.size(0), x.size(1) // n, dtype=x.dtype) if g_in is None else g_in.contiguous()
        g_post = torch.zeros_like(post) if g_post is None else g_post.to(post.dtype).contiguous()
        g_res = torch.zeros(x.size(0), n * n if mix else 0, dtype=post.dtype) if g_res is None \
            else g_res.to(post.dtype).contiguous()
        box = ctx.mailbox
        g_mix = box.g if box is not None and box.g is not None else x.new_empty(0)
        if box is not None:
            box.g = None
        dx, dphi, dalpha, db_pre, db_post, db_res = _extension().mhc_in_backward(
            x, phi, alpha, b_res, pre, post, mp, rinv, g_in, g_post, g_res, g_mix, res, n, iters, eps_hc)
        dalpha, db_pre = dalpha[:n_alpha].to(dtype), db_pre.to(dtype)
        if mix:
            db_post, db_res = db_post.to(dtype), db_res.view(n, n).to(dtype)
        else:
            db_post = db_res = None
        return dx, dphi.to(phi_dtype), dalpha, db_pre, db_post, db_res, None, None, None, None, None


class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, post, res, n, mailbox, node):
        ctx.save_for_backward(x, y, post, res)
        ctx.n, ctx.mailbox, ctx.node = n, mailbox, node
        return _extension().mix_forward(x, y, post, res, n)

    @staticmethod
    def backward(ctx, g):
        _refuse_create_graph()
        x, y, post, res = ctx.saved_tensors
        g = g.contiguous()
        # A pass that prunes mhc_in (a gradient w.r.t. some parameters only) must get X's gradient here.
        hand_over = ctx.node is not None and torch._C._will_engine_execute_node(ctx.node)
        dx, dy, dpost, dres = _extension().mix_backward(x, y, post, res, g, ctx.n, not hand_over)
        if hand_over:
            ctx.mailbox.g, dx = g, None
        return dx, dy, dpost, dres, None, None, None


def mhc_in(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, b_pre: torch.Tensor,
           b_post: torch.Tensor | None, b_res: torch.Tensor | None, iters: int, eps: float,
           eps_hc: float = 1e-6, link: Link | None = None):
    """x [..., n, C] → x_in [..., C], pre [..., n], post [..., n], res [..., n, n] (post and res only
    when φ has the mix rows; without them this is the final weighted stream reduce), as model/mhc.py's
    eager path: `eps` is the RMS's, `eps_hc` V4's hc_eps (Sinkhorn's denominators, added to pre);
    b_res and φ's res rows in V4's comb layout [input, output], res output × input. Pass the same
    `link` to the `mix` of this x. `pre` carries no gradient: the mix does not use it, and the probes
    only record it."""
    *lead, n, c = x.shape
    flat = x.reshape(-1, n * c).contiguous()
    x_in, pre, post, res = _MHCIn.apply(flat, phi, alpha, b_pre, b_post, b_res, n, iters, eps, eps_hc, link)
    if link is not None:
        link.node = x_in.grad_fn
    return (x_in.view(*lead, c), pre.view(*lead, n), post.view(*lead, post.size(-1)),
            res.view(*lead, res.size(-1) // n, n))


def mix(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, res: torch.Tensor, link: Link | None = None) -> torch.Tensor:
    """X' = res·X + post ⊗ y for x [..., n, C], y [..., C], post [..., n], res [..., n, n] (float32/64)."""
    *lead, n, c = x.shape
    acc = _acc_dtype(x)
    out = _Mix.apply(x.reshape(-1, n * c).contiguous(), y.to(x.dtype).reshape(-1, c).contiguous(),
                     post.to(acc).reshape(-1, n).contiguous(), res.to(acc).reshape(-1, n * n).contiguous(), n,
                     link.mailbox if link is not None else None, link.node if link is not None else None)
    return out.view_as(x)
