"""Run directories written by hand, as the trainer leaves them (config.yaml, metrics.jsonl, and
summary.json / environment.json when given), and the report's markdown tables read back: the
report and study tests build their runs from these, no training."""
import json
from pathlib import Path

import yaml


def write_run(path: Path, config: dict, rows: list[dict], summary: dict | None = None,
              starts: list[dict] | None = None) -> Path:
    """A run directory; no summary is a run still going (or killed), `starts` its environment.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if starts is not None:
        (path / "environment.json").write_text(json.dumps(starts))
    return path


def arm_config(opt: str, seed: int, model: dict, lr: float = 1e-3, lr_keys=("optim.lr",), **optim) -> dict:
    """A stage-2 run's config: an arm of the optimizer study, 40 steps (`lr_keys=()`: a run that
    records none); `optim`: the optimizer's other settings."""
    study = {"stage": 2, **({"lr_keys": list(lr_keys)} if lr_keys else {})}
    return {"optim": {"name": opt, "lr": lr, **optim}, "model": model, "seed": seed, "trainer": {"max_steps": 40},
            "study": study}


def curve_rows(vals, every=10, tokens_per_step=64, tokens_per_s=640.0, probes=None):
    """Metrics rows with a validation loss vals[i] at step (i+1)·every; 0.1 s per step. `probes`:
    the probe values logged with each evaluation, a dict or a function of the step."""
    rows = []
    for step in range(1, every * len(vals) + 1):
        row = {"step": step, "loss": 3.0, "grad_norm": 1.0, "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s}
        if step % every == 0:
            row["val_loss"] = vals[step // every - 1]
            row.update((probes(step) if callable(probes) else probes) or {})
        rows.append(row)
    return rows


def table(text: str, column: str) -> dict[str, dict[str, str]]:
    """The markdown table of `text` whose header has `column`: its rows by their first cell, each
    row's cells by the header's column names."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and column in _cells(line) and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, rows = _cells(line), {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows[cells[0]] = dict(zip(header, cells))
            return rows
    raise AssertionError(f"no table with a column {column!r}")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
