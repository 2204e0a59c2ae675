"""`python launch.py` as a user runs it: exit status, every file CONTRACT.md lists, their keys (the slow
end-to-end tests); and train/run.py's handling of a sweep's jobs, in process."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, launch, launch_env, metrics_rows
from train import run

SMOKE = ["experiment=smoke", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3"]
STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem/peak_gb"}
SUMMARY_KEYS = {"final_val_loss", "steps", "tokens", "tokens_per_s", "wall_s", "probe/amax_fwd", "probe/amax_bwd", "mfu",
                "mem/peak_gb"}


def check_run_files(out, steps):
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["out_dir"] == str(out) and "${" not in (out / "config.yaml").read_text()
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(STEP_KEYS <= r.keys() for r in rows)
    assert all(("val_loss" in r) == (r["step"] % 3 == 0) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and summary["steps"] == steps
    assert summary["final_val_loss"] == rows[-1]["val_loss"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    return rows, summary


@pytest.mark.slow
def test_launch_writes_every_contract_file(tmp_path):
    out = tmp_path / "run"
    proc = launch(*SMOKE, f"out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = check_run_files(out, 6)
    assert summary["tokens"] == 6 * 8 * 64
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run directory"
    assert "final validation loss" in proc.stdout and str(out / "metrics.jsonl") in proc.stdout

    # Launching the finished run again resumes at its end: nothing retrained, nothing lost, the
    # summary the run wrote kept (a re-evaluation at the end would report only this idle start).
    again = launch(*SMOKE, f"out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "logger.wandb.mode=disabled",
                   "trainer.eval_batches=1")
    assert again.returncode == 0, again.stderr[-3000:]
    rows2, summary2 = check_run_files(out, 6)
    assert rows2 == rows and summary2 == summary


@pytest.mark.slow
def test_launch_two_local_ranks_match_one_rank_on_the_default_batch(tmp_path, data_cache):
    """The README's `launcher.nproc_per_node=2` on the default global batch (16): every contract
    file, each rank's state in the checkpoint, and auto micro-batches of 8 per rank training the
    trajectory of one rank's 16."""
    from tests.conftest import compose_config
    from train.trainer import Trainer

    default = compose_config([]).trainer  # the batch the README's command gets, set here on top of smoke
    assert (default.micro_batch_size, default.global_batch_size) == ("auto", 16)
    common = [*SMOKE, "trainer.micro_batch_size=auto", "trainer.global_batch_size=16", "logger.wandb.mode=disabled",
              "trainer.progress=false"]
    out = tmp_path / "run2"
    proc = launch(*common, "launcher.nproc_per_node=2", f"out_dir={out}", f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, summary = check_run_files(out, 6)
    assert summary["world_size"] == 2 and summary["micro_batch_size"] == 8
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000006").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt", "trainer_state_rank1.pt"]
    cfg = compose_config(common, out_dir=tmp_path / "one", cache_dir=data_cache)
    assert Trainer(cfg).fit()["micro_batch_size"] == 16
    one, _ = check_run_files(tmp_path / "one", 6)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_runs_the_others_then_exits_non_zero(tmp_path, data_cache):
    """Job 0's resume is refused (its out_dir holds a checkpoint of a model of another width); job 1
    still runs. Locally the sweep ends with the refusal's exit status and a line naming the failed
    job; through submitit (each job a process of its own) the failure reaches the sweep through
    Hydra, which exits non-zero once every job has run."""
    sweep = tmp_path / "sweep"
    common = ["-m", *SMOKE, "trainer.max_steps=2", f"out_dir={sweep}", f"data.cache_dir={data_cache}"]
    assert launch(*common, "seed=0").returncode == 0
    before = (sweep / "0" / "summary.json").read_text()
    proc = launch(*common, "seed=0,1", "model.d_model=48")
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert f"1 job(s) of the sweep failed, each with its error above: {sweep / '0'} (exit 5)" in proc.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["steps"] == 2
    assert (sweep / "0" / "summary.json").read_text() == before  # the refused job's run is untouched

    shutil.rmtree(sweep / "1")  # job 1 trains again through submitit
    proc = launch(*common, "seed=0,1", "model.d_model=48", "hydra/launcher=submitit_local")
    assert proc.returncode != 0 and "job 0" in proc.stderr and "failed with exit status 5" in proc.stderr, \
        proc.stderr[-3000:]
    assert json.loads((sweep / "1" / "summary.json").read_text())["steps"] == 2
    assert (sweep / "0" / "summary.json").read_text() == before


CRASH_THEN_STOP = """
import os, runpy, signal, sys
from train.trainer import Trainer
fit = Trainer.fit
def fit_or_fail(self, stop=None):
    if self.cfg.seed == 0:
        raise RuntimeError("a bug in job 0")
    if self.cfg.seed == 1:  # a stop signal arrives during job 1
        step = self.train_step
        def stopping_step():
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step()
        self.train_step = stopping_step
    return fit(self, stop)
Trainer.fit = fit_or_fail
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_local_sweep_survives_a_crashing_job_and_stops_whole_on_a_signal(tmp_path, data_cache):
    """Job 0 raises (a bug, not a refusal): job 1 still runs, and the sweep exits non-zero naming
    job 0 (Hydra re-raised the first exception once all had run, hiding the other jobs' exit
    statuses). SIGTERM during job 1 checkpoints it and ends the sweep: job 2 does not start (each job
    installed its own handler, so a signal stopped one job and the next one began)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-c", CRASH_THEN_STOP, "-m", *SMOKE, "seed=0,1,2", f"out_dir={sweep}",
                           f"data.cache_dir={data_cache}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=launch_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: a bug in job 0" in proc.stderr
    assert f"1 job(s) of the sweep failed, each with its error above: {sweep / '0'} (exit 1)" in proc.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "preempted"
    assert f"the sweep was stopped by SIGTERM: 1 job(s) not started ({sweep / '2'})" in proc.stderr
    assert not (sweep / "2" / "summary.json").exists()


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_out_dir(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    proc = launch("-m", *SMOKE, "trainer.max_steps=3", "seed=0,1", "logger.wandb.mode=offline",
                  f"out_dir={sweep}", f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        cfg = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert cfg["seed"] == seed and cfg["out_dir"] == str(sweep / job)
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["steps"] == 3
        # grouped in wandb by the sweep directory, named by the job's overrides, which the files carry
        # (Hydra keeps one value per key: max_steps=3 replaces the 6 in SMOKE, in its place)
        named = ["experiment=smoke", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.checkpoint_every=3",
                 f"seed={seed}"]
        job_overrides = [*named, f"data.cache_dir={data_cache}"]
        assert cfg["logger"]["wandb"]["group"] == "sweep" and cfg["logger"]["wandb"]["name"] == ",".join(named)
        assert summary["overrides"] == job_overrides
        rows = metrics_rows(sweep / job)
        assert all(r["overrides"] == job_overrides for r in rows)


# -- a sweep's jobs, in process (Hydra's state as it sets it for job `num` of a local sweep) ---------------
@pytest.fixture
def sweep_job(tmp_path, monkeypatch):
    """Set HydraConfig for job `num` of a sweep into tmp_path/sweep; returns the job's config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from train.preflight import _compose

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    for name in ("FAILED_JOBS", "STOPPED", "SKIPPED_JOBS"):
        monkeypatch.setattr(run, name, [])

    def make(overrides, num):
        cfg = _compose("config", [*overrides, f"out_dir={tmp_path / 'sweep'}"])
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, num
            cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / str(num))
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg
    return make


def test_a_sweep_exits_with_its_first_failed_jobs_status(monkeypatch, capsys):
    monkeypatch.setattr(run, "FAILED_JOBS", [("sweep/0", 5), ("sweep/1", 1)])
    monkeypatch.setattr(run, "SKIPPED_JOBS", [])
    with pytest.raises(SystemExit) as exit_:
        run.exit_if_jobs_failed()
    assert exit_.value.code == 5
    assert "2 job(s) of the sweep failed, each with its error above: sweep/0 (exit 5); sweep/1 (exit 1)" in \
        capsys.readouterr().err


def test_a_sweep_job_keeps_the_wandb_group_the_command_line_sets(sweep_job):
    """Only an unset group becomes the sweep directory's name."""
    cfg = run.typed_config(sweep_job(["logger.wandb.mode=offline", "logger.wandb.group=my_study", "seed=1"], 1))
    assert run.name_sweep_job(cfg, ["logger.wandb.group=my_study", "seed=1"]) == ["logger.wandb.name='seed=1'"]
    assert cfg.logger.wandb.group == "my_study"
    cfg = run.typed_config(sweep_job(["logger.wandb.mode=offline", "seed=1"], 1))
    assert run.name_sweep_job(cfg, ["seed=1"]) == ["logger.wandb.group='sweep'", "logger.wandb.name='seed=1'"]


def test_a_job_not_started_after_a_stop_signal_leaves_no_directory(sweep_job):
    """Hydra made the job's directory before calling it; the sweep's next run must not take it for a run."""
    cfg = sweep_job(["seed=2"], 2)
    out = Path(run.HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True)
    run.STOPPED.append("SIGTERM")
    run.main(cfg)
    assert run.SKIPPED_JOBS == [str(out)] and not out.exists()
