"""The report's group and run tables on run directories written by hand (tests/fake_runs.py), no
training: which runs each number counts, how it pools the seeds, and which status a run gets."""
import os

from tests.fake_runs import curve_rows, table, write_run
from train.report import load_runs, write_report

NAN = float("nan")


def config(opt: str, seed: int) -> dict:
    return {"optim": {"name": opt}, "seed": seed, "trainer": {"max_steps": 8}}


def rows(vals, probes=None, tokens_per_s=50.0):
    """A validation loss vals[i] at step 2(i+1), 100 tokens a step."""
    return curve_rows(vals, every=2, tokens_per_step=100, tokens_per_s=tokens_per_s, probes=probes)


def completed(final: float) -> dict:
    return {"status": "completed", "final_val_loss": final, "steps": 8}


def test_group_numbers_pool_the_seeds_of_completed_runs(tmp_path):
    """Each group row: seeds pooled into one group; final loss mean ± sample std over completed runs
    only (a diverged run's summary holds its last val loss, as the trainer writes it); the default
    target is the loss every completed run reached (the worst final, ≤), tokens to it the mean over
    the runs that reached it; Amax the max over runs, spikes their sum, tokens/s the mean of the
    runs' own. A run killed while diverging (no summary, NaN last row) is diverged, not running;
    a restart at the same world size is no new segment of its ranks."""
    nan_row = {"step": 5, "loss": NAN, "grad_norm": NAN, "tokens": 500, "tokens_per_s": 50.0}
    write_run(tmp_path / "m0", config("muon", 0), rows(  # Amax peaks at step 4, before its last probe
        [2.8, 2.5, 2.3, 2.0], lambda step: {"probe/amax_fwd": 4.0 if step == 4 else 1.5, "probe/spikes": int(step > 4)}),
        completed(2.0))
    write_run(tmp_path / "m1", config("muon", 1), rows(
        [2.8, 2.6, 2.2, 2.2], {"probe/amax_fwd": 2.0, "probe/spikes": 2}, tokens_per_s=100.0), completed(2.2))
    write_run(tmp_path / "m2", config("muon", 2), rows([2.8, 2.6], {"probe/amax_fwd": 9.0}) + [nan_row],
              {"status": "diverged", "final_val_loss": 2.6, "steps": 5})
    write_run(tmp_path / "a0", config("adamw", 0), rows([2.9, 2.7, 2.5, 2.4]), completed(2.4))
    write_run(tmp_path / "a1", config("adamw", 1), rows([2.9, 2.8, 2.6, 2.45]), completed(2.45))
    write_run(tmp_path / "a2", config("adamw", 2), rows([2.9, 2.8]) + [nan_row])  # killed: no summary
    write_run(tmp_path / "a3", config("adamw", 3), rows([2.9, 2.8, 2.6, 2.5]), completed(2.5),
              starts=[{"from_step": 0, "world_size": 2}, {"from_step": 4, "world_size": 2},
                      {"from_step": 6, "world_size": 1}])
    runs = {r.path.name: r for r in load_runs([tmp_path])}
    assert runs["m2"].final_val_loss is None and runs["m2"].last_val_loss == 2.6
    assert {name: r.status for name, r in runs.items() if r.status != "completed"} == {"m2": "diverged", "a2": "diverged"}
    text = write_report([tmp_path]).read_text()
    groups = table(text, "final val loss (mean ± std)")
    reach = "tokens to val loss ≤ 2.500"  # a3's final, the worst: m0 reaches it at step 4, a3 at its last
    assert groups == {
        "optim=adamw": {"group": "optim=adamw", "runs": "4", "final val loss (mean ± std)": "2.4500 ± 0.0500",
                        reach: "733 (3/4)", "max Amax fwd": "–", "max Amax bwd": "–", "spikes": "–",
                        "tokens/s": "50", "status": "3 completed, 1 diverged"},
        "optim=muon": {"group": "optim=muon", "runs": "3", "final val loss (mean ± std)": "2.1000 ± 0.1414",
                       reach: "500 (2/3)", "max Amax fwd": "9", "max Amax bwd": "–", "spikes": "3",
                       "tokens/s": "67", "status": "2 completed, 1 diverged"}}
    by_run = table(text, "ranks")
    assert by_run[f"optim=muon seed=0 (`{tmp_path / 'm0'}`)"]["max Amax fwd"] == "4"
    assert by_run[f"optim=adamw seed=3 (`{tmp_path / 'a3'}`)"]["ranks"] == "2, 1 from step 6"


def test_a_run_started_again_after_its_summary_is_running(tmp_path):
    """A preempted run requeued: environment.json records a start after summary.json was written,
    no step logged since. It is running again, not preempted; a completed run relaunched keeps its
    summary (the relaunch leaves a completed run as it was)."""
    starts = [{"from_step": 0, "world_size": 1}, {"from_step": 4, "world_size": 1}]
    for name, status in (("requeued", "preempted"), ("done", "completed")):
        path = write_run(tmp_path / name, config("adamw", 0), rows([2.9, 2.8]),
                         {"status": status, "final_val_loss": 2.8, "steps": 4}, starts)
        later = (path / "summary.json").stat().st_mtime_ns + 10**9
        os.utime(path / "environment.json", ns=(later, later))
    runs = {r.path.name: r for r in load_runs([tmp_path])}
    assert {name: r.status for name, r in runs.items()} == {"requeued": "running", "done": "completed"}
    assert runs["requeued"].final_val_loss is None and runs["done"].final_val_loss == 2.8
