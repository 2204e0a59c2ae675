"""Elastic resume: a checkpoint written at 2 ranks continues at 1, and one from 1 rank at 2, as the
same run — the same windows in every step (`data/digest`), losses and final weights and optimizer
state within the 1-vs-2-rank parity tolerance of the uninterrupted run. 2 -> 1: AdamW and Muon at
ZeRO 1 and 2, AdamW at ZeRO 3 and 0; 1 -> 2: AdamW at ZeRO 1, Muon at ZeRO 2. Right after a 2 -> 1
reshard, the state is the checkpoint's exactly (Muon, and V4-tiny with MoE). Damaged conversions
are redone and the checkpoint stays as it was; what cannot be resharded is refused before anything
is written."""
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, compose_config, drop_recorded_configs, launch_env, metrics_rows
from tests.elastic_runs import CASES, CUT, STEPS, V4_CASE, overrides, stopped_copy
from train import reshard
from train.checkpoint import CheckpointError
from train.load import consolidated_state_dict
from train.manifest import problems
from train.report import write_report
from train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("elastic")]  # one worker trains the module's runs once
DIGEST = {"V4LAB_BATCH_DIGEST": "1"}
PARITY = dict(rel=1e-4, abs=5e-5)  # tests/test_distributed.py's 1-vs-2-rank parity tolerance
RESUMES = [(f"{o}{s}", "2to1") for o, s, _ in CASES] + [(f"{o}{s}", "1to2") for o, s, both in CASES if both]


@contextlib.contextmanager
def environ(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics_rows(run)]


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def one_rank(run: Path, name: str, cache: Path, *extra) -> Trainer:
    """A 1-rank trainer for case `name` (e.g. `muon2`) in `run`: it resumes what it finds there."""
    return Trainer(compose_config([*overrides(name[:-1], int(name[-1]), 1), *extra], out_dir=run, cache_dir=cache))


# universal conversions damaged before the 2 -> 1 resume, which must notice and convert again:
# case -> (damage, the reason the resume logs)
DAMAGED = {"adamw2": ("half-converted", "no readable manifest.json"),
           "muon2": ("corrupt", "momentum_buffer.pt has 50 bytes")}


def damage(checkpoint: Path, how: str) -> None:
    universal = reshard.ensure_universal(checkpoint)
    if how == "half-converted":  # its manifest not yet written, and a killed conversion's temporary directory
        (universal / "manifest.json").unlink()
        (checkpoint / ".universal.tmp" / "universal" / "zero").mkdir(parents=True)
    else:  # a file cut short after the conversion was sealed
        momentum = next(universal.glob("zero/*/momentum_buffer.pt"))
        momentum.write_bytes(momentum.read_bytes()[:50])


def contents(checkpoint: Path) -> dict[str, bytes]:
    """The checkpoint's own files (its universal conversion aside)."""
    return {str(f.relative_to(checkpoint)): f.read_bytes() for f in checkpoint.rglob("*")
            if f.is_file() and f.relative_to(checkpoint).parts[0] not in (reshard.UNIVERSAL, ".universal.tmp")}


@pytest.fixture(scope="module")
def elastic(tmp_path_factory, data_cache):
    """1-rank runs; one torchrun with the 2-rank runs and the 1 -> 2 resumes; the 2 -> 1 resumes
    (of which DAMAGED find a damaged conversion). `dir`: the runs; `log`: what train.reshard
    logged during the 2 -> 1 resumes; `before`: {case: its checkpoint's files before the damage}."""
    out = tmp_path_factory.mktemp("elastic")
    with environ(**DIGEST):
        for optim, stage, both_ways in CASES:
            if both_ways:
                one_rank(out / f"{optim}{stage}_1", f"{optim}{stage}", data_cache).fit()
                stopped_copy(out / f"{optim}{stage}_1", out / f"{optim}{stage}_1to2")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "tests" / "elastic_runs.py"), str(out), str(data_cache)],
            capture_output=True, text=True, timeout=1500, cwd=ROOT, env=launch_env(OMP_NUM_THREADS="1", **DIGEST))
        assert proc.returncode == 0, proc.stderr[-4000:]
        before, said = {}, io.StringIO()
        handler = logging.StreamHandler(said)
        logging.getLogger(reshard.__name__).addHandler(handler)
        try:
            for optim, stage, _ in CASES:
                name = f"{optim}{stage}"
                run = stopped_copy(out / f"{name}_2", out / f"{name}_2to1")
                if name in DAMAGED:
                    before[name] = contents(ckpt(run, CUT))
                    damage(ckpt(run, CUT), DAMAGED[name][0])
                one_rank(run, name, data_cache).fit()
        finally:
            logging.getLogger(reshard.__name__).removeHandler(handler)
        yield SimpleNamespace(dir=out, log=said.getvalue(), before=before)


@pytest.fixture
def runs(elastic) -> Path:
    return elastic.dir


def states_per_parameter(shards: list[tuple[list[dict], dict]]) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, state) -> the whole tensor, from each rank's (slice mappings, {state: partition})
    in rank order: how ZeRO-1/2 lay parameters out in their flat partitions, read independently of
    the code under test."""
    pieces = defaultdict(list)
    for mappings, groups in shards:
        for mapping, states in zip(mappings, groups):
            for name, fragment in mapping.items():
                for key, flat in states.items():
                    if key != "step":
                        pieces[name, key].append(flat.narrow(0, fragment.start, fragment.numel))
    return {k: torch.cat(v) for k, v in pieces.items()}


def saved_states(checkpoint: Path) -> dict[tuple[str, str], torch.Tensor]:
    shards = []
    for f in sorted(checkpoint.glob("zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("_")[3])):
        sd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]["state"]
        shards.append((sd["param_slice_mappings"], [{"fp32": fp32, **base[g]} for g, fp32 in
                                                     enumerate(sd["single_partition_of_fp32_groups"])]))
    return states_per_parameter(shards)


def live_states(trainer: Trainer) -> dict[tuple[str, str], torch.Tensor]:
    zero = trainer.engine.optimizer
    inner = zero.optimizer
    groups = [{"fp32": fp32, **inner.state[group["params"][0]]}
              for fp32, group in zip(zero.single_partition_of_fp32_groups, inner.param_groups)]
    return states_per_parameter([(zero._param_slice_mappings, groups)])


@pytest.mark.parametrize("name,direction", RESUMES, ids=[f"{n}-{d}" for n, d in RESUMES])
def test_resume_at_another_world_size_continues_the_run(name, direction, runs):
    source, target = (2, 1) if direction == "2to1" else (1, 2)
    reference, resumed = runs / f"{name}_{source}", runs / f"{name}_{direction}"
    ref, got = rows(reference), rows(resumed)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got[:CUT] == ref[:CUT]
    for r, g in zip(ref[CUT:], got[CUT:]):
        assert {k: g[k] for k in ("step", "tokens", "lr", "data/digest")} == \
               {k: r[k] for k in ("step", "tokens", "lr", "data/digest")}
        assert g["loss"] == pytest.approx(r["loss"], **PARITY)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], **PARITY)
    starts = json.loads((resumed / "environment.json").read_text())
    assert [(s["from_step"], s["world_size"]) for s in starts] == [(0, source), (CUT, target)]
    assert json.loads((resumed / "summary.json").read_text())["world_size"] == target
    if name.endswith(("1", "2")):  # the final weights and optimizer state (Muon's momentum too) per parameter
        want, have = saved_states(ckpt(reference, STEPS)), saved_states(ckpt(resumed, STEPS))
        assert want.keys() == have.keys() and ("muon" not in name or any(k == "momentum_buffer" for _, k in want))
        for key, value in want.items():
            assert torch.allclose(have[key], value, rtol=PARITY["rel"], atol=PARITY["abs"]), key
    else:  # ZeRO-0 and 3: the final weights, consolidated by DeepSpeed
        want, have = consolidated_state_dict(ckpt(reference, STEPS)), consolidated_state_dict(ckpt(resumed, STEPS))
        assert want.keys() == have.keys()
        for key, value in want.items():
            assert torch.allclose(have[key], value, rtol=PARITY["rel"], atol=PARITY["abs"]), key


def test_report_shows_each_segments_world_size(runs, tmp_path):
    text = write_report([runs / "muon2_2to1", runs / "muon2_1to2"], out=tmp_path).read_text()
    assert f"| 2, 1 from step {CUT} |" in text and f"| 1, 2 from step {CUT} |" in text


def test_the_sample_order_does_not_depend_on_the_layout(runs):
    for optim, stage, both_ways in CASES:
        if both_ways:
            one, two = rows(runs / f"{optim}{stage}_1"), rows(runs / f"{optim}{stage}_2")
            assert [r["data/digest"] for r in one] == [r["data/digest"] for r in two]
            assert len(set(r["data/digest"] for r in one)) == STEPS


@pytest.mark.parametrize("name", ["muon1", "muon2", V4_CASE])
def test_resharded_state_is_the_checkpoints_exactly(name, runs, tmp_path, data_cache):
    """Right after a 2 -> 1 resume, Muon's momentum, the AdamW half's moments and the fp32 weights
    of every parameter, and the buffers (V4-tiny's MoE biases), equal what the 2-rank run had at its
    checkpoint, bit for bit."""
    run = stopped_copy(runs / f"{name}_2", tmp_path / "run")
    trainer = one_rank(run, name, data_cache)
    trainer.maybe_resume()
    want, have = saved_states(ckpt(run, CUT)), live_states(trainer)
    assert {k for _, k in want} == {"fp32", "momentum_buffer", "exp_avg", "exp_avg_sq"}
    assert want.keys() == have.keys()
    for key, value in want.items():
        assert torch.equal(have[key], value), key
    assert trainer.step == CUT and trainer.loader.position == CUT * 8
    saved = torch.load(ckpt(run, CUT) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    buffers = dict(trainer.engine.module.named_buffers())
    biases = [b for b in saved if b in buffers and b.endswith("ffn.bias")]  # moved by step 2's expert loads
    assert bool(biases) == (name == V4_CASE) and any(saved[b].abs().sum() > 0 for b in biases) == bool(biases)
    for b in buffers.keys() & saved.keys():
        assert torch.equal(buffers[b], saved[b]), b


def test_damaged_conversion_is_redone_and_the_original_untouched(elastic):
    """A half-converted or corrupt `universal/` is reported and converted again (the resumes that
    found them continue the run: test_resume_at_another_world_size_continues_the_run), the
    checkpoint's own files are as they were, and a whole conversion is reused, not redone."""
    for name, (_, reason) in DAMAGED.items():
        original = ckpt(elastic.dir / f"{name}_2to1", CUT)
        line = next(x for x in elastic.log.splitlines() if x.startswith(f"{original / reshard.UNIVERSAL} is unusable ("))
        assert reason in line, line
        assert problems(original / reshard.UNIVERSAL) is None and not (original / ".universal.tmp").exists()
        assert contents(original) == elastic.before[name] and problems(original) is None
        sealed = (original / reshard.UNIVERSAL / "manifest.json").stat().st_mtime_ns
        reshard.ensure_universal(original)  # a later resume from the same checkpoint reuses the conversion
        assert (original / reshard.UNIVERSAL / "manifest.json").stat().st_mtime_ns == sealed


def test_converted_checkpoint_still_loads_at_its_own_world_size(runs, tmp_path, data_cache):
    """The 1-rank checkpoint that the 1 -> 2 resume converted resumes at 1 rank as before: the
    weights and optimizer state are the checkpoint's, bit for bit."""
    run = runs / "muon2_1to2"
    assert problems(ckpt(run, CUT) / reshard.UNIVERSAL) is None
    trainer = one_rank(stopped_copy(run, tmp_path / "run"), "muon2", data_cache)
    trainer.maybe_resume()
    want, have = saved_states(ckpt(run, CUT)), live_states(trainer)
    assert want.keys() == have.keys() and trainer.step == CUT
    for key, value in want.items():
        assert torch.equal(have[key], value), key


@pytest.mark.parametrize("change,reason", [
    ("model.d_model=64", r"other parameter shapes \(.*blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\), "
                         r"this model \(192, 64\)"),
    ("deepspeed.zero_stage=1", r"written at ZeRO stage 2 and this run uses deepspeed.zero_stage=1"),
])
def test_what_cannot_be_resharded_is_refused_before_anything_is_written(change, reason, runs, tmp_path, data_cache):
    """Found in the checkpoint itself, not only by comparing configs (train/run_config.py refuses
    these keys first where the checkpoint holds its config): here it holds none, as older ones."""
    run = stopped_copy(runs / "adamw2_2", tmp_path / "run")
    drop_recorded_configs(run)
    files = {f: f.stat().st_mtime_ns for f in run.rglob("*")}
    with pytest.raises(CheckpointError, match=reason):
        one_rank(run, "adamw2", data_cache, change).fit()
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*")} == files
