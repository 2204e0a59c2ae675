"""Learning-rate studies: each optimizer at its own tuned learning rate, with intervals over seeds.

Stage 1 (`study=sweep`, used by `experiment=lr_sweep` and `experiment=optimizer_study`): each run
of a multirun trains one point of a log grid; `apply_study` multiplies every key of
`study.lr_keys` by 10^(lr_step · lr_spacing) before the run starts, so its `config.yaml` holds the
learning rate it trained with. `python -m train.report DIR --lr` then groups the runs into curves
(one per optimizer and per value of every other key the sweep varied: width, depth, residual),
finds each curve's best lr (`fit_best_lr`), flags a minimum at the grid's edge, plots loss
against lr and writes `lr_sweep.json`.

Stage 2 (`study=tuned study.best_lr_from=.../lr_sweep.json`): `apply_study` finds the curve of the
run's own configuration in that file and trains at its best lr: one Hydra multirun over
optimizer × width × seed, nobody copies numbers. Its report (`study_section`, automatic for
stage-2 runs) gives per arm the final validation loss with a t interval over seeds, the steps,
tokens and training seconds to reach the baseline's final loss (tuned AdamW, or the plain
residual stream), and the stability figures.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.config import Config, OptimConfig
from train.run_config import flatten
from common.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "v4lab.lr_sweep/1"
LR_KEYS = tuple(f"optim.{f.name}" for f in dataclasses.fields(OptimConfig) if f.name.endswith("lr"))
# Keys that never tell curves or arms apart (where a run writes, how it logs, the seed, the study's own bookkeeping).
NOT_A_FACTOR = ("seed", "out_dir", "logger.", "data.cache_dir", "trainer.progress", "trainer.resume", "study.",
                "launcher.dry_run")
# Keys in which stage 2 may differ from stage 1 without a warning.
STAGE_KEYS = (*NOT_A_FACTOR, "probes.", "trainer.checkpoint_every", "trainer.keep_last")
ORDER = ("optim.name", "model.residual", "model.d_model", "model.n_layers")  # curve and arm keys, in this order


def _sorted_keys(keys) -> list[str]:
    return sorted(keys, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))


def describe(key: dict) -> str:
    """optim=muon, d_model=256: the short form of a curve's or an arm's key."""
    return ", ".join(f"{'optim' if k == 'optim.name' else k.rsplit('.', 1)[-1]}={v}" for k, v in key.items()) or "all runs"


# -- the run's learning rate ----------------------------------------------------------------------
def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def check_study(cfg: Config, find_curve: bool = True) -> None:
    """The study keys make sense together, and a stage-2 run finds its curve, inside the grid, in
    study.best_lr_from (train.validate calls this; it changes nothing)."""
    s = cfg.study
    if s.stage not in (0, 1, 2):
        raise ConfigError("study.stage", s.stage, "0 (no study), 1 (lr grid: study=sweep), 2 (tuned lr: study=tuned)")
    if not (s.lr_spacing > 0 and math.isfinite(s.lr_spacing)):
        raise ConfigError("study.lr_spacing", s.lr_spacing, "a positive number of decades, e.g. 0.5")
    if not s.lr_keys or any(k not in LR_KEYS for k in s.lr_keys):
        raise ConfigError("study.lr_keys", list(s.lr_keys), f"a non-empty list of {', '.join(LR_KEYS)}")
    if s.lr_step != 0 and s.stage != 1:
        raise ConfigError("study.lr_step", s.lr_step, "0 outside stage 1", "a grid point needs study=sweep")
    if s.best_lr_from and s.stage != 2:
        raise ConfigError("study.best_lr_from", s.best_lr_from, "null outside stage 2", "a tuned lr needs study=tuned")
    if s.best_lr_from and find_curve:
        best_lr_for(cfg, s.best_lr_from)


def apply_study(cfg: Config) -> None:
    """Set the run's learning rate(s) from its study stage, in place, before anything else reads
    them: stage 1 scales `study.lr_keys` by 10^(lr_step · lr_spacing); stage 2 sets the values
    `study.best_lr_from` holds for the run's curve. Stage 0 leaves the config alone. Bad input
    raises ConfigError naming the key."""
    check_study(cfg, find_curve=False)  # the lookup below reports its own errors
    s = cfg.study
    if s.stage == 1:
        factor = 10.0 ** (s.lr_step * s.lr_spacing)
        for key in s.lr_keys:
            _set(cfg, key, _round(_get(cfg, key) * factor))
    elif s.stage == 2:
        if not s.best_lr_from:
            raise ConfigError("study.best_lr_from", s.best_lr_from,
                              "the lr_sweep.json that `python -m train.report STAGE1_DIR --lr` wrote (study=tuned needs it)")
        s.best_lr_from = str(Path(s.best_lr_from).expanduser().resolve())
        for key, value in best_lr_for(cfg, s.best_lr_from, log_choice=True).items():
            _set(cfg, key, value)


def _extension_hint(curve: dict) -> str:
    steps = [p.get("lr_step") for p in curve["points"]]
    if not all(isinstance(k, int) for k in steps):
        return "extend its grid beyond that lr in stage 1, then `report --lr` over both sweeps"
    nxt = (max(steps) + 1, max(steps) + 2) if curve["edge"] == "high" else (min(steps) - 1, min(steps) - 2)
    return (f"extend its grid: stage 1 for this curve only with study.lr_step={nxt[0]},{nxt[1]} into another "
            f"directory, then `python -m train.report SWEEP_DIR OTHER_DIR --lr --out SWEEP_DIR`")


def best_lr_for(cfg: Config, path: str, log_choice: bool = False) -> dict[str, float]:
    """The learning-rate values of the curve in `path` (an lr_sweep.json) whose key matches this
    config: same optimizer, same values of every key stage 1 varied."""
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("study.best_lr_from", path, "a readable lr_sweep.json", str(e)) from None
    if sweep.get("format") != FORMAT:
        raise ConfigError("study.best_lr_from", path, f"an lr_sweep.json of format {FORMAT}",
                          f"its format is {sweep.get('format')!r}")
    flat = flatten(dataclasses.asdict(cfg))
    matches = [c for c in sweep["curves"] if all(flat.get(k) == v for k, v in c["key"].items())]
    if len(matches) != 1:
        have = "; ".join(describe(c["key"]) for c in sweep["curves"])
        raise ConfigError("study.best_lr_from", path, f"a sweep with exactly one curve for this run (it has: {have})",
                          f"{len(matches)} curve(s) match optim={cfg.optim.name}")
    curve = matches[0]
    if curve["best_lr"] is None:
        raise ConfigError("study.best_lr_from", path, "a curve with a completed run",
                          f"no run of curve {describe(curve['key'])} completed")
    if curve["edge"] and not cfg.study.allow_edge_lr:
        raise ConfigError("study.best_lr_from", path, "a curve whose minimum lies inside its grid "
                          "(or study.allow_edge_lr=true)",
                          f"curve {describe(curve['key'])} is best at the {curve['edge']} edge of its grid, "
                          f"lr {curve['best_lr']:.3g}: {_extension_hint(curve)}")
    changed = [f"{k} {v!r} -> {flat.get(k)!r}" for k, v in sweep.get("fixed", {}).items()
               if not k.startswith(STAGE_KEYS) and k not in LR_KEYS and flat.get(k) != (tuple(v) if isinstance(v, list) else v)]
    if changed and not cfg.study.allow_other_budget:  # the best lr depends on length, width, schedule
        raise ConfigError("study.best_lr_from", path, "an lr_sweep.json of runs with this run's fixed settings "
                          "(or study.allow_other_budget=true)",
                          f"stage 1 held other values: {'; '.join(changed)[:400]}")
    if changed and log_choice:
        log.warning("stage 2 differs from stage 1 (%s) in: %s", path, "; ".join(changed))
    if log_choice:
        log.info("study: curve %s, best lr %s from %s", describe(curve["key"]), curve["set"], path)
    return curve["set"]


# -- stage 1: curves and their best lr ------------------------------------------------------------
@dataclass
class LrFit:
    """The best lr of one curve. `edge` is "low" or "high" when the smallest loss lies at that end
    of the grid (the true optimum may lie beyond: extend the grid); `method` is "parabola" when
    a parabola in log10(lr) through the minimum and its neighbours located it, "grid" when the
    grid point itself is reported (edge, too few finite neighbours)."""
    best_lr: float | None
    best_loss: float | None
    index: int | None  # grid point with the smallest loss
    edge: str | None
    method: str


def fit_best_lr(lrs: list[float], losses: list[float | None], window: int = 1) -> LrFit:
    """`lrs` ascending; a loss of None or non-finite is a run that diverged (worse than any). The
    parabola a·x² + b·x + c (x = log10 lr) is fitted by least squares to the finite points within
    `window` grid points of the minimum (of equal minima, the smallest lr's); its vertex, kept inside
    those points, is the best lr."""
    if any(b <= a for a, b in zip(lrs, lrs[1:])):
        raise ValueError(f"learning rates must be strictly ascending, got {lrs}")
    finite = [(i, y) for i, y in enumerate(losses) if y is not None and math.isfinite(y)]
    if not finite:
        return LrFit(None, None, None, None, "grid")
    i, y = min(finite, key=lambda p: p[1])
    edge = "low" if i == 0 else "high" if i == len(lrs) - 1 else None
    near = [(math.log10(lrs[j]), losses[j]) for j in range(max(0, i - window), min(len(lrs), i + window + 1))
            if losses[j] is not None and math.isfinite(losses[j])]
    if edge or len(near) < 3:
        return LrFit(lrs[i], y, i, edge, "grid")
    x, v = np.array([p[0] for p in near]), np.array([p[1] for p in near])
    a, b, c = np.polyfit(x, v, 2)
    if a <= 0:  # not convex around the minimum: no vertex to trust
        return LrFit(lrs[i], y, i, None, "grid")
    xv = float(np.clip(-b / (2 * a), x.min(), x.max()))
    return LrFit(_round(10.0 ** xv), float(np.polyval([a, b, c], xv)), i, None, "parabola")


@dataclass
class Curve:
    key: dict
    lrs: list[float]
    losses: list[float | None]  # mean final val loss over the point's completed runs; None: none completed
    status: list[str]
    runs: list[list[str]]
    values: list[dict]  # per point: the value of every lr key
    steps: list[int | None]  # per point: its study.lr_step
    fit: LrFit | None = None


def in_stage(run, stage: int) -> bool:
    return (run.config.get("study") or {}).get("stage") == stage


def factors(flats: list[dict], exclude: tuple[str, ...] = ()) -> list[str]:
    """Keys whose value differs between runs (those that are not bookkeeping or in `exclude`)."""
    common = set.intersection(*(set(f) for f in flats)) if flats else set()
    return _sorted_keys(k for k in common if not k.startswith(NOT_A_FACTOR + exclude) and len({f[k] for f in flats}) > 1)


def lr_curves(runs) -> tuple[list[Curve], dict]:
    """Stage-1 runs (all runs if none is marked stage 1) as curves, and the keys all of them share."""
    runs = [r for r in runs if in_stage(r, 1)] or list(runs)
    flats = [flatten(r.config) for r in runs]
    lr_keys = tuple(sorted({k for f in flats for k in f.get("study.lr_keys", ("optim.lr",))} | {"optim.lr"}))
    keys = [k for k in factors(flats, exclude=lr_keys) if k != "optim.name"]
    by_curve: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for run, f in zip(runs, flats):
        ck = (("optim.name", f.get("optim.name")), *((k, f.get(k)) for k in keys))
        by_curve[ck][f["optim.lr"]].append((run, f))
    curves = []
    for ck, points in by_curve.items():
        lrs = sorted(points)
        losses, status, paths, values, steps = [], [], [], [], []
        for lr in lrs:
            done = [r.final_val_loss for r, _ in points[lr] if r.final_val_loss is not None]
            states = sorted({r.status for r, _ in points[lr]})
            losses.append(statistics.fmean(done) if done else None)
            status.append(",".join(states))
            paths.append([str(r.path) for r, _ in points[lr]])
            values.append({k: points[lr][0][1][k] for k in lr_keys if k in points[lr][0][1]})
            steps.append(points[lr][0][1].get("study.lr_step"))
        curve = Curve(dict(ck), lrs, losses, status, paths, values, steps)
        # A point still running is not a point yet; a diverged one is worse than every other.
        usable = [j for j, s in enumerate(status) if losses[j] is not None or "diverged" in s]
        fit = fit_best_lr([lrs[j] for j in usable], [losses[j] for j in usable])
        if fit.index is not None:
            fit.index = usable[fit.index]
        curve.fit = fit
        curves.append(curve)
    curves.sort(key=lambda c: tuple(str(v) if not isinstance(v, (int, float)) else f"{v:012.4f}" for v in c.key.values()))
    fixed = {k: flats[0][k] for k in (set.intersection(*(set(f) for f in flats)) if flats else ())
             if not k.startswith(NOT_A_FACTOR) and k not in lr_keys and len({f[k] for f in flats}) == 1}
    return curves, fixed


def sweep_json(curves: list[Curve], fixed: dict, dirs) -> dict:
    out = []
    for c in curves:
        f = c.fit
        lr_values = None
        if f.best_lr is not None:  # every lr key moves with optim.lr along the grid: same ratio at the best lr
            ref = c.values[f.index]
            lr_values = {k: _round(v * f.best_lr / c.lrs[f.index]) for k, v in ref.items()}
        out.append({"key": c.key, "best_lr": f.best_lr, "best_val_loss": f.best_loss, "fit": f.method,
                    "edge": f.edge, "set": lr_values,
                    "points": [{"lr": lr, "lr_step": k, "final_val_loss": y, "status": s, "runs": p}
                               for lr, k, y, s, p in zip(c.lrs, c.steps, c.losses, c.status, c.runs)]})
    return {"format": FORMAT, "from": [str(d) for d in dirs], "fixed": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in sorted(fixed.items())},
            "curves": out}


def _panels(keys: list[dict]) -> tuple[str | None, list]:
    """Panel by the first key that varies between curves, one line per the rest."""
    names = [k for k in (keys[0] if keys else {}) if len({str(c[k]) for c in keys}) > 1]
    if len(names) < 2:
        return None, [None]
    return names[0], sorted({c[names[0]] for c in keys}, key=str)


def plot_lr_curves(curves: list[Curve], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    panel_key, panels = _panels([c.key for c in curves])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, pv in zip(axes[0], panels):
        shown = [c for c in curves if panel_key is None or c.key[panel_key] == pv]
        for i, c in enumerate(shown):
            color = cmap(i % 10)
            label = describe({k: v for k, v in c.key.items() if k != panel_key and len({str(d.key.get(k)) for d in curves}) > 1})
            pts = [(lr, y) for lr, y in zip(c.lrs, c.losses) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color, markersize=4,
                    label=label + (f" (min at {c.fit.edge} edge: extend the grid)" if c.fit.edge else ""))
            for lr, y, s in zip(c.lrs, c.losses, c.status):
                if y is None and "diverged" in s:
                    ax.axvline(lr, color=color, ls=":", alpha=0.6)
            if c.fit.best_lr is not None:
                ax.plot([c.fit.best_lr], [c.fit.best_loss], "*", color=color, markersize=13, markeredgecolor="k")
        ax.set_xscale("log")
        ax.set(xlabel="peak learning rate (optim.lr)", ylabel="final validation loss",
               title=describe({panel_key: pv}) if panel_key else "final validation loss vs lr")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("★ best lr (parabola in log lr); dotted: diverged", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)
    plt.close(fig)
    return ["lr_sweep.png"]


def fmt(x, spec=".4f") -> str:
    return "–" if x is None else format(x, spec)


def lr_section(runs, out: Path, dirs) -> str:
    """Markdown for `report --lr`; writes lr_sweep.json and lr_sweep.png into `out`."""
    curves, fixed = lr_curves(runs)
    if not curves:
        return "## Learning rate\n\nNo runs.\n"
    (out / "lr_sweep.json").write_text(json.dumps(sweep_json(curves, fixed, dirs), indent=2))
    figures = plot_lr_curves(curves, out)
    lines = ["## Learning rate\n", "Final validation loss per grid point (mean over completed seeds); best lr from "
             "a parabola in log10(lr) through the grid minimum and its two neighbours. Stage 2 "
             "(`study=tuned study.best_lr_from=.../lr_sweep.json`) reads `lr_sweep.json`.\n",
             "| curve | grid (lr: final val loss) | best lr | fitted loss | fit | note |", "|---|---|---|---|---|---|"]
    for c in curves:
        grid = ", ".join(f"{lr:.3g}: {fmt(y, '.3f') if y is not None else c.status[j]}"
                         for j, (lr, y) in enumerate(zip(c.lrs, c.losses)))
        note = f"**minimum at the {c.fit.edge} edge: extend the grid**" if c.fit.edge else ""
        lines.append(f"| {describe(c.key)} | {grid} | {fmt(c.fit.best_lr, '.3g')} | {fmt(c.fit.best_loss)} | "
                     f"{c.fit.method} | {note} |")
    lines += ["", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)


def study_sections(runs, out: Path, dirs, lr: bool = False, baseline: str | None = None) -> list[str]:
    """What `python -m train.report` adds for studies: the lr view with --lr, the stage-2
    comparison whenever stage-2 runs are among `runs`."""
    from train.study_compare import study_section

    sections = [lr_section(runs, out, dirs)] if lr else []
    if any(in_stage(r, 2) for r in runs):
        sections.append(study_section(runs, out, baseline))
    return sections
