"""Faults inside one process: non-finite steps (stop and skip), a corrupt or half-written newest
checkpoint, and a checkpoint from a model of other shapes."""
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.conftest import Crash, drop_recorded_configs, interrupted_run, metrics_rows, without_measured
from train.checkpoint import CheckpointError
from train.trainer import Diverged, Trainer

COMMON = ("trainer.max_steps=8", "trainer.eval_every=4", "trainer.checkpoint_every=4")


def rows(out_dir):
    return without_measured(metrics_rows(out_dir))


def poison(trainer, bad_steps):
    """NaN activations in the forward pass of the given (1-based) steps."""
    def hook(module, args, output):
        if module.training and trainer.step + 1 in bad_steps:
            return output * float("nan")
    trainer.engine.module.embed.register_forward_hook(hook)


@pytest.fixture
def model():
    """Model overrides of the run and its reference alike (a test parametrizes it)."""
    return ()


@pytest.fixture
def reference(tiny_config, tmp_path, model):
    cfg = tiny_config(*COMMON, *model)
    cfg.out_dir = str(tmp_path / "ref")
    Trainer(cfg).fit()
    return rows(cfg.out_dir)


@pytest.mark.parametrize("policy,model", [("trainer.on_nonfinite=stop", ()), ("trainer.on_nonfinite=skip", ()),
                                          ("trainer.on_nonfinite=stop", ("model.dropout=0.1",))],
                         ids=["stop", "skip", "stop-dropout"])
def test_stop_checkpoints_the_last_good_state(tiny_config, reference, policy, model):
    """A NaN at step 6 stops the run (skip: beyond max_skipped_steps=0) with a checkpoint of step
    5; resuming it (data fixed) gives the uninterrupted trajectory: the bad update was never
    applied and nothing else moved (with dropout: the RNG is step 6's start again, not its end)."""
    cfg = tiny_config(*COMMON, *model, policy, "trainer.max_skipped_steps=0")
    trainer = Trainer(cfg)
    poison(trainer, {6})
    with pytest.raises(Diverged, match=r"diverged at step 6.*not applied.*step 5\) is checkpointed"):
        trainer.fit()
    ckpt_dir = Path(cfg.out_dir) / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000005"
    assert json.loads((Path(cfg.out_dir) / "summary.json").read_text())["status"] == "diverged"

    Trainer(cfg).fit()
    assert rows(cfg.out_dir) == reference


def test_resume_takes_the_learning_rate_of_the_new_launch(tiny_config, reference):
    cfg = tiny_config(*COMMON)
    trainer = Trainer(cfg)
    poison(trainer, {6})
    with pytest.raises(Diverged):
        trainer.fit()
    lower = tiny_config(*COMMON, f"optim.lr={cfg.optim.lr / 4}")
    Trainer(lower).fit()
    log = rows(cfg.out_dir)
    assert [r["lr"] for r in log[:5]] == [r["lr"] for r in reference[:5]]
    assert [r["lr"] for r in log[5:]] == pytest.approx([r["lr"] / 4 for r in reference[5:]], rel=1e-12)


@pytest.mark.parametrize("stage", [0, 2])
def test_skip_leaves_parameters_and_optimizer_alone(tiny_config, stage):
    cfg = tiny_config(*COMMON, "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=2",
                      f"deepspeed.zero_stage={stage}")
    trainer = Trainer(cfg)
    initial = trainer.full_state_dict()
    poison(trainer, set(range(1, 9)))
    with pytest.raises(Diverged, match="more than trainer.max_skipped_steps=2"):
        trainer.fit()
    for name, value in trainer.full_state_dict().items():
        assert torch.equal(value, initial[name]), name
    assert trainer.optimizer_state_bytes() == 0  # no optimizer step ever ran
    assert [r["skipped_steps"] for r in rows(cfg.out_dir)] == [1, 2]
    assert trainer.scheduler.last_epoch == 0  # the LR schedule waits for real steps


def test_skip_continues_past_an_isolated_bad_step(tiny_config):
    cfg = tiny_config(*COMMON, "trainer.on_nonfinite=skip")
    trainer = Trainer(cfg)
    poison(trainer, {3})
    summary = trainer.fit()
    log = rows(cfg.out_dir)
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert log[2]["loss"] is None and log[2]["grad_norm"] is None  # non-finite values are logged as null
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    assert all(r["loss"] is not None for r in log[3:])


def test_the_skip_count_survives_a_resume(tiny_config, tmp_path):
    """A step skipped before the checkpoint a run resumes from still counts: the resumed run's rows
    and summary give as many skipped steps as the uninterrupted run's (trainer.max_skipped_steps
    counts over the run, not over a launch)."""
    ref = tiny_config(*COMMON, "trainer.on_nonfinite=skip")
    ref.out_dir = str(tmp_path / "ref")
    trainer = Trainer(ref)
    poison(trainer, {2})
    summary = trainer.fit()
    assert [r["skipped_steps"] for r in rows(ref.out_dir)] == [0] + [1] * 7

    cfg = tiny_config(*COMMON, "trainer.on_nonfinite=skip")
    interrupted_run(cfg, after_step=6, prepare=lambda trainer: poison(trainer, {2}))
    resumed = Trainer(cfg).fit()  # from the checkpoint of step 4
    assert rows(cfg.out_dir) == rows(ref.out_dir)
    assert resumed["skipped_steps"] == summary["skipped_steps"] == 1


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_config, reference, caplog):
    cfg = tiny_config(*COMMON, "trainer.checkpoint_every=3")
    Trainer(cfg).fit()
    ckpts = Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]
    state = ckpts / "step_00000008" / "trainer_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    trainer = Trainer(cfg)
    trainer.fit()
    assert "step_00000008 is unusable" in caplog.text and trainer.step == 8
    assert [r["step"] for r in rows(cfg.out_dir)] == list(range(1, 9))
    assert [r["loss"] for r in rows(cfg.out_dir)] == [r["loss"] for r in reference]


def test_a_run_whose_every_checkpoint_is_unusable_is_refused_not_restarted(tiny_config, tmp_path):
    """resume=auto found checkpoints but no usable one: starting afresh would replace the run's
    metrics with a new run's. Refused before anything is written, by launch.py and by the Trainer;
    what is there stays as it was."""
    from tests.conftest import TINY, launch

    cfg = tiny_config(*COMMON, "trainer.keep_last=1")
    Trainer(cfg).fit()
    out = Path(cfg.out_dir)
    state = out / "checkpoints" / "step_00000008" / "trainer_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="none is usable.*step_00000008"):
        Trainer(cfg).fit()
    proc = launch(*TINY, *COMMON, "trainer.keep_last=1", f"out_dir={out}", f"data.cache_dir={cfg.data.cache_dir}")
    assert proc.returncode == 5 and "none is usable" in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("later", ["step_00000008", ".replaced-step_00000008"])
def test_going_back_to_an_earlier_checkpoint_sets_the_later_ones_aside(later, tiny_config):
    """trainer.resume=PATH to an earlier checkpoint of the same run starts another branch: the later
    checkpoints move to checkpoints/abandoned/ (kept; pruning by name would have deleted the one
    resumed from, and resume=auto would have gone back to the abandoned branch), a swap's copy
    cut short (.replaced-step_N) too, the rows past the checkpoint to metrics.abandoned.jsonl."""
    cfg = tiny_config(*COMMON)
    Trainer(cfg).fit()
    out = Path(cfg.out_dir)
    ckpts = out / "checkpoints"
    (ckpts / "step_00000008").rename(ckpts / later)
    old_rows = rows(out)
    branch = tiny_config(*COMMON, f"trainer.resume={ckpts / 'step_00000004'}", "trainer.max_steps=6",
                         "trainer.checkpoint_every=2", "optim.lr=1e-4")
    Trainer(branch).fit()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert [p.name for p in (ckpts / "abandoned").iterdir()] == [later]
    assert [r["step"] for r in rows(out)] == list(range(1, 7)) and rows(out)[:4] == old_rows[:4]
    abandoned = without_measured([json.loads(line) for line in (out / "metrics.abandoned.jsonl").read_text().splitlines()])
    assert abandoned == old_rows[4:]
    again = Trainer(tiny_config(*COMMON, "trainer.max_steps=6", "trainer.checkpoint_every=2", "optim.lr=1e-4"))
    again.maybe_resume()
    assert again.step == 6


def test_a_return_to_an_earlier_checkpoint_killed_during_start_up_is_completed_by_the_same_command(tiny_config):
    """Killed after the later checkpoints moved aside but before training started: the same command
    again finds nothing left to move, and the earlier branch's rows must still be kept, not dropped."""
    cfg = tiny_config(*COMMON)
    Trainer(cfg).fit()
    out = Path(cfg.out_dir)
    old_rows = rows(out)
    branch = tiny_config(*COMMON, f"trainer.resume={out / 'checkpoints' / 'step_00000004'}", "trainer.max_steps=6")
    with mock.patch("train.trainer.record_start", side_effect=Crash), pytest.raises(Crash):
        Trainer(branch).fit()
    Trainer(branch).fit()
    abandoned = without_measured([json.loads(line) for line in (out / "metrics.abandoned.jsonl").read_text().splitlines()])
    assert abandoned == old_rows[4:]
    assert [r["step"] for r in rows(out)] == list(range(1, 7)) and rows(out)[:4] == old_rows[:4]


def test_a_refused_return_to_an_earlier_checkpoint_moves_nothing(tiny_config):
    """The earlier checkpoint turns out unusable: the run stays as it was, its later checkpoints in
    place (set aside only once the earlier one has loaded)."""
    cfg = tiny_config(*COMMON)
    Trainer(cfg).fit()
    ckpts = Path(cfg.out_dir) / "checkpoints"
    state = ckpts / "step_00000004" / "trainer_state_rank0.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unusable"):
        Trainer(tiny_config(*COMMON, f"trainer.resume={ckpts / 'step_00000004'}")).fit()
    assert (ckpts / "step_00000008").is_dir() and not (ckpts / "abandoned").exists()


def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_config, reference, monkeypatch):
    """A run dying while it writes step 8 leaves a temporary directory only; resume uses step 4
    and the next save removes the leftover."""
    cfg = tiny_config(*COMMON)
    trainer = Trainer(cfg)
    save = trainer.checkpointer.save

    def dying_save(engine, step, state, *extra):
        if step == 8:
            engine.save_checkpoint(str(trainer.checkpointer.dir), tag=".tmp-step_00000008", save_latest=False)
            raise Crash
        return save(engine, step, state, *extra)
    trainer.checkpointer.save = dying_save
    with pytest.raises(Crash):
        trainer.fit()
    ckpts = Path(cfg.out_dir) / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / ".tmp-step_00000008").is_dir()

    Trainer(cfg).fit()
    assert rows(cfg.out_dir) == reference
    assert not list(ckpts.glob(".tmp-*"))


def test_resume_into_a_model_of_other_shapes_is_refused(tiny_config):
    """Refused with the reason, before the run writes anything (launch.py exits 5 on it), also
    where no config says so: a checkpoint written before checkpoints held their config."""
    interrupted_run(tiny_config(*COMMON), after_step=5)
    cfg = tiny_config(*COMMON, "model.n_layers=3")
    drop_recorded_configs(cfg.out_dir)
    written = {f: f.stat().st_mtime_ns for f in Path(cfg.out_dir).rglob("*")}
    with pytest.raises(CheckpointError, match=r"other parameter shapes \(not in the checkpoint: blocks\.2\."):
        Trainer(cfg).fit()
    assert {f: f.stat().st_mtime_ns for f in Path(cfg.out_dir).rglob("*")} == written


def test_preemption_signal_checkpoints_then_hands_over(tiny_config):
    """SIGUSR2 mid-run (SLURM's warning through submitit): the step finishes, a checkpoint is
    written, and only then the handler that was installed before the run (submitit's requeue) runs."""
    import os
    import signal

    cfg = tiny_config(*COMMON)
    trainer = Trainer(cfg)
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(
        (s, (Path(cfg.out_dir) / "checkpoints" / "latest").read_text().strip())))

    def hook(module, args, output):
        if module.training and trainer.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGUSR2)
    trainer.engine.module.embed.register_forward_hook(hook)
    try:
        summary = trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert summary["status"] == "preempted" and summary["signal"] == "SIGUSR2" and summary["steps"] == 3
    assert seen == [(signal.SIGUSR2, "step_00000003")]
    assert len(rows(cfg.out_dir)) == 3


def test_a_swap_cut_short_keeps_the_old_copy_findable(tiny_config, reference):
    """Re-saving a step moves the old copy aside before the new one takes its name; a crash in
    between leaves `.replaced-step_N`, which resume still finds."""
    cfg = tiny_config(*COMMON)
    trainer = Trainer(cfg)
    trainer.fit()
    ckpts = Path(cfg.out_dir) / "checkpoints"
    trainer.save_checkpoint()  # step 8 again: swapped in, the old copy removed
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000008"]
    real_rename = os.rename

    def killed_mid_swap(src, dst):  # the new copy never takes the name
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_rename(src, dst)

    with mock.patch("train.checkpoint.os.rename", killed_mid_swap), pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert Trainer(cfg).checkpointer.newest_valid() == ckpts / ".replaced-step_00000008"

    # killed after the new copy took the name, before the old one was removed: the new one is taken
    trainer.save_checkpoint()
    shutil.copytree(ckpts / "step_00000008", ckpts / ".replaced-step_00000008")
    assert Trainer(cfg).checkpointer.newest_valid() == ckpts / "step_00000008"


class _Engine:
    """What Checkpointer.save asks of DeepSpeed's engine, without training."""
    module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, directory, tag, save_latest):
        (Path(directory) / tag).mkdir()
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

    def zero_optimization_stage(self):
        return 0


def test_directories_that_only_look_like_checkpoints_are_left_alone(tmp_path):
    """A user's copy beside the checkpoints (step_00000004.bak, step_00000012-old) is not one of
    them: pruning keeps it, resume=auto does not take it, returning to an earlier step does not set
    it aside; the copy itself can be resumed from (its step read from its manifest), and `latest`
    then names it."""
    from train.checkpoint import Checkpointer

    ckpts = tmp_path / "checkpoints"
    saver = Checkpointer(ckpts, keep_last=2, rank=0, world_size=1)
    for step in (2, 4):
        saver.save(_Engine(), step, {})
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000004.bak")
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000012-old")
    for step in (6, 8):
        saver.save(_Engine(), step, {})
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest", "step_00000004.bak", "step_00000006", "step_00000008", "step_00000012-old"]
    assert saver.newest_valid() == ckpts / "step_00000008"
    assert saver.set_aside_after(ckpts / "step_00000004.bak") == [ckpts / "abandoned" / n
                                                                  for n in ("step_00000006", "step_00000008")]
    assert sorted(p.name for p in ckpts.iterdir()) == ["abandoned", "latest", "step_00000004.bak", "step_00000012-old"]
    assert (ckpts / "latest").read_text() == "step_00000004.bak\n"  # not the step 8 set aside
    assert saver.newest_valid() is None


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_pruning_counts_usable_checkpoints_only(keep_last, tmp_path):
    """resume=auto fell back past a damaged step 8 to step 4 and saves 6: pruning keeps 6 and the
    usable checkpoints before it (damaged ones don't count), and leaves the damaged later 8 for
    this run to write over. Pruning by name kept 8 alone at keep_last=1: no usable checkpoint left."""
    from train.checkpoint import Checkpointer

    ckpts = tmp_path / "checkpoints"
    saver = Checkpointer(ckpts, keep_last=10, rank=0, world_size=1)
    for step in (1, 2, 3, 4, 8):
        saver.save(_Engine(), step, {})
    for step in (3, 8):
        (ckpts / f"step_{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"")
    Checkpointer(ckpts, keep_last=keep_last, rank=0, world_size=1).save(_Engine(), 6, {})
    expected = {1: [6, 8], 2: [4, 6, 8], 3: [2, 3, 4, 6, 8]}[keep_last]
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s:08d}" for s in expected]
    assert Checkpointer(ckpts, 1, 0, 1).newest_valid() == ckpts / "step_00000006"


@pytest.mark.parametrize("keep_last", [1, 2])
def test_pruning_counts_a_swaps_old_copy_as_its_step(keep_last, tmp_path):
    """Step 3's new copy is damaged and its old copy (.replaced-step_3) whole: resume=auto would
    take the old copy, so pruning counts step 3 as usable and keeps that copy while step 3 is
    kept; once step 3 is older than every kept step, both copies go (none is left behind for good)."""
    from train.checkpoint import Checkpointer

    ckpts = tmp_path / "checkpoints"
    saver = Checkpointer(ckpts, keep_last=10, rank=0, world_size=1)
    for step in (1, 2, 3):
        saver.save(_Engine(), step, {})
    shutil.copytree(ckpts / "step_00000003", ckpts / ".replaced-step_00000003")
    (ckpts / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"")
    Checkpointer(ckpts, keep_last=keep_last, rank=0, world_size=1).save(_Engine(), 5, {})
    expected = {1: ["step_00000005"],
                2: [".replaced-step_00000003", "step_00000003", "step_00000005"]}[keep_last]
    assert sorted(p.name for p in ckpts.iterdir() if p.name != "latest") == expected


def test_going_back_sets_aside_every_later_step_and_a_swaps_old_copy_outlives_a_damaged_new_one(tmp_path):
    """Resuming from step 1 moves steps 2 and 3 (the very next step too) to abandoned/. A swap's old
    copy (.replaced-step_N, left by a kill between the swap's renames) is removed at the next save
    only once the new step_N is whole: beside a damaged one it is the only good copy of that step."""
    from train.checkpoint import Checkpointer

    ckpts = tmp_path / "checkpoints"
    saver = Checkpointer(ckpts, keep_last=10, rank=0, world_size=1)
    for step in (1, 2, 3):
        saver.save(_Engine(), step, {})
    assert [p.name for p in saver.set_aside_after(ckpts / "step_00000001")] == ["step_00000002", "step_00000003"]
    saver.save(_Engine(), 3, {})
    shutil.copytree(ckpts / "step_00000003", ckpts / ".replaced-step_00000003")
    (ckpts / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"")  # the new copy, damaged
    saver.save(_Engine(), 2, {})  # a later step is left alone by pruning
    assert (ckpts / ".replaced-step_00000003").is_dir()
    (ckpts / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x")  # whole again
    saver.save(_Engine(), 2, {})
    assert not (ckpts / ".replaced-step_00000003").exists()


def test_wall_time_adds_up_over_launches(tiny_config):
    """summary.json's wall_s is the run's, not its last launch's: the earlier launch's time up to
    the checkpoint resumed counts (what it spent after it was lost with it)."""
    import time

    cfg = tiny_config(*COMMON)
    trainer = Trainer(cfg)
    step = trainer.train_step

    def slow_step():
        if trainer.step == 5:
            raise Crash
        time.sleep(1.0)
        return step()
    trainer.train_step = slow_step
    with pytest.raises(Crash):
        trainer.fit()
    saved = torch.load(Path(cfg.out_dir) / "checkpoints" / "step_00000004" / "trainer_state_rank0.pt",
                       weights_only=False)["wall_s"]
    start = time.perf_counter()
    summary = Trainer(cfg).fit()
    assert saved > 4.0 and saved < summary["wall_s"] < saved + time.perf_counter() - start
