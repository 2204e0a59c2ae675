"""Hyper-connections: reduction to the plain residual, doubly stochastic mixing, exact gradients,
the probe hook, parameter routing, and training with both optimizers."""

import pytest
import torch

from model import build_model
from model.block import Block
from model.mhc import HyperConnection, StreamReduce
from model.sinkhorn import sinkhorn
from tests.reference import hyper_connections as zhu
from tests.reference import sinkhorn as reference
from optim import build_optimizer
from tests.conftest import compose_config, metrics_rows
from train.trainer import Trainer
from train.validate import validate


def model_for(*overrides, seed=0):
    cfg = compose_config(["model=tiny", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg.model, 256)


@pytest.mark.parametrize("residual", ["residual", "hc", "mhc"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_configs_compose_for_every_stream_count(residual, n, tmp_path):
    validate(compose_config([f"model.residual={residual}", f"model.n_streams={n}"], out_dir=tmp_path))


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_one_stream_block_computes_the_plain_residual_block(kind):
    """One stream has nothing to mix, which is why transformer.py builds the plain model for n = 1.
    Built explicitly, the one-stream block must compute the plain block: hc at its initialisation
    exactly (its dynamic projection starts at zero), mhc with its gates at 0 up to V4's hc_eps
    (pre = 1/2 + hc_eps, which the sublayer's RMSNorm scales away, post = 1, res = 1 − O(hc_eps))."""
    plain = model_for()
    x = torch.randn(2, 16, 32)  # unit scale: RMSNorm's eps then barely sees mhc's halved read
    with torch.no_grad():
        for i, block in enumerate(plain.blocks):
            one = Block(32, block.attn, block.ffn, 1e-6, 0.0, kind, 1, i)
            one.load_state_dict(block.state_dict(), strict=False)  # the norms; attn and ffn are shared
            if kind == "mhc":
                one.attn_hc.alpha.zero_(), one.ffn_hc.alpha.zero_()
            want = block(x, plain.rope_cos, plain.rope_sin)
            got = one(x.unsqueeze(-2), plain.rope_cos, plain.rope_sin).squeeze(-2)
            if kind == "hc":
                assert torch.equal(got, want)
            else:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and not torch.equal(got, want)
            x = want


@pytest.mark.parametrize("fused", [False, True])
def test_hc_matches_zhu_et_al(fused):
    """hc against the paper's dynamic hyper-connection equations (tests/reference): one gate s_α for
    the read and the mix, s_β for the write, the mix applied as A_rᵀ."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("hc", 3, 5, index=1, eps=1e-5, fused=fused)).double()
    with torch.no_grad():
        hc.alpha.copy_(torch.tensor([0.6, 1.3]))  # s_α, s_β: distinct, so a swapped gate shows
    lin = torch.nn.Linear(5, 5).double()
    x = torch.randn(1, 9, 3, 5, dtype=torch.float64)
    w = hc.proj.weight
    ref = zhu.dynamic_hyper_connection(x[0], w[0], w[1], w[2:].T, hc.alpha[0], hc.alpha[1], hc.b_pre, hc.b_post,
                                       hc.b_res.T, lambda h: torch.tanh(lin(h)), 1e-5)
    assert torch.allclose(hc(x, lambda h: torch.tanh(lin(h)))[0], ref["out"], rtol=0, atol=1e-12)
    pre, post, res = hc.coefficients(x)
    assert torch.allclose(pre[0], ref["A_m"], rtol=0, atol=1e-14) and torch.allclose(post[0], ref["B"], rtol=0, atol=1e-14)
    assert torch.allclose(res[0], ref["A_r"].transpose(-1, -2), rtol=0, atol=1e-14)


def test_hc_initialisation_is_zhu_et_al():
    """Static parts one-hot(sublayer mod n) / 1 / I, gates 0.01, and the dynamic projection zero after
    the model's own initialisation of its linear layers."""
    model = model_for("model.residual=hc", "model.n_streams=4")
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    assert len(hcs) == 4
    for i, hc in enumerate(hcs):
        assert torch.equal(hc.proj.weight, torch.zeros(6, 32)) and torch.equal(hc.alpha, torch.full((2,), 0.01))
        assert torch.equal(hc.b_pre, torch.eye(4)[i % 4]) and torch.equal(hc.b_post, torch.ones(4))
        assert torch.equal(hc.b_res, torch.eye(4))


def test_mhc_initialisation_is_v4s():
    """Every gate α (each sublayer's three, the head's reduction's, the MTP block's) 0.01, every
    static bias 0 (pre = sigmoid(0) + hc_eps, post = 2·sigmoid(0) = 1, res = Sinkhorn of zeros = J/n),
    φ normal(init_std) from the model's own initialisation."""
    torch.manual_seed(0)
    model = build_model(compose_config(["model=v4_tiny", "model.init_std=0.05"]).model, 256)
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    reduces = [m for m in model.modules() if isinstance(m, StreamReduce)]
    assert len(hcs) == 2 * (4 + 1) and len(reduces) == 2  # trunk and MTP block; the head's and MTP's reductions
    for m in hcs + reduces:
        assert torch.equal(m.alpha, torch.full_like(m.alpha, 0.01)) and m.alpha.numel() == (3 if m in hcs else 1)
        biases = (m.b_pre, m.b_post, m.b_res) if m in hcs else (m.bias,)
        assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
        assert m.phi.weight.std().item() == pytest.approx(0.05, rel=0.1)


def copy_shared(src, dst):
    """Give the hyper-connection model the plain model's sublayer, embedding and head weights."""
    dst.load_state_dict({k: v for k, v in src.state_dict().items()}, strict=False)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_at_init_with_identical_streams_equals_plain_pre_norm(residual):
    plain, hyper = model_for(), model_for(f"model.residual={residual}", "model.n_streams=4", seed=1)
    copy_shared(plain, hyper)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected, initial = plain(idx), hyper(idx)
        assert (initial - expected).abs().max() < 0.05  # α = 0.01: the dynamic terms are small
        for m in hyper.modules():
            if isinstance(m, HyperConnection):
                m.alpha.zero_()
        if residual == "mhc":
            hyper.reduce.alpha.zero_()
        # Without them, the same function up to RMSNorm's eps, which sees the stream sum (hc: 4x,
        # mhc: 2x) instead of x.
        assert torch.allclose(hyper(idx), expected, rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [0.0, 0.3, 0.5])
def test_mixing_matrices_are_doubly_stochastic(scale):
    model = model_for("model.residual=mhc", "model.n_streams=4")
    torch.manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HyperConnection):
                m.b_res.normal_(0, scale)
                m.record = True
    x = model.embed(torch.randint(0, 256, (2, 16))).unsqueeze(-2).expand(2, 16, 4, 32)
    for block in model.blocks:
        for hc in (block.attn_hc, block.ffn_hc):
            res = hc.coefficients(x + 0.1 * torch.randn_like(x))[2]
            assert res.dtype == torch.float32 and (res >= 0).all()
            assert (res.sum(-1) - 1).abs().max() < 1e-5 and (res.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("case", range(len(reference.HAND_CASES)))
def test_sinkhorn_hand_computed(case):
    """V4's order (softmax + eps, a column normalisation, then rows and columns) on cases worked by hand."""
    z, iters, eps, expected = reference.hand_case(case)
    assert torch.allclose(sinkhorn(z, iters, eps), expected, rtol=0, atol=1e-15)
    assert torch.allclose(reference.sinkhorn(z, iters, eps), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n,iters", [(2, 1), (3, 2), (4, 20), (4, 3)])
def test_sinkhorn_matches_the_reference_elementwise(n, iters):
    z = torch.randn(6, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + iters)) * 2
    expected = torch.stack([reference.sinkhorn(m, iters, 1e-6) for m in z])
    assert torch.allclose(sinkhorn(z, iters), expected, rtol=0, atol=1e-14)
    assert torch.allclose(sinkhorn(z.float(), iters), expected.float(), rtol=0, atol=1e-6)


def test_sinkhorn_backward_matches_autograd_through_the_reference():
    z = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = torch.autograd.grad((sinkhorn(z, 20) * g).sum(), z)[0]
    slow = torch.autograd.grad(sum((reference.sinkhorn(m, 20, 1e-6) * gm).sum() for m, gm in zip(z, g)), z)[0]
    assert torch.allclose(fast, slow, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 5), (z[:1].detach().requires_grad_(),))


def test_sinkhorn_runs_in_fp32_under_bf16():
    out = sinkhorn(torch.randn(8, 4, 4).bfloat16())
    assert out.dtype == torch.float32


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large gates and random biases, so the dynamic coefficients and Sinkhorn matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        module.alpha.copy_(torch.linspace(0.6, 1.2, module.alpha.numel()))
    return module


@pytest.mark.parametrize("fused", [False, True])
def test_mhc_sublayer_matches_the_reference(fused):
    """Coefficients, read, write and mix against the per-token float64 reference (fused: where the
    kernels build; the eager path otherwise)."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection("mhc", 3, 5, index=0, sinkhorn_iters=7, eps=1e-5, hc_eps=1e-3)).double()
    hc.fused = fused
    lin = torch.nn.Linear(5, 5).double()
    x = torch.randn(1, 11, 3, 5, dtype=torch.float64)
    hc.record = True
    out = hc(x, lambda h: torch.tanh(lin(h)))
    ref = reference.mhc_sublayer(x[0], hc.phi.weight, hc.alpha, hc.b_pre, hc.b_post, hc.b_res,
                                 lambda h: torch.tanh(lin(h)), 7, 1e-5, 1e-3)
    assert torch.allclose(out[0], ref["out"], rtol=0, atol=1e-12)
    pre, post, res = hc.coefficients(x)
    assert torch.allclose(pre[0], ref["pre"], rtol=0, atol=1e-14) and torch.allclose(post[0], ref["post"], rtol=0, atol=1e-14)
    assert torch.allclose(res[0], ref["comb"].transpose(-1, -2), rtol=0, atol=1e-14)  # res: output × input
    assert torch.allclose(hc.recorded["res"], ref["comb"].transpose(-1, -2).mean(0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("fused", [False, True])
def test_stream_reduce_matches_the_reference(fused):
    torch.manual_seed(0)
    reduce = perturbed(StreamReduce("mhc", 3, 5, eps=1e-5, hc_eps=1e-3, fused=fused)).double()
    x = torch.randn(1, 11, 3, 5, dtype=torch.float64)
    ref = reference.stream_reduce(x[0], reduce.phi.weight, reduce.alpha, reduce.bias, 1e-5, 1e-3)
    assert torch.allclose(reduce(x)[0], ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("fused", [False, True])
def test_mhc_matches_transformers_deepseek_v4(fused):
    """The referee no one here wrote: transformers' DeepseekV4HyperConnection and DeepseekV4HyperHead
    with our weights copied as they are (φ → fn, biases → base, α → scale), in float32 (it computes
    the RMS in float32 whatever the input)."""
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    n, c = 4, 16
    cfg = DeepseekV4Config(hidden_size=c, hc_mult=n, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hc, reduce = perturbed(HyperConnection("mhc", n, c, index=0)), perturbed(StreamReduce("mhc", n, c), seed=1)
    hc.fused = reduce.fused = fused
    theirs, head = DeepseekV4HyperConnection(cfg), DeepseekV4HyperHead(cfg)
    with torch.no_grad():
        theirs.fn.copy_(hc.phi.weight), theirs.scale.copy_(hc.alpha)
        theirs.base.copy_(torch.cat([hc.b_pre, hc.b_post, hc.b_res.flatten()]))
        head.hc_fn.copy_(reduce.phi.weight), head.hc_scale.copy_(reduce.alpha), head.hc_base.copy_(reduce.bias)
    x, y = torch.randn(2, 7, n, c), torch.randn(2, 7, c)
    post, comb, collapsed = theirs(x)
    read = []
    out = hc(x, lambda h: read.append(h) or y)
    mixed = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)  # their decoder layer
    assert torch.allclose(read[0], collapsed, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, mixed, rtol=1e-5, atol=1e-6)
    assert torch.allclose(reduce(x), head(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_eager_block_gradcheck_float64(kind):
    """The path a GPU takes (model.fused_hc=false), checked without a compiler: x and every parameter."""
    torch.manual_seed(0)
    hc = perturbed(HyperConnection(kind, n=3, d_model=2, index=1, sinkhorn_iters=3, fused=False)).double()
    lin = torch.nn.Linear(2, 2).double()
    names = [name for name, _ in hc.named_parameters()]
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_() for p in hc.parameters()]

    def f(x, *values):
        return torch.func.functional_call(hc, dict(zip(names, values)), (x, lambda h: torch.tanh(lin(h))))

    assert torch.autograd.gradcheck(f, (x, *values))
    reduce = perturbed(StreamReduce("mhc", 3, 2, fused=False)).double()
    names = [name for name, _ in reduce.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in reduce.parameters()]
    assert torch.autograd.gradcheck(lambda x, *v: torch.func.functional_call(reduce, dict(zip(names, v)), (x,)),
                                    (x, *values))


def test_probe_hook_is_off_by_default_and_token_averaged_when_on():
    model = model_for("model.residual=mhc", "model.n_streams=4")
    idx = torch.randint(0, 256, (2, 16))
    model(idx)
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    assert all(not m.recorded for m in hcs)
    for m in hcs:
        m.record = True
    model(idx)
    assert all(m.recorded["res"].shape == (4, 4) and m.recorded["pre"].shape == (4,) for m in hcs)
    assert torch.allclose(hcs[0].recorded["res"].sum(0), torch.ones(4), atol=1e-5)


def test_routing_of_hyper_connection_parameters():
    cfg = compose_config(["model=tiny", "model.residual=mhc", "model.n_streams=4", "optim=muon"])
    model = build_model(cfg.model, 256)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in build_optimizer(model, cfg.optim).param_groups}
    hc = model.blocks[0].attn_hc
    assert id(hc.phi.weight) in groups["muon"]
    assert {id(hc.b_res), id(hc.b_pre), id(hc.alpha)} <= groups["adamw_no_decay"]


@pytest.mark.parametrize("residual", ["hc", "mhc"])
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_hyper_connections_train(residual, optim, tiny_config):
    cfg = tiny_config(f"model.residual={residual}", "model.n_streams=4", f"optim={optim}", "optim.lr=1e-2",
                      "trainer.max_steps=30", "trainer.eval_every=0", "trainer.checkpoint_every=0")
    Trainer(cfg).fit()
    losses = [r["loss"] for r in metrics_rows(cfg.out_dir)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_activation_checkpointing_gives_the_same_gradients():
    a = model_for("model.residual=mhc", "model.n_streams=2")
    b = model_for("model.residual=mhc", "model.n_streams=2", "model.activation_checkpointing=true")
    idx, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    a(idx, y).backward()
    b(idx, y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name
