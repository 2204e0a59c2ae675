"""Stage 2 of a learning-rate study: arms at their tuned learning rate, compared over seeds.

An arm is the stage-2 runs that differ only in seed. Its baseline is the arm with the same key but
the baseline value (tuned AdamW: optim=adamw; in the depth arm the plain residual stream), and its
target is the baseline's mean final validation loss. Per arm: the final loss with a t interval,
its difference from the baseline (Welch), the steps, tokens and training seconds to reach the
target with intervals over the seeds that reached it (an arm that never reached it says so), and
the stability figures of the probes.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.stats import Interval, difference_interval, mean_interval
from train.study import describe, factors, flatten, fmt, in_stage


@dataclass
class Reach:
    """Where a run's validation loss first reached the target, linearly interpolated between the
    two evaluations around the crossing: optimizer steps, tokens, and training seconds (the sum
    of step times, without evaluation, probes and checkpoints; survives resumes)."""
    step: float
    tokens: float
    seconds: float


def time_to_reach(rows: list[dict], target: float) -> Reach | None:
    """None when no evaluation of the run reached `target` (never: not its last step)."""
    evals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    prev, at = None, None
    for step, v in evals:
        if v <= target:
            at = float(step) if prev is None or prev[1] == v else prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - v)
            break
        prev = (step, v)
    if at is None:
        return None
    timed = [r for r in rows if r.get("tokens_per_s")]
    steps = [0.0] + [float(r["step"]) for r in timed]
    seconds = np.cumsum([0.0] + [(r["tokens"] / r["step"]) / r["tokens_per_s"] for r in timed])
    per_step = rows[-1]["tokens"] / rows[-1]["step"]
    return Reach(at, at * per_step, float(np.interp(at, steps, seconds)))


@dataclass
class Arm:
    key: dict
    runs: list  # report.Run, completed, diverged and still running
    lr: dict
    max_steps: int
    finals: list[float]
    reaches: list[Reach | None] | None = None  # per finished run; None: no target for this arm
    target: float | None = None
    baseline: Arm | None = None

    @property
    def finished(self) -> list:
        return [r for r in self.runs if r.status in ("completed", "diverged")]


def _parse_baseline(baseline: str | None, keys: list[str], arms: list[Arm]) -> tuple[str, str] | None:
    aliases = {"optim": "optim.name", "residual": "model.residual"}
    if baseline:
        k, _, v = baseline.partition("=")
        k = aliases.get(k, k)
        if k not in keys or not any(str(a.key[k]) == v for a in arms):
            raise SystemExit(f"error: --baseline {baseline}: no arm has {k}={v}; arms: "
                             + "; ".join(describe(a.key) for a in arms))
        return k, v
    for k, v in (("optim.name", "adamw"), ("model.residual", "residual")):
        if k in keys and any(str(a.key[k]) == v for a in arms):
            return k, v
    return None


def _follows(key: str, by: str, arms: list[Arm]) -> bool:
    """Whether `key` is a setting of the compared thing itself: in `by`'s config group (optim.* for
    optim.name) and one value per value of `by` across the arms. Outside the group (a width that
    happens to differ with the optimizer) it stays a factor, and arms of other widths never pair."""
    if key.rpartition(".")[0] != by.rpartition(".")[0]:
        return False
    seen: dict[str, set[str]] = defaultdict(set)
    for a in arms:
        seen[str(a.key[by])].add(str(a.key[key]))
    return all(len(v) == 1 for v in seen.values())


def study_arms(runs, baseline: str | None = None) -> tuple[list[Arm], tuple[str, str] | None]:
    """Stage-2 runs grouped into arms (seeds pooled), each with its baseline arm — the arm with the
    same key but `baseline` (default optim=adamw, else residual=residual) — and its target: the
    baseline's mean final validation loss."""
    runs = [r for r in runs if in_stage(r, 2)]
    flats = [flatten(r.config) for r in runs]
    lr_keys = tuple(sorted({k for f in flats for k in f.get("study.lr_keys", ())} | {"optim.lr"}))
    keys = factors(flats, exclude=lr_keys)
    groups: dict[tuple, list] = defaultdict(list)
    for run, f in zip(runs, flats):
        groups[tuple((k, f.get(k)) for k in keys)].append((run, f))
    arms = []
    for k, members in groups.items():
        f0 = members[0][1]
        arms.append(Arm(dict(k), [r for r, _ in members], {lk: f0[lk] for lk in lr_keys if lk in f0},
                        f0["trainer.max_steps"], [r.final_val_loss for r, _ in members if r.final_val_loss is not None]))
    arms.sort(key=lambda a: tuple(f"{v:012.4f}" if isinstance(v, (int, float)) else str(v) for v in a.key.values()))
    base = _parse_baseline(baseline, keys, arms)
    if base:
        bk, bv = base
        # Keys that follow the baseline key (one value per optimizer, e.g. the presets' optim.eps:
        # 1e-8 for AdamW, 1e-20 for Muon) would keep every arm from finding its partner.
        match = [k for k in keys if k != bk and not _follows(k, bk, arms)]

        def key_of(a: Arm, base_value: str) -> tuple:
            return (base_value, *(str(a.key[k]) for k in match))
        index = {key_of(a, str(a.key[bk])): a for a in arms}
        for a in arms:
            partner = index.get(key_of(a, bv))
            if partner is not None and partner.finals:
                a.baseline, a.target = partner, statistics.fmean(partner.finals)
                a.reaches = [time_to_reach(r.rows, a.target) for r in a.finished]
    return arms, base


def _ci(iv: Interval | None, spec: str) -> str:
    if iv is None:
        return "–"
    if iv.lo is None:
        return f"{iv.mean:{spec}} ({'1 seed' if iv.n == 1 else 'no spread over the seeds: no interval'})"
    return f"{iv.mean:{spec}} ± {iv.std:{spec}} [{iv.lo:{spec}}, {iv.hi:{spec}}]"


def _reach_summary(a: Arm) -> dict | None:
    if a.reaches is None:
        return None
    got = [x for x in a.reaches if x is not None]
    steps = mean_interval([x.step for x in got])
    speedup = None
    if steps is not None and a.baseline is not None:
        ref = a.baseline.max_steps
        speedup = {"mean": ref / steps.mean,
                   "ci95": [ref / steps.hi, ref / steps.lo] if steps.lo is not None and steps.lo > 0 else None}
    return {"target": a.target, "reached": len(got), "of": len(a.reaches), "steps": steps,
            "tokens": mean_interval([x.tokens for x in got]), "seconds": mean_interval([x.seconds for x in got]),
            "speedup_vs_baseline_length": speedup}


def _stability(a: Arm) -> dict:
    def most(key):
        vals = [v for v in (r.max_of(key) for r in a.runs) if v is not None]
        return max(vals) if vals else None
    spikes = [v for v in (r.max_of("probe/spikes") for r in a.runs) if v is not None]
    return {"max_amax_fwd": most("probe/amax_fwd"), "max_amax_bwd": most("probe/amax_bwd"),
            "max_update_weight_ratio": most("probe/update_weight_ratio/matrix"),
            "spikes_per_run": statistics.fmean(spikes) if spikes else None, "spikes_max": max(spikes) if spikes else None}


def study_json(arms: list[Arm], base) -> dict:
    def iv(x):
        return x.as_dict() if isinstance(x, Interval) else x
    out = []
    for a in arms:
        reach = _reach_summary(a)
        delta = difference_interval(a.finals, a.baseline.finals) if a.baseline else None
        out.append({
            "key": a.key, "lr": a.lr, "runs": len(a.runs), "max_steps": a.max_steps,
            "status": dict(sorted(_counts(r.status for r in a.runs).items())),
            "final_val_loss": iv(mean_interval(a.finals)),
            "baseline": a.baseline.key if a.baseline else None,
            "delta_vs_baseline": iv(delta),
            "reach": {k: iv(v) for k, v in reach.items()} if reach else None,
            "stability": _stability(a),
            "per_run": [{"path": str(r.path), "seed": r.config.get("seed"), "status": r.status,
                         "final_val_loss": r.final_val_loss,
                         "reach": dataclasses.asdict(x) if (x := _run_reach(a, r)) else None} for r in a.runs],
        })
    return {"baseline": dict([base]) if base else None, "arms": out}


def _run_reach(a: Arm, run) -> Reach | None:
    if a.reaches is None or run not in a.finished:
        return None
    return a.reaches[a.finished.index(run)]


def _counts(items) -> dict:
    out = defaultdict(int)
    for i in items:
        out[i] += 1
    return out


def plot_study(arms: list[Arm], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    files = []
    labels = [describe(a.key) for a in arms]
    for name, title, xlabel, values in (
        ("study_final_loss.png", "Final validation loss (mean, 95 % t interval, seeds)", "final validation loss",
         lambda a: (a.finals, mean_interval(a.finals))),
        ("steps_to_target.png", "Steps to reach the baseline's final loss (mean, 95 % interval, seeds)", "steps",
         lambda a: ([x.step for x in a.reaches if x], _reach_summary(a)["steps"]) if a.reaches is not None else None),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(arms) + 1.6))
        drawn = False
        for y, a in enumerate(arms):
            got = values(a)
            if got is None:
                continue
            pts, iv = got
            if iv is None:  # an arm with a target that no seed reached: said so, never drawn as a number
                ax.text(1.01, y, f"never reached (0/{len(a.reaches)})", transform=ax.get_yaxis_transform(),
                        ha="left", va="center", fontsize=8, color="firebrick", clip_on=False)
                continue
            drawn = True
            ax.plot(pts, [y] * len(pts), "o", color="grey", alpha=0.6, markersize=4)
            err = [[iv.mean - iv.lo], [iv.hi - iv.mean]] if iv.lo is not None else None
            ax.errorbar([iv.mean], [y], xerr=err, fmt="D", color="k", capsize=4, markersize=5)
            if a.reaches is not None and name == "steps_to_target.png" and len(pts) < len(a.reaches):
                ax.text(1.01, y, f"{len(pts)}/{len(a.reaches)} reached", transform=ax.get_yaxis_transform(),
                        ha="left", va="center", fontsize=8, color="firebrick", clip_on=False)
        if not drawn:
            plt.close(fig)
            continue
        ax.set_yticks(range(len(arms)), labels, fontsize=8)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.set(title=title, xlabel=xlabel)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    if arms and "model.n_layers" in arms[0].key:
        files.append(_plot_vs_depth(arms, out))
    return files


def _plot_vs_depth(arms: list[Arm], out: Path) -> str:
    """mHC's picture: max composite Amax gain against depth per residual stream, and the loss
    difference from the baseline with its interval."""
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for a in arms:
        lines[describe({k: v for k, v in a.key.items() if k != "model.n_layers"})].append(a)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, members) in enumerate(sorted(lines.items())):
        color = plt.get_cmap("tab10")(i % 10)
        members.sort(key=lambda a: a.key["model.n_layers"])
        depth = [a.key["model.n_layers"] for a in members]
        for a in members:
            runs = [v for v in (r.max_of("probe/amax_fwd") for r in a.runs) if v is not None]
            ax1.plot([a.key["model.n_layers"]] * len(runs), runs, "o", color=color, alpha=0.5, markersize=4)
        peak = [_stability(a)["max_amax_fwd"] for a in members]
        ax1.plot([d for d, p in zip(depth, peak) if p], [p for p in peak if p], "-", color=color, label=label)
        deltas = [(a.key["model.n_layers"], difference_interval(a.finals, a.baseline.finals))
                  for a in members if a.baseline is not None and a.baseline is not a]
        deltas = [(d, iv) for d, iv in deltas if iv is not None]
        if deltas:  # a bar only where there is an interval: a point without one is hollow, not exact
            ax2.plot([d for d, _ in deltas], [iv.mean for _, iv in deltas], "-", color=color, label=label)
            for d, iv in deltas:
                if iv.lo is None:
                    ax2.plot([d], [iv.mean], "o", mfc="none", color=color)
                else:
                    ax2.errorbar([d], [iv.mean], yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], fmt="o", color=color,
                                 capsize=4)
    ax1.set(title="Max composite Amax gain (forward) vs depth", xlabel="layers", ylabel="gain", yscale="log")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(title="Final val loss − baseline's (95 % Welch interval; hollow: none)", xlabel="layers", ylabel="Δ loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_vs_depth.png", dpi=110)
    plt.close(fig)
    return "study_vs_depth.png"


def study_section(runs, out: Path, baseline: str | None = None) -> str:
    """Markdown for stage-2 runs; writes study.json and the plots into `out`."""
    arms, base = study_arms(runs, baseline)
    if not arms:
        return ""
    data = study_json(arms, base)
    (out / "study.json").write_text(json.dumps(data, indent=2))
    figures = plot_study(arms, out)
    bname = describe(dict([base])) if base else None
    md = ["## Tuned comparison (stage 2)\n",
          f"Each arm at its best lr from stage 1; mean ± std [95 % t interval] over seeds. Baseline: "
          f"{bname or 'none (no adamw or residual arm; --baseline KEY=VALUE)'}; target = the baseline arm's mean "
          "final validation loss; steps/tokens/seconds to reach it are interpolated between evaluations and "
          "averaged over the seeds that reached it (k/n); speed-up = the baseline's run length / those steps. "
          "Seconds are training-step time only, measured on a shared machine. Seeds: those in the final-loss "
          "mean and its Δ, of the arm's runs where they differ (a diverged or still running seed has no final "
          "loss: see the status column before reading a mean that leaves one out).\n",
          "| arm | lr | seeds | final val loss | Δ vs baseline [95 %] | status |", "|---|---|---|---|---|---|"]
    for a, d in zip(arms, data["arms"]):
        delta = d["delta_vs_baseline"]
        dtxt = "–" if not delta or a.baseline is a else (
            f"{delta['mean']:+.4f}" + (f" [{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]" if delta["ci95"] else ""))
        lr = ", ".join(f"{k.removeprefix('optim.')} {v:.3g}" for k, v in a.lr.items())
        status = ", ".join(f"{n} {s}" for s, n in d["status"].items())
        seeds = f"{len(a.finals)}" if len(a.finals) == len(a.runs) else f"**{len(a.finals)} of {len(a.runs)}**"
        md.append(f"| {describe(a.key)} | {lr} | {seeds} | {_ci(mean_interval(a.finals), '.4f')} | {dtxt} | {status} |")
    md += ["", "| arm | target | reached | steps to target | tokens | training seconds | speed-up (baseline length / steps) |",
           "|---|---|---|---|---|---|---|"]
    for a in arms:
        r = _reach_summary(a)
        if r is None:
            md.append(f"| {describe(a.key)} | – | no baseline arm | | | | |")
            continue
        if not r["reached"]:
            md.append(f"| {describe(a.key)} | {r['target']:.4f} | **never reached** (0/{r['of']}) | – | – | – | – |")
            continue
        sp = r["speedup_vs_baseline_length"]
        sptxt = "(the baseline)" if a.baseline is a else \
            f"{sp['mean']:.2f}×" + (f" [{sp['ci95'][0]:.2f}, {sp['ci95'][1]:.2f}]" if sp["ci95"] else "")
        md.append(f"| {describe(a.key)} | {r['target']:.4f} | {r['reached']}/{r['of']} | {_ci(r['steps'], ',.0f')} | "
                  f"{_ci(r['tokens'], ',.0f')} | {_ci(r['seconds'], ',.1f')} | {sptxt} |")
    md += ["", "| arm | max Amax fwd | max Amax bwd | max update/weight ratio (matrices) | spikes per run (max) |",
           "|---|---|---|---|---|"]
    for a in arms:
        s = _stability(a)
        md.append(f"| {describe(a.key)} | {fmt(s['max_amax_fwd'], '.3g')} | {fmt(s['max_amax_bwd'], '.3g')} | "
                  f"{fmt(s['max_update_weight_ratio'], '.3g')} | {fmt(s['spikes_per_run'], '.1f')} "
                  f"({fmt(s['spikes_max'], 'g')}) |")
    md += ["", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(md)


