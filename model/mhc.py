"""Hyper-connections: n parallel residual streams, read, written and mixed by every sublayer.

For each sublayer F (attention or FFN, each with its own coefficients) and stream state
X ∈ R^{n×C} per token:

    x_in = Σ_i pre_i X_i        y = F(x_in)        X' = post ⊗ y + res · X      (res: n×n, output × input)

`mhc` (manifold-constrained, arXiv 2512.24880), exactly as DeepSeek-V4's code: from the
RMS-normalised flattened state v', m = v'φᵀ; pre = sigmoid(α_pre·m + b_pre) + hc_eps,
post = 2·sigmoid(α_post·m + b_post), res = Sinkhorn(α_res·m + b_res)ᵀ (model/sinkhorn.py), doubly
stochastic, so every product of res matrices has row and column sums 1 and the residual stream
cannot amplify. φ's rows and the biases are laid out as V4's (pre, post, then its `comb` logits
[input stream, output stream] row-major; res is their transpose, output × input), so V4's weights
map onto ours as they are.
`hc` (Zhu et al., arXiv 2409.19606, dynamic hyper-connections): each stream RMS-normalised on its
own (no weight), tanh dynamics, no constraint: pre = b_pre + s_α·tanh(X̄W_m), res = b_res +
s_α·tanh(X̄W_r)ᵀ, post = b_post + s_β·tanh(X̄W_β), one gate s_α shared by the read and the mix as in
the paper; static init pre = one-hot(sublayer index mod n), res = I, post = 1, and the dynamic
projection W = [W_m, W_β, W_r] starts at zero (paper and lucidrains' `hyper-connections`).

α gates start at 0.01 and static biases at the values above, so at initialisation with identical
streams both reduce to a plain pre-norm residual (hc exactly: its dynamic terms start at zero). On CPU, forward() runs the fused kernels of
model/hc_kernel.py (mhc's coefficient path included); the eager code here is their reference and
the path everywhere else. The static biases and α gates are AdamW
parameters (`optim_role = "scalar"`); the projections φ / W are matrices, which Muon takes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import hc_kernel
from model.sinkhorn import sinkhorn

KINDS = ("hc", "mhc")
HC_EPS = 1e-6  # V4's hc_eps: Sinkhorn's denominators, the floor added to mhc's pre and the head's weights


def _scalar(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t)
    p.optim_role = "scalar"  # a bias or gate, whatever its shape: AdamW, no weight decay
    return p


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32, or wider if already wider (float64 in gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalized_projection(x: torch.Tensor, proj: nn.Linear, eps: float) -> torch.Tensor:
    """proj(x / rms(x)) computed as proj(x) / rms(x): the projection is linear, and scaling its few
    outputs instead of the wide input saves a pass over the n·C-wide stream state."""
    mean_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.size(-1)
    return proj(x) * torch.rsqrt(mean_sq + eps)


class HyperConnection(nn.Module):
    """Read/write/mix coefficients of one sublayer, and their application."""

    def __init__(self, kind: str, n: int, d_model: int, index: int, sinkhorn_iters: int = 20,
                 alpha_init: float = 0.01, eps: float = 1e-6, fused: bool = True, hc_eps: float = HC_EPS):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"hyper-connection kind {kind!r}; accepted: {', '.join(KINDS)}")
        self.kind, self.n, self.iters, self.eps, self.fused = kind, n, sinkhorn_iters, eps, fused
        self.hc_eps = hc_eps
        # mhc: pre, post, res (V4's scale); hc: s_α (pre and res), s_β (post)
        self.alpha = _scalar(torch.full((3 if kind == "mhc" else 2,), alpha_init))
        if kind == "mhc":
            self.phi = nn.Linear(n * d_model, n * n + 2 * n, bias=False)
            self.b_pre = _scalar(torch.zeros(n))
            self.b_post = _scalar(torch.zeros(n))
            self.b_res = _scalar(torch.zeros(n, n))
        else:
            self.proj = nn.Linear(d_model, n + 2, bias=False)  # per stream: pre, post, its res column
            nn.init.zeros_(self.proj.weight)
            self.b_pre = _scalar(F.one_hot(torch.tensor(index % n), n).float())
            self.b_post = _scalar(torch.ones(n))
            self.b_res = _scalar(torch.eye(n))
        self.record = False  # when set, keep token-averaged coefficients for the probes
        self.recorded: dict[str, torch.Tensor] = {}

    def init_weights(self, std: float, out_scale: float) -> None:
        """After the model's normal init of every nn.Linear: hc's dynamic projection starts at zero."""
        if self.kind == "hc":
            nn.init.zeros_(self.proj.weight)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [..., n], post [..., n], res [..., n, n] for stream state x [..., n, C]; fp32."""
        n = self.n
        if self.kind == "mhc":
            a_pre, a_post, a_res = self.alpha.unbind()
            m = _wide(normalized_projection(x.flatten(-2), self.phi, self.eps))
            pre = torch.sigmoid(a_pre * m[..., :n] + self.b_pre) + self.hc_eps
            post = 2 * torch.sigmoid(a_post * m[..., n : 2 * n] + self.b_post)
            comb = sinkhorn(a_res * m[..., 2 * n :].unflatten(-1, (n, n)) + self.b_res, self.iters, self.hc_eps)
            res = comb.transpose(-1, -2)  # V4's comb is input × output
        else:
            a_in, a_out = self.alpha.unbind()
            d = _wide(torch.tanh(normalized_projection(x, self.proj, self.eps)))  # [..., n (stream), n + 2]
            pre = self.b_pre + a_in * d[..., 0]
            post = self.b_post + a_out * d[..., 1]
            res = self.b_res + a_in * d[..., 2:].transpose(-1, -2)  # stream j's row feeds column j
        return pre, post, res

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.fused and hc_kernel.usable(x, *self.parameters()):
            link = None
            if self.kind == "mhc":
                link = hc_kernel.Link()
                x_in, pre, post, res = hc_kernel.mhc_in(x, self.phi.weight, self.alpha, self.b_pre, self.b_post,
                                                        self.b_res, self.iters, self.eps, self.hc_eps, link=link)
            else:
                pre, post, res = self.coefficients(x)
                x_in = self._read(x, pre)
            self._record(pre, post, res)
            return hc_kernel.mix(x, sublayer(x_in), post, res, link)
        pre, post, res = self.coefficients(x)
        self._record(pre, post, res)
        dtype = x.dtype
        y = sublayer(self._read(x, pre))
        # In the stream's dtype: under autocast a bf16 baddbmm would turn an fp32 residual stream into bf16.
        with torch.autocast(x.device.type, enabled=False):
            written = post.to(dtype).unsqueeze(-1) * y.to(dtype).unsqueeze(-2)
            return torch.baddbmm(written.flatten(0, 1), res.to(dtype).contiguous().flatten(0, 1),
                                 x.flatten(0, 1)).view_as(x)

    @staticmethod
    def _read(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        # Contiguous operands: a batched matmul over strided ones (slices of m) falls back to a
        # per-token loop, several times slower. Autocast off, as for the write.
        with torch.autocast(x.device.type, enabled=False):
            return (pre.to(x.dtype).contiguous().unsqueeze(-2) @ x).squeeze(-2)

    def _record(self, pre: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> None:
        if self.record:
            self.recorded = {"res": res.detach().mean(dim=(0, 1)), "pre": pre.detach().mean(dim=(0, 1)),
                             "post": post.detach().mean(dim=(0, 1))}


class StreamReduce(nn.Module):
    """The streams' weighted sum before the final norm: mhc uses sigmoid weights of the same
    dynamic form (no Sinkhorn); hc sums the streams as Zhu et al. do."""

    def __init__(self, kind: str, n: int, d_model: int, alpha_init: float = 0.01, eps: float = 1e-6,
                 fused: bool = True, hc_eps: float = HC_EPS):
        super().__init__()
        self.kind, self.eps, self.fused, self.hc_eps = kind, eps, fused, hc_eps
        if kind == "mhc":
            self.phi = nn.Linear(n * d_model, n, bias=False)
            self.alpha = _scalar(torch.full((1,), alpha_init))  # 1-D: DeepSpeed cannot broadcast 0-D
            self.bias = _scalar(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "mhc":
            return x.sum(dim=-2)
        if self.fused and hc_kernel.usable(x, *self.parameters()):
            return hc_kernel.mhc_in(x, self.phi.weight, self.alpha, self.bias, None, None, 0, self.eps, self.hc_eps)[0]
        m = _wide(normalized_projection(x.flatten(-2), self.phi, self.eps))
        w = torch.sigmoid(self.alpha * m + self.bias) + self.hc_eps
        return HyperConnection._read(x, w)
