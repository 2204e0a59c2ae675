"""Sweep-safe configuration: no override is silently dropped, ignored or changed, and every run
says what it ran (issue #15). Each test of the first block failed before the change."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import compose_config, interrupted_run, launch, metrics_rows, without_measured
from tests.fake_runs import write_run
from train.batch import micro_batch_size
from train.checkpoint import CheckpointError
from train.config import TrainerConfig
from train.manifest import seal
from train.preflight import check
from common.errors import ConfigError


def refused(tmp_path, *args) -> str:
    """Launch in an empty working directory; the launch must be refused with one line, exit 2,
    and leave the directory empty."""
    proc = launch(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid configuration ") and "Accepted: " in lines[0]
    assert not list(tmp_path.iterdir()), f"the refused launch left {list(tmp_path.iterdir())}"
    return lines[0]


# -- the list, one test each ---------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["+trainer.foo=1"], "trainer has no key 'foo'"),
    (["++trainer.foo=1"], "trainer has no key 'foo'"),
    (["optim.lrr=1e-3"], "did you mean optim.lr"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc': wrong type. Accepted: an integer"),
    (["data.path=/tmp"], "unless data.source=files. Accepted: add data.source=files"),
], ids=["+unknown", "++unknown", "typo", "type", "inert"])
def test_bad_override_exits_2_with_one_line_and_leaves_nothing(args, words, tmp_path):
    assert words in refused(tmp_path, *args)


def test_dry_run_in_an_empty_directory_leaves_it_empty(tmp_path):
    proc = launch("launcher.dry_run=true", "launcher.nproc_per_node=2", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "torch.distributed.run" in proc.stdout, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_resume_with_changed_max_steps_prints_the_diff_and_keeps_both_configs(tiny_config, caplog):
    from train.trainer import Trainer

    cfg = tiny_config("trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=0")
    interrupted_run(cfg, after_step=3)
    cfg.trainer.max_steps = 8
    with caplog.at_level("WARNING"):
        Trainer(cfg).fit()
    assert "trainer.max_steps: 6 -> 8" in caplog.text
    out = Path(cfg.out_dir)
    first, second = (yaml.safe_load((out / "configs" / f"start_{i:03d}.yaml").read_text()) for i in (0, 1))
    assert first["trainer"]["max_steps"] == 6 and second["trainer"]["max_steps"] == 8
    starts = json.loads((out / "environment.json").read_text())
    assert starts[0]["changed"] == {} and starts[1]["changed"] == {"trainer.max_steps": [6, 8]}
    from train.report import load_runs, run_table
    assert "resumed with changes (trainer.max_steps)" in run_table(load_runs([out]))


def test_resume_with_changed_model_shape_is_refused(tiny_config):
    from train.run_config import check_resume
    from train.trainer import Trainer

    cfg = tiny_config("trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=0")
    interrupted_run(cfg, after_step=3)
    ckpt = Path(cfg.out_dir) / "checkpoints" / "step_00000002"
    cfg.model.d_model, cfg.seed = 64, 5
    with pytest.raises(CheckpointError, match=r"model.d_model: 32 -> 64, seed: 0 -> 5"):
        check_resume(cfg, ckpt, 1)
    with pytest.raises(CheckpointError, match="model.d_model"):  # the trainer refuses before loading
        Trainer(cfg).fit()


@pytest.mark.parametrize("change,frozen", [
    ("optim.decay_embeddings=true", True), ("model.attn.indexer_warmup=all", True),
    ("model.attn.indexer_warmup_steps=0", True), ("model.attn.indexer_warmup_steps=200", False),
    ("trainer.peak_tflops=1.0", False)])
def test_resume_refuses_changes_of_the_optimizers_parameter_groups(change, frozen):
    """A checkpoint's optimizer state is one entry per parameter group: what moves parameters between
    groups (decayed embeddings, an indexer-only warm-up splitting every group) cannot change under
    it, the warm-up's length can."""
    from dataclasses import asdict

    from train.run_config import resume_changes

    base = ["model=v4_tiny", "optim=muon"]
    found, trajectory, neutral = resume_changes(asdict(compose_config(base)), compose_config([*base, change]),
                                                1, 1, None, 1)
    key = change.split("=")[0]
    assert (key in found) == frozen and (key in {**trajectory, **neutral}) != frozen


def test_resume_at_another_world_size_and_micro_batch_is_not_refused(tiny_config, caplog):
    """The world size and the micro-batch are not frozen under a checkpoint (it is resharded:
    tests/test_elastic.py): both differences are logged, and neither counts as a trajectory change."""
    from train.run_config import check_resume

    cfg = tiny_config("trainer.micro_batch_size=auto", "trainer.max_steps=6", "trainer.checkpoint_every=2",
                      "trainer.eval_every=0")
    interrupted_run(cfg, after_step=3)
    cfg.launcher.nproc_per_node = 2
    with caplog.at_level("WARNING"):
        assert check_resume(cfg, Path(cfg.out_dir) / "checkpoints" / "step_00000002", 2, log_changes=True) == {}
    assert "world size (launcher.nnodes × launcher.nproc_per_node): 1 -> 2" in caplog.text
    assert "micro-batch per rank (trainer.micro_batch_size, resolved): 8 -> 4" in caplog.text
    assert "launcher.nproc_per_node: 1 -> 2" in caplog.text


@pytest.mark.parametrize("old,new,expected", [
    (["data.seq_len=64"], ["data.seq_len=128"], ({"data.seq_len": (64, 128)}, {}, {})),  # the data's windows
    # the micro-batch as written: the resolved one is compared on its own
    (["trainer.micro_batch_size=8"], ["trainer.micro_batch_size=4"], ({}, {}, {"trainer.micro_batch_size": (8, 4)})),
    # inert before, live now: the floor changes with the schedule
    (["optim.schedule=constant", "optim.min_lr_ratio=0.1"], ["optim.schedule=cosine", "optim.min_lr_ratio=0.5"],
     ({}, {"optim.min_lr_ratio": (0.1, 0.5), "optim.schedule": ("constant", "cosine")}, {})),
    (["optim.schedule=constant", "optim.min_lr_ratio=0.1"], ["optim.schedule=constant", "optim.min_lr_ratio=0.5"],
     ({}, {}, {})),  # inert in both
], ids=["frozen", "neutral", "inert before", "inert in both"])
def test_resume_sorts_each_difference_as_frozen_trajectory_or_neutral(old, new, expected):
    from dataclasses import asdict

    from train.run_config import resume_changes

    same = "out_dir=run"  # the default is the launch's time
    assert resume_changes(asdict(compose_config([*old, same])), compose_config([*new, same]), 1, 1, None, 1) == expected


def test_a_checkpoint_is_compared_with_its_own_config_not_the_runs_latest(tmp_path):
    """The run's config.yaml is its latest start's, which may have been killed before its first
    checkpoint: a checkpoint's own config is what it was trained with."""
    from train.run_config import saved_config

    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.001}}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.002}}))
    assert saved_config(ckpt) == {"optim": {"lr": 0.001}}
    (ckpt / "config.yaml").unlink()  # a checkpoint from before checkpoints held their config
    assert saved_config(ckpt) == {"optim": {"lr": 0.002}}


def test_the_recorded_config_marks_a_nested_inert_key():
    from train.run_config import to_yaml

    text = to_yaml(compose_config(["optim=muon"]), ["optim.ns_steps"])
    assert [line for line in text.splitlines() if "inert" in line] == ["  ns_steps: 5  # inert: no effect in this run"]


def test_a_sweep_run_again_with_other_values_in_the_same_out_dir_is_refused(tmp_path):
    """Jobs resume out_dir/<job number>: a sweep of seed=1,2 over a directory whose job 0 trained
    seed 0 would continue that run as seed 1. Refused before anything starts; the same values, or
    values that only extend the sweep, go ahead."""
    from omegaconf import OmegaConf

    job0 = tmp_path / "0"
    job0.mkdir()
    (job0 / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_config(["seed=0"]))))
    with pytest.raises(ConfigError) as err:
        check(["-m", "seed=1,2", f"out_dir={tmp_path}"])
    assert err.value.key == "seed" and "trained with seed=0" in str(err.value) and "\n" not in str(err.value)
    assert check(["-m", "seed=0,2", f"out_dir={tmp_path}"]) is None
    assert check(["-m", "seed=1,2", f"out_dir={tmp_path}", "trainer.resume=never"]) is None  # nothing is continued
    ckpt = tmp_path / "pretrained" / "step_00000004"  # each job starts from this one, not from its directory's run
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    seal(ckpt, step=4, world_size=1)
    assert check(["-m", "seed=1,2", f"out_dir={tmp_path}", f"trainer.resume={ckpt}"]) is None


def record_sweep(args: list[str]) -> None:
    """Each job's config.yaml as its run records it (after its study stage), without training."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from train.preflight import jobs, typed
    from train.study import apply_study

    for i, (_, composed) in enumerate(jobs(OverridesParser.create().parse_overrides(args), args, True, "config")):
        cfg = typed(composed, i)
        apply_study(cfg)
        Path(cfg.out_dir).mkdir(parents=True)
        (Path(cfg.out_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


@pytest.mark.parametrize("first,again,refused", [
    (["experiment=lr_sweep", "optim.lr=1e-3,3e-3", "study.lr_grid='range(-1,2)'"], None, None),  # lr set per job
    (["optim=adamw,muon"], ["optim=muon,adamw"], "optim.name"),  # a sweep over a group
    (["seed=0,1"], ["seed=1,2", "hydra/launcher=submitit_local"], "seed"),  # jobs submitted to SLURM too
    # job directories named otherwise than by number
    (["seed=0,1", "hydra.sweep.subdir=run_${hydra.job.num}"], ["seed=1,2", "hydra.sweep.subdir=run_${hydra.job.num}"],
     "seed"),
])
def test_a_sweep_is_checked_against_what_its_directories_hold(first, again, refused, tmp_path):
    record_sweep([*first, f"out_dir={tmp_path}"])
    args = ["-m", *(again or first), f"out_dir={tmp_path}"]
    if refused is None:  # the same sweep again: each job resumes its own run
        assert check(args) is None
        return
    with pytest.raises(ConfigError) as err:
        check(args)
    assert err.value.key == refused and "a sweep's job 0 continues the run" in str(err.value)


# -- strict overrides, in process ------------------------------------------------------------------
@pytest.mark.parametrize("args,key,words", [
    (["+optim.lr=1"], "+optim.lr", "without the +"),
    (["optim=sgd"], "optim", "adamw, muon"),
    (["-m", "optim=muon,sgd"], "optim", "no preset configs/optim/sgd.yaml. Accepted: adamw, muon"),  # each value
    (["model.attn=3"], "model.attn", "a group of keys"),
    (["model.attn.windw=3"], "model.attn.windw", "did you mean model.attn.window"),
    (["trainer.micro_batch_size=abc"], "trainer.micro_batch_size", "auto, or a positive integer"),
    (["optim.betas=[0.9,abc]"], "optim.betas", "a list of numbers"),
    (["-m", "model.n_streams=2,4"], "model.n_streams", "add model.residual=hc or model.residual=mhc"),
    (["optim.ns_steps=3"], "optim.ns_steps", "optim=muon"),
    (["optim=muon", "optim.ns_restarts=[2]"], "optim.ns_restarts", "optim.ns_method=gram"),
    (["study.lr_spacing=0.25"], "study.lr_spacing", "study=sweep"),
    (["study.allow_edge_lr=true"], "study.allow_edge_lr", "study=tuned"),
    (["launcher.master_addr=10.0.0.1"], "launcher.master_addr", "launcher.nnodes>1"),
    (["-m", "seed=0,1", "launcher.nproc_per_node=1,3"], "trainer.global_batch_size", "a multiple of the 3"),
    (["seed=0,1"], "seed", "the sweep with -m"),
    # jobs submitted to SLURM are checked before any is submitted, as local ones are
    (["-m", "hydra/launcher=submitit_local", "optim.lr=-1,1e-3"], "optim.lr", "positive"),
])
def test_refused_before_anything_starts(args, key, words):
    with pytest.raises(ConfigError) as err:
        check(args)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_a_multi_node_slurm_sweep_needs_no_master_address():
    """SLURM picks the nodes and submitit names node 0 to every task (train/launcher.py); this
    machine's GPUs are not the job's either."""
    assert check(["-m", "hydra/launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=2", "seed=0,1"]) is None


@pytest.mark.parametrize("residual", ["model.residual=residual,mhc", "model.residual=mhc,residual"])
def test_a_sweep_across_variants_is_accepted(residual):
    """n_streams is live in one job: accepted whichever job that is."""
    assert check(["-m", residual, "model.n_streams=2,4", "launcher.dry_run=true"]) is not None


@pytest.mark.parametrize("setting,live,inert", [
    ("model.n_streams=2", ["model.residual=hc"], []),
    ("optim.ns_steps=3", ["optim=muon", "optim.ns_schedule=keller"], ["optim=muon"]),  # v4_hybrid fixes its steps
    ("optim.min_lr_ratio=0.2", ["optim.schedule=wsd"], ["optim.schedule=constant"]),
    ("launcher.master_addr=10.0.0.1", ["launcher.hostfile=HOSTFILE"], []),
    ("data.text_field=story", ["data.source=hub", "data.name=roneneldan/TinyStories"], []),
    ("logger.wandb.project=mine", ["logger.wandb.mode=offline"], ["logger.wandb.mode=disabled"]),
])
def test_a_conditional_key_is_accepted_where_it_is_live_and_refused_where_it_is_inert(setting, live, inert,
                                                                                       tmp_path):
    """Accepted in every variant that reads the key (hc as well as mhc, wsd as well as cosine, a hostfile as
    well as nnodes>1, hub as well as files, offline as well as online); refused where none does (Muon's
    default v4_hybrid schedule fixes its own Newton-Schulz steps)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    live = [a.replace("HOSTFILE", str(hostfile)) for a in live]
    assert check([*live, setting, "launcher.dry_run=true", f"out_dir={tmp_path / 'run'}"]) is not None
    with pytest.raises(ConfigError) as err:
        check([*inert, setting, f"out_dir={tmp_path / 'run'}"])
    assert err.value.key == setting.split("=")[0] and "it has no effect unless" in str(err.value)


# -- batch geometry --------------------------------------------------------------------------------
def test_auto_micro_batch_is_the_largest_divisor_under_the_cap():
    t = TrainerConfig(global_batch_size=48, max_micro_batch_size=16)
    assert [micro_batch_size(t, w) for w in (1, 2, 3, 4, 6, 8)] == [16, 12, 16, 12, 8, 6]
    assert micro_batch_size(TrainerConfig(), 1) == 16  # the default run: as before auto
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size to one of 1, 2, 3, 4, 6, 8, 12, 24"):
        micro_batch_size(TrainerConfig(global_batch_size=48, micro_batch_size=16), 2)


# -- spike policy ----------------------------------------------------------------------------------
def test_spike_policy_that_never_fires_is_bit_identical_to_off(tiny_config, tmp_path):
    from train.trainer import Trainer

    common = ("trainer.max_steps=6", "trainer.eval_every=3", "model.dropout=0.1")
    runs = {}
    for name, extra in (("absent", ()), ("off", ("trainer.on_spike=off",)),
                        ("skip", ("trainer.on_spike=skip", "trainer.spike_sigma=1e9", "trainer.spike_window=4"))):
        cfg = tiny_config(*common, *extra)
        cfg.out_dir = str(tmp_path / name)
        trainer = Trainer(cfg)
        trainer.fit()
        runs[name] = ([{k: v for k, v in r.items() if k != "spike_skipped"} for r in without_measured(metrics_rows(cfg.out_dir))],
                      trainer.full_state_dict())
    for name in ("off", "skip"):
        assert runs[name][0] == runs["absent"][0]
        assert all(torch.equal(v, runs["absent"][1][k]) for k, v in runs[name][1].items())


def test_an_injected_spike_is_skipped(tiny_config):
    from train.trainer import Trainer

    cfg = tiny_config("trainer.max_steps=8", "trainer.eval_every=0", "trainer.on_spike=skip",
                      "trainer.spike_window=8", "optim.schedule=constant")
    trainer = Trainer(cfg)
    module, forward = trainer.engine.module, trainer.engine.module.forward
    module.forward = lambda x, y: forward(x, y) * (50.0 if trainer.step == 6 else 1.0)  # step 7's loss
    step, seen = trainer.train_step, {}

    def watched():
        before = trainer.full_state_dict()
        metrics = step()
        seen[trainer.step] = all(torch.equal(v, before[k]) for k, v in trainer.full_state_dict().items())
        return metrics
    trainer.train_step = watched
    summary = trainer.fit()
    rows = metrics_rows(cfg.out_dir)
    assert [r["spike_skipped"] for r in rows] == [False] * 6 + [True, False]
    assert seen == {s: s == 7 for s in range(1, 9)}  # only step 7 left the parameters alone
    assert summary["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1


# -- the report --------------------------------------------------------------------------------------
def _fake_run(path: Path, config_overrides, rows, summary=None, starts=None):
    """A run of the full composed config (the report groups on what differs in it)."""
    from train.run_config import as_dict

    write_run(path, as_dict(compose_config(config_overrides, out_dir=path)), rows, summary, starts)


ROWS = [{"step": s, "loss": 3.0 - s / 10, "tokens": 100 * s, "tokens_per_s": 50.0, "grad_norm": 1.0,
         **({"val_loss": 2.9 - s / 10} if s % 2 == 0 else {})} for s in range(1, 5)]


def test_report_groups_only_on_keys_that_matter_and_shows_how_far_runs_got(tmp_path):
    from train.report import load_runs, run_table

    _fake_run(tmp_path / "a", ["model.n_streams=2"], ROWS, {"status": "completed", "final_val_loss": 2.5})
    _fake_run(tmp_path / "b", ["model.n_streams=4"], ROWS, {"status": "preempted", "final_val_loss": 2.5})
    _fake_run(tmp_path / "c", ["model.residual=mhc", "model.n_streams=2"], ROWS)
    runs = {r.path.name: r for r in load_runs([tmp_path])}
    assert runs["a"].group == runs["b"].group == "residual=residual"  # n_streams is inert there
    assert runs["c"].group == "residual=mhc"
    table = run_table(list(runs.values()))
    assert "**preempted**, step 4 of 1500" in table and "2.5000 (last, step 4 of 1500)" in table
    assert "**running**, step 4 of 1500" in table and "2.5000 (last, step 4 of 1500)" in table


def test_report_diff_and_x_axis(tmp_path, capsys):
    import sys
    from train import report

    _fake_run(tmp_path / "a", ["optim.lr=0.01"], ROWS)
    _fake_run(tmp_path / "b", ["optim.lr=0.02", "optim.ns_steps=7"], ROWS)
    assert report.config_diff(tmp_path / "a", tmp_path / "b").splitlines() == [
        "optim.lr: 0.01 -> 0.02", "optim.ns_steps: 5 (inert) -> 7 (inert)"]
    run = report.load_runs([tmp_path / "a"])[0]
    assert run.series("val_loss", "tokens")[0] == [200, 400]
    assert run.series("val_loss", "time")[0] == [4.0, 8.0]  # 100 tokens per step at 50 tokens/s
    sys.argv = ["report", str(tmp_path / "a"), "--x", "time", "--out", str(tmp_path / "r")]
    report.main()
    assert (tmp_path / "r" / "val_loss.png").stat().st_size > 1000


@pytest.mark.parametrize("args,key,words", [
    (["-m", "experiment=ablation_residual_optim,stress"], "experiment", "sets its own sweep (optim=adamw,muon"),
    (["-m", "experiment=smoke,stress"], "experiment", "experiment=stress sets its own sweep (model.residual="),
    (["-m", "experiment=lr_sweep", "study.lr_grid=range(-1,2)"], "study.lr_grid", "quoted as one value"),
    (["-m", "seed=0,1", "seed=2"], "seed", "given twice"),
    (["-m", "optim=muon", "optim=adamw,muon"], "optim", "given twice"),
    (["optim.name=muon"], "optim.name", "optim=adamw or optim=muon"),
    (["-m", "seed=0,1", "hydra.sweep.subdir=same"], "hydra.sweep.subdir", "the same run there"),
    # jobs 0 and 2 (s0), not one after the other
    (["-m", "optim.lr=1e-3,2e-3", "seed=0,1", "hydra.sweep.subdir=s${seed}"], "hydra.sweep.subdir",
     "the same run there"),
    (["-m", "experiment=lr_sweep", "hydra.sweep.subdir=lr${optim.lr}"], "hydra.sweep.subdir", "the same run there"),
    (["optim.lr=${nope}"], "override", "Interpolation key 'nope' not found"),
    (["-m", "optim=glob(sg*)"], "optim", "the glob matches no option"),
])
def test_a_launch_that_would_run_other_jobs_than_written_is_refused(args, key, words, tmp_path):
    """Each of these ran something else than the command line says, or crashed with a traceback:
    Hydra reads a preset's own sweep lists only when the preset is not itself swept, sweeps an
    unquoted grid's text, lets the last of two values win, keeps AdamW's preset under optim.name=muon,
    and a subdir shared by several jobs had each resume the previous job's run."""
    with pytest.raises(ConfigError) as err:
        check([*args, f"out_dir={tmp_path}"])
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_checked_jobs_are_the_jobs_hydra_runs(tmp_path):
    """The sweep lists come from the config composed without the command line's sweeps, as Hydra
    composes it; a glob over a group is its matching options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train.preflight import jobs

    def listed(args):
        return [job for job, _ in jobs(OverridesParser.create().parse_overrides(args), args, True, "config")]
    found = listed(["experiment=optimizer_study", "model.d_model=64,96"])
    assert len(found) == 5 * 2 * 2  # lr grid × optim × width
    # the command line's list replaces the preset's (128,256)
    assert {o for job in found for o in job if o.startswith("model.d_model")} == {"model.d_model=64",
                                                                                  "model.d_model=96"}
    text = check(["-m", "optim=glob(*)", "launcher.dry_run=true", f"out_dir={tmp_path}"])
    assert "job 0 (optim=adamw" in text and "job 1 (optim=muon" in text and "job 2" not in text


def test_a_sweep_cut_to_one_value_still_meets_what_its_directories_were(tmp_path):
    """Jobs 0 and 1 trained optim.lr 1e-3 and 3e-3; `optim.lr=3e-3` alone no longer varies, but its job
    0 would continue the 1e-3 run at 3e-3 (the check compared only what varies now)."""
    record_sweep(["optim.lr=1e-3,3e-3", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"optim.lr=3e-3.*trained with optim.lr=0.001|trained with optim.lr=0.001"):
        check(["-m", "optim.lr=3e-3", f"out_dir={tmp_path}"])
    assert check(["-m", "optim.lr=1e-3", "trainer.max_steps=3000", f"out_dir={tmp_path}"]) is None  # job 0 continues
    assert check([f"out_dir={tmp_path / '0'}", "optim.lr=2e-3"]) is None  # one run (no -m) may: a trajectory change


def test_a_launch_with_its_own_config_dir_is_checked_too(tmp_path, monkeypatch):
    """--config-dir skipped every check (a sweep re-run continued job 0 at another lr); the user's
    presets are found beside ours."""
    from train import preflight

    monkeypatch.setattr(preflight, "EXTRA_CONFIG_DIRS", [])  # check() sets it for its launch; not for later tests
    extra = tmp_path / "configs" / "experiment"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 7\n")
    record_sweep(["optim.lr=1e-3,3e-3", f"out_dir={tmp_path / 'sweep'}"])
    with pytest.raises(ConfigError, match="trained with optim.lr=0.001"):
        check(["--config-dir", str(tmp_path / "configs"), "-m", "experiment=mine", "optim.lr=1e-2,3e-3",
               f"out_dir={tmp_path / 'sweep'}"])
    text = check(["--config-dir", str(tmp_path / "configs"), "experiment=mine", "launcher.dry_run=true",
                  f"out_dir={tmp_path / 'run'}"])
    assert "experiment=mine" in text
    with pytest.raises(ConfigError, match="no preset configs/experiment/yours.yaml"):
        check(["--config-dir", str(tmp_path / "configs"), "experiment=yours", f"out_dir={tmp_path / 'run'}"])


def test_a_sweep_over_an_added_group_is_checked_too(tmp_path, monkeypatch):
    """`-m +variant=x,y` (a group of the user's, appended with +) went to Hydra unchecked: the
    check composed each option without the +, failed, and let the launch through. Its jobs are
    now checked like any other, and a launch the check cannot compose is refused, not waved on."""
    from train import preflight

    monkeypatch.setattr(preflight, "EXTRA_CONFIG_DIRS", [])
    variants = tmp_path / "configs" / "variant"
    variants.mkdir(parents=True)
    (variants / "x.yaml").write_text("# @package _global_\nmodel:\n  d_model: 64\n")
    (variants / "y.yaml").write_text("# @package _global_\nmodel:\n  d_model: 96\nhydra:\n  sweeper:\n"
                                     "    params:\n      seed: 5,6\n")
    args = ["--config-dir", str(tmp_path / "configs"), "-m", f"out_dir={tmp_path / 'sweep'}"]
    with pytest.raises(ConfigError, match="optim.lr=-1.0"):
        check([*args, "+variant=x", "optim.lr=-1,1e-3"])
    with pytest.raises(ConfigError, match=r"variant=y sets its own sweep \(seed=5,6\)"):
        check([*args, "+variant=x,y"])
    (tmp_path / "configs" / "probes").mkdir()  # a preset that sweeps the same key with other values
    (tmp_path / "configs" / "probes" / "seeded.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n"
                                                                 "    params:\n      seed: 0,1\n")
    with pytest.raises(ConfigError, match=r"variant=y sets its own sweep \(seed=5,6\)"):
        check([*args, "probes=seeded", "+variant=x,y"])
    (variants / "y.yaml").write_text("# @package _global_\nmodel:\n  d_model: 96\n")
    text = check([*args, "+variant=x,y", "launcher.dry_run=true"])
    assert text.count("launch.py +variant=x") == text.count("launch.py +variant=y") == 1 and "job 2" not in text
    with pytest.raises(ConfigError, match="cannot compose the config"):  # Hydra's own refusal, in one line
        check([*args, "+optim=muon,adamw"])
