"""Hyper-connections: reduction to the plain residual, doubly stochastic mixing, exact gradients,
the probe hook, parameter routing, and training with both optimizers."""
import json
from pathlib import Path

import pytest
import torch

from model import build_model
from model.mhc import HyperConnection
from model.sinkhorn import sinkhorn, sinkhorn_reference
from optim import build_optimizer
from tests.conftest import compose_config
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


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_one_stream_is_exactly_the_plain_residual_model(residual):
    plain, one = model_for(), model_for(f"model.residual={residual}", "model.n_streams=1")
    assert plain.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), one.state_dict().values()))
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(plain(idx), one(idx))


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


def test_sinkhorn_backward_matches_autograd_through_the_loop():
    torch.manual_seed(0)
    z = torch.randn(64, 4, 4, requires_grad=True)
    g = torch.randn(64, 4, 4)
    fast = torch.autograd.grad((sinkhorn(z) * g).sum(), z)[0]
    slow = torch.autograd.grad((sinkhorn_reference(z) * g).sum(), z)[0]
    assert torch.allclose(sinkhorn(z), sinkhorn_reference(z)) and torch.allclose(fast, slow, atol=1e-6)
    z64 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 20), (z64,))


def test_sinkhorn_runs_in_fp32_under_bf16():
    out = sinkhorn(torch.randn(8, 4, 4).bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_block_gradcheck_float64(kind):
    torch.manual_seed(0)
    hc = HyperConnection(kind, n=3, d_model=4, index=1, sinkhorn_iters=5).double()
    with torch.no_grad():
        hc.alpha.fill_(0.5)  # make the dynamic path matter
    lin = torch.nn.Linear(4, 4).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hc(t, lambda h: torch.tanh(lin(h))), (x,))


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
    losses = [json.loads(line)["loss"] for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_activation_checkpointing_gives_the_same_gradients():
    a = model_for("model.residual=mhc", "model.n_streams=2")
    b = model_for("model.residual=mhc", "model.n_streams=2", "model.activation_checkpointing=true")
    idx, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    a(idx, y).backward()
    b(idx, y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name
