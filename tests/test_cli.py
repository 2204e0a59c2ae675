"""train/cli.py: the command line of train.sample, train.evaluate and train.export is one run (or
checkpoint) directory and key=value overrides, in any order; anything else is refused in one line."""
import pytest

from train.cli import split_args
from train.load import LoadError


def test_a_sweep_jobs_directory_is_the_run_despite_its_equals_sign(tmp_path):
    """Sweep job directories are named after their overrides (optim.lr=3e-3): an existing directory
    first on the line is the run, and only the arguments after it are overrides."""
    job = tmp_path / "optim.lr=3e-3"
    job.mkdir()
    assert split_args([str(job), "max_batches=2"], "USAGE") == (str(job), ["max_batches=2"])


def test_overrides_may_come_before_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert split_args(["max_batches=2", str(run)], "USAGE") == (str(run), ["max_batches=2"])


@pytest.mark.parametrize("runs,words", [(0, "got none"), (2, "got ['")], ids=["none", "two"])
def test_exactly_one_run_directory(tmp_path, runs, words):
    dirs = [tmp_path / f"run{i}" for i in range(runs)]
    for d in dirs:
        d.mkdir()
    with pytest.raises(LoadError) as err:
        split_args([*map(str, dirs), "max_batches=2"], "USAGE")
    assert f"expected one run or checkpoint directory, {words}" in str(err.value) and "Usage: USAGE" in str(err.value)


def test_a_missing_run_directory_is_one_line_not_a_traceback(capsys):
    from train import evaluate

    assert evaluate.main(["max_batches=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: expected one run or checkpoint directory, got none") and err.count("\n") == 1
