"""Reading a run back (train/load.py) through the three after-training commands: a run directory
or checkpoint directory; broken inputs give one line and the README's exit status; nothing in
the run directory changes except eval/ and export/."""
import hashlib
import shutil

import pytest

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
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("model:\n", "model:\n  retention: 3\n", 1))


def _wrong_shape(run):
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("d_model: 32", "d_model: 64", 1))


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
