"""Stability probes: Amax Gain against hand computation, identity for the plain residual, no
effect on training, spike counting, state across resume."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import interrupted_run, without_measured
from train.probes import SpikeDetector, amax_gains, spectral_norm
from train.trainer import Trainer


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_amax_of_known_matrices_matches_hand_computation():
    h1 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    h2 = torch.tensor([[0.5, 0.0], [1.0, -3.0]])
    g = amax_gains([h1, h2])
    # composite H2·H1 = [[0.5, 1], [1, -1]]: |rows| sum to 1.5 and 2, |columns| to 1.5 and 2.
    assert g["per_fwd"] == [3.0, 4.0] and g["per_bwd"] == [3.0, 3.0]
    assert g["depth_fwd"] == [3.0, 2.0] and g["depth_bwd"] == [3.0, 2.0]
    assert g["fwd"] == 2.0 and g["bwd"] == 2.0
    assert amax_gains([]) == {"fwd": 1.0, "bwd": 1.0, "per_fwd": [], "per_bwd": [], "depth_fwd": [], "depth_bwd": []}


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
    probed = [r for r in rows(cfg.out_dir) if "probe/amax_fwd" in r]
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
        runs.append([(r["loss"], r["grad_norm"], r.get("val_loss")) for r in rows(cfg.out_dir)])
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
    assert without_measured(rows(cfg.out_dir)) == without_measured(rows(ref.out_dir))
    assert summary["probe/amax_fwd"] == ref_summary["probe/amax_fwd"]
