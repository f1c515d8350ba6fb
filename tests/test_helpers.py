"""The test harness's own promise: what a test session starts (servers, Prometheus, training
runs) ends with it, however it ends. Checked on a stand-in: a process that starts a child as
helpers.serving starts `bentoml serve`, then is killed with SIGKILL, as a killed pytest is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO, wait_for

PARENT = """
import subprocess, sys, time
sys.path.insert(0, "tests")
from helpers import tied_to_this_process
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    start_new_session=True,
    preexec_fn=tied_to_this_process,
)
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_child_ends_when_the_session_that_started_it_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.2)
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: not alive(child), timeout=10), "the child outlived its parent"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
