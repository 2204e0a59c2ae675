"""How one `python launch.py` becomes the ranks of a run. No process manager of our own: torchrun
(one node, or each node of a rendezvous), DeepSpeed's launcher (a hostfile) or SLURM through
hydra-submitit-launcher (one task per rank) starts the ranks; this module builds their command
line, forwards pre-emption signals to it, and maps a submitit task onto torch's rank variables.

    launcher.nproc_per_node=N                        torchrun --standalone, N ranks here
    launcher.nnodes=M launcher.node_rank=K ...       torchrun static rendezvous: run on every node
    launcher.hostfile=FILE launcher.nnodes=M ...     DeepSpeed's launcher starts every node (pdsh)
    -m hydra/launcher=slurm launcher.nnodes=M ...    sbatch, nodes=M, tasks_per_node=N
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError
from train.config import Config

# Sent to this process, these go on to the ranks. A terminal's Ctrl-C (SIGINT) also reaches the
# launcher, which hands it to its ranks itself: this process just keeps waiting for them.
FORWARDED = (signal.SIGTERM, signal.SIGUSR2)
ENTRY = Path(__file__).resolve().parents[1] / "launch.py"


def world_size(cfg: Config) -> int:
    return cfg.launcher.nnodes * cfg.launcher.nproc_per_node


def check_multi_node_out_dir(cfg: Config, overrides: list[str]) -> None:
    """Every node resolves the default out_dir (a timestamp) on its own: several nodes need one given."""
    multi_node = cfg.launcher.nnodes > 1 or cfg.launcher.hostfile
    if multi_node and "RANK" not in os.environ and not any(o.lstrip("+").startswith("out_dir=") for o in overrides):
        raise ConfigError("out_dir", cfg.out_dir, "an explicit out_dir=PATH on a file system every node shares",
                          "the default is a timestamp, which each node would resolve differently")


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile format: `hostname slots=N` per line, `#` comments."""
    hosts = []
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ValueError(f"line {n} of {path} reads {line!r}; expected 'HOSTNAME slots=N'")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise ValueError(f"{path} lists no hosts")
    return hosts


@dataclass
class LaunchPlan:
    """What this node runs (`command`), what the other nodes run, and the variables set on top of
    the inherited environment."""
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    other_nodes: dict[int, list[str]] = field(default_factory=dict)
    note: str = ""


def rank_arguments(cfg: Config, overrides: list[str], node_rank: int | None = None) -> list[str]:
    """launch.py and the user's overrides, as each rank re-reads them: the absolute out_dir, no dry run."""
    keep = [o for o in overrides if not o.startswith(("out_dir=", "launcher.dry_run=", "launcher.node_rank="))]
    if node_rank is not None and cfg.launcher.nnodes > 1:
        keep.append(f"launcher.node_rank={node_rank}")
    return [str(ENTRY), *keep, f"out_dir={cfg.out_dir}"]


def plan_launch(cfg: Config, overrides: list[str]) -> LaunchPlan | None:
    """The launcher command for this config, or None when this process is itself the only rank
    (or already one of several)."""
    lc = cfg.launcher
    if "RANK" in os.environ or world_size(cfg) == 1 and not lc.hostfile:
        return None
    # torchrun would set 1 and warn; say it ourselves, and give ranks a fair share of the cores.
    env = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // lc.nproc_per_node))}
    py = sys.executable
    if lc.hostfile:
        # without launcher.master_addr DeepSpeed takes the first host of the hostfile
        address = [f"--master_addr={lc.master_addr}"] if lc.master_addr else []
        cmd = [py, "-m", "deepspeed.launcher.runner", f"--hostfile={Path(lc.hostfile).expanduser().resolve()}",
               f"--num_nodes={lc.nnodes}", f"--num_gpus={lc.nproc_per_node}", *address,
               f"--master_port={lc.master_port}", "--no_local_rank", *rank_arguments(cfg, overrides)]
        return LaunchPlan(cmd, env, note="DeepSpeed's launcher starts the other nodes over pdsh/ssh, exporting "
                                         "PYTHON*/MLFLOW*/MV2*/UCX* variables and those in .deepspeed_env; "
                                         "stop signals reach this node's ranks only")
    if lc.nnodes == 1:
        cmd = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={lc.nproc_per_node}",
               *rank_arguments(cfg, overrides)]
        return LaunchPlan(cmd, env)

    def node_command(k: int) -> list[str]:
        return [py, "-m", "torch.distributed.run", f"--nnodes={lc.nnodes}", f"--node_rank={k}",
                f"--nproc_per_node={lc.nproc_per_node}", f"--master_addr={lc.master_addr}",
                f"--master_port={lc.master_port}", *rank_arguments(cfg, overrides, k)]
    others = {k: node_command(k) for k in range(lc.nnodes) if k != lc.node_rank}
    return LaunchPlan(node_command(lc.node_rank), env, others,
                      note="each node runs `python launch.py` with its own launcher.node_rank; out_dir must be "
                           "on a file system every node shares")


def describe(plan: LaunchPlan | None, cfg: Config, overrides: list[str]) -> str:
    lines = ["dry run (launcher.dry_run=true): nothing was started."]
    if plan is None:
        lines += ["This process would train as the only rank:",
                  "  " + shlex.join([sys.executable, *rank_arguments(cfg, overrides)])]
        return "\n".join(lines)
    lines += [f"node {cfg.launcher.node_rank} would run:" if plan.other_nodes else "would run:",
              "  " + shlex.join(plan.command)]
    for k, cmd in plan.other_nodes.items():
        lines += [f"node {k} would run:", "  " + shlex.join(cmd)]
    lines.append("environment: inherited" + ("".join(f"\n  {k}={v}" for k, v in plan.env.items())
                                             if plan.env else " unchanged"))
    if plan.note:
        lines.append(f"note: {plan.note}")
    return "\n".join(lines)


def execute(plan: LaunchPlan, cfg: Config) -> int:
    """Run the launcher and wait. SIGTERM/SIGUSR2 sent to this process go straight to this node's
    ranks (the launcher's children): they finish the step, checkpoint and exit 0, so the launcher
    ends cleanly too, without its own shutdown deadline. A run stopped that way exits 0."""
    import psutil

    started = time.time()
    child = subprocess.Popen(plan.command, env=os.environ | plan.env)

    def forward(signum, frame):
        try:
            ranks = psutil.Process(child.pid).children()
        except psutil.Error:  # the launcher is gone already
            return
        for proc in ranks or [child]:  # before the ranks exist, the launcher itself
            try:
                proc.send_signal(signum)
            except psutil.Error:
                pass

    def keep_waiting(signum, frame):
        print("waiting for the ranks to finish their step and checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, keep_waiting)
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary = Path(cfg.out_dir) / "summary.json"
    if code and summary.exists() and summary.stat().st_mtime >= started:
        if json.loads(summary.read_text()).get("status") == "preempted":
            return 0
    if code:
        print(f"error: the ranks' launcher exited with status {code}; its message or the failing rank's is above. "
              f"Checkpoints already written in {Path(cfg.out_dir) / 'checkpoints'} are intact; "
              f"run the same command to resume.", file=sys.stderr, flush=True)
    return code


# -- SLURM / submitit ---------------------------------------------------------------------------
def submitit_job():
    """The submitit job environment this process runs in, or None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return submitit.JobEnvironment()


def adopt_submitit_task(cfg: Config) -> None:
    """Under hydra-submitit-launcher each task is one rank: export the variables torch reads."""
    job = submitit_job()
    if job is None or "RANK" in os.environ or job.num_tasks == 1 and world_size(cfg) == 1:
        return
    if job.num_tasks != world_size(cfg):
        raise ConfigError("hydra.launcher.tasks_per_node", job.num_tasks // job.num_nodes,
                          f"launcher.nproc_per_node={cfg.launcher.nproc_per_node} tasks on each of "
                          f"launcher.nnodes={cfg.launcher.nnodes} nodes (hydra/launcher=slurm sets both)",
                          f"the job has {job.num_tasks} task(s) in all, one per rank is expected")
    job_id = os.environ.get("SLURM_JOB_ID") or "".join(ch for ch in str(job.job_id) if ch.isdigit()) or "0"
    os.environ.update(submitit_rank_env(job.global_rank, job.local_rank, job.num_tasks, job.num_nodes,
                                        job.node, job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
                                        cfg.launcher.master_port, int(job_id)))


def submitit_rank_env(global_rank, local_rank, num_tasks, num_nodes, node, master, port, job_id: int) -> dict:
    # Jobs of one sweep may share a node: offset the port by the job id (SLURM's is unique per
    # array task) so that they do not collide, staying inside the port range.
    offset = job_id % 1000
    port = port + offset if port + offset <= 65535 else port - offset
    return {"RANK": str(global_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(num_tasks),
            "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes), "GROUP_RANK": str(node),
            "MASTER_ADDR": master, "MASTER_PORT": str(port)}


def sbatch_script(launcher_params: dict, n_jobs: int) -> str:
    """The sbatch file hydra-submitit-launcher would submit for these `hydra.launcher` values
    (submitit's own text, from an executor that skips its check for `srun` on this machine)."""
    from submitit.slurm.slurm import SlurmExecutor

    class DryRunExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    ex = DryRunExecutor(folder=launcher_params["submitit_folder"], max_num_timeout=launcher_params["max_num_timeout"])
    params = {k: v for k, v in launcher_params.items()
              if v is not None and k not in ("_target_", "submitit_folder", "max_num_timeout")}
    ex.update_parameters(**ex._convert_parameters(params))
    if n_jobs > 1:  # a sweep is submitted as one job array
        ex.parameters["map_count"] = n_jobs
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def sweep_size(task_overrides: list[str], sweep_params: dict | None = None) -> int:
    """Jobs of a sweep: the command line's lists and the config's own (hydra.sweeper.params, which
    a preset sets), combined as Hydra's basic sweeper combines them (train/preflight.py)."""
    from train.preflight import sweep_batches

    return len(sweep_batches(dict(sweep_params or {}), task_overrides))


class SubmititLayout(Callback):
    """Runs in the submitting process before hydra-submitit-launcher submits anything: checks that
    the job layout is one task per rank, and answers launcher.dry_run with the sbatch file."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self._check(config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:  # Hydra would turn it into a warning and submit anyway
            print(f"error: cannot check the submitit job layout: {e!r}", file=sys.stderr, flush=True)
            sys.exit(2)

    def _check(self, config: DictConfig) -> None:
        params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        if "submitit" not in str(params.get("_target_", "")):
            return
        lc = config.launcher
        swept = [o for o in config.hydra.overrides.task if o.startswith("launcher.") and "," in o]
        if swept:  # a sweep's values, not one value: ConfigError's KEY=repr(VALUE) would misquote them
            print(f"error: invalid configuration {swept[0]}: a SLURM sweep submits one job layout. Accepted: "
                  f"one value per launcher key; sweep other keys, or submit one sweep per layout.",
                  file=sys.stderr, flush=True)
            sys.exit(2)
        if (params["nodes"], params["tasks_per_node"]) != (lc.nnodes, lc.nproc_per_node):
            raise ConfigError("hydra.launcher.tasks_per_node", params["tasks_per_node"],
                              f"tasks_per_node=launcher.nproc_per_node={lc.nproc_per_node} and nodes=launcher.nnodes="
                              f"{lc.nnodes} (hydra/launcher=slurm sets both from launcher.*)",
                              f"with hydra.launcher.nodes={params['nodes']} the job does not have one task per rank")
        if not lc.dry_run:
            return
        n_jobs = sweep_size(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        if params["_target_"].endswith("SlurmLauncher"):
            print(f"dry run (launcher.dry_run=true): nothing was submitted. sbatch would receive "
                  f"({n_jobs} job(s)):\n{sbatch_script(params, n_jobs)}")
        else:
            print(f"dry run (launcher.dry_run=true): nothing was started. submitit would start {n_jobs} local job(s) "
                  f"of {params['tasks_per_node']} task(s).")
        print(f"each task is one rank: RANK=global task id, LOCAL_RANK=task id on its node, "
              f"WORLD_SIZE={lc.nnodes * lc.nproc_per_node}, MASTER_ADDR=first node of the job, "
              f"MASTER_PORT={lc.master_port}+(job id mod 1000)", flush=True)
        sys.exit(0)
