"""Orthogonalisation by Newton–Schulz iteration: X ← aX + b(XXᵀ)X + c(XXᵀ)²X.

Each schedule is a list of (a, b, c) triples, one per iteration, a normalisation margin
(X₀ = G / (margin·‖G‖_F)) and the iterations at which Gram Newton–Schulz restarts. Works on a
batch of same-shape matrices `[..., m, n]` at once; tall matrices are transposed first so the Gram
matrices are the small side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KELLER = (3.4445, -4.7750, 2.0315)
V4_TAIL = (2.0, -1.5, 0.5)  # V4's last two iterations: converge the singular values to 1
# Polar Express (arXiv 2505.16932, degree 5): optimal per-iteration polynomials; all but the last
# are deflated by 1.01 (a/1.01, b/1.01³, c/1.01⁵) for half-precision safety; the last repeats.
_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
]
POLAR_EXPRESS_LAST = (1.875, -1.25, 0.375)
SCHEDULES = ("keller", "v4_hybrid", "polar_express")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# Gram Newton–Schulz restarts (0-based iterations before which X and its Gram matrix are formed
# again). The reference implementation (Dao-AILab gram-newton-schulz) restarts at 2; the 10-step
# V4 schedule needs 2, 5 and 8: a rank-10 64×128 update reached σ_max ≈ 1e13 without restarts,
# 1.0 with them. Restarts beyond the last iteration are dropped (short schedules).
DEFAULT_RESTARTS = (2,)
V4_RESTARTS = (2, 5, 8)


@dataclass(frozen=True)
class NSSchedule:
    coefficients: tuple[tuple[float, float, float], ...]
    margin: float = 1.0
    restarts: tuple[int, ...] = DEFAULT_RESTARTS  # used by the Gram method only


def make_schedule(name: str | None, steps: int, coefficients=KELLER, restarts=None) -> NSSchedule:
    """`None`: `steps` iterations of `coefficients` (torch.optim.Muon's convention).
    `keller`: the same with Keller Jordan's triple; `v4_hybrid`: 8 of Keller's then 2 of
    (2, −1.5, 0.5) (`steps` ignored); `polar_express`: the first `steps` Polar Express polynomials.
    `restarts`: 0-based iterations at which the Gram method restarts, each from 1 to the number of
    iterations − 1; `None` is the schedule's default (`V4_RESTARTS` for `v4_hybrid`, else
    `DEFAULT_RESTARTS`), `()` never restarts."""
    if name is None:
        coeffs, margin = (tuple(coefficients),) * steps, 1.0
    elif name == "keller":
        coeffs, margin = (KELLER,) * steps, 1.0
    elif name == "v4_hybrid":
        coeffs, margin = (KELLER,) * 8 + (V4_TAIL,) * 2, 1.0
    elif name == "polar_express":
        deflated = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS]
        coeffs, margin = tuple((deflated + [POLAR_EXPRESS_LAST] * max(0, steps - len(deflated)))[:steps]), 1.01
    else:
        raise ValueError(f"unknown Newton–Schulz schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
    if restarts is None:
        restarts = tuple(i for i in (V4_RESTARTS if name == "v4_hybrid" else DEFAULT_RESTARTS) if i < len(coeffs))
    restarts = tuple(sorted(set(restarts)))
    if any(not isinstance(i, int) or not 1 <= i < len(coeffs) for i in restarts):
        raise ValueError(f"Gram Newton–Schulz restarts {list(restarts)} must be iterations from 1 to "
                         f"{len(coeffs) - 1} (the schedule has {len(coeffs)})")
    return NSSchedule(coeffs, margin, restarts)


def orthogonalize(g: torch.Tensor, schedule: NSSchedule, *, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
                  method: str = "standard") -> torch.Tensor:
    """Approximate polar factor UVᵀ of each matrix in `g` [..., m, n], returned in `dtype`.

    `method="gram"` iterates on the m×m Gram matrix instead of the m×n iterate (X_k = Q_k X₀ with
    Q_k a polynomial in X₀X₀ᵀ), which costs O(m³) per iteration instead of O(m²n): cheaper for
    wide matrices. Square matrices always use the standard iteration. The Gram iteration carries
    R = XXᵀ forward as p(R)·R·p(R), so rounding in R's null space (rank-deficient updates: an
    expert that got few tokens, an early step) is multiplied by p(0) = a every iteration and never
    corrected; fp32 does not prevent it (a rank-10 64×128 update under the 10-step V4 schedule:
    σ_max ≈ 1e13 in fp32). What bounds it is restarting — forming X = QX₀ and R = XXᵀ again at
    `schedule.restarts` — as the reference implementation does. Restarts are not enough in bf16
    (a full-rank 64×128 under the V4 schedule still overflowed), so it computes in fp32: `dtype`
    bf16 is raised to fp32.
    """
    if method == "gram" and dtype == torch.bfloat16:
        dtype = torch.float32
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * schedule.margin).clamp(min=eps)
    if method == "gram" and x.size(-2) < x.size(-1):
        x = _gram_iterations(x, schedule.coefficients, schedule.restarts)
    else:
        x = _standard_iterations(x, schedule.coefficients)
    return x.mT if tall else x


def orthogonalize_stacks(stacks: list[torch.Tensor], schedule: NSSchedule, *, eps: float = 1e-7) -> list[torch.Tensor]:
    """The standard iteration on wide stacks [k_i, m, n_i] that share m, in their own dtype. Their
    m×m steps (the polynomial in XXᵀ) run as one batch: on small matrices a matmul call costs
    more than its arithmetic, and these are a third of the calls."""
    xs = [x / (x.norm(dim=(-2, -1), keepdim=True) * schedule.margin).clamp(min=eps) for x in stacks]
    sizes = [x.size(0) for x in xs]
    gram = xs[0].new_empty(sum(sizes), xs[0].size(-2), xs[0].size(-2))
    for a, b, c in schedule.coefficients:
        for x, g in zip(xs, gram.split(sizes)):
            torch.bmm(x, x.mT, out=g)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        xs = [torch.baddbmm(x, p, x, beta=a) for x, p in zip(xs, poly.split(sizes))]
    return xs


def _standard_iterations(x: torch.Tensor, coefficients) -> torch.Tensor:
    if x.dim() == 2:  # the exact op sequence of torch.optim.Muon, so results agree bit for bit
        for a, b, c in coefficients:
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    for a, b, c in coefficients:
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.reshape(*batch_shape, *x.shape[-2:])


def _gram_iterations(x: torch.Tensor, coefficients, restarts=()) -> torch.Tensor:
    r = x @ x.mT
    eye = torch.eye(r.size(-1), dtype=r.dtype, device=r.device).expand_as(r)
    q = None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:  # X ← QX and R ← XXᵀ from X itself: drops what R's recursion accumulated
            x, q = q @ x, None
            r = x @ x.mT
        # p(R) = aI + bR + cR²; X ← p(R)X means Q ← p(R)Q and R ← p(R) R p(R) (p(R) commutes with R).
        p = torch.baddbmm(a * eye, r, r, beta=1.0, alpha=c) if r.dim() == 3 else torch.addmm(a * eye, r, r, alpha=c)
        p = p + b * r
        q = p if q is None else p @ q
        if i < last and i + 1 not in restarts:  # R is formed again at a restart, and unused after the last
            r = p @ r @ p
    return q @ x
