"""Process-group set-up. Launched ranks (torchrun, DeepSpeed's launcher) bring their environment;
a plain `python launch.py` becomes a one-rank group of its own, so the same DeepSpeed code path
runs everywhere."""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()  # SLURM may show each task its own GPU only
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def die_with_launcher() -> None:
    """A rank started by torchrun dies with it: were torchrun killed outright (SIGKILL, no chance
    to stop its workers), orphaned ranks would train on and write into the run directory."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # it died before we asked
        os._exit(1)


def init_distributed(timeout_s: int = 600) -> tuple[int, int, torch.device]:
    """(rank, world size, device); idempotent, so tests can build several trainers in one process."""
    import deepspeed

    if not dist.is_initialized():
        die_with_launcher()
        # Groups made later with new_group (DeepSpeed's data-parallel group, whose all-reduces
        # carry the gradients) take torch's module default, 30 min, not the world group's timeout.
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = \
            datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" not in os.environ:
            # A one-rank group of our own. Only LOCAL_RANK is exported (DeepSpeed insists on it):
            # RANK, WORLD_SIZE and the rendezvous address would make child processes (a spawned
            # launch, a test's subprocess) believe they were launched as ranks of this group.
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
        else:  # launched: the launcher's rendezvous, with our timeout (DeepSpeed's CPU path drops it)
            dist.init_process_group(backend, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        open_host_group()
    return dist.get_rank(), dist.get_world_size(), device_for(int(os.environ.get("LOCAL_RANK", 0)))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# Rank 0's work on the host that the other ranks wait for (preparing a corpus, converting a
# checkpoint) can outlast a collective's timeout (launcher.collective_timeout_s, 10 min by
# default), after which NCCL's watchdog would abort the job: they wait in a gloo group of their own
# with a long one. A rank that dies still ends the wait at once (its sockets close).
HOST_WORK_TIMEOUT = datetime.timedelta(hours=12)
_host_group = None


def open_host_group() -> None:
    """Called by every rank in step, after the world group is up."""
    global _host_group
    _host_group = dist.new_group(backend="gloo", timeout=HOST_WORK_TIMEOUT) if dist.get_world_size() > 1 else None


def wait_for_rank0(objects: list | None = None) -> None:
    """Wait until rank 0 arrives here, however long its host work takes; with `objects`, every rank
    gets rank 0's (broadcast_object_list)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if objects is None:
            dist.barrier(group=_host_group)
        else:
            dist.broadcast_object_list(objects, src=0, group=_host_group)


def from_rank0(work: Callable[[], T], catch: type[Exception], error: Callable[[Exception], Exception]) -> T:
    """`work()` on rank 0 alone, the other ranks waiting however long it takes (wait_for_rank0):
    every rank returns its result, or raises `error(e)` where it raised `catch` (else the other ranks
    would wait in their next collective for a rank that has left)."""
    outcome = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = [(work(), None)]
        except catch as e:
            outcome = [(None, error(e))]
    wait_for_rank0(outcome)
    result, failure = outcome[0]
    if failure is not None:
        raise failure
    return result


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def sum_over_ranks(n: int, device: torch.device) -> int:
    """n summed over ranks, through the training device (NCCL reduces CUDA tensors only)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = torch.tensor(n, dtype=torch.int64, device=device)
        dist.all_reduce(x)
        return int(x)
    return n


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Tear the process group down before the interpreter exits: gloo's threads still running at
    exit abort the process ("terminate called without an active exception", seen on rank 1).
    After a failure, without the barrier: a peer that is hung or gone would hold this rank for a
    whole further collective timeout."""
    if dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        global _host_group
        _host_group = None
        dist.destroy_process_group()
