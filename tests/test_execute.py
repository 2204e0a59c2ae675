"""train.launcher.execute(): the launch waits for the ranks' launcher; stop signals sent to it reach
the ranks (which checkpoint and exit 0), a second Ctrl-C aborts, and its exit status is the
launcher's unless the ranks recorded a pre-emption during this launch. The launcher and its rank
here are two small processes (FAKE) that note what reaches them."""
import json
import os
import signal
import sys
import textwrap
import threading
import time

import psutil
import pytest

from tests.conftest import compose_config
from train.launcher import LaunchPlan, execute

# Stands for torchrun or DeepSpeed's runner and one rank. The launcher has a shutdown of its own: a
# stop signal that reaches it kills its rank (no checkpoint) and exits 1. The rank exits 0 on a stop
# signal, as a rank that checkpointed does; unsignalled, it gives up after 20 s (exit 2). Both ignore
# SIGINT (a terminal's Ctrl-C reaches them directly, not through execute()).
FAKE = textwrap.dedent("""
    import signal, subprocess, sys, time
    role, record = sys.argv[1:]

    def note(text):
        with open(record, "a") as f:
            f.write(text + "\\n")

    def stop(signum, frame):
        note(f"{role} got {signal.Signals(signum).name}")
        if role == "launcher":
            rank.kill()
        sys.exit(1 if role == "launcher" else 0)

    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if role == "launcher":
        rank = subprocess.Popen([sys.executable, __file__, "rank", record])
        sys.exit(rank.wait())
    note("rank started")
    for _ in range(400):
        time.sleep(0.05)
    note("rank finished unsignalled")
    sys.exit(2)
""")


def noop(signum, frame):
    pass


class FakeLaunch:
    def __init__(self, tmp_path):
        self.script, self.record = tmp_path / "fake.py", tmp_path / "record.txt"
        self.script.write_text(FAKE)
        self.plan = LaunchPlan([sys.executable, str(self.script), "launcher", str(self.record)])
        self.cfg = compose_config([], out_dir=tmp_path)
        self.threads = []

    def notes(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def send_when(self, *steps) -> None:
        """In a thread: for each (condition, signal), wait until the condition holds (at most 10 s),
        then send the signal to this process, as a scheduler or a terminal would."""
        def run():
            for ready, sig in steps:
                deadline = time.monotonic() + 10
                while not ready() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), sig)
        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()


@pytest.fixture
def fake_launch(tmp_path):
    """The fake launcher; no process of it outlives the test. Until execute() takes them, this
    process ignores the signals under test: one that execute() failed to take must not end pytest."""
    before = {s: signal.signal(s, noop) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    fake = FakeLaunch(tmp_path)
    try:
        yield fake
    finally:
        for thread in fake.threads:
            thread.join()
        for proc in psutil.Process().children(recursive=True):
            try:
                if str(fake.script) in proc.cmdline():
                    proc.kill()
            except psutil.Error:
                pass
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_stop_signals_go_to_the_ranks_not_the_launcher(fake_launch, sig):
    """Pre-emption (a scheduler's SIGTERM, SLURM's SIGUSR2 warning) reaches the ranks, which
    checkpoint and exit 0; sent to the launcher, it would kill them without a checkpoint."""
    fake = fake_launch
    fake.send_when((lambda: "rank started" in fake.notes() and signal.getsignal(sig) is not noop, sig))
    assert execute(fake.plan, fake.cfg) == 0
    assert fake.notes() == ["rank started", f"rank got {sig.name}"]


def test_a_second_ctrl_c_aborts(fake_launch, capsys):
    """The first Ctrl-C leaves the ranks to finish their step and checkpoint; the second one
    raises KeyboardInterrupt here instead of waiting on."""
    fake = fake_launch
    fake.send_when((lambda: "rank started" in fake.notes() and signal.getsignal(signal.SIGINT) is not noop,
                    signal.SIGINT),
                   (lambda: signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        execute(fake.plan, fake.cfg)
    assert "Ctrl-C again to abort" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is noop, "execute() left its own Ctrl-C handler installed"
    assert fake.notes() == ["rank started"]


def test_a_preempted_summary_of_an_earlier_launch_does_not_hide_a_failure(tmp_path, capsys):
    """A launch whose ranks were pre-empted exits 0. An earlier launch's "preempted" summary in the
    out_dir (this one failed before writing its own) does not turn a failure into 0."""
    cfg = compose_config([], out_dir=tmp_path)
    summary = tmp_path / "summary.json"
    preempted = f"import pathlib, sys; pathlib.Path({str(summary)!r}).write_text('{{\"status\": \"preempted\"}}'); " \
        "sys.exit(1)"  # the ranks' launcher exits 1 after they recorded a pre-emption
    assert execute(LaunchPlan([sys.executable, "-c", preempted]), cfg) == 0
    summary.write_text(json.dumps({"status": "preempted"}))
    an_hour_ago = time.time() - 3600
    os.utime(summary, (an_hour_ago, an_hour_ago))
    assert execute(LaunchPlan([sys.executable, "-c", "import sys; sys.exit(3)"]), cfg) == 3
    assert "the ranks' launcher exited with status 3" in capsys.readouterr().err
