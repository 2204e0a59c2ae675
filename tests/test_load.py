"""Reading a run back (train/load.py) through the three after-training commands: a run directory
or checkpoint directory; broken inputs give one line and the README's exit status; nothing in
the run directory changes except eval/ and export/."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config, edit_configs
from train import evaluate, export, sample
from train.load import EXIT_CHECKPOINT, EXIT_CONFIG, LoadError, build_from_state, load_run, locate, pick_device


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


def _checkpoint(run):
    """The run's (first) checkpoint directory."""
    return next(run.glob("checkpoints/step_*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_leave_the_run_alone_except_their_output(run_copy, command, capsys):
    before = tree_hash(run_copy)
    assert COMMANDS[command](run_copy) == 0
    assert tree_hash(run_copy) == before
    ckpt = _checkpoint(run_copy)
    assert COMMANDS[command](ckpt) == 0 or command == "export"  # export: the output directory now exists
    assert tree_hash(run_copy) == before


def _no_checkpoint(run):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()


def _truncated(run):
    f = _checkpoint(run) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])


def _garbled(run):  # same size, so the manifest matches: the reader itself must notice
    f = _checkpoint(run) / "mp_rank_00_model_states.pt"
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
    ckpt = _checkpoint(run_copy)
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


def test_weights_missing_a_layer_the_config_names_are_refused():
    """A checkpoint holding fewer layers than its config.yaml says is refused, naming what is
    missing, not read back with a randomly initialised layer in the stack."""
    from model import build_model

    torch.manual_seed(0)
    state = build_model(compose_config(["model=tiny"]).model, 256).state_dict()  # two layers
    with pytest.raises(LoadError) as refused:
        build_from_state(compose_config(["model=tiny", "model.n_layers=3"]), state, Path("ckpt"))
    assert refused.value.code == EXIT_CHECKPOINT
    assert "does not fit the model" in str(refused.value) and "Missing key(s)" in str(refused.value)
    assert '"blocks.2.' in str(refused.value) and '"blocks.1.' not in str(refused.value)  # the third layer


def _unsealed(run):
    (_checkpoint(run) / "manifest.json").unlink()


def _file_missing(run):
    manifest_path = _checkpoint(run) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"] = 123
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_unsealed, _truncated, _file_missing], ids=["no manifest", "truncated", "missing"])
def test_a_damaged_checkpoint_named_directly_is_refused_as_unusable(run_copy, damage):
    """A checkpoint directory given by name is checked against its manifest as the newest valid
    one would be: one cut short or never sealed is not read (it may load, silently, half-written)."""
    damage(run_copy)
    ckpt = _checkpoint(run_copy)
    with pytest.raises(LoadError) as refused:
        locate(ckpt)
    assert refused.value.code == EXIT_CHECKPOINT and f"checkpoint {ckpt} is unusable" in str(refused.value)


def test_an_intact_checkpoint_under_any_name_is_read(run_copy, tmp_path):
    """A sealed checkpoint copied to a folder of another name (best/) is still a checkpoint: its
    manifest says so; the run it belongs to is the folder beside it."""
    ckpt = _checkpoint(run_copy)
    best = shutil.copytree(ckpt, tmp_path / "kept" / "best")
    assert locate(best) == (tmp_path / "kept", best)
    loaded = load_run(best, tokenizer=False)
    assert (loaded.checkpoint, loaded.run_dir) == (best, tmp_path / "kept")
    assert loaded.step == json.loads((ckpt / "manifest.json").read_text())["step"]


def test_cuda_devices_are_numbered_from_zero(monkeypatch):
    """On a machine with one GPU, cuda:0 is it and cuda:1 does not exist: refused up front (status
    2, a bad argument), not when the model is moved there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cuda") == torch.device("cuda")
    with pytest.raises(LoadError) as refused:
        pick_device("cuda:1")
    assert refused.value.code == EXIT_CONFIG == 2 and "cuda:0 to cuda:0" in str(refused.value)
