"""The sublayers of a pre-norm decoder block: RMSNorm, rotary attention and a SwiGLU feed-forward."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels


def yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, factor: float, original_seq_len: int,
                  beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN (arXiv 2309.00071) as DeepSeek's and transformers' code apply it: frequencies that turn
    fewer than `beta_slow` times over the original context are divided by `factor`, those that turn
    more than `beta_fast` times are kept, with a linear ramp between (no attention rescaling)."""
    def pair_index(rotations: float) -> float:  # the frequency pair that turns `rotations` times
        return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def rope_tables(seq_len: int, head_dim: int, theta: float, yarn: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim/2] for rotary position embeddings; `yarn`: the
    keyword arguments of `yarn_inv_freq` (factor, original_seq_len, beta_fast, beta_slow), or None.
    Float64 frequencies and angles, rounded once."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if yarn is not None and yarn["factor"] != 1:
        inv_freq = yarn_inv_freq(inv_freq, head_dim, theta, **yarn)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, H, T, D] by position-dependent angles; cos/sin
    [T, D/2], or [T, 1, D/2] for query-major x [B, T, H, D] (their first dim is x's position dim)."""
    # As a complex product (x_2i + i·x_2i+1)·(cos + i·sin): one kernel forward and one backward,
    # where the real form is a dozen elementwise ops and a stack each way; the same arithmetic
    # (x1·cos − x2·sin, x1·sin + x2·cos) up to float rounding. Always in fp32 or wider.
    t = x.shape[-cos.dim()]
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # Inductor has no complex kernels; it fuses the real form into one loop
        x1, x2 = pairs.unbind(-1)
        c, s = cos[:t].to(pairs.dtype), sin[:t].to(pairs.dtype)
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)
    if pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-2]):
        pairs = pairs.contiguous()  # a complex view needs whole (re, im) pairs in memory
    rotation = torch.complex(cos[:t].to(pairs.dtype), sin[:t].to(pairs.dtype))
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).type_as(x)


def refuse_create_graph(message: str) -> None:
    """For hand-written backwards whose arithmetic is not recorded: a graph of them
    (create_graph=True) would silently miss it, so raise instead. (once_differentiable would not
    do: its error is raised only where the gradient is needed through nothing but such backwards.)
    A compiled backward is traced without grad mode."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(message)


class _RotaryQKVFunction(torch.autograd.Function):
    """rotary_qkv on the CPU: one pass over the projection forward (q, k, v are views of its rotated
    copy, in the projection's layout) and one from the heads' gradients back into it
    (model/csrc/rope.cpp), where the eager path rotates q and k apart each way into new tensors and
    autograd stacks the three gradients into the projection's layout in another copy."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_heads, heads_dtype):
        ctx.save_for_backward(cos, sin)
        ctx.qkv_dtype = qkv.dtype
        b, t, _ = qkv.shape
        out = cpu_kernels.extension("rope").rotary_qkv_forward(qkv, cos, sin, n_heads, heads_dtype)
        return out.view(b, t, 3, n_heads, qkv.size(-1) // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        refuse_create_graph("the fused rotary kernel has no double backward (create_graph=True)")
        cos, sin = ctx.saved_tensors
        # (autograd hands zeros for a head that got no gradient)
        gq, gk, gv = (g.to(cos.dtype) if g.stride(-1) == 1 else g.to(cos.dtype).contiguous() for g in (gq, gk, gv))
        grad = cpu_kernels.extension("rope").rotary_qkv_backward(gq, gk, gv, cos, sin, ctx.qkv_dtype)
        return grad, None, None, None, None


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q, k, v are attended in: float32 on the CPU for bfloat16/float16 activations, whose
    backward PyTorch's CPU attention runs ~1.5× slower than float32's (15 against 10 ms per layer of
    the default model); their own dtype elsewhere."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and x.device.type == "cpu" else x.dtype


def rotary_qkv(qkv: torch.Tensor, n_heads: int, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection qkv [B, T, 3·C] as heads q, k, v [B, H, T, D] in attention_dtype, q and k
    rotated by apply_rope at positions cos/sin [T, D/2]. On the CPU's fused path they are views of
    one tensor made by one autograd Function: read them (attention, a cache's copy), do not modify
    them in place (autograd refuses)."""
    b, t, _ = qkv.shape
    heads = attention_dtype(qkv)
    if cpu_kernels.takes("rope", qkv, (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        c, s = cos[:t].to(heads).contiguous(), sin[:t].to(heads).contiguous()
        return _RotaryQKVFunction.apply(qkv, c, s, n_heads, heads)
    q, k, v = qkv.view(b, t, 3, n_heads, qkv.size(-1) // (3 * n_heads)).permute(2, 0, 3, 1, 4)
    return apply_rope(q.to(heads), cos, sin), apply_rope(k.to(heads), cos, sin), v.to(heads)


class _RMSNormFunction(torch.autograd.Function):
    """y = x · r · w with r = rsqrt(mean(x²) + eps) per row (w = None: no weight), in as few passes
    over x as the arithmetic allows: PyTorch's CPU rms_norm is about six elementwise kernels forward
    and its autograd a dozen more backward. Same function; results equal up to float rounding. On
    the CPU in float32/64, one fused pass over each row each way (model/csrc/rms_norm.cpp)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = torch.promote_types(x.dtype, torch.float32)
        eps = torch.finfo(wide).eps if eps is None else eps  # torch's default
        ctx.fused = (weight is None or weight.dtype == wide) and cpu_kernels.takes("rms_norm", x, (wide,))
        if ctx.fused:
            y, rstd = cpu_kernels.extension("rms_norm").rms_norm_forward(
                x, None if weight is None else weight.contiguous(), eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        x_wide = x.to(wide)
        # ‖x‖² / C from one norm reduction (mean(x²) would be a square, a mean and their temporaries)
        rstd = torch.linalg.vector_norm(x_wide, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        y = x_wide * rstd
        return (y if weight is None else y.mul_(weight.to(wide))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_in, weight, rstd = ctx.saved_tensors
        if ctx.fused:
            refuse_create_graph("the fused RMSNorm kernel has no double backward (create_graph=True)")
            grad_x, grad_w = cpu_kernels.extension("rms_norm").rms_norm_backward(  # None where not asked for
                grad.to(x_in.dtype).contiguous(), x_in, None if weight is None else weight.contiguous(), rstd,
                ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1])
            return grad_x, grad_w, None
        wide = rstd.dtype
        x, grad = x_in.to(wide), grad.to(wide)
        gx = (grad * x).flatten(0, -2)  # [N, C]
        grad_x = grad_w = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (gx.T @ rstd.flatten()).to(weight.dtype)  # Σ_n g·x·r, one matrix-vector product
        if ctx.needs_input_grad[0]:
            # d/dx of x·r·w = r·(g·w) − x · r³ · Σ_c(g·w·x) / C
            w = None if weight is None else weight.to(wide)
            coef = (gx.sum(-1) if w is None else gx @ w).view_as(rstd).mul_(rstd.pow(3)).div_(-x.size(-1))
            grad_x = (grad if w is None else grad * w).mul(rstd).addcmul_(x, coef).to(x_in.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMSNorm over the last dimension (weight None: none); on CPU through _RMSNormFunction."""
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension; on CPU with its closed-form backward (same function,
    gradients equal up to float rounding). Elsewhere PyTorch's fused kernels run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)  # it picks PyTorch's kernels off the CPU itself


@torch.no_grad()
def max_causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-head max of q·k/sqrt(d) over the batch and all causal (query, key) pairs: [H]."""
    t = q.size(-2)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return logits.masked_fill(future, float("-inf")).amax(dim=(0, 2, 3))


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings (PyTorch SDPA kernel)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        # Fused q, k, v are three matrices (and each head's rows one more level down): Muon
        # orthogonalises each block on its own (optim/muon.py).
        self.qkv.weight.row_blocks, self.qkv.weight.head_blocks = 3, n_heads
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        # Per-head max pre-softmax logit of the last forward, for QK-Clip and the probes. Costs an
        # explicit QKᵀ, so it is computed only while `track_max_logits` is on.
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def new_cache(self, batch: int, capacity: int, device, dtype) -> "KVCache":
        return KVCache(batch, self.n_heads, capacity, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None" = None
                ) -> torch.Tensor:
        """x [B, T, C] at positions given by cos/sin [T, D/2]; with `cache`, x follows the cached
        tokens: their keys and values join the attention, and x's are appended."""
        b, t, c = x.shape
        q, k, v = rotary_qkv(self.qkv(x), self.n_heads, cos, sin)
        if self.track_max_logits:
            self.max_logits = max_causal_logits(q, k)
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if past:  # queries at past..past+t-1 see every cached key and the new ones up to themselves
                causal = False
                if t > 1:
                    mask = torch.arange(k.size(-2), device=x.device) <= past + torch.arange(t, device=x.device)[:, None]
        # in attention_dtype: CPU autocast would run it in bf16
        with torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, t, c).to(x.dtype))


class KVCache:
    """Rotated keys and values of the tokens decoded so far, for one dense attention layer:
    [B, H, capacity, D] buffers filled from the front."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] after the cached tokens; return all keys and values so far."""
        end = self.length + k.size(-2)
        if end > self.k.size(-2):
            raise ValueError(f"KV cache holds {self.k.size(-2)} tokens; {end} were asked for")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """silu(gate)·up; with V4's clamps, gate ≤ clamp and up in [−clamp, clamp]."""
    if clamp is not None:
        gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
    return F.silu(gate) * up


class _SwiGLUFunction(torch.autograd.Function):
    """clamped_swiglu on the fused [..., 2·hidden] gate/up projection: the same arithmetic forward
    and backward, with both halves of the gradient written straight into one [..., 2·hidden]
    tensor instead of computed apart and concatenated. On the CPU (float32/64, bfloat16) one fused
    pass each way (model/csrc/swiglu.cpp), which saves only the projection."""

    @staticmethod
    def forward(ctx, gate_up, clamp):
        ctx.clamp = clamp
        ctx.fused = cpu_kernels.takes("swiglu", gate_up, (torch.float32, torch.float64, torch.bfloat16))
        if ctx.fused:
            ctx.save_for_backward(gate_up)
            return cpu_kernels.extension("swiglu").swiglu_forward(gate_up, math.inf if clamp is None else clamp)
        gate, up = gate_up.chunk(2, dim=-1)
        if clamp is not None:
            gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        clamp = ctx.clamp
        if ctx.fused:
            refuse_create_graph("the fused SwiGLU kernel has no double backward (create_graph=True)")
            (gate_up,) = ctx.saved_tensors
            return cpu_kernels.extension("swiglu").swiglu_backward(
                grad.to(gate_up.dtype).contiguous(), gate_up, math.inf if clamp is None else clamp, clamp is not None), None
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        if clamp is not None:
            gate_c, up_c = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
        else:
            gate_c, up_c = gate, up
        out = torch.empty(gate_up.shape, dtype=torch.promote_types(grad.dtype, act.dtype), device=grad.device)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up_c, gate_c, grad_input=d_gate)
        if clamp is not None:  # clamp passes the gradient where the input lies inside its bounds
            d_gate.masked_fill_(~(gate <= clamp), 0)
            d_up.masked_fill_(~((up >= -clamp) & (up <= clamp)), 0)
        return out.to(gate_up.dtype), None


def swiglu(gate_up: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """clamped_swiglu of the fused [..., 2·hidden] gate/up projection."""
    if torch.compiler.is_compiling():  # Inductor derives the backward and fuses it in one loop
        return clamped_swiglu(*gate_up.chunk(2, dim=-1), clamp)
    return _SwiGLUFunction.apply(gate_up, clamp)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, clamp: float | None = None):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.gate_up.weight.row_blocks = 2  # gate and up are separate matrices
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x), self.clamp))
