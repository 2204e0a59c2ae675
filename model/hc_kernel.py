"""Fused CPU kernels for hyper-connections: the eager path's arithmetic in two passes per sublayer.

`mhc_in` is mHC's whole coefficient path plus the stream read (RMS, φ projection, sigmoid gates,
V4's Sinkhorn, x_in = Σ pre_i X_i) per token, with its backward; `mix` is the write and mix
X' = res·X + post ⊗ y. Both are autograd Functions over model/csrc/hyper_connection.cpp, built on
first use (model/cpu_kernels.py). Where it cannot be built (no compiler), `available()` is False after one
warning and model/mhc.py runs its eager path. They are CPU kernels: other devices run eagerly.
"""
from __future__ import annotations

import torch

from model import cpu_kernels
from model.layers import refuse_create_graph


def _extension():
    return cpu_kernels.extension("hyper_connection")


def available() -> bool:
    return cpu_kernels.available("hyper_connection")


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


NO_DOUBLE_BACKWARD = ("the fused hyper-connection kernels have no double backward (create_graph=True); "
                      "set model.fused_hc=false to use the eager path")


# -- the kernels as torch.library custom ops --------------------------------------------------
# With a fake (shape-only) implementation each, torch.compile traces a hyper-connection into the
# block's graph with the kernel as one opaque node, instead of breaking the graph at the C++ call.
# Operands are already contiguous and in the accumulation dtype (the wrappers below see to it).
Tensor = torch.Tensor


@torch.library.custom_op("v4lab::mhc_in_forward", mutates_args=())
def mhc_in_forward_op(x: Tensor, phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor, n: int,
                      iters: int, eps_norm: float, eps_hc: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [T, n·C] → x_in [T, C], pre [T, n], post [T, n|0], res [T, n²|0], and what the backward
    reads: m = x φᵀ [T, K] and 1/rms [T]."""
    return tuple(_extension().mhc_in_forward(x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm, eps_hc))


@mhc_in_forward_op.register_fake
def _(x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm, eps_hc):
    t, k = x.size(0), phi.size(0)
    mix = k > n
    return (x.new_empty(t, x.size(1) // n), phi.new_empty(t, n), phi.new_empty(t, n if mix else 0),
            phi.new_empty(t, n * n if mix else 0), phi.new_empty(t, k), phi.new_empty(t))


@torch.library.custom_op("v4lab::mhc_in_backward", mutates_args=())
def mhc_in_backward_op(x: Tensor, phi: Tensor, alpha: Tensor, b_res: Tensor, pre: Tensor, post: Tensor, mp: Tensor,
                       rinv: Tensor, g_in: Tensor, g_post: Tensor, g_res: Tensor, g_mix: Tensor, res: Tensor, n: int,
                       iters: int, eps_hc: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dφ, dα [3], db_pre [n], db_post [n], db_res [n²]; g_mix (the consuming mix's output
    gradient, or empty): its part of dx, resᵀg_mix, is added in the same pass."""
    dx, dphi, *small = _extension().mhc_in_backward(x, phi, alpha, b_res, pre, post, mp, rinv, g_in, g_post, g_res,
                                                    g_mix, res, n, iters, eps_hc)
    return (dx, dphi, *(t.clone() for t in small))  # the kernel's small gradients are views of one buffer


@mhc_in_backward_op.register_fake
def _(x, phi, alpha, b_res, pre, post, mp, rinv, g_in, g_post, g_res, g_mix, res, n, iters, eps_hc):
    return (torch.empty_like(x), torch.empty_like(phi), phi.new_empty(3), phi.new_empty(n), phi.new_empty(n),
            phi.new_empty(n * n))


@torch.library.custom_op("v4lab::mix_forward", mutates_args=())
def mix_forward_op(x: Tensor, y: Tensor, post: Tensor, res: Tensor, n: int) -> Tensor:
    """X' = res·X + post ⊗ y for x [T, n·C], y [T, C], post [T, n], res [T, n²]."""
    return _extension().mix_forward(x, y, post, res, n)


@mix_forward_op.register_fake
def _(x, y, post, res, n):
    return torch.empty_like(x)


@torch.library.custom_op("v4lab::mix_backward", mutates_args=())
def mix_backward_op(x: Tensor, y: Tensor, post: Tensor, res: Tensor, g: Tensor, n: int, want_dx: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx (empty unless want_dx), dy, dpost, dres."""
    return tuple(_extension().mix_backward(x, y, post, res, g, n, want_dx))


@mix_backward_op.register_fake
def _(x, y, post, res, g, n, want_dx):
    return (torch.empty_like(x) if want_dx else x.new_empty(0), torch.empty_like(y), torch.empty_like(post),
            torch.empty_like(res))


def _contiguous_or_zeros(g: Tensor | None, *shape, dtype) -> Tensor:
    return torch.zeros(shape, dtype=dtype) if g is None else g.to(dtype).contiguous()


def _mhc_in_grads(saved, meta, g_in, g_post, g_res, g_mix):
    """The gradients of mhc_in's inputs, in their own shapes and dtypes (None for the absent mix rows)."""
    refuse_create_graph(NO_DOUBLE_BACKWARD)
    x, phi, alpha, b_res, pre, post, res, mp, rinv = saved
    n, iters, eps_hc, mix, phi_dtype, dtype, alpha_shape = meta
    g_in = _contiguous_or_zeros(g_in, x.size(0), x.size(1) // n, dtype=x.dtype)
    g_post = _contiguous_or_zeros(g_post, *post.shape, dtype=post.dtype)
    g_res = _contiguous_or_zeros(g_res, x.size(0), n * n if mix else 0, dtype=post.dtype)
    dx, dphi, dalpha, db_pre, db_post, db_res = mhc_in_backward_op(
        x, phi, alpha, b_res, pre, post, mp, rinv, g_in, g_post, g_res, g_mix, res, n, iters, eps_hc)
    dalpha = dalpha[:alpha_shape.numel()].view(alpha_shape).to(dtype)
    if not mix:
        return dx, dphi.to(phi_dtype), dalpha, db_pre.to(dtype), None, None
    return dx, dphi.to(phi_dtype), dalpha, db_pre.to(dtype), db_post.to(dtype), db_res.view(n, n).to(dtype)


def _mhc_in_meta(x, phi, alpha, n, iters, eps_hc, mix):
    return (n, iters, eps_hc, mix, phi.dtype, alpha.dtype, alpha.shape)


def _mhc_in_setup(ctx, inputs, output):
    x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm, eps_hc = inputs
    x_in, pre, post, res, mp, rinv = output
    ctx.save_for_backward(x, phi, alpha, b_res, pre, post, res, mp, rinv)
    ctx.meta = _mhc_in_meta(x, phi, alpha, n, iters, eps_hc, phi.size(0) > n)


def _mhc_in_backward(ctx, g_in, _g_pre, g_post, g_res, _g_mp, _g_rinv):
    saved = ctx.saved_tensors  # once: activation checkpointing unpacks each saved tensor only once
    return (*_mhc_in_grads(saved, ctx.meta, g_in, g_post, g_res, saved[0].new_empty(0)),
            None, None, None, None)


mhc_in_forward_op.register_autograd(_mhc_in_backward, setup_context=_mhc_in_setup)


def _mix_setup(ctx, inputs, output):
    x, y, post, res, n = inputs
    ctx.save_for_backward(x, y, post, res)
    ctx.n = n


def _mix_backward(ctx, g):
    refuse_create_graph(NO_DOUBLE_BACKWARD)
    x, y, post, res = ctx.saved_tensors
    dx, dy, dpost, dres = mix_backward_op(x, y, post, res, g.contiguous(), ctx.n, True)
    return dx, dy, dpost, dres, None


mix_forward_op.register_autograd(_mix_backward, setup_context=_mix_setup)


class _MHCIn(torch.autograd.Function):
    """mhc_in with the Link hand-over (eager only: the compiler cannot trace the mailbox)."""

    @staticmethod
    def forward(ctx, x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm, eps_hc, link):
        x_in, pre, post, res, mp, rinv = mhc_in_forward_op(x, phi, alpha, b_pre, b_post, b_res, n, iters, eps_norm,
                                                           eps_hc)
        ctx.save_for_backward(x, phi, alpha, b_res, pre, post, res, mp, rinv)
        ctx.meta = _mhc_in_meta(x, phi, alpha, n, iters, eps_hc, phi.size(0) > n)
        ctx.mailbox = link.mailbox
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)
        return x_in, pre, post, res

    @staticmethod
    def backward(ctx, g_in, _g_pre, g_post, g_res):
        box, saved = ctx.mailbox, ctx.saved_tensors  # once: activation checkpointing unpacks only once
        g_mix = box.g if box.g is not None else saved[0].new_empty(0)
        box.g = None
        return (*_mhc_in_grads(saved, ctx.meta, g_in, g_post, g_res, g_mix),
                None, None, None, None, None)


class _Mix(torch.autograd.Function):
    """mix with the Link hand-over (eager only)."""

    @staticmethod
    def forward(ctx, x, y, post, res, n, mailbox, node):
        ctx.save_for_backward(x, y, post, res)
        ctx.n, ctx.mailbox, ctx.node = n, mailbox, node
        return mix_forward_op(x, y, post, res, n)

    @staticmethod
    def backward(ctx, g):
        refuse_create_graph(NO_DOUBLE_BACKWARD)
        x, y, post, res = ctx.saved_tensors
        g = g.contiguous()
        # A pass that prunes mhc_in (a gradient w.r.t. some parameters only) must get X's gradient here.
        hand_over = ctx.node is not None and torch._C._will_engine_execute_node(ctx.node)
        dx, dy, dpost, dres = mix_backward_op(x, y, post, res, g, ctx.n, not hand_over)
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
    `link` to the `mix` of this x (eager mode); without one, the ops' registered autograd runs.
    `pre` carries no gradient that anything uses: the mix does not read it, the probes record it."""
    *lead, n, c = x.shape
    flat = x.reshape(-1, n * c).contiguous()
    none = flat.new_empty(0, dtype=_acc_dtype(x))
    operands = [_acc(t, x) if t is not None else none for t in (phi, alpha, b_pre, b_post, b_res)]
    if link is None:
        x_in, pre, post, res, _, _ = mhc_in_forward_op(flat, *operands, n, iters, eps, eps_hc)
    else:
        # the Function converts the gradients back to the parameters' dtypes itself
        x_in, pre, post, res = _MHCIn.apply(flat, *operands, n, iters, eps, eps_hc, link)
        link.node = x_in.grad_fn
    return (x_in.view(*lead, c), pre.view(*lead, n), post.view(*lead, post.size(-1)),
            res.view(*lead, res.size(-1) // n, n))


def mix(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, res: torch.Tensor, link: Link | None = None) -> torch.Tensor:
    """X' = res·X + post ⊗ y for x [..., n, C], y [..., C], post [..., n], res [..., n, n] (float32/64)."""
    *lead, n, c = x.shape
    acc = _acc_dtype(x)
    operands = (x.reshape(-1, n * c).contiguous(), y.to(x.dtype).reshape(-1, c).contiguous(),
                post.to(acc).reshape(-1, n).contiguous(), res.to(acc).reshape(-1, n * n).contiguous())
    if link is None:
        return mix_forward_op(*operands, n).view_as(x)
    return _Mix.apply(*operands, n, link.mailbox, link.node).view_as(x)
