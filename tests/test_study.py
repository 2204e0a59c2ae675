"""Learning-rate studies: the best-lr fit, the stage-1 → stage-2 hand-over, steps to target with
intervals over seeds, and a 2×2×2 study end to end through launch.py."""
import json
import math
import statistics
from pathlib import Path

import pytest

from common.errors import ConfigError
from tests.conftest import compose_config, launch
from tests.fake_runs import arm_config, curve_rows, table, write_run
from train.report import load_runs, write_report
from train.stats import mean_interval, t_quantile
from train.study import apply_study, fit_best_lr, lr_section
from train.study_compare import study_arms, study_section, time_to_reach
from train.validate import validate

GRID = [1e-2 * 10 ** (0.5 * k) for k in range(-3, 4)]


def quadratic(lrs, best, curvature=0.3, floor=2.0):
    return [floor + curvature * (math.log10(lr) - math.log10(best)) ** 2 for lr in lrs]


# -- the fit ---------------------------------------------------------------------------------------
def test_parabola_finds_the_minimum_of_a_known_quadratic():
    fit = fit_best_lr(GRID, quadratic(GRID, best=2.2e-3))
    assert fit.method == "parabola" and fit.edge is None and fit.index == 2  # 3.16e-3 is the nearest grid point
    assert fit.best_lr == pytest.approx(2.2e-3, rel=1e-5) and fit.best_loss == pytest.approx(2.0, abs=1e-9)


def test_parabola_uses_only_the_minimum_and_its_neighbours():
    losses = quadratic(GRID, best=2.2e-3)
    losses[0], losses[-1], losses[-2] = 9.0, 7.0, 5.0  # far points off the parabola must not move the vertex
    fit = fit_best_lr(GRID, losses)
    assert fit.best_lr == pytest.approx(2.2e-3, rel=1e-5)


@pytest.mark.parametrize("edge, losses", [("high", [3.0, 2.8, 2.6, 2.5, 2.4, 2.3, 2.2]),
                                          ("low", [2.0, 2.1, 2.3, 2.6, 3.0, 3.5, 4.0])])
def test_minimum_at_the_edge_is_flagged(edge, losses):
    fit = fit_best_lr(GRID, losses)
    assert fit.edge == edge and fit.method == "grid"
    assert fit.best_lr == (GRID[-1] if edge == "high" else GRID[0])


@pytest.mark.parametrize("losses", [[2.5, 2.2, 2.1, None], [2.5, 2.2, 2.0, None]])
def test_diverged_point_bounds_the_minimum(losses):
    # the largest lr diverged: the minimum next to it lies inside the grid, but has no parabola
    # (two finite points do not determine one)
    fit = fit_best_lr(GRID[:4], losses)
    assert fit.edge is None and fit.index == 2 and fit.best_lr == GRID[2] and fit.method == "grid"


def test_nan_and_inf_losses_are_diverged_points():
    """A final loss of NaN or inf is a run that diverged: the same fit as no loss at all."""
    nonfinite = fit_best_lr(GRID[:6], [float("nan"), 2.4, 2.2, 2.1, 2.3, float("inf")])
    assert nonfinite == fit_best_lr(GRID[:6], [None, 2.4, 2.2, 2.1, 2.3, None])
    assert nonfinite.index == 3 and nonfinite.edge is None and nonfinite.method == "parabola"


def test_a_tie_is_fitted_around_the_smaller_lr():
    """Two grid points with the same smallest loss: the fit centres on the first, the smaller lr
    (the safer side), as if the grid ended after its neighbour."""
    fit = fit_best_lr(GRID[:5], [2.5, 2.1, 2.3, 2.1, 2.6])
    assert fit.index == 1 and fit == fit_best_lr(GRID[:3], [2.5, 2.1, 2.3])


def test_t_quantile_matches_tables():
    for df, q in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    scipy = pytest.importorskip("scipy.stats")
    for df in (1.5, 2.7, 7.3):
        assert t_quantile(0.975, df) == pytest.approx(scipy.t.ppf(0.975, df), rel=1e-9)


# scipy.stats.t.ppf(p, df), scipy 1.17.1, for p = 0.025, 0.6, 0.9, 0.995, 0.9995 (both tails, the
# centre, and far tails where the continued fraction's other branch runs)
T_TABLE = {1: [-12.7062047362, 0.3249196962, 3.0776835372, 63.6567411629, 636.6192487688],
           2: [-4.3026527297, 0.2886751346, 1.8856180832, 9.9248432009, 31.5990545764],
           5: [-2.5705818356, 0.2671808657, 1.4758840488, 4.0321429836, 6.8688266259],
           30: [-2.0422724563, 0.255605365, 1.3104150254, 2.7499956536, 3.645958635],
           1000: [-1.9623390808, 0.2534145158, 1.2823987215, 2.5807546981, 3.3002826484]}


def test_t_quantiles_over_both_tails_and_far_ones():
    from train.stats import t_cdf

    for df, row in T_TABLE.items():
        for p, q in zip((0.025, 0.6, 0.9, 0.995, 0.9995), row):
            assert t_quantile(p, df) == pytest.approx(q, rel=1e-8, abs=1e-9)
            assert t_cdf(q, df) == pytest.approx(p, rel=1e-9)


def test_welch_interval_with_unequal_seed_counts():
    """5 seeds against 2: each arm's variance over its own count; against scipy's
    ttest_ind(equal_var=False).confidence_interval() (1.17.1): [-0.249153407742, -0.032846592258]."""
    from train.stats import difference_interval

    d = difference_interval([1.50, 1.62, 1.55, 1.58, 1.47], [1.71, 1.66])
    assert d.mean == pytest.approx(-0.141) and d.n == 2
    assert (d.lo, d.hi) == pytest.approx((-0.249153407742, -0.032846592258), abs=1e-9)


# -- stage 1 → stage 2 -------------------------------------------------------------------------------
def fake_run(path: Path, config: dict, final: float | None, rows=None, status="completed"):
    """A run whose summary.json gives `status` and `final` (as the trainer writes it: a diverged
    run's last validation loss too); status None: no summary, a run still going."""
    rows = rows or [{"step": 1, "loss": 3.0, "tokens": 100, "tokens_per_s": 1000.0, "grad_norm": 1.0},
                    {"step": 2, "loss": 2.9, "tokens": 200, "tokens_per_s": 1000.0, "grad_norm": 1.0, "val_loss": final}]
    write_run(path, config, rows, {"status": status, "final_val_loss": final} if status else None)


BEST = {("adamw", 128): 2.2e-3, ("adamw", 256): 1.3e-3, ("muon", 128): 1.4e-2, ("muon", 256): 9e-3}


def fake_sweep(root: Path, lr_keys=("optim.lr",), edge="high") -> Path:
    """Stage 1 as `experiment=optimizer_study` lays it out, with final losses on known parabolas,
    and a d=512 curve whose minimum lies at the `edge` of its grid."""
    job = 0
    for (opt, width), best in BEST.items():
        centre = 3e-3 if opt == "adamw" else 1e-2
        for step in range(-3, 4):
            factor = 10 ** (0.5 * step)
            lr = centre * factor
            adamw_lr = 3e-3 * factor if "optim.adamw_lr" in lr_keys else 3e-3
            final = quadratic([lr], best)[0]
            cfg = {"optim": {"name": opt, "lr": lr, "adamw_lr": adamw_lr}, "model": {"d_model": width, "n_layers": 4},
                   "seed": 0, "study": {"stage": 1, "lr_step": step, "lr_keys": list(lr_keys)}}
            fake_run(root / str(job), cfg, final)
            job += 1
    # one curve whose minimum is at the edge of its grid
    for step in range(-3, 4):
        cfg = {"optim": {"name": "muon", "lr": 1e-2 * 10 ** (0.5 * step), "adamw_lr": 3e-3},
               "model": {"d_model": 512, "n_layers": 4}, "seed": 0, "study": {"stage": 1, "lr_step": step}}
        fake_run(root / f"edge{step}", cfg, 3.0 + (-0.1 if edge == "high" else 0.1) * step)
    lr_section(load_runs([root]), root, [root])
    return root / "lr_sweep.json"


def stage2_config(sweep: Path, *overrides):
    cfg = compose_config(["experiment=optimizer_study", "study=tuned", f"study.best_lr_from={sweep}", *overrides])
    apply_study(cfg)
    return cfg


def test_stage2_trains_each_curve_at_its_best_lr_from_the_sweep(tmp_path):
    sweep = fake_sweep(tmp_path)
    data = json.loads(sweep.read_text())
    assert len(data["curves"]) == 5 and {c["edge"] for c in data["curves"]} == {None, "high"}
    for (opt, width), best in BEST.items():
        cfg = stage2_config(sweep, f"optim={opt}", f"model.d_model={width}")
        assert cfg.optim.lr == pytest.approx(best, rel=1e-5), (opt, width)
        assert cfg.optim.adamw_lr == 3e-3  # held: the grid moved optim.lr only
    with pytest.raises(ConfigError, match="edge"):
        stage2_config(sweep, "optim=muon", "model.d_model=512")
    assert stage2_config(sweep, "optim=muon", "model.d_model=512", "study.allow_edge_lr=true").optim.lr == \
        pytest.approx(1e-2 * 10 ** 1.5)
    with pytest.raises(ConfigError, match="0 curve"):
        stage2_config(sweep, "optim=muon", "model.d_model=64")


def test_an_lr_tuned_under_other_fixed_settings_is_refused_unless_asked(tmp_path):
    """The best lr depends on the length, width and schedule: stage 1 at 500 steps does not tune
    stage 2 at 300 (it was only logged). study.allow_other_budget=true takes it anyway."""
    sweep = fake_sweep(tmp_path)
    data = json.loads(sweep.read_text())
    data["fixed"]["trainer.max_steps"] = 500
    sweep.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"stage 1 held other values: trainer.max_steps 500 -> 300"):
        stage2_config(sweep, "optim=muon", "model.d_model=128")
    cfg = stage2_config(sweep, "optim=muon", "model.d_model=128", "study.allow_other_budget=true")
    assert cfg.optim.lr == pytest.approx(BEST[("muon", 128)], rel=1e-5)


def test_a_list_valued_fixed_setting_is_compared_as_the_list_it_is(tmp_path):
    """lr_sweep.json holds optim.betas as a list, the run's flattened config as a tuple: stage 1 at
    betas [0.9, 0.99] does not tune a stage 2 at the preset's [0.9, 0.95]; the same betas do."""
    sweep = fake_sweep(tmp_path)
    data = json.loads(sweep.read_text())
    data["fixed"]["optim.betas"] = [0.9, 0.95]
    sweep.write_text(json.dumps(data))
    assert stage2_config(sweep, "optim=muon", "model.d_model=128").optim.lr == pytest.approx(BEST[("muon", 128)], rel=1e-5)
    data["fixed"]["optim.betas"] = [0.9, 0.99]
    sweep.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"stage 1 held other values: optim.betas \[0.9, 0.99\] -> \(0.9, 0.95\)"):
        stage2_config(sweep, "optim=muon", "model.d_model=128")


def test_jointly_swept_keys_keep_their_ratio_at_the_best_lr(tmp_path):
    sweep = fake_sweep(tmp_path, lr_keys=("optim.lr", "optim.adamw_lr"))
    cfg = stage2_config(sweep, "optim=muon", "model.d_model=128")
    assert cfg.optim.lr == pytest.approx(1.4e-2, rel=1e-5)
    assert cfg.optim.adamw_lr == pytest.approx(1.4e-2 * 3e-3 / 1e-2, rel=1e-5)


def test_stage1_scales_the_composed_lr():
    cfg = compose_config(["experiment=lr_sweep", "optim=muon", "study.lr_step=-2"])
    apply_study(cfg)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.adamw_lr == 3e-3
    cfg = compose_config(["experiment=lr_sweep", "study.lr_step=1", "study.lr_keys=[optim.lr,optim.adamw_lr]"])
    apply_study(cfg)
    assert cfg.optim.lr == pytest.approx(3e-3 * 10 ** 0.5) and cfg.optim.adamw_lr == pytest.approx(3e-3 * 10 ** 0.5)
    cfg = compose_config(["experiment=lr_sweep", "optim=muon", "study.lr_step=2", "study.lr_spacing=0.25"])
    apply_study(cfg)
    assert cfg.optim.lr == pytest.approx(1e-2 * 10 ** 0.5)  # two quarter-decade steps, not two half-decade ones


@pytest.mark.parametrize("overrides, key", [
    (["study.lr_step=2"], "study.lr_step"),  # a grid point outside stage 1
    (["study.best_lr_from=x.json"], "study.best_lr_from"),
    (["study=sweep", "study.lr_keys=[optim.betas]"], "study.lr_keys"),
    (["study=sweep", "study.lr_spacing=0"], "study.lr_spacing"),
    (["study=tuned", "study.best_lr_from=/no/such/lr_sweep.json"], "study.best_lr_from"),
])
def test_bad_study_settings_are_refused_by_validation(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid configuration {key}="):
        validate(compose_config(overrides))


def test_stage2_without_a_sweep_is_refused_when_it_starts():
    cfg = compose_config(["study=tuned"])
    validate(cfg)  # the preset composes on its own
    with pytest.raises(ConfigError, match="invalid configuration study.best_lr_from=None"):
        apply_study(cfg)


@pytest.mark.parametrize("edge, lr, steps", [("high", "0.316", "4,5"), ("low", "0.000316", "-4,-5")])
def test_validation_refuses_a_stage2_run_whose_curve_is_at_the_edge(tmp_path, edge, lr, steps):
    """The refusal says which way to extend the grid (its points were lr_step -3..3)."""
    sweep = fake_sweep(tmp_path, edge=edge)
    cfg = compose_config(["experiment=optimizer_study", "study=tuned", f"study.best_lr_from={sweep}", "optim=muon",
                          "model.d_model=512"])
    with pytest.raises(ConfigError, match=rf"{edge} edge of its grid, lr {lr}: extend its grid: .*study.lr_step={steps} "):
        validate(cfg)


def stage1_run(root: Path, width: int, step: int, final: float | None, seed=0, status="completed"):
    cfg = {"optim": {"name": "muon", "lr": 1e-2 * 10 ** (0.5 * step)}, "model": {"d_model": width}, "seed": seed,
           "study": {"stage": 1, "lr_step": step, "lr_keys": ["optim.lr"]}}
    fake_run(root / f"d{width}-{step}-{seed}", cfg, final, status=status)


def test_each_curves_best_lr_in_lr_sweep_json_the_table_and_the_plot(tmp_path):
    """What picks each curve's lr, in lr_sweep.json, the table and the plot: a point's loss is the
    mean over its completed seeds; a diverged point is worse than any (the minimum beside it lies
    inside the grid), a point still running is no point yet (the minimum beside it is at the edge);
    stage-2 runs in the same directory are no grid points; curves come in order of width; the
    fitted lr, not its grid point, is the one reported and starred, and only diverged points are
    drawn as such."""
    from unittest import mock

    import matplotlib.axes

    for step, final in zip(range(-2, 1), (2.5, 2.3, 2.1)):
        stage1_run(tmp_path, 64, step, final)
    stage1_run(tmp_path, 64, 1, 3.5, status="diverged")  # its summary holds its last val loss, as the trainer's
    for step, final in zip(range(-2, 2), (2.5, 2.3, 2.2, 2.1)):
        stage1_run(tmp_path, 128, step, final)
    stage1_run(tmp_path, 128, 2, None, status=None)  # still running
    seeds = [(2.6, 2.6), (2.3, 2.5), (2.2, 2.4), (2.25, 2.25), (2.5, 2.7)]  # seed 0 alone: minimum at 1e-2
    for step, finals in zip(range(-2, 3), seeds):
        for seed, final in enumerate(finals):
            stage1_run(tmp_path, 256, step, final, seed=seed)
    for seed in range(3):  # stage 2 at d=256's best lr, reported together with stage 1
        cfg = {"optim": {"name": "muon", "lr": 0.0205}, "model": {"d_model": 256}, "seed": seed,
               "study": {"stage": 2, "lr_step": 0, "lr_keys": ["optim.lr"]}}
        fake_run(tmp_path / f"stage2-{seed}", cfg, 1.9)
    grid = [1e-2 * 10 ** (0.5 * k) for k in range(-2, 3)]
    with mock.patch.object(matplotlib.axes.Axes, "plot", autospec=True, side_effect=matplotlib.axes.Axes.plot) as lines, \
            mock.patch.object(matplotlib.axes.Axes, "axvline", autospec=True) as dotted:
        text = lr_section(load_runs([tmp_path]), tmp_path, [tmp_path])
    curves = json.loads((tmp_path / "lr_sweep.json").read_text())["curves"]
    assert [c["key"] for c in curves] == [{"optim.name": "muon", "model.d_model": w} for w in (64, 128, 256)]
    diverged, running, seeded = curves
    assert [p["final_val_loss"] for p in diverged["points"]] == [2.5, 2.3, 2.1, None]
    assert (diverged["edge"], diverged["best_lr"], diverged["fit"]) == (None, grid[2], "grid")
    assert [p["status"] for p in running["points"]] == ["completed"] * 4 + ["running"]
    assert (running["edge"], running["best_lr"]) == ("high", grid[3])
    means = [statistics.fmean(f) for f in seeds]
    assert [p["lr"] for p in seeded["points"]] == pytest.approx(grid)
    assert [p["final_val_loss"] for p in seeded["points"]] == pytest.approx(means)
    fit = fit_best_lr(grid, means)
    assert fit.index == 3 and fit.method == "parabola" and seeded["best_lr"] == fit.best_lr
    assert table(text, "best lr")["optim=muon, d_model=256"]["best lr"] == format(fit.best_lr, ".3g") == "0.0205"
    stars = [(c.args[1], c.args[2]) for c in lines.call_args_list if c.args[3:4] == ("*",)]
    assert stars == [([grid[2]], [2.1]), ([grid[3]], [2.1]), ([fit.best_lr], [pytest.approx(fit.best_loss)])]
    assert [c.args[1] for c in dotted.call_args_list] == [grid[3]]  # d=64's diverged lr; not d=128's running one


# -- stage 2: steps to target ----------------------------------------------------------------------
def test_time_to_reach_interpolates_between_evaluations():
    rows = curve_rows([3.0, 2.5, 2.0, 1.8])
    r = time_to_reach(rows, 2.25)  # halfway between step 20 (2.5) and step 30 (2.0)
    assert (r.step, r.tokens, r.seconds) == pytest.approx((25.0, 25 * 64, 2.5))
    assert time_to_reach(rows, 1.8).step == 40 and time_to_reach(rows, 1.79) is None


def fake_stage2(root: Path) -> Path:
    """AdamW (target = its mean final loss 2.0) and two Muon arms: one reaching the target at
    steps 15, 20, 25; one that never does."""
    arms = {("adamw", 128): [[3.0, 2.5, 2.1, 1.95], [3.0, 2.5, 2.1, 2.0], [3.0, 2.5, 2.1, 2.05]],
            ("muon", 128): [[2.5, 1.5, 1.6, 1.7], [2.8, 2.0, 1.8, 1.7], [3.0, 2.2, 1.8, 1.7]],
            ("muon", 256): [[3.0, 2.6, 2.3, 2.1], [3.0, 2.6, 2.3, 2.2], [3.0, 2.6, 2.3, 2.3]]}
    for (opt, width), curves in arms.items():
        for seed, vals in enumerate(curves):
            cfg = arm_config(opt, seed, {"d_model": width})
            rows = curve_rows(vals)
            for r in rows[9::10]:
                r.update({"probe/amax_fwd": 1.0 + seed, "probe/spikes": seed})
            fake_run(root / f"{opt}{width}-{seed}", cfg, vals[-1], rows)
    # the (adamw, 256) baseline is missing: the (muon, 256) arm has no target
    return root


def test_steps_to_target_with_intervals_and_an_arm_that_never_reaches(tmp_path):
    fake_stage2(tmp_path)
    # make (muon, 256) comparable: give it an AdamW partner it never catches up with
    for seed, final in enumerate((1.5, 1.5, 1.5)):
        cfg = arm_config("adamw", seed, {"d_model": 256})
        fake_run(tmp_path / f"adamw256-{seed}", cfg, final, curve_rows([2.0, 1.8, 1.6, final]))
    arms, base = study_arms(load_runs([tmp_path]))
    assert base == ("optim.name", "adamw")
    arm = {(a.key["optim.name"], a.key["model.d_model"]): a for a in arms}
    muon = arm[("muon", 128)]
    assert muon.target == pytest.approx(2.0)
    assert [r.step for r in muon.reaches] == pytest.approx([15.0, 20.0, 20.0 + 10 * 0.2 / 0.4])
    steps = [15.0, 20.0, 25.0]
    text = study_section(load_runs([tmp_path]), tmp_path)
    data = json.loads((tmp_path / "study.json").read_text())
    by_key = {(a["key"]["optim.name"], a["key"]["model.d_model"]): a for a in data["arms"]}
    reach = by_key[("muon", 128)]["reach"]
    half = t_quantile(0.975, 2) * statistics.stdev(steps) / math.sqrt(3)
    assert reach["reached"] == 3 and reach["steps"]["mean"] == pytest.approx(20.0)
    assert reach["steps"]["ci95"] == pytest.approx([20.0 - half, 20.0 + half])
    assert reach["tokens"]["mean"] == pytest.approx(20.0 * 64) and reach["seconds"]["mean"] == pytest.approx(2.0)
    assert reach["speedup_vs_baseline_length"]["mean"] == pytest.approx(40 / 20.0)
    never = by_key[("muon", 256)]["reach"]
    assert never["reached"] == 0 and never["steps"] is None  # not the max steps
    assert "**never reached** (0/3)" in text
    assert "(the baseline)" in text  # its speed-up over its own length means nothing
    assert by_key[("muon", 128)]["stability"]["max_amax_fwd"] == 3.0
    assert by_key[("muon", 128)]["stability"]["spikes_per_run"] == pytest.approx(1.0)
    delta = by_key[("muon", 256)]["delta_vs_baseline"]
    assert delta["mean"] == pytest.approx(2.2 - 1.5)
    # Welch: se = sqrt(0.01/3 + 0), df = 2 (all the variance on one side), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(0.01 / 3)
    assert delta["ci95"] == pytest.approx([0.7 - half, 0.7 + half], abs=1e-6)
    assert mean_interval([1.7] * 3).lo == pytest.approx(1.7)


def test_every_number_of_an_arm_with_a_diverged_and_a_running_seed(tmp_path):
    """study.json and the tables, field by field, for a Muon arm of three completed seeds, one
    diverged (its summary.json holds its last val loss, as the trainer writes it) and one still
    running, against an AdamW arm with skewed finals: the target is the baseline's mean; finals and
    their interval count completed seeds (the seeds column says k of n), steps to target finished
    ones, stability all runs; the tables print what study.json holds, intervals low to high."""
    def arm(opt, width, curves, statuses=None):
        for seed, vals in enumerate(curves):
            cfg = arm_config(opt, seed, {"d_model": width})
            probes = {"probe/amax_fwd": 1.0 + seed, "probe/amax_bwd": 10.0 + seed, "probe/spikes": seed,
                      "probe/update_weight_ratio/matrix": 0.01 * (seed + 1), "probe/update_weight_ratio/embedding": 0.5}
            fake_run(tmp_path / f"{opt}{width}-{seed}", cfg, vals[-1], curve_rows(vals, probes=probes),
                     status=statuses[seed] if statuses else "completed")
    arm("adamw", 64, [[3.0, 2.5, 2.2, 2.1], [3.0, 2.5, 2.2, 2.2]])
    arm("adamw", 128, [[3.0, 2.5, 2.1, 1.9], [3.0, 2.5, 2.1, 1.95], [3.0, 2.5, 2.2, 2.15]])  # mean 2.0, median 1.95
    arm("muon", 64, [[3.0, 2.2, 2.0, 1.9], [3.0, 2.2, 2.0, 2.0]])
    # reaching 2.0 at steps 15, 20, 25; the diverged seed never; the running one at 19
    arm("muon", 128, [[2.5, 1.5, 1.6, 1.7], [2.8, 2.0, 1.8, 1.7], [3.0, 2.2, 1.8, 1.72], [2.9, 2.4, 2.6, 3.0], [2.9, 1.9]],
        statuses=["completed", "completed", "completed", "diverged", None])
    text = study_section(load_runs([tmp_path]), tmp_path)
    data = json.loads((tmp_path / "study.json").read_text())
    assert [(a["key"]["optim.name"], a["key"]["model.d_model"]) for a in data["arms"]] == \
        [("adamw", 64), ("adamw", 128), ("muon", 64), ("muon", 128)]  # widths in numeric order
    muon = data["arms"][3]
    assert muon["runs"] == 5 and muon["status"] == {"completed": 3, "diverged": 1, "running": 1}
    assert muon["final_val_loss"] == mean_interval([1.7, 1.7, 1.72]).as_dict()
    assert muon["baseline"] == {"optim.name": "adamw", "model.d_model": 128}
    reach, steps = muon["reach"], mean_interval([15.0, 20.0, 25.0])
    assert reach["target"] == pytest.approx(2.0) and (reach["reached"], reach["of"]) == (3, 4)
    assert reach["steps"]["mean"] == pytest.approx(20.0) and reach["steps"]["ci95"] == pytest.approx([steps.lo, steps.hi])
    speedup = reach["speedup_vs_baseline_length"]
    assert speedup["mean"] == pytest.approx(2.0) and speedup["ci95"] == pytest.approx([40 / steps.hi, 40 / steps.lo])
    assert muon["stability"] == {"max_amax_fwd": 5.0, "max_amax_bwd": 14.0, "max_update_weight_ratio": pytest.approx(0.05),
                                 "spikes_per_run": 2.0, "spikes_max": 4}
    assert [r["reach"] and r["reach"]["step"] for r in muon["per_run"]] == pytest.approx([15.0, 20.0, 25.0, None, None])
    finals = table(text, "final val loss")
    iv, delta = muon["final_val_loss"], muon["delta_vs_baseline"]
    assert finals["optim=muon, d_model=128"]["final val loss"] == \
        f"{iv['mean']:.4f} ± {iv['std']:.4f} [{iv['ci95'][0]:.4f}, {iv['ci95'][1]:.4f}]"
    assert finals["optim=muon, d_model=128"]["Δ vs baseline [95 %]"] == \
        f"{delta['mean']:+.4f} [{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]"
    assert finals["optim=adamw, d_model=128"]["Δ vs baseline [95 %]"] == "–"  # not a zero against itself
    # the mean leaves out the diverged and the running seed: the seeds column says so
    assert [finals[k]["seeds"] for k in ("optim=adamw, d_model=128", "optim=muon, d_model=128")] == ["3", "**3 of 5**"]
    row = table(text, "steps to target")["optim=muon, d_model=128"]
    assert (row["reached"], row["steps to target"]) == ("3/4", f"20 ± 5 [{steps.lo:,.0f}, {steps.hi:,.0f}]")
    assert row["speed-up (baseline length / steps)"] == f"2.00× [{40 / steps.hi:.2f}, {40 / steps.lo:.2f}]"
    assert table(text, "max Amax bwd")["optim=muon, d_model=128"] == {
        "arm": "optim=muon, d_model=128", "max Amax fwd": "5", "max Amax bwd": "14",
        "max update/weight ratio (matrices)": "0.05", "spikes per run (max)": "2.0 (4)"}


def test_a_difference_without_spread_or_with_one_seed_claims_no_interval(tmp_path):
    """Seeds that all gave the same loss are no evidence of a zero-width difference; one seed none
    of any: neither gets an interval in the table, study.json or the depth plot's error bars."""
    from unittest import mock

    from train.stats import difference_interval
    from train.study_compare import _ci

    flat = difference_interval([1.5, 1.5], [1.6, 1.6])
    assert flat.mean == pytest.approx(-0.1) and flat.lo is None and flat.as_dict()["ci95"] is None
    assert _ci(flat, ".2f") == "-0.10 (no spread over the seeds: no interval)"
    assert _ci(difference_interval([1.5], [1.6, 1.61]), ".2f") == "-0.10 (1 seed)"
    for res, finals in (("residual", [2.0, 2.1, 2.2]), ("mhc", [1.9, 2.0, 2.0])):
        for layers in (4, 8):
            for seed, final in enumerate(finals[:1] if (res, layers) == ("mhc", 8) else finals):
                cfg = arm_config("muon", seed, {"residual": res, "n_layers": layers}, lr=1e-2, lr_keys=())
                fake_run(tmp_path / f"{res}{layers}-{seed}", cfg, final, curve_rows([3.0, 2.5, 2.2, final]))
    import matplotlib.axes
    with mock.patch.object(matplotlib.axes.Axes, "errorbar", autospec=True) as bars:
        study_section(load_runs([tmp_path]), tmp_path)
    depth_bars = [call.args[1] for call in bars.call_args_list if "yerr" in call.kwargs]  # the Δ-loss-vs-depth panel
    assert depth_bars == [[4]]  # mHC at 8 layers: one seed, no bar (it was drawn as a bar of zero length)


def test_arm_without_baseline_partner_has_no_target(tmp_path):
    fake_stage2(tmp_path)
    arms, _ = study_arms(load_runs([tmp_path]))
    lonely = next(a for a in arms if a.key["model.d_model"] == 256)
    assert lonely.target is None and lonely.reaches is None


def test_keys_that_follow_the_optimizer_do_not_hide_the_baseline(tmp_path):
    """The optimizer presets set their own optim.eps (AdamW 1e-8, Muon 1e-20): each Muon arm's
    partner is still the AdamW arm of its width (the width study's stage 2 once found none)."""
    for opt, eps in (("adamw", 1e-8), ("muon", 1e-20)):
        for width, final in ((128, 2.0), (256, 1.8)):
            for seed in range(2):
                cfg = arm_config(opt, seed, {"d_model": width}, eps=eps)
                fake_run(tmp_path / f"{opt}{width}-{seed}", cfg, final, curve_rows([3.0, 2.5, 2.2, final]))
    arms, base = study_arms(load_runs([tmp_path]))
    assert base == ("optim.name", "adamw")
    for a in arms:
        assert a.baseline is not None and a.baseline.key["optim.name"] == "adamw"
        assert a.baseline.key["model.d_model"] == a.key["model.d_model"]


def test_a_width_that_differs_with_the_optimizer_is_not_ignored(tmp_path):
    """AdamW only at d = 128, Muon only at d = 256: the width follows the optimizer too, but it is
    not the optimizer's setting, so the Muon arm has no partner rather than a narrower one."""
    for opt, width in (("adamw", 128), ("muon", 256)):
        for seed in range(2):
            cfg = arm_config(opt, seed, {"d_model": width})
            fake_run(tmp_path / f"{opt}{width}-{seed}", cfg, 2.0, curve_rows([3.0, 2.5, 2.2, 2.0]))
    arms, _ = study_arms(load_runs([tmp_path]))
    muon = next(a for a in arms if a.key["optim.name"] == "muon")
    assert muon.baseline is None and muon.target is None


def test_a_setting_of_the_optimizer_that_varies_within_one_stays_a_factor(tmp_path):
    """AdamW at weight decay 0 only, Muon at 0 and 0.1: optim.weight_decay is in the optimizer's
    group but not one value per optimizer, so Muon at 0.1 has no partner (not AdamW at 0)."""
    for opt, wd in (("adamw", 0.0), ("muon", 0.0), ("muon", 0.1)):
        for seed in range(2):
            cfg = arm_config(opt, seed, {"d_model": 128}, weight_decay=wd)
            fake_run(tmp_path / f"{opt}{wd}-{seed}", cfg, 2.0, curve_rows([3.0, 2.5, 2.2, 2.0]))
    arms, _ = study_arms(load_runs([tmp_path]))
    assert {tuple(a.key.values()): a.baseline and tuple(a.baseline.key.values()) for a in arms} == \
        {("adamw", 0.0): ("adamw", 0.0), ("muon", 0.0): ("adamw", 0.0), ("muon", 0.1): None}


def test_an_optimizer_by_residual_study_measures_against_adamw(tmp_path):
    """optim × residual: each arm's baseline is AdamW with its own residual stream (the plain
    residual stream is the baseline only where no AdamW arm exists)."""
    for opt in ("adamw", "muon"):
        for res in ("residual", "mhc"):
            for seed in range(2):
                cfg = arm_config(opt, seed, {"residual": res}, lr_keys=())
                fake_run(tmp_path / f"{opt}{res}-{seed}", cfg, 2.0, curve_rows([3.0, 2.5, 2.2, 2.0]))
    arms, base = study_arms(load_runs([tmp_path]))
    assert base == ("optim.name", "adamw")
    assert {tuple(a.key.values()): tuple(a.baseline.key.values()) for a in arms} == {
        ("adamw", "mhc"): ("adamw", "mhc"), ("adamw", "residual"): ("adamw", "residual"),
        ("muon", "mhc"): ("adamw", "mhc"), ("muon", "residual"): ("adamw", "residual")}


def test_depth_arm_baseline_is_the_plain_residual(tmp_path):
    for res, finals in (("residual", [2.0, 2.1, 2.2]), ("mhc", [1.9, 2.0, 2.0])):
        for layers in (4, 8):
            for seed, final in enumerate(finals):
                cfg = arm_config("muon", seed, {"residual": res, "n_layers": layers}, lr=1e-2, lr_keys=())
                fake_run(tmp_path / f"{res}{layers}-{seed}", cfg, final, curve_rows([3.0, 2.5, 2.2, final]))
    text = study_section(load_runs([tmp_path]), tmp_path)
    arms, base = study_arms(load_runs([tmp_path]))
    assert base == ("model.residual", "residual")
    assert (tmp_path / "study_vs_depth.png").stat().st_size > 1000 and "study_vs_depth.png" in text


# -- end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_stage_study_end_to_end(tmp_path, data_cache):
    """2 optimizers × 2 widths × 2 lrs, then the 4 arms × 2 seeds at the lr stage 1 picked."""
    tiny = ["model=tiny", "model.d_model=16,32", "data.seq_len=32", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=8", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_batches=1",
            "trainer.checkpoint_every=0", "optim.warmup_steps=1", "logger.wandb.mode=disabled",
            "trainer.progress=false", f"data.cache_dir={data_cache}"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    proc = launch("-m", "experiment=optimizer_study", "study.lr_step=0,1", *tiny, f"out_dir={stage1}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    write_report([stage1], lr=True)
    sweep = json.loads((stage1 / "lr_sweep.json").read_text())
    assert len(sweep["curves"]) == 4 and all(len(c["points"]) == 2 for c in sweep["curves"])
    proc = launch("-m", "experiment=optimizer_study", "study=tuned", f"study.best_lr_from={stage1 / 'lr_sweep.json'}",
                  "study.allow_edge_lr=true", "seed=0,1", "probes.every=2", *tiny, f"out_dir={stage2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = load_runs([stage2])
    assert len(runs) == 8 and all(r.status == "completed" for r in runs)
    best = {(c["key"]["optim.name"], c["key"]["model.d_model"]): c["best_lr"] for c in sweep["curves"]}
    for r in runs:
        assert r.config["optim"]["lr"] == best[(r.config["optim"]["name"], r.config["model"]["d_model"])]
    text = write_report([stage2]).read_text()
    data = json.loads((stage2 / "study.json").read_text())
    assert len(data["arms"]) == 4 and all(a["runs"] == 2 and a["final_val_loss"]["ci95"] for a in data["arms"])
    assert "Tuned comparison" in text and (stage2 / "steps_to_target.png").exists()
