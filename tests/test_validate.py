"""Bad input fails before any work, naming the key, the value and what is accepted."""
import json

import pytest

from tests.conftest import compose_config, launch
from train.validate import ConfigError, validate

BAD = [
    # (overrides, key named in the error, words the error must contain)
    (["optim.name=sgd"], "optim.name", "adamw, muon"),
    (["optim.lr=0"], "optim.lr", "positive"),
    (["optim.lr=-0.001"], "optim.lr", "positive"),
    (["data.seq_len=512"], "data.seq_len", "model.max_seq_len=256"),
    (["trainer.global_batch_size=24", "trainer.micro_batch_size=16"], "trainer.global_batch_size", "multiple of 16"),
    (["launcher.nproc_per_node=2", "trainer.micro_batch_size=16"], "trainer.global_batch_size", "multiple of 32"),
    (["data.source=files", "data.path=/no/such/corpus"], "data.path", "existing"),
    (["data.source=files"], "data.path", "required"),
    (["data.source=hub9"], "data.source", "shakespeare, pycode, files, hub"),
    (["data.source=hub"], "data.name", "required"),
    (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer", "pretrained:NAME"),
    (["data.tokenizer=bpe", "data.vocab_size=100"], "data.vocab_size", "257"),
    (["data.shard_tokens=100"], "data.shard_tokens", "more than data.seq_len=256"),
    (["data.num_proc=0"], "data.num_proc", "positive"),
    (["model.residual=bogus"], "model.residual", "residual, hc, mhc"),
    (["model.residual=mhc", "model.n_streams=0"], "model.n_streams", "positive"),
    (["optim=muon", "optim.ns_schedule=newton"], "optim.ns_schedule", "v4_hybrid"),
    (["optim=muon", "optim.momentum_type=heavy"], "optim.momentum_type", "classical"),
    (["optim=muon", "optim.ns_restarts=[2,10]"], "optim.ns_restarts", "from 1 to 9"),
    (["optim=muon", "optim.ns_schedule=keller", "optim.ns_restarts=[0]"], "optim.ns_restarts", "from 1 to 4"),
    (["optim=muon", "optim.adamw_lr=0"], "optim.adamw_lr", "positive"),
    (["optim=muon", "deepspeed.zero_stage=3"], "deepspeed.zero_stage", "0, 1 or 2"),
    (["model.n_heads=3"], "model.n_heads", "divisor"),
    (["experiment=v4", "model.attn.query_chunk=-1"], "model.attn.query_chunk", "non-negative"),
    (["experiment=v4", "model.moe.grouped_matmul=loop"], "model.moe.grouped_matmul", "auto, padded"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "0, 1, 2, 3"),
    (["logger.wandb.mode=loud"], "logger.wandb.mode", "offline"),
    (["trainer.precision=fp8"], "trainer.precision", "bf16"),
    (["trainer.resume=/no/such/ckpt"], "trainer.resume", "auto, never"),
    (["probes.every=-1"], "probes.every", "non-negative"),
    (["probes.every=10", "deepspeed.zero_stage=3"], "probes.every", "zero_stage=3"),
    (["trainer.peak_tflops=-1"], "trainer.peak_tflops", "positive"),
    (["trainer.profile=3"], "trainer.profile", "START:END"),
    (["trainer.profile=a:b"], "trainer.profile", "START:END"),
    (["trainer.profile=5:2"], "trainer.profile", "1 <= START <= END"),
    (["trainer.profile=0:2"], "trainer.profile", "1 <= START <= END"),
    (["trainer.profile=10:2000"], "trainer.profile", "trainer.max_steps=1500"),
    # the edges of the accepted ranges, and what is refused together
    (["optim.lr=inf"], "optim.lr", "positive"),
    (["optim.betas=[0.9,1.0]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.betas=[0.9,0.95,0.99]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.min_lr_ratio=2.0"], "optim.min_lr_ratio", "[0, 1]"),
    (["optim.schedule=wsd", "optim.decay_fraction=0.0"], "optim.decay_fraction", "(0, 1]"),
    (["optim=muon", "optim.momentum=1.0"], "optim.momentum", "[0, 1)"),
    (["optim=muon", "optim.ns_schedule=keller", "optim.ns_steps=0"], "optim.ns_steps", "from 1 to 99"),
    (["optim.qk_clip_tau=100", "deepspeed.zero_stage=1"], "optim.qk_clip_tau", "or deepspeed.zero_stage=0"),
    (["model.d_model=96", "model.n_heads=32"], "model.n_heads", "even head size"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["data.val_fraction=0.9"], "data.val_fraction", "(0, 0.5]"),
    (["data.tokenizer=bpe", "data.vocab_size=256"], "data.vocab_size", "257"),
    (["data.shard_tokens=256"], "data.shard_tokens", "more than data.seq_len=256"),
    (["trainer.keep_last=0"], "trainer.keep_last", "positive"),
    (["trainer.on_spike=skip", "trainer.spike_window=2"], "trainer.spike_window", "≥ 4"),
    (["trainer.on_spike=skip", "deepspeed.zero_stage=1"], "trainer.on_spike", "skip with deepspeed.zero_stage=0"),
    (["experiment=v4", "model.moe.top_k=9"], "model.moe.top_k", "at most model.moe.n_experts=8"),
    (["experiment=v4", "optim.qk_clip_tau=100"], "optim.qk_clip_tau", "0 with model.attention=v4"),
    (["experiment=v4", "model.activation_checkpointing=true"], "model.activation_checkpointing",
     "false with model.attention=v4"),
    (["experiment=v4", "model.attn.layers=[window]"], "model.attn.layers", "model.n_layers=4 entries"),
    (["experiment=v4", "model.attn.yarn_factor=0.5"], "model.attn.yarn_factor", ">= 1"),
    (["experiment=v4", "model.attn.rope_dim=15"], "model.attn.rope_dim", "an even number"),
    (["experiment=v4", "model.attn.out_groups=3"], "model.attn.out_groups", "a divisor of model.n_heads=4"),
    (["launcher.nnodes=2", "launcher.node_rank=-1", "launcher.master_addr=n0", "trainer.global_batch_size=32"],
     "launcher.node_rank", "from 0 to launcher.nnodes-1=1"),
    (["launcher.master_port=0"], "launcher.master_port", "from 1 to 65535"),
    (["launcher.collective_timeout_s=0"], "launcher.collective_timeout_s", "positive"),
]


@pytest.mark.parametrize("overrides,key,words", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_named(overrides, key, words, tmp_path):
    cfg = compose_config(overrides, out_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert err.value.key == key and key in message and words in message and "Accepted" in message
    assert "\n" not in message


def _checkpoint(directory):
    from train.manifest import seal

    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"x")
    seal(directory, step=4, world_size=1)
    return directory


@pytest.mark.parametrize("case,words", [
    ("run directory", "a run directory, not a checkpoint: continue it with out_dir="),
    ("empty directory", "not a usable checkpoint (no readable manifest.json"),
    ("truncated file", "not a usable checkpoint (mp_rank_00_model_states.pt has 0 bytes"),
    ("another run's, into a run with checkpoints", "holds checkpoints of its own"),
])
def test_resume_path_must_be_a_usable_checkpoint_of_this_history(case, words, tmp_path):
    """Refused before any work: the launcher once took a run directory and failed with a traceback,
    or an empty one and failed only after preparing data and building the engine."""
    other = _checkpoint(tmp_path / "other" / "checkpoints" / "step_00000004")
    run = tmp_path / "run"
    target = {"run directory": tmp_path / "other", "empty directory": tmp_path / "empty"}.get(case, other)
    target.mkdir(exist_ok=True)
    if case == "truncated file":
        (other / "mp_rank_00_model_states.pt").write_bytes(b"")
    if case.startswith("another"):
        _checkpoint(run / "checkpoints" / "step_00000002")
    cfg = compose_config([f"trainer.resume={target}"], out_dir=run)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "trainer.resume" and words in str(err.value) and "Accepted" in str(err.value)
    # accepted: this run's own checkpoint, and another's into an out_dir without checkpoints
    validate(compose_config([f"trainer.resume={_checkpoint(run / 'checkpoints' / 'step_00000008')}"], out_dir=run))
    validate(compose_config([f"trainer.resume={_checkpoint(tmp_path / 'c' / 'step_00000004')}"],
                            out_dir=tmp_path / "fresh"))


@pytest.mark.parametrize("left", ["metrics.jsonl", "checkpoints/"])
def test_resume_never_refuses_to_overwrite_a_run(tmp_path, left):
    """Checkpoints without a metrics.jsonl (the log moved away, checkpoints copied in) are a run as well:
    trainer.resume=never would write over them."""
    if left.endswith("/"):
        (tmp_path / left).mkdir()
    else:
        (tmp_path / left).write_text("{}\n")
    cfg = compose_config(["trainer.resume=never"], out_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "out_dir" and "trainer.resume=never would overwrite it" in str(err.value)


def test_resume_path_into_a_run_with_only_a_users_copy(tmp_path):
    """Only the names the checkpointer writes (step_N, .replaced-step_N) are a run's own
    checkpoints; a user's copy beside them (step_best/) is neither pruned nor resumed, so it does
    not make another checkpoint's history interleave with this run's."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_best").mkdir(parents=True)
    other = _checkpoint(tmp_path / "other" / "checkpoints" / "step_00000004")
    validate(compose_config([f"trainer.resume={other}"], out_dir=run))
    # a swap's old copy, all that is left of a run killed mid-swap, is the run's (resume=auto takes it)
    (run / "checkpoints" / ".replaced-step_00000002").mkdir()
    with pytest.raises(ConfigError, match="holds checkpoints of its own"):
        validate(compose_config([f"trainer.resume={other}"], out_dir=run))


GOOD = [
    ["trainer.profile=1499:1500"],  # END may be the last step, trainer.max_steps=1500
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(g) for g in GOOD])
def test_edge_values_are_accepted(overrides, tmp_path):
    validate(compose_config(overrides, out_dir=tmp_path / "run"))


@pytest.mark.parametrize("args,words", [
    (["optim.lr=-1"], "optim.lr=-1.0"),
    (["data.seq_len=4096"], "data.seq_len=4096"),
    (["data.source=files", "data.path=/no/such/corpus"], "/no/such/corpus"),
])
def test_launch_rejects_bad_input_without_touching_out_dir(args, words, tmp_path):
    out = tmp_path / "existing_run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = launch(*args, f"out_dir={out}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and words in err and "Accepted" in err
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_launch_rejects_unknown_group_option(tmp_path):
    proc = launch("optim=sgd", f"out_dir={tmp_path / 'r'}")
    assert proc.returncode != 0
    assert "optim/sgd" in proc.stderr and "adamw" in proc.stderr


def test_launch_reports_bad_data_naming_it(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"body": "some text"}\n{"body": "more text"}\n')
    proc = launch("data.source=files", f"data.path={tmp_path / 'corpus.jsonl'}", f"data.cache_dir={tmp_path / 'c'}",
                  f"out_dir={tmp_path / 'run'}", "logger.wandb.mode=disabled")
    assert proc.returncode == 3
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "text_field='text'" in err and "body" in err
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("rank", [None, "0"], ids=["launcher", "rank"])
def test_more_ranks_than_gpus_on_a_node_is_refused_before_launch(rank, tmp_path, monkeypatch):
    """Checked where the ranks are launched from; inside a rank (SLURM: a task that may see only its
    own GPU) there is nothing to compare."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    validate(compose_config(["launcher.nproc_per_node=2"], out_dir=tmp_path / "two"))
    cfg = compose_config(["launcher.nproc_per_node=4"], out_dir=tmp_path / "four")
    if rank is not None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "launcher.nproc_per_node" and "at most 2" in str(err.value)


@pytest.mark.parametrize("hosts,layout,key,words", [
    ("worker-1 slots=8 extra\n", [], "launcher.hostfile", "line 1 of"),
    ("a slots=4\nb slots=4\n", ["launcher.nnodes=3", "trainer.global_batch_size=48"], "launcher.nnodes",
     "at most the 2 host(s)"),
    ("a slots=4\nb slots=2\n", ["launcher.nnodes=2", "launcher.nproc_per_node=4", "trainer.global_batch_size=64"],
     "launcher.nproc_per_node", "at most 2, the fewest slots among the first 2 host(s)"),
], ids=["a third field", "more nodes than hosts", "fewer slots than ranks on the second host"])
def test_hostfile_must_hold_the_layout(hosts, layout, key, words, tmp_path, monkeypatch):
    import train.validate

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train.validate, "visible_gpus", lambda: 0)  # the hosts' GPUs, not this machine's, count
    (tmp_path / "hosts").write_text(hosts)
    cfg = compose_config([f"launcher.hostfile={tmp_path / 'hosts'}", *layout], out_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key and words in str(err.value)


def test_a_rank_on_another_host_need_not_have_the_hostfile(tmp_path, monkeypatch):
    """DeepSpeed's launcher reads the hostfile on the launching node only; the ranks it starts on the
    other hosts validate the same command line without the file."""
    monkeypatch.setenv("RANK", "3")
    validate(compose_config(["launcher.hostfile=/only/on/node0/hosts", "launcher.nnodes=2",
                             "trainer.global_batch_size=32"], out_dir=tmp_path / "run"))


@pytest.mark.parametrize("visible,gpus", [
    (None, 2), ("1", 1), ("-1", 0), ("0,-1", 1), ("-1,0", 0), ("1,-1,0", 1), ("0,7,1", 1), ("1,0,1", 0),
    ("0gpu,1x", 2), ("1+2,0", 2), ("GPU-8f2a,GPU-77c1,MIG-1", 2), ("GPU-8f2a,GPU-8f2a", 0), ("", 0)])
def test_gpus_counted_without_importing_torch(visible, gpus, monkeypatch):
    """The launching process counts the GPUs from the device files (torch is not imported yet): two
    here, narrowed by CUDA_VISIBLE_DEVICES as CUDA reads it (torch.cuda._parse_visible_devices
    states the same rules): in order, up to the first entry that names no device (-1, an index past
    the last device, another prefix), an index by its leading digits, a repeated one hiding all.
    It used to drop only entries starting with "-": 0,7,1 counted 2 GPUs of CUDA's 1."""
    import sys
    from types import SimpleNamespace

    import train.validate

    monkeypatch.delitem(sys.modules, "torch")  # put back after the test; nothing imports it meanwhile
    monkeypatch.setattr(train.validate, "glob", SimpleNamespace(glob=lambda pattern: ["/dev/nvidia0", "/dev/nvidia1"]))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert train.validate.visible_gpus() == gpus
