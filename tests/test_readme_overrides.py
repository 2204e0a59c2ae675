"""Every override the README's tables name, composed with every preset, reaches the resolved
config: nothing is dropped. The overrides are read from the README itself, so a row added there
is tested without touching this file."""
import re
import typing

import pytest

from tests.conftest import CONFIGS, ROOT
from train.preflight import groups, schema_fields
from train.run_config import flatten

FIELDS = schema_fields()
PRESETS = [None, *sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))]


def _concrete(key: str, value: str) -> list[str]:
    """The README writes `KEY=a|b` or a placeholder (`N`, `X`, `PATH`): values to try."""
    if "|" in value:
        return [v for alternative in value.split("|") for v in _concrete(key, alternative)]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", value):  # a placeholder: a value of the key's type
        hint = FIELDS[key]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        return [{int: "7", float: "0.0123", bool: "true"}.get(base, f"readme-{value.lower()}")]
    return [value]


def readme_overrides() -> list[tuple[str, ...]]:
    """Each backticked override of a README table row, as the set of overrides it names together
    (`data.source=files data.path=PATH` is one)."""
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.replace("\\|", "\0").split("|")
        for snippet in re.findall(r"`([^`]+)`", "|".join(c.replace("\0", "\x01") for c in cells)):
            snippet = snippet.replace("\x01", "|")
            parts = snippet.split()
            if not all("=" in p for p in parts) or any(p.startswith(("hydra", "-")) for p in parts):
                continue
            expanded = [[]]
            for p in parts:
                key, value = p.split("=", 1)
                if key not in FIELDS and key not in groups():
                    expanded = []  # not an override (a table of something else)
                    break
                values = _concrete(key, value) if key in FIELDS else (
                    groups()[key] if value in ("NAME",) else value.split("|"))
                expanded = [e + [f"{key}={v}"] for e in expanded for v in values]
            found += [tuple(e) for e in expanded]
    return sorted(set(found))


OVERRIDES = readme_overrides()


def test_the_readme_names_the_contract_overrides():
    named = {o.split("=")[0] for combo in OVERRIDES for o in combo}
    assert {"optim", "optim.lr", "model.residual", "model.n_streams", "data", "trainer.max_steps",
            "trainer.micro_batch_size", "launcher.nproc_per_node", "deepspeed.zero_stage", "experiment",
            "logger.wandb.mode", "seed", "out_dir", "probes.every", "data.path"} <= named
    assert len(OVERRIDES) > 40


def batches(combos) -> list[list[tuple[str, ...]]]:
    """Combos packed greedily into batches composed together (Hydra's compose is the test's cost):
    no two in a batch set the same key, none chooses a group's preset while another sets one of
    that group's fields (the values the preset brings are what its check reads), and an
    `experiment=` combo is alone (it replaces the preset under test)."""
    def clash(a: set[str], b: set[str]) -> bool:
        if a and b and "experiment" in a | b:  # it would replace the preset under test: alone
            return True
        return bool(a & b) or any(k.startswith(g + ".") for g in a & set(groups()) for k in b) or \
            any(k.startswith(g + ".") for g in b & set(groups()) for k in a)

    packed, keys = [], []
    for combo in combos:
        names = {o.split("=", 1)[0] for o in combo}
        i = next((i for i, k in enumerate(keys) if not clash(k, names)), None)
        if i is None:
            packed.append([]), keys.append(set())
            i = len(packed) - 1
        packed[i].append(combo), keys[i].update(names)
    return packed


ALONE: dict[str, dict] = {}  # a group preset chosen alone: the values it brings


@pytest.mark.slow  # ~70 overrides × 9 presets, composed in 8 batches per preset
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p or "default")
def test_every_readme_override_reaches_the_resolved_config_under_every_preset(preset):
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def resolved(overrides):  # what a run gets: the composed config as the typed schema's object
        return flatten(dataclasses.asdict(OmegaConf.to_object(compose("config", overrides=overrides))))

    base = [f"experiment={preset}"] if preset else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for batch in batches(OVERRIDES):
            try:
                together = resolved([*base, *(o for combo in batch for o in combo)])
                checks = [(combo, together) for combo in batch]
            except Exception:  # overrides valid alone but not together (a schema check): one by one
                checks = [(combo, resolved([*base, *combo])) for combo in batch]
            for combo, cfg in checks:
                for o in combo:
                    key, value = o.split("=", 1)
                    if key in ("out_dir", "experiment"):
                        continue
                    if key in groups():  # a preset of a group: some of its own values arrive
                        if o not in ALONE:  # the same under every preset: composed once per session
                            ALONE[o] = {k: v for k, v in resolved([o]).items() if k.startswith(key + ".")}
                        assert any(cfg[k] == v for k, v in ALONE[o].items()), (preset, o)
                        continue
                    expected = compose_value(key, value)
                    assert cfg[key] == expected, (preset, combo, key, cfg[key])


def compose_value(key: str, value: str):
    """The value the override sets, typed as the schema types it."""
    hint = FIELDS[key]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if typing.get_origin(hint) is typing.Union and str in typing.get_args(hint):
        return int(value) if value.isdigit() else value
    if base is bool:
        return value == "true"
    if base in (int, float):
        return base(value)
    return value
