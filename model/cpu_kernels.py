"""Builds and loads the model's fused CPU kernels (model/csrc/<name>.cpp), one C++ extension per
file, with torch's C++ extension loader on first use: cached under ~/.cache/torch_extensions, one
build per CPU instruction set. Each file registers its functions as operators of its own namespace
(`torch.ops.v4lab_<name>_<version>`, TORCH_LIBRARY) rather than as a Python module: it then includes ATen
alone, not torch/extension.h with pybind11 and the C++ frontend, and builds in ~8 s instead of ~22.
Where a file cannot be built (no compiler), `extension` returns None after one warning and its
callers run their eager PyTorch path, which computes the same thing.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import re
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
# -Wno-psabi: GCC notes that helpers returning vector types would pass them differently on other
# ISAs; they are internal to the build, so the note is noise on every CPU without AVX-512.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
log = logging.getLogger(__name__)


def _isa_tag() -> str:
    """The build is compiled for this CPU (-march=native); a cache shared by different CPUs keeps one build each."""
    flags = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:  # x86: model name, flags; ARM: Features, CPU part
            flags += "".join(sorted({line for line in f if line.startswith(("flags", "Features", "model name",
                                                                              "CPU part", "CPU implementer"))}))
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


class _Kernels:
    """The built library's operators, called with autocast off: their BLAS calls must stay in the
    accumulation dtype the kernels read back."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def call(*args):
            with torch.autocast("cpu", enabled=False):
                return fn(*args)

        return call


# A build takes ~10-25 s; what still works in a build directory after this long is not a build.
ORPHAN_WAIT_S = 600


def _working_in(directory: Path) -> list[str]:
    """Other processes whose working directory is `directory` ("pid name"): torch runs a build's
    ninja and compilers there, and they outlive a builder killed on its own (the OOM killer takes
    one process)."""
    found = []
    for proc in Path("/proc").iterdir() if Path("/proc").is_dir() else ():  # Linux; elsewhere none known
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and os.readlink(proc / "cwd") == str(directory):
                found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
        except OSError:  # gone, or another user's
            continue
    return found


def _wait_for_orphans(directory: Path) -> None:
    deadline, said = time.monotonic() + ORPHAN_WAIT_S, False
    while (working := _working_in(directory)) and time.monotonic() < deadline:
        if not said:
            log.warning(f"waiting for {', '.join(working)}, left working in {directory} by a kernel build that did not finish")
            said = True
        time.sleep(0.2)


@contextlib.contextmanager
def build_lock(name: str):
    """Held while torch's loader builds or loads extension `name`. torch's own lock is a file that
    a build killed half-way leaves behind, and its loader waits on that file without end: every
    later run, and any run already waiting for that build, would hang at its first step. This one
    is an flock, which the kernel releases when its holder dies; whoever holds it knows that no
    other loader is at work, so a torch lock file it finds is a dead build's: once that build's
    orphaned compilers have finished (or a loader without this lock, an older checkout sharing the
    cache, has), it is removed. Where the file system has no flock, torch's lock alone, as before."""
    from torch.utils import cpp_extension

    directory = Path(cpp_extension._get_build_directory(name, verbose=False)).resolve()
    fd = None
    try:  # read-only: a cache shared with other users, whose flock file this user cannot write
        fd = os.open(directory / "v4lab.flock", os.O_RDONLY | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a live build; a killed one's flock is gone with it
    except OSError as e:
        log.warning(f"no build lock in {directory} ({e}); building under torch's lock alone")
        if fd is not None:
            os.close(fd)
            fd = None
    try:
        stale = directory / "lock"
        if fd is not None and stale.exists():
            _wait_for_orphans(directory)
            log.warning(f"removing {stale}: left by a kernel build that did not finish")
            stale.unlink(missing_ok=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _text_with_headers(path: Path) -> bytes:
    """The file's bytes and those of the csrc/ headers it includes (`#include "name.h"`), which its
    version covers: an edited header makes a new build as an edited file does."""
    text = path.read_bytes()
    headers = re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join((path.parent / h.decode()).read_bytes() for h in headers)


@functools.cache
def extension(source: str):
    """The kernels of model/csrc/<source>.cpp, or None where they cannot be built."""
    from torch.utils import cpp_extension

    path = CSRC / f"{source}.cpp"
    # The operators' namespace names this version of the file: a process that loads an edited file
    # again (a notebook) gets a new library, and registering a namespace twice would abort it.
    version = hashlib.sha1(_text_with_headers(path) + " ".join(CFLAGS).encode()).hexdigest()[:10]
    name, namespace = f"v4lab_{source}_{_isa_tag()}", f"v4lab_{source}_{version}"
    log.info(f"loading the fused CPU kernels of {source}.cpp (the first use on a machine compiles them, ~10 s)")
    try:
        with build_lock(name):
            cpp_extension.load(name=name, sources=[str(path)], is_python_module=False,
                               extra_cflags=[*CFLAGS, f"-DV4LAB_OPS={namespace}"], extra_ldflags=["-fopenmp"])
        return _Kernels(getattr(torch.ops, namespace))
    except Exception as e:  # no compiler, or a broken toolchain: the eager path computes the same thing
        warnings.warn(f"fused CPU kernels of {source}.cpp unavailable, using eager PyTorch: {e}")
        return None


# source → whether its kernels built, once asked: compiled code reads this plain dict (a guarded
# lookup) instead of tracing into the build
known: dict[str, bool] = {}


def available(source: str) -> bool:
    """Builds or loads model/csrc/<source>.cpp on first call; whether it can be used."""
    if source not in known:
        known[source] = extension(source) is not None
    return known[source]


def load_for(model_cfg) -> None:
    """Build or load the kernels a model of `model_cfg` uses, now: not in its first training step,
    whose time counts as training (tokens/s, MFU), nor inside a traced frame."""
    sources = ["rms_norm", "rope", "swiglu"]
    if model_cfg.residual != "residual" and model_cfg.fused_hc:
        sources.append("hyper_connection")
    if model_cfg.attention == "v4":
        sources += ["index_topk", "gathered"]
    for source in sources:
        available(source)


def takes(source: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether model/csrc/<source>.cpp's kernel runs on x: a contiguous CPU tensor of one of
    `dtypes`, outside a torch.compile trace (compiled code takes the PyTorch path, which Inductor
    fuses), and kernels that build."""
    return (x.device.type == "cpu" and x.dtype in dtypes and x.is_contiguous()
            and not torch.compiler.is_compiling() and available(source))
