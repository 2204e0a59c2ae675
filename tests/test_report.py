"""The report renders from a sweep, lists every run, and labels a diverged run."""
import json

import pytest

from tests.conftest import launch, metrics_rows
from train.report import load_runs, write_report

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("report")]  # one worker trains the module's runs once


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("sweep")
    proc = launch("-m", "experiment=smoke", "optim=adamw,muon", "model.residual=residual,mhc", "model.n_streams=2",
                  "trainer.max_steps=6", "trainer.eval_every=3", "probes.every=3", "logger.wandb.mode=disabled",
                  f"out_dir={root / 'sweep'}", f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sweep"


def test_report_renders_every_run_of_a_2x2_sweep(sweep):
    report = write_report([sweep])
    text = report.read_text()
    runs = load_runs([sweep])
    assert len(runs) == 4 and len({r.group for r in runs}) == 4
    for r in runs:
        assert str(r.path) in text
        n = r.summary["n_params"]
        assert f"{n:,} ({r.summary['n_active_params']:,})" in text  # total and active parameters
    for group in ("optim=adamw, residual=mhc", "optim=muon, residual=residual"):
        assert group in text
    for png in ("loss.png", "val_loss.png", "grad_norm.png", "probe_amax_fwd.png", "amax_vs_depth.png",
                "probe_update_weight_ratio_matrix.png"):
        assert (sweep / png).stat().st_size > 1000 and f"]({png})" in text


def cells(text: str, first: str) -> list[str]:
    """The cells of the one table row of `text` whose first cell starts with `first`."""
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {first}")]
    return [c.strip() for c in row.strip("|").split("|")]


def named_cells(text: str, first: str) -> dict[str, str]:
    """That row's cells by the column names of its table's header (the line above `|---|`)."""
    lines = text.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith(f"| {first}")]
    while not lines[i - 1].startswith("|---"):
        i -= 1
    return dict(zip([c.strip() for c in lines[i - 2].strip("|").split("|")], cells(text, first)))


def test_report_numbers_are_the_runs_own(sweep):
    """Each run's row and its (one-run) group's row against the run's summary.json and metrics."""
    text = write_report([sweep]).read_text()
    runs = load_runs([sweep])
    for r in runs:
        s = json.loads((r.path / "summary.json").read_text())
        row = named_cells(text, f"{r.label} (`{r.path}`)")
        amax = [format(s["probe/amax_fwd"], ".3g"), format(s["probe/amax_bwd"], ".3g")]
        assert [row[k] for k in ("status", "steps", "tokens", "ranks")] == \
               ["**completed**", str(s["steps"]), f"{s['tokens']:,}", str(s["world_size"])]
        assert row["val loss"] == f"{s['final_val_loss']:.4f}"
        assert [row["max Amax fwd"], row["max Amax bwd"]] == amax
        group = cells(text, f"{r.group} |")
        tps = [row["tokens_per_s"] for row in metrics_rows(r.path)]
        assert group[1] == "1" and group[2] == f"{s['final_val_loss']:.4f}"
        assert group[4:6] == amax and group[7] == f"{sum(tps) / len(tps):,.0f}"


def test_diverged_and_running_runs_are_labelled(sweep, tmp_path):
    import shutil
    diverged, running = tmp_path / "diverged", tmp_path / "running"
    shutil.copytree(sweep / "0", diverged)
    shutil.copytree(sweep / "1", running)
    summary = json.loads((diverged / "summary.json").read_text())
    (diverged / "summary.json").write_text(json.dumps({**summary, "status": "diverged", "final_val_loss": None}))
    (running / "summary.json").unlink()
    text = write_report([tmp_path]).read_text()
    assert "**diverged**" in text and "**running**" in text and "1 diverged" in text


def test_a_run_started_again_is_not_reported_by_its_old_summary(sweep, tmp_path):
    """A preempted run requeued, or a diverged one resumed at a lower lr, trains again while the
    summary of its earlier launch is still there: it is running, its last val loss the log's."""
    import os
    import shutil
    requeued, resumed = tmp_path / "requeued", tmp_path / "resumed"
    for src, dst, status in ((sweep / "0", requeued, "preempted"), (sweep / "1", resumed, "diverged")):
        shutil.copytree(src, dst)
        summary = json.loads((dst / "summary.json").read_text())
        rows = metrics_rows(dst)
        summary = {**summary, "status": status, "steps": rows[-2]["step"], "final_val_loss": 9.0}
        (dst / "summary.json").write_text(json.dumps(summary))
    env = requeued / "environment.json"  # started again, no step logged since
    lines = (requeued / "metrics.jsonl").read_text().splitlines()
    (requeued / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    later = (requeued / "summary.json").stat().st_mtime_ns + 10**9
    os.utime(env, ns=(later, later))
    runs = {r.path.name: r for r in load_runs([tmp_path])}
    assert runs["requeued"].status == "running" and runs["resumed"].status == "running"
    assert runs["resumed"].last_val_loss != 9.0
    text = write_report([tmp_path]).read_text()
    assert "**preempted**" not in text and "**diverged**" not in text


def test_report_on_a_single_run(sweep, tmp_path):
    text = write_report([sweep / "2"], out=tmp_path).read_text()
    assert "1 run(s)" in text and "completed" in text
