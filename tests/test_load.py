"""Reading a run back (train/load.py) through the three after-training commands: a run directory
or checkpoint directory; broken inputs give one line and the README's exit status; nothing in
the run directory changes except eval/ and export/."""
import hashlib
import shutil

import pytest

from tests.conftest import edit_configs
from train import evaluate, export, sample


def tree_hash(root, skip=("eval", "export")) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] not in skip}


COMMANDS = {
    "sample": lambda run: sample.main([str(run), "max_new_tokens=5"]),
    "evaluate": lambda run: evaluate.main([str(run), "max_batches=1"]),
    "export": lambda run: export.main([str(run), "--format", "hf"]),
}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_leave_the_run_alone_except_their_output(run_copy, command, capsys):
    before = tree_hash(run_copy)
    assert COMMANDS[command](run_copy) == 0
    assert tree_hash(run_copy) == before
    ckpt = next((run_copy / "checkpoints").glob("step_*"))
    assert COMMANDS[command](ckpt) == 0 or command == "export"  # export: the output directory now exists
    assert tree_hash(run_copy) == before


def _no_checkpoint(run):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()


def _truncated(run):
    f = next(run.glob("checkpoints/step_*/mp_rank_00_model_states.pt"))
    f.write_bytes(f.read_bytes()[:100])


def _garbled(run):  # same size, so the manifest matches: the reader itself must notice
    f = next(run.glob("checkpoints/step_*/mp_rank_00_model_states.pt"))
    f.write_bytes(b"\x00" * f.stat().st_size)


def _unknown_key(run):
    edit_configs(run, "model:\n", "model:\n  retention: 3\n")


def _wrong_shape(run):
    edit_configs(run, "d_model: 32", "d_model: 64")


BROKEN = {"no valid checkpoint": (_no_checkpoint, "holds no valid checkpoint"),
          "truncated": (_truncated, "holds no valid checkpoint"),
          "garbled": (_garbled, "cannot be read"),
          "config this version cannot build": (_unknown_key, "cannot be built by this version"),
          "weights that do not fit the config": (_wrong_shape, "does not fit the model")}


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("command", COMMANDS)
def test_broken_runs_give_one_line_and_status_5(run_copy, case, command, capsys):
    breaks, message = BROKEN[case]
    breaks(run_copy)
    before = tree_hash(run_copy, skip=())
    assert COMMANDS[command](run_copy) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert tree_hash(run_copy, skip=()) == before


def test_not_a_run_directory(tmp_path, capsys):
    assert sample.main([str(tmp_path / "nowhere")]) == 5
    assert "no such directory" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path)]) == 5
    assert "no checkpoints/ directory" in capsys.readouterr().err


def test_a_checkpoint_is_rebuilt_from_its_own_config_wherever_it_lies(run_copy, capsys):
    """A checkpoint set aside (checkpoints/abandoned/step_N) or copied out of its run is read with
    the config.yaml it holds: the run's may belong to a later launch, or not be there at all; its
    evaluation goes to the run above checkpoints/ (or beside the copy), never into checkpoints/."""
    ckpt = next((run_copy / "checkpoints").glob("step_*"))
    aside = run_copy / "checkpoints" / "abandoned" / ckpt.name
    aside.parent.mkdir()
    ckpt.rename(aside)
    (run_copy / "config.yaml").write_text((run_copy / "config.yaml").read_text().replace("d_model: 32", "d_model: 64", 1))
    assert evaluate.main([str(aside), "max_batches=1", "name=aside"]) == 0, capsys.readouterr().err
    assert (run_copy / "eval" / "aside.json").is_file()
    elsewhere = shutil.copytree(aside, run_copy.parent / "copies" / ckpt.name)
    assert sample.main([str(elsewhere), "max_new_tokens=3"]) == 0, capsys.readouterr().err
    assert export.main([str(elsewhere), "--format", "safetensors"]) == 0, capsys.readouterr().err
    assert (run_copy.parent / "copies" / "export" / "safetensors-fp32" / "model.safetensors").is_file()


@pytest.mark.parametrize("device", ["gpu", "meta", "cuda:7"])
def test_a_bad_device_is_refused_before_the_checkpoint_is_read(run_copy, device, capsys):
    """Checked first: consolidating a ZeRO-3 checkpoint can take minutes (here the checkpoint is
    broken too, and the device is what the error names)."""
    _truncated(run_copy)
    for command in (sample.main, evaluate.main):
        assert command([str(run_copy), f"device={device}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"device={device!r}" in err[0] and "Accepted" in err[0], err


def test_a_run_directory_with_an_equals_sign_in_its_name(trained_run, tmp_path, capsys):
    """Sweep job directories are named after their overrides (optim.lr=3e-3)."""
    run = shutil.copytree(trained_run, tmp_path / "optim.lr=3e-3")
    assert sample.main([str(run), "max_new_tokens=3"]) == 0, capsys.readouterr().err
    assert evaluate.main([str(run), "max_batches=1"]) == 0, capsys.readouterr().err
