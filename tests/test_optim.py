"""Parameter roles, AdamW groups and learning-rate schedules."""
import math

import pytest

from model import build_model
from optim import build_optimizer, lr_multiplier
from optim.params import classify_parameters
from tests.conftest import compose_config


def test_parameter_roles_come_from_module_types():
    cfg = compose_config(["model=tiny"])
    model = build_model(cfg.model, 256)
    roles = {r: [n for n, _ in ps] for r, ps in classify_parameters(model).items()}
    assert roles["embedding"] == ["embed.weight"] and roles["head"] == ["head.weight"]
    assert set(roles["norm"]) == {"norm.weight"} | {f"blocks.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")}
    assert len(roles["matrix"]) == 2 * 4 and all(n.startswith("blocks.") for n in roles["matrix"])
    assert sum(len(v) for v in roles.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_adamw_groups_decay_matrices_and_head_only(decay_embeddings):
    cfg = compose_config(["model=tiny", f"optim.decay_embeddings={decay_embeddings}", "optim.weight_decay=0.05"])
    model = build_model(cfg.model, 256)
    opt = build_optimizer(model, cfg.optim)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decayed and id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.norm.weight) not in decayed
    assert (id(model.embed.weight) in decayed) == decay_embeddings
    assert all(g["weight_decay"] in (0.0, 0.05) for g in opt.param_groups)


def test_tied_embeddings_are_one_parameter_in_one_group():
    cfg = compose_config(["model=tiny", "model.tie_embeddings=true"])
    model = build_model(cfg.model, 256)
    opt = build_optimizer(model, cfg.optim)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def sched(step, **kw):
    args = dict(max_steps=100, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2) | kw
    return lr_multiplier(step, **args)


def test_warmup_is_linear_to_peak():
    assert [sched(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_decays_to_min_ratio_at_last_step():
    assert sched(10) == pytest.approx(1.0)
    assert sched(99) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert sched(mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [sched(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_linear_decay():
    assert sched(50, schedule="wsd") == 1.0 and sched(79, schedule="wsd") == 1.0
    assert sched(80, schedule="wsd") == pytest.approx(1.0)
    assert sched(99, schedule="wsd") == pytest.approx(0.1)


def test_constant_schedule():
    assert sched(50, schedule="constant") == sched(99, schedule="constant") == 1.0


def test_adamw_eps_is_v4s_in_the_muon_recipe_and_1e8_in_the_baseline():
    """V4's recipe (optim=muon) runs its AdamW half with eps 1e-20; the AdamW baseline keeps the
    common 1e-8. Checked where it takes effect: the optimizer's groups."""
    cfg = compose_config(["model=tiny", "optim=muon"])
    model = build_model(cfg.model, 256)
    adam_groups = [g for g in build_optimizer(model, cfg.optim).param_groups if not g["use_muon"]]
    assert adam_groups and all(g["adamw_eps"] == 1e-20 for g in adam_groups)
    cfg = compose_config(["model=tiny", "optim=adamw"])
    assert all(g["eps"] == 1e-8 for g in build_optimizer(model, cfg.optim).param_groups)


@pytest.mark.parametrize("device,ns_dtype", [("cpu", "bf16"), ("cpu", "fp32"), ("cuda", "bf16")])
def test_bf16_newton_schulz_warns_only_on_a_cpu_without_bf16_units(device, ns_dtype, caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    cfg = compose_config(["model=tiny", "optim=muon", f"optim.ns_dtype={ns_dtype}"])
    # the trainer builds the optimizer before moving the model: the device comes in as an argument
    build_optimizer(build_model(cfg.model, 256), cfg.optim, torch.device(device))
    assert ("Newton-Schulz runs in bf16 on a CPU" in caplog.text) == (device == "cpu" and ns_dtype == "bf16")
