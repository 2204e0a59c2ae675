"""Muon: parity with torch.optim.Muon, each Newton–Schulz schedule against the SVD, V4 mode
against the formulas of REFERENCE.md §2, block/batched matrices, the AdamW half, routing."""
import math

import pytest
import torch

from model import build_model
from optim import build_optimizer
from optim.muon import Muon
from optim.newton_schulz import make_schedule, orthogonalize
from tests.conftest import compose_config
from tests.reference import newton_schulz as ref
from train.validate import ConfigError

SHAPES = [(32, 32), (24, 64), (64, 24), (48, 48), (24, 64), (24, 40), (96, 24)]  # m = 24 with three widths


def run_pair(make_ref, make_ours, shapes=SHAPES, steps=20, seed=0, grad_scale=1.0):
    torch.manual_seed(seed)
    ref = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref, opt_ours = make_ref(ref), make_ours(ours)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, generator=g) * grad_scale
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt_ours.step()
    return max((a - b).abs().max().item() for a, b in zip(ref, ours))


@pytest.mark.parametrize("kwargs", [
    {}, {"adjust_lr_fn": "original"}, {"adjust_lr_fn": "match_rms_adamw"}, {"nesterov": False},
    {"momentum": 0.9, "weight_decay": 0.0, "lr": 0.05}, {"ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2)},
])
def test_parity_with_torch_muon(kwargs):
    assert run_pair(lambda p: torch.optim.Muon(p, **kwargs), lambda p: Muon(p, **kwargs)) <= 1e-6


def test_gram_method_computes_in_fp32_whatever_ns_dtype():
    """The Gram iteration diverges in bf16, so it always runs in fp32; its inputs must not be
    rounded to bf16 on the way either."""
    kw = dict(ns_method="gram")
    assert run_pair(lambda p: Muon(p, ns_dtype="fp32", **kw), lambda p: Muon(p, ns_dtype="bf16", **kw)) == 0


def test_parity_for_large_matrices_outside_the_batched_path(monkeypatch):
    # the threshold lowered so that small matrices take the one-by-one path (bf16 is slow on CPU)
    monkeypatch.setattr("optim.muon.BATCH_MAX_ELEMENTS", 40 * 40)
    shapes = [(41, 41), (41, 41), (30, 100), (24, 32)]  # above the threshold: one by one; the last batched
    assert run_pair(lambda p: torch.optim.Muon(p), lambda p: Muon(p), shapes=shapes, steps=5) <= 1e-6


def test_defaults_match_torch():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    ours, ref = Muon(p).defaults, torch.optim.Muon(p).defaults
    assert all(ours[k] == ref[k] for k in ref)


def spectrum_matrix(m, n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    k = min(m, n)
    return ((u[:, :k] * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)) @ v[:, :k].T).float()


# (schedule, steps, dtype, band of the output's singular values for inputs of condition number ≤ 100)
BANDS = [
    (None, 5, "fp32", (0.5, 1.5)),  # Keller's: deliberately not converged, σ' ∈ ~(0.68, 1.2)
    ("keller", 5, "bf16", (0.5, 1.5)),
    ("v4_hybrid", 10, "fp32", (0.995, 1.005)),  # the 2 final (2, -1.5, 0.5) steps pull σ' to 1
    ("v4_hybrid", 10, "bf16", (0.99, 1.01)),
    ("polar_express", 5, "fp32", (0.85, 1.15)),
    ("polar_express", 8, "fp32", (0.995, 1.005)),
]


@pytest.mark.parametrize("schedule,steps,dtype,band", BANDS)
@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32)])
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_newton_schulz_singular_values_in_band(schedule, steps, dtype, band, shape, method):
    g = spectrum_matrix(*shape, cond=100)
    out = orthogonalize(g, make_schedule(schedule, steps), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                        method=method)
    sv = torch.linalg.svdvals(out.double())
    assert band[0] < sv.min() and sv.max() < band[1]
    if dtype == "fp32":  # and the singular vectors of the polar factor UVᵀ (bf16 blurs the weakest ones)
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        assert torch.linalg.matrix_norm(out.double() - u @ vh, ord=2) < max(1 - band[0], band[1] - 1) + 0.01


def test_gram_equals_standard_in_fp32():
    g = torch.randn(3, 32, 200)
    s = make_schedule("v4_hybrid", 10)
    a = orthogonalize(g, s, dtype=torch.float32, method="standard")
    b = orthogonalize(g, s, dtype=torch.float32, method="gram")
    assert torch.allclose(a, b, atol=2e-4)


def v4_reference(w, grads, lr, wd, mu, gamma):
    """REFERENCE.md §2 written out directly, in float64."""
    w, m = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    coeffs = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2
    for g in grads:
        g = g.double()
        m = mu * m + g
        u = mu * m + g
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / x.norm()
        for a, b, c in coeffs:
            xxt = x @ x.T
            x = a * x + b * xxt @ x + c * xxt @ xxt @ x
        o = (x.T if u.shape[0] > u.shape[1] else x) * math.sqrt(max(u.shape)) * gamma
        w = w * (1 - lr * wd) - lr * o
    return w


@pytest.mark.parametrize("shape", [(32, 32), (24, 64), (64, 24)])
def test_v4_mode_matches_the_reference_formulas(shape):
    torch.manual_seed(0)
    w0 = torch.randn(*shape)
    grads = [torch.randn(*shape) for _ in range(10)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, momentum_type="classical",
               ns_schedule="v4_hybrid", ns_dtype="fp32", adjust_lr_fn="match_rms_adamw", rms_target=0.18)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p.detach().double(), v4_reference(w0, grads, 0.02, 0.1, 0.95, 0.18), atol=1e-4)


def test_stacked_experts_and_row_blocks_are_separate_matrices():
    """A [E, out, in] parameter, and a fused 3-block matrix, update like their parts on their own."""
    torch.manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(3, 16, 40))
    fused = torch.nn.Parameter(torch.randn(3 * 16, 40))
    fused.row_blocks = 3
    parts = [torch.nn.Parameter(t.clone()) for t in (*experts.detach(), *fused.detach().chunk(3))]
    kw = dict(lr=0.02, ns_dtype="fp32", adjust_lr_fn="match_rms_adamw")
    opt, opt_parts = Muon([experts, fused], **kw), Muon(parts, **kw)
    for _ in range(5):
        ge, gf = torch.randn(3, 16, 40), torch.randn(48, 40)
        experts.grad, fused.grad = ge, gf
        for p, g in zip(parts, (*ge, *gf.chunk(3))):
            p.grad = g.clone()
        opt.step()
        opt_parts.step()
    assert torch.allclose(experts.detach(), torch.stack([p.detach() for p in parts[:3]]), atol=1e-5)
    assert torch.allclose(fused.detach(), torch.cat([p.detach() for p in parts[3:]]), atol=1e-5)


def test_per_head_orthogonalises_each_head():
    """Fused q/k/v of 4 heads: each head's 4×16 block of each of q, k, v is its own matrix. The
    expected update is computed head by head with the float64 reference; orthogonalising the
    16×16 q, k, v blocks instead (per_head=False) gives another update."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3 * 16, 16))
    w.row_blocks, w.head_blocks = 3, 4
    opt = Muon([w], lr=0.5, weight_decay=0.0, momentum=0.0, nesterov=False, ns_schedule="v4_hybrid",
               ns_dtype="fp32", adjust_lr_fn="match_rms_adamw", rms_target=0.18, per_head=True)
    grad = torch.randn(48, 16)
    w.grad = grad.clone()
    opt.step()
    heads = [ref.newton_schulz(block, ref.v4_hybrid()) for block in grad.double().view(12, 4, 16)]
    expected = -0.5 * 0.18 * math.sqrt(16) * torch.cat(heads)  # scale of a 4×16 matrix
    assert torch.allclose(w.detach().double(), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        w.zero_()
    opt = Muon([w], lr=0.5, weight_decay=0.0, momentum=0.0, nesterov=False, ns_schedule="v4_hybrid",
               ns_dtype="fp32", adjust_lr_fn="match_rms_adamw", rms_target=0.18, per_head=False)
    w.grad = grad.clone()
    opt.step()
    blocks = [ref.newton_schulz(block, ref.v4_hybrid()) for block in grad.double().view(3, 16, 16)]
    assert torch.allclose(w.detach().double(), -0.5 * 0.18 * math.sqrt(16) * torch.cat(blocks), atol=1e-5, rtol=0)


def test_adamw_half_equals_torch_adamw():
    kw = dict(lr=3e-3, weight_decay=0.1)
    diff = run_pair(lambda p: torch.optim.AdamW(p, betas=(0.9, 0.95), eps=1e-8, **kw),
                    lambda p: Muon(p, use_muon=False, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, **kw),
                    shapes=[(8,), (4, 6), (3, 2, 2)])
    assert diff <= 1e-7


def test_adamw_half_takes_v4s_eps_at_rounding_level_gradients():
    """V4's eps 1e-20: gradients of 1e-10 still take ±lr steps, as torch's AdamW with that eps does
    (with the usual 1e-8 they would take a hundredth of one)."""
    kw = dict(lr=3e-3, weight_decay=0.1)
    diff = run_pair(lambda p: torch.optim.AdamW(p, betas=(0.9, 0.95), eps=1e-20, **kw),
                    lambda p: Muon(p, use_muon=False, adamw_betas=(0.9, 0.95), adamw_eps=1e-20, **kw),
                    shapes=[(8,), (4, 6)], steps=3, grad_scale=1e-10)
    assert diff <= 1e-7


def test_routing_and_separate_learning_rates():
    cfg = compose_config(["model=tiny", "optim=muon", "optim.lr=0.02", "optim.adamw_lr=0.001"])
    model = build_model(cfg.model, 256)
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    muon_ids = {id(p) for p in groups["muon"]["params"]}
    assert groups["muon"]["use_muon"] and groups["muon"]["lr"] == 0.02
    assert all(not g["use_muon"] and g["lr"] == 0.001 for n, g in groups.items() if n != "muon")
    assert {id(b.attn.qkv.weight) for b in model.blocks} <= muon_ids
    assert not {id(model.embed.weight), id(model.head.weight), id(model.norm.weight)} & muon_ids
    assert all(p.dim() == 2 for p in groups["muon"]["params"])


def test_muon_without_matrices_is_an_error():
    cfg = compose_config(["optim=muon"])
    with pytest.raises(ConfigError, match="no hidden weight matrix"):
        build_optimizer(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4)), cfg.optim)


def test_bad_arguments_are_rejected():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="momentum_type"):
        Muon(p, momentum_type="heavy")
    with pytest.raises(ValueError, match="schedule"):
        Muon(p, ns_schedule="newton")
    with pytest.raises(ValueError, match="2 or more dimensions"):
        Muon([torch.nn.Parameter(torch.randn(4))])


def test_qk_clip_brings_each_offending_head_back_to_tau():
    from optim.qk_clip import attention_modules, qk_clip, track_max_logits
    cfg = compose_config(["model=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(20)  # make layer 0's logits large
    idx = torch.randint(0, 256, (2, 32))
    track_max_logits(model)
    model(idx)
    before = [a.max_logits.clone() for a in attention_modules(model)]
    tau = float(before[0].min()) * 0.5
    assert qk_clip(model, tau) == int(sum((b > tau).sum() for b in before))
    model(idx)  # layer 0 sees the same input again (later layers' inputs changed with it)
    first = attention_modules(model)[0]
    expected = torch.where(before[0] > tau, torch.full_like(before[0], tau), before[0])
    assert (before[0] > tau).any() and torch.allclose(first.max_logits, expected, rtol=1e-4)


@pytest.mark.parametrize("device,calls", [("cpu", [(600, 640)] * 3), ("meta", [(3, 600, 640)])])
def test_big_matrices_go_one_by_one_on_a_cpu_and_as_one_stack_elsewhere(device, calls, monkeypatch):
    """Above the batching size a CPU's matmuls are busy with one matrix; a GPU's are not, and each
    matrix would cost its own kernel launches per iteration. (The meta device stands in for a GPU.)"""
    import optim.muon as muon_module

    seen = []
    monkeypatch.setattr(muon_module, "orthogonalize", lambda g, *a, **k: seen.append(tuple(g.shape)) or g)
    opt = Muon([torch.nn.Parameter(torch.zeros(600, 640))])
    stack = torch.zeros(3, 600, 640, device=device)  # 3 matrices above BATCH_MAX_ELEMENTS
    out = opt._orthogonalize_all([stack], opt.param_groups[0])
    assert seen == calls and out[0].shape == stack.shape
