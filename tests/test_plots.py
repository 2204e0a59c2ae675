"""What the report's and the study's figures draw, read back from the matplotlib calls (the real
calls run; the mocks record them): the data of each line, marker and error bar, on run
directories written by hand (tests/fake_runs.py). No training."""
import math
import statistics
from unittest import mock

import matplotlib.axes
import pytest

from tests.fake_runs import arm_config, curve_rows, write_run
from train import report
from train.report import load_runs
from train.stats import t_quantile
from train.study_compare import study_section

Axes = matplotlib.axes.Axes


def recorded(*methods):
    """Axes methods patched to record their calls and still draw."""
    return [mock.patch.object(Axes, m, autospec=True, side_effect=getattr(Axes, m)) for m in methods]


def calls(patched, title: str, fmt: str | None = None) -> list:
    """The recorded calls on the axes whose title starts with `title` (with format `fmt`)."""
    return [c for c in patched.call_args_list if c.args[0].get_title().startswith(title)
            and (fmt is None or c.args[3:4] == (fmt,) or c.kwargs.get("fmt") == fmt)]


def test_study_figures_draw_steps_t_intervals_and_the_forward_peak(tmp_path):
    """The stage-2 figures show the numbers the claims rest on: each seed's steps to the target (not
    its tokens), the final loss's 95 % t interval as the error bar (not ± std), and the depth
    panel's line through each arm's largest forward Amax gain (not the backward one)."""
    gain = {"residual": 3.0, "mhc": 1.5}
    for res, finals in (("residual", [2.0, 2.1, 2.2]), ("mhc", [1.9, 2.0, 2.0])):
        for layers in (4, 8):
            for seed, final in enumerate(finals):
                cfg = arm_config("muon", seed, {"residual": res, "n_layers": layers}, lr=1e-2, lr_keys=())
                probes = {"probe/amax_fwd": gain[res] * layers + seed, "probe/amax_bwd": 100.0}
                # target 2.1 (the plain residual's mean): reached at steps 20, 17.5, 16 by seeds 0, 1, 2
                vals = [3.0, 2.1 - 0.3 * seed, 2.05, final]
                write_run(tmp_path / f"{res}{layers}-{seed}", cfg, curve_rows(vals, probes=probes),
                          {"status": "completed", "final_val_loss": final})
    plot, errorbar = recorded("plot", "errorbar")
    with plot as lines, errorbar as bars:
        study_section(load_runs([tmp_path]), tmp_path)
    seeds = calls(lines, "Steps to reach", "o")
    assert len(seeds) == 4 and all(c.args[1] == pytest.approx([20.0, 17.5, 16.0]) for c in seeds)
    half = {res: t_quantile(0.975, 2) * statistics.stdev(f) / math.sqrt(3)
            for res, f in (("residual", [2.0, 2.1, 2.2]), ("mhc", [1.9, 2.0, 2.0]))}
    errs = [x for c in calls(bars, "Final validation loss") for side in c.kwargs["xerr"] for x in side]
    assert errs == pytest.approx([half["mhc"]] * 4 + [half["residual"]] * 4)  # arms mhc 4, 8, residual 4, 8; both sides
    peaks = [(c.args[1], c.args[2]) for c in calls(lines, "Max composite Amax gain", "-")]
    assert peaks == [([4, 8], [1.5 * 4 + 2, 1.5 * 8 + 2]), ([4, 8], [3.0 * 4 + 2, 3.0 * 8 + 2])]  # mhc, residual


def test_report_figures_dash_a_diverged_run_and_show_the_last_depth_probe(tmp_path):
    """A diverged run's curve is dashed (a completed one solid); the gain-vs-depth figure draws
    each run's last probe (its title says so), not its first."""
    def depth(step):
        return {f"probe/amax_fwd_depth/sublayer{i}": (1 + i) * step for i in range(3)}
    write_run(tmp_path / "a", {"optim": {"name": "adamw"}, "seed": 0}, curve_rows([2.0, 1.9], every=2, probes=depth),
              {"status": "completed", "final_val_loss": 1.9})
    write_run(tmp_path / "b", {"optim": {"name": "muon"}, "seed": 0}, curve_rows([2.2, 2.5], every=2),
              {"status": "diverged", "final_val_loss": 2.5})
    runs = load_runs([tmp_path])
    (plot,) = recorded("plot")
    with plot as lines:
        report.plot(runs, tmp_path, "val_loss", "Validation loss", "loss")
        report.plot_depth(runs, tmp_path)
    assert [(c.args[2], c.args[3]) for c in calls(lines, "Validation loss")] == [([2.0, 1.9], "-"), ([2.2, 2.5], "--")]
    assert [(c.args[1], c.args[2]) for c in calls(lines, "Composite Amax gain")] == [([1, 2, 3], [4, 8, 12])]
