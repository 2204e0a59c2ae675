"""Newton–Schulz against the float64 references of tests/reference/newton_schulz.py, and every
schedule × method × dtype on full-rank, rank-deficient and zero matrices."""
import functools

import pytest
import torch

from model import build_model
from optim import build_optimizer
from optim.muon import Muon
from optim.newton_schulz import V4_RESTARTS, make_schedule, orthogonalize
from tests.conftest import compose_config
from tests.reference import newton_schulz as ref

# (schedule, steps, the reference's coefficients, singular-value band for fp32 and bf16 compute)
SCHEDULES = [
    (None, 5, ref.keller(5), {"fp32": (0.6, 1.25), "bf16": (0.6, 1.25)}),  # torch's default
    ("keller", 5, ref.keller(5), {"fp32": (0.6, 1.25), "bf16": (0.6, 1.25)}),  # not converged by design
    ("v4_hybrid", 10, ref.v4_hybrid(), {"fp32": (0.995, 1.005), "bf16": (0.99, 1.01)}),
    ("polar_express", 5, ref.polar_express(5), {"fp32": (0.85, 1.15), "bf16": (0.85, 1.15)}),
    ("polar_express", 8, ref.polar_express(8), {"fp32": (0.995, 1.005), "bf16": (0.99, 1.01)}),
]
IDS = [f"{s}-{n}" for s, n, _, _ in SCHEDULES]


def ref_margin(schedule) -> float:
    """X0's normalisation, from the reference: the Polar Express paper's 1.01 safety factor, else 1."""
    return ref.POLAR_EXPRESS_MARGIN if schedule == "polar_express" else 1.0


def low_rank(m, n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)).float()


def conditioned(m, n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    k = min(m, n)
    return ((u[:, :k] * torch.logspace(0, -2, k, dtype=torch.float64)) @ v[:, :k].T).float()


INPUTS = {
    "full": conditioned(64, 128, cond=100),
    "full-tall": conditioned(128, 64, cond=100),
    "rank10": low_rank(64, 128, 10),  # an expert that saw few tokens; an early step
    "rank10-tall": low_rank(128, 64, 10),
}


@functools.cache
def projectors(name):
    """Onto the input's column and row spaces: where the polar factor is defined."""
    u, s, vh = torch.linalg.svd(INPUTS[name].double(), full_matrices=False)
    r = int((s > s.max() * 1e-6).sum())
    return u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r], r


@functools.cache
def standard(index, name, compute):
    schedule, steps = SCHEDULES[index][:2]
    dtype = torch.float32 if compute == "fp32" else torch.bfloat16
    return orthogonalize(INPUTS[name], make_schedule(schedule, steps), dtype=dtype).double()


@functools.cache
def reference(index, name):
    schedule, steps, coeffs = SCHEDULES[index][:3]
    return ref.newton_schulz(INPUTS[name], coeffs, make_schedule(schedule, steps).margin)


def spectral(x):
    return float(torch.linalg.matrix_norm(x, ord=2))


@pytest.mark.parametrize("index", range(len(SCHEDULES)), ids=IDS)
@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_schedule_method_and_dtype_is_bounded_and_agrees(index, method, dtype):
    """On the input's row and column spaces the result is the reference iteration's (to fp32 or
    bf16 rounding) and its singular values lie in the schedule's band; off them (rank-deficient
    inputs) it stays bounded: small in fp32, ≤ the band in bf16, where NS amplifies rounding
    noise like any other small singular value. Gram computes in fp32 whatever `dtype` asks."""
    schedule, steps, _, bands = SCHEDULES[index]
    s = make_schedule(schedule, steps)
    compute = "fp32" if method == "gram" else dtype
    lo, hi = bands[compute]
    tol = 2e-4 if compute == "fp32" else 0.1
    for name, g in INPUTS.items():
        out = orthogonalize(g, s, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, method=method).double()
        pu, pv, r = projectors(name)
        signal = pu @ out @ pv
        assert torch.isfinite(out).all(), name
        assert spectral(out) < hi, name
        assert torch.linalg.svdvals(signal)[r - 1] > lo, name
        assert spectral(out - signal) < (1e-2 if compute == "fp32" else hi), name
        assert spectral(pu @ (out - reference(index, name)) @ pv) < tol, name  # the float64 reference
        assert spectral(pu @ (out - standard(index, name, compute)) @ pv) < tol, name  # our standard method
    zero = orthogonalize(torch.zeros(64, 128), s, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, method=method)
    assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("schedule,steps,coeffs,bands", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("name", ["full", "rank10-tall"])
def test_float64_iterations_equal_the_references(schedule, steps, coeffs, bands, name):
    """In float64, rounding aside, both methods are the reference recurrences: same coefficients,
    margin, transposition and restart points."""
    s = make_schedule(schedule, steps)
    g = INPUTS[name].double()
    ours = orthogonalize(g, s, dtype=torch.float64)
    gram = orthogonalize(g, s, dtype=torch.float64, method="gram")
    assert s.margin == ref_margin(schedule)
    assert torch.allclose(ours, ref.newton_schulz(g, coeffs, ref_margin(schedule)), atol=1e-11, rtol=0)
    assert torch.allclose(gram, ref.gram_newton_schulz(g, coeffs, s.restarts, ref_margin(schedule)), atol=1e-11, rtol=0)


def test_restart_defaults_per_schedule():
    assert make_schedule("v4_hybrid", 10).restarts == V4_RESTARTS == (2, 5, 8)
    assert make_schedule("polar_express", 8).restarts == make_schedule("keller", 5).restarts == (2,)
    assert make_schedule(None, 2).restarts == ()  # no iteration 2 to restart at
    assert make_schedule("v4_hybrid", 10, restarts=[4]).restarts == (4,)
    for bad in ([0], [10], [2, 11]):
        with pytest.raises(ValueError, match=r"restarts .* from 1 to 9"):
            make_schedule("v4_hybrid", 10, restarts=bad)
    with pytest.raises(ValueError, match="restarts"):
        Muon([torch.nn.Parameter(torch.zeros(4, 8))], ns_schedule="keller", ns_restarts=[5])
    cfg = compose_config(["model=tiny", "optim=muon", "optim.ns_method=gram", "optim.ns_restarts=[4]"])
    assert build_optimizer(build_model(cfg.model, 256), cfg.optim).param_groups[0]["ns_restarts"] == (4,)


def test_gram_without_restarts_diverges_where_restarts_hold():
    """Why restarts exist: without them the Gram recursion amplifies rounding in R's null space
    (measured σ_max ≈ 2e13 in fp32 on this rank-10 update)."""
    g = INPUTS["rank10"]
    never = orthogonalize(g, make_schedule("v4_hybrid", 10, restarts=()), dtype=torch.float32, method="gram")
    assert not torch.isfinite(never).all() or spectral(never.double()) > 1e3


def test_muon_restarts_the_gram_iteration_where_told():
    """optim.ns_restarts reaches the iteration: Muon's update is the Gram method's with those restart
    points (not the schedule's default ones, 1e-3 apart on this rank-10 update), and with none it
    diverges as the bare method does."""
    g = INPUTS["rank10"]
    for restarts in ((4,), ()):
        p = torch.nn.Parameter(torch.zeros(64, 128))
        opt = Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, ns_schedule="v4_hybrid",
                   ns_method="gram", ns_restarts=restarts, ns_dtype="fp32", adjust_lr_fn="match_rms_adamw",
                   rms_target=0.18)
        p.grad = g.clone()
        opt.step()
        if restarts:
            orth = orthogonalize(g, make_schedule("v4_hybrid", 10, restarts=restarts), dtype=torch.float32, method="gram")
            assert torch.allclose(p.detach(), -0.18 * 128 ** 0.5 * orth, atol=1e-6, rtol=0)
        else:
            assert not torch.isfinite(p).all() or spectral(p.detach().double()) > 1e3


def test_muon_gram_on_a_rank_deficient_update_matches_standard():
    """The user's case of the issue: Muon(v4_hybrid, gram) on a rank-10 64×128 gradient."""
    results = {}
    for method in ("standard", "gram"):
        p = torch.nn.Parameter(torch.zeros(64, 128))
        opt = Muon([p], lr=1.0, weight_decay=0.0, ns_schedule="v4_hybrid", ns_method=method, ns_dtype="fp32",
                   adjust_lr_fn="match_rms_adamw", rms_target=0.18)
        p.grad = INPUTS["rank10"].clone()
        opt.step()
        results[method] = p.detach().double()
    rms = results["gram"].pow(2).mean().sqrt()
    assert rms == pytest.approx(0.18 * 128 ** 0.5 * (10 / (64 * 128)) ** 0.5, rel=1e-3)  # 10 unit singular values
    assert spectral(results["gram"] - results["standard"]) < 1e-2 * 0.18 * 128 ** 0.5


@pytest.mark.parametrize("index", range(len(SCHEDULES)), ids=IDS)
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_muon_applies_each_schedule_as_the_reference(index, method):
    """Through Muon's own paths (small matrices batched by shared m, stacked experts, tall ones
    transposed, the Gram method), one step from zero is −lr·scale·NS(G) with the schedule's
    coefficients and margin."""
    schedule, steps, coeffs, _ = SCHEDULES[index]
    torch.manual_seed(0)
    shapes = [(24, 64), (24, 40), (64, 24), (2, 24, 40), (32, 32)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    opt = Muon(params, lr=0.5, weight_decay=0.0, momentum=0.0, nesterov=False, ns_schedule=schedule,
               ns_steps=steps, ns_method=method, ns_dtype="fp32", adjust_lr_fn="match_rms_adamw")
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        scale = 0.2 * max(g.shape[-2:]) ** 0.5
        mats = g.double().reshape(-1, *g.shape[-2:])
        expected = -0.5 * scale * torch.stack([ref.newton_schulz(m, coeffs, ref_margin(schedule))
                                                for m in mats]).reshape(g.shape)
        assert torch.allclose(p.detach().double(), expected, atol=2e-5, rtol=0), tuple(g.shape)
