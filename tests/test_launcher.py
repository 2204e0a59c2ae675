"""`launcher.dry_run=true` prints the exact launcher command lines without running anything: one
node with torchrun, a torchrun rendezvous across nodes, a DeepSpeed hostfile, SLURM's sbatch file."""
import os
import shlex
import sys

import pytest

from tests.conftest import ROOT, launch, launch_env

PY = sys.executable
ENTRY = str(ROOT / "launch.py")


def dry_run(tmp_path, *args, env=None):
    out = tmp_path / "run"
    proc = launch("launcher.dry_run=true", f"out_dir={out}", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists(), "a dry run wrote its out_dir"
    return out, proc.stdout


def commands(stdout):
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("  ") and PY in line]


def test_one_process(tmp_path):
    out, stdout = dry_run(tmp_path, "seed=3")
    assert commands(stdout) == [[PY, ENTRY, "seed=3", f"out_dir={out}"]]


def test_local_ranks_use_torchrun(tmp_path):
    """torchrun, and each rank's share of the cores as OMP_NUM_THREADS, unless the user set it."""
    env = {k: v for k, v in launch_env().items() if k != "OMP_NUM_THREADS"}  # the test workers set it
    out, stdout = dry_run(tmp_path, "launcher.nproc_per_node=2", "trainer.global_batch_size=32", env=env)
    assert commands(stdout) == [[PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ENTRY,
                                 "launcher.nproc_per_node=2", "trainer.global_batch_size=32", f"out_dir={out}"]]
    assert f"OMP_NUM_THREADS={max(1, os.cpu_count() // 2)}" in stdout
    _, stdout = dry_run(tmp_path, "launcher.nproc_per_node=2", "trainer.global_batch_size=32",
                        env=launch_env(OMP_NUM_THREADS="3"))
    assert "OMP_NUM_THREADS" not in stdout


@pytest.mark.parametrize("rank", [1, 0])
def test_torchrun_rendezvous_across_nodes(tmp_path, rank):
    """Node 0 joins the rendezvous like the others (not torchrun --standalone); each node's ranks
    share its cores: OMP_NUM_THREADS is the cores per local rank, whatever the number of nodes."""
    args = ["launcher.nnodes=3", f"launcher.node_rank={rank}", "launcher.master_addr=10.1.2.3",
            "launcher.master_port=4567", "trainer.global_batch_size=48"]
    env = {k: v for k, v in launch_env().items() if k != "OMP_NUM_THREADS"}  # the test workers set it
    out, stdout = dry_run(tmp_path, *args, env=env)
    shared = args[0:1] + args[2:]

    def node(k):
        return [PY, "-m", "torch.distributed.run", "--nnodes=3", f"--node_rank={k}", "--nproc_per_node=1",
                "--master_addr=10.1.2.3", "--master_port=4567", ENTRY, *shared, f"launcher.node_rank={k}",
                f"out_dir={out}"]
    assert commands(stdout) == [node(rank), *(node(k) for k in range(3) if k != rank)]
    assert all(f"node {k} would run" in stdout for k in range(3))
    assert f"OMP_NUM_THREADS={os.cpu_count()}\n" in stdout


def test_deepspeed_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two boxes\nworker-1 slots=8\nworker-2 slots=8\n")
    args = [f"launcher.hostfile={hostfile}", "launcher.nnodes=2", "launcher.nproc_per_node=8",
            "launcher.master_addr=worker-1", "trainer.global_batch_size=256"]
    out, stdout = dry_run(tmp_path, *args)
    assert commands(stdout) == [[PY, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--num_nodes=2",
                                 "--num_gpus=8", "--master_addr=worker-1", "--master_port=29500", "--no_local_rank",
                                 ENTRY, *args, f"out_dir={out}"]]


@pytest.mark.parametrize("hosts,layout", [
    ("worker-1 slots=1\n", []),
    ("worker-1 slots=2\nworker-2 slots=2\n", ["launcher.nnodes=2", "trainer.global_batch_size=32"]),
], ids=["one host", "two hosts"])
def test_deepspeed_hostfile_without_master_addr(tmp_path, hosts, layout):
    """DeepSpeed takes the hostfile's first host as the master (no launcher.master_addr needed), and
    a hostfile of one host still goes through its launcher: that host may be another machine."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hosts)
    args = [f"launcher.hostfile={hostfile}", *layout]
    out, stdout = dry_run(tmp_path, *args)
    assert commands(stdout) == [[PY, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
                                 f"--num_nodes={len(hosts.splitlines())}", "--num_gpus=1", "--master_port=29500",
                                 "--no_local_rank", ENTRY, *args, f"out_dir={out}"]]


@pytest.mark.parametrize("args,key", [
    (["launcher.hostfile=/no/such/hosts"], "launcher.hostfile"),
    (["launcher.nnodes=2", "launcher.node_rank=2", "trainer.global_batch_size=32"], "launcher.node_rank"),
    (["launcher.master_port=70000"], "launcher.master_port"),
    (["launcher.nnodes=2", "trainer.global_batch_size=32"], "launcher.master_addr"),
])
def test_bad_launcher_settings_are_refused(tmp_path, args, key):
    proc = launch("launcher.dry_run=true", f"out_dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2 and f"invalid configuration {key}=" in proc.stderr


def test_slurm_sbatch_file(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch("-m", "hydra/launcher=slurm", "launcher.dry_run=true", f"out_dir={sweep}", "launcher.nnodes=2",
                  "launcher.nproc_per_node=4", "trainer.global_batch_size=128", "seed=0,1,2",
                  "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --array=0-2%3", "#SBATCH --signal=USR2@120",
                 "export SUBMITIT_EXECUTOR=slurm"):
        assert line in proc.stdout, line
    assert f"srun --unbuffered --output {sweep}/.submitit/" in proc.stdout
    assert not list(sweep.glob("[0-9]*")), "a dry run started a job"
    # a preset's own sweep lists count: ablation_residual_optim is 2 optimizers × 3 residuals × 2 seeds
    proc = launch("-m", "hydra/launcher=slurm", "launcher.dry_run=true", f"out_dir={sweep}",
                  "experiment=ablation_residual_optim")
    assert proc.returncode == 0 and "sbatch would receive (12 job(s))" in proc.stdout and "#SBATCH --array=0-11" \
        in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("layout,words", [
    (["launcher.nproc_per_node=2"], "hydra.launcher.tasks_per_node=1"),
    (["launcher.nnodes=2", "hydra.launcher.nodes=4"], "with hydra.launcher.nodes=4 the job does not have one task"),
], ids=["tasks", "nodes"])
def test_slurm_layout_must_be_one_task_per_rank(tmp_path, layout, words):
    proc = launch("-m", "hydra/launcher=submitit_slurm", "launcher.dry_run=true", f"out_dir={tmp_path / 's'}",
                  *layout, "trainer.global_batch_size=32")
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("hosts", [None, "worker-1 slots=1\n"], ids=["nnodes=2", "hostfile of one host"])
def test_multi_node_needs_an_explicit_shared_out_dir(tmp_path, hosts):
    """A hostfile's host is another machine even when it is the only one: its ranks would resolve
    the default out_dir (a timestamp) there."""
    if hosts is None:
        layout = ["launcher.nnodes=2", "launcher.master_addr=10.0.0.1", "trainer.global_batch_size=32"]
    else:
        (tmp_path / "hosts").write_text(hosts)
        layout = [f"launcher.hostfile={tmp_path / 'hosts'}"]
    proc = launch("launcher.dry_run=true", *layout, cwd=tmp_path)
    assert proc.returncode == 2 and "invalid configuration out_dir=" in proc.stderr
    assert not list(tmp_path.glob("outputs/*")), "the refused launch left its run directory behind"


def test_submitit_task_becomes_one_rank():
    from train.launcher import submitit_rank_env

    env = submitit_rank_env(5, 1, 8, 2, 1, "node-a", 29500, 123456)
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                   "MASTER_ADDR": "node-a", "MASTER_PORT": str(29500 + 456)}
    assert submitit_rank_env(0, 0, 2, 1, 0, "h", 65500, 123456)["MASTER_PORT"] == str(65500 - 456)


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def submitit_task(monkeypatch, tmp_path):
    """adopt_submitit_task in a fake SLURM task (submitit's JobEnvironment fields); returns the rank
    variables it exported, which are undone after the test."""
    from types import SimpleNamespace

    from tests.conftest import compose_config
    from train import launcher

    for key in (*RANK_VARIABLES, "SLURM_JOB_ID"):
        monkeypatch.setenv(key, "")  # recorded by monkeypatch, so that what the task exports is undone
        monkeypatch.delenv(key)

    def adopt(layout, **job):
        monkeypatch.setattr(launcher, "submitit_job", lambda: SimpleNamespace(**job))
        launcher.adopt_submitit_task(compose_config(layout, out_dir=tmp_path / "run"))
        return {k: os.environ[k] for k in RANK_VARIABLES if k in os.environ}
    return adopt


TWO_BY_TWO = ["launcher.nnodes=2", "launcher.nproc_per_node=2", "trainer.global_batch_size=32"]


def test_a_submitit_task_is_one_rank_of_the_job(submitit_task):
    """Task 3 of a 2-node job of 2 tasks each: rank 3 on node 1, the master on the job's first node."""
    env = submitit_task(TWO_BY_TWO, num_tasks=4, num_nodes=2, global_rank=3, local_rank=1, node=1, job_id="777",
                        hostnames=["node-a", "node-b"])
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                   "MASTER_ADDR": "node-a", "MASTER_PORT": str(29500 + 777)}


@pytest.mark.parametrize("tasks", [4, 1], ids=["4 tasks for 2 ranks", "1 task for 2 ranks"])
def test_a_submitit_job_of_another_size_is_refused(submitit_task, tasks):
    """One task per rank: a job of more or fewer tasks than launcher.* asks for is refused in each
    task, before it becomes a rank of a world of the wrong size."""
    from train.validate import ConfigError

    with pytest.raises(ConfigError) as err:
        submitit_task(["launcher.nproc_per_node=2", "trainer.global_batch_size=32"], num_tasks=tasks, num_nodes=1,
                      global_rank=0, local_rank=0, node=0, job_id="5", hostnames=["node-a"])
    assert err.value.key == "hydra.launcher.tasks_per_node" and f"the job has {tasks} task(s)" in str(err.value)


def test_slurm_sweep_over_the_layout_is_refused(tmp_path):
    proc = launch("-m", "hydra/launcher=slurm", "launcher.dry_run=true", f"out_dir={tmp_path / 's'}",
                  "launcher.nproc_per_node=1,2", "trainer.global_batch_size=32")
    assert proc.returncode == 2 and "launcher.nproc_per_node=1,2" in proc.stderr


@pytest.mark.parametrize("args", [["launcher.nproc_per_node=2"], ["launcher.nnodes=2", "launcher.nproc_per_node=2",
                                                                  "launcher.master_addr=10.0.0.1"]])
def test_a_rank_runs_itself_and_launches_nothing(args, monkeypatch, tmp_path):
    """torchrun starts each rank as `python launch.py ...` with the same overrides: a rank that
    planned a launch of its own would start torchrun again, ranks within ranks, until the machine
    gave out. RANK in the environment (set by torchrun, DeepSpeed's launcher or adopted from
    submitit) makes a process one rank; without it the same config plans the launch."""
    from tests.conftest import compose_config
    from train import launcher

    cfg = compose_config(args, out_dir=tmp_path / "run")
    monkeypatch.delenv("RANK", raising=False)
    plan = launcher.plan_launch(cfg, args)
    assert plan is not None and plan.command[1:3] == ["-m", "torch.distributed.run"]
    monkeypatch.setenv("RANK", "1")
    assert launcher.plan_launch(cfg, args) is None
