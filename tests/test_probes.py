"""Stability probes: Amax Gain against hand computation, identity for the plain residual, no
effect on training, spike counting, state across resume."""

import pytest
import torch

from tests.conftest import V4_RUN, interrupted_run, metrics_rows, without_measured
from train.probes import SpikeDetector, amax_gains, spectral_norm
from train.trainer import Trainer


# Mixing matrices (X ← H·X, output × input) of the four sublayers of a 2-layer model, in depth
# order: layer 0 attention, layer 0 FFN, layer 1 attention, layer 1 FFN. Worked by hand:
# H2·H1 = [[1, 2], [3, 7]]; H3·H2·H1 = [[2, 4], [3, 7]]; H4·H3·H2·H1 = [[5, 11], [3, 7]], whose rows
# sum to 16 and 10 (forward gain 16) and columns to 8 and 18 (backward gain 18). The other order,
# H1·H2·H3·H4 = [[14, 16], [6, 7]], would give 30 and 23; the transposes, 18 and 16.
DEPTH = [[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [3.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]]
DEPTH_FWD, DEPTH_BWD = [3.0, 10.0, 10.0, 16.0], [3.0, 9.0, 11.0, 18.0]  # composites up to each depth


def test_amax_of_known_matrices_matches_hand_computation():
    g = amax_gains([torch.tensor(h) for h in DEPTH])
    assert g["per_fwd"] == [3.0, 4.0, 2.0, 2.0] and g["per_bwd"] == [3.0, 4.0, 2.0, 2.0]
    assert g["depth_fwd"] == DEPTH_FWD and g["depth_bwd"] == DEPTH_BWD
    assert g["fwd"] == 16.0 and g["bwd"] == 18.0
    # absolute values: composite [[0.5, 1], [1, -1]] of a negative entry
    g = amax_gains([torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.0], [1.0, -3.0]])])
    assert g["per_fwd"] == [3.0, 4.0] and g["per_bwd"] == [3.0, 3.0] and g["fwd"] == 2.0 and g["bwd"] == 2.0
    assert amax_gains([]) == {"fwd": 1.0, "bwd": 1.0, "per_fwd": [], "per_bwd": [], "depth_fwd": [], "depth_bwd": []}


def test_logged_amax_is_the_hand_computed_composite_in_depth_order(tiny_config):
    """An hc model with its gates at 0 mixes by b_res alone: set b_res per sublayer to DEPTH and the
    logged gains must be the hand-computed composite's (layer order and orientation pinned)."""
    cfg = tiny_config("model.residual=hc", "model.n_streams=2", "optim=adamw", "optim.lr=0", "probes.every=1",
                      "trainer.max_steps=1", "trainer.eval_every=0")
    trainer = Trainer(cfg)
    with torch.no_grad():
        for block, (h_attn, h_ffn) in zip(trainer.engine.module.blocks, zip(DEPTH[0::2], DEPTH[1::2])):
            for hc, h in ((block.attn_hc, h_attn), (block.ffn_hc, h_ffn)):
                hc.alpha.zero_()
                hc.b_res.copy_(torch.tensor(h))
    summary = trainer.fit()
    (r,) = metrics_rows(cfg.out_dir)
    assert r["probe/amax_fwd"] == 16.0 and r["probe/amax_bwd"] == 18.0
    assert [r[f"probe/amax_fwd_depth/sublayer{i}"] for i in range(4)] == DEPTH_FWD
    assert [r[f"probe/amax_bwd_depth/sublayer{i}"] for i in range(4)] == DEPTH_BWD
    assert summary["probe/amax_fwd"] == 16.0 and summary["probe/amax_bwd"] == 18.0


def test_spectral_norm_estimate():
    m = torch.diag(torch.tensor([3.0, 1.0, 0.5])) @ torch.linalg.qr(torch.randn(3, 3))[0]
    assert spectral_norm(m, iters=50) == pytest.approx(3.0, rel=1e-4)


def test_spike_detector_counts_a_jump():
    d = SpikeDetector(decay=0.9, threshold=5.0, warmup=10)
    scores = [d.update(2.0 + 0.01 * (i % 3)) for i in range(30)]
    assert max(scores) < 5.0
    assert d.update(5.0) > 5.0


@pytest.mark.parametrize("residual,exact_one", [("residual", True), ("mhc", False)])
def test_gain_is_one_for_residual_and_near_one_for_mhc(residual, exact_one, tiny_config):
    cfg = tiny_config(f"model.residual={residual}", "model.n_streams=4", "probes.every=2", "trainer.max_steps=4")
    summary = Trainer(cfg).fit()
    probed = [r for r in metrics_rows(cfg.out_dir) if "probe/amax_fwd" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for r in probed:
        if exact_one:
            assert r["probe/amax_fwd"] == 1.0 and r["probe/amax_bwd"] == 1.0
        else:  # doubly stochastic and non-negative: every product has unit row and column sums
            assert r["probe/amax_fwd"] == pytest.approx(1.0, abs=1e-4)
            assert r["probe/amax_bwd"] == pytest.approx(1.0, abs=1e-4)
        assert r["probe/max_logit"] > 0 and r["probe/grad_norm_first_last"] > 0
        assert {"probe/update_weight_ratio/matrix", "probe/update_spectral/matrix", "probe/act_rms/layer1"} <= r.keys()
    assert summary["probe/amax_fwd"] == max(r["probe/amax_fwd"] for r in probed)


def test_probes_do_not_perturb_training(tiny_config, tmp_path):
    common = ("model.residual=hc", "model.n_streams=2", "model.dropout=0.1", "trainer.max_steps=6", "optim=muon")
    runs = []
    for every in (0, 2):
        cfg = tiny_config(*common, f"probes.every={every}")
        cfg.out_dir = str(tmp_path / f"p{every}")
        Trainer(cfg).fit()
        runs.append([(r["loss"], r["grad_norm"], r.get("val_loss")) for r in metrics_rows(cfg.out_dir)])
    assert runs[0] == runs[1]


def test_probe_state_survives_resume(tiny_config, tmp_path):
    common = ("model.residual=hc", "model.n_streams=2", "probes.every=2", "trainer.max_steps=8", "trainer.checkpoint_every=4")
    ref = tiny_config(*common)
    ref.out_dir = str(tmp_path / "ref")
    ref_summary = Trainer(ref).fit()
    cfg = tiny_config(*common)
    cfg.out_dir = str(tmp_path / "cut")
    interrupted_run(cfg, after_step=5)
    summary = Trainer(cfg).fit()
    assert without_measured(metrics_rows(cfg.out_dir)) == without_measured(metrics_rows(ref.out_dir))
    assert summary["probe/amax_fwd"] == ref_summary["probe/amax_fwd"]


def test_v4_runs_log_the_max_attention_logit(tiny_config):
    """V4 attention (window, entries and sink; tests/test_v4_reference.py checks the value) reports
    its max logit like dense attention: one key per layer of the trunk (the MTP block, with its own
    hyper-connections, runs in training only and is left out of the probes)."""
    cfg = tiny_config(*V4_RUN, "probes.every=2", "trainer.max_steps=2")
    Trainer(cfg).fit()
    (r,) = [r for r in metrics_rows(cfg.out_dir) if "probe/amax_fwd" in r]
    per_layer = [r[f"probe/max_logit/layer{i}"] for i in range(cfg.model.n_layers)]
    assert f"probe/max_logit/layer{cfg.model.n_layers}" not in r
    assert r["probe/max_logit"] == max(per_layer) > 0
    assert r["probe/amax_fwd"] == pytest.approx(1.0, abs=1e-4)  # 2 sublayers per trunk layer


def test_update_spectral_norm_is_per_matrix_as_muon_sees_it():
    """A stack of experts and a fused q/k/v projection are several matrices to Muon: the probe's
    value is the largest of their spectral norms (brute force: torch's SVD), not the norm of the
    parameter flattened to 2-D (5.8x too large for V4-tiny's experts)."""
    from train.probes import update_spectral_norm

    g = torch.Generator().manual_seed(0)
    experts = torch.nn.Parameter(torch.zeros(8, 64, 32))
    delta = torch.randn(8, 64, 32, generator=g) * torch.linspace(0.5, 2, 8)[:, None, None]
    assert update_spectral_norm(experts, delta) == pytest.approx(
        torch.linalg.matrix_norm(delta.double(), ord=2).max().item(), rel=1e-2)  # 10 power iterations
    qkv = torch.nn.Parameter(torch.zeros(96, 32))
    qkv.row_blocks = 3
    delta = torch.randn(96, 32, generator=g)
    assert update_spectral_norm(qkv, delta) == pytest.approx(
        torch.linalg.matrix_norm(delta.view(3, 32, 32).double(), ord=2).max().item(), rel=1e-2)
    assert update_spectral_norm(qkv, delta) < 0.9 * torch.linalg.matrix_norm(delta.double(), ord=2).item()


def test_the_spike_guard_starts_a_new_history_when_what_is_trained_changes():
    """V4's indexer-only warm-up trains on the indexer's loss (~0.2, norm ~0.05); the whole model's
    first steps after it (~7, ~3) were judged against that history and skipped as spikes."""
    from train.spikes import SpikeGuard

    def run(phases):
        guard = SpikeGuard(sigma=6.0, window=8)
        for i in range(8):
            guard.is_spike(0.18 + 0.001 * (i % 3), 0.05 + 0.001 * (i % 2), phase=phases[0])
        return guard, guard.is_spike(7.4, 3.0, phase=phases[1])
    assert run([True, True])[1]  # the same phase: a jump of this size is a spike
    guard, spike = run([True, False])
    assert not spike and list(guard.losses) == [7.4] and guard.state_dict()["phase"] is False
    restored = SpikeGuard(sigma=6.0, window=8)
    restored.load_state_dict(guard.state_dict())
    assert restored.phase is False and not restored.is_spike(7.3, 2.9, phase=False)


def test_every_probe_value_equals_its_brute_force_computation():
    """A known update δ on the tiny hc model (2 streams, per-head matrices): update and weight RMS,
    update/weight ratio, the spectral norm of δ per matrix as Muon sees it (torch's SVD), and the
    probe pass's per-layer gradient norms, their first/last ratio and per-stream activation RMS,
    each against a direct computation."""
    from model import build_model
    from tests.conftest import compose_config
    from train.probes import StabilityProbes

    torch.manual_seed(0)
    cfg = compose_config(["model=tiny", "model.residual=hc", "model.n_streams=2"]).model
    model = build_model(cfg, 256)
    x = torch.randint(0, 256, (2, 16))
    probes = StabilityProbes(model, (x, torch.roll(x, -1, 1)), every=1, per_head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probes.before_step(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # q/k/v's the largest: the spectral norm's maximum is per head
            p.add_(torch.randn(p.shape, generator=g) * 0.01 * (1 + p.dim()) * (10 if name.endswith("qkv.weight") else 1))
    metrics = {"loss": 1.0, "grad_norm": 1.0}
    probes.after_step(metrics)

    from optim.params import classify_parameters
    for role, items in classify_parameters(model).items():
        if not items:
            continue
        deltas = [p.detach() - before[n] for n, p in items]
        upd, w = sum(d.pow(2).sum() for d in deltas), sum(before[n].pow(2).sum() for n, _ in items)
        count = sum(d.numel() for d in deltas)
        assert metrics[f"probe/update_rms/{role}"] == pytest.approx((upd / count).sqrt().item(), rel=1e-5)
        assert metrics[f"probe/weight_rms/{role}"] == pytest.approx((w / count).sqrt().item(), rel=1e-5)
        assert metrics[f"probe/update_weight_ratio/{role}"] == pytest.approx((upd / w).sqrt().item(), rel=1e-5)
    spectral = []
    for name, p in classify_parameters(model)["matrix"]:
        d = (p.detach() - before[name]).double()
        # q, k, v of each head (optim.per_head) and gate and up: each its own matrix to Muon
        d = d.view(getattr(p, "row_blocks", 1) * getattr(p, "head_blocks", 1), -1, d.size(-1))
        spectral.append(torch.linalg.matrix_norm(d, ord=2).max().item())
    assert metrics["probe/update_spectral/matrix"] == pytest.approx(max(spectral), rel=3e-2)  # 10 power iterations

    model.eval()
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for b in model.blocks]
    loss = model(probes.x, probes.y)
    for h in hooks:
        h.remove()
    loss.backward()
    norms = [torch.sqrt(sum(p.grad.pow(2).sum() for p in b.parameters() if p.grad is not None)).item()
             for b in model.blocks]
    for i, norm in enumerate(norms):
        assert metrics[f"probe/grad_norm/layer{i}"] == pytest.approx(norm, rel=1e-5)
    assert metrics["probe/grad_norm_first_last"] == pytest.approx(norms[0] / norms[-1], rel=1e-5)
    for i, out in enumerate(outputs):  # [B, T, streams, C]
        assert sum(k.startswith(f"probe/act_rms/layer{i}/stream") for k in metrics) == 2
        for s in range(2):
            assert metrics[f"probe/act_rms/layer{i}/stream{s}"] == pytest.approx(out[:, :, s].pow(2).mean().sqrt().item(), rel=1e-5)


def test_spike_detector_is_an_ema_of_mean_and_variance():
    """Scores start at the `warmup`-th value (the first one judged), against an exponentially
    weighted mean and variance that forget: after a noisy phase and a long quiet one, the variance
    has decayed as decay^steps, so a moderate jump is a spike again."""
    d = SpikeDetector(decay=0.9, threshold=5.0, warmup=3)
    scores = [d.update(v) for v in (1.0, 2.0, 1.0)]
    assert scores == [0.0, 0.0, 0.0]
    mean, var = 1.0, 0.0
    for v in (1.0, 2.0, 1.0):  # Welford-style exponentially weighted moments, α = 0.1
        delta = v - mean
        mean, var = mean + 0.1 * delta, 0.9 * (var + 0.1 * delta ** 2)
    assert d.update(4.0) == pytest.approx((4.0 - mean) / var ** 0.5)
    noisy = SpikeDetector(decay=0.9, threshold=5.0, warmup=3)
    for i in range(40):
        noisy.update(1.0 + (i % 2))
    loud = noisy.var
    for _ in range(60):
        noisy.update(noisy.mean)
    assert noisy.var == pytest.approx(loud * 0.9 ** 60, rel=1e-6)


def test_a_grad_norm_jump_alone_is_counted_and_the_count_survives_a_restore():
    from model import build_model
    from tests.conftest import compose_config
    from train.probes import StabilityProbes

    model = build_model(compose_config(["model=tiny"]).model, 256)
    x = torch.randint(0, 256, (1, 8))
    probes = StabilityProbes(model, (x, x), every=0)
    for i in range(30):
        probes.after_step({"loss": 2.0 + 0.01 * (i % 3), "grad_norm": 1.0 + 0.01 * (i % 2)})
    metrics = {"loss": 2.0, "grad_norm": 30.0}
    probes.after_step(metrics)
    assert metrics["probe/spikes"] == 1 and metrics["probe/grad_norm_z"] > 5 > metrics["probe/loss_z"]
    restored = StabilityProbes(model, (x, x), every=0)
    restored.load_state_dict(probes.state_dict())
    after = {"loss": 2.0, "grad_norm": 1.0}
    restored.after_step(after)
    assert after["probe/spikes"] == 1


def test_the_spike_guard_judges_rises_only_with_the_sample_deviation_of_its_window():
    """A spike is a loss or gradient norm more than σ sample standard deviations (statistics.stdev)
    above the window's mean: a drop is none, a gradient-norm jump alone is one, a value between
    σ·pstdev and σ·stdev is none; a non-finite step (the non-finite policy's, judged first) stays
    out of the history, which judges the next steps as before."""
    import math
    import statistics

    from train.spikes import SpikeGuard

    losses, norms = [5.0, 5.1, 4.9, 5.0], [1.0, 1.1, 0.9, 1.0]

    def warmed():
        guard = SpikeGuard(sigma=3.0, window=8)
        for loss, norm in zip(losses, norms):
            assert not guard.is_spike(loss, norm)
        return guard
    assert not warmed().is_spike(3.0, 1.0)  # a drop
    assert warmed().is_spike(5.0, 30.0)  # the gradient norm alone
    mean, sample, population = statistics.fmean(losses), statistics.stdev(losses), statistics.pstdev(losses)
    assert not warmed().is_spike(mean + 3.0 * (sample + population) / 2, 1.0)
    assert warmed().is_spike(mean + 3.0 * sample * 1.01, 1.0)
    guard = warmed()
    guard.is_spike(math.nan, 1.0)
    guard.is_spike(5.0, math.inf)
    assert list(guard.losses) == losses and list(guard.grad_norms) == norms
    assert guard.is_spike(50.0, 1.0)

