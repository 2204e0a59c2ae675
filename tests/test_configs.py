"""Every config composes and validates; the schema rejects unknown keys and wrong types."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import CONFIGS, compose_config
from train.validate import validate

GROUP_OPTIONS = [
    f"{group.name}={option.stem}"
    for group in sorted(p for p in CONFIGS.iterdir() if p.is_dir())
    for option in sorted(group.glob("*.yaml"))
]


def test_every_group_has_options():
    groups = {o.split("=")[0] for o in GROUP_OPTIONS}
    assert {"model", "optim", "data", "trainer", "probes", "launcher", "deepspeed", "logger", "experiment"} <= groups


@pytest.mark.parametrize("override", GROUP_OPTIONS)
def test_config_composes_and_validates(override, tmp_path):
    cfg = compose_config([override], out_dir=tmp_path / "run")
    validate(cfg)


def test_default_config_matches_contract(tmp_path):
    cfg = compose_config(out_dir=tmp_path)
    assert cfg.optim.name == "adamw" and cfg.model.residual == "residual" and cfg.model.n_streams == 4
    assert cfg.data.source == "shakespeare" and cfg.data.tokenizer == "byte"
    assert cfg.logger.wandb.mode == "offline" and cfg.launcher.nproc_per_node == 1
    assert cfg.deepspeed.zero_stage == 0 and cfg.probes.every == 0 and cfg.trainer.resume == "auto"


@pytest.mark.parametrize("override", ["model.not_a_key=1", "trainer.max_steps=many", "optim.lr=fast", "typo=3"])
def test_schema_is_strict(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_out_dir_and_seed_overrides(tmp_path):
    cfg = compose_config(["seed=7"], out_dir=tmp_path / "x")
    assert cfg.seed == 7 and Path(cfg.out_dir) == tmp_path / "x"
