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
    # an embedding, not a head: no weight decay unless embeddings decay
    assert [n for n, _ in classify_parameters(model)["embedding"]] == ["embed.weight"]
    assert not classify_parameters(model)["head"]
    for decay, expected in ((False, 0.0), (True, 0.05)):
        cfg = compose_config(["model=tiny", "model.tie_embeddings=true", f"optim.decay_embeddings={decay}",
                              "optim.weight_decay=0.05"])
        model = build_model(cfg.model, 256)
        group, = [g for g in build_optimizer(model, cfg.optim).param_groups
                  if any(p is model.embed.weight for p in g["params"])]
        assert group["weight_decay"] == expected


def test_every_muon_setting_reaches_the_optimizer():
    """Each optim.* key of the Muon recipe is in the groups Muon steps with (a key dropped on the
    way leaves Muon's own default: V4's classical momentum would be EMA, γ 0.18 would be 0.2); every
    value chosen unlike Muon's default, so a dropped key shows."""
    import inspect

    from optim.muon import Muon

    settings = {"lr": 0.02, "weight_decay": 0.07, "momentum": 0.9, "nesterov": False, "ns_steps": 4,
                "adjust_lr_fn": "original", "ns_schedule": "polar_express", "ns_method": "gram",
                "ns_restarts": [2], "ns_dtype": "fp32", "momentum_type": "classical", "rms_target": 0.17,
                "per_head": True, "betas": [0.8, 0.9], "eps": 1e-20, "adamw_lr": 0.004, "adamw_weight_decay": 0.01}
    cfg = compose_config(["model=tiny", "optim=muon", *(f"optim.{k}={v}" for k, v in settings.items())])
    groups = {g["name"]: g for g in build_optimizer(build_model(cfg.model, 256), cfg.optim).param_groups}
    defaults = {k: p.default for k, p in inspect.signature(Muon.__init__).parameters.items()}
    as_muon = {"betas": "adamw_betas", "eps": "adamw_eps"}
    for key, value in settings.items():
        if key.startswith("adamw_"):
            continue
        name = as_muon.get(key, key)
        assert defaults[name] != (tuple(value) if isinstance(value, list) else value), key
        got = groups["muon"][name]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert groups["adamw_decay"]["lr"] == groups["adamw_no_decay"]["lr"] == 0.004
    assert groups["adamw_decay"]["weight_decay"] == 0.01 and groups["adamw_no_decay"]["weight_decay"] == 0.0


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


def test_wsd_decay_starts_after_the_warmup_and_rounds_its_length():
    """The decay span is round(decay_fraction · max_steps) steps, never starting inside the warm-up."""
    assert [sched(s, schedule="wsd", decay_fraction=0.95) for s in (9, 10, 11)] == pytest.approx([1.0, 1.0, 0.9 * 88 / 89 + 0.1])
    # 0.2 · 99 = 19.8: 20 steps of decay, from step 79 (int() would make it 19, from step 80)
    assert sched(78, schedule="wsd", max_steps=99) == 1.0
    assert sched(80, schedule="wsd", max_steps=99) == pytest.approx(1 - 0.9 * 1 / 19)


def test_a_frozen_group_runs_the_whole_schedule_over_the_steps_left():
    """0 while frozen, then warm-up and decay as a run of max_steps - frozen_until steps."""
    from optim.schedule import frozen_then

    args = dict(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1, decay_fraction=0.2)
    values = [frozen_then(s, frozen_until=20, max_steps=50, **args) for s in range(50)]
    assert values[:20] == [0.0] * 20
    assert values[20:] == [lr_multiplier(k, max_steps=30, **args) for k in range(30)]
    assert values[20] == pytest.approx(0.25) and values[23] == 1.0 and values[49] == pytest.approx(0.1)


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
