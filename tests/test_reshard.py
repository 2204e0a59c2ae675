"""train/reshard.py without launching ranks: the ZeRO-stage check on manifests that predate
`zero_stage`, and the extraction's refusal of optimizer state it cannot cut per parameter."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import reshard
from train.reshard import ReshardError

ZERO0 = ["mp_rank_00_model_states.pt"]
ZERO2 = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


class Engine:
    """The DeepSpeed engine as reshard.load sees it at ZeRO stage 0 or on a refusal."""

    def __init__(self, stage):
        self.stage, self.loaded = stage, None

    def zero_optimization_stage(self):
        return self.stage

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded = (load_dir, tag)


def _manifest(files, **fields):
    return {"files": {name: 1 for name in files}, "world_size": 2, **fields}


@pytest.mark.parametrize("files,stage,saved", [(ZERO2, 0, "≥ 1"), (ZERO0, 1, 0), (ZERO0, 3, 0)],
                         ids=["zero2-at-0", "zero0-at-1", "zero0-at-3"])
def test_a_checkpoint_from_before_manifests_recorded_the_stage_is_refused_at_another(files, stage, saved):
    """A manifest without `zero_stage` still tells sharded (optimizer partitions) from whole
    states: resuming it at the other kind is refused, naming what it was written at, before
    anything is loaded (DeepSpeed would read partitions as whole states, or find none)."""
    engine = Engine(stage)
    ckpt = Path("/nonexistent/checkpoints/step_00000002")
    with pytest.raises(ReshardError, match=f"written at ZeRO stage {saved} and this run uses "
                                           f"deepspeed.zero_stage={stage}"):
        reshard.load(engine, ckpt, _manifest(files))
    assert engine.loaded is None


@pytest.mark.parametrize("fields", [{}, {"zero_stage": 0}], ids=["legacy", "recorded"])
def test_a_zero0_checkpoint_loads_at_stage_0_as_it_is(fields):
    """ZeRO-0 keeps whole states every rank reads, whatever the world size: loaded directly, with
    or without the stage in its manifest (its model-state file makes it no sharded checkpoint)."""
    engine = Engine(0)
    ckpt = Path("/nonexistent/checkpoints/step_00000002")
    reshard.load(engine, ckpt, _manifest(ZERO0, **fields))
    assert engine.loaded == (str(ckpt.parent), ckpt.name)


def _zero_checkpoint(state):
    """A DeepSpeed checkpoint reader holding one optimizer group of 8 elements (params w: 0..4, v: 4..8)."""
    from deepspeed.checkpoint import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                      SINGLE_PARTITION_OF_FP32_GROUPS)

    optim = {PARAM_SLICE_MAPPINGS: [{"w": SimpleNamespace(start=0, numel=4), "v": SimpleNamespace(start=4, numel=4)}],
             SINGLE_PARTITION_OF_FP32_GROUPS: [torch.arange(8.0)],
             BASE_OPTIMIZER_STATE: {"state": [{**state, "step": 3}]}}
    return SimpleNamespace(get_zero_checkpoint_state=lambda **indices: {OPTIMIZER_STATE_DICT: optim})


def test_optimizer_state_not_one_value_per_element_is_refused_before_anything_is_written(tmp_path):
    """A state that is not a flat vector over the partition (here 8×2) would be cut into wrong
    fragments, silently: the extraction refuses it and writes nothing."""
    with pytest.raises(ReshardError, match="'momentum_buffer' that is not one value per element"):
        reshard._extract_every_state(str(tmp_path), _zero_checkpoint({"momentum_buffer": torch.zeros(8, 2)}), (0, 0, 0))
    assert list(tmp_path.iterdir()) == []


def test_flat_optimizer_state_is_cut_per_parameter(tmp_path):
    """The counterpart: a flat state (Muon's momentum) is cut at each parameter's slice, as fp32 is."""
    momentum = torch.arange(8.0) * 10
    reshard._extract_every_state(str(tmp_path), _zero_checkpoint({"momentum_buffer": momentum}), (0, 0, 0))
    for name, part in (("w", slice(0, 4)), ("v", slice(4, 8))):
        assert torch.equal(torch.load(tmp_path / name / "0" / "momentum_buffer.00", weights_only=False), momentum[part])
        assert torch.equal(torch.load(tmp_path / name / "0" / "fp32.00", weights_only=False), torch.arange(8.0)[part])


def test_a_failed_conversion_leaves_the_checkpoint_as_it_was(tmp_path, monkeypatch):
    checkpoint = tmp_path / "step_00000004"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")

    def fails_half_way(ckpt, out):
        (out / "zero").mkdir(parents=True)
        (out / "zero" / "part.pt").write_bytes(b"half")
        raise ReshardError("cannot cut this state")

    monkeypatch.setattr(reshard, "convert", fails_half_way)
    with pytest.raises(ReshardError, match="cannot cut"):
        reshard.ensure_universal(checkpoint)
    assert [p.name for p in checkpoint.iterdir()] == ["manifest.json"]
