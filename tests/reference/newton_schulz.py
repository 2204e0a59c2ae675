"""Newton–Schulz orthogonalisation written from the formulas, in float64, one matrix at a time.

Independent of optim/newton_schulz.py (nothing imported from it): the coefficient tables are
written out again from their sources, the iterations are the textbook recurrences with no
fused or batched operations.

- Quintic Newton–Schulz: X₀ = G / (margin·‖G‖_F) (G transposed first when it has more rows than
  columns), then X ← aX + b(XXᵀ)X + c(XXᵀ)²X for each (a, b, c) of the schedule.
- V4's hybrid schedule (V4 report §2.4): 8 iterations of (3.4445, −4.7750, 2.0315), then 2 of
  (2, −1.5, 0.5).
- Polar Express (arXiv 2505.16932, degree 5, ℓ = 1e-3): the paper's optimal polynomials; all but
  the final repeating one divided by 1.01 (a/1.01, b/1.01³, c/1.01⁵); X₀ normalised by 1.01·‖G‖_F.
- Gram Newton–Schulz: with R = XXᵀ, each step is X ← p(R)X, p(R) = aI + bR + cR². Keep X₀ and the
  accumulated Q = Π p(R_k) and carry R forward as p(R)·R·p(R); at each restart iteration form
  X = QX₀ and R = XXᵀ afresh and start Q = I again. The result is QX₀.
"""
from __future__ import annotations

import torch

KELLER = (3.4445, -4.7750, 2.0315)
V4_TAIL = (2.0, -1.5, 0.5)
POLAR_EXPRESS_PAPER = [  # arXiv 2505.16932, the degree-5 table for ℓ = 1e-3 (before the 1.01 safety factor)
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
]
POLAR_EXPRESS_FINAL = (1.875, -1.25, 0.375)  # what the table converges to; repeated after it
POLAR_EXPRESS_MARGIN = 1.01


def v4_hybrid() -> list[tuple[float, float, float]]:
    return [KELLER] * 8 + [V4_TAIL] * 2


def keller(steps: int) -> list[tuple[float, float, float]]:
    return [KELLER] * steps


def polar_express(steps: int) -> list[tuple[float, float, float]]:
    safe = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in POLAR_EXPRESS_PAPER]
    return [safe[i] if i < len(safe) else POLAR_EXPRESS_FINAL for i in range(steps)]


def _start(g: torch.Tensor, margin: float) -> tuple[torch.Tensor, bool]:
    x = g.to(torch.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = torch.linalg.norm(x)
    return (x / (margin * norm) if norm > 0 else torch.zeros_like(x)), tall


def newton_schulz(g: torch.Tensor, coefficients, margin: float = 1.0) -> torch.Tensor:
    """The quintic iteration on one 2-D matrix, float64."""
    x, tall = _start(g, margin)
    for a, b, c in coefficients:
        s = x @ x.T
        x = a * x + b * (s @ x) + c * (s @ (s @ x))
    return x.T if tall else x


def gram_newton_schulz(g: torch.Tensor, coefficients, restarts=(), margin: float = 1.0) -> torch.Tensor:
    """Gram Newton–Schulz with restarts on one 2-D matrix, float64. In exact arithmetic equal to
    `newton_schulz` whatever the restarts."""
    x, tall = _start(g, margin)
    eye = torch.eye(x.shape[0], dtype=torch.float64)
    r, q = x @ x.T, eye.clone()
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts:
            x = q @ x
            r, q = x @ x.T, eye.clone()
        p = a * eye + b * r + c * (r @ r)
        q = p @ q
        r = p @ r @ p
    x = q @ x
    return x.T if tall else x


def polar_factor(g: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """U Vᵀ of the (rank-`rank`) SVD of g: what Newton–Schulz approximates."""
    u, s, vh = torch.linalg.svd(g.to(torch.float64), full_matrices=False)
    r = rank if rank is not None else int((s > s.max() * 1e-10).sum())
    return u[:, :r] @ vh[:r]
