"""What `python launch.py ARGS` checks before Hydra creates a directory or starts a job.

- Every override names a key of the typed schema (train/config.py) or an option of a config
  group, written plain, with `+` or with `++`; keys inside a node the code never reads are refused
  too. A value of the wrong type is refused the same way: one line, exit status 2, naming the
  closest valid keys.
- Each job of the launch (one, or every combination of a sweep) is composed and validated
  (train/validate.py), so a sweep with one impossible job starts none.
- A key set on the command line that has no effect in any job is refused, naming the setting it
  needs (train/variants.py).
- A dry run (`launcher.dry_run=true`, other than under SLURM/submitit) is answered here.
So a refused or dry-run launch leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from common.errors import ConfigError
from train.config import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# --config-dir DIR: the user's configs, searched before ours as Hydra searches them (set by check)
EXTRA_CONFIG_DIRS: list[Path] = []


# -- the schema ---------------------------------------------------------------------------------
def schema_fields(cls=Config, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the schema, dotted, with its type."""
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(schema_fields(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


def _nodes(cls=Config, prefix: str = "") -> set[str]:
    out, hints = set(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.add(f"{prefix}{f.name}")
            out |= _nodes(hint, f"{prefix}{f.name}.")
    return out


def describe_type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, typing.List):
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def groups() -> dict[str, list[str]]:
    """Config groups (configs/<group>/, and those of a --config-dir) and their options."""
    found: dict[str, set[str]] = {}
    for root in (CONFIGS, *EXTRA_CONFIG_DIRS):
        for d in sorted(root.iterdir()) if root.is_dir() else ():
            if d.is_dir() and d.name != "hydra":
                found.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {k: sorted(v) for k, v in sorted(found.items())}


# -- one override -------------------------------------------------------------------------------
def _values(o) -> list:
    """The values an override sets: one, or each of a sweep's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not o.is_sweep_override():
        return [o.value()]
    if not o.is_discrete_sweep():
        return []  # ranges and intervals of other sweepers: their values are checked per job
    parser = OverridesParser.create()
    return [parser.parse_override(f"{o.key_or_group}={v}").value() for v in o.sweep_string_iterator()]


def _is_glob(o) -> bool:
    from hydra.core.override_parser.types import ValueType

    return o.value_type == ValueType.GLOB_CHOICE_SWEEP


def _expand_glob(o, options: dict) -> str:
    if not _is_glob(o):
        return o.input_line
    if o.key_or_group not in options:
        raise ConfigError(o.key_or_group, _shown(o), f"glob(...) over a config group ({', '.join(options)})",
                          "glob selects among a group's options")
    chosen = o.value().filter(options[o.key_or_group])
    if not chosen:
        raise ConfigError(o.key_or_group, _shown(o), ", ".join(options[o.key_or_group]), "the glob matches no option")
    return f"{o.key_or_group}={','.join(chosen)}"


def check_command_line(parsed) -> None:
    """What Hydra would accept but not run as written: a key given twice with a sweep (the last value
    wins, even over the sweep), the optimizer's name without its preset, and a sweep of study.lr_grid, which
    itself holds a sweep (written unquoted, Hydra sweeps the text and runs the default grid)."""
    seen = {}
    for o in parsed:  # a later plain value overriding an earlier one is Hydra's rule, and used (presets in aliases)
        key = o.key_or_group
        if key in seen and (o.is_sweep_override() or seen[key].is_sweep_override()):
            raise ConfigError(key, f"{_shown(seen[key])} and {_shown(o)}", f"one {key}=... (several values: "
                              f"{key}=A,B with -m)", "given twice with a sweep: the last would silently win")
        seen[key] = o
    for o in parsed:
        if o.key_or_group == "optim.name":
            raise ConfigError("optim.name", _shown(o), "optim=adamw or optim=muon, the group: it sets the optimizer "
                              "with its preset", "optim.name alone keeps the other optimizer's preset values "
                              "(learning rates, eps, Newton-Schulz settings)")
        if o.key_or_group == "study.lr_grid" and o.is_sweep_override():
            raise ConfigError("study.lr_grid", _shown(o), "the grid quoted as one value: "
                              f"\"study.lr_grid='{_shown(o)}'\"", "unquoted, Hydra sweeps over the grid's text and "
                              "runs the default grid for each value")


def check_override(o, fields: dict, nodes: set, options: dict, node) -> None:
    """`node`: the schema as a structured config (building one takes ~0.1 s, so the launch's
    overrides share one; each sets its own leaf, so they cannot mask each other's types)."""
    key = o.key_or_group
    text = o.input_line
    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or o.is_delete():
        return
    if key in options:  # a group: optim=muon, experiment=stress
        for v in _values(o):
            if v is not None and str(v) not in options[key]:
                raise ConfigError(key, v, ", ".join(options[key]), f"there is no preset configs/{key}/{v}.yaml")
        return
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
        inside = next((n for n in sorted(nodes, key=len, reverse=True) if key.startswith(n + ".")), None)
        where = f"{inside} has no key {key[len(inside) + 1:]!r}" if inside else "no such key"
        if key in nodes:
            example = next(k for k in fields if k.startswith(key + "."))
            where = f"{key} is a group of keys, not a value; set one of them, e.g. {example}"
        elif close:
            where += f" (did you mean {' or '.join(close)}?)"
        raise ConfigError(key, _shown(o), "a key of the schema in train/config.py (all of them, with their values: "
                                          "python launch.py --cfg job)", where)
    if o.is_add():  # +key=value for a key the schema has already
        raise ConfigError(text.split("=", 1)[0], _shown(o), f"{key}=VALUE, without the +",
                          f"{key} exists already; + only adds keys, and the schema takes no new ones")
    for v in _values(o):
        if isinstance(v, str) and "${" in v:
            continue
        try:
            OmegaConf.update(node, key, v, merge=True)
        except Exception:
            raise ConfigError(key, v, describe_type(fields[key]), "wrong type") from None


def _shown(o):
    """The value as the user wrote it (a sweep's whole list)."""
    if o.is_sweep_override():
        return o.input_line.split("=", 1)[1]
    return o.value()


# -- the launch's jobs --------------------------------------------------------------------------
def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in EXTRA_CONFIG_DIRS)}]"] if EXTRA_CONFIG_DIRS else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=[*search, *overrides], return_hydra_config=True)


def jobs(parsed, raw: list[str], multirun: bool, config_name: str) -> list[tuple[list[str], object]]:
    """(task overrides, composed config with its `hydra` node) of every job the launch runs."""
    if not multirun:
        return [(raw, _compose(config_name, raw))]
    # Hydra reads the sweep lists (hydra.sweeper.params) of the config composed without the
    # sweeps: so does this, so that the jobs listed and checked are the jobs that run
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params, options = sweep_params(config_name, fixed), groups()
    for o in parsed:
        if o.is_sweep_override() and o.key_or_group in options:
            for v in _values(o):
                # as written: +group=option appends a group the defaults list lacks
                own = sweep_params(config_name, [*fixed, f"{o.get_key_element()}={v}"])
                if own != params:
                    raise ConfigError(o.key_or_group, _shown(o), f"one {o.key_or_group} per launch where an option "
                                      f"sweeps on its own (launch each: python launch.py -m {o.get_key_element()}={v} ...)",
                                      f"{o.key_or_group}={v} sets its own sweep "
                                      f"({', '.join(f'{k}={s}' for k, s in own.items())}), which Hydra does not run "
                                      f"when {o.key_or_group} itself is swept: one job per option would run")
    try:
        batches = sweep_batches(params, raw)
    except Exception:  # a sweeper of its own (ranges, intervals): Hydra checks each job as it starts
        return []
    return [(job, _compose(config_name, job)) for job in batches]


def sweep_params(config_name: str, overrides: list[str]) -> dict:
    """The config's own sweep lists (hydra.sweeper.params, which a preset sets)."""
    return dict(OmegaConf.select(_compose(config_name, overrides), "hydra.sweeper.params") or {})


def sweep_batches(params: dict, overrides: list[str]) -> list[list[str]]:
    """Each job's overrides: a config's sweep lists and the command line's, combined as Hydra's basic
    sweeper combines them (a key on the command line replaces the config's list)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    listed = [f"{k}={v}" for k, v in params.items()]
    [batches] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(listed + list(overrides)), None)
    return batches


def typed(cfg, job_num: int | None):
    """The job's Config, its out_dir as the job will see it."""
    hydra_node = cfg.hydra
    if job_num is None:
        out = Path(str(hydra_node.run.dir))
    else:
        with open_dict(cfg):
            cfg.hydra.job.num = job_num
        out = Path(str(hydra_node.sweep.dir)) / str(hydra_node.sweep.subdir)
    with open_dict(cfg):
        del cfg["hydra"]
    config: Config = OmegaConf.to_object(cfg)
    config.out_dir = str(out.resolve())
    return config


def check_job_directories(configs: list[Config]) -> None:
    """A sweep's job N resumes the run in out_dir/N (trainer.resume=auto): refused where that run is
    another job's, trained at other values of what varies between this sweep's jobs (a sweep run
    again with other values in the same out_dir would continue each run under another job's
    settings). Compared after each job's study stage has set its learning rate, as the run was."""
    import copy

    import yaml

    from train.run_config import NEUTRAL, as_dict, flatten, matches
    from train.study import apply_study

    studied = []
    for cfg in configs:
        cfg = copy.deepcopy(cfg)
        apply_study(cfg)
        studied.append(flatten(as_dict(cfg)))
    # what tells this sweep's jobs apart, and what told apart the jobs already in its directories
    # (a list cut to one value no longer varies now, but job 0 still trained at its first value)
    before = {d: flatten(yaml.safe_load((d / "config.yaml").read_text()) or {})
              for d in {Path(c.out_dir).parent for c in configs} for d in sorted(d.glob("*"))
              if (d / "config.yaml").is_file()}
    varying = {k for group in (studied, list(before.values())) for k in (group[0] if group else {})
               if not matches(k, NEUTRAL) and len({repr(s.get(k)) for s in group}) > 1}
    for job, (cfg, new) in enumerate(zip(configs, studied)):
        recorded = Path(cfg.out_dir) / "config.yaml"
        if cfg.trainer.resume != "auto" or not varying or not recorded.is_file():
            continue
        old = before[Path(cfg.out_dir)]
        order = list(new)
        for key in sorted(varying, key=lambda k: order.index(k) if k in order else len(order)):
            if key in old and key in new and old[key] != new[key]:
                raise ConfigError(key, new[key], f"{old[key]}, the value of the run in {cfg.out_dir}, or a new "
                                  f"out_dir for this sweep", f"a sweep's job {job} continues the run in "
                                  f"{cfg.out_dir}, which was trained with {key}={old[key]}")


def check(argv: list[str]) -> str | None:
    """Raise ConfigError for a launch that must not start; return the dry run's text, or None to
    let Hydra go ahead."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train import launcher
    from train.validate import validate
    from train.variants import condition, is_inert

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # Hydra prints its own usage
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path:
        return None
    EXTRA_CONFIG_DIRS[:] = [Path(args.config_dir).expanduser().resolve()] if args.config_dir else []
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError("override", " ".join(args.overrides), "KEY=VALUE, +KEY=VALUE or GROUP=OPTION; sweeps "
                          "KEY=A,B with -m", f"cannot parse the command line ({first})") from None
    fields, nodes, options, node = schema_fields(), _nodes(), groups(), OmegaConf.structured(Config)
    if any(_is_glob(o) for o in parsed):  # glob(*) over a group: its options, listed
        args.overrides = [_expand_glob(o, options) for o in parsed]
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    check_command_line(parsed)
    for o in parsed:
        check_override(o, fields, nodes, options, node)
    sweeps = [o for o in parsed if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    if sweeps and not args.multirun and not args.cfg:
        o = sweeps[0]
        raise ConfigError(o.key_or_group, _shown(o), f"one value, or the sweep with -m (python launch.py -m "
                          f"{o.input_line} ...)", "several values need -m")
    if args.cfg:  # printing the config: the keys are checked, nothing will run
        return None
    try:
        found = jobs(parsed, args.overrides, args.multirun, args.config_name or "config")
    except HydraException as e:  # Hydra composes the same jobs and fails alike: refused here, unchecked never
        first = next((line for line in str(e).strip().splitlines() if line.strip()), type(e).__name__)
        raise ConfigError("override", " ".join(args.overrides), "overrides Hydra can compose (GROUP=OPTION for a "
                          "group in the defaults list, +GROUP=OPTION to add one, KEY=VALUE)",
                          f"cannot compose the config ({first})") from None
    local = all(str(cfg.hydra.launcher._target_).endswith("BasicLauncher") for _, cfg in found)
    try:
        configs = [typed(cfg, i if args.multirun else None) for i, (_, cfg) in enumerate(found)]
    except Exception as e:  # an interpolation that does not resolve (optim.lr=${nope}), a wrong type
        raise ConfigError("override", " ".join(args.overrides), "values of the schema's types; interpolations "
                          "${KEY} of existing keys", str(e).strip().splitlines()[0]) from None
    shared = next((c.out_dir for i, c in enumerate(configs) if c.out_dir in {d.out_dir for d in configs[:i]}), None)
    if shared is not None:
        raise ConfigError("hydra.sweep.subdir", shared, "a directory of its own per job (the default: the job "
                          "number, ${hydra.job.num})", "two or more jobs of this sweep would write (and resume) "
                          "the same run there")
    for cfg in configs:  # every job, submitted ones too: a bad value is refused before any job runs
        validate(cfg, submitted=not local)
    if args.multirun:
        check_job_directories(configs)
    if not local:
        return None  # SLURM/submitit: train.launcher.SubmititLayout checks the layout, each job its node
    for o in parsed:
        key = o.key_or_group
        if key in fields and configs and condition(key) and all(is_inert(key, c) for c in configs):
            needs = condition(key)[0]
            raise ConfigError(key, _shown(o), f"add {needs}, or leave {key} out",
                              f"it has no effect unless {needs}")
    for (job, _), cfg in zip(found, configs):
        launcher.check_multi_node_out_dir(cfg, [o for o in job if not o.startswith(("hydra.", "hydra/"))])
    if not configs or not all(c.launcher.dry_run for c in configs):
        return None
    texts = []
    for i, ((job, _), cfg) in enumerate(zip(found, configs)):
        task = [o for o in job if not o.lstrip("+").startswith(("hydra.", "hydra/"))]
        text = launcher.describe(launcher.plan_launch(cfg, task), cfg, task)
        texts.append(f"job {i} ({' '.join(task)}):\n{text}" if args.multirun else text)
    return "\n".join(texts)


def main(argv: list[str]) -> None:
    """Exit with status 2 and one line for a refused launch, 0 after a dry run; return otherwise."""
    try:
        dry_run = check(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if dry_run is not None:
        print(dry_run, flush=True)
        sys.exit(0)
