"""Turn finished (or running) runs into a markdown report with PNG plots.

    python -m train.report DIR [DIR ...] [--out REPORT_DIR] [--target-loss X] [--x step|tokens|time]
                           [--lr] [--baseline KEY=VALUE]
    python -m train.report --diff RUN_A RUN_B

Every directory below the given ones that holds a `metrics.jsonl` is a run; runs are grouped by
the config values that differ between them (seeds aside), so a sweep over optimizer × residual
× seed gives one row per optimizer × residual with mean ± std over seeds. A key that has no effect
in a run (train/variants.py: `model.n_streams` of a plain-residual run) does not split groups.
Diverged and unfinished runs are reported as such, with their last validation loss and how far
they got, never dropped; a run resumed with settings that change its trajectory is marked.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from train.run_config import flatten  # noqa: E402
from train.study import study_sections  # noqa: E402
from train.variants import is_inert  # noqa: E402

IGNORED = ("seed", "out_dir", "logger.", "data.cache_dir", "trainer.progress", "trainer.resume")
ALIASES = {"optim.name": "optim", "model.residual": "residual"}


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    summary: dict | None
    group: str = ""
    label: str = ""
    changed: tuple = ()  # keys changed on resume that change the trajectory (environment.json)
    starts: list[dict] | None = None  # environment.json: one entry per start of the run

    @property
    def ranks(self) -> str:
        """World size per segment of the run, e.g. `2, 1 from step 300` after an elastic resume."""
        if not self.starts:
            return "–" if not self.summary else str(self.summary.get("world_size", "–"))
        segments = []
        for s in self.starts:  # a restart at the same size is not a new segment
            if not segments or segments[-1][1] != s["world_size"]:
                segments.append((s["from_step"], s["world_size"]))
        return ", ".join(f"{n}" if step == 0 else f"{n} from step {step}" for step, n in segments)

    @property
    def status(self) -> str:
        if self.summary is None:
            last = self.rows[-1] if self.rows else {}
            if any(isinstance(v, float) and not math.isfinite(v) for v in last.values()) or \
                    any(last.get(k) is None for k in ("loss", "grad_norm") if k in last):
                return "diverged"
            return "running"
        return self.summary.get("status", "completed")

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """`key` against `x`: step, tokens, or time (training seconds, summed from each step's
        tokens and tokens/s, so evaluation and restarts do not count)."""
        xs, elapsed, tokens = {}, 0.0, 0
        for r in self.rows:
            if r.get("tokens_per_s"):
                elapsed += (r["tokens"] - tokens) / r["tokens_per_s"]
            tokens = r.get("tokens", tokens)
            xs[r["step"]] = {"step": r["step"], "tokens": r.get("tokens"), "time": elapsed}[x]
        pts = [(xs[r["step"]], r[key]) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def last_val_loss(self) -> float | None:
        if self.summary and self.summary.get("final_val_loss") is not None:
            return self.summary["final_val_loss"]
        vals = self.series("val_loss")[1]
        return vals[-1] if vals else None

    @property
    def progress(self) -> str:
        """How far the run got: `step N of M`."""
        step = self.rows[-1]["step"] if self.rows else 0
        total = (self.config.get("trainer") or {}).get("max_steps")
        return f"step {step} of {total}" if total else f"step {step}"

    def max_of(self, key: str) -> float | None:
        vals = [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]
        return max(vals) if vals else None

    @property
    def final_val_loss(self) -> float | None:
        if self.summary and self.summary.get("final_val_loss") is not None and self.status == "completed":
            return self.summary["final_val_loss"]
        return None


INERT = "(inert)"


def _namespace(d: dict):
    from types import SimpleNamespace

    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def _effective(config: dict) -> dict:
    """The flattened config, each key with no effect in the run replaced by INERT."""
    flat = flatten(config)
    try:
        ns = _namespace(config)
        return {k: INERT if is_inert(k, ns) else v for k, v in flat.items()}
    except AttributeError:  # a config of an older schema: every key counts
        return flat


def _outlived(summary: dict, rows: list[dict], path: Path) -> bool:
    """Whether the run started again after it wrote `summary`: its log went past the summary's step,
    or (not a completed run, which a relaunch leaves as it was) environment.json records a later start."""
    if rows and rows[-1].get("step", 0) > summary.get("steps", math.inf):
        return True
    env, written = path / "environment.json", path / "summary.json"
    return summary.get("status") != "completed" and env.exists() and env.stat().st_mtime_ns > written.stat().st_mtime_ns


def load_runs(dirs: list[Path]) -> list[Run]:
    runs = []
    for d in dirs:
        for metrics in sorted(Path(d).rglob("metrics.jsonl")):
            path = metrics.parent
            rows = []
            for line in metrics.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break  # cut short by a kill
            config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
            summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
            if summary is not None and _outlived(summary, rows, path):
                summary = None  # an earlier launch's: the run went on (requeued, resumed after a divergence)
            runs.append(Run(path, config, rows, summary))
    for run in runs:
        env = run.path / "environment.json"
        run.starts = json.loads(env.read_text()) if env.exists() else None
        run.changed = tuple(sorted({k for s in run.starts or () for k in s.get("changed", {})}))
    flat = [_effective(r.config) for r in runs]
    common = set.intersection(*(set(f) for f in flat)) if flat else set()  # keys of older schemas aside
    # a key splits groups when the runs in which it has an effect disagree on it
    varying = sorted((k for k in common if not k.startswith(IGNORED) and len({f[k] for f in flat} - {INERT}) > 1),
                     key=lambda k: (k not in ALIASES, list(ALIASES).index(k) if k in ALIASES else 0, k))
    for run, f in zip(runs, flat):
        short = {ALIASES.get(k, k): f.get(k) for k in varying if f.get(k) != INERT}
        run.group = ", ".join(f"{k}={v}" for k, v in short.items()) or "all runs"
        run.label = f"{run.group} seed={f.get('seed')}" if len(runs) > 1 else run.path.name
    return runs


def tokens_to_reach(run: Run, target: float) -> int | None:
    return next((r["tokens"] for r in run.rows if r.get("val_loss") is not None and r["val_loss"] <= target), None)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def _fmt(x, spec=".3g") -> str:
    return "–" if x is None else format(x, spec)


def group_table(runs: list[Run], target: float) -> str:
    groups = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    lines = [f"| group | runs | final val loss (mean ± std) | tokens to val loss ≤ {target:.3f} | max Amax fwd | "
             "max Amax bwd | spikes | tokens/s | status |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(groups.items()):
        finals = [r.final_val_loss for r in rs if r.final_val_loss is not None]
        reach = [t for t in (tokens_to_reach(r, target) for r in rs) if t is not None]
        fwd = [v for v in (r.max_of("probe/amax_fwd") for r in rs) if v is not None]
        bwd = [v for v in (r.max_of("probe/amax_bwd") for r in rs) if v is not None]
        spikes = [v for v in (r.max_of("probe/spikes") for r in rs) if v is not None]
        tps = [statistics.mean(r.series("tokens_per_s")[1]) for r in rs if r.series("tokens_per_s")[1]]
        status = ", ".join(f"{n} {s}" for s, n in sorted(_count(r.status for r in rs).items()))
        lines.append(
            f"| {name} | {len(rs)} | {_mean_std(finals)} | "
            f"{f'{statistics.mean(reach):,.0f} ({len(reach)}/{len(rs)})' if reach else 'not reached'} | "
            f"{_fmt(max(fwd) if fwd else None)} | {_fmt(max(bwd) if bwd else None)} | "
            f"{_fmt(sum(spikes) if spikes else None, 'g')} | {_fmt(statistics.mean(tps) if tps else None, ',.0f')} | {status} |"
        )
    return "\n".join(lines)


def _count(items) -> dict:
    out = defaultdict(int)
    for i in items:
        out[i] += 1
    return out


def evaluations(run: Run) -> str:
    """`python -m train.evaluate` results of the run (eval/*.json): name, loss and bits per byte."""
    found = []
    for f in sorted((run.path / "eval").glob("*.json")):
        try:
            e = json.loads(f.read_text())
        except ValueError:
            continue
        bpb = e.get("bits_per_byte")
        found.append(f"{e.get('name', f.stem)}: {e['loss']:.4f}" + (f" ({bpb:.3f} bpb)" if bpb is not None else ""))
    return "<br>".join(found) or "–"


def run_table(runs: list[Run]) -> str:
    lines = ["| run | status | steps | tokens | ranks | parameters (active) | FLOPs/token | val loss | evaluations (loss) | "
             "max Amax fwd | max Amax bwd | spikes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        last, s = (r.rows[-1] if r.rows else {}), (r.summary or {})
        params = f"{_fmt(s.get('n_params'), ',')} ({_fmt(s.get('n_active_params'), ',')})"
        status = f"**{r.status}**" + (f", {r.progress}" if r.status != "completed" else "") + \
            (f", resumed with changes ({', '.join(r.changed)})" if r.changed else "")
        val = _fmt(r.final_val_loss, ".4f") if r.status == "completed" or r.last_val_loss is None else \
            f"{r.last_val_loss:.4f} (last, {r.progress})"
        lines.append(f"| {r.label} (`{r.path}`) | {status} | {last.get('step', 0)} | {last.get('tokens', 0):,} | "
                     f"{r.ranks} | {params} | {_fmt(s.get('flops_per_token'), '.3g')} | "
                     f"{val} | {evaluations(r)} | {_fmt(r.max_of('probe/amax_fwd'))} | "
                     f"{_fmt(r.max_of('probe/amax_bwd'))} | {_fmt(r.max_of('probe/spikes'), 'g')} |")
    return "\n".join(lines)


def _colors(runs: list[Run]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10")
    return {g: cmap(i % 10) for i, g in enumerate(sorted({r.group for r in runs}))}


XLABELS = {"step": "step", "tokens": "tokens", "time": "training time (s)"}


def plot(runs: list[Run], out: Path, key: str, title: str, ylabel: str, log: bool = False, name: str = "",
         x_axis: str = "step") -> str | None:
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn, labelled = False, set()
    for r in runs:
        x, y = r.series(key, x_axis)
        if not x:
            continue
        drawn = True
        label = r.group if r.group not in labelled else None
        labelled.add(r.group)
        style = "--" if r.status == "diverged" else "-"
        ax.plot(x, y, style, color=colors[r.group], label=label + (" (diverged)" if r.status == "diverged" and label else "")
                if label else None, alpha=0.8, marker="o" if len(x) < 30 else None, markersize=3)
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel=XLABELS[x_axis], ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    file = out / f"{name or key.replace('/', '_')}.png"
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file.name


def plot_depth(runs: list[Run], out: Path) -> str | None:
    """Composite forward gain against depth, from each run's last probe."""
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn, labelled = False, set()
    for r in runs:
        probed = [row for row in r.rows if "probe/amax_fwd_depth/sublayer0" in row]
        if not probed:
            continue
        last = probed[-1]
        depth = sorted(int(k.rsplit("sublayer", 1)[1]) for k in last if k.startswith("probe/amax_fwd_depth/"))
        ax.plot([d + 1 for d in depth], [last[f"probe/amax_fwd_depth/sublayer{d}"] for d in depth], "-o", markersize=3,
                color=colors[r.group], label=r.group if r.group not in labelled else None)
        labelled.add(r.group)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="Composite Amax gain (forward) vs depth, last probe", xlabel="sublayers composed", ylabel="gain")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "amax_vs_depth.png", dpi=110)
    plt.close(fig)
    return "amax_vs_depth.png"


def write_report(dirs: list[Path], out: Path | None = None, target: float | None = None, x_axis: str = "step",
                 lr: bool = False, baseline: str | None = None) -> Path:
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit(f"error: no run (a directory with metrics.jsonl) under {', '.join(map(str, dirs))}")
    out = out or Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    finals = [r.final_val_loss for r in runs if r.final_val_loss is not None]
    if target is None:  # the loss every completed run reached: compares how fast each got there
        target = max(finals) if finals else min((v for r in runs for v in r.series("val_loss")[1]), default=0.0)
    x = {"x_axis": x_axis}
    figures = [
        plot(runs, out, "loss", "Training loss", "loss", **x),
        plot(runs, out, "val_loss", "Validation loss", "loss", **x),
        plot(runs, out, "grad_norm", "Gradient norm", "‖g‖", log=True, **x),
        plot(runs, out, "probe/amax_fwd", f"Composite Amax gain (forward) vs {x_axis}", "gain", log=True, **x),
        plot(runs, out, "probe/amax_bwd", f"Composite Amax gain (backward) vs {x_axis}", "gain", log=True, **x),
        plot_depth(runs, out),
        plot(runs, out, "probe/update_weight_ratio/matrix", "Update/weight ratio, hidden matrices", "ratio", log=True,
             **x),
        plot(runs, out, "probe/max_logit", "Max attention logit", "logit", **x),
    ]
    md = [f"# Run report\n\n{len(runs)} run(s) from {', '.join(f'`{d}`' for d in dirs)}.\n",
          "## Groups\n", group_table(runs, target), "\n## Runs\n", run_table(runs), "\n## Plots\n"]
    md += [f"![{f}]({f})\n" for f in figures if f]
    md += study_sections(runs, out, dirs, lr=lr, baseline=baseline)  # lr sweeps and tuned comparisons
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def config_diff(a: Path, b: Path) -> str:
    """The config keys whose values differ between runs `a` and `b`, one `key: A -> B` per line;
    keys with no effect in a run say so."""
    def load(run: Path) -> dict:
        path = Path(run) / "config.yaml"
        if not path.is_file():
            raise SystemExit(f"error: {run} holds no config.yaml (not a run directory)")
        return yaml.safe_load(path.read_text())
    ca, cb = load(a), load(b)
    fa, fb, ea, eb = flatten(ca), flatten(cb), _effective(ca), _effective(cb)

    def shown(flat, eff, k):
        return "(absent)" if k not in flat else f"{flat[k]!r}" + (" (inert)" if eff[k] == INERT else "")
    lines = [f"{k}: {shown(fa, ea, k)} -> {shown(fb, eb, k)}" for k in sorted(set(fa) | set(fb))
             if k != "out_dir" and fa.get(k, INERT + "a") != fb.get(k, INERT + "b")]
    return "\n".join(lines) if lines else "the two runs' configs are the same (out_dir aside)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="where report.md and the PNGs go (default: the first DIR)")
    ap.add_argument("--target-loss", type=float, default=None, help="val loss for 'tokens to reach'")
    ap.add_argument("--x", choices=tuple(XLABELS), default="step", help="the plots' horizontal axis")
    ap.add_argument("--diff", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                    help="print the config keys that differ between two runs, and nothing else")
    ap.add_argument("--lr", action="store_true", help="learning-rate view: loss vs lr per curve, best lr, lr_sweep.json")
    ap.add_argument("--baseline", default=None, metavar="KEY=VALUE",
                    help="stage-2 arm the others are measured against (default optim=adamw, else residual=residual)")
    args = ap.parse_args()
    if args.diff:
        print(config_diff(*args.diff))
        return
    if not args.dirs:
        ap.error("give the run or sweep directories to report on, or --diff RUN_A RUN_B")
    print(write_report(args.dirs, args.out, args.target_loss, args.x, lr=args.lr, baseline=args.baseline))


if __name__ == "__main__":
    main()
