import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import Config, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
os.environ.setdefault("WANDB_SILENT", "true")
register_configs()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Workers split the cores; OpenMP threads beyond them spin against each other (a step slows
    # several-fold). Subprocess runs inherit the share through the environment.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_sessionstart(session):
    """Before the workers start (xdist starts them last), build the fused CPU kernels one per core:
    otherwise the first test to need each builds it (~10 s, ~25 s for hyper_connection) while
    every other test that needs it waits on the build's lock."""
    if hasattr(session.config, "workerinput"):
        return
    from concurrent.futures import ThreadPoolExecutor

    from model import cpu_kernels

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        # the longest build first, while the other cores take the short ones
        sources = sorted(cpu_kernels.CSRC.glob("*.cpp"), key=lambda p: -p.stat().st_size)
        list(pool.map(cpu_kernels.extension, [p.stem for p in sources]))


def pytest_collection_modifyitems(config, items):
    """Longest first: the xdist groups (each a module's runs, minutes on one worker), then the
    other end-to-end tests, then the rest, so that no long group starts when the other worker is
    nearly done. The sort is stable: within each class, files and tests keep their order."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("xdist_group") else
               1 if item.get_closest_marker("slow") else 2)


# Metrics that measure the machine, not the training: they differ between otherwise identical runs.
MEASURED = frozenset({"tokens_per_s", "mfu", "mem/peak_gb"})


def without_measured(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def metrics_rows(run_dir) -> list[dict]:
    """A run's metrics.jsonl, one dict per step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# Small enough that a step takes milliseconds; shared by most tests.
TINY = [
    "model=tiny", "data.seq_len=32", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
    "trainer.eval_batches=2", "trainer.progress=false", "optim.warmup_steps=2", "logger.wandb.mode=disabled",
]


# V4-tiny at test size: a short indexer warm-up so that runs see both the dense and sparse phases.
V4_RUN = ["model=v4_tiny", "data.seq_len=64", "trainer.micro_batch_size=8", "trainer.global_batch_size=8",
          "model.attn.indexer_warmup_steps=20", "model.attn.window=16", "optim=muon", "optim.warmup_steps=5",
          "optim.ns_dtype=fp32"]  # bf16 matmuls are emulated on CPU: 3.5× slower steps


def compose_config(overrides=(), out_dir=None, cache_dir=None) -> Config:
    extra = []
    if out_dir is not None:
        extra.append(f"out_dir={out_dir}")
    if cache_dir is not None:
        extra.append(f"data.cache_dir={cache_dir}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *extra])
    return OmegaConf.to_object(cfg)


@pytest.fixture
def fresh_compiler():
    """A test that compiles starts from an empty dynamo cache, as a fresh run does: code compiled
    by earlier tests in this worker is not reused, and their recompilations do not count against
    dynamo's limit per function (past it, it runs the code eagerly, silently)."""
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session, shared by the xdist workers (their base
    directories' parent): each corpus is tokenized once, under data.prepare's lock."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "data_cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture
def tiny_config(tmp_path, data_cache):
    def make(*overrides) -> Config:
        return compose_config([*TINY, *overrides], out_dir=tmp_path / "run", cache_dir=data_cache)
    return make


def launch_env(**extra) -> dict:
    """This process's environment without the variables that would make a child think it is a rank."""
    launched = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launched}
    return env | {"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"} | extra


def launch(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` as a user would, capturing its output. On a timeout (or Ctrl-C)
    its whole process group dies with it: killing launch.py alone left torchrun and its ranks
    running (a launch that relaunched itself in every rank left 251 processes behind)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *map(str, args)], cwd=cwd or ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or launch_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Crash(Exception):
    """Stands for a process killed mid-run."""


def interrupted_run(cfg, after_step: int, prepare=None) -> None:
    """Train `cfg` until `after_step` steps are done, then die as a killed process would: no
    final checkpoint, no summary; only what the run had written by then survives. `prepare(trainer)`
    runs before training (e.g. to inject faults the uninterrupted run also had)."""
    from train.trainer import Trainer

    trainer = Trainer(cfg)
    if prepare is not None:
        prepare(trainer)
    step = trainer.train_step

    def crashing_step():
        if trainer.step == after_step:
            raise Crash
        return step()

    trainer.train_step = crashing_step
    try:
        trainer.fit()
    except Crash:
        return
    raise AssertionError(f"the run ended before step {after_step}")


def edit_configs(run, old, new):
    """The run's config.yaml and each checkpoint's own (which the commands read first), the
    checkpoint sealed again: written so, not damaged since."""
    from train.manifest import read, seal

    run_config = run / "config.yaml"
    run_config.write_text(run_config.read_text().replace(old, new, 1))
    for ckpt in run.glob("checkpoints/step_*"):
        (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text().replace(old, new, 1))
        fields = {k: v for k, v in read(ckpt).items() if k != "files"}
        (ckpt / "manifest.json").unlink()
        seal(ckpt, **fields)


def drop_recorded_configs(out_dir) -> None:
    """Make a run's checkpoints look like those written before checkpoints held their config: the
    run's and each checkpoint's config.yaml removed (and from the manifests, which stay valid)."""
    import json

    for config in Path(out_dir).rglob("config.yaml"):
        config.unlink()
    for manifest in Path(out_dir).glob("checkpoints/step_*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["files"].pop("config.yaml", None)
        manifest.write_text(json.dumps(data))


WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "it"]


def word_corpus(directory: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Text files of random sentences over ten words: a corpus whose every byte is in a small set."""
    import random

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "." for _ in range(40)]
        (directory / f"doc{i:02d}.txt").write_text("\n".join(sentences) + "\n")
    return directory


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache) -> Path:
    """A tiny byte-level model trained for 80 steps on `word_corpus` (one rank, ZeRO-0): a
    finished run directory for the after-training commands. Tests that write copy it first."""
    from train.trainer import Trainer

    root = tmp_path_factory.mktemp("trained")
    corpus = word_corpus(root / "corpus")
    cfg = compose_config([*TINY, "data.source=files", f"data.path={corpus}", "trainer.max_steps=80",
                          "trainer.eval_every=40", "optim.lr=1e-2"], out_dir=root / "run", cache_dir=data_cache)
    Trainer(cfg).fit()
    return root / "run"
